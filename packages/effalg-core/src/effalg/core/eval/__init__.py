"""Task-level evaluation of (compressed) reference models: the shapes text-to-image pipeline and the MQAR LM.

Importing this package is cheap: torch only; diffusers/transformers/scipy are imported inside the functions.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "evaluate_lm": "lm",
    "evaluate_t2i": "t2i",
    "format_table": "report",
    "load_reference_lm": "reference",
    "load_reference_t2i": "reference",
    "reference_models_dir": "reference",
    "fake_quantize_weights": "reference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        mod = importlib.import_module(f"effalg.core.eval.{_EXPORTS[name]}")
        return getattr(mod, name)
    raise AttributeError(name)
