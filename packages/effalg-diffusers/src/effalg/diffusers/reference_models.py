"""Loading the repo's trained reference text-to-image pipelines: ``reference_models/tiny-pixart-shapes`` (PixArt-α,
a DiT) and ``reference_models/tiny-sd-shapes`` (Stable Diffusion layout: UNet + causal CLIP text encoder).

The framework-free parts (the shapes task, its checker, scoring, where the weights live) stay in
:mod:`effalg.core.eval`; the reference LM and the tokenizers are in :mod:`effalg.transformers.reference_models`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from diffusers import DiffusionPipeline
from effalg.core.eval.reference import T2I_NAME, reference_models_dir

__all__ = ["SD_T2I_NAME", "load_reference_t2i"]

#: The StableDiffusionPipeline reference (``T2I_NAME``, the default, is the PixArtAlphaPipeline one).
SD_T2I_NAME = "tiny-sd-shapes"


def load_reference_t2i(
    path: str | os.PathLike | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Any:
    """A trained shapes pipeline (32x32 images, 16x16x4 latents).

    ``path`` is a folder, or the name of one under ``reference_models_dir()``: ``"tiny-pixart-shapes"`` (the
    default; a ``PixArtAlphaPipeline``) or ``"tiny-sd-shapes"`` (:data:`SD_T2I_NAME`; a ``StableDiffusionPipeline``).
    Both use classifier-free guidance and a DPM-Solver scheduler that works from 4 steps, e.g.
    ``pipe("a red circle on a blue background", num_inference_steps=4, guidance_scale=3.0).images[0]``; call the
    PixArt one with ``use_resolution_binning=False`` (its sample size is not one of PixArt's binned ones).
    """
    p = Path(path if path is not None else T2I_NAME)
    if not p.is_dir() and not p.is_absolute() and (reference_models_dir() / p).is_dir():
        p = reference_models_dir() / p
    pipe = DiffusionPipeline.from_pretrained(p)
    pipe.set_progress_bar_config(disable=True)
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    return pipe.to(device)
