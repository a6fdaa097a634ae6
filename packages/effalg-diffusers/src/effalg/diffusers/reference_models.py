"""Loading the repo's trained reference text-to-image pipeline (``reference_models/tiny-pixart-shapes``).

The framework-free parts (the shapes task, its checker, scoring, where the weights live) stay in
:mod:`effalg.core.eval`; the reference LM and the tokenizers are in :mod:`effalg.transformers.reference_models`.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from diffusers import PixArtAlphaPipeline
from effalg.core.eval.reference import T2I_NAME, reference_models_dir

__all__ = ["load_reference_t2i"]


def load_reference_t2i(
    path: str | os.PathLike | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Any:
    """The trained shapes ``PixArtAlphaPipeline`` (32x32 images); ``path`` defaults to
    ``reference_models_dir() / "tiny-pixart-shapes"``.

    Call it with ``use_resolution_binning=False`` (its sample size is not one of PixArt's binned ones), e.g.
    ``pipe("a red circle on a blue background", num_inference_steps=20, guidance_scale=3.0,
    use_resolution_binning=False).images[0]``.
    """
    pipe = PixArtAlphaPipeline.from_pretrained(path or reference_models_dir() / T2I_NAME)
    pipe.set_progress_bar_config(disable=True)
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    return pipe.to(device)
