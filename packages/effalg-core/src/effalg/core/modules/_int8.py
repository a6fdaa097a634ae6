"""CPU weight prepacking shared by the int8-weight modules (W8A8Linear, W8A8Conv2d)."""

from __future__ import annotations

import torch

import effalg.kernels as _K

__all__ = ["Int8PrepackMixin"]


class Int8PrepackMixin:
    """Holds ``qweight`` (plain ``int8 [N, K]``) optionally in the oneDNN-prepacked CPU layout, without a second copy.

    The state dict, pickling and deep copies always see the plain layout; loading accepts it (and re-prepacks if the
    module was prepacked); any move off CPU unpacks first. Put it before the ``nn.Module`` base in the bases list and
    set ``self._prepacked = False`` in ``__init__``.
    """

    _prepacked: bool

    def plain_qweight(self) -> torch.Tensor:
        """``qweight`` in the plain ``int8 [N, K]`` layout (a new tensor if prepacked)."""
        return _K.unpack_int8_weight(self.qweight).contiguous() if self._prepacked else self.qweight

    @property
    def is_prepacked(self) -> bool:
        return self._prepacked

    def prepack_(self) -> Int8PrepackMixin:
        """Hold ``qweight`` in the CPU oneDNN-prepacked layout (no-op if already prepacked or not on CPU)."""
        if self._prepacked or self.qweight.device.type != "cpu":
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

    def _before_apply(self, fn) -> None:
        if self._prepacked:
            target = fn(torch.empty(0, dtype=torch.float32))
            if target.device.type != "cpu":
                self.unpack_()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._prepacked:
            destination[prefix + "qweight"] = self.plain_qweight()

    def __getstate__(self):
        # Opaque (prepacked) tensors cannot be deep-copied or pickled: carry the plain layout and re-prepack after.
        state = self.__dict__.copy()
        if self._prepacked:
            state["_buffers"] = dict(self._buffers)
            state["_buffers"]["qweight"] = self.plain_qweight()
            state["_prepacked"] = False
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
        was_prepacked = self._prepacked
        if was_prepacked:
            self.unpack_()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if was_prepacked:
            self.prepack_()
