"""Quantized 2-D convolutions computed as im2col + ``effalg.kernels.w8a8_linear`` (W8A8Conv2d) or
``effalg.kernels.wxa8_linear`` (WxA8Conv2d, MixDQ W8A8 / W4A8 / W2A8, static or dynamic activations).

``qweight`` is stored flattened as ``int8 [O, I * kh * kw]`` (the ``F.unfold`` column order), ``weight_scale`` fp32
``[O]``, ``bias`` ``[O]``, optional ``smooth_scale`` fp32 ``[I]`` (applied on the channel dim). Activations are
quantized dynamically per im2col row (one scale per output pixel's receptive field). 1x1 stride-1 convolutions skip
the unfold. Only ``groups == 1`` and ``padding_mode == "zeros"`` are supported.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

import effalg.kernels as _K
from effalg.kernels.cpu import wxa8_conv2d_cpu as _wxa8_conv2d_cpu

from ..quant.spec import Granularity, QuantSpec, compute_qparams, dequantize, quantize
from ._int8 import Int8PrepackMixin
from ._wxa8 import WXA8_FP32_BUFFERS, WxA8Mixin
from .base import QuantModuleBase, _check_smooth_scale

__all__ = ["QuantConv2d", "W8A8Conv2d", "WxA8Conv2d"]


class QuantConv2d(QuantModuleBase):
    """Base of quantized 2-D convolutions: geometry, bias, smooth scale on the channel dim."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        *,
        has_smooth_scale: bool = False,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{owner}: {name} must be a positive int, got {v!r}")
        if isinstance(padding, str):
            raise ValueError(f"{owner}: padding must be an int or pair of ints, got {padding!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        dtype = dtype or torch.get_default_dtype()
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_channels, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._init_smooth_scale(in_channels, has_smooth_scale, device)

    @property
    def reduction_size(self) -> int:
        """``I * kh * kw``, the K of the underlying GEMM."""
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def preprocess_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x * smooth_scale`` on the channel dim (dim 1), then ``input_transform``; keeps ``x.dtype``."""
        if self.smooth_scale is not None:
            x = x * self.smooth_scale.to(x.dtype).reshape(1, -1, 1, 1)
        if self.input_transform is not None:
            x = self.input_transform(x)
        return x

    @classmethod
    def _check_conv(cls, conv: nn.Conv2d) -> None:
        owner = f"{cls.__name__}.from_float"
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"{owner}: conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"{owner}: only groups=1 is supported, got groups={conv.groups}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"{owner}: only padding_mode='zeros' is supported, got {conv.padding_mode!r}")
        if isinstance(conv.padding, str):
            raise ValueError(f"{owner}: string padding {conv.padding!r} is not supported; use explicit ints")
        if conv.weight.is_meta:
            raise ValueError(f"{owner}: conv has meta weights; build the module on device='meta' and load a state dict")

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__}: x must be [B, {self.in_channels}, H, W], got {tuple(x.shape)}")

    def _unfold(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``[B, C, H, W]`` -> rows ``[B, L, C*kh*kw]`` and the output spatial size."""
        self._check_input(x)
        B, _, H, W = x.shape
        kh, kw = self.kernel_size
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if (kh, kw) == (1, 1) and (sh, sw) == (1, 1) and (ph, pw) == (0, 0):
            return x.permute(0, 2, 3, 1).reshape(B, H * W, self.in_channels), (Ho, Wo)
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # [B, C*kh*kw, L]
        return cols.transpose(1, 2), (Ho, Wo)

    @staticmethod
    def _fold_output(y: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        B, _, n_out = y.shape
        return y.transpose(1, 2).reshape(B, n_out, *size).contiguous()

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}"
        )
        extra = self._repr_extra()
        if extra:
            s += ", " + extra
        if self.smooth_scale is not None:
            s += ", smooth_scale=True"
        return s

    def _repr_extra(self) -> str:
        return ""


class W8A8Conv2d(Int8PrepackMixin, QuantConv2d):
    """int8 weights (symmetric, per output channel) x dynamic per-row int8 activations (im2col + ``w8a8_linear``).

    Same prepack/state-dict contract as :class:`~effalg.core.modules.W8A8Linear`.
    """

    weight_bits: ClassVar[int] = 8
    act_spec: ClassVar[QuantSpec] = QuantSpec(8, Granularity.TOKEN, 0, True, True)

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, *, has_smooth_scale: bool = False, device: Any = None,
                 dtype: torch.dtype | None = None) -> None:  # fmt: skip
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias,
                         has_smooth_scale=has_smooth_scale, device=device, dtype=dtype)  # fmt: skip
        k = self.reduction_size
        self.register_buffer("qweight", torch.zeros(out_channels, k, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_channels, dtype=torch.float32, device=device))
        self._prepacked = False

    @classmethod
    def from_float(
        cls, conv: nn.Conv2d, *, smooth_scale: torch.Tensor | None = None, prepack: bool = True
    ) -> W8A8Conv2d:
        """Quantize an ``nn.Conv2d`` (per output channel, symmetric). ``smooth_scale`` ``[I]``: the module computes
        ``x * smooth_scale`` on the channel dim and the weight is quantized as ``W / smooth_scale``."""
        cls._check_conv(conv)
        w = conv.weight.detach().float()
        if smooth_scale is not None:
            s = _check_smooth_scale(smooth_scale, conv.in_channels, f"{cls.__name__}.from_float")
            w = w / s.to(device=w.device, dtype=torch.float32).reshape(1, -1, 1, 1)
        mod = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)  # fmt: skip
        w2 = w.reshape(conv.out_channels, -1)
        spec = QuantSpec(8, Granularity.CHANNEL)
        scale, _ = compute_qparams(w2, spec)
        mod.qweight = quantize(w2, spec, scale)
        mod.weight_scale = scale.float()
        if conv.bias is not None:
            mod.bias.data.copy_(conv.bias.detach())
        if smooth_scale is not None:
            mod.set_smooth_scale(smooth_scale)
        if prepack:
            mod.prepack_()
        return mod

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float ``[O, I, kh, kw]`` weight applied to the preprocessed input (for tests/debug)."""
        w = dequantize(self.plain_qweight(), QuantSpec(8, Granularity.CHANNEL), self.weight_scale, dtype=dtype)
        return w.reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preprocess_input(x)
        rows, size = self._unfold(x)
        y = _K.w8a8_linear(rows, self.qweight, self.weight_scale, self.bias)
        return self._fold_output(y, size)

    def _repr_extra(self) -> str:
        return f"w8a8, prepacked={self._prepacked}"


class WxA8Conv2d(WxA8Mixin, QuantConv2d):
    """MixDQ W8A8 / W4A8 / W2A8 convolution: im2col + ``effalg.kernels.wxa8_linear``. ``qweight`` holds the
    flattened ``[O, I * kh * kw]`` codes (int8, or packed uint8 for 2/4 bits); static activations quantize the
    zero padding to ``act_zero``, which the ``weight_rowsum`` correction cancels (MixDQ's padding propagation).
    On the CPU (eager) the same result comes from :func:`effalg.kernels.cpu.wxa8_conv2d_cpu` (int8 im2col, no
    transposes); under ``torch.compile`` and on other devices from the unfold and the op."""

    _fp32_buffers: ClassVar[tuple[str, ...]] = WXA8_FP32_BUFFERS

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, *, weight_bits: int = 8, static_act: bool = False, has_smooth_scale: bool = False,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:  # fmt: skip
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias,
                         has_smooth_scale=has_smooth_scale, device=device, dtype=dtype)  # fmt: skip
        self._init_wxa8(out_channels, self.reduction_size, weight_bits, static_act, device)

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        *,
        weight_bits: int = 8,
        act_scale: Any = None,
        act_zero: Any = None,
        smooth_scale: torch.Tensor | None = None,
    ) -> WxA8Conv2d:
        """Quantize an ``nn.Conv2d`` (per output channel, symmetric, ``weight_bits`` in {2, 4, 8}); ``act_scale`` /
        ``act_zero`` as in :meth:`WxA8Linear.from_float`; ``smooth_scale`` as in :meth:`W8A8Conv2d.from_float`."""
        cls._check_conv(conv)
        if act_scale is None and act_zero is not None:
            raise ValueError(f"{cls.__name__}.from_float: act_zero requires act_scale")
        w = conv.weight.detach().float()
        if smooth_scale is not None:
            s = _check_smooth_scale(smooth_scale, conv.in_channels, f"{cls.__name__}.from_float")
            w = w / s.to(device=w.device, dtype=torch.float32).reshape(1, -1, 1, 1)
        mod = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.bias is not None, weight_bits=weight_bits, device=conv.weight.device,
                  dtype=conv.weight.dtype)  # fmt: skip
        mod._set_wxa8_weight(w.reshape(conv.out_channels, -1))
        if act_scale is not None:
            mod.set_act_qparams(act_scale, act_zero)
        if conv.bias is not None:
            mod.bias.data.copy_(conv.bias.detach())
        if smooth_scale is not None:
            mod.set_smooth_scale(smooth_scale)
        return mod

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float ``[O, I, kh, kw]`` weight applied to the preprocessed input (for tests/debug)."""
        return self._dequantized_2d(dtype).reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preprocess_input(x)
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            self._check_input(x)  # same result as below, without float im2col or transposes
            return _wxa8_conv2d_cpu(
                x, self.qweight, self.weight_scale, self._weight_bits, self.act_scale, self.act_zero,
                self.weight_rowsum, self.bias, self.kernel_size, self.stride, self.padding, self.dilation,
            )  # fmt: skip
        rows, size = self._unfold(x)
        return self._fold_output(self._wxa8(rows), size)

    def _repr_extra(self) -> str:
        return self._wxa8_repr()
