"""effalg.diffusers.testing: tiny pipeline factories and outlier injection."""

import pytest
import torch
from diffusers import DiffusionPipeline
from torch import nn

from effalg.diffusers import testing as T


@pytest.mark.parametrize("name", sorted(T.FACTORIES))
def test_factory_builds_saves_and_reloads(name, tmp_path):
    make, denoiser = T.FACTORIES[name]
    path, pipe = make(tmp_path / name)
    images = T.run_pipeline(pipe)
    assert images.ndim in (4, 5) and images.shape[-3] == 3 and torch.isfinite(images).all()  # 5: video frames
    again = DiffusionPipeline.from_pretrained(path)
    assert type(again) is type(pipe)
    # Float weights loaded from safetensors may sit at other memory alignments than freshly built ones, and the
    # BLAS kernels' summation order depends on alignment: float reloads agree to rounding, not bit for bit.
    torch.testing.assert_close(T.run_pipeline(again), images, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        T.run_denoiser(getattr(again, denoiser)), T.run_denoiser(getattr(pipe, denoiser)), rtol=1e-5, atol=1e-5
    )


def test_factories_are_seeded(tmp_path):
    _, a = T.make_tiny_pixart_alpha(tmp_path / "a")
    _, b = T.make_tiny_pixart_alpha(tmp_path / "b")
    _, c = T.make_tiny_pixart_alpha(tmp_path / "c", seed=1)
    assert torch.equal(a.transformer.proj_out.weight, b.transformer.proj_out.weight)
    assert not torch.equal(a.transformer.proj_out.weight, c.transformer.proj_out.weight)


@pytest.mark.parametrize("name", ["sd_turbo", "lcm", "sdxl"])
def test_unet_factories_are_seeded(name, tmp_path):
    make, _ = T.FACTORIES[name]
    _, a = make(tmp_path / "a")
    _, b = make(tmp_path / "b")
    _, c = make(tmp_path / "c", seed=1)
    assert torch.equal(a.unet.conv_out.weight, b.unet.conv_out.weight)
    assert not torch.equal(a.unet.conv_out.weight, c.unet.conv_out.weight)


_UNET_FACTORIES = ["sd", "sd_turbo", "lcm", "sdxl"]


@pytest.mark.parametrize("name", _UNET_FACTORIES)
def test_unet_layout_covers_mixdq_layers(name, tmp_path):
    """CrossAttn down and up blocks, channel-change resnets with a conv_shortcut (down: 32 -> 64; up: skip-concatenated
    inputs), attn1 / attn2 / ff, and GroupNorm groups that divide every normalized width."""
    _, pipe = T.FACTORIES[name][0](tmp_path / name)
    unet = pipe.unet
    assert any(type(b).__name__ == "CrossAttnDownBlock2D" for b in unet.down_blocks)
    assert any(type(b).__name__ == "CrossAttnUpBlock2D" for b in unet.up_blocks)
    resnets = {n: m for n, m in unet.named_modules() if type(m).__name__ == "ResnetBlock2D"}
    assert any(n.startswith("down_blocks") and m.conv_shortcut is not None for n, m in resnets.items())
    up = {n: m for n, m in resnets.items() if n.startswith("up_blocks")}
    assert up and all(m.in_channels > m.out_channels and m.conv_shortcut is not None for m in up.values())  # skip cat
    suffixes = {n.rpartition(".")[2] for n, _ in unet.named_modules()}
    assert {"attn1", "attn2", "ff", "to_q", "to_k", "to_v", "to_out"} <= suffixes
    for m in unet.modules():
        if isinstance(m, nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0
    # cross-attention keys / values read the text encoder(s)' hidden states
    attn2 = [m for n, m in unet.named_modules() if n.endswith("attn2")]
    width = sum(enc.config.hidden_size for enc in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if enc)
    assert attn2 and all(m.to_k.in_features == width for m in attn2)


@pytest.mark.parametrize("name", _UNET_FACTORIES)
def test_clip_tokenizers_start_with_bos(name, tmp_path):
    """MixDQ's BOS-aware cross-attention needs token 0 to be ``<|startoftext|>`` (also after a reload)."""
    path, pipe = T.FACTORIES[name][0](tmp_path / name)
    again = DiffusionPipeline.from_pretrained(path)
    for p in (pipe, again):
        toks = [t for t in (p.tokenizer, getattr(p, "tokenizer_2", None)) if t is not None]
        assert len(toks) == (2 if name == "sdxl" else 1)
        for tok in toks:
            ids = tok("a cat", padding="max_length", max_length=tok.model_max_length).input_ids
            assert ids[0] == tok.bos_token_id and tok.convert_ids_to_tokens(ids[0]) == "<|startoftext|>"


def _unet_calls(pipe):
    """Run :func:`T.run_pipeline` and return the kwargs of each UNet call."""
    calls = []
    h = pipe.unet.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)
    try:
        T.run_pipeline(pipe)
    finally:
        h.remove()
    return calls


def test_sd_turbo_is_one_step_without_cfg(tmp_path):
    from diffusers import EulerAncestralDiscreteScheduler

    _, pipe = T.make_tiny_sd_turbo(tmp_path / "p")
    assert isinstance(pipe.scheduler, EulerAncestralDiscreteScheduler)
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    kw = T.pipeline_kwargs(pipe)
    assert kw["num_inference_steps"] == 1 and kw["guidance_scale"] == 0.0
    calls = _unet_calls(pipe)
    assert len(calls) == 1 and calls[0]["encoder_hidden_states"].shape[0] == 1  # no CFG batch


def test_lcm_passes_guidance_embedding(tmp_path):
    from diffusers import LCMScheduler

    _, pipe = T.make_tiny_lcm(tmp_path / "p")
    assert isinstance(pipe.scheduler, LCMScheduler)
    dim = pipe.unet.config.time_cond_proj_dim
    assert dim is not None and pipe.unet.time_embedding.cond_proj is not None
    assert T.pipeline_kwargs(pipe)["num_inference_steps"] == 4
    calls = _unet_calls(pipe)
    assert len(calls) == 4
    assert all(c["timestep_cond"].shape == (1, dim) and c["encoder_hidden_states"].shape[0] == 1 for c in calls)
    assert T.denoiser_inputs(pipe.unet)["timestep_cond"].shape == (2, dim)


def test_sdxl_layout_and_added_conditioning(tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    _, pipe = T.make_tiny_sdxl(tmp_path / "p")
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert type(pipe.text_encoder) is CLIPTextModel and type(pipe.text_encoder_2) is CLIPTextModelWithProjection
    cfg = pipe.unet.config
    assert cfg.addition_embed_type == "text_time"
    assert cfg.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert cfg.projection_class_embeddings_input_dim == (
        6 * cfg.addition_time_embed_dim + pipe.text_encoder_2.config.projection_dim
    )
    assert max(cfg.transformer_layers_per_block) > 1
    calls = _unet_calls(pipe)
    assert len(calls) == T.pipeline_kwargs(pipe)["num_inference_steps"]
    added = calls[0]["added_cond_kwargs"]
    assert added["text_embeds"].shape == (1, pipe.text_encoder_2.config.projection_dim)
    assert added["time_ids"].shape == (1, 6)
    inp = T.denoiser_inputs(pipe.unet)["added_cond_kwargs"]
    assert inp["text_embeds"].shape == (2, pipe.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(inp["time_ids"], added["time_ids"].repeat(2, 1))  # same sizes as the pipeline's


def _input_channel_peak_ratio(model, suffix):
    """max over channels / median over channels of the per-channel |x| max at the inputs of layers ending in suffix."""
    ratios = []

    def hook(mod, args):
        x = args[0].detach().abs().flatten(0, -2).amax(0)
        ratios.append((x.max() / x.median().clamp(min=1e-8)).item())

    hs = [
        m.register_forward_pre_hook(hook)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.endswith(suffix)
    ]
    T.run_denoiser(model)
    for h in hs:
        h.remove()
    return max(ratios)


@pytest.mark.parametrize("name", ["pixart_alpha", "sd3", "flux", "sd", "sd_turbo", "lcm", "sdxl"])
def test_outlier_channels(name, tmp_path):
    make, denoiser = T.FACTORIES[name]
    _, plain = make(tmp_path / "plain")
    _, outl = make(tmp_path / "outl", outlier_channels=2)
    a = _input_channel_peak_ratio(getattr(plain, denoiser), "to_out.0")
    b = _input_channel_peak_ratio(getattr(outl, denoiser), "to_out.0")
    assert b > 4 * a, (a, b)


def test_outlier_bad_input():
    with pytest.raises(ValueError, match="k must be an int >= 0"):
        T.inject_outlier_channels(nn.Linear(2, 2), -1)
