"""MoA speed and KV-cache size on the CPU: sdpa dense vs. MoA (mixed per-head windows) vs. a uniform sliding window.

A LlamaForCausalLM with realistic attention shapes (hidden 2048, 32 query / 8 KV heads, head_dim 64, 2 layers,
random weights, bf16) at 8k / 16k / 32k context. Variants, all in one run:

* ``dense``: ``attn_implementation="sdpa"`` with a ``DynamicCache``;
* ``MoA 50%`` / ``MoA 25%``: a mixed plan, per layer half (resp. a quarter) of the KV heads full-length
  (``beta = 1``) and the rest a short window (``alpha = --short-window``) plus ``--sink`` sink tokens (long heads
  first, or spread with ``--layout interleaved``);
* ``uniform 50%`` / ``uniform 25%``: every KV head the same fixed window (and the same sink), the window chosen
  so that the density at N equals the MoA plan's (StreamingLLM-style), through the same MoA runtime.

**Density** is the kept fraction of the KV cache, ``plan.density(N)`` (mean over layers and KV heads of
``min(N, sink + window) / N``); MoA and uniform rows of one density have equal KV density. The table also gives the
score density (kept fraction of the causal score matrix, ``plan.score_density(N)``: the prefill's work) and
``KV bytes / (density x dense bytes)``, which is 1 when the compact cache holds exactly what the density says.

Measured: prefill time (one forward of N tokens, ``logits_to_keep=1``; only at ``--prefill-lengths``, dense causal
prefill at 32k takes minutes on a small CPU), decode tokens/s (model steps on a cache holding N tokens; the cache is
filled with random K/V so that every length can be measured), decode-attention time per step (the attention op of one
layer alone: ``effalg.kernels.band_decode_attention`` over the compact cache vs. sdpa over the dense cache, both as
transformers calls it (``enable_gqa``) and with the query heads grouped per KV head, the faster dense form on the CPU)
and the KV-cache bytes. Speed is reported as ratios to dense from the same run.

    python benchmarks/moa_speed.py [--lengths 8192 16384 32768] [--prefill-lengths 8192] [--decode-steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import format_table, machine_summary, median_ms  # noqa: E402


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=max(args.lengths) + 1024,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    return model


def mixed_plan(layers: int, kv_heads: int, long_fraction: float, short_window: int, sink: int,
               layout: str = "contiguous"):
    """Per layer, ``round(long_fraction * kv_heads)`` full-length KV heads, the rest short: the long heads first
    (``layout="contiguous"``) or spread over the layer (``"interleaved"``)."""
    from effalg.core.attention_plan import ElasticWindowPlan

    n_long = max(1, round(long_fraction * kv_heads))
    if layout == "contiguous":
        long_idx = set(range(n_long))
    else:
        step = kv_heads / n_long
        long_idx = {int(i * step) for i in range(n_long)}
    rules = [[{"alpha": 0.0, "beta": 1.0, "sink": 0} if h in long_idx else
              {"alpha": float(short_window), "beta": 0.0, "sink": sink} for h in range(kv_heads)]
             for _ in range(layers)]
    return ElasticWindowPlan.from_rules(rules, metadata={"benchmark": f"mixed {n_long}/{kv_heads} long, {layout}"})


def filled_cache(model, plan, n: int, seed: int = 0):
    """A cache holding ``n`` tokens of random K/V (DynamicCache when ``plan`` is None, else a MoACache)."""
    from transformers import DynamicCache

    from effalg.transformers import MoACache

    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    cache = DynamicCache(config=cfg) if plan is None else MoACache(plan)
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn(1, cfg.num_key_value_heads, n, cfg.head_dim, generator=g).to(torch.bfloat16)
        v = torch.randn(1, cfg.num_key_value_heads, n, cfg.head_dim, generator=g).to(torch.bfloat16)
        cache.update(k, v, layer)
        if plan is not None:
            cache.layers[layer].compact_prefill(torch.zeros(1, dtype=torch.long))
        del k, v
    return cache


def kv_bytes(cache) -> int:
    if hasattr(cache, "kv_cache_bytes"):
        return cache.kv_cache_bytes()
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


@torch.inference_mode()
def decode_tok_s(model, cache, n: int, steps: int) -> float:
    """Median tokens/s of single-token decode steps on ``cache`` (``n`` tokens already in it)."""
    tok = torch.tensor([[1]])
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        model(input_ids=tok, past_key_values=cache, use_cache=True, position_ids=torch.tensor([[n + i]]),
              logits_to_keep=1)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times)


def attn_decode_ms(model, cache, reps: int) -> tuple[float, float | None]:
    """Median time of one layer's decode attention on ``cache`` (layer 0). Dense: ``(sdpa as transformers calls it
    (enable_gqa), sdpa with the query heads grouped per KV head [B, Hkv, n_rep, D])``; MoA: ``(band_decode_attention, None)``."""
    import effalg.kernels as K

    cfg = model.config
    q = torch.randn(1, cfg.num_attention_heads, cfg.head_dim).to(torch.bfloat16)
    layer = cache.layers[0]
    scale = cfg.head_dim**-0.5
    if layer.keys.dim() == 4:  # dense [B, Hkv, T, D]
        k, v = layer.keys, layer.values
        qg = q.view(1, k.shape[1], -1, cfg.head_dim)
        sdpa = lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True)  # noqa: E731
        grouped = lambda: F.scaled_dot_product_attention(qg, k, v, scale=scale)  # noqa: E731
        return median_ms(sdpa, warmup=3, reps=reps), median_ms(grouped, warmup=3, reps=reps)
    length = layer.length()
    fn = lambda: K.band_decode_attention(q, layer.keys, layer.values, layer.head_start, length, scale)  # noqa: E731
    return median_ms(fn, warmup=3, reps=reps), None


@torch.inference_mode()
def prefill_s(model, n: int, cache) -> float:
    ids = torch.randint(2, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
    t0 = time.perf_counter()
    model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--prefill-lengths", type=int, nargs="*", default=[8192],
                   help="lengths at which prefill is timed (one forward each; dense 32k prefill takes minutes)")
    p.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--decode-steps", type=int, default=6)
    p.add_argument("--attn-reps", type=int, default=15)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--short-window", type=int, default=64)
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--layout", choices=["contiguous", "interleaved"], default="contiguous",
                   help="where the long heads of the MoA plans sit in each layer")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on a shared machine)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    import effalg.transformers  # noqa: F401  (registers "moa")
    from effalg.transformers import MoACache
    from effalg.transformers.moa_search import moa_applied, uniform_plan_like

    t_start = time.perf_counter()
    model = build_model(a)
    print(f"# MoA speed: {machine_summary()}")
    print(f"# model: Llama, hidden {a.hidden}, {a.heads} q / {a.kv_heads} KV heads, head_dim {a.head_dim}, "
          f"{a.layers} layers, bf16; decode steps {a.decode_steps}\n")
    rows, records = [], []
    for n in a.lengths:
        variants = [("dense (sdpa)", None)]
        for d in a.densities:
            plan = mixed_plan(a.layers, a.kv_heads, d, a.short_window, a.sink, a.layout)
            variants.append((f"MoA {d:.0%}", plan))
        for d in a.densities:
            plan = dict(variants)[f"MoA {d:.0%}"]
            variants.append((f"uniform {d:.0%}", uniform_plan_like(plan, n, sink=a.sink)))
        base = {}
        for name, plan in variants:
            rec = {"length": n, "variant": name}
            with moa_applied(model, plan):
                cache = filled_cache(model, plan, n)
                rec["density"] = 1.0 if plan is None else plan.density(n)
                rec["score_density"] = 1.0 if plan is None else plan.score_density(n)
                rec["kv_bytes"] = kv_bytes(cache)
                rec["attn_ms"], grouped = attn_decode_ms(model, cache, a.attn_reps)
                if grouped is not None:
                    rec["attn_grouped_ms"] = grouped
                rec["decode_tok_s"] = decode_tok_s(model, cache, n, a.decode_steps)
                del cache
                if n in a.prefill_lengths:
                    rec["prefill_s"] = prefill_s(model, n, None if plan is None else MoACache(plan))
            if plan is None:
                base = rec
            dense_kv = base["kv_bytes"]
            rec["kv_vs_dense"] = rec["kv_bytes"] / dense_kv
            rec["kv_vs_density"] = rec["kv_bytes"] / (rec["density"] * dense_kv)
            rec["attn_speedup"] = base["attn_ms"] / rec["attn_ms"]
            rec["attn_speedup_grouped"] = base["attn_grouped_ms"] / rec["attn_ms"]
            rec["decode_speedup"] = rec["decode_tok_s"] / base["decode_tok_s"]
            if "prefill_s" in rec:
                rec["prefill_speedup"] = base["prefill_s"] / rec["prefill_s"]
            records.append(rec)
            rows.append([
                n, name, f"{rec['density']:.3f}", f"{rec['score_density']:.3f}", f"{rec['kv_bytes'] / 2**20:.1f}",
                f"{rec['kv_vs_density']:.4f}",
                f"{rec['prefill_s']:.2f} ({rec['prefill_speedup']:.2f}x)" if "prefill_s" in rec else "-",
                f"{rec['decode_tok_s']:.1f} ({rec['decode_speedup']:.2f}x)",
                f"{rec['attn_ms']:.2f}" + (f" (grouped {rec['attn_grouped_ms']:.2f})" if plan is None else ""),
                f"{rec['attn_speedup']:.2f}x / {rec['attn_speedup_grouped']:.2f}x",
            ])
            print(f"  N={n} {name}: done ({time.perf_counter() - t_start:.0f}s)", file=sys.stderr)
    heads = ["N", "variant", "density (KV kept)", "score density", "KV MiB", "KV / (density x dense)",
             "prefill s (speed-up)",
             "decode tok/s (speed-up)", "decode attn ms/step/layer", "attn speed-up vs sdpa / grouped dense"]
    print(format_table(heads, rows))
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
