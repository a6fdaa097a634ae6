"""Tiny diffusers pipelines with seeded random weights, for tests (no downloads).

Each ``make_tiny_*`` builds a pipeline, ``save_pretrained``-s it to ``path`` and returns ``(path, pipeline)``.
Tokenizers are built locally from a fixed vocabulary. ``outlier_channels=k`` scales ``k`` output channels of the
value projections and of the first feed-forward projections by ``outlier_scale``, so the inputs of the following
linear layers (attention output / FFN down projections) have channel outliers, as in real DiTs.

:func:`denoiser_inputs` gives seeded forward inputs for the denoisers; :func:`run_pipeline` a deterministic call.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

__all__ = [
    "FACTORIES",
    "FULL_SIZE_CONFIGS",
    "calibration_kwargs",
    "denoiser_inputs",
    "inject_outlier_channels",
    "make_full_size",
    "make_tiny_flux",
    "make_tiny_dit",
    "make_tiny_latte",
    "make_tiny_lcm",
    "make_tiny_pixart_alpha",
    "make_tiny_pixart_sigma",
    "make_tiny_sd",
    "make_tiny_sd3",
    "make_tiny_sd_turbo",
    "make_tiny_sdxl",
    "pipeline_kwargs",
    "run_denoiser",
    "run_pipeline",
]

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_OUTLIER_SUFFIXES = ("to_v", "add_v_proj", "ff.net.0.proj", "ff_context.net.0.proj", "proj_mlp")


def _clip_tokenizer(max_length: int = 16):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for i, ch in enumerate(_LETTERS):
        vocab[ch] = 2 + i
        vocab[ch + "</w>"] = 2 + len(_LETTERS) + i
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _t5_tokenizer(max_length: int = 16):
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -1.0) for c in _LETTERS] + [("\u2581" + c, -1.5) for c in _LETTERS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _clip_text(seed: int, with_projection: bool = False, hidden: int = 32, layers: int = 1):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()


def _t5(seed: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=64,
        d_model=d_model,
        d_ff=2 * d_model,
        d_kv=16,
        num_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(cfg).eval()


def _vae(seed: int, latent_channels: int = 4, two_levels: bool = True, **kw):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    blocks = (8, 16) if two_levels else (8,)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=blocks,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=16,
        **kw,
    ).eval()


def inject_outlier_channels(model: nn.Module, k: int, scale: float = 30.0, seed: int = 0) -> list[str]:
    """Scale ``k`` (seeded) output channels of value / first-FFN projections in place; returns the layer names."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"inject_outlier_channels: k must be an int >= 0, got {k!r}")
    if k == 0:
        return []
    g = torch.Generator().manual_seed(seed)
    touched = []
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and name.endswith(_OUTLIER_SUFFIXES):
                n = (
                    m.out_features // 2
                    if name.endswith("net.0.proj")
                    and "GEGLU" in type(model.get_submodule(name.rpartition(".")[0])).__name__
                    else m.out_features
                )
                idx = torch.randperm(n, generator=g)[: min(k, n)]
                m.weight[idx] *= scale
                if m.bias is not None:
                    m.bias[idx] *= scale
                touched.append(name)
    return touched


def _finish(pipe, path, denoiser: nn.Module, outlier_channels: int, seed: int):
    inject_outlier_channels(denoiser, outlier_channels, seed=seed)
    os.makedirs(path, exist_ok=True)
    pipe.save_pretrained(path)
    return os.fspath(path), pipe


def make_tiny_pixart_alpha(path, outlier_channels: int = 0, seed: int = 0, _sigma: bool = False):
    """Tiny PixArt-alpha (or -sigma) pipeline: PixArtTransformer2DModel + 1-layer T5 + local T5 tokenizer."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        patch_size=2,
        cross_attention_dim=32,
        caption_channels=32,
        norm_type="ada_norm_single",
        num_embeds_ada_norm=1000,
        use_additional_conditions=False,
        interpolation_scale=0.5 if _sigma else None,
    ).eval()
    cls = PixArtSigmaPipeline if _sigma else PixArtAlphaPipeline
    pipe = cls(
        tokenizer=_t5_tokenizer(),
        text_encoder=_t5(seed + 1),
        vae=_vae(seed + 2),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    return _finish(pipe, path, transformer, outlier_channels, seed)


def make_tiny_pixart_sigma(path, outlier_channels: int = 0, seed: int = 0):
    """Tiny PixArt-sigma pipeline (see :func:`make_tiny_pixart_alpha`)."""
    return make_tiny_pixart_alpha(path, outlier_channels, seed, _sigma=True)


def _sd_unet(seed: int, **kw):
    """The tiny SD UNet: CrossAttn down + up blocks (attn1 / attn2 / ff), 32 -> 64 channel-change resnets with a
    ``conv_shortcut``, up-block resnets on skip-concatenated inputs (128 / 96 / 64 channels, all divisible by the 16
    norm groups), a cross-attention mid block."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
        **kw,
    ).eval()


def _sd_pipeline(path, outlier_channels: int, seed: int, scheduler, **unet_kw):
    from diffusers import StableDiffusionPipeline

    unet = _sd_unet(seed, **unet_kw)
    pipe = StableDiffusionPipeline(
        vae=_vae(seed + 2),
        text_encoder=_clip_text(seed + 1),
        tokenizer=_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    return _finish(pipe, path, unet, outlier_channels, seed)


def make_tiny_sd(path, outlier_channels: int = 0, seed: int = 0):
    """Tiny SD-style pipeline: UNet2DConditionModel (see :func:`_sd_unet`) + CLIP text encoder + local CLIP tokenizer,
    Euler with trailing timesteps."""
    from diffusers import EulerDiscreteScheduler

    return _sd_pipeline(
        path, outlier_channels, seed, EulerDiscreteScheduler(timestep_spacing="trailing", steps_offset=1)
    )


def make_tiny_sd_turbo(path, outlier_channels: int = 0, seed: int = 0):
    """Tiny SD-Turbo pipeline: the :func:`make_tiny_sd` layout with ``EulerAncestralDiscreteScheduler`` (trailing
    timesteps); call it with 1 step and ``guidance_scale=0.0`` (see :func:`pipeline_kwargs`)."""
    from diffusers import EulerAncestralDiscreteScheduler

    scheduler = EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="trailing"
    )
    return _sd_pipeline(path, outlier_channels, seed, scheduler)


def make_tiny_lcm(path, outlier_channels: int = 0, seed: int = 0):
    """Tiny LCM-distilled SD pipeline: the :func:`make_tiny_sd` layout with ``LCMScheduler`` and a UNet with
    ``time_cond_proj_dim`` (LCM's guidance-scale embedding, which ``StableDiffusionPipeline`` passes as
    ``timestep_cond``; classifier-free guidance is then off). Call it with 4 steps (see :func:`pipeline_kwargs`)."""
    from diffusers import LCMScheduler

    scheduler = LCMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    return _sd_pipeline(path, outlier_channels, seed, scheduler, time_cond_proj_dim=32)


def make_tiny_sdxl(path, outlier_channels: int = 0, seed: int = 0):
    """Tiny SDXL pipeline: two 2-layer CLIP text encoders (plain + with projection), local tokenizers, and a
    UNet2DConditionModel with SDXL's ``text_time`` added conditioning.

    SDXL layout: a plain DownBlock2D then a CrossAttnDownBlock2D (32 -> 64 resnet with ``conv_shortcut``), mirrored up
    blocks on skip-concatenated inputs, ``transformer_layers_per_block=(1, 2)`` (the cross-attention level and the mid
    block run 2 transformer blocks), linear projections, ``cross_attention_dim`` = 32 + 32 (both encoders' hidden
    states concatenated), ``projection_class_embeddings_input_dim`` = 6 time ids x 8 + the 32-d pooled projection.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    hidden, hidden_2, time_dim = 32, 32, 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=hidden + hidden_2,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + hidden_2,
        norm_num_groups=16,
    ).eval()
    pipe = StableDiffusionXLPipeline(
        vae=_vae(seed + 2),
        text_encoder=_clip_text(seed + 1, hidden=hidden, layers=2),
        text_encoder_2=_clip_text(seed + 3, True, hidden=hidden_2, layers=2),
        tokenizer=_clip_tokenizer(),
        tokenizer_2=_clip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        ),
        add_watermarker=False,
    )
    return _finish(pipe, path, unet, outlier_channels, seed)


def make_tiny_sd3(path, outlier_channels: int = 0, seed: int = 0):
    """Tiny SD3 pipeline: SD3Transformer2DModel + two CLIP-with-projection encoders + 1-layer T5, local tokenizers."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=16,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(
            seed + 2,
            two_levels=False,
            shift_factor=0.0609,
            scaling_factor=1.5035,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        text_encoder=_clip_text(seed + 1, True),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=_clip_text(seed + 3, True),
        tokenizer_2=_clip_tokenizer(),
        text_encoder_3=_t5(seed + 4),
        tokenizer_3=_t5_tokenizer(),
    )
    return _finish(pipe, path, transformer, outlier_channels, seed)


def make_tiny_flux(path, outlier_channels: int = 0, seed: int = 0):
    """Tiny Flux pipeline: FluxTransformer2DModel + CLIP + 1-layer T5, local tokenizers."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    ).eval()
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(
            seed + 2,
            latent_channels=1,
            two_levels=False,
            shift_factor=0.0609,
            scaling_factor=1.5035,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        text_encoder=_clip_text(seed + 1),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=_t5(seed + 3),
        tokenizer_2=_t5_tokenizer(),
    )
    return _finish(pipe, path, transformer, outlier_channels, seed)


def make_tiny_latte(path, outlier_channels: int = 0, seed: int = 0):
    """Tiny Latte video pipeline: LatteTransformer3DModel (spatial + temporal blocks) + 1-layer T5 + 2D VAE.

    Latte is the diffusers video DiT with separate temporal attention (``temporal_transformer_blocks``), the layer
    type ViDiT-Q's temporal-consistency metric is for. Call it with ``video_length=4`` (see :func:`pipeline_kwargs`).
    """
    from diffusers import DDIMScheduler, LattePipeline, LatteTransformer3DModel

    torch.manual_seed(seed)
    transformer = LatteTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=32,
        sample_size=8,
        patch_size=2,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=32,
        video_length=4,
    ).eval()
    pipe = LattePipeline(
        tokenizer=_t5_tokenizer(),
        text_encoder=_t5(seed + 1),
        vae=_vae(seed + 2),
        transformer=transformer,
        scheduler=DDIMScheduler(),
    )
    return _finish(pipe, path, transformer, outlier_channels, seed)


def make_tiny_dit(path, outlier_channels: int = 0, seed: int = 0):
    """Tiny class-conditional DiT pipeline: DiTTransformer2DModel (adaLN-Zero, learned sigma) + 2D VAE; its CFG
    batch is ``[cond, uncond]``. Call it with ``class_labels`` (see :func:`pipeline_kwargs`)."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,  # DiTPipeline's null class is label 1000
    ).eval()
    pipe = DiTPipeline(transformer=transformer, vae=_vae(seed + 2), scheduler=DDIMScheduler())
    return _finish(pipe, path, transformer, outlier_channels, seed)


#: name -> (factory, denoiser component name)
FACTORIES = {
    "dit": (make_tiny_dit, "transformer"),
    "pixart_alpha": (make_tiny_pixart_alpha, "transformer"),
    "pixart_sigma": (make_tiny_pixart_sigma, "transformer"),
    "sd": (make_tiny_sd, "unet"),
    "sd_turbo": (make_tiny_sd_turbo, "unet"),
    "lcm": (make_tiny_lcm, "unet"),
    "sdxl": (make_tiny_sdxl, "unet"),
    "sd3": (make_tiny_sd3, "transformer"),
    "flux": (make_tiny_flux, "transformer"),
    "latte": (make_tiny_latte, "transformer"),
}


def denoiser_inputs(model: nn.Module, seed: int = 0, batch: int = 2) -> dict[str, Any]:
    """Seeded forward kwargs (``return_dict=False``) for the tiny denoisers built here."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    name = type(model).__name__
    cfg = model.config
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    t = torch.tensor([999, 500][:batch] + [250] * max(0, batch - 2))
    if name == "PixArtTransformer2DModel":
        return dict(
            hidden_states=r(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size),
            encoder_hidden_states=r(batch, 6, cfg.caption_channels),
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )
    if name == "DiTTransformer2DModel":
        return dict(
            hidden_states=r(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size),
            timestep=t,
            class_labels=torch.arange(batch) % cfg.num_embeds_ada_norm,
            return_dict=False,
        )
    if name == "UNet2DConditionModel":
        kw = dict(
            sample=r(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size),
            timestep=t,
            encoder_hidden_states=r(batch, 6, cfg.cross_attention_dim),
            return_dict=False,
        )
        if cfg.addition_embed_type == "text_time":  # SDXL: pooled text embeds + (orig size, crop, target size) ids
            n_ids = 6
            size = float(cfg.sample_size * 2)  # the tiny 2-level VAE's pixel size
            kw["added_cond_kwargs"] = {
                "text_embeds": r(
                    batch, cfg.projection_class_embeddings_input_dim - n_ids * cfg.addition_time_embed_dim
                ),
                "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]]).repeat(batch, 1),
            }
        if cfg.time_cond_proj_dim is not None:  # LCM: guidance-scale embedding
            kw["timestep_cond"] = r(batch, cfg.time_cond_proj_dim)
        return kw
    if name == "SD3Transformer2DModel":
        return dict(
            hidden_states=r(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size),
            encoder_hidden_states=r(batch, 6, cfg.joint_attention_dim),
            pooled_projections=r(batch, cfg.pooled_projection_dim),
            timestep=t,
            return_dict=False,
        )
    if name == "FluxTransformer2DModel":
        return dict(
            hidden_states=r(batch, 16, cfg.in_channels),
            encoder_hidden_states=r(batch, 6, cfg.joint_attention_dim),
            pooled_projections=r(batch, cfg.pooled_projection_dim),
            timestep=t.float() / 1000,
            img_ids=torch.zeros(16, 3),
            txt_ids=torch.zeros(6, 3),
            return_dict=False,
        )
    if name == "LatteTransformer3DModel":
        return dict(
            hidden_states=r(batch, cfg.in_channels, cfg.video_length, cfg.sample_size, cfg.sample_size),
            encoder_hidden_states=r(batch, 6, cfg.caption_channels),
            timestep=t,
            enable_temporal_attentions=True,
            return_dict=False,
        )
    raise TypeError(f"denoiser_inputs: unsupported model {name}")


@torch.no_grad()
def run_denoiser(model: nn.Module, seed: int = 0) -> torch.Tensor:
    """``model(**denoiser_inputs(model, seed))[0]``."""
    return model(**denoiser_inputs(model, seed))[0]


def pipeline_kwargs(pipe, seed: int = 0) -> dict[str, Any]:
    """Deterministic, fast call kwargs for the tiny pipelines (small images, ``output_type="pt"``, 2 steps; SD with
    an ``EulerAncestralDiscreteScheduler`` (SD-Turbo): 1 step, ``guidance_scale=0.0``; SD with a
    ``time_cond_proj_dim`` UNet (LCM): 4 steps, the guidance scale going in as ``timestep_cond``)."""
    kw: dict[str, Any] = dict(
        prompt="a cat", num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(seed)
    )
    name = type(pipe).__name__
    if name == "DiTPipeline":  # class-conditional, CFG on by default
        del kw["prompt"]
        kw.update(class_labels=[1])
    elif name.startswith("PixArt"):
        kw.update(height=16, width=16, use_resolution_binning=False, max_sequence_length=16, clean_caption=False)
    elif name == "StableDiffusionPipeline":
        kw.update(height=16, width=16, guidance_scale=1.0)
        scheduler = type(pipe.scheduler).__name__
        if pipe.unet.config.time_cond_proj_dim is not None:  # LCM: guidance goes in as an embedding, no CFG batch
            kw.update(num_inference_steps=4, guidance_scale=8.0)
        elif scheduler == "EulerAncestralDiscreteScheduler":  # SD-Turbo
            kw.update(num_inference_steps=1, guidance_scale=0.0)
    elif name == "StableDiffusionXLPipeline":
        kw.update(height=16, width=16, guidance_scale=1.0)
    elif name == "StableDiffusion3Pipeline":
        kw.update(height=8, width=8, max_sequence_length=16)
    elif name == "FluxPipeline":
        kw.update(height=8, width=8, max_sequence_length=16, guidance_scale=1.0)
    elif name == "LattePipeline":
        kw.update(height=16, width=16, video_length=4, clean_caption=False)
    return kw


def calibration_kwargs(pipe, seed: int = 0) -> dict[str, Any]:
    """:func:`pipeline_kwargs` without ``prompt``, ``num_inference_steps``, ``generator`` and ``output_type``: the
    call arguments ``effalg.diffusers.calibrate`` passes through."""
    kw = pipeline_kwargs(pipe, seed)
    for k in ("prompt", "class_labels", "num_inference_steps", "generator", "output_type"):
        kw.pop(k, None)
    return kw


@torch.no_grad()
def run_pipeline(pipe, seed: int = 0) -> torch.Tensor:
    """Images (video pipelines: frames) of a deterministic tiny pipeline call (see :func:`pipeline_kwargs`)."""
    out = pipe(**pipeline_kwargs(pipe, seed))
    return out.frames if hasattr(out, "frames") else out.images


# ---- full-size configurations (random weights; for memory tests and the real-size benchmark) -----------------------

#: Published configurations of real denoisers: ``kind -> (diffusers class name, config, the layer-count keys)``.
FULL_SIZE_CONFIGS: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "pixart_alpha": (  # PixArt-XL-2-1024-MS: 28 blocks, hidden 1152 (611 M parameters)
        "PixArtTransformer2DModel",
        dict(sample_size=128, num_layers=28, attention_head_dim=72, num_attention_heads=16, in_channels=4,
             out_channels=8, patch_size=2, cross_attention_dim=1152, caption_channels=4096,
             norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
             use_additional_conditions=True, attention_bias=True),  # fmt: skip
        ("num_layers",),
    ),
    "sd15_unet": (  # stable-diffusion-v1-5's UNet (860 M parameters)
        "UNet2DConditionModel",
        dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
             down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
             cross_attention_dim=768, attention_head_dim=8),  # fmt: skip
        (),
    ),
    "flux": (  # FLUX.1-dev: 19 double + 38 single blocks, hidden 3072 (11.9 B parameters)
        "FluxTransformer2DModel",
        dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
             axes_dims_rope=(16, 56, 56)),  # fmt: skip
        ("num_layers", "num_single_layers"),
    ),
}


def make_full_size(
    kind: str,
    path: str | os.PathLike,
    layers: int | tuple[int, ...] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str = "5GB",
    seed: int = 0,
) -> tuple[str, int]:
    """Save a denoiser of a published configuration (:data:`FULL_SIZE_CONFIGS`) with seeded random weights (the
    class's own init) at ``path``, full width, in ``dtype``; ``layers`` overrides the block counts (one int per
    layer-count key). Returns ``(path, number of parameters)``."""
    import diffusers

    if kind not in FULL_SIZE_CONFIGS:
        raise ValueError(f"make_full_size: unknown kind {kind!r}; known: {sorted(FULL_SIZE_CONFIGS)}")
    cls_name, config, keys = FULL_SIZE_CONFIGS[kind]
    config = dict(config)
    if layers is not None:
        layers = (layers,) if isinstance(layers, int) else tuple(layers)
        if len(layers) != len(keys):
            raise ValueError(f"make_full_size: {kind} takes {len(keys)} layer count(s) {list(keys)}, got {layers}")
        config.update(zip(keys, layers))
    torch.manual_seed(seed)
    model = getattr(diffusers, cls_name)(**config).to(dtype)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return str(path), n
