"""Conformance suite (effalg.core.testing) for MBQ W3 / W4 / W4A8 on tiny LLaVA, LLaVA-Next and Qwen2-VL."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

import effalg.transformers  # noqa: F401  (registers effalg_mbq)
from effalg.core.modules import W4A8Linear, WeightOnlyLinear
from effalg.core.testing.conformance import QuantizationConformanceMixin
from effalg.transformers import MBQConfig, calibrate_mbq
from effalg.transformers.testing import tiny_vlm_samples


class _MBQBase(QuantizationConformanceMixin):
    kind = "llava"
    config_kwargs: dict = {"weight_bits": 3, "group_size": 32}
    quantized_module_types: tuple = (WeightOnlyLinear,)
    compile_atol = 1e-4
    checkpoint: str

    @pytest.fixture(autouse=True, scope="class")
    def _checkpoint(self, request):
        request.cls.checkpoint = request.getfixturevalue(f"tiny_{request.cls.kind}_ckpt")[0]

    def make_reference(self):
        return AutoModelForImageTextToText.from_pretrained(self.checkpoint).eval()

    def make_compressed(self):
        model = self.make_reference()
        return calibrate_mbq(model, None, tiny_vlm_samples(model, n=3), MBQConfig(**self.config_kwargs), progress=False)

    def run(self, model):
        sample = tiny_vlm_samples(model, n=1, seed=7)[0]
        with torch.no_grad():
            return model(**{k: v for k, v in sample.items() if k != "labels"}).logits

    def save(self, model, directory):
        model.save_pretrained(directory)

    def load(self, directory):
        return AutoModelForImageTextToText.from_pretrained(directory).eval()

    def compile(self, model):
        return torch.compile(model, backend="eager", fullgraph=False)

    def bad_input_cases(self):
        yield (lambda: MBQConfig(weight_bits=5), ValueError, r"weight_bits must be one of \[3, 4\]")
        yield (lambda: MBQConfig(act_bits=8, weight_bits=3), ValueError, r"weight_bits must be one of \[4\]")


_W3 = {"config_kwargs": {"weight_bits": 3, "group_size": 32}, "quantized_module_types": (WeightOnlyLinear,)}
_W4 = {"config_kwargs": {"weight_bits": 4, "group_size": 32}, "quantized_module_types": (WeightOnlyLinear,)}
_W4A8 = {"config_kwargs": {"weight_bits": 4, "act_bits": 8}, "quantized_module_types": (W4A8Linear,)}


class TestLlavaMBQW3(_MBQBase):
    kind, min_sqnr, expected_memory_ratio = "llava", 8.0, 1.4
    config_kwargs, quantized_module_types = _W3["config_kwargs"], _W3["quantized_module_types"]


class TestLlavaMBQW4(_MBQBase):
    kind, min_sqnr, expected_memory_ratio = "llava", 14.0, 1.4
    config_kwargs, quantized_module_types = _W4["config_kwargs"], _W4["quantized_module_types"]


class TestLlavaMBQW4A8(_MBQBase):
    kind, min_sqnr, expected_memory_ratio = "llava", 12.0, 1.4
    config_kwargs, quantized_module_types = _W4A8["config_kwargs"], _W4A8["quantized_module_types"]


class TestLlavaNextMBQW3(_MBQBase):
    kind, min_sqnr, expected_memory_ratio = "llava_next", 8.0, 1.4
    config_kwargs, quantized_module_types = _W3["config_kwargs"], _W3["quantized_module_types"]


class TestLlavaNextMBQW4(_MBQBase):
    kind, min_sqnr, expected_memory_ratio = "llava_next", 14.0, 1.4
    config_kwargs, quantized_module_types = _W4["config_kwargs"], _W4["quantized_module_types"]


class TestLlavaNextMBQW4A8(_MBQBase):
    kind, min_sqnr, expected_memory_ratio = "llava_next", 12.0, 1.4
    config_kwargs, quantized_module_types = _W4A8["config_kwargs"], _W4A8["quantized_module_types"]


class TestQwen2VLMBQW3(_MBQBase):
    kind, min_sqnr, expected_memory_ratio = "qwen2_vl", 8.0, 1.2
    config_kwargs, quantized_module_types = _W3["config_kwargs"], _W3["quantized_module_types"]


class TestQwen2VLMBQW4(_MBQBase):
    kind, min_sqnr, expected_memory_ratio = "qwen2_vl", 14.0, 1.2
    config_kwargs, quantized_module_types = _W4["config_kwargs"], _W4["quantized_module_types"]


class TestQwen2VLMBQW4A8(_MBQBase):
    kind, min_sqnr, expected_memory_ratio = "qwen2_vl", 12.0, 1.2
    config_kwargs, quantized_module_types = _W4A8["config_kwargs"], _W4A8["quantized_module_types"]
