"""Registration of effalg quantization methods into diffusers' quantizer dispatch.

diffusers 0.42 has no public ``register_quantizer``: ``DiffusersAutoQuantizer`` reads the module-level dicts
``diffusers.quantizers.auto.AUTO_QUANTIZER_MAPPING`` / ``AUTO_QUANTIZATION_CONFIG_MAPPING`` at call time, so methods
are added to them on ``import effalg.diffusers``. Because those dicts are private, registration is gated on the
tested diffusers range.
"""

from __future__ import annotations

from packaging.version import Version

import diffusers
from diffusers.quantizers import auto as _auto
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin

__all__ = ["SUPPORTED_DIFFUSERS", "check_diffusers_version", "register_quantization_method", "registered_methods"]

SUPPORTED_DIFFUSERS = ">=0.42,<0.43"
_MIN, _MAX = Version("0.42"), Version("0.43")
_REGISTERED: dict[str, tuple[type, type]] = {}


def check_diffusers_version(version: str | None = None) -> None:
    """Raise ``ImportError`` if ``version`` (default: the installed diffusers) is outside :data:`SUPPORTED_DIFFUSERS`."""
    version = diffusers.__version__ if version is None else version
    v = Version(version)
    if not (_MIN <= Version(v.base_version) < _MAX):
        raise ImportError(
            f"effalg.diffusers supports diffusers{SUPPORTED_DIFFUSERS} (it registers into diffusers' private "
            f"quantizer mappings), but diffusers {version} is installed. Install a supported diffusers version."
        )


def register_quantization_method(config_cls: type, quantizer_cls: type) -> None:
    """Register ``config_cls`` / ``quantizer_cls`` under ``config_cls.method`` (idempotent for the same pair).

    Raises:
        TypeError: the classes do not derive from diffusers' config mixin / quantizer base.
        ValueError: the name is already registered with different classes (e.g. a built-in method).
    """
    if not (isinstance(config_cls, type) and issubclass(config_cls, QuantizationConfigMixin)):
        raise TypeError(
            f"register_quantization_method: config_cls must subclass QuantizationConfigMixin, got {config_cls!r}"
        )
    if not (isinstance(quantizer_cls, type) and issubclass(quantizer_cls, DiffusersQuantizer)):
        raise TypeError(
            f"register_quantization_method: quantizer_cls must subclass DiffusersQuantizer, got {quantizer_cls!r}"
        )
    name = str(config_cls.method.value)
    present = (_auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(name), _auto.AUTO_QUANTIZER_MAPPING.get(name))
    if present == (config_cls, quantizer_cls):
        return
    if present != (None, None) and _REGISTERED.get(name) is None:
        raise ValueError(f"register_quantization_method: quant_method {name!r} is already registered in diffusers")
    if present != (None, None):
        old_cfg = _REGISTERED[name][0]
        if old_cfg.__qualname__ != config_cls.__qualname__:
            raise ValueError(
                f"register_quantization_method: quant_method {name!r} is already registered by {old_cfg.__qualname__}"
            )
        # Same class re-defined (module reloaded): replace.
    _auto.AUTO_QUANTIZATION_CONFIG_MAPPING[name] = config_cls
    _auto.AUTO_QUANTIZER_MAPPING[name] = quantizer_cls
    _REGISTERED[name] = (config_cls, quantizer_cls)


def registered_methods() -> dict[str, tuple[type, type]]:
    """``{quant_method: (config class, quantizer class)}`` registered by effalg."""
    return dict(_REGISTERED)
