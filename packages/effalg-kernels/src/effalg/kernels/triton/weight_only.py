"""Weight-only low-bit GEMM / GEMV: 2/3/4/8-bit packed codes, group-wise ``W = (u - zero) * scale``.

Two kernels:

* GEMM (``tl.dot``): per K-group it accumulates ``x @ u^T`` with the exact integer codes cast to the activation
  dtype (codes < 256 are exact in fp16/bf16), plus the row sums of ``x``, and folds the group's zero and scale in
  fp32: ``acc += (x @ u^T - sum(x) * zero) * scale``. When the K tile does not divide ``group_size`` (small or
  odd groups), each tile runs one masked dot per group it overlaps.
* GEMV (reduction, no ``tl.dot``): dequantizes a ``[BLOCK_N, BLOCK_K]`` weight tile to fp32 with per-element
  group scale/zero and reduces against one activation row; used for small M and for any ``group_size``.

Codes are extracted in-kernel from the little-endian bit stream of :mod:`effalg.kernels.packing`: code ``k``
sits at stream bits ``[k * bits, (k + 1) * bits)``; for 3 bits a code may straddle two bytes, so two bytes
are loaded and combined.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import check_dot_k, dot_config, grouped_pid, min_dot_k, pow2_divisor, tl_dtype, weight_only_gemm_blocks
from .launch import launch

__all__ = ["triton_weight_only_linear", "GEMV_MAX_M"]

#: Up to this many activation rows the GEMV kernel is used.
GEMV_MAX_M = 4


@triton.jit
def _load_codes(w_rows, k, kb_mask, KB, BITS: tl.constexpr):
    """Codes ``u[n, k]`` (int32) for row pointers ``w_rows`` (``[BN, 1]``) and column indices ``k`` (``[1, BK]``)."""
    bit = k * BITS
    idx = bit >> 3
    if BITS == 8:
        u = tl.load(w_rows + idx, mask=kb_mask & (idx < KB), other=0).to(tl.int32)
    elif BITS == 3:
        b0 = tl.load(w_rows + idx, mask=kb_mask & (idx < KB), other=0).to(tl.int32)
        b1 = tl.load(w_rows + idx + 1, mask=kb_mask & (idx + 1 < KB), other=0).to(tl.int32)
        u = ((b0 | (b1 << 8)) >> (bit & 7)) & 7
    else:  # 2 or 4 bits: a code never straddles a byte
        b0 = tl.load(w_rows + idx, mask=kb_mask & (idx < KB), other=0).to(tl.int32)
        u = (b0 >> (bit & 7)) & ((1 << BITS) - 1)
    return u


@triton.jit
def _wo_gemm_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    zero_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    KB,  # packed bytes per weight row
    GS,  # elements per group
    G,
    stride_xm,
    stride_wn,
    stride_om,
    BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    X_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # _common.dot_config: X_DTYPE on GPUs for fp16/bf16, float32 otherwise
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    ALIGNED: tl.constexpr,  # one group, or BLOCK_K divides GS: every K tile lies inside one group
):
    pid_m, pid_n = grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn  # [1, BLOCK_N]: the tile is loaded as u^T [BK, BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if ALIGNED:
        for g in range(0, G):
            acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            xsum = tl.zeros([BLOCK_M], dtype=tl.float32)
            for kk in range(0, GS, BLOCK_K):
                k = g * GS + kk + offs_k
                k_mask = offs_k < GS - kk
                x = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                u = _load_codes(w_cols, k[:, None], k_mask[:, None] & n_mask[None, :], KB, BITS)
                u = u.to(tl.float32).to(DOT_DTYPE)  # codes < 256: exact in fp16 / bf16 / fp32
                acc_g = tl.dot(x.to(DOT_DTYPE), u, acc_g, input_precision=INPUT_PRECISION)
                xsum += tl.sum(x.to(tl.float32), axis=1)
            sc = tl.load(scale_ptr + offs_n * G + g, mask=n_mask, other=0.0).to(tl.float32)
            zp = tl.load(zero_ptr + offs_n * G + g, mask=n_mask, other=0.0).to(tl.float32)
            acc += (acc_g - xsum[:, None] * zp[None, :]) * sc[None, :]
    else:
        # Groups smaller than (or not aligned to) the K tile: one masked dot per group the tile overlaps.
        K = GS * G
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < K
            x = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            u = _load_codes(w_cols, k[:, None], k_mask[:, None] & n_mask[None, :], KB, BITS)
            u = u.to(tl.float32).to(DOT_DTYPE)
            g_of_k = k // GS
            g_hi = (tl.minimum(k0 + BLOCK_K, K) - 1) // GS
            for g in range(k0 // GS, g_hi + 1):
                x_g = tl.where((g_of_k == g)[None, :], x, 0.0)
                part = tl.dot(x_g.to(DOT_DTYPE), u, input_precision=INPUT_PRECISION)
                sc = tl.load(scale_ptr + offs_n * G + g, mask=n_mask, other=0.0).to(tl.float32)
                zp = tl.load(zero_ptr + offs_n * G + g, mask=n_mask, other=0.0).to(tl.float32)
                acc += (part - tl.sum(x_g, axis=1)[:, None] * zp[None, :]) * sc[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(X_DTYPE), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _wo_gemv_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    zero_ptr,
    bias_ptr,
    out_ptr,
    N,
    K,
    KB,
    GS,
    G,
    stride_xm,
    stride_wn,
    stride_om,
    BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    X_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
    sz_rows = offs_n[:, None] * G
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        x = tl.load(x_ptr + row * stride_xm + k, mask=k_mask, other=0.0).to(tl.float32)
        wmask = n_mask[:, None] & k_mask[None, :]
        u = _load_codes(w_rows, k[None, :], wmask, KB, BITS).to(tl.float32)
        g = k // GS
        sc = tl.load(scale_ptr + sz_rows + g[None, :], mask=wmask, other=0.0).to(tl.float32)
        zp = tl.load(zero_ptr + sz_rows + g[None, :], mask=wmask, other=0.0).to(tl.float32)
        acc += tl.sum((u - zp) * sc * x[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + offs_n, acc.to(X_DTYPE), mask=n_mask)


def triton_weight_only_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int = 0,
    bias: Optional[torch.Tensor] = None,
    *,
    use_gemv: Optional[bool] = None,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
    block_k: Optional[int] = None,
) -> torch.Tensor:
    """``weight_only_linear``: ``x @ W.T + bias`` with ``W[n, k] = (u[n, k] - zero[n, g]) * scale[n, g]``.

    ``w`` is ``uint8[N, ceil(K * bits / 8)]`` (see :func:`effalg.kernels.packing.pack_bits`), ``scale``/``zero``
    ``float[N, G]``. ``use_gemv`` forces a kernel (default: GEMV for ``M <= GEMV_MAX_M``, else GEMM). A GEMM
    ``block_k`` must be a power of two of at least the ``tl.dot`` floor of x's dtype (16 for fp16/bf16, 8 for fp32).
    """
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"weight_only_linear: bits must be one of (2, 3, 4, 8), got {bits!r}")
    K = x.shape[-1]
    N = w.shape[0]
    gs = K if group_size == 0 else group_size
    G = K // gs
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out.reshape(*x.shape[:-1], N)
    if w.stride(-1) != 1:
        w = w.contiguous()
    scale = scale.reshape(N, G).contiguous()
    zero = zero.reshape(N, G).contiguous()
    bias_arg = bias.contiguous() if bias is not None else scale
    x_tl = tl_dtype(x.dtype)
    bm, bn, bk, num_warps, num_stages = weight_only_gemm_blocks(M, N, K, x.dtype)
    floor = min_dot_k(x.dtype)
    if group_size == 0:
        gemm_bk = block_k or max(floor, min(bk, triton.next_power_of_2(K)))
    else:
        gemm_bk = block_k or max(floor, pow2_divisor(gs, bk))
    if use_gemv is None:
        use_gemv = M <= GEMV_MAX_M
    if use_gemv:
        gbn = block_n or 32  # small N tiles: enough programs to fill the GPU at M = 1
        gbk = block_k or max(1, min(128, triton.next_power_of_2(K)))
        launch(
            _wo_gemv_kernel,
            (M, triton.cdiv(N, gbn)),
            x2,
            w,
            scale,
            zero,
            bias_arg,
            out,
            N,
            K,
            w.shape[1],
            gs,
            G,
            x2.stride(0),
            w.stride(0),
            out.stride(0),
            BITS=bits,
            HAS_BIAS=bias is not None,
            X_DTYPE=x_tl,
            BLOCK_N=gbn,
            BLOCK_K=gbk,
            num_warps=8,  # 4 warps spill registers on sm_80/sm_90 at 32 x 128 (AOT report)
        )
    else:
        check_dot_k("weight_only_linear", gemm_bk, x.dtype)
        dot_dtype, precision = dot_config(x)
        bm, bn = block_m or bm, block_n or bn
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
        launch(
            _wo_gemm_kernel,
            grid,
            x2,
            w,
            scale,
            zero,
            bias_arg,
            out,
            M,
            N,
            w.shape[1],
            gs,
            G,
            x2.stride(0),
            w.stride(0),
            out.stride(0),
            BITS=bits,
            HAS_BIAS=bias is not None,
            X_DTYPE=x_tl,
            DOT_DTYPE=dot_dtype,
            INPUT_PRECISION=precision,
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=gemm_bk,
            GROUP_M=8,
            ALIGNED=G == 1 or gs % gemm_bk == 0,
            num_warps=num_warps,
            num_stages=num_stages,
        )
    return out.reshape(*x.shape[:-1], N)
