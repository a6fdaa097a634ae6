"""Train the reference text-to-image pipeline (diffusers PixArtAlphaPipeline) on procedural captioned shapes.

Usage (from the repo root)::

    nice -n 19 .venv/bin/python reference_models/train_t2i.py --out reference_models/tiny-pixart-shapes

Phase 1 trains a tiny AutoencoderKL (32x32x3 <-> 16x16x4); phase 2 freezes it and trains a PixArtTransformer2DModel
together with a tiny T5EncoderModel (word-level tokenizer from ``effalg.transformers.reference_models``) on its
latents with a v-prediction DDPM objective and 10% caption dropout (for classifier-free guidance). The saved
scheduler is a DPMSolverMultistepScheduler with trailing timestep spacing (works from ~4 steps). Fixed seeds, single
thread, fixed step counts; ``--max-minutes`` is only a safety cap on the whole run.
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
from effalg.transformers.reference_models import build_shapes_tokenizer  # noqa: E402

SCHED_KW = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")


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


def lr_at(step: int, total: int, base: float, warm: int = 100) -> float:
    return base * min(1.0, step / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(REPO / "reference_models" / "tiny-pixart-shapes"))
    p.add_argument("--vae-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=4500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-minutes", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-prompts", type=int, default=48)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, PixArtAlphaPipeline

    t0 = time.time()
    out_dir = Path(args.out)
    log: dict = {"args": vars(args)}

    # ---- phase 1: VAE ----
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
    with torch.no_grad():
        x, _, _ = shapes.sample_batch(256, torch.Generator().manual_seed(99))
        lat = vae.encode(x * 2 - 1).latent_dist.mode()
        scale = float(1.0 / lat.std())
        rec = (vae.decode(lat).sample + 1) / 2
        chk = [shapes.check_image(r) for r in rec]
        _, _, labs = shapes.sample_batch(256, torch.Generator().manual_seed(99))
        vae_acc = sum(c.shape == lab[0] and c.fg == lab[1] and c.bg == lab[2] for c, lab in zip(chk, labs)) / 256
    vae.register_to_config(scaling_factor=scale)
    log["vae"] = {
        "steps": args.vae_steps,
        "recon_checker_acc": vae_acc,
        "scaling_factor": scale,
        "minutes": round((time.time() - t0) / 60, 1),
    }
    print(log["vae"], flush=True)

    # ---- phase 2: transformer + text encoder ----
    tok = build_shapes_tokenizer()
    torch.manual_seed(args.seed + 2)
    te = build_text_encoder(len(tok))
    tr = build_transformer(args)
    sched = DDPMScheduler(**SCHED_KW)
    ac = sched.alphas_cumprod
    params = list(tr.parameters()) + list(te.parameters())
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
        ti = tok(caps, padding="max_length", max_length=10, truncation=True, return_tensors="pt")
        emb = te(ti.input_ids, attention_mask=ti.attention_mask)[0]
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        noise = torch.randn(z.shape, generator=gen)
        a = ac[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - ac[t]).sqrt().view(-1, 1, 1, 1)
        zt = a * z + s * noise
        v = a * noise - s * z
        pred = tr(
            zt,
            encoder_hidden_states=emb,
            encoder_attention_mask=ti.attention_mask,
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )[0]
        loss = F.mse_loss(pred, v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 25 == 0:
            print(f"dit {step} loss {ema:.4f} {(time.time() - t0) / 60:.1f} min", flush=True)
        if (time.time() - t0) / 60 > args.max_minutes:
            print(f"hit --max-minutes at step {step}", flush=True)
            log["stopped"] = f"max-minutes at step {step}"
            break
    log["transformer"] = {"steps": step, "minutes": round((time.time() - t1) / 60, 1)}
    log["total_minutes"] = round((time.time() - t0) / 60, 1)

    tr.eval()
    te.eval()
    scheduler = DPMSolverMultistepScheduler(**SCHED_KW, timestep_spacing="trailing")
    pipe = PixArtAlphaPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=tr, scheduler=scheduler)
    pipe.save_pretrained(out_dir, safe_serialization=True)

    from effalg.core.eval.t2i import evaluate_t2i

    log["eval"] = {}
    for steps in (20, 4):
        res = evaluate_t2i(pipe, n_prompts=args.eval_prompts, num_inference_steps=steps, seed=0)
        log["eval"][f"{steps}_steps"] = res
        print(steps, res, flush=True)
    (out_dir / "metrics.json").write_text(json.dumps(log, indent=2))


if __name__ == "__main__":
    main()
