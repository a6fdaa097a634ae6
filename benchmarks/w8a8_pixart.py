"""W8A8 / W4A8 (effalg linear and ViDiT-Q) on the CPU at PixArt dimensions, against bf16, fp32, torchao and
optimum-quanto, in one run.

A PixArtTransformer2DModel with PixArt-alpha block sizes (hidden 1152, MLP 4608, 16 heads x 72) and 4 blocks, run on
2 x 1024 image tokens (batch 2 = the two CFG branches of a 512px image) with 120 text tokens. Only the Linear layers of
the transformer blocks are quantized, identically for every backend; embedders, adaLN and the final layer stay in
float as in ViDiT-Q.

    python benchmarks/w8a8_pixart.py [--reps 7] [--blocks 4] [--skip-peers] [--skip-vidit-q] [--json out.json]

The ViDiT-Q rows load the saved bf16 transformer with ``from_pretrained(..., quantization_config=ViDiTQConfig(...))``
(quantize-on-load: per-channel weights, dynamic per-token activations; "+ rotation" balances every block Linear
with the seeded Hadamard rotation, applied by the fused ``smooth_hadamard`` op).

Prints median time, the ratio to bf16 eager, weight bytes of the quantized blocks, relative error of the output
against fp32, and for effalg the share of forward time spent inside the int8 GEMM (torch.profiler).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import format_table, machine_summary, median_ms, module_bytes, relative_error  # noqa: E402

GEMM_EVENTS = ("onednn::qlinear_pointwise", "aten::_int_mm")


def in_blocks(name: str) -> bool:
    return name.startswith("transformer_blocks.")


def build_model(blocks: int, seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=16,
        attention_head_dim=72,
        in_channels=4,
        out_channels=8,
        num_layers=blocks,
        sample_size=64,  # 64x64 latent, patch 2 -> 1024 tokens
        patch_size=2,
        cross_attention_dim=1152,
        caption_channels=4096,
    ).eval()
    # Random init leaves the adaLN/zero-initialised parts at zero; give every weight a realistic spread.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5)
            else:
                torch.nn.init.normal_(p, std=0.02)
    return model


def make_inputs(dtype: torch.dtype, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(2, 4, 64, 64, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(2, 120, 4096, generator=g).to(dtype),
        timestep=torch.tensor([500, 500]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )


def gemm_share(fn) -> float:
    """Fraction of the forward's wall time spent inside int8 GEMM calls."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    events = prof.events()
    gemm_us = sum(e.cpu_time_total for e in events if e.name in GEMM_EVENTS)
    # Wall time of the profiled call: span of all top-level events.
    top = [e for e in events if e.cpu_parent is None]
    wall_us = max(e.time_range.end for e in top) - min(e.time_range.start for e in top)
    return gemm_us / wall_us if wall_us else float("nan")


def vidit_q_variants(base, x16, record, args) -> None:
    """ViDiT-Q W8A8 / W4A8, with and without the rotation, loaded through diffusers' quantizer API."""
    import tempfile

    from diffusers import PixArtTransformer2DModel

    from effalg.diffusers import ViDiTQConfig

    blocks = r"transformer_blocks\."
    with tempfile.TemporaryDirectory() as tmp:
        copy.deepcopy(base).to(torch.bfloat16).save_pretrained(tmp)
        for name, cfg in [
            ("ViDiT-Q W8A8", ViDiTQConfig(weight_bits=8, act_bits=8, rotation=False)),
            ("ViDiT-Q W8A8 + rotation", ViDiTQConfig(weight_bits=8, act_bits=8, rotation=True, balance_layers=blocks)),
            ("ViDiT-Q W4A8", ViDiTQConfig(weight_bits=4, act_bits=8, rotation=False)),
            ("ViDiT-Q W4A8 + rotation", ViDiTQConfig(weight_bits=4, act_bits=8, rotation=True, balance_layers=blocks)),
        ]:
            model = PixArtTransformer2DModel.from_pretrained(tmp, quantization_config=cfg, torch_dtype=torch.bfloat16)
            record(name + " eager", model.eval(), x16)
            if name == "ViDiT-Q W8A8" and not args.skip_compile:
                record(name + " compiled", torch.compile(model), x16, "torch.compile")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--skip-peers", action="store_true", help="skip torchao and optimum-quanto")
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--skip-vidit-q", action="store_true")
    ap.add_argument("--json", help="write the results to this JSON file")
    ap.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's default mmap threshold (every large op output then page-faults; all variants suffer)",
    )
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("torch").setLevel(logging.ERROR)

    import effalg.core as ec
    import effalg.kernels

    if not args.default_malloc:  # applies to every variant alike
        effalg.kernels.configure_allocator()

    base = build_model(args.blocks)
    x32 = make_inputs(torch.float32)
    x16 = make_inputs(torch.bfloat16)
    with torch.inference_mode():
        ref = base(**x32)[0]

    rows = []
    results = {}

    def record(name, model, inputs, note=""):
        fn = lambda: model(**inputs)  # noqa: E731
        ms = median_ms(fn, reps=args.reps)
        with torch.inference_mode():
            out = model(**inputs)[0]
        results[name] = dict(ms=ms, bytes=module_bytes(model, in_blocks), rel_err=relative_error(ref, out), note=note)
        print(f"  {name}: {ms:.1f} ms", flush=True)
        return fn

    print(machine_summary(), flush=True)
    record("fp32 eager", base, x32)
    bf16 = copy.deepcopy(base).to(torch.bfloat16)
    record("bf16 eager", bf16, x16)
    if not args.skip_compile:
        record("bf16 compiled", torch.compile(bf16), x16, "torch.compile")

    if not args.skip_peers:
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            tao = copy.deepcopy(base).to(torch.bfloat16)
            quantize_(tao, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and in_blocks(fqn))
            record("torchao int8dq eager", tao, x16)
            if not args.skip_compile:
                record("torchao int8dq compiled", torch.compile(tao), x16, "torch.compile")
        except Exception as e:  # a peer failing must not hide effalg's numbers
            print(f"  torchao skipped: {type(e).__name__}: {e}", flush=True)
        try:
            from optimum.quanto import Calibration, freeze, qint8
            from optimum.quanto import quantize as quanto_quantize

            qto = copy.deepcopy(base).to(torch.bfloat16)
            for name, block in qto.named_children():
                if name == "transformer_blocks":
                    quanto_quantize(block, weights=qint8, activations=qint8)
            with torch.inference_mode(), Calibration():
                qto(**x16)
            freeze(qto)
            record("quanto W8A8 eager", qto, x16, "static act scales")
        except Exception as e:
            print(f"  optimum-quanto skipped: {type(e).__name__}: {e}", flush=True)

    cfg = ec.LinearQuantConfig(weight_bits=8, act_bits=8)
    eff16 = copy.deepcopy(base).to(torch.bfloat16)
    ec.quantize_(eff16, cfg, filter_fn=lambda m, fqn: in_blocks(fqn))
    fn = record("effalg W8A8 eager (bf16 act)", eff16, x16)
    share16 = gemm_share(fn)
    results["effalg W8A8 eager (bf16 act)"]["gemm_share"] = share16
    eff32 = copy.deepcopy(base)
    ec.quantize_(eff32, cfg, filter_fn=lambda m, fqn: in_blocks(fqn))
    fn = record("effalg W8A8 eager (fp32 act)", eff32, x32)
    results["effalg W8A8 eager (fp32 act)"]["gemm_share"] = gemm_share(fn)
    if not args.skip_compile:
        record("effalg W8A8 compiled (bf16 act)", torch.compile(eff16), x16, "torch.compile")

    if not args.skip_vidit_q:
        vidit_q_variants(base, x16, record, args)

    bf16_ms = results["bf16 eager"]["ms"]
    bf16_bytes = results["bf16 eager"]["bytes"]
    for name, r in results.items():
        rows.append(
            [
                name,
                round(r["ms"], 1),
                round(bf16_ms / r["ms"], 2),
                f"{r['bytes'] / 2**20:.1f}",
                round(bf16_bytes / r["bytes"], 2),
                f"{r['rel_err']:.2e}",
                f"{100 * r['gemm_share']:.0f}%" if "gemm_share" in r else "",
                r["note"],
            ]
        )
    print()
    print(f"PixArt-dimension transformer, {args.blocks} blocks, batch 2 x 1024 tokens + 120 text tokens, CPU")
    print(
        format_table(
            ["variant", "median ms", "speed-up vs bf16", "block weights MiB", "bytes ratio vs bf16", "rel err vs fp32",
             "int8 GEMM share", "note"],
            rows,
        )
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
