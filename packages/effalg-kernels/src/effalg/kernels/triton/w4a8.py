"""int4 weights x per-token int8 activations: nibbles unpacked in-kernel, int32 accumulation per K-group."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import MIN_INT8_DOT_K, check_dot_k, grouped_pid, pow2_divisor, tl_dtype, w4a8_gemm_blocks
from .launch import launch
from .quantize import triton_quantize_per_token

__all__ = ["triton_w4a8_linear", "w4a8_block_k"]


@triton.jit
def _unpack_int4(w_rows, b_idx, mask, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``[BLOCK_N, BLOCK_K]`` int8 weights from the packed bytes ``b_idx`` (two codes ``u = q + 8`` per byte)."""
    packed = tl.load(w_rows + b_idx[None, :], mask=mask, other=0x88).to(tl.int32)
    lo = (packed & 0xF) - 8  # even k
    hi = (packed >> 4) - 8  # odd k
    return tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_K]).to(tl.int8)  # k interleaved back into order


@triton.jit
def _w4a8_kernel(
    a_ptr,
    a_scale_ptr,
    w_ptr,
    w_scale_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    KB,  # packed bytes per weight row: ceil(K / 2)
    GS,  # elements per group (K when per-channel)
    G,  # groups
    stride_am,
    stride_wn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # a power of two >= 32 (int8 tl.dot)
    GROUP_M: tl.constexpr,
    ALIGNED: tl.constexpr,  # one group, or BLOCK_K divides GS: every K tile lies inside one group
):
    HALF_K: tl.constexpr = BLOCK_K // 2
    pid_m, pid_n = grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_b = tl.arange(0, HALF_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if ALIGNED:
        for g in range(0, G):
            acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)  # exact integer partial sum of this group
            for kk in range(0, GS, BLOCK_K):
                k0 = g * GS + kk  # even: GS is a multiple of BLOCK_K whenever G > 1
                k_mask = offs_k < GS - kk
                a = tl.load(a_rows + (k0 + offs_k)[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0)
                b_idx = k0 // 2 + offs_b
                b_mask = (offs_b < (GS - kk + 1) // 2) & (b_idx < KB)
                wq = _unpack_int4(w_rows, b_idx, n_mask[:, None] & b_mask[None, :], BLOCK_N, BLOCK_K)
                acc_g = tl.dot(a, tl.trans(wq), acc_g, out_dtype=tl.int32)
            ws = tl.load(w_scale_ptr + offs_n * G + g, mask=n_mask, other=0.0)
            acc += acc_g.to(tl.float32) * ws[None, :]
    else:
        # Groups smaller than (or not aligned to) the K tile: one masked int8 dot per group the tile overlaps.
        K = GS * G
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < K
            a = tl.load(a_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0)
            b_idx = k0 // 2 + offs_b
            wq = _unpack_int4(w_rows, b_idx, n_mask[:, None] & (b_idx < KB)[None, :], BLOCK_N, BLOCK_K)
            wq_t = tl.trans(wq)
            g_of_k = k // GS
            g_hi = (tl.minimum(k0 + BLOCK_K, K) - 1) // GS
            for g in range(k0 // GS, g_hi + 1):
                a_g = tl.where((g_of_k == g)[None, :], a, 0).to(tl.int8)
                part = tl.dot(a_g, wq_t, out_dtype=tl.int32)
                ws = tl.load(w_scale_ptr + offs_n * G + g, mask=n_mask, other=0.0)
                acc += part.to(tl.float32) * ws[None, :]
    a_scale = tl.load(a_scale_ptr + offs_m, mask=m_mask, other=0.0)
    y = acc * a_scale[:, None]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, y.to(OUT_DTYPE), mask=m_mask[:, None] & n_mask[None, :])


def w4a8_block_k(K: int, group_size: int, cap: int = 128) -> int:
    """Default K tile (``<= cap``, at least 32): for per-group scales the largest power of two dividing
    ``group_size`` when that is >= 32 (each tile inside one group), else 32 (tiles span several groups)."""
    if group_size == 0:
        return max(MIN_INT8_DOT_K, min(cap, triton.next_power_of_2(K)))
    return max(MIN_INT8_DOT_K, pow2_divisor(group_size, cap))


def triton_w4a8_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    group_size: int = 0,
    bias: Optional[torch.Tensor] = None,
    *,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
    block_k: Optional[int] = None,
) -> torch.Tensor:
    """``w4a8_linear``: ``w`` is ``uint8[N, ceil(K/2)]`` int4 codes ``u = q + 8``, ``w_scale`` ``float32[N, G]``.

    Activations are quantized per token with :func:`triton_quantize_per_token`. ``block_k`` is a power of two
    >= 32 (the int8 ``tl.dot`` floor on GPUs); any ``group_size`` works: when ``block_k`` divides it each group
    accumulates exactly in int32, otherwise every K tile runs one masked int8 dot per group it overlaps.
    """
    K = x.shape[-1]
    N = w.shape[0]
    gs = K if group_size == 0 else group_size
    G = K // gs
    q, s = triton_quantize_per_token(x.reshape(-1, K), 0)
    M = q.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M > 0 and N > 0:
        bm, bn, bk, num_warps, num_stages = w4a8_gemm_blocks(M, N, K)
        bm, bn = block_m or bm, block_n or bn
        bk = block_k or w4a8_block_k(K, group_size, bk)
        check_dot_k("w4a8_linear", bk, torch.int8)
        if w.stride(-1) != 1:
            w = w.contiguous()
        w_scale = w_scale.reshape(N, G).to(torch.float32).contiguous()
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
        launch(
            _w4a8_kernel,
            grid,
            q,
            s,
            w,
            w_scale,
            bias.contiguous() if bias is not None else w_scale,
            out,
            M,
            N,
            w.shape[1],
            gs,
            G,
            q.stride(0),
            w.stride(0),
            out.stride(0),
            HAS_BIAS=bias is not None,
            OUT_DTYPE=tl_dtype(x.dtype),
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            GROUP_M=8,
            ALIGNED=G == 1 or gs % bk == 0,
            num_warps=num_warps,
            num_stages=num_stages,
        )
    return out.reshape(*x.shape[:-1], N)
