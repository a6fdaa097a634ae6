"""Where the repo's trained reference models live, and a naive weight fake-quantizer for damage tests.

Framework-free: the loaders are in the plugins (``effalg.diffusers.reference_models.load_reference_t2i``,
``effalg.transformers.reference_models.load_reference_lm``); effalg.core never imports diffusers or transformers.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

LM_NAME = "tiny-qwen2-mqar"
T2I_NAME = "tiny-pixart-shapes"
VLM_NAME = "tiny-vlm-shapes"


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
