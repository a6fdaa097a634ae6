"""Test utilities shared by the effalg integrations (framework-agnostic; needs pytest)."""

from .conformance import QuantizationConformanceMixin, module_memory_bytes

__all__ = ["QuantizationConformanceMixin", "module_memory_bytes"]
