"""A CPU runtime layout of a quantized module's ``qweight`` that never leaks out of the module (shared by the int8
and the weight-only modules)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

__all__ = ["PrepackMixin"]


class PrepackMixin:
    """``qweight`` held in a CPU runtime layout in place of its serialized one (no second copy).

    The state dict, pickling and deep copies always see the serialized layout; loading accepts it (and re-prepacks
    if the module was prepacked); any move off CPU unpacks first. Subclasses define ``is_prepacked``,
    ``plain_qweight()``, ``prepack_()``, ``unpack_()`` and ``_PLAIN_STATE`` (the attribute values of the serialized
    layout); put the mixin before the ``nn.Module`` base in the bases list.
    """

    _PLAIN_STATE: ClassVar[dict[str, Any]]

    def _before_apply(self, fn) -> None:
        if self.is_prepacked:
            target = fn(torch.empty(0, dtype=torch.float32))
            if target.device.type != "cpu":
                self.unpack_()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.is_prepacked:
            destination[prefix + "qweight"] = self.plain_qweight()

    def __getstate__(self):
        # Carry the serialized layout (opaque prepacked tensors cannot be deep-copied or pickled, and runtime layouts
        # depend on the machine) and re-prepack after.
        state = self.__dict__.copy()
        if self.is_prepacked:
            state["_buffers"] = dict(self._buffers)
            state["_buffers"]["qweight"] = self.plain_qweight()
            state.update(self._PLAIN_STATE)
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
        was_prepacked = self.is_prepacked
        if was_prepacked:
            self.unpack_()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if was_prepacked:
            self.prepack_()
