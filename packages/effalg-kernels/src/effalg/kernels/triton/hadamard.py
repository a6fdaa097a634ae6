"""Fused smooth scale + block-diagonal randomized Hadamard rotation (``effalg::smooth_hadamard``).

One program computes a ``[BLOCK_M, BLOCK_N]`` output tile inside one Hadamard block of ``B`` channels: it loads the
matching ``[BLOCK_M, B]`` input strip in ``BLOCK_K`` steps, multiplies it by the per-channel multiplier
``smooth * signs`` in fp32 and accumulates ``tl.dot`` with the cached normalized ``H_B`` (fp32, IEEE precision, not
TF32), then stores in x's dtype. ``B = 0`` (no rotation) is a fused elementwise scale.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import min_dot_k
from .launch import launch

__all__ = ["triton_smooth_hadamard", "hadamard_matrix_on"]

_H: dict[tuple[int, str], torch.Tensor] = {}


def hadamard_matrix_on(b: int, device: torch.device) -> torch.Tensor:
    """Normalized Sylvester ``H_b / sqrt(b)`` (fp32, contiguous) on ``device``, cached per (b, device)."""
    key = (b, str(device))
    H = _H.get(key)
    if H is None:
        H = torch.ones(1, 1, dtype=torch.float64)
        while H.shape[0] < b:
            H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
        H = (H / math.sqrt(b)).to(device=device, dtype=torch.float32).contiguous()
        _H[key] = H
    return H


@triton.jit
def _smooth_hadamard_kernel(
    x_ptr,
    m_ptr,
    h_ptr,
    y_ptr,
    M,
    K,
    stride_xm,
    stride_ym,
    B: tl.constexpr,  # Hadamard block (0: no rotation)
    HAS_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,  # BLOCK_K >= 8, the fp32 tl.dot floor on GPUs
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    if B == 0:
        mask = mask_m[:, None] & (rn < K)[None, :]
        acc = tl.load(x_ptr + rm[:, None] * stride_xm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_M:
            acc = acc * tl.load(m_ptr + rn, mask=rn < K, other=0.0)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        blk0 = ((pid_n * BLOCK_N) // B) * B  # first channel of this tile's Hadamard block (BLOCK_N divides B)
        hn = rn - blk0
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, B, BLOCK_K):
            hk = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + rm[:, None] * stride_xm + (blk0 + hk)[None, :], mask=mask_m[:, None], other=0.0)
            a = a.to(tl.float32)
            if HAS_M:
                a = a * tl.load(m_ptr + blk0 + hk)[None, :]
            h = tl.load(h_ptr + hk[:, None] * B + hn[None, :])
            if USE_DOT:
                acc += tl.dot(a, h, input_precision="ieee")
            else:  # K tile below the fp32 tl.dot floor (tiny Hadamard blocks): broadcast multiply and reduce
                acc += tl.sum(a[:, :, None] * h[None, :, :], axis=1)
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None])


def triton_smooth_hadamard(
    x: torch.Tensor,
    smooth: Optional[torch.Tensor],
    signs: Optional[torch.Tensor],
    block_size: int,
    *,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
    block_k: Optional[int] = None,
) -> torch.Tensor:
    """``smooth_hadamard`` in one kernel launch (arguments as validated by ``effalg.kernels.smooth_hadamard``).

    ``block_m`` / ``block_n`` / ``block_k`` override the tiles (powers of two; ``block_n`` and ``block_k`` are capped
    at ``block_size``); tests pass small values to exercise several tiles per Hadamard block. K tiles below the fp32
    ``tl.dot`` floor (8) use a broadcast multiply-reduce instead, so every ``block_size`` runs on GPUs.
    """
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty((M, K), dtype=x.dtype, device=x.device)
    if smooth is not None and signs is not None:
        m = (smooth * signs).contiguous()
    else:
        m = smooth if smooth is not None else signs
        m = None if m is None else m.contiguous()
    if M == 0:
        return y.reshape(x.shape)
    b = int(block_size)
    BM = block_m or 64
    if b:
        BN = min(block_n or 64, b)
        BK = min(block_k or 32, b)
        H = hadamard_matrix_on(b, x.device)
        grid = (triton.cdiv(M, BM), K // BN)
    else:
        BN = block_n or 128
        BK = 1
        H = x2  # unused
        grid = (triton.cdiv(M, BM), triton.cdiv(K, BN))
    launch(
        _smooth_hadamard_kernel,
        grid,
        x2,
        x2 if m is None else m,
        H,
        y,
        M,
        K,
        x2.stride(0),
        y.stride(0),
        B=b,
        HAS_M=m is not None,
        BLOCK_M=BM,
        BLOCK_N=BN,
        BLOCK_K=BK,
        USE_DOT=BK >= min_dot_k(torch.float32),
        num_warps=8,  # 4 warps spill registers on sm_80 for fp32 (AOT report)
    )
    return y.reshape(x.shape)
