"""Loading the repo's trained reference models, and a naive weight fake-quantizer for damage tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

LM_NAME = "tiny-qwen2-mqar"
T2I_NAME = "tiny-pixart-shapes"


def reference_models_dir() -> Path:
    """``$EFFALG_REFERENCE_MODELS`` if set, else ``reference_models/`` found by walking up from this file or cwd."""
    env = os.environ.get("EFFALG_REFERENCE_MODELS")
    if env:
        return Path(env)
    for start in (Path(__file__).resolve(), Path.cwd().resolve()):
        for parent in [start, *start.parents]:
            cand = parent / "reference_models"
            if (cand / T2I_NAME).is_dir() or (cand / LM_NAME).is_dir():
                return cand
    raise FileNotFoundError("reference_models/ not found; set EFFALG_REFERENCE_MODELS")


def load_reference_t2i(
    path: str | os.PathLike | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Any:
    """The trained shapes ``PixArtAlphaPipeline`` (32x32 images).

    Call it with ``use_resolution_binning=False`` (its sample size is not one of PixArt's binned ones), e.g.
    ``pipe("a red circle on a blue background", num_inference_steps=20, guidance_scale=3.0,
    use_resolution_binning=False).images[0]``.
    """
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(path or reference_models_dir() / T2I_NAME)
    pipe.set_progress_bar_config(disable=True)
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    return pipe.to(device)


def load_reference_lm(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """``(Qwen2ForCausalLM, tokenizer)`` trained on the MQAR + digit-reversal task."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = path or reference_models_dir() / LM_NAME
    model = AutoModelForCausalLM.from_pretrained(p).to(device).eval()
    return model, AutoTokenizer.from_pretrained(p)


@torch.no_grad()
def fake_quantize_weights(
    module: torch.nn.Module,
    bits: int = 3,
    types: tuple[type, ...] = (torch.nn.Linear, torch.nn.Conv2d),
    per_channel: bool = False,
) -> int:
    """In place: round the weight of every ``types`` submodule to ``bits``-bit symmetric integers (naive
    round-to-nearest, absmax scale per tensor, or per output channel with ``per_channel``). Returns how many
    modules were changed."""
    qmax = 2 ** (bits - 1) - 1
    n = 0
    for m in module.modules():
        if isinstance(m, types) and getattr(m, "weight", None) is not None:
            w = m.weight
            flat = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
            scale = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
            q = (flat / scale).round().clamp(-qmax - 1, qmax) * scale
            w.copy_(q.reshape(w.shape))
            n += 1
    return n
