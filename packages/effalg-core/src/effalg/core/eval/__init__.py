"""Task-level evaluation of (compressed) reference models: the shapes text-to-image pipeline, the MQAR LM and the
shapes question-answering VLM.

Importing this package is cheap: torch only; scipy is imported inside the functions. Nothing here imports diffusers
or transformers: the model loaders and tokenizers live in the plugins, :mod:`effalg.diffusers.reference_models`
(``load_reference_t2i``) and :mod:`effalg.transformers.reference_models` (``load_reference_lm``,
``load_reference_vlm``, ``build_lm_tokenizer``, ``build_shapes_tokenizer``, ``build_vlm_processor``).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "evaluate_lm": "lm",
    "evaluate_t2i": "t2i",
    "evaluate_vlm": "vlm",
    "vlm_samples": "vlm",
    "format_table": "report",
    "reference_models_dir": "reference",
    "fake_quantize_weights": "reference",
}

#: Names that moved to the plugins (effalg.core never imports diffusers or transformers).
_MOVED = {
    "load_reference_lm": "effalg.transformers.reference_models",
    "load_reference_vlm": "effalg.transformers.reference_models",
    "load_reference_t2i": "effalg.diffusers.reference_models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        mod = importlib.import_module(f"effalg.core.eval.{_EXPORTS[name]}")
        return getattr(mod, name)
    if name in _MOVED:
        raise AttributeError(f"effalg.core.eval.{name} moved: use `from {_MOVED[name]} import {name}`")
    raise AttributeError(name)
