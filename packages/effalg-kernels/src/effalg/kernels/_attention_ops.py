"""Schemas of the band attention ops (``torch.ops.effalg.band_*``) with fake kernels.

The default implementation for every device is the reference (:mod:`effalg.kernels.attention_reference`); the
fast CPU path (:mod:`effalg.kernels.attention_cpu`) and Triton (:mod:`effalg.kernels.triton.band_attention`)
override it for ``"cpu"`` / ``"cuda"``. Call them through :mod:`effalg.kernels.attention`, which validates.
"""

from __future__ import annotations

import torch

from . import attention_reference as _ref

__all__ = ["band_attention", "band_decode_attention"]


@torch.library.custom_op("effalg::band_attention", mutates_args=())
def band_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: torch.Tensor,
    sink: torch.Tensor,
    pad: torch.Tensor,
    scale: float,
    causal: bool,
) -> torch.Tensor:
    return _ref.band_attention_ref(q, k, v, window, sink, pad, scale, causal)


@band_attention.register_fake
def _(q, k, v, window, sink, pad, scale, causal):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("effalg::band_decode_attention", mutates_args=())
def band_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    head_start: torch.Tensor,
    length: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return _ref.band_decode_attention_ref(q, k_cache, v_cache, head_start, length, scale)


@band_decode_attention.register_fake
def _(q, k_cache, v_cache, head_start, length, scale):
    return q.new_empty((*q.shape[:-1], v_cache.shape[-1]))
