"""Session-cached tiny transformers checkpoints (seeded random weights)."""

from __future__ import annotations

import pytest

from effalg.transformers.testing import tiny_llama, tiny_llava, tiny_llava_next, tiny_qwen2, tiny_qwen2_vl

_CACHE: dict[str, tuple[str, object]] = {}


def get_tiny(kind: str, tmp_factory) -> tuple[str, object]:
    """``(path, float model)`` for ``kind`` in {llama, llama_outliers, qwen2, llava, llava_next, qwen2_vl}, built once."""
    if kind not in _CACHE:
        d = str(tmp_factory.mktemp(kind))
        fn = {
            "llama": lambda: tiny_llama(d),
            "llama_outliers": lambda: tiny_llama(d, outlier_channels=4),
            "qwen2": lambda: tiny_qwen2(d),
            "llava": lambda: tiny_llava(d),
            "llava_next": lambda: tiny_llava_next(d),
            "qwen2_vl": lambda: tiny_qwen2_vl(d),
        }[kind]
        _CACHE[kind] = fn()
    return _CACHE[kind]


@pytest.fixture(scope="session")
def tiny_llama_ckpt(tmp_path_factory):
    return get_tiny("llama", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_qwen2_ckpt(tmp_path_factory):
    return get_tiny("qwen2", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_llava_ckpt(tmp_path_factory):
    return get_tiny("llava", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_qwen2_vl_ckpt(tmp_path_factory):
    return get_tiny("qwen2_vl", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_llava_next_ckpt(tmp_path_factory):
    return get_tiny("llava_next", tmp_path_factory)
