"""Quantization specs and reference tensor math; bit packing is re-exported from ``effalg.kernels.packing``."""

from __future__ import annotations

from typing import Any

from .smooth import compute_smooth_scale
from .spec import ALLOWED_BITS, Granularity, QuantSpec, compute_qparams, dequantize, fake_quantize, quantize

__all__ = [
    "ALLOWED_BITS",
    "Granularity",
    "QuantSpec",
    "compute_qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "compute_smooth_scale",
    "HadamardRotation",
    "random_signs",
    "pack_bits",
    "unpack_bits",
    "pack_int4_symmetric",
    "unpack_int4_symmetric",
]

_PACKING = ("pack_bits", "unpack_bits", "pack_int4_symmetric", "unpack_int4_symmetric")


def __getattr__(name: str) -> Any:
    if name in _PACKING:
        from effalg.kernels import packing

        return getattr(packing, name)
    if name in ("HadamardRotation", "random_signs"):  # imports effalg.kernels: only on first use
        from . import rotation

        return getattr(rotation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
