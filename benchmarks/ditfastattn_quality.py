"""DiTFastAttn fidelity on the trained reference PixArt (``reference_models/tiny-pixart-shapes``): the paper's D1-D6
table.

For each threshold δ, ``effalg.diffusers.search_ditfastattn`` searches a plan on ``--n-cal`` shape captions (another
seed than the evaluation prompts) at 20 steps and CFG 3.0, with the default window (an eighth of the 64 image tokens
per side); the plan is applied and the pipeline scored by ``effalg.core.eval.evaluate_t2i`` (``--n-eval`` prompts):
shape / colour / background accuracies, "all three", the Fréchet distance on the checker's features, and the PSNR of
4 probe images against full attention. "attn FLOPs" is the paper's count (self-attention layers with their
projections, all steps); "attn core" counts only the attention itself.

    python benchmarks/ditfastattn_quality.py [--n-eval 24] [--n-cal 6] [--thresholds 0 0.025 0.05 ...] [--json out]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import format_table, report  # noqa: E402

STEPS, CFG = 20, 3.0
THRESHOLDS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.25)


def run(n_eval=24, n_cal=6, thresholds=THRESHOLDS, window=None) -> dict:
    from effalg.core.eval import evaluate_t2i, shapes
    from effalg.core.eval.t2i import eval_prompts
    from effalg.core.metrics import psnr
    from effalg.diffusers import apply_ditfastattn, remove_ditfastattn, search_ditfastattn
    from effalg.diffusers.reference_models import load_reference_t2i

    cal_prompts = [shapes.caption(*c) for c in eval_prompts(n_cal, seed=1)]
    probe = [shapes.caption(*c) for c in eval_prompts(4, seed=0)]
    call = dict(num_inference_steps=STEPS, guidance_scale=CFG, use_resolution_binning=False, clean_caption=False)

    def images(pipe):
        return pipe(probe, generator=torch.Generator().manual_seed(0), output_type="pt", **call).images

    pipe = load_reference_t2i()
    pipe.set_progress_bar_config(disable=True)
    fp_images = images(pipe)
    rows = [{"name": "FP (full attention)", "threshold": None, "flops": 1.0, "core": 1.0, "methods": {},
             "psnr": float("inf"), "search_s": 0.0,
             **evaluate_t2i(pipe, n_prompts=n_eval, num_inference_steps=STEPS, guidance_scale=CFG)}]  # fmt: skip
    for i, delta in enumerate(thresholds, 1):
        t = time.perf_counter()
        plan = search_ditfastattn(pipe, cal_prompts, threshold=delta, window=window, **call)
        search_s = time.perf_counter() - t
        apply_ditfastattn(pipe, plan)
        res = evaluate_t2i(pipe, n_prompts=n_eval, num_inference_steps=STEPS, guidance_scale=CFG)
        rows.append({
            "name": f"D{i}", "threshold": delta, "flops": plan.attention_flops_fraction(),
            "core": plan.attention_flops_fraction(projections=False),
            "methods": {k: v for k, v in plan.method_counts().items() if v}, "psnr": psnr(fp_images, images(pipe)),
            "search_s": search_s, "window": plan.window, **res,
        })  # fmt: skip
        remove_ditfastattn(pipe)
        print(f"D{i} δ={delta}: attn FLOPs {rows[-1]['flops']:.1%}, all three {res['all_acc']:.3f}", flush=True)
    return {"rows": rows, "n_eval": n_eval, "n_cal": n_cal, "steps": STEPS, "guidance_scale": CFG}


def table(result: dict) -> str:
    headers = ["plan", "δ", "attn FLOPs", "attn core", "shape", "colour", "bg", "all three", "FD", "PSNR dB vs FP",
               "methods (layer-steps)", "search s"]  # fmt: skip
    rows = [
        [
            r["name"],
            "" if r["threshold"] is None else f"{r['threshold']:g}",
            f"{r['flops']:.1%}",
            f"{r['core']:.1%}",
            f"{r['shape_acc']:.3f}",
            f"{r['color_acc']:.3f}",
            f"{r['bg_acc']:.3f}",
            f"{r['all_acc']:.3f}",
            f"{r['frechet']:.3f}",
            f"{r['psnr']:.1f}",
            ", ".join(f"{k} {v}" for k, v in r["methods"].items()),
            f"{r['search_s']:.0f}",
        ]  # fmt: skip
        for r in result["rows"]
    ]
    return format_table(headers, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-eval", type=int, default=24)
    ap.add_argument("--n-cal", type=int, default=6)
    ap.add_argument("--thresholds", type=float, nargs="*", default=list(THRESHOLDS))
    ap.add_argument("--window", type=int, default=None, help="tokens per side (default: an eighth of the tokens)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the tiny model's small ops gain nothing)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.n_eval, args.n_cal, args.thresholds, args.window)
    report(f"DiTFastAttn on tiny-pixart-shapes: {args.n_eval} prompts, {STEPS} steps, CFG {CFG}, search on "
           f"{args.n_cal} prompts", table(result), result, args.json)  # fmt: skip


if __name__ == "__main__":
    main()
