"""Triton kernels: the CUDA implementations of the ``effalg`` ops.

Importing this package never fails: without an importable ``triton`` it only exposes ``HAS_TRITON = False`` and a
:func:`register` that returns ``False``. With triton, the launchers (``triton_quantize_per_token``,
``triton_int8_scaled_mm``, ``triton_w8a8_linear``, ``triton_w4a8_linear``, ``triton_wxa8_linear``,
``triton_weight_only_linear``, ``triton_smooth_hadamard``) are importable from here and run on CUDA tensors, or
on CPU tensors under ``TRITON_INTERPRET=1`` (tests).

:func:`register` installs them as the ``"cuda"`` kernels of ``torch.ops.effalg.*`` (weights in the canonical plain
layouts), only when CUDA is available.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

logger = logging.getLogger(__name__)

__all__ = ["HAS_TRITON", "register"]

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception:  # ImportError, or a broken install (missing compiler pieces): run without triton
    HAS_TRITON = False
else:
    HAS_TRITON = True

if HAS_TRITON:
    from .hadamard import triton_smooth_hadamard
    from .int8_mm import triton_int8_scaled_mm, triton_w8a8_linear
    from .quantize import triton_quantize_per_token
    from .w4a8 import triton_w4a8_linear
    from .weight_only import triton_weight_only_linear
    from .wxa8 import triton_wxa8_linear

    __all__ += [
        "triton_quantize_per_token",
        "triton_int8_scaled_mm",
        "triton_w8a8_linear",
        "triton_w4a8_linear",
        "triton_wxa8_linear",
        "triton_weight_only_linear",
        "triton_smooth_hadamard",
    ]

_REGISTERED = False


def _cuda_quantize_per_token(x: torch.Tensor, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return triton_quantize_per_token(x, group_size)


def _cuda_int8_scaled_mm(
    a: torch.Tensor,
    a_scale: Optional[torch.Tensor],
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    if a_scale is None:
        a_scale = torch.ones(a.shape[0], 1, dtype=torch.float32, device=a.device)
    return triton_int8_scaled_mm(a, a_scale, w, w_scale, bias, out_dtype)


def _cuda_w8a8_linear(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    return triton_w8a8_linear(x, w, w_scale, bias)


def _cuda_w4a8_linear(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, group_size: int, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    return triton_w4a8_linear(x, w, w_scale, group_size, bias)


def _cuda_wxa8_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    w_bits: int,
    a_scale: Optional[torch.Tensor],
    a_zero: Optional[torch.Tensor],
    w_rowsum: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    return triton_wxa8_linear(x, w, w_scale, w_bits, a_scale, a_zero, w_rowsum, bias)


def _cuda_weight_only_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    return triton_weight_only_linear(x, w, scale, zero, bits, group_size, bias)


def _cuda_smooth_hadamard(
    x: torch.Tensor, smooth: Optional[torch.Tensor], signs: Optional[torch.Tensor], block_size: int
) -> torch.Tensor:
    return triton_smooth_hadamard(x, smooth, signs, block_size)


def register() -> bool:
    """Register the Triton kernels as the ``"cuda"`` implementations of the ``effalg`` ops.

    Does nothing (returns ``False``) unless triton imports and ``torch.cuda.is_available()``. Idempotent.
    """
    global _REGISTERED
    if _REGISTERED:
        return True
    if not HAS_TRITON or not torch.cuda.is_available():
        return False
    from .. import _ops  # noqa: F401  (defines the op schemas)

    for name, fn in (
        ("quantize_per_token", _cuda_quantize_per_token),
        ("int8_scaled_mm", _cuda_int8_scaled_mm),
        ("w8a8_linear", _cuda_w8a8_linear),
        ("w4a8_linear", _cuda_w4a8_linear),
        ("wxa8_linear", _cuda_wxa8_linear),
        ("weight_only_linear", _cuda_weight_only_linear),
        ("smooth_hadamard", _cuda_smooth_hadamard),
    ):
        torch.library.register_kernel(f"effalg::{name}", "cuda", fn)
    from .band_attention import register as _register_band_attention  # band attention (band_*)

    _register_band_attention()
    _REGISTERED = True
    logger.debug("effalg: registered Triton CUDA kernels")
    return True
