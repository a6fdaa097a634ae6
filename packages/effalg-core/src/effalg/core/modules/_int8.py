"""CPU weight prepacking shared by the int8-weight modules (W8A8Linear, W8A8Conv2d)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

import effalg.kernels as _K

from ._prepack import PrepackMixin

__all__ = ["Int8PrepackMixin"]


class Int8PrepackMixin(PrepackMixin):
    """Holds ``qweight`` (plain ``int8 [N, K]``) optionally in the oneDNN-prepacked CPU layout (see
    :class:`PrepackMixin`). Set ``self._prepacked = False`` in ``__init__``.
    """

    _prepacked: bool
    _PLAIN_STATE: ClassVar[dict[str, Any]] = {"_prepacked": False}

    def plain_qweight(self) -> torch.Tensor:
        """``qweight`` in the plain ``int8 [N, K]`` layout (a new tensor if prepacked)."""
        return _K.unpack_int8_weight(self.qweight).contiguous() if self._prepacked else self.qweight

    @property
    def is_prepacked(self) -> bool:
        return self._prepacked

    def prepack_(self) -> Int8PrepackMixin:
        """Hold ``qweight`` in the CPU oneDNN-prepacked layout (no-op if already prepacked or not on CPU)."""
        if self._prepacked or self.qweight.device.type != "cpu" or "qweight" in self._parameters:
            return self
        packed = _K.prepack_int8_weight(self.qweight)
        if packed is not self.qweight:  # the kernels return the input when no faster layout exists
            self.qweight = packed
            self._prepacked = True
        return self

    def unpack_(self) -> Int8PrepackMixin:
        """Back to the plain ``int8 [N, K]`` layout (no-op if not prepacked)."""
        if self._prepacked:
            self.qweight = _K.unpack_int8_weight(self.qweight).contiguous()
            self._prepacked = False
        return self
