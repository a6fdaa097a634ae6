"""BOS-aware cross-attention projection (MixDQ): token 0 in float, the other tokens through ``WxA8Linear``."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ._wxa8 import WXA8_FP32_BUFFERS
from .linear import WxA8Linear

__all__ = ["BOSAwareWxA8Linear"]


class BOSAwareWxA8Linear(WxA8Linear):
    """A :class:`WxA8Linear` whose first token (the text encoder's BOS token, dim -2 of the input) takes a float path.

    CLIP's BOS features are orders of magnitude larger than the other tokens'; quantizing them with the rest ruins a
    per-tensor activation range. Two ways to compute the BOS row:

    * ``precomputed`` (``bos_output`` fp32 ``[N]`` and ``bos_input`` fp32 ``[K]``): for a causal text encoder the
      BOS features are the same for every prompt, so the float output row is stored and broadcast. The input's
      row 0 is checked against ``bos_input`` (outside ``torch.compile``) and a mismatch raises: a LoRA or
      fine-tune of the text encoder or of this layer invalidates the stored row (recalibrate).
    * otherwise ``bos_weight`` (float ``[N, K]``, model dtype) computes the row on the fly (costs a float copy of
      this layer's weight).
    """

    _fp32_buffers: ClassVar[tuple[str, ...]] = WXA8_FP32_BUFFERS + ("bos_output", "bos_input")
    _model_dtype_buffers: ClassVar[tuple[str, ...]] = ("bos_weight",)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        precomputed: bool = False,
        weight_bits: int = 8,
        static_act: bool = False,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_features, out_features, bias, weight_bits=weight_bits, static_act=static_act, device=device,
            dtype=dtype,
        )  # fmt: skip
        dtype = dtype or torch.get_default_dtype()
        f32 = dict(dtype=torch.float32, device=device)
        if precomputed:
            self.register_buffer("bos_output", torch.zeros(out_features, **f32))
            self.register_buffer("bos_input", torch.zeros(in_features, **f32))
            self.register_buffer("bos_weight", None)
        else:
            self.register_buffer("bos_output", None)
            self.register_buffer("bos_input", None)
            self.register_buffer("bos_weight", torch.zeros(out_features, in_features, dtype=dtype, device=device))

    @property
    def precomputed(self) -> bool:
        return self.bos_output is not None

    @classmethod
    def from_float(  # type: ignore[override]
        cls,
        linear: nn.Linear,
        *,
        weight_bits: int = 8,
        act_scale: Any = None,
        act_zero: Any = None,
        bos_input: torch.Tensor | None = None,
        prepack: bool = True,
    ) -> BOSAwareWxA8Linear:
        """Quantize ``linear`` for tokens 1.. (see :meth:`WxA8Linear.from_float`); ``bos_input`` (``[K]``, the
        prompt-independent BOS features) stores the precomputed float BOS row, else the float weight is kept."""
        mod = super().from_float(linear, weight_bits=weight_bits, act_scale=act_scale, act_zero=act_zero, prepack=False)
        with torch.no_grad():
            if bos_input is not None:
                h = torch.as_tensor(bos_input).detach().reshape(-1).float().to(linear.weight.device)
                if h.shape[0] != linear.in_features or not torch.isfinite(h).all():
                    raise ValueError(
                        f"{cls.__name__}.from_float: bos_input must be {linear.in_features} finite values, "
                        f"got shape {tuple(h.shape)}"
                    )
                b = None if linear.bias is None else linear.bias.detach().float()
                mod.bos_output = F.linear(h, linear.weight.detach().float(), b)
                mod.bos_input = h.clone()
                mod.bos_weight = None
            else:
                mod.bos_weight = linear.weight.detach().clone()
        if prepack:
            mod.prepack_()
        return mod

    def _check_bos(self, x0: torch.Tensor) -> None:
        ref = self.bos_input
        tol = (
            1e-2 * float(ref.abs().max()) + 1e-3
            if x0.dtype in (torch.float16, torch.bfloat16)
            else 1e-4 * float(ref.abs().max()) + 1e-5
        )
        if float((x0.float() - ref).abs().max()) > tol:
            raise ValueError(
                f"{type(self).__name__}: the input's token 0 is not the BOS features this layer's precomputed row was "
                "calibrated with (a LoRA, fine-tune or other text encoder invalidates it); recalibrate with "
                "effalg.diffusers.calibrate"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[-2] < 2:
            raise ValueError(
                f"{type(self).__name__}: expected text tokens [..., T >= 2, {self.in_features}] (BOS first), got "
                f"{tuple(x.shape)}; use bos_aware=False for cross-attention without text tokens"
            )
        rest = self._wxa8(x[..., 1:, :])
        if self.precomputed:
            if not torch.compiler.is_compiling():
                self._check_bos(x[..., 0, :])
            first = self.bos_output.to(rest.dtype).expand(*x.shape[:-2], 1, self.out_features)
        else:
            first = F.linear(x[..., :1, :], self.bos_weight.to(x.dtype), self.bias)
        return torch.cat([first.to(rest.dtype), rest], dim=-2)

    def _repr_extra(self) -> str:
        return super()._repr_extra() + (", bos=precomputed" if self.precomputed else ", bos=float weight")
