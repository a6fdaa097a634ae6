"""effalg demo: the repo's trained text-to-image pipelines quantized on the CPU: the DiT with ViDiT-Q (W8A8, W4A8),
the UNet with MixDQ (W8A8, mixed-precision W4A8).

    bash scripts/dev.sh demo            # from a fresh clone: sets up, then runs this
    python examples/demo.py [--out outputs/demo] [--steps 8] [--prompts 24]

Steps:
1. load ``reference_models/tiny-pixart-shapes`` (a ``PixArtAlphaPipeline`` trained in this repo to draw captioned
   coloured shapes) and generate in FP32;
2. for W8A8 and W4A8: calibrate ViDiT-Q on a few prompts (activation statistics over every timestep and both CFG
   branches, SmoothQuant-style channel scales + a seeded Hadamard rotation), save the quantized pipeline, reload it
   with a plain ``DiffusionPipeline.from_pretrained`` and check that it generates bit-identical images;
3. the same for ``reference_models/tiny-sd-shapes`` (a ``StableDiffusionPipeline``: UNet + causal CLIP text
   encoder) with MixDQ W8A8 (static activation ranges, shortcut split, BOS-aware cross-attention, activation-sensitive
   layers in float) and MixDQ mixed-precision W4A8 (2/4/8-bit weights at 4.0 bits on average, metric-decoupled);
4. score every variant with ``effalg.core.eval`` (does the image show the caption's shape and colours?), print time,
   denoiser memory, PSNR against FP and the task metrics, and save the images side by side as PNGs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings

import torch

CALIBRATION_PROMPTS = [
    "a red circle on a blue background",
    "a green square on a white background",
    "a yellow triangle on a purple background",
    "a blue square on a red background",
    "a white circle on a green background",
    "a purple triangle on a yellow background",
]


def timed_eval(pipe, n_prompts: int, steps: int):
    """``evaluate_t2i`` with the images kept, and its wall time."""
    from effalg.core.eval import evaluate_t2i

    t0 = time.perf_counter()
    res = evaluate_t2i(pipe, n_prompts=n_prompts, num_inference_steps=steps, batch_size=n_prompts, return_images=True)
    return res, time.perf_counter() - t0


def save_grid(columns: dict[str, torch.Tensor], captions: list[str], path: str, rows: int = 8, zoom: int = 4) -> None:
    """PNG with one row per prompt and one column per variant (nearest-neighbour zoomed), labelled."""
    from PIL import Image, ImageDraw

    names = list(columns)
    rows = min(rows, len(captions))
    side = columns[names[0]].shape[-1] * zoom
    label_w, head_h, pad = 300, 18, 4
    grid = Image.new("RGB", (label_w + len(names) * (side + pad), head_h + rows * (side + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(names):
        draw.text((label_w + c * (side + pad) + 2, 2), name, fill="black")
    for r in range(rows):
        draw.text((2, head_h + r * (side + pad) + side // 2 - 6), captions[r], fill="black")
        for c, name in enumerate(names):
            img = (columns[name][r].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            tile = Image.fromarray(img).resize((side, side), Image.NEAREST)
            grid.paste(tile, (label_w + c * (side + pad), head_h + r * (side + pad)))
    grid.save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/demo")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=24, help="evaluation prompts (one image each)")
    ap.add_argument("--mp-ratios", type=int, default=5, help="content/quality budget ratios of MixDQ's search")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.makedirs(args.out, exist_ok=True)

    from effalg.core.eval import shapes as shape_task
    from effalg.diffusers import MixDQConfig, ViDiTQConfig
    from effalg.diffusers.reference_models import SD_T2I_NAME

    pixart_call = dict(height=shape_task.SIZE, width=shape_task.SIZE, use_resolution_binning=False, clean_caption=False)
    mp = {"avg_bits": 4.0, "num_ratios": args.mp_ratios, "num_targets": 2}
    suites = [
        ("tiny-pixart-shapes", "transformer", "fp_vs_vidit_q.png", pixart_call, [
            ("ViDiT-Q W8A8", ViDiTQConfig(weight_bits=8, act_bits=8)),
            ("ViDiT-Q W4A8", ViDiTQConfig(weight_bits=4, act_bits=8)),
        ]),
        (SD_T2I_NAME, "unet", "fp_vs_mixdq.png", {}, [
            ("MixDQ W8A8", MixDQConfig(weight_bits=8, act_bits=8)),
            ("MixDQ mixed W4A8", MixDQConfig(weight_bits=8, act_bits=8, mixed_precision=mp)),
        ]),
    ]  # fmt: skip
    ok = True
    for ref_name, denoiser, png, call, variants in suites:
        ok &= run_suite(ref_name, denoiser, png, call, variants, args)
    return 0 if ok else 1


def run_suite(ref_name, denoiser, png, call, variants, args) -> bool:
    """FP32 and each ``(name, config)`` variant of the reference pipeline ``ref_name``: calibrate, save, reload,
    score, print the table and save the image grid; False if a reload is not bit-identical."""
    from diffusers import DiffusionPipeline

    import effalg.diffusers
    from effalg.core import memory_footprint, psnr
    from effalg.core.eval import shapes as shape_task
    from effalg.core.eval.t2i import eval_prompts
    from effalg.diffusers.reference_models import load_reference_t2i

    print(f"loading the trained reference pipeline reference_models/{ref_name} ...", flush=True)
    fp_pipe = load_reference_t2i(ref_name)
    timed_eval(fp_pipe, args.prompts, 2)  # warm-up
    fp_res, fp_s = timed_eval(fp_pipe, args.prompts, args.steps)
    rows = [("FP32", fp_s, memory_footprint(getattr(fp_pipe, denoiser)), float("inf"), fp_res, "")]
    images = {"FP32": fp_res["images"]}
    for name, cfg in variants:
        print(f"calibrating {name} ...", flush=True)
        pipe = effalg.diffusers.calibrate(
            load_reference_t2i(ref_name), CALIBRATION_PROMPTS, cfg, num_inference_steps=args.steps,
            guidance_scale=3.0, **call,
        )  # fmt: skip
        q_dir = os.path.join(args.out, f"{ref_name}-" + "-".join(name.split()[1:]).lower())
        pipe.save_pretrained(q_dir)
        reloaded = DiffusionPipeline.from_pretrained(q_dir)  # plain from_pretrained: config + plan come from disk
        reloaded.set_progress_bar_config(disable=True)
        timed_eval(reloaded, args.prompts, 2)  # warm-up at the timed batch size (the fused quantizer compiles once)
        res, secs = timed_eval(reloaded, args.prompts, args.steps)
        again, _ = timed_eval(pipe, args.prompts, args.steps)
        diff = (again["images"] - res["images"]).abs().max().item()
        images[name] = res["images"]
        rows.append((name, secs, memory_footprint(getattr(reloaded, denoiser)),
                     psnr(fp_res["images"], res["images"], data_range=1.0), res,
                     "reload bit-identical" if diff == 0 else
                     f"reload max |diff| {diff:.1e}" + (" RELOAD DIFFERS" if diff > 1e-4 else "")))  # fmt: skip

    captions = [shape_task.caption(*p) for p in eval_prompts(args.prompts)]
    grid_path = os.path.join(args.out, png)
    save_grid(images, captions, grid_path)

    print(f"\n{ref_name}: {args.steps}-step generation, {args.prompts} prompts, 32x32, guidance 3, CPU "
          f"({torch.get_num_threads()} threads); chance: shape 0.33, colour 0.17, all three 0.011")
    print(f"| variant | time s | {denoiser} KiB | vs FP | PSNR dB vs FP | shape | colour | bg | all three | FD | check |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, secs, nbytes, p, r, note in rows:
        print(f"| {name} | {secs:.2f} | {nbytes / 2**10:.0f} | {rows[0][2] / nbytes:.2f}x | {p:.1f} | "
              f"{r['shape_acc']:.2f} | {r['color_acc']:.2f} | {r['bg_acc']:.2f} | {r['all_acc']:.2f} | "
              f"{r['frechet']:.3f} | {note} |")  # fmt: skip
    print(f"\nimages side by side: {grid_path}\n")
    return all("DIFFERS" not in r[5] for r in rows)


if __name__ == "__main__":
    sys.exit(main())
