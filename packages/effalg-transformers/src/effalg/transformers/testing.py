"""Tiny transformers models with seeded random weights, saved with ``save_pretrained`` (for tests and demos).

Each factory takes the directory to save into as its first (required) argument, e.g. pytest's ``tmp_path``; no
factory creates temporary directories of its own.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

__all__ = [
    "TINY_FACTORIES",
    "VISION_SKIP_PATTERNS",
    "inject_outlier_channels",
    "llama_7b_shaped",
    "tiny_llama",
    "tiny_llava",
    "tiny_llava_next",
    "tiny_vlm_samples",
    "tiny_qwen2",
    "tiny_qwen2_vl",
    "tiny_text_inputs",
]

#: ``modules_to_not_convert`` patterns keeping each VLM's vision tower (and projector) in float.
VISION_SKIP_PATTERNS = {
    "llava": ["model.vision_tower", "model.multi_modal_projector", "lm_head"],
    "llava_next": ["model.vision_tower", "model.multi_modal_projector", "lm_head"],
    "qwen2_vl": ["model.visual", "lm_head"],
}

_TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def inject_outlier_channels(model: nn.Module, k: int, scale: float = 20.0, seed: int = 0) -> list[int]:
    """Scale ``k`` hidden channels of every decoder RMSNorm weight so q/k/v and MLP inputs carry channel outliers.

    Returns the chosen channel indices (the same for every norm, as in real LLMs).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"inject_outlier_channels: k must be an int >= 0, got {k!r}")
    norms = [m for n, m in model.named_modules() if n.endswith(("input_layernorm", "post_attention_layernorm"))]
    if not norms or k == 0:
        return []
    hidden = norms[0].weight.shape[0]
    if k > hidden:
        raise ValueError(f"inject_outlier_channels: k ({k}) exceeds the hidden size ({hidden})")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(hidden, generator=g)[:k]
    with torch.no_grad():
        for m in norms:
            m.weight[idx] *= scale
    return idx.tolist()


def _finish(model: nn.Module, path: str | os.PathLike, outlier_channels: int) -> tuple[str, nn.Module]:
    if path is None:
        raise TypeError("tiny model factories need a directory to save into (e.g. pytest's tmp_path), got None")
    inject_outlier_channels(model, outlier_channels)
    model.eval()
    model.save_pretrained(os.fspath(path))
    return os.fspath(path), model


def _seeded(seed: int):
    torch.manual_seed(seed)


def tiny_llama(path: str | os.PathLike, *, seed: int = 0, outlier_channels: int = 0, **overrides: Any):
    """Tiny ``LlamaForCausalLM`` (hidden 64, 2 layers, 4 heads); returns ``(path, model)``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _seeded(seed)
    cfg = LlamaConfig(**{**_TEXT, "num_key_value_heads": 4, **overrides})
    return _finish(LlamaForCausalLM(cfg), path, outlier_channels)


def tiny_qwen2(path: str | os.PathLike, *, seed: int = 0, outlier_channels: int = 0, **overrides: Any):
    """Tiny ``Qwen2ForCausalLM`` with grouped-query attention (4 query heads, 2 KV heads); returns ``(path, model)``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _seeded(seed)
    cfg = Qwen2Config(**{**_TEXT, "num_key_value_heads": 2, **overrides})
    return _finish(Qwen2ForCausalLM(cfg), path, outlier_channels)


def _clip_vision():
    """The tiny CLIP vision tower of the LLaVA factories (32x32 px, patch 8: 16 patches)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )


def tiny_llava(path: str | os.PathLike, *, seed: int = 0, outlier_channels: int = 0):
    """Tiny ``LlavaForConditionalGeneration`` (CLIP vision 32x32 px, 16 image tokens, id 255); ``(path, model)``."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    _seeded(seed)
    vc = _clip_vision()
    tc = LlamaConfig(**{**_TEXT, "num_key_value_heads": 2})
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=255, projector_hidden_act="gelu")
    return _finish(LlavaForConditionalGeneration(cfg), path, outlier_channels)


def tiny_llava_next(path: str | os.PathLike, *, seed: int = 0, outlier_channels: int = 0):
    """Tiny ``LlavaNextForConditionalGeneration`` (CLIP vision 32x32 px, one 32x32 any-res grid: 36 image tokens for
    a ``[1, 2, 3, 32, 32]`` image with ``image_sizes=[[32, 32]]``, id 255); ``(path, model)``."""
    from transformers import LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    _seeded(seed)
    vc = _clip_vision()
    tc = LlamaConfig(**{**_TEXT, "num_key_value_heads": 4})
    cfg = LlavaNextConfig(
        vision_config=vc, text_config=tc, image_token_id=255, projector_hidden_act="gelu", image_grid_pinpoints=[[32, 32]]
    )
    return _finish(LlavaNextForConditionalGeneration(cfg), path, outlier_channels)


def tiny_vlm_samples(model, n: int = 4, seed: int = 0, text_len: int = 12) -> list[dict[str, torch.Tensor]]:
    """Seeded image+text samples (batch 1) for the tiny VLMs built here: a BOS token, the image tokens, a prompt and
    an answer, with ``labels`` on the answer's last 4 tokens (what MBQ's calibration takes)."""
    g = torch.Generator().manual_seed(seed)
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    name = type(model).__name__
    cfg = model.config
    out = []
    for _ in range(n):
        extra: dict[str, torch.Tensor] = {}
        if name == "LlavaForConditionalGeneration":
            n_img, extra["pixel_values"] = 16, torch.randn(1, 3, 32, 32, generator=g)
        elif name == "LlavaNextForConditionalGeneration":
            n_img, extra["pixel_values"] = 36, torch.randn(1, 2, 3, 32, 32, generator=g)
            extra["image_sizes"] = torch.tensor([[32, 32]])
        elif name == "Qwen2VLForConditionalGeneration":
            n_img, extra["pixel_values"] = 4, torch.randn(16, 3 * 2 * 14 * 14, generator=g)  # grid 1 x 4 x 4, merge 2
            extra["image_grid_thw"] = torch.tensor([[1, 4, 4]])
        else:
            raise TypeError(f"tiny_vlm_samples: unsupported model {name}")
        text = torch.randint(3, 200, (1, text_len), generator=g)
        ids = torch.cat([torch.tensor([[1]]), torch.full((1, n_img), cfg.image_token_id), text], 1)
        labels = torch.full_like(ids, -100)
        labels[0, -4:] = ids[0, -4:]
        if name == "Qwen2VLForConditionalGeneration":  # M-RoPE positions: 1 marks image tokens
            extra["mm_token_type_ids"] = (ids == cfg.image_token_id).long()
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, **extra})
    return out


def tiny_qwen2_vl(path: str | os.PathLike, *, seed: int = 0, outlier_channels: int = 0):
    """Tiny ``Qwen2VLForConditionalGeneration`` (loads with ``AutoModelForImageTextToText``); ``(path, model)``."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    _seeded(seed)
    cfg = Qwen2VLConfig(
        text_config=dict(
            **_TEXT,
            num_key_value_heads=2,
            bos_token_id=1,
            eos_token_id=2,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 4], "rope_theta": 10000.0},
        ),
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            in_chans=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=250,
        video_token_id=251,
        vision_start_token_id=252,
    )
    return _finish(Qwen2VLForConditionalGeneration(cfg), path, outlier_channels)


def tiny_text_inputs(batch: int = 2, seq: int = 8, vocab: int = 200, seed: int = 0) -> torch.Tensor:
    """Deterministic ``input_ids`` ``[batch, seq]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


TINY_FACTORIES = {
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,
    "llava": tiny_llava,
    "llava_next": tiny_llava_next,
    "qwen2_vl": tiny_qwen2_vl,
}


def llama_7b_shaped(
    path: str | os.PathLike,
    num_layers: int = 2,
    vocab_size: int = 32000,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str = "5GB",
    seed: int = 0,
) -> tuple[str, int]:
    """Save a ``LlamaForCausalLM`` with Llama-2-7B's widths (hidden 4096, MLP 11008, 32 heads) and ``num_layers``
    layers, seeded random weights, at ``path``; returns ``(path, number of parameters)``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=num_layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=vocab_size)  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return str(path), sum(p.numel() for p in model.parameters())
