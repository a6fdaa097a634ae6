"""Quantized modules holding packed integer weights (compute through ``effalg.kernels``)."""

from .base import (
    QuantModuleBase,
    buffers_to_parameters_,
    memory_footprint,
    offload_hooked,
    parameters_to_buffers_,
    prepack_model_,
    unpack_model_,
)
from .bos import BOSAwareWxA8Linear
from .conv import QuantConv2d, W8A8Conv2d, WxA8Conv2d
from .linear import QuantLinear, W4A8Linear, W8A8Linear, WeightOnlyLinear, WxA8Linear
from .split import InputSplitConv2d

__all__ = [
    "QuantModuleBase",
    "QuantLinear",
    "W8A8Linear",
    "W4A8Linear",
    "WeightOnlyLinear",
    "WxA8Linear",
    "QuantConv2d",
    "W8A8Conv2d",
    "WxA8Conv2d",
    "BOSAwareWxA8Linear",
    "InputSplitConv2d",
    "memory_footprint",
    "prepack_model_",
    "buffers_to_parameters_",
    "parameters_to_buffers_",
    "offload_hooked",
    "unpack_model_",
]
