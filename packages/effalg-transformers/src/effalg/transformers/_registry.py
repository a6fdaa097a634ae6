"""Idempotent registration of effalg quantization methods with transformers' public quantizer registry."""

from __future__ import annotations

from transformers.quantizers import register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from ._version_gate import check_transformers_version


def register_method(name: str, config_cls: type, quantizer_cls: type) -> None:
    """Register ``config_cls`` / ``quantizer_cls`` under ``name`` unless already registered (safe on re-import)."""
    check_transformers_version()
    if name not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(name)(config_cls)
    if name not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(name)(quantizer_cls)


def is_registered(name: str) -> bool:
    """Whether ``name`` is known to transformers' quantizer dispatch."""
    return name in AUTO_QUANTIZATION_CONFIG_MAPPING and name in AUTO_QUANTIZER_MAPPING
