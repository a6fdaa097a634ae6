"""Tiled int8 GEMM ``a[M, K] @ w[N, K]^T`` with int32 accumulation and a fused scale/bias/cast epilogue."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import check_dot_k, gemm_blocks, grouped_pid, tl_dtype
from .launch import launch
from .quantize import triton_quantize_per_token

__all__ = ["triton_int8_scaled_mm", "triton_w8a8_linear"]


@triton.jit
def _int8_mm_kernel(
    a_ptr,
    a_scale_ptr,
    w_ptr,
    w_scale_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_am,
    stride_wn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N] view of w^T
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    a_scale = tl.load(a_scale_ptr + offs_m, mask=m_mask, other=0.0)
    w_scale = tl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0)
    y = acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, y.to(OUT_DTYPE), mask=m_mask[:, None] & n_mask[None, :])


def triton_int8_scaled_mm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    *,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
    block_k: Optional[int] = None,
) -> torch.Tensor:
    """``(a @ w.T) * a_scale * w_scale + bias`` -> ``out_dtype[M, N]``; ``w`` is the plain ``int8[N, K]`` layout.

    ``block_m`` / ``block_n`` / ``block_k`` override the tiles (default :func:`gemm_blocks`); ``block_k`` must be a
    power of two >= 32, the int8 ``tl.dot`` floor on GPUs.
    """
    M, K = a.shape
    N = w_scale.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    if a.stride(-1) != 1:
        a = a.contiguous()
    if w.stride(-1) != 1:
        w = w.contiguous()
    a_scale = a_scale.reshape(-1).to(torch.float32).contiguous()
    w_scale = w_scale.reshape(-1).to(torch.float32).contiguous()
    bm, bn, bk, num_warps, num_stages = gemm_blocks(M, N, K)
    bm, bn, bk = block_m or bm, block_n or bn, block_k or bk
    check_dot_k("int8_scaled_mm", bk, torch.int8)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    launch(
        _int8_mm_kernel,
        grid,
        a,
        a_scale,
        w,
        w_scale,
        bias.contiguous() if bias is not None else a_scale,  # dummy pointer when there is no bias
        out,
        M,
        N,
        K,
        a.stride(0),
        w.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        OUT_DTYPE=tl_dtype(out_dtype),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        GROUP_M=8,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def triton_w8a8_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
    block_k: Optional[int] = None,
) -> torch.Tensor:
    """``quantize_per_token(x)`` (one launch) then :func:`triton_int8_scaled_mm` (one launch); ``x.dtype[..., N]``."""
    K = x.shape[-1]
    N = w_scale.shape[0]
    q, s = triton_quantize_per_token(x.reshape(-1, K), 0)
    y = triton_int8_scaled_mm(q, s, w, w_scale, bias, x.dtype, block_m=block_m, block_n=block_n, block_k=block_k)
    return y.reshape(*x.shape[:-1], N)
