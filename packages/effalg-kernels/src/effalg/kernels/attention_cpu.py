"""Fast CPU implementations of the band attention ops (cost scales with the window, not with L²).

Prefill walks query blocks; for each group of KV heads sharing a (window, sink) rule it gathers only the keys the
block can see and runs a small masked ``scaled_dot_product_attention`` (fp32) with the group's ``n_rep`` query heads
batched over each KV head. Causal: the sink tokens plus the band ``[i0 - window + 1, i1)``, blocks of
``PREFILL_BLOCK`` rows. Non-causal: the global (sink) rows attend to every key as one dense block; the other blocks
of :func:`band_block` rows see the global keys left of the band plus the band ``[i0 - window + 1, i1 + window - 1)``.
Decode runs one batched attention per run of consecutive KV heads with equal capacity, on views of the compact cache
(no copies): sdpa for fp32/fp16, two bf16 GEMMs around an fp32 softmax for bf16.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["band_attention_cpu", "band_decode_attention_cpu", "band_block", "register", "PREFILL_BLOCK"]

#: Query rows per block of causal (MoA prefill) attention.
PREFILL_BLOCK = 128
#: Bounds of the query rows per block of non-causal band attention, see :func:`band_block`.
BAND_BLOCK_MIN, BAND_BLOCK_MAX = 64, 256


def band_block(window: int) -> int:
    """Query rows per non-causal block: ``window // 8`` rounded down to a power of two, within the bounds above.

    A block reads ``block + 2 * window`` keys, so small blocks waste little work on masked scores while large ones
    re-read each key less often. Tuned at PixArt dims (2 x 16 heads of 72, fp32 and bf16, 2 threads): window 513 at
    L 4096 is fastest at 64 rows (256: +7%), window 2049 at L 16384 at 256 rows (64: +12-18%).
    """
    b = 1 << max(0, (window // 8).bit_length() - 1)
    return min(BAND_BLOCK_MAX, max(BAND_BLOCK_MIN, b))


def _groups(window: list[int], sink: list[int], L: int) -> dict[tuple[int, int], list[int]]:
    """KV heads grouped by their effective (window, sink) rule on a length-``L`` row."""
    groups: dict[tuple[int, int], list[int]] = {}
    for h, (w, s) in enumerate(zip(window, sink)):
        w, s = min(w, L), min(s, L)
        if w >= L or s <= 0:  # the band covers everything or there are no sinks
            s = 0
        groups.setdefault((w, s), []).append(h)
    return groups


def _heads_index(heads: list[int], device: torch.device):
    """An index selecting ``heads``: a slice (views, no copies) when they are a contiguous range."""
    h0 = heads[0]
    if heads == list(range(h0, h0 + len(heads))):
        return slice(h0, h0 + len(heads))
    return torch.tensor(heads, device=device)


def _block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float):
    """``q [G, R, m, D]`` over ``k, v [G, 1, n, D]`` with a bool ``mask [m, n]`` (or None), in fp32, output in q's
    dtype.

    The keys are expanded (stride 0) over the R query heads so sdpa takes its fused CPU flash path; half-precision
    blocks are upcast (CPU fp16 GEMMs are slow; the math is fp32 throughout).
    """
    G, R, m, D = q.shape
    out_dtype = q.dtype
    if q.dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    k = k.expand(G, R, k.shape[2], D)
    v = v.expand(G, R, v.shape[2], v.shape[3])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).to(out_dtype)


def _gather(kh: torch.Tensor, vh: torch.Tensor, pos: torch.Tensor, p: int, sink_hi: int, lo: int, hi: int):
    """Keys, values and positions of the sink tokens ``[p, sink_hi)`` followed by the band ``[lo, hi)``."""
    if sink_hi > p:
        kb = torch.cat((kh[:, :, p:sink_hi], kh[:, :, lo:hi]), dim=2)
        vb = torch.cat((vh[:, :, p:sink_hi], vh[:, :, lo:hi]), dim=2)
        return kb, vb, torch.cat((pos[p:sink_hi], pos[lo:hi]))[None, :]
    return kh[:, :, lo:hi], vh[:, :, lo:hi], pos[None, lo:hi]


def _causal_row(qh, kh, vh, ob, sel, pos, p: int, w: int, s: int, scale: float) -> None:
    """Causal attention (MoA prefill) of one row's head group ``sel``: ``qh = q[b, sel]`` into ``ob[sel]``."""
    L = qh.shape[2]
    for i0 in range(p, L, PREFILL_BLOCK):
        i1 = min(i0 + PREFILL_BLOCK, L)
        lo = max(p, i0 - w + 1)
        kb, vb, jpos = _gather(kh, vh, pos, p, min(p + s, lo), lo, i1)
        ipos = pos[i0:i1, None]
        mask = (jpos <= ipos) & (ipos - jpos < w)
        if s:  # sinks inside the gathered band still count
            mask |= (jpos <= ipos) & (jpos < p + s)
        ob[sel, :, i0:i1] = _block_attention(qh[:, :, i0:i1], kb, vb, mask, scale)


def _bidirectional_row(qh, kh, vh, ob, sel, pos, p: int, w: int, s: int, scale: float) -> None:
    """Non-causal band attention (DiTFastAttn) of one row's head group ``sel``, as :func:`_causal_row`."""
    L = qh.shape[2]
    m = band_block(w)
    if kh.dtype != torch.float32:  # upcast once, not per block: each key is gathered by about 2 * w / m blocks
        kh, vh = kh.float(), vh.float()
    g1 = min(L, p + s)
    if g1 > p:  # the global rows see every real key
        ob[sel, :, p:g1] = _block_attention(qh[:, :, p:g1], kh[:, :, p:], vh[:, :, p:], None, scale)
    for i0 in range(g1, L, m):
        i1 = min(i0 + m, L)
        lo, hi = max(p, i0 - w + 1), min(L, i1 + w - 1)
        kb, vb, jpos = _gather(kh, vh, pos, p, min(g1, lo), lo, hi)
        ipos = pos[i0:i1, None]
        mask = ((jpos - ipos).abs() < w) | (jpos < g1)
        ob[sel, :, i0:i1] = _block_attention(qh[:, :, i0:i1], kb, vb, None if bool(mask.all()) else mask, scale)


def band_attention_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: torch.Tensor,
    sink: torch.Tensor,
    pad: torch.Tensor,
    scale: float,
    causal: bool,
) -> torch.Tensor:
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    n_rep = Hq // Hkv
    out = q.new_zeros((B, Hq, L, v.shape[-1]))
    if B == 0 or L == 0 or Hq == 0:
        return out
    qg = q.view(B, Hkv, n_rep, L, D)
    og = out.view(B, Hkv, n_rep, L, v.shape[-1])
    pos = torch.arange(L, device=q.device)
    groups = _groups(window.tolist(), sink.tolist(), L)
    row = _causal_row if causal else _bidirectional_row
    for b, p in enumerate(pad.tolist()):
        if p >= L:
            continue
        for (w, s), heads in groups.items():
            sel = _heads_index(heads, q.device)
            row(qg[b, sel], k[b, sel].unsqueeze(1), v[b, sel].unsqueeze(1), og[b], sel, pos, p, w, s, scale)
    return out


def _runs(cap: list[int]) -> list[tuple[int, int]]:
    """Maximal ranges ``[h0, h1)`` of consecutive KV heads with equal capacity."""
    runs, h0 = [], 0
    for h in range(1, len(cap) + 1):
        if h == len(cap) or cap[h] != cap[h0]:
            runs.append((h0, h))
            h0 = h
    return runs


def _decode_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float) -> torch.Tensor:
    """``q [B, n, R, D]`` over ``k, v [B, n, l, D]`` (bool ``mask [B, n, 1, l]`` or None).

    bf16 runs two oneDNN bf16 GEMMs around an fp32 softmax (about 2x faster than CPU sdpa in bf16, which is
    memory bound here); fp32 / fp16 use sdpa.
    """
    if q.dtype != torch.bfloat16:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    s = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale)
    if mask is not None:
        s.masked_fill_(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1).to(v.dtype), v)


def band_decode_attention_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    head_start: torch.Tensor,
    length: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    B, Hq, D = q.shape
    Dv = v_cache.shape[-1]
    hs = head_start.tolist()
    Hkv = len(hs) - 1
    n_rep = Hq // Hkv
    cap = [hs[h + 1] - hs[h] for h in range(Hkv)]
    lens = length.tolist()
    out = q.new_empty((B, Hq, Dv))
    for h0, h1 in _runs(cap):
        n, c = h1 - h0, cap[h0]
        run_lens = [row[h0:h1] for row in lens]
        lmax = max((max(r) for r in run_lens), default=0)
        if lmax == 0:
            out[:, h0 * n_rep : h1 * n_rep] = 0
            continue
        kseg = k_cache[:, hs[h0] : hs[h1]].reshape(B, n, c, D)[:, :, :lmax]
        vseg = v_cache[:, hs[h0] : hs[h1]].reshape(B, n, c, Dv)[:, :, :lmax]
        qh = q[:, h0 * n_rep : h1 * n_rep].reshape(B, n, n_rep, D)
        mask = None
        if any(x != lmax for r in run_lens for x in r):
            live = length[:, h0:h1]
            mask = (torch.arange(lmax, device=q.device) < live[..., None]).unsqueeze(2)  # [B, n, 1, lmax]
            empty = live == 0
            if bool(empty.any()):
                mask = mask | empty[..., None, None]  # avoid all-masked rows; zeroed below
        o = _decode_block(qh, kseg, vseg, mask, scale)  # [B, n, n_rep, Dv]
        if mask is not None and bool((length[:, h0:h1] == 0).any()):
            o = o.masked_fill((length[:, h0:h1] == 0)[..., None, None], 0)
        out[:, h0 * n_rep : h1 * n_rep] = o.reshape(B, n * n_rep, Dv)
    return out


_REGISTERED = False


def register() -> None:
    """Register the CPU implementations of the band attention ops (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from . import _attention_ops  # noqa: F401  (defines the op schemas)

    torch.library.register_kernel("effalg::band_attention", "cpu", band_attention_cpu)
    torch.library.register_kernel("effalg::band_decode_attention", "cpu", band_decode_attention_cpu)
    _REGISTERED = True
