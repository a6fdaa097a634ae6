"""Plain-PyTorch reference implementations: these define the meaning of every ``effalg`` op.

They favour obviousness over speed: integer products are accumulated exactly (in float64, which is exact for
``|sum| < 2**53``; int8 x int8 sums stay below ``2**31`` for ``K <= MAX_INT8_K``), and the float epilogues are done
in float64 and rounded once to the output dtype. Inputs are assumed valid (the public wrappers in
:mod:`effalg.kernels.ops` validate them).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .packing import unpack_bits, unpack_int2_symmetric, unpack_int4_symmetric

__all__ = [
    "quantize_groups",
    "quantize_per_token_ref",
    "int8_scaled_mm_ref",
    "w8a8_linear_ref",
    "w4a8_linear_ref",
    "weight_only_linear_ref",
    "unpack_wxa8_weight",
    "quantize_static_ref",
    "wxa8_linear_ref",
    "dense_int8_weight",
    "hadamard_matrix_ref",
    "smooth_hadamard_ref",
]

#: Smallest ``amax`` used for a scale, so all-zero rows/groups get a finite, non-zero scale.
AMAX_EPS = 1e-8


def dense_int8_weight(w: torch.Tensor) -> torch.Tensor:
    """Plain ``int8[N, K]`` view of an int8 weight given plain or oneDNN-prepacked (mkldnn ``[K, N]``)."""
    if w.layout == torch._mkldnn:
        return w.to_dense().t()
    return w


def quantize_groups(xg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``xg[..., G, gs]`` per last-dim group: ``(q: int8[..., G, gs], scale: float32[..., G])``.

    ``scale = max(amax, 1e-8) / 127`` in float32, ``q = clamp(round(x / scale), -127, 127)`` with the division in
    float32 and round-half-to-even. Only plain torch ops, so it traces and fuses under ``torch.compile``.
    """
    xf = xg.to(torch.float32)
    scale = torch.clamp(xf.abs().amax(dim=-1), min=AMAX_EPS) / 127.0
    q = torch.round(xf / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_per_token_ref(x: torch.Tensor, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic int8 quantization along the last dim, per token (``group_size == 0``) or per group of
    ``group_size`` consecutive elements (see :func:`quantize_groups`). Returns ``(q: int8[..., K], scale:
    float32[..., G])``.
    """
    K = x.shape[-1]
    gs = K if group_size == 0 else group_size
    q, scale = quantize_groups(x.reshape(*x.shape[:-1], K // gs, gs))
    return q.reshape(x.shape), scale


def int8_scaled_mm_ref(
    a: torch.Tensor,
    a_scale: Optional[torch.Tensor],
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``(a @ w.T) * a_scale * w_scale + bias`` with exact integer accumulation, rounded once to ``out_dtype``.

    ``a: int8[M, K]``, ``a_scale: float32[M, 1]`` or None (no per-token scale), ``w: int8[N, K]`` (or prepacked),
    ``w_scale: float32[N]``.
    """
    wd = dense_int8_weight(w)
    acc = a.to(torch.float64) @ wd.to(torch.float64).t()  # exact: |acc| <= K * 128 * 128 < 2**53
    y = acc * w_scale.to(torch.float64).reshape(1, -1)
    if a_scale is not None:
        y = y * a_scale.to(torch.float64).reshape(-1, 1)
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(out_dtype)


def w8a8_linear_ref(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``quantize_per_token(x)`` then ``int8_scaled_mm``; output in ``x.dtype`` with shape ``[..., N]``."""
    K = x.shape[-1]
    q, s = quantize_per_token_ref(x.reshape(-1, K), 0)
    y = int8_scaled_mm_ref(q, s, w, w_scale, bias, x.dtype)
    return y.reshape(*x.shape[:-1], w_scale.shape[0])


def w4a8_linear_ref(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    group_size: int = 0,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """int4 weights (codes ``u = q + 8``, two per byte, low nibble = even k) x per-token int8 activations.

    ``y[m, n] = a_scale[m] * sum_g w_scale[n, g] * sum_{k in g} qa[m, k] * qw[n, k] + bias[n]``, integer partial
    sums exact, epilogue in float64, rounded once to ``x.dtype``.
    """
    K = x.shape[-1]
    N = w.shape[0]
    gs = K if group_size == 0 else group_size
    G = K // gs
    qa, sa = quantize_per_token_ref(x.reshape(-1, K), 0)
    qw = unpack_int4_symmetric(w, K)  # int8 [N, K]
    acc = torch.einsum(
        "mgk,ngk->mng", qa.to(torch.float64).reshape(-1, G, gs), qw.to(torch.float64).reshape(N, G, gs)
    )  # exact integer partial sums per group
    y = (acc * w_scale.to(torch.float64).reshape(1, N, G)).sum(-1) * sa.to(torch.float64).reshape(-1, 1)
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def unpack_wxa8_weight(w: torch.Tensor, w_bits: int, K: int) -> torch.Tensor:
    """``int8[N, K]`` symmetric codes of a ``wxa8_linear`` weight: plain int8 (8 bits), or packed ``uint8`` with
    codes ``q + 8`` (4 bits, two per byte) / ``q + 2`` (2 bits, four per byte)."""
    if w_bits == 8:
        return w
    if w_bits == 4:
        return unpack_int4_symmetric(w, K)
    return unpack_int2_symmetric(w, K)


def quantize_static_ref(x: torch.Tensor, a_scale: torch.Tensor, a_zero: Optional[torch.Tensor]) -> torch.Tensor:
    """Static per-tensor asymmetric int8: ``clamp(round(x / a_scale) + a_zero, -128, 127)`` (float32 IEEE division,
    round half to even). Only plain torch ops, so it traces and fuses under ``torch.compile``."""
    v = torch.round(x.to(torch.float32) / a_scale.to(torch.float32))
    if a_zero is not None:
        v = v + a_zero.to(torch.float32)  # |round(v)| >= 2**24 is clamped below anyway
    return v.clamp(-128, 127).to(torch.int8)


def wxa8_linear_ref(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    w_bits: int,
    a_scale: Optional[torch.Tensor] = None,
    a_zero: Optional[torch.Tensor] = None,
    w_rowsum: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """MixDQ W{8,4,2}A8 linear: per-output-channel symmetric ``w_bits``-bit weights (:func:`unpack_wxa8_weight`).

    ``a_scale is None``: dynamic per-token activations, ``y = (qa @ qw.T) * sa[m] * w_scale[n] + bias``.
    Otherwise static per-tensor asymmetric ``qa = quantize_static_ref(x, a_scale, a_zero)`` and
    ``y = (qa @ qw.T - a_zero * w_rowsum[n]) * a_scale * w_scale[n] + bias`` (``w_rowsum = qw.sum(1)``). Integer
    parts exact, epilogue in float64, rounded once to ``x.dtype``.
    """
    K = x.shape[-1]
    N = w.shape[0]
    x2 = x.reshape(-1, K)
    qw = unpack_wxa8_weight(w, w_bits, K).to(torch.float64)
    if a_scale is None:
        qa, sa = quantize_per_token_ref(x2, 0)
        y = (qa.to(torch.float64) @ qw.t()) * sa.to(torch.float64).reshape(-1, 1)
    else:
        qa = quantize_static_ref(x2, a_scale, a_zero)
        acc = qa.to(torch.float64) @ qw.t()  # exact integer sums
        if a_zero is not None:
            acc = acc - a_zero.to(torch.float64) * w_rowsum.to(torch.float64).reshape(1, N)
        y = acc * a_scale.to(torch.float64)
    y = y * w_scale.to(torch.float64).reshape(1, N)
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def weight_only_linear_ref(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int = 0,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W[n, k] = (u[n, k] - zero[n, g]) * scale[n, g]``, ``g = k // group_size``.

    ``u`` are the ``bits``-bit codes unpacked from ``w`` (see :func:`effalg.kernels.packing.unpack_bits`);
    ``group_size == 0`` means one group per output channel. Computed in float64, rounded once to ``x.dtype``.
    """
    K = x.shape[-1]
    N = w.shape[0]
    gs = K if group_size == 0 else group_size
    u = unpack_bits(w, bits, K).to(torch.float64)  # [N, K]
    g = torch.arange(K, device=x.device) // gs
    W = (u - zero.to(torch.float64)[:, g]) * scale.to(torch.float64)[:, g]
    y = x.reshape(-1, K).to(torch.float64) @ W.t()
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def hadamard_matrix_ref(b: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Unnormalized Sylvester Walsh-Hadamard matrix ``H_b[i, j] = (-1) ** popcount(i & j)`` (``b`` a power of two)."""
    i = torch.arange(b, device=device)
    bits = i[:, None] & i[None, :]
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).to(dtype)


def smooth_hadamard_ref(
    x: torch.Tensor, smooth: Optional[torch.Tensor], signs: Optional[torch.Tensor], block_size: int
) -> torch.Tensor:
    """``y = ((x * smooth) * signs)`` split into blocks of ``block_size`` channels along the last dim, each block
    multiplied by the normalized Walsh-Hadamard matrix ``H_b / sqrt(b)``; ``block_size == 0``: no rotation.

    Computed in float64, rounded once to ``x.dtype``.
    """
    K = x.shape[-1]
    y = x.to(torch.float64)
    if smooth is not None:
        y = y * smooth.to(torch.float64)
    if signs is not None:
        y = y * signs.to(torch.float64)
    if block_size:
        H = hadamard_matrix_ref(block_size, device=x.device) / math.sqrt(block_size)
        y = (y.reshape(*x.shape[:-1], K // block_size, block_size) @ H).reshape(x.shape)
    return y.to(x.dtype)
