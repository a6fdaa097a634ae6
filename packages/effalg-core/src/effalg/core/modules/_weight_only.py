"""CPU runtime layouts of the weight-only modules (WeightOnlyLinear): prepacking, and the canonical state dict."""

from __future__ import annotations

import torch

import effalg.kernels as _K

__all__ = ["WeightOnlyPrepackMixin"]


class WeightOnlyPrepackMixin:
    """Holds ``qweight`` (canonical ``uint8 [N, ceil(K * bits / 8)]``) optionally in a CPU runtime layout of
    :func:`effalg.kernels.prepack_weight_only` (``"blocked"`` for the native W3/W4 kernels, ``"int4pack"`` for torch's
    int4 kernel), in place of the canonical bytes (no second copy).

    The state dict, pickling and deep copies always see the canonical layout (bit-identical); loading accepts it (and
    re-prepacks if the module was prepacked); any move off CPU unpacks first. Put it before the ``nn.Module`` base and
    set ``self._packed_layout = None`` in ``__init__``; the module defines ``bits``, ``group_size``, ``in_features``,
    ``out_features``.
    """

    _packed_layout: str | None

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
        if self._packed_layout is not None or self.qweight.device.type != "cpu":
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

    def _before_apply(self, fn) -> None:
        if self._packed_layout is not None:
            target = fn(torch.empty(0, dtype=torch.float32))
            if target.device.type != "cpu":
                self.unpack_()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._packed_layout is not None:
            destination[prefix + "qweight"] = self.plain_qweight()

    def __getstate__(self):
        # Carry the canonical layout (portable across machines and kernel builds) and re-prepack after.
        state = self.__dict__.copy()
        if self._packed_layout is not None:
            state["_buffers"] = dict(self._buffers)
            state["_buffers"]["qweight"] = self.plain_qweight()
            state["_packed_layout"] = None
            state["_repack_on_setstate"] = True
        return state

    def __setstate__(self, state):
        repack = state.pop("_repack_on_setstate", False)
        super().__setstate__(state)
        if repack:
            self.prepack_()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        was = self._packed_layout
        if was is not None:
            self.unpack_()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if was is not None:
            self.prepack_()
