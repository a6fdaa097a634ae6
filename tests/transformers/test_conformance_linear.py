"""Conformance suite (effalg.core.testing) for EffalgLinearConfig on tiny Llama / Qwen2 / LLaVA / Qwen2-VL."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

import effalg.transformers  # noqa: F401  (registers effalg_linear)
from effalg.core.modules import W4A8Linear, W8A8Linear, WeightOnlyLinear
from effalg.core.testing.conformance import QuantizationConformanceMixin
from effalg.transformers import EffalgLinearConfig
from effalg.transformers.testing import VISION_SKIP_PATTERNS, tiny_llama


class _TextBase(QuantizationConformanceMixin):
    kind = "llama"
    auto_cls = AutoModelForCausalLM
    config_kwargs: dict = {}
    compile_atol = 1e-4
    checkpoint: str  # set per class from the session's tiny_<kind>_ckpt fixture (tests/transformers/conftest.py)

    @pytest.fixture(autouse=True, scope="class")
    def _checkpoint(self, request):
        request.cls.checkpoint = request.getfixturevalue(f"tiny_{request.cls.kind}_ckpt")[0]

    def make_config(self):
        skip = VISION_SKIP_PATTERNS.get(self.kind)
        return EffalgLinearConfig(**self.config_kwargs, modules_to_not_convert=skip)

    def make_reference(self):
        return self.auto_cls.from_pretrained(self.checkpoint).eval()

    def make_compressed(self):
        return self.auto_cls.from_pretrained(self.checkpoint, quantization_config=self.make_config()).eval()

    def inputs(self) -> dict:
        g = torch.Generator().manual_seed(0)
        return {"input_ids": torch.randint(0, 200, (2, 8), generator=g)}

    def run(self, model):
        with torch.no_grad():
            return model(**self.inputs()).logits

    def save(self, model, directory):
        model.save_pretrained(directory)

    def load(self, directory):
        return self.auto_cls.from_pretrained(directory).eval()

    def compile(self, model):
        return torch.compile(model, backend="eager", fullgraph=False)

    def bad_input_cases(self):
        yield (lambda: EffalgLinearConfig(weight_bits=5), ValueError, r"weight_bits must be one of \[4, 8\]")
        yield (lambda: EffalgLinearConfig(act_bits=4), ValueError, "act_bits must be 8 or None")


class TestLlamaW8A8(_TextBase):
    config_kwargs = {"weight_bits": 8, "act_bits": 8}
    quantized_module_types = (W8A8Linear,)
    min_sqnr = 32.0  # measured 40.3 dB
    atol = 0.02  # measured max |logit diff| 0.006 (|logits| <= 0.65)
    expected_memory_ratio = 1.8  # measured 2.10x; lm_head + embeddings stay float in this tiny model


class TestLlamaW8A8Inductor(TestLlamaW8A8):
    """Same as TestLlamaW8A8 with the default inductor ``torch.compile`` (fullgraph not required)."""

    def compile(self, model):
        return torch.compile(model, fullgraph=False)


class TestLlamaW4A8(_TextBase):
    config_kwargs = {"weight_bits": 4, "act_bits": 8, "weight_group_size": 32}
    quantized_module_types = (W4A8Linear,)
    min_sqnr = 13.0  # measured 16.8 dB
    expected_memory_ratio = 2.2  # measured 2.51x


class TestLlamaW4WeightOnly(_TextBase):
    config_kwargs = {"weight_bits": 4, "act_bits": None, "weight_group_size": 32}
    quantized_module_types = (WeightOnlyLinear,)
    min_sqnr = 13.0  # measured 16.8 dB
    expected_memory_ratio = 2.1  # measured 2.37x


class TestQwen2W8A8(_TextBase):
    kind = "qwen2"
    config_kwargs = {"weight_bits": 8, "act_bits": 8}
    quantized_module_types = (W8A8Linear,)
    min_sqnr = 32.0  # measured 40.7 dB
    atol = 0.02
    expected_memory_ratio = 1.8  # measured 2.03x


class TestQwen2W4A8(_TextBase):
    kind = "qwen2"
    config_kwargs = {"weight_bits": 4, "act_bits": 8}
    quantized_module_types = (W4A8Linear,)
    min_sqnr = 13.0  # measured 17.8 dB
    expected_memory_ratio = 2.2  # measured 2.46x


class TestLlavaW8A8(_TextBase):
    kind = "llava"
    auto_cls = AutoModelForImageTextToText
    config_kwargs = {"weight_bits": 8, "act_bits": 8}
    quantized_module_types = (W8A8Linear,)
    min_sqnr = 30.0  # measured 37.5 dB
    expected_memory_ratio = 1.5  # measured 1.66x (vision tower + projector float)

    def inputs(self):
        g = torch.Generator().manual_seed(0)
        ids = torch.cat([torch.tensor([[1]]), torch.full((1, 16), 255), torch.tensor([[5, 6]])], 1)
        return {"input_ids": ids, "pixel_values": torch.randn(1, 3, 32, 32, generator=g)}

    def test_vision_tower_float(self):
        assert all(not isinstance(m, W8A8Linear) for n, m in self.compressed.named_modules() if "vision_tower" in n)


class TestQwen2VLW8A8(_TextBase):
    kind = "qwen2_vl"
    auto_cls = AutoModelForImageTextToText
    config_kwargs = {"weight_bits": 8, "act_bits": 8}
    quantized_module_types = (W8A8Linear,)
    min_sqnr = 30.0  # measured 39.7 dB
    expected_memory_ratio = 1.3  # measured 1.39x (vision tower float)

    def test_visual_float(self):
        mods = dict(self.compressed.named_modules())
        assert any(n.startswith("model.visual") for n in mods)
        assert all(not isinstance(m, W8A8Linear) for n, m in mods.items() if n.startswith("model.visual"))


def test_w8a8_with_outlier_channels_bounded(tmp_path):
    """The factory's outlier option produces a measurable but bounded W8A8 logit error."""
    path, fp = tiny_llama(tmp_path / "llama_outliers", outlier_channels=4)
    q = AutoModelForCausalLM.from_pretrained(path, quantization_config=EffalgLinearConfig())
    ids = torch.randint(0, 200, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        d = (q(ids).logits - fp(ids).logits).abs().max().item()
    assert 0 < d < 1.0
