"""Shared machinery of the quantized modules: fp32 qparam buffers, input pre-transforms, footprint, device moves."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

import effalg.kernels as _K

from ..quant.rotation import HadamardRotation

__all__ = [
    "QuantModuleBase",
    "memory_footprint",
    "prepack_model_",
    "unpack_model_",
    "buffers_to_parameters_",
    "parameters_to_buffers_",
    "offload_hooked",
]


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def memory_footprint(module: nn.Module) -> int:
    """Bytes held by ``module``'s parameters and buffers (each tensor counted once; packed tensors at packed size)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"memory_footprint: module must be an nn.Module, got {type(module).__name__}")
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += _tensor_bytes(t)
    return total


def prepack_model_(model: nn.Module) -> nn.Module:
    """Call ``prepack_()`` on every submodule that has it (no-op off CPU); returns ``model``."""
    for m in model.modules():
        if isinstance(m, QuantModuleBase):
            m.prepack_()
    return model


def buffers_to_parameters_(module: nn.Module) -> nn.Module:
    """Hold the persistent buffers of ``module`` and its submodules as frozen ``nn.Parameter`` s (same tensors, same
    state-dict keys), for accelerate device maps: its offload hooks move and reload parameters only (buffers stay on
    the execution device unless ``offload_buffers=True``, which diffusers does not pass). A quantized module in this
    state skips ``prepack_`` (its runtime layout would not be a parameter); :func:`parameters_to_buffers_` undoes it."""
    for m in module.modules():
        names = [n for n, b in m._buffers.items() if b is not None and n not in m._non_persistent_buffers_set]
        for n in names:
            m.register_parameter(n, nn.Parameter(m._buffers.pop(n), requires_grad=False))
        if names:
            m._effalg_parameter_buffers = tuple(getattr(m, "_effalg_parameter_buffers", ())) + tuple(names)
    return module


def offload_hooked(module: nn.Module) -> bool:
    """Whether an accelerate hook offloads ``module``'s weights (reloading them at each forward)."""
    hook = getattr(module, "_hf_hook", None)
    return any(getattr(h, "offload", False) for h in getattr(hook, "hooks", (hook,)))


def parameters_to_buffers_(module: nn.Module, keep_offloaded: bool = False) -> nn.Module:
    """Inverse of :func:`buffers_to_parameters_` (for the modules it converted); with ``keep_offloaded``, modules an
    accelerate hook offloads (and submodules of such) stay as they are."""
    for m in module.modules():
        if keep_offloaded and offload_hooked(m):
            continue
        for n in getattr(m, "_effalg_parameter_buffers", ()):
            p = m._parameters.pop(n)
            m.register_buffer(n, p.data)
        m.__dict__.pop("_effalg_parameter_buffers", None)
    return module


def unpack_model_(model: nn.Module) -> nn.Module:
    """Call ``unpack_()`` on every submodule that has it; returns ``model``."""
    for m in model.modules():
        if isinstance(m, QuantModuleBase):
            m.unpack_()
    return model


class QuantModuleBase(nn.Module):
    """Base of all effalg quantized modules (linear now, conv later).

    * Buffers listed in ``_fp32_buffers`` (``weight_scale``, ``weight_zero``, ``smooth_scale``) stay float32 under
      ``model.to(dtype)`` / ``.half()`` (they still follow device moves), so checkpoints have stable dtypes.
    * :meth:`preprocess_input` applies the optional per-input-channel ``smooth_scale`` (``x * smooth_scale``) and then
      the optional ``input_transform`` module (e.g. a rotation, set with :meth:`set_input_transform`); smooth scale
      and a :class:`~effalg.core.quant.rotation.HadamardRotation` run fused in one ``effalg.kernels.smooth_hadamard``.
    * ``prepack_()`` / ``unpack_()`` hooks for device-specific weight layouts (no-ops here).
    """

    _fp32_buffers: ClassVar[tuple[str, ...]] = ("weight_scale", "weight_zero", "smooth_scale")
    smooth_scale: torch.Tensor | None
    input_transform: nn.Module | None

    def __init__(self) -> None:
        super().__init__()
        self.input_transform = None

    # ---- input pre-transforms ---------------------------------------------------------------------------------
    def _init_smooth_scale(self, channels: int, has_smooth_scale: bool, device: Any) -> None:
        self._smooth_channels = channels
        buf = torch.ones(channels, dtype=torch.float32, device=device) if has_smooth_scale else None
        self.register_buffer("smooth_scale", buf)

    def set_smooth_scale(self, smooth_scale: torch.Tensor | None) -> None:
        """Set (or remove, with None) the ``smooth_scale`` buffer. The weight must already account for it."""
        if smooth_scale is None:
            self.register_buffer("smooth_scale", None)
            return
        s = _check_smooth_scale(smooth_scale, self._smooth_channels, type(self).__name__)
        self.register_buffer("smooth_scale", s.to(device=self._reference_device(), dtype=torch.float32))

    def set_input_transform(self, transform: nn.Module | None) -> None:
        """Install ``transform`` (an nn.Module acting on the input's channel dim) after the smooth scale, or remove it.

        The weight must already account for it (see ``from_float(..., input_transform=...)``). Its own parameters and
        buffers appear in the state dict under ``input_transform.``.
        """
        if transform is not None and not isinstance(transform, nn.Module):
            raise TypeError(
                f"set_input_transform: transform must be an nn.Module or None, got {type(transform).__name__}"
            )
        self.input_transform = transform

    def preprocess_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x * smooth_scale`` then ``input_transform(x)``, each only if set; keeps ``x.dtype``.

        A :class:`HadamardRotation` transform (with or without smooth scale) and a lone smooth scale run as one
        ``effalg.kernels.smooth_hadamard`` call (fp32 math, one rounding to ``x.dtype``); other transforms are called
        after ``x * smooth_scale``.
        """
        t = self.input_transform
        if isinstance(t, HadamardRotation):
            return _K.smooth_hadamard(x, self.smooth_scale, t.signs, t.block_size)
        if t is None:
            return x if self.smooth_scale is None else _K.smooth_hadamard(x, self.smooth_scale, None, 0)
        if self.smooth_scale is not None:
            x = x * self.smooth_scale.to(x.dtype)
        if self.input_transform is not None:
            x = self.input_transform(x)
        return x

    # ---- layouts ------------------------------------------------------------------------------------------------
    def prepack_(self) -> QuantModuleBase:
        """Convert weights to a faster device-specific layout in place (no second copy). Default: no-op."""
        return self

    def unpack_(self) -> QuantModuleBase:
        """Inverse of :meth:`prepack_`. Default: no-op."""
        return self

    @property
    def is_prepacked(self) -> bool:
        return False

    def _reference_device(self) -> torch.device:
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    # ---- bookkeeping ---------------------------------------------------------------------------------------------
    def memory_footprint(self) -> int:
        """Bytes of this module's parameters and buffers (packed)."""
        return memory_footprint(self)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Accept a checkpoint carrying smooth_scale even if the module was built without one.
        key = prefix + "smooth_scale"
        if getattr(self, "smooth_scale", None) is None and key in state_dict and hasattr(self, "_smooth_channels"):
            self.register_buffer(
                "smooth_scale", torch.ones(self._smooth_channels, dtype=torch.float32, device=self._reference_device())
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _apply(self, fn, recurse=True):
        # Keep fp32 qparams in fp32: apply fn for the device, but undo any dtype change (from the original tensor).
        protected = {}
        for name in self._fp32_buffers:
            t = self._buffers.get(name)
            if t is not None:
                protected[name] = t
                self._buffers[name] = None  # keeps the key order of the state dict
        try:
            self._before_apply(fn)
            out = super()._apply(fn, recurse)
        finally:
            for name, t in protected.items():
                new = fn(t)
                if new.dtype != t.dtype:
                    new = torch.empty_like(t, device=new.device) if t.is_meta else t.to(device=new.device)
                self._buffers[name] = new
        return out

    def _before_apply(self, fn) -> None:
        """Hook for subclasses, called before tensors are converted by ``fn`` (e.g. unpack before leaving CPU)."""


def _check_smooth_scale(s: Any, channels: int, owner: str) -> torch.Tensor:
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"{owner}: smooth_scale must be a torch.Tensor, got {type(s).__name__}")
    if s.dim() != 1 or s.shape[0] != channels:
        raise ValueError(f"{owner}: smooth_scale must have shape [{channels}], got {tuple(s.shape)}")
    if not s.is_floating_point():
        raise TypeError(f"{owner}: smooth_scale must be floating point, got {s.dtype}")
    if not s.is_meta and not (torch.isfinite(s).all() and (s > 0).all()):
        raise ValueError(f"{owner}: smooth_scale must be finite and > 0")
    return s.detach()
