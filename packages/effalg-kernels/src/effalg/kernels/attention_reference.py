"""Plain-PyTorch references of the band attention ops (they define the meaning; dense, for tests and fallback).

Mask semantics (the single source of truth): in batch row ``b`` with ``pad[b]`` left-padding tokens, the query at
index ``i >= pad[b]`` sees key ``j`` iff ``pad[b] <= j`` and (``not causal`` or ``j <= i``) and
(``|i - j| < window[h]`` or ``j - pad[b] < sink[h]`` or (``not causal`` and ``i - pad[b] < sink[h]``)), ``h`` being
the query head's KV head. Padding query rows (``i < pad[b]``) output zeros.

* ``causal=True`` (MoA prefill): the last ``window`` tokens up to the query plus the first ``sink`` real tokens.
* ``causal=False`` (DiTFastAttn): a symmetric band of ``window - 1`` tokens on each side of the query in the flattened
  token order, plus ``sink`` global tokens at the start of the row (MMDiT text tokens placed first) that every query
  sees and that themselves see every key.

Both references build the explicit boolean mask and run dense attention in float64 on CPU (float32 elsewhere).
"""

from __future__ import annotations

import torch

__all__ = ["band_sink_mask", "band_attention_ref", "decode_slot_mask", "band_decode_attention_ref"]


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.device.type == "cpu" else torch.float32


def band_sink_mask(L: int, window: torch.Tensor, sink: torch.Tensor, pad: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean ``[B, Hkv, L, L]`` mask (query index, key index): True where the query sees the key."""
    dev = window.device
    i = torch.arange(L, device=dev).view(1, 1, L, 1)
    j = torch.arange(L, device=dev).view(1, 1, 1, L)
    p = pad.to(dev).view(-1, 1, 1, 1)
    w = window.view(1, -1, 1, 1)
    s = sink.to(dev).view(1, -1, 1, 1)
    visible = ((i - j).abs() < w) | (j - p < s)
    if causal:
        return (i >= p) & (j >= p) & (j <= i) & visible
    return (i >= p) & (j >= p) & (visible | (i - p < s))


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float):
    """Dense attention of ``q [..., M, D]`` over ``k, v [..., N, D]`` with a boolean ``mask [..., M, N]``.

    Rows with no visible key output zeros.
    """
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    any_key = mask.any(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~any_key, 0.0), dim=-1) * any_key
    return probs @ v


def band_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: torch.Tensor,
    sink: torch.Tensor,
    pad: torch.Tensor,
    scale: float,
    causal: bool,
) -> torch.Tensor:
    """Band+sink attention: ``q [B, Hq, L, D]``, ``k, v [B, Hkv, L, D]`` -> ``[B, Hq, L, D]`` in q's dtype."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    n_rep = Hq // Hkv
    acc = _acc_dtype(q)
    mask = band_sink_mask(L, window.to(q.device), sink.to(q.device), pad.to(q.device), causal)  # [B, Hkv, L, L]
    qf = q.to(acc).view(B, Hkv, n_rep, L, D)
    out = _masked_attention(qf, k.to(acc).unsqueeze(2), v.to(acc).unsqueeze(2), mask.unsqueeze(2), scale)
    return out.reshape(B, Hq, L, v.shape[-1]).to(q.dtype)


def decode_slot_mask(T: int, head_start: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, Hkv, T]``: slot ``t`` is a live key of KV head ``h`` in row ``b``."""
    dev = length.device
    t = torch.arange(T, device=dev).view(1, 1, T)
    start = head_start.to(dev)[:-1].view(1, -1, 1)
    return (t >= start) & (t < start + length.unsqueeze(-1))


def band_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    head_start: torch.Tensor,
    length: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode from the compact cache: ``q [B, Hq, D]``, ``k_cache, v_cache [B, T, D]`` -> ``[B, Hq, D]``.

    KV head ``h`` owns slots ``head_start[h] .. head_start[h+1]``; its first ``length[b, h]`` slots are live.
    """
    B, Hq, D = q.shape
    T = k_cache.shape[1]
    Hkv = head_start.shape[0] - 1
    n_rep = Hq // Hkv
    acc = _acc_dtype(q)
    mask = decode_slot_mask(T, head_start.to(q.device), length.to(q.device))  # [B, Hkv, T]
    qf = q.to(acc).view(B, Hkv, n_rep, D)
    kf = k_cache.to(acc).unsqueeze(1)  # [B, 1, T, D]
    vf = v_cache.to(acc).unsqueeze(1)
    out = _masked_attention(qf, kf, vf, mask.unsqueeze(2).expand(B, Hkv, n_rep, T), scale)
    return out.reshape(B, Hq, v_cache.shape[-1]).to(q.dtype)
