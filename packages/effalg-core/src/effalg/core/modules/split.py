"""Convolution over a channel concatenation, quantized per channel range (MixDQ / Q-Diffusion shortcut split)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .base import QuantModuleBase
from .conv import WxA8Conv2d

__all__ = ["InputSplitConv2d"]


class InputSplitConv2d(QuantModuleBase):
    """``conv(cat([x0, x1, ...], dim=1))`` computed as ``sum_i parts[i](x_i)``: one :class:`WxA8Conv2d` per input
    channel range (``split_sizes``), each with its own weight scales and static activation range; the bias is in
    ``parts[0]``. For UNet up-block layers whose input concatenates a skip connection: the two halves have very
    different ranges, and one per-tensor range for both wastes most int8 levels on one of them."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = True,
        *,
        split_sizes: Sequence[int],
        weight_bits: int = 8,
        static_act: bool = False,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        sizes = [int(s) for s in split_sizes]
        if len(sizes) < 2 or any(s <= 0 for s in sizes) or sum(sizes) != in_channels:
            raise ValueError(
                f"InputSplitConv2d: split_sizes must be >= 2 positive sizes summing to in_channels={in_channels}, "
                f"got {list(split_sizes)}"
            )
        self.in_channels, self.out_channels, self.split_sizes = in_channels, out_channels, sizes
        self.parts = nn.ModuleList(
            WxA8Conv2d(
                s,
                out_channels,
                kernel_size,
                stride,
                padding,
                dilation,
                bias=bias and i == 0,
                weight_bits=weight_bits,
                static_act=static_act,
                device=device,
                dtype=dtype,
            )  # fmt: skip
            for i, s in enumerate(sizes)
        )
        self.kernel_size, self.stride = self.parts[0].kernel_size, self.parts[0].stride
        self.padding, self.dilation = self.parts[0].padding, self.parts[0].dilation

    @property
    def weight_bits(self) -> int:
        return self.parts[0].weight_bits

    @property
    def bias(self) -> torch.Tensor | None:
        return self.parts[0].bias

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        split_sizes: Sequence[int],
        *,
        weight_bits: int = 8,
        act_qparams: Sequence[tuple[Any, Any]] | None = None,
    ) -> InputSplitConv2d:
        """Quantize ``conv`` per input channel range; ``act_qparams`` holds one static ``(act_scale, act_zero)`` per
        range (None: dynamic per-token activations)."""
        WxA8Conv2d._check_conv(conv)
        mod = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.bias is not None, split_sizes=split_sizes, weight_bits=weight_bits, device="meta",
                  dtype=conv.weight.dtype)  # fmt: skip
        if act_qparams is not None and len(act_qparams) != len(mod.split_sizes):
            raise ValueError(
                f"InputSplitConv2d.from_float: need {len(mod.split_sizes)} act_qparams, got {len(act_qparams)}"
            )
        parts, start = [], 0
        for i, s in enumerate(mod.split_sizes):
            sub = nn.Conv2d(s, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                            bias=conv.bias is not None and i == 0, device=conv.weight.device,
                            dtype=conv.weight.dtype)  # fmt: skip
            with torch.no_grad():
                sub.weight.copy_(conv.weight[:, start : start + s])
                if sub.bias is not None:
                    sub.bias.copy_(conv.bias)
            start += s
            sa, za = act_qparams[i] if act_qparams is not None else (None, None)
            parts.append(WxA8Conv2d.from_float(sub, weight_bits=weight_bits, act_scale=sa, act_zero=za))
        mod.parts = nn.ModuleList(parts)
        return mod

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float ``[O, I, kh, kw]`` weight (the parts' weights concatenated)."""
        return torch.cat([p.dequantize_weight(dtype) for p in self.parts], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"InputSplitConv2d: x must be [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        out = None
        for part, xi in zip(self.parts, x.split(self.split_sizes, dim=1)):
            y = part(xi)
            out = y if out is None else out + y
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, split_sizes={self.split_sizes}, "
            f"w{self.weight_bits}a8"
        )
