"""EffalgHfQuantizer / EffalgLinearConfig: registration, load paths, save/reload, errors, no-plugin guard, hub."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.quantizers_utils import should_convert_module

import effalg.transformers as et
from effalg.core.modules import W8A8Linear
from effalg.transformers import EffalgHfQuantizer, EffalgLinearConfig
from effalg.transformers._version_gate import check_transformers_version
from effalg.transformers.hub import save_quantized

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 7]])


def _run_py(code: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, timeout=timeout
    )


@pytest.fixture(scope="module")
def w8a8_saved(tiny_llama_ckpt, tmp_path_factory):
    """(on-the-fly model, saved dir) for W8A8 on tiny Llama, with model card."""
    path, _ = tiny_llama_ckpt
    q = AutoModelForCausalLM.from_pretrained(path, quantization_config=EffalgLinearConfig(weight_bits=8, act_bits=8))
    d = str(tmp_path_factory.mktemp("w8a8_saved"))
    save_quantized(q, d, base_model="effalg-test/tiny-llama")
    return q, d


# ---- registration / config -------------------------------------------------------------------------------------------
def test_registered_and_idempotent():
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["effalg_linear"] is EffalgLinearConfig
    assert AUTO_QUANTIZER_MAPPING["effalg_linear"] is EffalgHfQuantizer
    et.register_method("effalg_linear", EffalgLinearConfig, EffalgHfQuantizer)  # second call: no error
    import importlib

    importlib.reload(et)
    assert et.is_registered("effalg_linear")


def test_version_gate_message():
    check_transformers_version("5.23.0")
    with pytest.raises(ImportError, match=r"transformers>=5.23,<5.24, found 5.24.1"):
        check_transformers_version("5.24.1")
    with pytest.raises(ImportError, match="found 4.57.0"):
        check_transformers_version("4.57.0")


def test_config_roundtrip_and_errors():
    cfg = EffalgLinearConfig(weight_bits=4, act_bits=None, weight_group_size=32)
    d = cfg.to_dict()
    assert d["quant_method"] == "effalg_linear" and d["modules_to_not_convert"] == ["lm_head"]
    assert EffalgLinearConfig.from_dict(d).to_dict() == d
    assert EffalgLinearConfig(**d).to_dict() == d
    assert cfg.to_core_config().weight_bits == 4
    with pytest.raises(ValueError, match=r"weight_bits must be one of \[4, 8\]"):
        EffalgLinearConfig(weight_bits=3, act_bits=8)
    with pytest.raises(ValueError, match=r"weight_bits must be one of \[3, 4, 8\]"):
        EffalgLinearConfig(weight_bits=2, act_bits=None)
    with pytest.raises(ValueError, match="weight_group_size must be 0 for W8A8"):
        EffalgLinearConfig(weight_group_size=32)
    with pytest.raises(ValueError, match="quant_method"):
        EffalgLinearConfig(quant_method="awq")


def test_anchored_patterns():
    names = ["model.vision_tower.encoder.layers.0.fc1", "model.language_model.layers.0.self_attn.q_proj"]
    assert [should_convert_module(n, ["vision_tower"]) for n in names] == [True, True]  # not anchored: no skip
    assert [should_convert_module(n, ["model.vision_tower"]) for n in names] == [False, True]


# ---- load paths --------------------------------------------------------------------------------------------------------
def test_on_the_fly_swaps_and_prepacks(w8a8_saved):
    q, _ = w8a8_saved
    assert isinstance(q.model.layers[0].self_attn.q_proj, W8A8Linear)
    assert isinstance(q.lm_head, torch.nn.Linear) and not isinstance(q.lm_head, W8A8Linear)
    # Prepacked for oneDNN where that layout is the fast one (AMX CPUs), plain elsewhere.
    from effalg.kernels.cpu import onednn_int8_available

    assert q.model.layers[0].mlp.up_proj._prepacked == onednn_int8_available()
    assert "weight" not in dict(q.model.layers[0].self_attn.q_proj.named_parameters())
    assert q.is_quantized and isinstance(q.hf_quantizer, EffalgHfQuantizer)


def test_save_reload_identical_logits_and_generate(w8a8_saved):
    q, d = w8a8_saved
    with open(os.path.join(d, "config.json")) as f:
        assert json.load(f)["quantization_config"]["quant_method"] == "effalg_linear"
    stored = load_file(os.path.join(d, "model.safetensors"))
    assert stored["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.int8
    assert "model.layers.0.self_attn.q_proj.weight" not in stored
    q2, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert q2.hf_quantizer.pre_quantized
    with torch.no_grad():
        assert torch.equal(q(IDS).logits, q2(IDS).logits)
        g1 = q.generate(IDS, max_new_tokens=6, do_sample=False)
        g2 = q2.generate(IDS, max_new_tokens=6, do_sample=False)
    assert torch.equal(g1, g2)


def test_bf16_load(tiny_llama_ckpt):
    path, fp = tiny_llama_ckpt
    q = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=EffalgLinearConfig())
    layer = q.model.layers[0].self_attn.q_proj
    assert layer.weight_scale.dtype == torch.float32
    with torch.no_grad():
        out = q(IDS).logits.float()
        ref = fp(IDS).logits
    assert torch.isfinite(out).all() and (out - ref).abs().max().item() < 0.5


def test_missing_quantized_tensor_is_an_error(w8a8_saved, tmp_path):
    _, d = w8a8_saved
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    sd = load_file(str(bad / "model.safetensors"))
    del sd["model.layers.1.mlp.down_proj.weight_scale"]
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight_scale"):
        AutoModelForCausalLM.from_pretrained(str(bad))


def test_no_quantizable_layers(tiny_llama_ckpt):
    with pytest.raises(ValueError, match="no quantizable nn.Linear"):
        AutoModelForCausalLM.from_pretrained(
            tiny_llama_ckpt[0], quantization_config=EffalgLinearConfig(modules_to_not_convert=["model", "lm_head"])
        )


def test_save_requires_serializable_method():
    q = EffalgHfQuantizer(EffalgLinearConfig())
    assert q.is_serializable() is True and q.is_trainable is False


# ---- without the plugin / hub ------------------------------------------------------------------------------------------
def test_without_plugin_load_is_not_silent(w8a8_saved):
    """Without ``import effalg.transformers`` the load fails, naming effalg (transformers alone would only warn about
    the unknown quant_method); forcing another attention implementation still exposes the mismatch in the report."""
    _, d = w8a8_saved
    r = _run_py(
        f"""
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained({d!r})
        """
    )
    assert r.returncode != 0 and 'attn_implementation="effalg_sdpa"' in r.stderr, r.stderr[-2000:]
    r = _run_py(
        f"""
        import sys
        from transformers import AutoModelForCausalLM
        m, info = AutoModelForCausalLM.from_pretrained({d!r}, attn_implementation="sdpa", output_loading_info=True)
        assert "effalg.transformers" not in sys.modules
        print("MISSING", sorted(info["missing_keys"])[:3])
        print("UNEXPECTED", sorted(info["unexpected_keys"])[:3])
        print("NMISSING", len(info["missing_keys"]), "NUNEXPECTED", len(info["unexpected_keys"]))
        """
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "_proj.weight'" in r.stdout and "_proj.qweight" in r.stdout  # float names MISSING, packed UNEXPECTED
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("NMISSING")][0].split()
    assert int(line[1]) > 0 and int(line[3]) > 0


def test_model_card(w8a8_saved):
    _, d = w8a8_saved
    with open(os.path.join(d, "README.md")) as f:
        card = f.read()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "- effalg\n" in card and "- effalg_linear\n" in card and "- w8a8\n" in card
    assert "base_model: effalg-test/tiny-llama" in card
    assert "import effalg.transformers" in card and "AutoModelForCausalLM.from_pretrained(" in card


def test_offline_hub_cache_load(w8a8_saved, tmp_path, hub_cache):
    q, d = w8a8_saved
    env = hub_cache(d, "effalg-test/tiny-llama-w8a8")
    with torch.no_grad():
        ref = q(IDS).logits
    torch.save(ref, tmp_path / "ref.pt")
    r = _run_py(
        f"""
        import torch, effalg.transformers
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained("effalg-test/tiny-llama-w8a8")
        with torch.no_grad():
            out = m(torch.tensor({IDS.tolist()})).logits
        print("IDENTICAL", torch.equal(out, torch.load({str(tmp_path / "ref.pt")!r})), type(m.hf_quantizer).__name__)
        """,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "IDENTICAL True EffalgHfQuantizer" in r.stdout


def test_import_does_not_pull_diffusers():
    r = _run_py(
        """
        import sys, effalg.transformers
        bad = [m for m in sys.modules if m == "diffusers" or m.startswith(("diffusers.", "effalg.diffusers"))]
        print("BAD", bad)
        """
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "BAD []" in r.stdout


def test_plain_save_pretrained_writes_model_card(w8a8_saved, tmp_path):
    """``save_pretrained`` on a quantized model writes the card; it never replaces a README effalg did not write."""
    import copy

    q, _ = w8a8_saved
    out = tmp_path / "saved"
    q.save_pretrained(out)
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "- effalg" in card and "import effalg.transformers" in card
    user = tmp_path / "user"
    user.mkdir()
    (user / "README.md").write_text("my own card")
    copy.deepcopy(q).save_pretrained(user)  # the hook follows deep copies
    assert (user / "README.md").read_text() == "my own card"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, q(IDS).logits)


@pytest.fixture(scope="module")
def llama_width_ckpt(tmp_path_factory):
    """Llama-7B widths (4096 / 11008), 1 layer, a 1024-token vocabulary, bf16, in 100 MB shards."""
    from effalg.transformers.testing import llama_7b_shaped

    return llama_7b_shaped(tmp_path_factory.mktemp("llama_width"), num_layers=1, vocab_size=1024,
                           max_shard_size="100MB")[0]  # fmt: skip


@pytest.mark.parametrize("config", ["EffalgLinearConfig(8, 8)", "EffalgLinearConfig(4, None, weight_group_size=128)"])
def test_quantize_on_load_memory_is_bounded(llama_width_ckpt, config, monkeypatch):
    """Default glibc settings, sharded checkpoint: anonymous memory peaks within 200 MiB of the quantized model and
    drops back to it after the load."""
    from effalg.core.testing.memory import measure_in_subprocess

    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX"):
        monkeypatch.delenv(var, raising=False)
    setup = """
    import torch
    from transformers import AutoModelForCausalLM
    from effalg.transformers import EffalgLinearConfig
    torch.set_num_threads(1)
    """
    code = (f"model = AutoModelForCausalLM.from_pretrained({llama_width_ckpt!r}, dtype=torch.bfloat16, "
            f"quantization_config={config})")  # fmt: skip
    r = measure_in_subprocess(code, setup)
    assert r["model"] > 50, r  # W8A8: 193 MiB, W4 g128: 105 MiB
    assert r["peak_over_model"] < 200, r
    assert r["after_over_model"] < 48, r


@pytest.mark.parametrize("offload_buffers", [False, True])
def test_disk_offloaded_quantized_model_equals_in_memory(tiny_llama_ckpt, tmp_path, offload_buffers):
    """accelerate device map with the decoder layers on disk: packed weights and scales move with their modules."""
    from effalg.transformers.testing import tiny_text_inputs

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_ckpt[0], quantization_config=EffalgLinearConfig(8, 8))
    model.save_pretrained(tmp_path / "q")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    device_map = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}  # fmt: skip
    off = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map=device_map, offload_folder=tmp_path / "off",
                                               offload_buffers=offload_buffers).eval()  # fmt: skip
    q_proj = off.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, W8A8Linear) and hasattr(q_proj, "_hf_hook") and q_proj._hf_hook.offload
    assert off.model.layers[0].mlp.down_proj.qweight.is_meta  # on disk, reloaded at each forward
    in_memory = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map={"": "cpu"})
    assert "qweight" in in_memory.model.layers[0].self_attn.q_proj._buffers  # no offload: buffers (prepackable)
    x = tiny_text_inputs()
    with torch.no_grad():
        assert torch.equal(off(x).logits, ref(x).logits)
