"""CPU runtime layouts of the weight-only modules (WeightOnlyLinear): prepacking, and the canonical state dict."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

import effalg.kernels as _K

from ._prepack import PrepackMixin

__all__ = ["WeightOnlyPrepackMixin"]


class WeightOnlyPrepackMixin(PrepackMixin):
    """Holds ``qweight`` (canonical ``uint8 [N, ceil(K * bits / 8)]``) optionally in a CPU runtime layout of
    :func:`effalg.kernels.prepack_weight_only` (``"blocked"`` for the native W3/W4 kernels, ``"int4pack"`` for torch's
    int4 kernel), in place of the canonical bytes (no second copy).

    The state dict, pickling and deep copies see the canonical layout (bit-identical; see :class:`PrepackMixin`). Set
    ``self._packed_layout = None`` in ``__init__``; the module defines ``bits``, ``group_size``, ``in_features``,
    ``out_features``.
    """

    _packed_layout: str | None
    _PLAIN_STATE: ClassVar[dict[str, Any]] = {"_packed_layout": None}

    def plain_qweight(self) -> torch.Tensor:
        """``qweight`` in the canonical layout (a new tensor if prepacked)."""
        if self._packed_layout is None:
            return self.qweight
        return _K.unpack_weight_only(self.qweight, self._packed_layout, self.bits, self.out_features, self.in_features)

    @property
    def is_prepacked(self) -> bool:
        return self._packed_layout is not None

    @property
    def packed_layout(self) -> str | None:
        """The runtime layout of ``qweight`` (None: canonical)."""
        return self._packed_layout

    def prepack_(self, layout: str | None = None):
        """Hold ``qweight`` in the CPU runtime layout :func:`effalg.kernels.weight_only_cpu_layout` picks (or
        ``layout``); no-op if already prepacked, not on CPU, or no faster layout exists for this weight here."""
        if self._packed_layout is not None or self.qweight.device.type != "cpu" or "qweight" in self._parameters:
            return self
        if layout is None:
            layout = _K.weight_only_cpu_layout(self.bits, self.out_features, self.in_features, self.group_size)
        if layout is not None:
            self.qweight = _K.prepack_weight_only(self.qweight, layout, self.bits, self.out_features, self.in_features)
            self._packed_layout = layout
        return self

    def unpack_(self):
        """Back to the canonical layout (no-op if not prepacked)."""
        if self._packed_layout is not None:
            self.qweight = self.plain_qweight()
            self._packed_layout = None
        return self
