"""MBQ (effalg.transformers.mbq): config, sensitivity, scale search and folding, save / reload, errors, and the
plugin-less load guard of every effalg transformers checkpoint."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

import effalg.transformers as ET
from effalg.core.modules import W4A8Linear, WeightOnlyLinear
from effalg.transformers import EffalgLinearConfig, MBQConfig, calibrate_mbq
from effalg.transformers.mbq import _fold, decoder_layers
from effalg.transformers.testing import tiny_vlm_samples

KINDS = ["llava", "llava_next", "qwen2_vl"]


def _float(ckpt):
    return AutoModelForImageTextToText.from_pretrained(ckpt[0]).eval()


def _run(model, sample):
    with torch.no_grad():
        return model(**{k: v for k, v in sample.items() if k != "labels"}).logits


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(weight_bits=5), r"weight_bits must be one of \[3, 4\] with act_bits=None, got 5"),
        (dict(weight_bits=3, act_bits=8), r"weight_bits must be one of \[4\] with act_bits=8"),
        (dict(act_bits=4), "act_bits must be None .* or 8"),
        (dict(act_bits=8, group_size=128), r"W4A8 weights are per output channel"),
        (dict(loss="l2"), "loss must be 'mae' or 'mse'"),
        (dict(grid=0), "grid must be a positive int"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        MBQConfig(**kw)


def test_config_defaults_and_round_trip():
    w3 = MBQConfig(weight_bits=3)
    assert (w3.group_size, w3.loss, w3.method_tag) == (128, "mae", "w3a16-g128")
    w4a8 = MBQConfig(weight_bits=4, act_bits=8)
    assert (w4a8.group_size, w4a8.method_tag) == (0, "w4a8")
    assert MBQConfig(balance_modalities=False).loss == "mse"  # plain AWQ
    assert MBQConfig(**w3.to_dict()).to_dict() == w3.to_dict()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", [(3, None), (4, None), (4, 8)])
def test_calibrate_save_reload_bit_identical(kind, bits, request, tmp_path):
    ckpt = request.getfixturevalue(f"tiny_{kind}_ckpt")
    model = _float(ckpt)
    samples = tiny_vlm_samples(model, n=3)
    ref = _run(model, samples[0])
    cfg = MBQConfig(weight_bits=bits[0], act_bits=bits[1], group_size=None if bits[1] else 32)
    calibrate_mbq(model, None, samples, cfg, progress=False)
    prefix, layers = decoder_layers(model)
    want = W4A8Linear if bits[1] else WeightOnlyLinear
    quantized = {n for n, m in model.named_modules() if isinstance(m, want)}
    assert quantized and all(n.startswith(prefix + ".") for n in quantized)  # only the language decoder
    assert len(quantized) == 7 * len(layers)
    out = _run(model, samples[0])
    assert torch.isfinite(out).all()
    assert (out - ref).abs().mean() < 0.5 * ref.abs().mean()  # random tiny weights at 3-4 bits: a sanity bound
    cal = model.config.quantization_config.calibration
    assert len(cal["scale_exponents"]) == len(layers) and len(cal["vision_text_grad_ratio"]["attn"]) == len(layers)
    model.save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "config.json"))["quantization_config"]["quant_method"] == "effalg_mbq"
    card = (tmp_path / "README.md").read_text()
    assert "- effalg\n" in card and "- effalg_mbq\n" in card and "- mbq\n" in card
    again = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(again.hf_quantizer).__name__ == "MBQQuantizer"
    assert torch.equal(_run(again, samples[0]), out)


@pytest.mark.parametrize("kind", KINDS)
def test_vision_tower_w4a8_option_saves_and_reloads(kind, request, tmp_path):
    ckpt = request.getfixturevalue(f"tiny_{kind}_ckpt")
    model = _float(ckpt)
    samples = tiny_vlm_samples(model, n=2)
    ref = _run(model, samples[0])
    cfg = MBQConfig(weight_bits=4, group_size=32, quantize_vision_tower=True)
    calibrate_mbq(model, None, samples, cfg, progress=False)
    prefix, _ = decoder_layers(model)
    vt = cfg.vision_tower
    assert vt == {"qwen2_vl": "model.visual"}.get(kind, "model.vision_tower") and cfg.method_tag == "w4a16-g32+vision-w4a8"
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, (W4A8Linear, WeightOnlyLinear, nn.Linear))}
    assert all(t is W4A8Linear for n, t in kinds.items() if n.startswith(vt + "."))
    assert all(t is WeightOnlyLinear for n, t in kinds.items() if n.startswith(prefix + "."))
    assert kinds["lm_head"] is nn.Linear and not any(n.startswith(vt) for n in cfg.modules_to_not_convert)
    out = _run(model, samples[0])
    assert (out - ref).abs().mean() < 0.5 * ref.abs().mean()
    model.save_pretrained(tmp_path)
    saved = json.load(open(tmp_path / "config.json"))["quantization_config"]
    assert saved["quantize_vision_tower"] is True and saved["vision_tower"] == vt
    again = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert isinstance(again.get_submodule(vt + "." + next(n for n in kinds if n.startswith(vt + "."))[len(vt) + 1 :]),
                      W4A8Linear)  # fmt: skip
    assert torch.equal(_run(again, samples[0]), out)


def test_vision_tower_option_needs_a_vision_tower(tiny_llava_ckpt):
    from effalg.transformers.mbq import vision_tower

    with pytest.raises(ValueError, match="has no vision tower module"):
        vision_tower(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="quantize_vision_tower must be a bool"):
        MBQConfig(quantize_vision_tower="yes")


def test_mbq_weighs_vision_tokens_by_gradient_ratio(tiny_llava_ckpt):
    model = _float(tiny_llava_ckpt)
    samples = tiny_vlm_samples(model, n=3)
    calibrate_mbq(model, None, samples, MBQConfig(weight_bits=3, group_size=32), progress=False)
    ratios = model.config.quantization_config.calibration["vision_text_grad_ratio"]
    # the last layer's outputs at image positions never reach the answer logits (causal): zero vision gradient
    assert ratios["attn"][-1] == 0.0 and ratios["mlp"][-1] == 0.0
    assert all(r >= 0 for r in ratios["attn"] + ratios["mlp"])
    awq = _float(tiny_llava_ckpt)
    calibrate_mbq(awq, None, samples, MBQConfig(weight_bits=3, group_size=32, balance_modalities=False), progress=False)
    assert awq.config.quantization_config.calibration["vision_text_grad_ratio"] is None


def test_folding_is_exact_in_float(tiny_llava_ckpt):
    model = _float(tiny_llava_ckpt)
    sample = tiny_vlm_samples(model, n=1)[0]
    ref = _run(model, sample)
    _, layers = decoder_layers(model)
    layer = layers[0]
    g = torch.Generator().manual_seed(0)
    s = torch.rand(layer.mlp.up_proj.out_features, generator=g) + 0.5
    _fold(layer.mlp.up_proj, [layer.mlp.down_proj], s)
    s2 = torch.rand(layer.input_layernorm.weight.shape[0], generator=g) + 0.5
    attn = layer.self_attn
    _fold(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], s2)
    torch.testing.assert_close(_run(model, sample), ref, rtol=1e-4, atol=1e-4)


def test_bad_samples_and_architectures(tiny_llava_ckpt, tiny_llama_ckpt):
    model = _float(tiny_llava_ckpt)
    samples = tiny_vlm_samples(model, n=2)
    no_image = [dict(samples[0], input_ids=torch.full_like(samples[0]["input_ids"], 7)), samples[1]]
    with pytest.raises(ValueError, match=r"sample 0 has no image tokens \(id 255\)"):
        calibrate_mbq(model, None, no_image, MBQConfig(group_size=32), progress=False)
    no_labels = [samples[0], dict(samples[1], labels=torch.full_like(samples[1]["labels"], -100))]
    with pytest.raises(ValueError, match="sample 1 has no labels"):
        calibrate_mbq(model, None, no_labels, MBQConfig(group_size=32), progress=False)
    with pytest.raises(ValueError, match=r"group_size 128 does not divide in_features=64 of model\.language_model"):
        calibrate_mbq(model, None, samples, MBQConfig(), progress=False)
    with pytest.raises(ValueError, match=r"Sequential has no language decoder layer list.*unsupported architecture"):
        decoder_layers(nn.Sequential(nn.Linear(2, 2)))
    layer = decoder_layers(model)[1][0]
    layer.mlp.down_proj = nn.Identity()
    del layer.mlp.down_proj
    with pytest.raises(ValueError, match=r"layer model\.language_model\.layers\.0 has no module 'mlp\.down_proj'"):
        decoder_layers(model)


def test_float_checkpoint_needs_calibration(tiny_llava_ckpt):
    with pytest.raises(ValueError, match=r"MBQConfig needs calibration data.*calibrate_mbq"):
        AutoModelForImageTextToText.from_pretrained(tiny_llava_ckpt[0], quantization_config=MBQConfig(group_size=32))


def test_checkpoint_missing_packed_tensors(tiny_llava_ckpt, tmp_path):
    model = _float(tiny_llava_ckpt)
    calibrate_mbq(model, None, tiny_vlm_samples(model, n=2), MBQConfig(weight_bits=3, group_size=32), progress=False)
    model.save_pretrained(tmp_path / "ok")
    shutil.copytree(tmp_path / "ok", tmp_path / "bad")
    f = tmp_path / "bad" / "model.safetensors"
    sd = load_file(f)
    (key,) = [k for k in sd if k.endswith("layers.1.mlp.up_proj.qweight")]  # saved under the legacy LLaVA names
    del sd[key]
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing from the checkpoint.*layers\.1\.mlp\.up_proj\.qweight"):
        AutoModelForImageTextToText.from_pretrained(tmp_path / "bad")


_NO_PLUGIN = "from transformers import {cls}; {cls}.from_pretrained({path!r})"


@pytest.mark.parametrize("kind", ["mbq", "linear"])
def test_plugin_less_load_fails_loudly(kind, tiny_llava_ckpt, tiny_llama_ckpt, tmp_path):
    if kind == "mbq":
        model, cls = _float(tiny_llava_ckpt), "AutoModelForImageTextToText"
        calibrate_mbq(model, None, tiny_vlm_samples(model, n=2), MBQConfig(group_size=32), progress=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_ckpt[0], quantization_config=EffalgLinearConfig())
        cls = "AutoModelForCausalLM"
    model.save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "config.json"))["attn_implementation"] == ET.PLUGIN_ATTENTION
    r = subprocess.run(
        [sys.executable, "-c", _NO_PLUGIN.format(cls=cls, path=str(tmp_path))], capture_output=True, text=True
    )
    assert r.returncode != 0 and 'attn_implementation="effalg_sdpa"' in r.stderr
    again = getattr(__import__("transformers"), cls).from_pretrained(tmp_path)  # with the plugin: sdpa
    assert again.config._attn_implementation == ET.PLUGIN_ATTENTION


def test_reload_from_the_hub_cache_by_repo_id(tiny_qwen2_vl_ckpt, tmp_path, hub_cache):
    model = _float(tiny_qwen2_vl_ckpt)
    samples = tiny_vlm_samples(model, n=2)
    calibrate_mbq(model, None, samples, MBQConfig(weight_bits=3, group_size=32), progress=False)
    model.save_pretrained(tmp_path / "saved")
    env = hub_cache(tmp_path / "saved", "effalg-test/tiny-qwen2-vl-mbq-w3")
    torch.save({"out": _run(model, samples[0]), "sample": samples[0]}, tmp_path / "ref.pt")
    code = f"""
import torch, effalg.transformers
from transformers import AutoModelForImageTextToText
m = AutoModelForImageTextToText.from_pretrained("effalg-test/tiny-qwen2-vl-mbq-w3").eval()
ref = torch.load({str(tmp_path / "ref.pt")!r})
with torch.no_grad():
    out = m(**{{k: v for k, v in ref["sample"].items() if k != "labels"}}).logits
print("IDENTICAL", torch.equal(out, ref["out"]), type(m.hf_quantizer).__name__)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "IDENTICAL True MBQQuantizer" in r.stdout
