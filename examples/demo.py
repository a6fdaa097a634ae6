"""effalg demo: a small PixArt pipeline, its transformer quantized to W8A8 and W4A8 with effalg, generating on the CPU.

    bash scripts/dev.sh demo            # from a fresh clone: sets up, then runs this
    python examples/demo.py [--out outputs/demo] [--steps 8]

Steps: build a small PixArt-alpha pipeline (seeded random weights, saved with ``save_pretrained``); generate in FP;
load it again with ``quantization_config=EffalgLinearConfig(...)`` (packed int8 / int4 weights, dynamic per-token
int8 activations); save the quantized pipeline, reload it with a plain ``from_pretrained`` and check that the
images are bit-identical; print time, transformer memory and the image error against FP.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings

import torch


def build_pipeline(path: str, seed: int = 0):
    """A small PixArt-alpha pipeline: 4 blocks of width 384 on a 32x32 latent (256 image tokens)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    from effalg.diffusers.testing import inject_outlier_channels, make_tiny_pixart_alpha

    # The test-kit pipeline supplies the tokenizer, text encoder and VAE; the transformer is made demo-sized.
    _, tiny = make_tiny_pixart_alpha(os.path.join(path, "_tiny"), seed=seed)
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=32, num_layers=4, attention_head_dim=64, num_attention_heads=6, in_channels=4, out_channels=8,
        patch_size=2, cross_attention_dim=384, caption_channels=tiny.text_encoder.config.d_model,
        use_additional_conditions=False,
    ).eval()
    with torch.no_grad():  # give the zero-initialised parts a realistic spread
        for p in transformer.parameters():
            torch.nn.init.normal_(p, std=(p.shape[-1] ** -0.5) if p.dim() >= 2 else 0.02)
    inject_outlier_channels(transformer, 4, seed=seed)  # real DiT activations have outlier channels
    pipe = PixArtAlphaPipeline(tokenizer=tiny.tokenizer, text_encoder=tiny.text_encoder, vae=tiny.vae,
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler())
    pipe.save_pretrained(path)
    return pipe


def generate(pipe, steps: int, seed: int = 0):
    kw = dict(prompt=["a red circle on a blue background", "a green square on a white background"],
              num_inference_steps=steps, height=64, width=64, output_type="pt", use_resolution_binning=False,
              max_sequence_length=16, clean_caption=False, generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    with torch.inference_mode():
        images = pipe(**kw).images
    return images, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/demo")
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    from diffusers import DiffusionPipeline

    import effalg.diffusers  # noqa: F401  (registers the effalg quantizers with diffusers)
    from effalg.core import memory_footprint, psnr
    from effalg.diffusers import EffalgLinearConfig

    fp_dir = os.path.join(args.out, "pixart-fp")
    print(f"building a small PixArt-alpha pipeline in {fp_dir} ...", flush=True)
    fp_pipe = build_pipeline(fp_dir)
    generate(fp_pipe, 2)  # warm-up
    fp_images, fp_s = generate(fp_pipe, args.steps)
    rows = [("FP32", fp_s, memory_footprint(fp_pipe.transformer), float("inf"), "")]

    for name, cfg in [("W8A8", EffalgLinearConfig(weight_bits=8, act_bits=8)),
                      ("W4A8", EffalgLinearConfig(weight_bits=4, act_bits=8))]:
        pipe = DiffusionPipeline.from_pretrained(fp_dir, quantization_config=cfg)
        generate(pipe, 2)  # warm-up (and the fused quantizer compiles once)
        images, secs = generate(pipe, args.steps)
        q_dir = os.path.join(args.out, f"pixart-{name.lower()}")
        pipe.save_pretrained(q_dir)
        reloaded = DiffusionPipeline.from_pretrained(q_dir)  # plain from_pretrained
        same = torch.equal(generate(reloaded, args.steps)[0], images)
        rows.append((name, secs, memory_footprint(pipe.transformer), psnr(fp_images, images, data_range=1.0),
                     "reload bit-identical" if same else "RELOAD DIFFERS"))

    print(f"\n{args.steps}-step generation, 2 prompts, 64x64 (256 image tokens), CPU ({torch.get_num_threads()} threads)")
    print(f"| {'variant':8} | {'time s':>7} | {'transformer MiB':>15} | {'vs FP':>6} | {'PSNR dB vs FP':>13} | check")
    for name, secs, nbytes, p, note in rows:
        ratio = rows[0][2] / nbytes
        print(f"| {name:8} | {secs:7.2f} | {nbytes / 2**20:15.2f} | {ratio:5.2f}x | {p:13.1f} | {note}")
    ok = all("DIFFERS" not in r[4] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
