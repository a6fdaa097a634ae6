"""Public, validating entry points to the band attention ops (``torch.ops.effalg.band_*``).

Shapes, dtypes and devices are checked here; value checks (window >= 1, sink >= 0, pad in range, head_start
monotone, length <= capacity) read the small integer tensors and are skipped while ``torch.compile`` traces (a python
int ``window`` / ``sink`` is always checked). A ``ValueError`` / ``TypeError`` names the argument at fault.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from . import _attention_ops  # noqa: F401  (declares torch.ops.effalg.band_*)

__all__ = ["band_attention", "band_decode_attention"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _float(fn: str, name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{fn}: {name} must be float32, bfloat16 or float16, got {str(t.dtype).removeprefix('torch.')}")
    if t.dim() != ndim:
        raise ValueError(f"{fn}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _index(fn: str, name: str, t, shape: tuple, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{fn}: {name} must be an int64 tensor, got {str(t.dtype).removeprefix('torch.')}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.int64)


def _per_head(fn: str, name: str, x, Hkv: int, device: torch.device, low: int) -> torch.Tensor:
    """``x`` (a python int for every KV head, or an int64 tensor ``[Hkv]``) as an int64 ``[Hkv]`` tensor."""
    if isinstance(x, torch.Tensor):
        return _index(fn, name, x, (Hkv,), device)
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{fn}: {name} must be an int or an int64 tensor [Hkv={Hkv}], got {type(x).__name__}")
    if x < low:
        raise ValueError(f"{fn}: {name} must be >= {low}, got {x}")
    return torch.full((Hkv,), x, dtype=torch.int64, device=device)


def _scale(fn: str, scale, D: int) -> float:
    if scale is None:
        return D**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{fn}: scale must be a finite float, got {scale!r}")
    return float(scale)


def _checking() -> bool:
    return not torch.compiler.is_compiling()


def band_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: Union[int, torch.Tensor],
    sink: Union[int, torch.Tensor, None] = None,
    pad: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    causal: bool = False,
) -> torch.Tensor:
    """Per-KV-head band attention with global (sink) tokens: MoA prefill (causal) and DiTFastAttn (non-causal).

    In row ``b`` the query at ``i >= pad[b]`` sees key ``j`` iff ``pad[b] <= j`` and (``not causal`` or ``j <= i``)
    and (``|i - j| < window`` or ``j - pad[b] < sink`` or (``not causal`` and ``i - pad[b] < sink``)); padding query
    rows output zeros (:mod:`effalg.kernels.attention_reference`).

    Args:
        q: ``[B, Hq, L, D]`` queries (float32/bfloat16/float16).
        k, v: ``[B, Hkv, L, D]`` keys/values in q's dtype, ``Hq % Hkv == 0``; query head ``h`` uses KV head
            ``h // (Hq // Hkv)``.
        window: ``>= 1``, an int (every KV head) or int64 ``[Hkv]``: the band is ``window - 1`` tokens on each side
            of the query (causal: to its left only).
        sink: ``>= 0``, an int or int64 ``[Hkv]`` (default 0): the first ``sink`` real tokens of each row are seen by
            every query and, non-causal, see every key.
        pad: int64 ``[B]`` left-padding counts in ``[0, L]`` (default zeros).
        scale: softmax scale (default ``D ** -0.5``).
        causal: keys right of the query are never seen (MoA); ``False`` for bidirectional DiT attention.

    Returns ``[B, Hq, L, D]`` in q's dtype.
    """
    fn = "band_attention"
    _float(fn, "q", q, 4)
    _float(fn, "k", k, 4)
    _float(fn, "v", v, 4)
    B, Hq, L, D = q.shape
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{fn}: k and v must have q's dtype {q.dtype}, got k {k.dtype}, v {v.dtype}")
    if k.shape[0] != B or k.shape[2] != L or k.shape[3] != D:
        raise ValueError(f"{fn}: k must have shape [B={B}, Hkv, L={L}, D={D}], got {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"{fn}: v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"{fn}: the query heads Hq={Hq} must be a multiple of the KV heads Hkv={Hkv}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but q is on {q.device}")
    if not isinstance(causal, bool):
        raise TypeError(f"{fn}: causal must be a bool, got {type(causal).__name__}")
    window_t = _per_head(fn, "window", window, Hkv, q.device, 1)
    sink_t = _per_head(fn, "sink", 0 if sink is None else sink, Hkv, q.device, 0)
    pad = torch.zeros(B, dtype=torch.int64, device=q.device) if pad is None else _index(fn, "pad", pad, (B,), q.device)
    scale = _scale(fn, scale, D)
    if _checking():
        if isinstance(window, torch.Tensor) and int(window_t.min()) < 1:
            raise ValueError(f"{fn}: window must be >= 1 for every KV head, got {window_t.tolist()}")
        if isinstance(sink, torch.Tensor) and int(sink_t.min()) < 0:
            raise ValueError(f"{fn}: sink must be >= 0 for every KV head, got {sink_t.tolist()}")
        if B and (int(pad.min()) < 0 or int(pad.max()) > L):
            raise ValueError(f"{fn}: pad must lie in [0, L={L}], got {pad.tolist()}")
    return torch.ops.effalg.band_attention(q, k, v, window_t, sink_t, pad, scale, causal)


def band_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    head_start: torch.Tensor,
    length: torch.Tensor,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """One decode step of band attention over a compact per-KV-head cache (MoA decode).

    Args:
        q: ``[B, Hq, D]`` queries of the new token.
        k_cache, v_cache: ``[B, T, D]`` in q's dtype; KV head ``h`` owns slots ``head_start[h] .. head_start[h+1]``
            (slot order within a segment is irrelevant).
        head_start: int64 ``[Hkv + 1]``, non-decreasing, ``head_start[0] == 0`` and ``head_start[-1] == T``.
        length: int64 ``[B, Hkv]``: query head ``h`` attends to the first ``length[b, h // n_rep]`` slots of its KV
            head's segment (``0 <= length <= capacity``; 0 outputs zeros).
        scale: softmax scale (default ``D ** -0.5``).

    Returns ``[B, Hq, D]`` in q's dtype.
    """
    fn = "band_decode_attention"
    _float(fn, "q", q, 3)
    _float(fn, "k_cache", k_cache, 3)
    _float(fn, "v_cache", v_cache, 3)
    B, Hq, D = q.shape
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(
            f"{fn}: k_cache and v_cache must have q's dtype {q.dtype}, got {k_cache.dtype} and {v_cache.dtype}"
        )
    if k_cache.shape[0] != B or k_cache.shape[2] != D:
        raise ValueError(f"{fn}: k_cache must have shape [B={B}, T, D={D}], got {tuple(k_cache.shape)}")
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"{fn}: v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.device != q.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but q is on {q.device}")
    T = k_cache.shape[1]
    if not isinstance(head_start, torch.Tensor) or head_start.dim() != 1 or head_start.shape[0] < 2:
        got = tuple(head_start.shape) if isinstance(head_start, torch.Tensor) else type(head_start).__name__
        raise ValueError(f"{fn}: head_start must be a 1-D int64 tensor [Hkv + 1] with Hkv >= 1, got {got}")
    Hkv = head_start.shape[0] - 1
    head_start = _index(fn, "head_start", head_start, (Hkv + 1,), q.device)
    if Hq % Hkv:
        raise ValueError(f"{fn}: the query heads Hq={Hq} must be a multiple of the KV heads Hkv={Hkv} (head_start)")
    length = _index(fn, "length", length, (B, Hkv), q.device)
    scale = _scale(fn, scale, D)
    if _checking():
        hs = head_start.tolist()
        if hs[0] != 0 or hs[-1] != T:
            raise ValueError(f"{fn}: head_start must start at 0 and end at T={T}, got {hs}")
        if any(b < a for a, b in zip(hs, hs[1:])):
            raise ValueError(f"{fn}: head_start must be non-decreasing, got {hs}")
        cap = head_start[1:] - head_start[:-1]
        if B and int(length.min()) < 0:
            raise ValueError(f"{fn}: length must be >= 0, got {length.tolist()}")
        if B and bool((length > cap).any()):
            raise ValueError(f"{fn}: length exceeds the segment capacity {cap.tolist()}: {length.tolist()}")
    return torch.ops.effalg.band_decode_attention(q, k_cache, v_cache, head_start, length, scale)
