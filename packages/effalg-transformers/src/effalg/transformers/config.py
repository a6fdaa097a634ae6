"""transformers ``QuantizationConfigMixin`` configs mirroring effalg-core configs."""

from __future__ import annotations

from typing import Any, ClassVar

from effalg.core.config import EffalgConfig, LinearQuantConfig
from transformers.utils.quantization_config import QuantizationConfigMixin

__all__ = ["EffalgHfConfigMixin", "EffalgLinearConfig"]


class EffalgHfConfigMixin(QuantizationConfigMixin):
    """Base for effalg transformers configs: wraps an effalg-core config (``core_config_class``) field by field."""

    quant_method_name: ClassVar[str] = ""
    core_config_class: ClassVar[type[EffalgConfig]] = EffalgConfig
    default_modules_to_not_convert: ClassVar[tuple[str, ...]] = ("lm_head",)

    def to_core_config(self) -> EffalgConfig:
        """The effalg-core config (validated by its ``__post_init__``)."""
        return self.core_config_class.from_dict(self._core_fields())

    def _core_fields(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        d = {"quant_method": self.quant_method}
        d.update(self._core_fields())
        return d

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


class EffalgLinearConfig(EffalgHfConfigMixin):
    """Quantize ``nn.Linear`` layers: W8A8 / W4A8 (dynamic per-token int8 activations) or weight-only.

    Args:
        weight_bits: {4, 8} with ``act_bits=8``; {3, 4, 8} weight-only.
        act_bits: 8 or None (weight-only).
        weight_group_size: 0 = per output channel; > 0 = groups along the input dim (not for W8A8).
        weight_symmetric: symmetric weights (False only for weight-only).
        modules_to_not_convert: transformers patterns (anchored at the start of the module name, e.g.
            ``"model.vision_tower"``, or a regex); ``None`` = ``["lm_head"]``.
    """

    quant_method_name: ClassVar[str] = "effalg_linear"
    core_config_class: ClassVar[type[EffalgConfig]] = LinearQuantConfig

    def __init__(
        self,
        weight_bits: int = 8,
        act_bits: int | None = 8,
        weight_group_size: int = 0,
        weight_symmetric: bool = True,
        modules_to_not_convert: list[str] | None = None,
        version: int = 1,
        quant_method: str | None = None,
        **kwargs: Any,
    ) -> None:
        if quant_method not in (None, self.quant_method_name):
            raise ValueError(
                f"EffalgLinearConfig: quant_method must be {self.quant_method_name!r}, got {quant_method!r}"
            )
        self.quant_method = self.quant_method_name
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.weight_group_size = weight_group_size
        self.weight_symmetric = weight_symmetric
        if modules_to_not_convert is None:
            modules_to_not_convert = list(self.default_modules_to_not_convert)
        self.modules_to_not_convert = modules_to_not_convert
        self.version = version
        self.post_init()

    def post_init(self) -> None:
        """Validate through effalg-core's ``LinearQuantConfig`` (clear errors listing allowed values)."""
        self.to_core_config()
        self.modules_to_not_convert = list(self.modules_to_not_convert)

    def _core_fields(self) -> dict[str, Any]:
        return {
            "weight_bits": self.weight_bits,
            "act_bits": self.act_bits,
            "weight_group_size": self.weight_group_size,
            "weight_symmetric": self.weight_symmetric,
            "modules_to_not_convert": list(self.modules_to_not_convert),
            "version": self.version,
        }

    @property
    def method_tag(self) -> str:
        """Short method name for model cards, e.g. ``w8a8``, ``w4a8``, ``w4a16-g32``."""
        tag = f"w{self.weight_bits}a{self.act_bits or 16}"
        return tag + (f"-g{self.weight_group_size}" if self.weight_group_size else "")
