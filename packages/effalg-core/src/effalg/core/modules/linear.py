"""Quantized linear layers holding packed integer weights and calling ``effalg.kernels``.

State-dict layout (stable; plain tensors only):

=================  ==============================  ======================================  ===========================
module             ``qweight``                     ``weight_scale`` (fp32)                 ``weight_zero`` (fp32)
=================  ==============================  ======================================  ===========================
W8A8Linear         int8 ``[N, K]``                 ``[N]``                                 --
W4A8Linear         uint8 ``[N, K // 2]``           ``[N, G]``                              --
WeightOnlyLinear   uint8 ``[N, ceil(K*bits/8)]``   ``[N, G]``                              ``[N, G]``
WxA8Linear         int8 ``[N, K]`` / uint8 packed  ``[N]``                                 --
=================  ==============================  ======================================  ===========================

plus ``bias`` (float ``[N]``, a frozen Parameter, in the model dtype) and optional ``smooth_scale`` (fp32 ``[K]``).
``WxA8Linear`` with static activations also holds ``weight_rowsum`` (int32 ``[N]``), ``act_scale`` (fp32 ``[1]``)
and ``act_zero`` (int32 ``[1]``).
``G = 1`` for per-output-channel scales (``group_size == 0``) else ``K // group_size``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

import effalg.kernels as _K
from effalg.kernels.packing import pack_bits, pack_int4_symmetric, packed_size, unpack_bits, unpack_int4_symmetric

from ..quant.rotation import HadamardRotation
from ..quant.spec import Granularity, QuantSpec, compute_qparams, dequantize, quantize
from ._int8 import Int8PrepackMixin
from ._weight_only import WeightOnlyPrepackMixin
from ._wxa8 import WXA8_FP32_BUFFERS, WxA8Mixin
from .base import QuantModuleBase, _check_smooth_scale

__all__ = ["QuantLinear", "W8A8Linear", "W4A8Linear", "WeightOnlyLinear", "WxA8Linear", "FROM_FLOAT_CHUNK_NUMEL"]

#: ``from_float`` quantizes larger weights in blocks of output rows of about this many elements (16 MiB in float32),
#: so a 4096 x 11008 layer never holds a full float32 copy; every weight format here is row-local (per output
#: channel or per group along K), so the codes are the same as in one piece.
FROM_FLOAT_CHUNK_NUMEL = 1 << 22


def _check_dims(owner: str, in_features: Any, out_features: Any) -> None:
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{owner}: {name} must be a positive int, got {v!r}")


def _check_group(owner: str, in_features: int, group_size: Any) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0:
        raise ValueError(f"{owner}: group_size must be an int >= 0, got {group_size!r}")
    if group_size and in_features % group_size:
        raise ValueError(f"{owner}: in_features ({in_features}) must be divisible by group_size ({group_size})")
    return 1 if group_size == 0 else in_features // group_size


def _weight_spec(bits: int, group_size: int, symmetric: bool = True) -> QuantSpec:
    if group_size:
        return QuantSpec(bits, Granularity.GROUP, group_size, symmetric)
    return QuantSpec(bits, Granularity.CHANNEL, 0, symmetric)


class QuantLinear(QuantModuleBase):
    """Base of the quantized linear layers (``in_features``, ``out_features``, optional ``bias``).

    Subclasses define the weight buffers, ``forward`` and ``_quantize_weight``. ``from_float`` is shared.

    Empty construction for loading a checkpoint (e.g. on ``device="meta"``): ``has_smooth_scale=True`` creates the
    ``smooth_scale`` buffer and ``input_rotation_block=b`` a :class:`HadamardRotation` ``input_transform`` with block
    ``b`` whose ``signs`` come from the state dict key ``input_transform.signs`` (``b`` is not in the state dict: use
    the ``block_size`` of the rotation the layer was quantized with, ``hadamard_block_size(in_features)`` by default).
    """

    weight_bits: ClassVar[int] = 8
    act_spec: ClassVar[QuantSpec | None] = None  # activation quantization done by the kernel (None = float)
    #: The tensors ``_set_weight_from_float`` sets, output rows first (concatenated over row blocks).
    _weight_tensor_names: ClassVar[tuple[str, ...]] = ("qweight", "weight_scale")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        has_smooth_scale: bool = False,
        input_rotation_block: int | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_dims(type(self).__name__, in_features, out_features)
        self.in_features = in_features
        self.out_features = out_features
        dtype = dtype or torch.get_default_dtype()
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._init_smooth_scale(in_features, has_smooth_scale, device)
        if input_rotation_block is not None:
            # Placeholder rotation (signs loaded from the state dict key ``input_transform.signs``).
            self.set_input_transform(HadamardRotation(in_features, input_rotation_block, device=device))

    # ---- construction from a float layer -----------------------------------------------------------------------
    @classmethod
    def _prepare_float_weight(
        cls, w: torch.Tensor, smooth_scale: torch.Tensor | None, input_transform: nn.Module | None
    ) -> torch.Tensor:
        """float32 rows of the weight as they are quantized (smoothed, transformed); row-local, so it may take any
        block of rows."""
        w = w.detach().float()
        if smooth_scale is not None:
            w = w / smooth_scale.to(device=w.device, dtype=torch.float32)[None, :]
        if input_transform is not None:
            shape = w.shape
            with torch.no_grad():
                w = input_transform(w).float()
            if w.shape != shape:
                raise ValueError(
                    f"{cls.__name__}.from_float: input_transform changed the weight shape to {tuple(w.shape)}"
                )
        return w

    def _finish_from_float(
        self, linear: nn.Linear, smooth_scale: torch.Tensor | None, input_transform: nn.Module | None
    ) -> None:
        if linear.bias is not None:
            self.bias.data.copy_(linear.bias.detach())
        if smooth_scale is not None:
            self.set_smooth_scale(smooth_scale)
        if input_transform is not None:
            self.set_input_transform(input_transform)

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        *,
        smooth_scale: torch.Tensor | None = None,
        input_transform: nn.Module | None = None,
        **kwargs: Any,
    ) -> QuantLinear:
        """Quantize ``linear`` (min-max, symmetric, per output channel unless ``group_size``) into a new module on
        ``linear``'s device; ``bias`` keeps ``linear``'s dtype.

        Args:
            smooth_scale: optional ``[K]`` positive per-input-channel scale; the module computes
                ``x * smooth_scale`` before quantizing ``x`` and the weight is quantized as ``W / smooth_scale``.
            input_transform: optional nn.Module applied to the (smoothed) input; it must be a linear map acting on
                the last dim that is orthogonal (e.g. a Hadamard rotation ``x @ R``), so the weight is quantized as
                ``input_transform(W)``.
            **kwargs: subclass options (``group_size``, ``bits``, ``symmetric``, ``prepack``).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_float: linear must be an nn.Linear, got {type(linear).__name__}")
        if linear.weight.is_meta:
            raise ValueError(
                f"{cls.__name__}.from_float: linear has meta weights; build {cls.__name__}(..., device='meta') "
                "and load a quantized state dict instead"
            )
        if smooth_scale is not None:
            smooth_scale = _check_smooth_scale(smooth_scale, linear.in_features, f"{cls.__name__}.from_float")
        options = {k: v for k, v in kwargs.items() if k != "prepack"}
        n, k, weight = linear.out_features, linear.in_features, linear.weight
        mod = cls(k, n, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype, **options)
        rows = max(1, FROM_FLOAT_CHUNK_NUMEL // k)
        if rows >= n:
            mod._set_weight_from_float(cls._prepare_float_weight(weight, smooth_scale, input_transform))
        else:  # row blocks: the float32 copy and the quantizer's temporaries stay bounded (every format is row-local)
            parts: dict[str, list[torch.Tensor]] = {}
            for r0 in range(0, n, rows):
                block = cls(k, min(rows, n - r0), bias=False, device="meta", dtype=weight.dtype, **options)
                block._set_weight_from_float(cls._prepare_float_weight(weight[r0 : r0 + rows], smooth_scale,
                                                                       input_transform))  # fmt: skip
                for name in mod._weight_tensor_names:
                    if getattr(block, name, None) is not None:
                        parts.setdefault(name, []).append(getattr(block, name))
            for name, ts in parts.items():
                setattr(mod, name, torch.cat(ts))
        mod._finish_from_float(linear, smooth_scale, input_transform)
        if kwargs.get("prepack", True):
            mod.prepack_()
        return mod

    def _set_weight_from_float(self, w: torch.Tensor) -> None:  # pragma: no cover - abstract
        """Set the tensors named in ``_weight_tensor_names`` (each with the output rows first) from float rows."""
        raise NotImplementedError

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float ``[N, K]`` weight that the kernel effectively applies to the preprocessed input (for tests/debug)."""
        raise NotImplementedError

    def _repr_extra(self) -> str:
        return ""

    def extra_repr(self) -> str:
        parts = [
            f"in_features={self.in_features}",
            f"out_features={self.out_features}",
            f"bias={self.bias is not None}",
        ]
        extra = self._repr_extra()
        if extra:
            parts.append(extra)
        if self.smooth_scale is not None:
            parts.append("smooth_scale=True")
        return ", ".join(parts)


class W8A8Linear(Int8PrepackMixin, QuantLinear):
    """int8 weights (symmetric, per output channel) x dynamic per-token int8 activations (``effalg.kernels.w8a8_linear``).

    On CPU, :meth:`prepack_` (called by ``from_float`` and to be called by integrations after loading a state dict)
    replaces ``qweight`` by the oneDNN-prepacked layout in place; the state dict always holds the plain ``int8 [N, K]``
    layout, loading accepts it, and moving the module off CPU unpacks first. Outputs are identical either way.
    """

    weight_bits: ClassVar[int] = 8
    act_spec: ClassVar[QuantSpec] = QuantSpec(8, Granularity.TOKEN, 0, True, True)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        has_smooth_scale: bool = False,
        input_rotation_block: int | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            bias,
            has_smooth_scale=has_smooth_scale,
            input_rotation_block=input_rotation_block,
            device=device,
            dtype=dtype,
        )
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self._prepacked = False

    @classmethod
    def from_float(
        cls, linear: nn.Linear, *, smooth_scale=None, input_transform=None, prepack: bool = True
    ) -> W8A8Linear:
        """Quantize an ``nn.Linear``; see :meth:`QuantLinear.from_float`. ``prepack``: call :meth:`prepack_` (CPU)."""
        return super().from_float(linear, smooth_scale=smooth_scale, input_transform=input_transform, prepack=prepack)

    def _set_weight_from_float(self, w: torch.Tensor) -> None:
        spec = _weight_spec(8, 0)
        scale, _ = compute_qparams(w, spec)
        self.qweight = quantize(w, spec, scale)
        self.weight_scale = scale.float()

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        spec = _weight_spec(8, 0)
        return dequantize(self.plain_qweight(), spec, self.weight_scale, None, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preprocess_input(x)
        return _K.w8a8_linear(x, self.qweight, self.weight_scale, self.bias)

    def _repr_extra(self) -> str:
        return f"w8a8, prepacked={self._prepacked}"


class W4A8Linear(QuantLinear):
    """int4 weights (symmetric, per channel or per group along K, packed two per byte) x dynamic per-token int8
    activations (``effalg.kernels.w4a8_linear``)."""

    weight_bits: ClassVar[int] = 4
    act_spec: ClassVar[QuantSpec] = QuantSpec(8, Granularity.TOKEN, 0, True, True)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        group_size: int = 0,
        has_smooth_scale: bool = False,
        input_rotation_block: int | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            bias,
            has_smooth_scale=has_smooth_scale,
            input_rotation_block=input_rotation_block,
            device=device,
            dtype=dtype,
        )
        if in_features % 2:
            raise ValueError(f"W4A8Linear: in_features must be even (two int4 codes per byte), got {in_features}")
        n_groups = _check_group("W4A8Linear", in_features, group_size)
        self.group_size = group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, n_groups, dtype=torch.float32, device=device))

    @classmethod
    def from_float(
        cls, linear: nn.Linear, *, group_size: int = 0, smooth_scale=None, input_transform=None, prepack: bool = True
    ) -> W4A8Linear:
        """Quantize an ``nn.Linear``; see :meth:`QuantLinear.from_float`."""
        return super().from_float(
            linear, smooth_scale=smooth_scale, input_transform=input_transform, group_size=group_size, prepack=prepack
        )

    def _set_weight_from_float(self, w: torch.Tensor) -> None:
        spec = _weight_spec(4, self.group_size)
        scale, _ = compute_qparams(w, spec)
        self.qweight = pack_int4_symmetric(quantize(w, spec, scale))
        self.weight_scale = scale.reshape(self.out_features, -1).float()

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = unpack_int4_symmetric(self.qweight, self.in_features)
        return dequantize(q, _weight_spec(4, self.group_size), self.weight_scale, None, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preprocess_input(x)
        return _K.w4a8_linear(x, self.qweight, self.weight_scale, self.group_size, self.bias)

    def _repr_extra(self) -> str:
        return f"w4a8, group_size={self.group_size}"


class WeightOnlyLinear(WeightOnlyPrepackMixin, QuantLinear):
    """3/4/8-bit packed unsigned weight codes with per-channel or per-group ``weight_scale``/``weight_zero``, float
    activations (``effalg.kernels.weight_only_linear``: ``W = (u - zero) * scale``).

    Symmetric weights are stored as ``u = q + 2**(bits-1)`` with ``zero = 2**(bits-1)``, so both modes share one layout.
    On CPU, :meth:`prepack_` (called by ``from_float`` and by integrations after loading a state dict) replaces
    ``qweight`` in place by a runtime layout where one is faster on this machine (``effalg.kernels.
    weight_only_cpu_layout``: torch's int4pack for W4 without the native kernels, which run on the canonical layout;
    ``prepack_(layout="blocked")`` for batched decode); the state dict always holds the canonical layout, loading
    accepts it, moving off CPU unpacks first.
    """

    act_spec: ClassVar[None] = None
    _ALLOWED_BITS: ClassVar[tuple[int, ...]] = (3, 4, 8)
    _weight_tensor_names: ClassVar[tuple[str, ...]] = ("qweight", "weight_scale", "weight_zero")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        bits: int = 4,
        group_size: int = 0,
        symmetric: bool = True,
        has_smooth_scale: bool = False,
        input_rotation_block: int | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            bias,
            has_smooth_scale=has_smooth_scale,
            input_rotation_block=input_rotation_block,
            device=device,
            dtype=dtype,
        )
        if isinstance(bits, bool) or bits not in self._ALLOWED_BITS:
            raise ValueError(f"WeightOnlyLinear: bits must be one of {{3, 4, 8}}, got {bits!r}")
        n_groups = _check_group("WeightOnlyLinear", in_features, group_size)
        self.bits = bits
        self.group_size = group_size
        self.symmetric = bool(symmetric)
        row = packed_size(in_features, bits)
        self.register_buffer("qweight", torch.zeros(out_features, row, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, n_groups, dtype=torch.float32, device=device))
        self.register_buffer(
            "weight_zero",
            torch.full((out_features, n_groups), float(2 ** (bits - 1)), dtype=torch.float32, device=device),
        )
        self._packed_layout = None

    @property
    def weight_bits(self) -> int:  # type: ignore[override]
        return self.bits

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        *,
        bits: int = 4,
        group_size: int = 0,
        symmetric: bool = True,
        smooth_scale=None,
        input_transform=None,
        prepack: bool = True,
    ) -> WeightOnlyLinear:
        """Quantize an ``nn.Linear``; see :meth:`QuantLinear.from_float`."""
        return super().from_float(
            linear,
            smooth_scale=smooth_scale,
            input_transform=input_transform,
            bits=bits,
            group_size=group_size,
            symmetric=symmetric,
            prepack=prepack,
        )

    def _set_weight_from_float(self, w: torch.Tensor) -> None:
        spec = _weight_spec(self.bits, self.group_size, self.symmetric)
        scale, zero = compute_qparams(w, spec)
        q = quantize(w, spec, scale, zero)
        if self.symmetric:
            offset = 2 ** (self.bits - 1)
            u = (q.to(torch.int16) + offset).to(torch.uint8)
            zero = torch.full_like(scale, float(offset))
        else:
            u = q
        self.qweight = pack_bits(u, self.bits)
        self._packed_layout = None  # a fresh canonical weight (prepack_ again for the runtime layout)
        self.weight_scale = scale.reshape(self.out_features, -1).float()
        self.weight_zero = zero.reshape(self.out_features, -1).float()

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        u = unpack_bits(self.plain_qweight(), self.bits, self.in_features)
        spec = _weight_spec(self.bits, self.group_size, symmetric=False)
        return dequantize(u, spec, self.weight_scale, self.weight_zero, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preprocess_input(x)
        if self._packed_layout is not None:
            return _K.weight_only_linear_packed(
                x,
                self.qweight,
                self.weight_scale,
                self.weight_zero,
                self.bits,
                self.group_size,
                self._packed_layout,
                self.out_features,
                self.bias,
            )
        return _K.weight_only_linear(
            x, self.qweight, self.weight_scale, self.weight_zero, self.bits, self.group_size, self.bias
        )

    def _repr_extra(self) -> str:
        layout = f", layout={self._packed_layout}" if self._packed_layout else ""
        return f"w{self.bits}a16, group_size={self.group_size}, symmetric={self.symmetric}{layout}"


class WxA8Linear(WxA8Mixin, QuantLinear):
    """MixDQ W8A8 / W4A8 / W2A8 linear (``effalg.kernels.wxa8_linear``): symmetric per-output-channel
    ``weight_bits``-bit weights (2-bit packed four per byte) x int8 activations, static per-tensor asymmetric
    (``act_scale``, ``act_zero``, folded into the epilogue through ``weight_rowsum``) or dynamic per token."""

    _fp32_buffers: ClassVar[tuple[str, ...]] = WXA8_FP32_BUFFERS
    _weight_tensor_names: ClassVar[tuple[str, ...]] = ("qweight", "weight_scale", "weight_rowsum")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_bits: int = 8,
        static_act: bool = False,
        has_smooth_scale: bool = False,
        input_rotation_block: int | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            bias,
            has_smooth_scale=has_smooth_scale,
            input_rotation_block=input_rotation_block,
            device=device,
            dtype=dtype,
        )
        self._init_wxa8(out_features, in_features, weight_bits, static_act, device)

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        *,
        weight_bits: int = 8,
        act_scale: Any = None,
        act_zero: Any = None,
        smooth_scale=None,
        input_transform=None,
        prepack: bool = True,
    ) -> WxA8Linear:
        """Quantize an ``nn.Linear`` (see :meth:`QuantLinear.from_float`). ``act_scale`` (and ``act_zero``, an
        integer in [-128, 127]) select static per-tensor activations; None: dynamic per token."""
        mod = super().from_float(
            linear,
            smooth_scale=smooth_scale,
            input_transform=input_transform,
            weight_bits=weight_bits,
            static_act=act_scale is not None,
            prepack=prepack,
        )
        if act_scale is not None:
            mod.set_act_qparams(act_scale, act_zero)
        elif act_zero is not None:
            raise ValueError("WxA8Linear.from_float: act_zero requires act_scale")
        return mod

    def _set_weight_from_float(self, w: torch.Tensor) -> None:
        self._set_wxa8_weight(w)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._dequantized_2d(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._wxa8(self.preprocess_input(x))

    def _repr_extra(self) -> str:
        return self._wxa8_repr()
