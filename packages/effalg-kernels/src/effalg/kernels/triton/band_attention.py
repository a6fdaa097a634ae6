"""Band attention in Triton: band+sink prefill (flash-attention style) and decode from the compact per-head cache.

* Prefill (``band_attention``): one program per (query block, batch row, query head). It visits only the key blocks
  the query block can see: the sink tokens left of the band, ``[pad, min(pad + sink, lo))`` with
  ``lo = max(pad, i0 - window + 1)``, then the band ``[lo, hi)``: ``hi = i1`` causal (``CAUSAL``, MoA),
  ``hi = min(L, i1 + window - 1)`` non-causal (DiTFastAttn), where a block holding global rows (``i - pad < sink``)
  visits every key. Each tile is masked by the exact rule and folded in with an online softmax (fp32 statistics and
  accumulator). Cost scales with ``window + sink``, not with ``L``.
* Decode: one program per (batch row, query head, split); each split walks a contiguous chunk of the KV head's live
  slots with an online softmax and writes its partial (max, sum, accumulator); the splits are merged in PyTorch
  (flash-decoding), so short batches still fill the GPU.

Both run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_dot_k, dot_config, min_dot_k
from .launch import launch, on_gpu

__all__ = ["triton_band_attention", "triton_band_decode_attention", "register"]


@triton.jit
def _prefill_tile(
    acc, m_i, l_i, q, k_base, v_base, start, offs_m, pad, window, sink, L, D, stride_kl, stride_vl,
    qk_scale, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    CAUSAL: tl.constexpr,
):  # fmt: skip
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < L) & (offs_d[None, :] < D)
    k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=INPUT_PRECISION) * qk_scale  # [BM, BN] fp32
    i = offs_m[:, None]
    j = offs_n[None, :]
    if CAUSAL:
        keep = (j >= pad) & (j <= i) & (j < L) & ((i - j < window) | (j - pad < sink))
    else:
        keep = (j >= pad) & (i >= pad) & (j < L) & ((tl.abs(i - j) < window) | (j - pad < sink) | (i - pad < sink))
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=INPUT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, window_ptr, sink_ptr, pad_ptr,
    Hq, L, D, N_REP,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol,
    qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, CAUSAL: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    kvh = h // N_REP
    window = tl.load(window_ptr + kvh)
    sink = tl.load(sink_ptr + kvh)
    pad = tl.load(pad_ptr + b)

    i0 = pid_m * BLOCK_M
    offs_m = i0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < L) & (offs_d[None, :] < D)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :], mask=q_mask)
    q = q.to(DOT_DTYPE)
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    i1 = tl.minimum(i0 + BLOCK_M, L)
    lo = tl.maximum(pad, i0 - window + 1)
    if CAUSAL:
        hi = i1
    else:
        hi = tl.minimum(L, i1 + window - 1)
        glob = (sink > 0) & (i0 < pad + sink)  # global query rows in the block: every key
        lo = tl.where(glob, pad, lo)
        hi = tl.where(glob, L, hi)
    if i1 > pad:  # a block of padding rows only outputs zeros
        sink_hi = tl.minimum(pad + sink, lo)
        for start in range(pad, sink_hi, BLOCK_N):  # sink tokens left of the band
            acc, m_i, l_i = _prefill_tile(
                acc, m_i, l_i, q, k_base, v_base, start, offs_m, pad, window, sink, sink_hi, D,
                stride_kl, stride_vl, qk_scale, BLOCK_N, BLOCK_D, DOT_DTYPE, INPUT_PRECISION, CAUSAL,
            )  # fmt: skip
        for start in range(lo, hi, BLOCK_N):  # the band
            acc, m_i, l_i = _prefill_tile(
                acc, m_i, l_i, q, k_base, v_base, start, offs_m, pad, window, sink, hi, D,
                stride_kl, stride_vl, qk_scale, BLOCK_N, BLOCK_D, DOT_DTYPE, INPUT_PRECISION, CAUSAL,
            )  # fmt: skip

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=q_mask)


def triton_band_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: torch.Tensor,
    sink: torch.Tensor,
    pad: torch.Tensor,
    scale: float,
    causal: bool,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Band+sink attention (see :func:`effalg.kernels.band_attention`); arguments assumed valid."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q)
    if B == 0 or L == 0 or Hq == 0:
        return out
    window = window.to(device=q.device, dtype=torch.int64).contiguous()
    sink = sink.to(device=q.device, dtype=torch.int64).contiguous()
    pad = pad.to(device=q.device, dtype=torch.int64).contiguous()
    block_d = max(min_dot_k(torch.float16), triton.next_power_of_2(D))
    # fp16/bf16: 64 x 64 tiles on tensor cores; fp32 (IEEE FMA dots): 32 x 32. 8 warps: 4 spill (AOT report).
    if block_m is None:
        block_m = 32 if q.dtype == torch.float32 else 64
    if block_n is None:
        block_n = 32 if q.dtype == torch.float32 else 64
    check_dot_k("band_attention", block_n, q.dtype, "block_n")  # the K dim of p @ v
    dot_dtype, precision = dot_config(q)
    grid = (triton.cdiv(L, block_m), B * Hq)
    launch(
        _prefill_kernel,
        grid,
        q, k, v, out, window, sink, pad,
        Hq, L, D, Hq // Hkv,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        float(scale),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision,
        CAUSAL=bool(causal), num_warps=8, num_stages=2,
    )  # fmt: skip
    return out


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, hs_ptr, len_ptr, m_ptr, l_ptr, acc_ptr,
    Hq, Hkv, D, N_REP, CHUNK,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_vb, stride_vt,
    qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    b = bh // Hq
    h = bh % Hq
    kvh = h // N_REP
    seg = tl.load(hs_ptr + kvh)
    n = tl.load(len_ptr + b * Hkv + kvh)
    c0 = split * CHUNK
    c1 = tl.minimum(c0 + CHUNK, n)

    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    k_base = k_ptr + b * stride_kb + seg * stride_kt
    v_base = v_ptr + b * stride_vb + seg * stride_vt

    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), dtype=tl.float32), axis=0)
    l_i = tl.sum(tl.zeros([BLOCK_N], dtype=tl.float32), axis=0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(c0, c1, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < c1
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * qk_scale
        s = tl.where(n_mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe)
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        m_i = m_new

    part = bh * n_split + split
    tl.store(m_ptr + part, m_i)
    tl.store(l_ptr + part, l_i)
    tl.store(acc_ptr + part * BLOCK_D + offs_d, acc)


def triton_band_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    head_start: torch.Tensor,
    length: torch.Tensor,
    scale: float,
    *,
    block_n: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Decode attention over the compact cache (see :func:`effalg.kernels.band_decode_attention`); valid arguments.

    ``num_splits`` chunks of each segment are reduced in parallel (default on a GPU: enough programs to fill it,
    from the largest segment capacity; 1 under the interpreter).
    """
    B, Hq, D = q.shape
    Hkv = head_start.shape[0] - 1
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    if B == 0 or Hq == 0:
        return torch.empty_like(q)
    T = k_cache.shape[1]
    max_cap = max(int((head_start[1:] - head_start[:-1]).max()) if T else 0, 1)  # the largest segment
    head_start = head_start.to(device=q.device, dtype=torch.int64).contiguous()
    length = length.to(device=q.device, dtype=torch.int64).contiguous()
    block_d = triton.next_power_of_2(D)
    if block_n is None:
        block_n = 64 if D <= 128 else 32
    if num_splits is None:
        num_splits = 1 if not on_gpu(q) else max(1, min(triton.cdiv(max_cap, 256), 512 // (B * Hq) + 1))
    chunk = triton.cdiv(triton.cdiv(max_cap, num_splits), block_n) * block_n
    num_splits = triton.cdiv(max_cap, chunk)
    parts = B * Hq * num_splits
    m = torch.empty(parts, dtype=torch.float32, device=q.device)
    lsum = torch.empty(parts, dtype=torch.float32, device=q.device)
    acc = torch.empty(parts, block_d, dtype=torch.float32, device=q.device)
    launch(
        _decode_kernel,
        (B * Hq, num_splits),
        q, k_cache, v_cache, head_start, length, m, lsum, acc,
        Hq, Hkv, D, Hq // Hkv, chunk,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        float(scale),
        BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=4,
    )  # fmt: skip
    m = m.view(B, Hq, num_splits)
    lsum = lsum.view(B, Hq, num_splits)
    acc = acc.view(B, Hq, num_splits, block_d)[..., :D]
    m_max = m.amax(dim=-1, keepdim=True)
    w = torch.exp(m - torch.where(torch.isinf(m_max), torch.zeros_like(m_max), m_max))  # 0 for empty splits
    den = (w * lsum).sum(-1, keepdim=True)
    out = (w.unsqueeze(-1) * acc).sum(-2) / torch.where(den == 0, torch.ones_like(den), den)
    return out.to(q.dtype)


def register() -> None:
    """Register both launchers as the ``"cuda"`` kernels of ``torch.ops.effalg.band_*`` (called by the package)."""
    from .. import _attention_ops  # noqa: F401  (defines the op schemas)

    torch.library.register_kernel("effalg::band_attention", "cuda", triton_band_attention)
    torch.library.register_kernel("effalg::band_decode_attention", "cuda", triton_band_decode_attention)
