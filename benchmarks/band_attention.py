"""DiTFastAttn band attention on the CPU at PixArt dimensions: effalg ``band_attention`` vs dense and masked sdpa.

PixArt-alpha attention shapes: batch 2 (classifier-free guidance), 16 heads of 72, L = 4096 / 16384 image tokens
(a 64x64 / 128x128 latent), a symmetric window of L / 8 tokens on each side (``window = L // 8 + 1``; ``--sink``
adds global tokens at the start of the row), fp32 and bf16. Variants, timed in one run:

* ``full sdpa``: ``F.scaled_dot_product_attention`` without a mask (the dense model);
* ``masked sdpa``: sdpa with the same band as a dense boolean ``[L, L]`` mask (what a DiT gets without a kernel);
* ``band kernel``: ``effalg.kernels.band_attention(q, k, v, window, sink)`` (the CPU path: query blocks over the
  gathered band only, so its cost follows the kept scores, not ``L²``).

Reported: median ms, the band kernel's speed-up over masked and over full sdpa (ratios within the run), the kept
fraction of the ``L x L`` score matrix, and the largest absolute difference to masked sdpa (a sanity check).

    python benchmarks/band_attention.py [--lengths 4096 16384] [--dtypes fp32 bf16] [--reps 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import format_table, machine_summary, median_ms  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def band_mask(L: int, window: int, sink: int) -> torch.Tensor:
    """Boolean ``[L, L]``: ``|i - j| < window``, or the query or the key is one of the first ``sink`` tokens."""
    mask = torch.ones(L, L, dtype=torch.bool).tril(window - 1).triu(-(window - 1))
    mask[:sink] = True
    mask[:, :sink] = True
    return mask


def time_case(a, L: int, dtype: torch.dtype, window: int, mask: torch.Tensor) -> tuple[dict, float]:
    """Median ms of the three variants on random ``q, k, v``, and the largest ``|band - masked|``."""
    import effalg.kernels as K

    g = torch.Generator().manual_seed(L)
    q, k, v = (torch.randn(a.batch, a.heads, L, a.head_dim, generator=g).to(dtype) for _ in range(3))
    out = {}

    def masked():
        out["masked"] = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def band():
        out["band"] = K.band_attention(q, k, v, window, a.sink)

    ms = {
        "full": median_ms(lambda: F.scaled_dot_product_attention(q, k, v), warmup=a.warmup, reps=a.reps),
        "masked": median_ms(masked, warmup=a.warmup, reps=a.reps),
        "band": median_ms(band, warmup=a.warmup, reps=a.reps),
    }
    return ms, float((out["band"].float() - out["masked"].float()).abs().max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=72)
    p.add_argument("--sink", type=int, default=0, help="global tokens at the start of each row (MMDiT text)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on a shared machine)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    t_start = time.perf_counter()
    print(f"# band attention (DiTFastAttn, non-causal): {machine_summary()}")
    print(f"# batch {a.batch}, {a.heads} heads, head_dim {a.head_dim}, window L/8 per side, sink {a.sink}, "
          f"median of {a.reps} (after {a.warmup} warm-up)\n")  # fmt: skip
    rows, records = [], []
    for L in a.lengths:
        window = L // 8 + 1
        mask = band_mask(L, window, a.sink)
        kept = int(mask.sum()) / L**2
        for dname in a.dtypes:
            ms, diff = time_case(a, L, DTYPES[dname], window, mask)
            print(f"  L={L} {dname} done ({time.perf_counter() - t_start:.0f}s)", file=sys.stderr)
            rec = {"L": L, "dtype": dname, "window": window, "sink": a.sink, "kept": kept,
                   "full_ms": ms["full"], "masked_ms": ms["masked"], "band_ms": ms["band"],
                   "band_vs_masked": ms["masked"] / ms["band"], "band_vs_full": ms["full"] / ms["band"],
                   "max_abs_diff": diff}  # fmt: skip
            records.append(rec)
            rows.append([
                L, dname, f"+-{window - 1}", f"{kept:.3f}", f"{ms['full']:.0f}", f"{ms['masked']:.0f}",
                f"{ms['band']:.0f}", f"{rec['band_vs_masked']:.2f}x", f"{rec['band_vs_full']:.2f}x", f"{diff:.1e}",
            ])  # fmt: skip
        del mask
    heads = ["L", "dtype", "band", "kept scores", "full sdpa ms", "masked sdpa ms", "band kernel ms",
             "band vs masked sdpa", "band vs full sdpa", "max abs diff vs masked"]  # fmt: skip
    print(format_table(heads, rows))
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
