"""Schemas of the ``effalg`` ops (``torch.ops.effalg.<name>``), declared once, with fake (meta) kernels.

The default implementation for every device is the plain-PyTorch reference (:mod:`effalg.kernels.reference`).
Device kernels override it with ``torch.library.register_kernel("effalg::<name>", "<device>", fn)``: CPU in
:mod:`effalg.kernels.cpu`, CUDA in :mod:`effalg.kernels.triton`. Call the ops through the validating wrappers in
:mod:`effalg.kernels.ops`; these functions assume valid arguments.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import reference as _ref

__all__ = [
    "quantize_per_token",
    "int8_scaled_mm",
    "w8a8_linear",
    "w4a8_linear",
    "weight_only_linear",
    "wxa8_linear",
    "smooth_hadamard",
]


@torch.library.custom_op("effalg::quantize_per_token", mutates_args=())
def quantize_per_token(x: torch.Tensor, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return _ref.quantize_per_token_ref(x, group_size)


@quantize_per_token.register_fake
def _(x: torch.Tensor, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    K = x.shape[-1]
    G = 1 if group_size == 0 else K // group_size
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty((*x.shape[:-1], G), dtype=torch.float32, device=x.device)
    return q, scale


@torch.library.custom_op("effalg::int8_scaled_mm", mutates_args=())
def int8_scaled_mm(
    a: torch.Tensor,
    a_scale: Optional[torch.Tensor],
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return _ref.int8_scaled_mm_ref(a, a_scale, w, w_scale, bias, out_dtype)


@int8_scaled_mm.register_fake
def _(a, a_scale, w, w_scale, bias, out_dtype):
    return torch.empty((a.shape[0], w_scale.shape[0]), dtype=out_dtype, device=a.device)


@torch.library.custom_op("effalg::w8a8_linear", mutates_args=())
def w8a8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _ref.w8a8_linear_ref(x, w, w_scale, bias)


@w8a8_linear.register_fake
def _(x, w, w_scale, bias):
    return torch.empty((*x.shape[:-1], w_scale.shape[0]), dtype=x.dtype, device=x.device)


@torch.library.custom_op("effalg::w4a8_linear", mutates_args=())
def w4a8_linear(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, group_size: int, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    return _ref.w4a8_linear_ref(x, w, w_scale, group_size, bias)


@w4a8_linear.register_fake
def _(x, w, w_scale, group_size, bias):
    return torch.empty((*x.shape[:-1], w.shape[0]), dtype=x.dtype, device=x.device)


@torch.library.custom_op("effalg::weight_only_linear", mutates_args=())
def weight_only_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    return _ref.weight_only_linear_ref(x, w, scale, zero, bits, group_size, bias)


@weight_only_linear.register_fake
def _(x, w, scale, zero, bits, group_size, bias):
    return torch.empty((*x.shape[:-1], w.shape[0]), dtype=x.dtype, device=x.device)


@torch.library.custom_op("effalg::wxa8_linear", mutates_args=())
def wxa8_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    w_bits: int,
    a_scale: Optional[torch.Tensor],
    a_zero: Optional[torch.Tensor],
    w_rowsum: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    return _ref.wxa8_linear_ref(x, w, w_scale, w_bits, a_scale, a_zero, w_rowsum, bias)


@wxa8_linear.register_fake
def _(x, w, w_scale, w_bits, a_scale, a_zero, w_rowsum, bias):
    return torch.empty((*x.shape[:-1], w.shape[0]), dtype=x.dtype, device=x.device)


@torch.library.custom_op("effalg::smooth_hadamard", mutates_args=())
def smooth_hadamard(
    x: torch.Tensor, smooth: Optional[torch.Tensor], signs: Optional[torch.Tensor], block_size: int
) -> torch.Tensor:
    return _ref.smooth_hadamard_ref(x, smooth, signs, block_size)


@smooth_hadamard.register_fake
def _(x, smooth, signs, block_size):
    return torch.empty_like(x, memory_format=torch.contiguous_format)
