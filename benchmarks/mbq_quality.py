"""MBQ fidelity on the trained reference VLM (``reference_models/tiny-vlm-shapes``): FP, RTN, AWQ and MBQ at W4, W3
and W4A8, in one table, plus the per-layer vision/text gradient ratios MBQ measured.

* RTN: the language decoder's linears quantized directly (effalg's packed modules, no scales);
* AWQ: ``calibrate_mbq(..., MBQConfig(balance_modalities=False))``: the same scale search with every token weighted 1
  and squared error;
* MBQ: ``calibrate_mbq(..., MBQConfig())``: vision tokens weighted by the measured gradient ratio, text = the answer
  tokens, mean absolute error.

Calibration on ``--n-cal`` samples of ``effalg.core.eval.vlm_samples``, once per ``--cal-seeds`` seed (AWQ and MBQ
rows: the mean over the calibration sets, with the range of the KL column: on this model the spread between
calibration sets is as large as the differences between methods); evaluation by
``effalg.core.eval.evaluate_vlm`` on ``--n-eval`` held-out images x 3 questions (exact match; chance: shape 1/3,
colour and background 1/6), the answer's negative log-likelihood and the fidelity to the float model: the KL
divergence ``KL(FP || quantized)`` of the first answer token's distribution (``effalg.core.metrics.kl_divergence``),
the column that separates methods on a decoder that answers every question right at 3 bits. Weight-only groups are 128 wide (or the largest
power of two dividing every decoder input width, if smaller); "W3 per-channel" (one scale per output row) is the
harder setting on a decoder as robust as this one; "vision W4A8" also quantizes the vision tower (round-to-nearest
W4A8, ``MBQConfig(quantize_vision_tower=True)``).

    python benchmarks/mbq_quality.py [--n-eval 96] [--n-cal 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import format_table, report  # noqa: E402

SETTINGS = {  # name: (weight bits, act bits, group (None: the default), vision tower at W4A8 too)
    "W4": (4, None, None, False),
    "W3": (3, None, None, False),
    "W3 per-channel": (3, None, 0, False),
    "W4A8": (4, 8, 0, False),
    "W4A8, vision W4A8": (4, 8, 0, True),
}


def group_size(model) -> int:
    from torch import nn

    from effalg.transformers.mbq import decoder_layers

    _, layers = decoder_layers(model)
    g = 0
    for m in layers.modules():
        if isinstance(m, nn.Linear):
            g = math.gcd(g, m.in_features)
    return min(128, g & -g)


def add_outlier_channels(model, k: int, scale: float, seed: int = 0) -> list[int]:
    """Function-preserving outlier channels, as real LLM decoders have them: ``k`` hidden channels of every decoder
    norm weight times ``scale`` and the same input columns of the linears it feeds divided by ``scale`` (the float
    model computes the same function; its activations and weights now have the outlier structure AWQ / MBQ fix)."""
    from effalg.transformers.mbq import decoder_layers

    _, layers = decoder_layers(model)
    hidden = layers[0].input_layernorm.weight.shape[0]
    idx = torch.randperm(hidden, generator=torch.Generator().manual_seed(seed))[:k]
    with torch.no_grad():
        for layer in layers:
            a, m = layer.self_attn, layer.mlp
            for norm, linears in ((layer.input_layernorm, (a.q_proj, a.k_proj, a.v_proj)),
                                  (layer.post_attention_layernorm, (m.gate_proj, m.up_proj))):  # fmt: skip
                norm.weight[idx] *= scale
                for lin in linears:
                    lin.weight[:, idx] /= scale
    return idx.tolist()


def run(n_eval: int, n_cal: int, progress: bool, outliers: int = 0, outlier_scale: float = 30.0,
        model_path: str | None = None, cal_seeds: tuple[int, ...] = (0,)) -> dict:  # fmt: skip
    from effalg.core.eval import evaluate_vlm, vlm_samples
    from effalg.core.metrics import kl_divergence
    from effalg.transformers.reference_models import load_reference_vlm

    def load():
        model, processor = load_reference_vlm(model_path)
        add_outlier_channels(model, outliers, outlier_scale)
        return model, processor

    model, processor = load()
    calibration_sets = [vlm_samples(processor, n=n_cal, seed=s) for s in cal_seeds]
    gs = group_size(model)
    fp = evaluate_vlm(model, processor, n_samples=n_eval, return_logits=True)
    fp_logits = fp.pop("answer_logits")
    rows = [{"setting": "FP", "method": "-", "calib_s": 0.0, "kl": 0.0, **fp}]
    ratios = None
    for setting, (wb, ab, group, vision) in SETTINGS.items():
        group = gs if group is None else group
        for method in ("RTN", "AWQ", "MBQ"):
            runs = []
            for samples in calibration_sets if method != "RTN" else calibration_sets[:1]:
                model, _ = load()
                t = time.perf_counter()
                ratios = quantize(model, processor, samples, method, setting, wb, ab, group, vision, progress) or ratios
                calib_s = time.perf_counter() - t
                res = evaluate_vlm(model, processor, n_samples=n_eval, return_logits=True)
                runs.append({"calib_s": calib_s, "kl": kl_divergence(fp_logits, res.pop("answer_logits")), **res})
            row = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}
            row.update(setting=f"{setting}" + (f" g{group}" if group else ""), method=method, runs=len(runs),
                       kl_min=min(r["kl"] for r in runs), kl_max=max(r["kl"] for r in runs))  # fmt: skip
            rows.append(row)
            print(f"{setting} {method}: all {row['all_acc']:.3f}, KL {row['kl']:.2e} [{row['kl_min']:.2e}, "
                  f"{row['kl_max']:.2e}] ({row['calib_s']:.0f} s)", flush=True)  # fmt: skip
    return {"rows": rows, "ratios": ratios, "n_eval": n_eval, "n_cal": n_cal, "cal_seeds": list(cal_seeds)}


def quantize(model, processor, samples, method: str, setting: str, wb: int, ab, group: int, vision: bool,
             progress: bool = False):  # fmt: skip
    """Quantize ``model`` in place with ``method``; the MBQ W3 run returns its gradient ratios."""
    from effalg.core.config import LinearQuantConfig, quantize_
    from effalg.transformers import MBQConfig, calibrate_mbq
    from effalg.transformers.mbq import _float_modules, decoder_layers, vision_tower

    if method == "RTN":
        prefix, _ = decoder_layers(model)
        tower = [vision_tower(model)] if vision else []
        if vision:
            quantize_(model.get_submodule(tower[0]), LinearQuantConfig(weight_bits=4, act_bits=8))
        quantize_(model, LinearQuantConfig(weight_bits=wb, act_bits=ab, weight_group_size=group,
                                           weight_symmetric=ab == 8,
                                           modules_to_not_convert=_float_modules(model, prefix, *tower)))  # fmt: skip
        return None
    cfg = MBQConfig(weight_bits=wb, act_bits=ab, group_size=group, balance_modalities=method == "MBQ",
                    quantize_vision_tower=vision)  # fmt: skip
    calibrate_mbq(model, processor, samples, cfg, progress=progress)
    return cfg.calibration["vision_text_grad_ratio"] if method == "MBQ" and setting == "W3" else None


def table(result: dict) -> str:
    rows = [
        [
            r["setting"],
            r["method"],
            f"{r['shape_acc']:.3f}",
            f"{r['color_acc']:.3f}",
            f"{r['bg_acc']:.3f}",
            f"{r['all_acc']:.3f}",
            f"{r['loss']:.2e}",
            f"{r['kl']:.2e}" + (f" [{r['kl_min']:.1e}, {r['kl_max']:.1e}]" if r.get("runs", 1) > 1 else ""),
            f"{r['calib_s']:.0f}",
        ]  # fmt: skip
        for r in result["rows"]
    ]
    out = format_table(["setting", "method", "shape", "colour", "bg", "all", "answer NLL", "KL vs FP", "calib s"], rows)
    if result["ratios"]:
        a, m = result["ratios"]["attn"], result["ratios"]["mlp"]
        out += "\n\nvision / text gradient ratio per decoder layer (MBQ W3 calibration):\n"
        out += format_table(
            ["layer", "attention (o_proj)", "MLP (down_proj)", "text / vision (attn)"],
            [[i, f"{x:.4f}", f"{y:.4f}", f"{1 / x:.1f}x" if x > 0 else "inf"] for i, (x, y) in enumerate(zip(a, m))],
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-eval", type=int, default=96)
    ap.add_argument("--n-cal", type=int, default=32)
    ap.add_argument("--cal-seeds", default=",".join(str(1000 * i) for i in range(8)), help="calibration sets (vlm_samples seeds) AWQ / MBQ average")
    ap.add_argument("--outliers", type=int, default=0, help="function-preserving outlier channels per decoder norm")
    ap.add_argument("--outlier-scale", type=float, default=30.0)
    ap.add_argument("--model", default=None, help="a VLM folder (default: reference_models/tiny-vlm-shapes)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = tuple(int(x) for x in args.cal_seeds.split(","))
    result = run(args.n_eval, args.n_cal, not args.no_progress, args.outliers, args.outlier_scale, args.model, seeds)
    report(f"MBQ on {args.model or 'tiny-vlm-shapes'} ({args.outliers} outlier channels x {args.outlier_scale:g}): "
           f"{args.n_eval} images x 3 questions, calibration on {args.n_cal} samples x {len(seeds)} sets", table(result), result,
           args.json)  # fmt: skip


if __name__ == "__main__":
    main()
