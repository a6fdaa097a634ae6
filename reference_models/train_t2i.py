"""Train the reference text-to-image pipelines on procedural captioned shapes.

Usage (from the repo root)::

    nice -n 19 .venv/bin/python reference_models/train_t2i.py --out reference_models/tiny-pixart-shapes
    nice -n 19 .venv/bin/python reference_models/train_t2i.py --arch sd --out reference_models/tiny-sd-shapes

``--arch pixart`` (default, diffusers PixArtAlphaPipeline): phase 1 trains a tiny AutoencoderKL
(32x32x3 <-> 16x16x4); phase 2 freezes it and trains a PixArtTransformer2DModel together with a tiny T5EncoderModel
(word-level tokenizer from ``effalg.transformers.reference_models``).

``--arch sd`` (diffusers StableDiffusionPipeline): phase 1 loads the trained VAE (``--vae``, default the one of
``tiny-pixart-shapes``) instead of training one; phase 2 trains an SD-1.5-like UNet2DConditionModel (Conv2d resnets,
skip concatenation, transformer blocks with attn1 / attn2 / ff) together with a tiny causal CLIPTextModel (word-level
CLIPTokenizer with ``<|startoftext|>`` / ``<|endoftext|>``). The UNet is saved in fp16 (it loads as fp32).

Both train on the VAE's latents with the same loop: a v-prediction DDPM objective and 10% caption dropout (for
classifier-free guidance). The saved scheduler is a DPMSolverMultistepScheduler with trailing timestep spacing (works
from ~4 steps); the pipeline is reloaded from disk and scored at 20 and 4 steps into ``metrics.json``. Fixed seeds,
single thread, fixed step counts; ``--max-minutes`` is only a safety cap on the whole run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
for _pkg in ("effalg-kernels", "effalg-core", "effalg-transformers"):
    sys.path.insert(0, str(REPO / "packages" / _pkg / "src"))

from effalg.core.eval import shapes  # noqa: E402
from effalg.transformers.reference_models import build_shapes_clip_tokenizer, build_shapes_tokenizer  # noqa: E402

SCHED_KW = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")

# Per-architecture defaults of the options given as None below.
DEFAULTS = {
    "pixart": dict(out="tiny-pixart-shapes", steps=4500, vae=None),
    "sd": dict(out="tiny-sd-shapes", steps=5000, vae="tiny-pixart-shapes/vae"),
}


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        mid_block_add_attention=False,
    )


def build_text_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=vocab_size,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg)


def build_clip_text_encoder(vocab_size: int, max_length: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        projection_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        hidden_act="quick_gelu",
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(cfg)


def build_unet(args):
    from diffusers import UNet2DConditionModel

    # No attention at the full 16x16 latent (256 tokens would triple the step time on one CPU thread):
    # resnets only there, cross-attention transformer blocks at 8x8 and 4x4 and in the mid block.
    ch = tuple(int(c) for c in args.channels.split(","))
    n = len(ch)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        block_out_channels=ch,
        layers_per_block=args.layers_per_block,
        cross_attention_dim=64,
        attention_head_dim=4,  # diffusers' legacy name: the number of heads
        norm_num_groups=8,
    )


def build_transformer(args):
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=args.head_dim,
        in_channels=4,
        out_channels=4,
        num_layers=args.layers,
        cross_attention_dim=4 * args.head_dim,
        sample_size=16,
        patch_size=2,
        caption_channels=64,
        norm_num_groups=32,
        use_additional_conditions=False,
    )


def _shown(path):
    """``path`` relative to the repo root when it lies inside it (for metrics.json), else as given."""
    if path is None:
        return None
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(path)


def lr_at(step: int, total: int, base: float, warm: int = 100) -> float:
    return base * min(1.0, step / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total)))


def pixart_parts(args):
    """(trained modules, forward(zt, t, captions) -> v prediction, pipeline(vae, scheduler), denoiser name)."""
    from diffusers import PixArtAlphaPipeline

    tok = build_shapes_tokenizer()
    torch.manual_seed(args.seed + 2)
    if args.companion_of:  # a smaller denoiser for the same text encoder (loaded, frozen) and VAE: OMS-DPM's zoo
        from transformers import T5EncoderModel

        te = T5EncoderModel.from_pretrained(Path(args.companion_of) / "text_encoder").eval().requires_grad_(False)
    else:
        te = build_text_encoder(len(tok))
    tr = build_transformer(args)

    def forward(zt, t, caps):
        ti = tok(caps, padding="max_length", max_length=10, truncation=True, return_tensors="pt")
        emb = te(ti.input_ids, attention_mask=ti.attention_mask)[0]
        return tr(
            zt,
            encoder_hidden_states=emb,
            encoder_attention_mask=ti.attention_mask,
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )[0]

    def pipeline(vae, scheduler):
        return PixArtAlphaPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=tr, scheduler=scheduler)

    return ((tr,) if args.companion_of else (tr, te)), forward, pipeline, "transformer"


def sd_parts(args):
    from diffusers import StableDiffusionPipeline

    tok = build_shapes_clip_tokenizer()
    torch.manual_seed(args.seed + 2)
    te = build_clip_text_encoder(len(tok), tok.model_max_length)
    unet = build_unet(args)

    def forward(zt, t, caps):
        # Exactly what StableDiffusionPipeline.encode_prompt does: no attention mask (the CLIP encoder is causal and
        # the padding <|endoftext|> tokens come after the caption), the last hidden state.
        ids = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        return unet(zt, t, encoder_hidden_states=te(ids.input_ids)[0], return_dict=False)[0]

    def pipeline(vae, scheduler):
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=te,
            tokenizer=tok,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    return (unet, te), forward, pipeline, "unet"


@torch.no_grad()
def vae_recon_acc(vae) -> tuple[float, float]:
    """(checker accuracy of the VAE's reconstructions of 256 rendered images, 1 / std of their latents)."""
    x, _, labs = shapes.sample_batch(256, torch.Generator().manual_seed(99))
    lat = vae.encode(x * 2 - 1).latent_dist.mode()
    rec = (vae.decode(lat).sample + 1) / 2
    chk = [shapes.check_image(r) for r in rec]
    acc = sum(c.shape == lab[0] and c.fg == lab[1] and c.bg == lab[2] for c, lab in zip(chk, labs)) / 256
    return acc, float(1.0 / lat.std())


def train_vae(args, t0: float):
    torch.manual_seed(args.seed)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    for step in range(1, args.vae_steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vae_steps, 2e-3, warm=20)
        x, _, _ = shapes.sample_batch(args.batch, gen)
        x = x * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        rec_loss = F.mse_loss(rec, x)
        kl = post.kl().mean() / (4 * 16 * 16)
        loss = rec_loss + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0:
            print(
                f"vae {step} rec {rec_loss.item():.4f} kl {kl.item():.3f} {(time.time() - t0) / 60:.1f} min", flush=True
            )
    vae.eval().requires_grad_(False)
    vae_acc, scale = vae_recon_acc(vae)
    vae.register_to_config(scaling_factor=scale)
    return vae, {"steps": args.vae_steps, "recon_checker_acc": vae_acc, "scaling_factor": scale}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", choices=tuple(DEFAULTS), default="pixart")
    p.add_argument("--out", default=None, help="default reference_models/tiny-{pixart,sd}-shapes")
    p.add_argument("--vae", default=None, help="load this trained VAE instead of training one (sd default: pixart's)")
    p.add_argument("--vae-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=None, help="default 4500 (pixart), 5000 (sd)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--layers", type=int, default=4, help="pixart: transformer layers")
    p.add_argument("--head-dim", type=int, default=32, help="pixart: attention head dim (4 heads)")
    p.add_argument("--channels", default="32,64,64", help="sd: UNet block_out_channels")
    p.add_argument("--layers-per-block", type=int, default=1, help="sd: UNet layers_per_block")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-minutes", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-prompts", type=int, default=48)
    p.add_argument("--companion-of", default=None,
                   help="pixart: train only a (smaller) transformer for this pipeline's frozen text encoder and VAE")
    args = p.parse_args()
    for k, v in DEFAULTS[args.arch].items():
        if getattr(args, k) is None and v is not None:
            setattr(args, k, str(REPO / "reference_models" / v) if k in ("out", "vae") else v)
    torch.set_num_threads(args.threads)
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler

    t0 = time.time()
    out_dir = Path(args.out)
    # paths in the log relative to the repo (the committed metrics.json must not name this machine's folders)
    log: dict = {"args": {k: _shown(v) if k in ("out", "vae", "companion_of") else v for k, v in vars(args).items()}}

    # ---- phase 1: VAE (trained, or loaded with --vae) ----
    if args.vae:
        vae = AutoencoderKL.from_pretrained(args.vae).eval().requires_grad_(False)
        scale = vae.config.scaling_factor
        log["vae"] = {
            "loaded_from": _shown(args.vae),
            "recon_checker_acc": vae_recon_acc(vae)[0],
            "scaling_factor": scale,
        }
    else:
        vae, log["vae"] = train_vae(args, t0)
        scale = log["vae"]["scaling_factor"]
    log["vae"]["minutes"] = round((time.time() - t0) / 60, 1)
    print(log["vae"], flush=True)

    # ---- phase 2: denoiser + text encoder ----
    modules, forward, make_pipeline, den_name = (pixart_parts if args.arch == "pixart" else sd_parts)(args)
    sched = DDPMScheduler(**SCHED_KW)
    ac = sched.alphas_cumprod
    params = [q for m in modules for q in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 3)
    ema = None
    t1 = time.time()
    step = 0
    for step in range(1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr)
        x, caps, _ = shapes.sample_batch(args.batch, gen)
        drop = torch.rand(args.batch, generator=gen) < 0.1
        caps = ["" if d else c for c, d in zip(caps, drop.tolist())]
        with torch.no_grad():
            z = vae.encode(x * 2 - 1).latent_dist.sample(generator=gen) * scale
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        noise = torch.randn(z.shape, generator=gen)
        a = ac[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - ac[t]).sqrt().view(-1, 1, 1, 1)
        zt = a * z + s * noise
        v = a * noise - s * z
        pred = forward(zt, t, caps)
        loss = F.mse_loss(pred, v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 25 == 0:
            print(f"{den_name} {step} loss {ema:.4f} {(time.time() - t0) / 60:.1f} min", flush=True)
        if (time.time() - t0) / 60 > args.max_minutes:
            print(f"hit --max-minutes at step {step}", flush=True)
            log["stopped"] = f"max-minutes at step {step}"
            break
    log[den_name] = {"steps": step, "minutes": round((time.time() - t1) / 60, 1)}
    log["total_minutes"] = round((time.time() - t0) / 60, 1)

    for m in modules:
        m.eval()
    # steps_offset only shifts "leading" spacing; StableDiffusionPipeline warns unless it is 1.
    extra = {"steps_offset": 1} if args.arch == "sd" else {}
    scheduler = DPMSolverMultistepScheduler(**SCHED_KW, timestep_spacing="trailing", **extra)
    pipe = make_pipeline(vae, scheduler)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    if args.arch == "sd":  # halves the folder; from_pretrained loads it back as fp32
        pipe.unet.to(torch.float16).save_pretrained(out_dir / "unet", safe_serialization=True)
    del pipe

    from effalg.core.eval.t2i import evaluate_t2i

    pipe = DiffusionPipeline.from_pretrained(out_dir)  # score what was saved
    pipe.set_progress_bar_config(disable=True)
    log["eval"] = {}
    for steps in (20, 4):
        res = evaluate_t2i(pipe, n_prompts=args.eval_prompts, num_inference_steps=steps, seed=0)
        log["eval"][f"{steps}_steps"] = res
        print(steps, res, flush=True)
    (out_dir / "metrics.json").write_text(json.dumps(log, indent=2))


if __name__ == "__main__":
    main()
