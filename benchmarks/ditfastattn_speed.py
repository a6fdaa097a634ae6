"""DiTFastAttn on the CPU at PixArt dimensions: denoiser time of a compressed-attention plan against the unmodified
transformer, alone and composed with ViDiT-Q W8A8, in one run.

A PixArtTransformer2DModel with PixArt-alpha block sizes (hidden 1152, MLP 4608, 16 heads x 72) and ``--blocks``
blocks runs the ``--steps`` calls of a sampling loop on a CFG batch (2 x the image tokens, 120 text tokens):
4096 image tokens (a 1024px PixArt image) and, with ``--long``, 16384 (2048px) on one block. A plan gives every
block's self-attention the same per-step methods (``PLANS``: step 0 full, then WA-RS / AST / ASC as a threshold
search picks them, or without AST), with the paper's window of an eighth of the tokens per side; its attention-FLOPs
fraction is printed. Weights are random (speed only).

Rows: bf16 unmodified (the baseline), bf16 + DiTFastAttn, ViDiT-Q W8A8 (quantize-on-load, dynamic activations),
ViDiT-Q W8A8 + DiTFastAttn (one denoiser carrying both); ratios are against the bf16 baseline of the same run. Also
the residual / output cache's peak bytes, and the band kernel alone against ``scaled_dot_product_attention`` with
the same band as a boolean mask and against full attention.

    python benchmarks/ditfastattn_speed.py [--blocks 2] [--steps 8] [--reps 2] [--long] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import format_table, machine_summary, median_ms  # noqa: E402

#: Per-step methods of every block: with step sharing, and window + CFG sharing only.
PLANS = {
    "mixed": ["full", "wars+asc", "wars", "ast", "wars+asc", "wars", "ast", "wars+asc"],
    "no AST": ["full", "wars+asc", "wars", "wars+asc", "wars", "wars+asc", "wars+asc", "wars"],
}


def build(blocks: int, tokens: int, dtype: torch.dtype, seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    side = int(round(tokens**0.5)) * 2  # latent side; patch 2
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=blocks,
        sample_size=side, patch_size=2, cross_attention_dim=1152, caption_channels=4096, use_additional_conditions=False,
    ).eval()  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5 if p.dim() >= 2 else 0.02)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1, 4, side, side, generator=g)
    inputs = dict(
        hidden_states=torch.cat([x, x]).to(dtype),  # the CFG batch: both branches see the same latents
        encoder_hidden_states=torch.randn(2, 120, 4096, generator=g).to(dtype),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )
    return model.to(dtype), inputs


def plan_for(model, tokens: int, steps: int, methods: list[str]):
    from effalg.core.ditfastattn_plan import DiTFastAttnPlan
    from effalg.diffusers.ditfastattn import attention_layers

    methods = (methods * (steps // len(methods) + 1))[:steps]
    return DiTFastAttnPlan.uniform(
        list(attention_layers(model)), methods, window=tokens // 8, num_steps=steps, num_tokens=tokens,
        text_tokens=0, cfg=True, hidden_size=1152,
    )  # fmt: skip


def loop(model, inputs, steps: int):
    def run():
        for s in range(steps):
            model(timestep=torch.tensor([999 - 100 * s] * 2), **inputs)

    return run


def bench_denoiser(blocks: int, tokens: int, steps: int, reps: int, vidit_q: bool, warmup: int = 1) -> list[dict]:
    from effalg.diffusers import ViDiTQConfig, apply_ditfastattn, ditfastattn_runtime, remove_ditfastattn

    dtype = torch.bfloat16
    model, inputs = build(blocks, tokens, dtype)
    plans = {k: plan_for(model, tokens, steps, v) for k, v in PLANS.items()}
    rows = []
    variants = [("bf16", model)]
    if vidit_q:
        from diffusers import PixArtTransformer2DModel

        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            q = PixArtTransformer2DModel.from_pretrained(
                d, torch_dtype=dtype, quantization_config=ViDiTQConfig(weight_bits=8, act_bits=8, balance_layers=None)
            ).eval()
        variants.append(("ViDiT-Q W8A8", q))
    base_ms = None
    for name, m in variants:
        runs = [(None, None)] + [(k, p) for k, p in plans.items() if name == "bf16" or k == "mixed"]
        for label, plan in runs:
            if plan is not None:
                apply_ditfastattn(m, plan)
            ms = median_ms(loop(m, inputs, steps), warmup=warmup, reps=reps)
            base_ms = base_ms or ms
            rt = ditfastattn_runtime(m)
            rows.append({
                "tokens": tokens, "blocks": blocks, "variant": name + (f" + DiTFastAttn ({label})" if plan else ""),
                "ms_per_step": ms / steps, "speedup": base_ms / ms,
                "attn_flops": plan.attention_flops_fraction() if plan else 1.0,
                "cache_mib": rt.peak_cache_bytes / 2**20 if rt else 0.0,
            })  # fmt: skip
            print(rows[-1], flush=True)
            if plan is not None:
                remove_ditfastattn(m)
    return rows


def bench_kernel(tokens: int, reps: int) -> dict:
    """The band kernel alone against SDPA with the same band as a boolean mask, and against full attention
    (``benchmarks/band_attention.py``'s measurement at bf16, B = 2, 16 heads x 72, window ±tokens / 8)."""
    from types import SimpleNamespace

    from band_attention import band_mask, time_case

    w = tokens // 8
    mask = band_mask(tokens, w + 1, 0)
    args = SimpleNamespace(batch=2, heads=16, head_dim=72, sink=0, warmup=1, reps=reps)
    ms, _ = time_case(args, tokens, torch.bfloat16, w + 1, mask)
    return {"tokens": tokens, "window": w, "kept": float(mask.float().mean()), "full_ms": ms["full"],
            "masked_ms": ms["masked"], "band_ms": ms["band"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--long", action="store_true", help="also 16384 image tokens (one block, 4 steps, no ViDiT-Q rows)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(machine_summary())
    rows = bench_denoiser(args.blocks, 4096, args.steps, args.reps, vidit_q=True)
    kernels = [bench_kernel(4096, args.reps)]
    if args.long:
        rows += bench_denoiser(1, 16384, 4, 1, vidit_q=False, warmup=0)
        kernels.append(bench_kernel(16384, 1))
    print(f"\nDiTFastAttn, PixArt dims (hidden 1152, 16 heads), bf16, CFG batch 2, {args.steps} steps; plans {PLANS}")
    print(format_table(
        ["image tokens", "blocks", "variant", "ms / step", "vs bf16", "attn FLOPs", "cache MiB"],
        [[r["tokens"], r["blocks"], r["variant"], f"{r['ms_per_step']:.0f}", f"{r['speedup']:.2f}x",
          f"{r['attn_flops']:.1%}", f"{r['cache_mib']:.0f}"] for r in rows],
    ))  # fmt: skip
    print("\nband kernel (B=2, 16 heads x 72, bf16, ±N/8):")
    print(format_table(
        ["tokens", "kept scores", "full SDPA ms", "masked SDPA ms", "band ms", "band vs masked SDPA", "band vs full"],
        [[r["tokens"], f"{r['kept']:.1%}", f"{r['full_ms']:.0f}", f"{r['masked_ms']:.0f}", f"{r['band_ms']:.0f}",
          f"{r['masked_ms'] / r['band_ms']:.2f}x", f"{r['full_ms'] / r['band_ms']:.2f}x"] for r in kernels],
    ))  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "kernels": kernels, "plans": PLANS, "steps": args.steps}, f, indent=1)


if __name__ == "__main__":
    main()
