"""Buffers and math shared by the MixDQ W8A8 / W4A8 / W2A8 modules (``WxA8Linear``, ``WxA8Conv2d``)."""

from __future__ import annotations

from typing import Any

import torch

import effalg.kernels as _K
from effalg.kernels.packing import pack_int2_symmetric, pack_int4_symmetric, packed_size
from effalg.kernels.reference import unpack_wxa8_weight

from ..quant.spec import Granularity, QuantSpec, compute_qparams, quantize

__all__ = ["WxA8Mixin", "WXA8_FP32_BUFFERS"]

WXA8_FP32_BUFFERS = ("weight_scale", "smooth_scale", "act_scale")


def _check_bits(owner: str, bits: Any) -> int:
    if isinstance(bits, bool) or bits not in _K.WXA8_BITS:
        raise ValueError(f"{owner}: weight_bits must be one of {_K.WXA8_BITS}, got {bits!r}")
    return bits


class WxA8Mixin:
    """``qweight`` (int8 ``[N, K]`` for 8 bits, else packed uint8 ``[N, ceil(K * bits / 8)]``), ``weight_scale``
    fp32 ``[N]``; with static activations also ``act_scale`` fp32 ``[1]``, ``act_zero`` int32 ``[1]`` (int8 code
    domain, 0 for symmetric) and ``weight_rowsum`` int32 ``[N]``. Put it before the nn.Module base."""

    _weight_bits: int

    def _init_wxa8(self, n: int, k: int, weight_bits: int, static_act: bool, device: Any) -> None:
        self._weight_bits = _check_bits(type(self).__name__, weight_bits)
        self._k = k
        dtype = torch.int8 if weight_bits == 8 else torch.uint8
        self.register_buffer("qweight", torch.zeros(n, packed_size(k, weight_bits), dtype=dtype, device=device))
        self.register_buffer("weight_scale", torch.ones(n, dtype=torch.float32, device=device))
        self._init_act_buffers(static_act, device)

    def _init_act_buffers(self, static_act: bool, device: Any) -> None:
        n = self.qweight.shape[0]
        self.register_buffer("weight_rowsum", torch.zeros(n, dtype=torch.int32, device=device) if static_act else None)
        self.register_buffer("act_scale", torch.ones(1, dtype=torch.float32, device=device) if static_act else None)
        self.register_buffer("act_zero", torch.zeros(1, dtype=torch.int32, device=device) if static_act else None)

    @property
    def weight_bits(self) -> int:
        return self._weight_bits

    @property
    def static_act(self) -> bool:
        return self.act_scale is not None

    @property
    def act_spec(self) -> QuantSpec:
        if self.static_act:
            return QuantSpec(8, Granularity.TENSOR, 0, False, False)
        return QuantSpec(8, Granularity.TOKEN, 0, True, True)

    def _weight_spec(self) -> QuantSpec:
        return QuantSpec(self._weight_bits, Granularity.CHANNEL, 0, True)

    def _set_wxa8_weight(self, w2: torch.Tensor) -> None:
        """Quantize a float ``[N, K]`` weight: min-max symmetric per output channel (MixDQ), codes ``[-n, n]``."""
        spec = self._weight_spec()
        scale, _ = compute_qparams(w2, spec)
        q = quantize(w2, spec, scale)
        pack = {8: lambda t: t, 4: pack_int4_symmetric, 2: pack_int2_symmetric}[self._weight_bits]
        self.qweight = pack(q).contiguous()
        self.weight_scale = scale.reshape(-1).float()
        if self.weight_rowsum is not None:
            self.weight_rowsum = _K.weight_rowsum(q)

    def set_act_qparams(self, act_scale: Any, act_zero: Any = None) -> None:
        """Set static per-tensor activation parameters (``q = clamp(round(x / act_scale) + act_zero, -128, 127)``);
        ``act_scale=None`` switches to dynamic per-token activations."""
        owner = type(self).__name__
        dev = self.qweight.device
        if act_scale is None:
            if act_zero is not None:
                raise ValueError(f"{owner}: act_zero requires act_scale")
            self._init_act_buffers(False, dev)
            return
        s = torch.as_tensor(act_scale, dtype=torch.float32).reshape(-1).to(dev)
        if s.numel() != 1 or not (torch.isfinite(s).all() and (s > 0).all()):
            raise ValueError(f"{owner}: act_scale must be one finite positive value, got {act_scale!r}")
        z = torch.as_tensor(0 if act_zero is None else act_zero).reshape(-1)
        zf = float(z[0]) if z.numel() == 1 else 0.5
        if not zf.is_integer() or not -128 <= zf <= 127:
            raise ValueError(f"{owner}: act_zero must be one integer in [-128, 127], got {act_zero!r}")
        q = self.qweight_codes()
        self._init_act_buffers(True, dev)
        self.act_scale = s
        self.act_zero = z.to(device=dev, dtype=torch.int32)
        self.weight_rowsum = _K.weight_rowsum(q)

    def qweight_codes(self) -> torch.Tensor:
        """The int8 ``[N, K]`` weight codes."""
        return unpack_wxa8_weight(self.qweight, self._weight_bits, self._k)

    def _dequantized_2d(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.qweight_codes().to(torch.float64) * self.weight_scale.to(torch.float64)[:, None]).to(dtype)

    def _wxa8(self, x: torch.Tensor) -> torch.Tensor:
        return _K.wxa8_linear(
            x, self.qweight, self.weight_scale, self._weight_bits, self.act_scale, self.act_zero, self.weight_rowsum,
            self.bias,
        )  # fmt: skip

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Accept static activation parameters even if the module was built for dynamic activations.
        if self.act_scale is None and prefix + "act_scale" in state_dict:
            self._init_act_buffers(True, self.qweight.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _wxa8_repr(self) -> str:
        act = "static" if self.static_act else "dynamic"
        return f"w{self._weight_bits}a8, act={act}"
