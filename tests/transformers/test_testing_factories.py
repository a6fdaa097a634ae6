"""Tiny-model factories in effalg.transformers.testing."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from effalg.transformers.testing import inject_outlier_channels, tiny_llama, tiny_qwen2, tiny_text_inputs


def test_llama_saved_and_seeded(tiny_llama_ckpt, tmp_path):
    path, model = tiny_llama_ckpt
    assert os.path.isfile(os.path.join(path, "config.json"))
    _, again = tiny_llama(str(tmp_path / "again"))
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    loaded = AutoModelForCausalLM.from_pretrained(path)
    ids = tiny_text_inputs()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_qwen2_gqa(tiny_qwen2_ckpt):
    cfg = tiny_qwen2_ckpt[1].config
    assert cfg.num_key_value_heads < cfg.num_attention_heads


def test_vlm_names(tiny_llava_ckpt, tiny_qwen2_vl_ckpt):
    assert any(n.startswith("model.vision_tower") for n, _ in tiny_llava_ckpt[1].named_modules())
    assert any(n.startswith("model.visual") for n, _ in tiny_qwen2_vl_ckpt[1].named_modules())


def test_outlier_channels(tmp_path):
    _, m = tiny_qwen2(str(tmp_path / "q"), outlier_channels=3)
    w = m.model.layers[0].input_layernorm.weight
    assert (w > 5).sum().item() == 3
    h = {}
    m.model.layers[0].self_attn.q_proj.register_forward_hook(lambda mod, i, o: h.setdefault("x", i[0]))
    with torch.no_grad():
        m(tiny_text_inputs())
    amax = h["x"].abs().amax(dim=(0, 1))
    assert amax.topk(3).values.min() > 5 * amax.median()


def test_outlier_bad_k():
    with pytest.raises(ValueError, match="k must be an int >= 0"):
        inject_outlier_channels(torch.nn.Module(), -1)
