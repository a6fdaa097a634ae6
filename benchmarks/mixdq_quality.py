"""MixDQ fidelity and ablation on the trained reference UNet pipeline (``reference_models/tiny-sd-shapes``).

Every quantized row calibrates with ``effalg.diffusers.calibrate`` on ``--n-cal`` shape captions (a different seed
from the evaluation prompts), 4 steps and CFG 3.0, then is scored by ``effalg.core.eval.evaluate_t2i`` (``--n-eval``
prompts, 4 steps): shape / colour / background accuracies read back by the checker, "all three", and a Fréchet
distance on the checker's features. The ablation follows the paper's table, each row adding one MixDQ part:

* naive static W8A8: static per-tensor activations on every Linear / Conv2d (``conv_in``/``conv_out`` too), no BOS
  handling, no shortcut split, no float layers;
* + BOS-aware cross-attention;
* + float / split layers (MixDQ's defaults: ``conv_in``, ``conv_out``, time embedding and the most
  activation-sensitive layers in float, shortcut split): this is **MixDQ W8A8**;
* naive static W4A8 and MixDQ W4A8 (uniform 4-bit weights, for reference);
* + mixed precision at 4.0 average weight bits scored by SQNR only (one MILP);
* + metric-decoupled (SSIM for content layers, SQNR for quality layers, budget-ratio sweep, pixel-error pick):
  **MixDQ mixed W4A8**; and the W3.66-style plan (2-bit content layers).

    python benchmarks/mixdq_quality.py [--n-eval 24] [--n-cal 8] [--rows all] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import format_table, module_bytes, report  # noqa: E402

STEPS, CFG = 4, 3.0


def variants():
    from effalg.diffusers import MixDQConfig

    naive = dict(bos_aware=False, float_layers=0, modules_to_not_convert=[])
    nosplit = {"split_shortcuts": False}
    return {
        "naive static W8A8": (MixDQConfig(**naive), nosplit),
        "+ BOS-aware": (MixDQConfig(bos_aware=True, float_layers=0, modules_to_not_convert=[]), nosplit),
        "+ float/split layers = MixDQ W8A8": (MixDQConfig(), {}),
        "naive static W4A8": (MixDQConfig(weight_bits=4, **naive), nosplit),
        "MixDQ W4A8 (uniform)": (MixDQConfig(weight_bits=4), {}),
        "+ mixed precision, SQNR only (4.0 bits)": (
            MixDQConfig(mixed_precision={"avg_bits": 4.0, "metric": "sqnr"}),
            {},
        ),
        "+ metric-decoupled = MixDQ mixed W4A8 (4.0 bits)": (MixDQConfig(mixed_precision={"avg_bits": 4.0}), {}),
        "MixDQ mixed W3.66": (MixDQConfig(mixed_precision={"avg_bits": 3.66}), {}),
    }


def weight_bits_summary(unet) -> tuple[float, dict]:
    """Parameter-weighted average weight bits over the quantized layers, and the layer count per bit width."""
    from effalg.core.modules import InputSplitConv2d, WxA8Conv2d, WxA8Linear

    total = bits = 0
    counts: dict = {}
    for name, m in unet.named_modules():
        if ".parts." in name or not isinstance(m, (WxA8Linear, WxA8Conv2d, InputSplitConv2d)):
            continue  # the parts of a split conv count once, as the split conv
        if isinstance(m, WxA8Linear):
            n = m.out_features * m.in_features
        else:
            n = m.out_channels * m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        total += n
        bits += n * m.weight_bits
        counts[m.weight_bits] = counts.get(m.weight_bits, 0) + 1
    return bits / max(1, total), dict(sorted(counts.items()))


def run(n_eval=24, n_cal=8, only=None, show_progress=True) -> dict:
    from effalg.core.eval import evaluate_t2i, shapes
    from effalg.core.eval.t2i import eval_prompts
    from effalg.core.metrics import psnr
    from effalg.diffusers import calibrate
    from effalg.diffusers.reference_models import SD_T2I_NAME, load_reference_t2i

    cal_prompts = [shapes.caption(*c) for c in eval_prompts(n_cal, seed=1)]
    probe = [shapes.caption(*c) for c in eval_prompts(4, seed=0)]

    def images(pipe):
        gen = torch.Generator().manual_seed(0)
        return pipe(probe, num_inference_steps=STEPS, guidance_scale=CFG, generator=gen, output_type="pt").images

    fp = load_reference_t2i(SD_T2I_NAME)
    fp_bytes = module_bytes(fp.unet)
    fp_images = images(fp)
    rows = []
    t = time.perf_counter()
    res = evaluate_t2i(fp, n_prompts=n_eval, num_inference_steps=STEPS, guidance_scale=CFG)
    rows.append({"variant": "FP32", "unet_kib": fp_bytes / 1024, "vs_fp32": 1.0, "avg_bits": 32.0, "psnr": float("inf"),
                 "calib_s": 0.0, "eval_s": time.perf_counter() - t, **res})  # fmt: skip
    for name, (cfg, kw) in variants().items():
        if only and not any(o in name for o in only):
            continue
        pipe = load_reference_t2i(SD_T2I_NAME)
        t = time.perf_counter()
        calibrate(pipe, cal_prompts, cfg, num_inference_steps=STEPS, guidance_scale=CFG, progress=show_progress, **kw)
        calib_s = time.perf_counter() - t
        t = time.perf_counter()
        res = evaluate_t2i(pipe, n_prompts=n_eval, num_inference_steps=STEPS, guidance_scale=CFG)
        avg, counts = weight_bits_summary(pipe.unet)
        q = pipe.unet.config.quantization_config
        rows.append({
            "variant": name, "unet_kib": module_bytes(pipe.unet) / 1024, "vs_fp32": fp_bytes / module_bytes(pipe.unet),
            "avg_bits": avg, "bits_layers": counts, "psnr": psnr(fp_images, images(pipe)), "calib_s": calib_s,
            "eval_s": time.perf_counter() - t, "float_layers": (q.plan or {}).get("metadata", {}).get("float_layers"),
            "split_layers": len(q.split_layers or {}), "bos_rows": q.bos_rows, **res,
        })  # fmt: skip
        print(f"{name}: all three {res['all_acc']:.3f} ({calib_s:.0f} s calibration)", flush=True)
    return {"rows": rows, "n_eval": n_eval, "n_cal": n_cal, "steps": STEPS, "guidance_scale": CFG}


def table(result: dict) -> str:
    headers = ["variant", "UNet KiB", "vs FP32", "avg w bits", "PSNR dB vs FP", "shape", "colour", "bg", "all three",
               "FD", "calib s"]  # fmt: skip
    rows = [
        [
            r["variant"],
            f"{r['unet_kib']:.0f}",
            f"{r['vs_fp32']:.2f}x",
            f"{r['avg_bits']:.2f}",
            f"{r['psnr']:.1f}",
            f"{r['shape_acc']:.3f}",
            f"{r['color_acc']:.3f}",
            f"{r['bg_acc']:.3f}",
            f"{r['all_acc']:.3f}",
            f"{r['frechet']:.3f}",
            f"{r['calib_s']:.0f}",
        ]  # fmt: skip
        for r in result["rows"]
    ]
    return format_table(headers, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-eval", type=int, default=24)
    ap.add_argument("--n-cal", type=int, default=8)
    ap.add_argument("--rows", nargs="*", default=None, help="substrings of the variants to run (default: all)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the tiny UNet's small ops gain nothing)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = run(args.n_eval, args.n_cal, args.rows, not args.no_progress)
    report(f"MixDQ on tiny-sd-shapes: {args.n_eval} prompts, {STEPS} steps, CFG {CFG}, calibration on {args.n_cal} "
           "prompts", table(result), result, args.json)  # fmt: skip


if __name__ == "__main__":
    main()
