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


_SETTINGS = {  # name: (config kwargs, module type, min SQNR dB)
    "W3": ({"weight_bits": 3, "group_size": 32}, WeightOnlyLinear, 8.0),
    "W4": ({"weight_bits": 4, "group_size": 32}, WeightOnlyLinear, 14.0),
    "W4A8": ({"weight_bits": 4, "act_bits": 8}, W4A8Linear, 12.0),
}
_MODELS = {"Llava": ("llava", 1.4), "LlavaNext": ("llava_next", 1.4), "Qwen2VL": ("qwen2_vl", 1.2)}

for _model, (_kind, _ratio) in _MODELS.items():  # one test class per model x setting
    for _setting, (_kw, _cls, _sqnr) in _SETTINGS.items():
        _name = f"Test{_model}MBQ{_setting}"
        globals()[_name] = type(
            _name,
            (_MBQBase,),
            {"kind": _kind, "config_kwargs": _kw, "quantized_module_types": (_cls,), "min_sqnr": _sqnr,
             "expected_memory_ratio": _ratio},
        )  # fmt: skip
