"""The committed reference models load with plain ``from_pretrained``, score well above chance, and a naively
3-bit weight-quantized copy scores measurably lower."""

import copy

import pytest
import torch

from effalg.core.eval import evaluate_lm, evaluate_t2i, fake_quantize_weights, format_table
from effalg.core.eval.reference import LM_NAME, T2I_NAME, reference_models_dir

try:
    ROOT = reference_models_dir()
except FileNotFoundError:  # pragma: no cover
    ROOT = None


def _have(name):
    return ROOT is not None and (ROOT / name / ("model_index.json" if name == T2I_NAME else "config.json")).exists()


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(min(old, 2))
    yield
    torch.set_num_threads(old)


@pytest.mark.skipif(not _have(LM_NAME), reason="reference LM not trained")
def test_lm_scores_and_3bit_damage():
    from effalg.transformers.reference_models import load_reference_lm

    model, tok = load_reference_lm(ROOT / LM_NAME)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    kw = dict(lengths=(256, 1024), n_seqs=8, seed=7)
    fp = evaluate_lm(model, tok, **kw)
    bad = copy.deepcopy(model)
    assert fake_quantize_weights(bad.model, bits=3, per_channel=False) > 0  # naive per-tensor 3-bit RTN
    w3 = evaluate_lm(bad, tok, **kw)
    print(format_table({"fp32": fp, "w3-rtn": w3}))
    assert fp["retrieval_acc"] > 0.1  # chance 1/32 (the committed model reaches ~0.12 over 256 + 1024 tokens)
    assert fp["by_length"]["256"]["retrieval_acc"] > 0.15
    assert fp["local_acc"] > 0.95  # chance 1/10
    # Measured at commit time: retrieval 0.122 -> 0.089, local 1.000 -> 0.912, loss 0.64 -> 1.03 (deterministic).
    assert w3["retrieval_acc"] < fp["retrieval_acc"] - 0.02 and w3["local_acc"] < fp["local_acc"] - 0.04
    assert w3["loss"] > fp["loss"] + 0.2


@pytest.mark.skipif(not _have(T2I_NAME), reason="reference pipeline not trained")
def test_t2i_scores_and_3bit_damage():
    from effalg.diffusers.reference_models import load_reference_t2i

    pipe = load_reference_t2i(ROOT / T2I_NAME)
    kw = dict(n_prompts=24, num_inference_steps=8, seed=0, n_real=256)
    fp = evaluate_t2i(pipe, **kw)
    fake_quantize_weights(pipe.transformer, bits=3)
    w3 = evaluate_t2i(pipe, **kw)
    print(format_table({"fp32": fp, "dit-w3-rtn": w3}))
    assert fp["color_acc"] > 0.5 and fp["bg_acc"] > 0.5  # chance 1/6
    assert fp["shape_acc"] > 0.5  # chance 1/3
    # Measured at commit time (per-tensor 3-bit RTN of the transformer): all-three accuracy 0.667 -> 0.417.
    assert w3["all_acc"] < fp["all_acc"] - 0.15
