"""Quantization specs and the reference tensor math (qparams, quantize, dequantize, fake-quantize).

Conventions (shared by every effalg method):

* Symmetric: ``n = 2**(bits-1) - 1``, ``scale = max(absmax, 1e-8) / n``, integer codes ``q = clamp(round(x / scale),
  -n, n)`` returned as ``int8``; ``zero`` is ``None``. (The restricted range ``[-n, n]`` is a subset of every kernel's
  accepted range, e.g. int4 ``[-8, 7]``.)
* Asymmetric: ``lo = min(xmin, 0)``, ``hi = max(xmax, 0)``, ``scale = max(hi - lo, 1e-8) / (2**bits - 1)``,
  ``zero = clamp(round(-lo / scale), 0, 2**bits - 1)`` (an integer value stored in a float tensor), codes
  ``u = clamp(round(x / scale) + zero, 0, 2**bits - 1)`` returned as ``uint8``; ``x ≈ (u - zero) * scale``.
* Rounding is ``torch.round`` (round half to even), like the kernels.

Shapes of ``scale``/``zero`` by granularity, for ``x`` of shape ``[..., K]``:

* ``tensor``: 0-dim;
* ``channel``: ``[x.shape[0]]`` (one per output channel of a weight ``[N, K]`` or conv weight ``[O, I, kh, kw]``);
* ``token``: ``x.shape[:-1]`` (one per row of the last dim);
* ``group``: ``x.shape[:-1] + (K // group_size,)`` (contiguous groups along the last dim).

These match the kernel layouts (``w_scale [N]``, ``scale [N, G]``, per-token ``[..., 1]`` after ``unsqueeze(-1)``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

__all__ = [
    "ALLOWED_BITS",
    "Granularity",
    "QuantSpec",
    "compute_qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
]

ALLOWED_BITS = (2, 3, 4, 8)
_EPS = 1e-8


class Granularity(str, enum.Enum):
    """How many quantization parameters a tensor gets (see module docstring for shapes)."""

    TENSOR = "tensor"
    CHANNEL = "channel"
    TOKEN = "token"
    GROUP = "group"

    def __str__(self) -> str:  # "channel" rather than "Granularity.CHANNEL"
        return self.value


@dataclass(frozen=True)
class QuantSpec:
    """Immutable description of a quantizer.

    Args:
        bits: integer bit width, one of {2, 3, 4, 8}.
        granularity: a :class:`Granularity` or its string value.
        group_size: elements per group along the last dim; required (> 0) for ``group``, must be 0 otherwise.
        symmetric: symmetric (signed codes, no zero point) or asymmetric (unsigned codes + zero point).
        dynamic: parameters computed at run time (e.g. per-token activations) rather than calibrated once.
    """

    bits: int = 8
    granularity: Granularity = Granularity.CHANNEL
    group_size: int = 0
    symmetric: bool = True
    dynamic: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in ALLOWED_BITS:
            raise ValueError(f"QuantSpec: bits must be one of {{2, 3, 4, 8}}, got {self.bits!r}")
        try:
            gran = Granularity(self.granularity)
        except ValueError:
            allowed = [g.value for g in Granularity]
            raise ValueError(f"QuantSpec: granularity must be one of {allowed}, got {self.granularity!r}") from None
        object.__setattr__(self, "granularity", gran)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
            raise TypeError(f"QuantSpec: group_size must be an int, got {type(self.group_size).__name__}")
        if gran is Granularity.GROUP:
            if self.group_size <= 0:
                raise ValueError(f"QuantSpec: group_size must be > 0 for granularity 'group', got {self.group_size}")
        elif self.group_size != 0:
            raise ValueError(f"QuantSpec: group_size must be 0 unless granularity is 'group', got {self.group_size}")
        for name in ("symmetric", "dynamic"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"QuantSpec: {name} must be a bool, got {getattr(self, name)!r}")

    @property
    def qmin(self) -> int:
        """Smallest integer code."""
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def code_dtype(self) -> torch.dtype:
        """dtype of the codes returned by :func:`quantize`."""
        return torch.int8 if self.symmetric else torch.uint8


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_x(x: torch.Tensor, spec: QuantSpec, fn: str) -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{fn}: spec must be a QuantSpec, got {type(spec).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if spec.granularity is Granularity.TENSOR:
        return
    if x.dim() < 1:
        raise ValueError(f"{fn}: x must have at least 1 dim for granularity '{spec.granularity}', got a 0-dim tensor")
    if spec.granularity is Granularity.GROUP and x.shape[-1] % spec.group_size != 0:
        raise ValueError(f"{fn}: x's last dim ({x.shape[-1]}) must be divisible by group_size ({spec.group_size})")


def _grouped(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View x so that each quantization group is reduced over the last dim (and params broadcast with [..., 1])."""
    g = spec.granularity
    if g is Granularity.TENSOR:
        return x.reshape(1, -1)
    if g is Granularity.CHANNEL:
        return x.reshape(x.shape[0], -1)
    if g is Granularity.TOKEN:
        return x
    return x.reshape(*x.shape[:-1], x.shape[-1] // spec.group_size, spec.group_size)


def _param_shape(x: torch.Tensor, spec: QuantSpec) -> tuple[int, ...]:
    g = spec.granularity
    if g is Granularity.TENSOR:
        return ()
    if g is Granularity.CHANNEL:
        return (x.shape[0],)
    if g is Granularity.TOKEN:
        return tuple(x.shape[:-1])
    return (*x.shape[:-1], x.shape[-1] // spec.group_size)


def _bcast(p: torch.Tensor, xg: torch.Tensor, spec: QuantSpec, fn: str, name: str) -> torch.Tensor:
    """Reshape a parameter tensor so that it broadcasts against the grouped view of x."""
    expected = xg.shape[:-1]
    if spec.granularity is Granularity.TENSOR:
        if p.numel() != 1:
            raise ValueError(f"{fn}: {name} must have 1 element for granularity 'tensor', got shape {tuple(p.shape)}")
        return p.reshape(1, 1)
    if p.numel() != expected.numel():
        raise ValueError(
            f"{fn}: {name} has shape {tuple(p.shape)}, incompatible with granularity '{spec.granularity}' "
            f"(expected {expected.numel()} elements)"
        )
    return p.reshape(*expected, 1)


def compute_qparams(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max quantization parameters ``(scale, zero)`` for ``x`` (``zero`` is None when symmetric).

    Parameters are float32 (float64 when ``x`` is float64) with the shapes listed in the module docstring.
    """
    _check_x(x, spec, "compute_qparams")
    if not x.is_floating_point():
        raise TypeError(f"compute_qparams: x must be a floating tensor, got {x.dtype}")
    dt = _compute_dtype(x)
    xg = _grouped(x.detach().to(dt), spec)
    shape = _param_shape(x, spec)
    if spec.symmetric:
        amax = xg.abs().amax(dim=-1) if xg.numel() else torch.zeros(xg.shape[:-1], dtype=dt, device=x.device)
        scale = amax.clamp(min=_EPS) / spec.qmax
        return scale.reshape(shape), None
    lo = xg.amin(dim=-1).clamp(max=0)
    hi = xg.amax(dim=-1).clamp(min=0)
    scale = (hi - lo).clamp(min=_EPS) / spec.qmax
    zero = torch.round(-lo / scale).clamp(0, spec.qmax)
    return scale.reshape(shape), zero.reshape(shape)


def quantize(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
    """Integer codes of ``x`` (``int8`` if symmetric, ``uint8`` otherwise), same shape as ``x``."""
    _check_x(x, spec, "quantize")
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"quantize: scale must be a torch.Tensor, got {type(scale).__name__}")
    if not spec.symmetric and zero is None:
        raise ValueError("quantize: zero is required for an asymmetric spec")
    dt = _compute_dtype(x)
    xg = _grouped(x.to(dt), spec)
    s = _bcast(scale.to(device=x.device, dtype=dt), xg, spec, "quantize", "scale")
    q = torch.round(xg / s)
    if not spec.symmetric:
        q = q + _bcast(zero.to(device=x.device, dtype=dt), xg, spec, "quantize", "zero")
    q = q.clamp(spec.qmin, spec.qmax)
    return q.reshape(x.shape).to(spec.code_dtype)


def dequantize(
    q: torch.Tensor,
    spec: QuantSpec,
    scale: torch.Tensor,
    zero: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Float values ``(q - zero) * scale`` in ``dtype`` (computed in float64 when ``dtype`` is float64)."""
    _check_x(q, spec, "dequantize")
    if not spec.symmetric and zero is None:
        raise ValueError("dequantize: zero is required for an asymmetric spec")
    dt = torch.float64 if dtype == torch.float64 else torch.float32
    qg = _grouped(q.to(dt), spec)
    if not spec.symmetric:
        qg = qg - _bcast(zero.to(device=q.device, dtype=dt), qg, spec, "dequantize", "zero")
    out = qg * _bcast(scale.to(device=q.device, dtype=dt), qg, spec, "dequantize", "scale")
    return out.reshape(q.shape).to(dtype)


def fake_quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    scale: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize-dequantize ``x`` (min-max params unless given); returns ``x.dtype``. For references and tests only."""
    if scale is None:
        scale, zero = compute_qparams(x, spec)
    q = quantize(x, spec, scale, zero)
    return dequantize(q, spec, scale, zero, dtype=x.dtype)
