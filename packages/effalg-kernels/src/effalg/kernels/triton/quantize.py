"""Fused per-token / per-group symmetric int8 quantization (amax, scale, round-half-even, clamp, store)."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import round_half_even
from .launch import launch

__all__ = ["triton_quantize_per_token"]

#: Segments (token rows or groups) up to this many elements are quantized from registers in one pass.
MAX_SINGLE_PASS = 8192


@triton.jit
def _quantize_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    GS,  # elements per segment (K for per-token, group_size for per-group)
    G,  # segments per row
    stride_xm,
    stride_qm,
    BLOCK: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    x_seg = x_ptr + row * stride_xm + g * GS
    q_seg = q_ptr + row * stride_qm + g * GS
    offs = tl.arange(0, BLOCK)
    if SINGLE_PASS:
        mask = offs < GS
        x = tl.load(x_seg + offs, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
        # IEEE-rounded divisions (a plain fp32 `/` is approximate on NVIDIA GPUs), to match the reference bit for bit.
        scale = tl.math.div_rn(tl.maximum(amax, 1e-8), 127.0)
        v = tl.math.div_rn(x, scale)
        v = tl.minimum(tl.maximum(v, -127.0), 127.0)  # clamp first: rounding commutes with integer bounds
        tl.store(q_seg + offs, round_half_even(v).to(tl.int8), mask=mask)
    else:
        amax_vec = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, GS, BLOCK):
            mask = offs < GS - k0
            x = tl.load(x_seg + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            amax_vec = tl.maximum(amax_vec, tl.abs(x))
        amax = tl.max(amax_vec, axis=0)
        scale = tl.math.div_rn(tl.maximum(amax, 1e-8), 127.0)
        for k0 in range(0, GS, BLOCK):
            mask = offs < GS - k0
            x = tl.load(x_seg + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            v = tl.math.div_rn(x, scale)
            v = tl.minimum(tl.maximum(v, -127.0), 127.0)
            tl.store(q_seg + k0 + offs, round_half_even(v).to(tl.int8), mask=mask)
    tl.store(s_ptr + row * G + g, scale)


def triton_quantize_per_token(
    x: torch.Tensor, group_size: int = 0, block: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_per_token`` in one kernel launch: ``(q: int8[..., K], scale: float32[..., G])``.

    ``block`` caps the elements one program handles per step (tests pass small values to exercise the two-pass
    path); by default a whole segment up to :data:`MAX_SINGLE_PASS` is processed from registers.
    """
    K = x.shape[-1]
    gs = K if group_size == 0 else group_size
    G = K // gs if gs else 1
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    s = torch.empty((M, G), dtype=torch.float32, device=x.device)
    if M > 0 and K > 0:
        cap = MAX_SINGLE_PASS if block is None else block
        BLOCK = min(triton.next_power_of_2(gs), triton.next_power_of_2(cap))
        single = BLOCK >= gs
        num_warps = max(1, min(16, BLOCK // 256))
        launch(
            _quantize_kernel,
            (M, G),
            x2, q, s, gs, G, x2.stride(0), q.stride(0), BLOCK=BLOCK, SINGLE_PASS=single, num_warps=num_warps
        )
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], G)
