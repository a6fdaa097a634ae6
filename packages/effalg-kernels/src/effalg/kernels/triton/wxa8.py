"""MixDQ W8A8 / W4A8 / W2A8: int8 x int8 ``tl.dot`` with int32 accumulation, 2/4-bit weights unpacked in-kernel.

Static per-tensor asymmetric activations are quantized in-kernel while the A tile is loaded; the zero point is folded
into the epilogue through the per-output-channel weight row sums. Dynamic per-token activations are quantized first
by :func:`triton_quantize_per_token`.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import MIN_INT8_DOT_K, check_dot_k, grouped_pid, round_half_even, tl_dtype, w4a8_gemm_blocks
from .launch import launch
from .quantize import triton_quantize_per_token
from .w4a8 import _unpack_int4

__all__ = ["triton_wxa8_linear"]


@triton.jit
def _unpack_int2(w_rows, b_idx, mask, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``[BLOCK_N, BLOCK_K]`` int8 weights from the packed bytes ``b_idx`` (four codes ``u = q + 2`` per byte, code
    ``k`` at bits ``2 * (k % 4)``)."""
    packed = tl.load(w_rows + b_idx[None, :], mask=mask, other=0xAA).to(tl.int32)
    c0 = (packed & 3) - 2
    c1 = ((packed >> 2) & 3) - 2
    c2 = ((packed >> 4) & 3) - 2
    c3 = ((packed >> 6) & 3) - 2
    # join(join(c0, c2), join(c1, c3))[..., j, i] = c_{2j + i}: flattening puts the four codes of a byte in order.
    return tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), [BLOCK_N, BLOCK_K]).to(tl.int8)


@triton.jit
def _wxa8_kernel(
    a_ptr,  # STATIC: float x [M, K]; else int8 per-token codes [M, K]
    a_scale_ptr,  # STATIC: float32[1]; else float32[M]
    a_zero_ptr,  # int32[1] (HAS_ZERO)
    w_ptr,
    w_scale_ptr,
    w_rowsum_ptr,  # int32[N] (HAS_ZERO)
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    KB,  # bytes per weight row: ceil(K * W_BITS / 8)
    stride_am,
    stride_wn,
    stride_om,
    STATIC: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    W_BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # a power of two >= 32 (int8 tl.dot)
    GROUP_M: tl.constexpr,
):
    CODES: tl.constexpr = 8 // W_BITS  # codes per byte
    pid_m, pid_n = grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_b = tl.arange(0, BLOCK_K // CODES)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    if STATIC:
        a_scale = tl.load(a_scale_ptr)
        if HAS_ZERO:
            zero = tl.load(a_zero_ptr)
            lo = (-128 - zero).to(tl.float32)
            hi = (127 - zero).to(tl.float32)
        else:
            zero = 0
            lo = -128.0
            hi = 127.0
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        a_mask = m_mask[:, None] & k_mask[None, :]
        if STATIC:
            xa = tl.load(a_rows + k[None, :], mask=a_mask, other=0.0).to(tl.float32)
            # IEEE division like the reference; clamping first keeps |v| < 2**22 for round_half_even.
            v = tl.minimum(tl.maximum(tl.math.div_rn(xa, a_scale), lo), hi)
            qa = round_half_even(v).to(tl.int32) + zero
            a = tl.where(a_mask, qa, 0).to(tl.int8)  # padding contributes 0, not the zero point
        else:
            a = tl.load(a_rows + k[None, :], mask=a_mask, other=0)
        if W_BITS == 8:  # [BLOCK_K, BLOCK_N] view of w^T, like the int8 GEMM
            wt = tl.load(w_cols + k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0)
        else:
            b_idx = k0 // CODES + offs_b
            b_mask = n_mask[:, None] & (b_idx < KB)[None, :]
            if W_BITS == 4:
                wt = tl.trans(_unpack_int4(w_rows, b_idx, b_mask, BLOCK_N, BLOCK_K))
            else:
                wt = tl.trans(_unpack_int2(w_rows, b_idx, b_mask, BLOCK_N, BLOCK_K))
        acc = tl.dot(a, wt, acc, out_dtype=tl.int32)
    w_scale = tl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0)
    if STATIC:
        if HAS_ZERO:
            rowsum = tl.load(w_rowsum_ptr + offs_n, mask=n_mask, other=0)
            acc = acc - zero * rowsum[None, :]  # exact in int32 for K <= MAX_INT8_ZP_K
        y = acc.to(tl.float32) * a_scale * w_scale[None, :]
    else:
        a_scale = tl.load(a_scale_ptr + offs_m, mask=m_mask, other=0.0)
        y = acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, y.to(OUT_DTYPE), mask=m_mask[:, None] & n_mask[None, :])


def triton_wxa8_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    w_bits: int,
    a_scale: Optional[torch.Tensor] = None,
    a_zero: Optional[torch.Tensor] = None,
    w_rowsum: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
    block_k: Optional[int] = None,
) -> torch.Tensor:
    """``wxa8_linear`` in one GEMM launch (plus the per-token quantizer when ``a_scale is None``).

    Tiles default to :func:`w4a8_gemm_blocks`; ``block_k`` must be a power of two >= 32 (the int8 ``tl.dot`` floor).
    """
    K = x.shape[-1]
    N = w.shape[0]
    x2 = x.reshape(-1, K)
    static = a_scale is not None
    if static:
        a = x2 if x2.stride(-1) == 1 else x2.contiguous()
        s = a_scale.reshape(1).to(torch.float32)
    else:
        a, s = triton_quantize_per_token(x2, 0)
        s = s.reshape(-1)
    M = a.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M > 0 and N > 0:
        bm, bn, bk, num_warps, num_stages = w4a8_gemm_blocks(M, N, K)
        bm, bn = block_m or bm, block_n or bn
        bk = block_k or max(MIN_INT8_DOT_K, min(bk, triton.next_power_of_2(K)))
        check_dot_k("wxa8_linear", bk, torch.int8)
        if w.stride(-1) != 1:
            w = w.contiguous()
        w_scale = w_scale.reshape(N).to(torch.float32).contiguous()
        has_zero = static and a_zero is not None
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
        launch(
            _wxa8_kernel,
            grid,
            a,
            s,
            a_zero.reshape(1) if has_zero else w_scale,  # dummy pointers when unused
            w,
            w_scale,
            w_rowsum.contiguous() if has_zero else w_scale,
            bias.contiguous() if bias is not None else w_scale,
            out,
            M,
            N,
            K,
            w.shape[1],
            a.stride(0),
            w.stride(0),
            out.stride(0),
            STATIC=static,
            HAS_ZERO=has_zero,
            W_BITS=w_bits,
            HAS_BIAS=bias is not None,
            OUT_DTYPE=tl_dtype(x.dtype),
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            GROUP_M=8,
            num_warps=num_warps,
            num_stages=num_stages,
        )
    return out.reshape(*x.shape[:-1], N)
