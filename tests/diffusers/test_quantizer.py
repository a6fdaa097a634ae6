"""EffalgLinearConfig / EffalgDiffusersQuantizer on single diffusers models: registration, configs, loading paths."""

import json
import os
import shutil

import pytest
import torch
from diffusers import PixArtTransformer2DModel, UNet2DConditionModel
from diffusers.quantizers import auto as df_auto
from safetensors.torch import load_file, save_file
from torch import nn

import effalg.diffusers
from effalg.core.modules import QuantModuleBase, W4A8Linear, W8A8Linear
from effalg.diffusers import EffalgLinearConfig, EffalgLinearQuantizer, EffalgQuantMethod
from effalg.diffusers import testing as T
from effalg.diffusers._registry import check_diffusers_version, register_quantization_method

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _pixart(path, **cfg):
    return PixArtTransformer2DModel.from_pretrained(
        path, subfolder="transformer", quantization_config=EffalgLinearConfig(**cfg)
    )


# ---- registration -------------------------------------------------------------------------------------------------
def test_registered_in_diffusers_mappings():
    assert df_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["effalg_linear"] is EffalgLinearConfig
    assert df_auto.AUTO_QUANTIZER_MAPPING["effalg_linear"] is EffalgLinearQuantizer
    assert isinstance(EffalgLinearConfig().quant_method, EffalgQuantMethod)
    assert EffalgLinearConfig().quant_method.value == "effalg_linear"


def test_registration_idempotent_and_guarded():
    import importlib

    register_quantization_method(EffalgLinearConfig, EffalgLinearQuantizer)
    importlib.reload(effalg.diffusers)  # re-import registers again without error
    assert df_auto.AUTO_QUANTIZER_MAPPING["effalg_linear"].__name__ == "EffalgLinearQuantizer"

    class Other(EffalgLinearConfig):
        pass

    Other.__qualname__ = "Other"
    with pytest.raises(ValueError, match="already registered"):
        register_quantization_method(Other, EffalgLinearQuantizer)
    with pytest.raises(TypeError, match="config_cls"):
        register_quantization_method(dict, EffalgLinearQuantizer)


@pytest.mark.parametrize("version", ["0.43.0", "0.41.2", "1.0.0"])
def test_version_gate_rejects(version):
    with pytest.raises(ImportError, match=rf"diffusers>=0.42,<0.43.*diffusers {version} is installed"):
        check_diffusers_version(version)


@pytest.mark.parametrize("version", ["0.42.0", "0.42.1", "0.42.2.dev0"])
def test_version_gate_accepts(version):
    check_diffusers_version(version)


# ---- config -------------------------------------------------------------------------------------------------------
def test_config_roundtrip_and_keys():
    cfg = EffalgLinearConfig(weight_bits=4, act_bits=8, weight_group_size=16, modules_to_not_convert=["proj_out"])
    d = cfg.to_dict()
    assert d == {
        "quant_method": "effalg_linear",
        "version": 1,
        "weight_bits": 4,
        "act_bits": 8,
        "weight_group_size": 16,
        "weight_symmetric": True,
        "modules_to_not_convert": ["proj_out"],
    }
    assert json.loads(cfg.to_json_string()) == d
    again = EffalgLinearConfig.from_dict(json.loads(json.dumps(d)))
    assert again == cfg and again.to_diff_dict() == d
    core = cfg.to_core_config()
    assert (core.weight_bits, core.act_bits, core.weight_group_size, core.version) == (4, 8, 16, 1)


def test_config_bad_inputs():
    with pytest.raises(ValueError, match=r"weight_bits must be one of .4, 8."):
        EffalgLinearConfig(weight_bits=2)
    with pytest.raises(ValueError, match=r"weight_bits must be one of .3, 4, 8."):
        EffalgLinearConfig(weight_bits=2, act_bits=None)
    with pytest.raises(ValueError, match="act_bits must be 8 or None"):
        EffalgLinearConfig(act_bits=16)
    with pytest.raises(ValueError, match="version 7 is not supported"):
        EffalgLinearConfig(version=7)
    with pytest.raises(ValueError, match="quant_method must be 'effalg_linear'"):
        EffalgLinearConfig(quant_method="gguf")
    with pytest.raises(TypeError, match="not a string"):
        EffalgLinearConfig(modules_to_not_convert="proj_out")
    with pytest.raises(TypeError):
        EffalgLinearConfig(bits=8)


# ---- on-the-fly -----------------------------------------------------------------------------------------------------
def test_on_the_fly_pixart_defaults(tiny_pixart_alpha):
    m, info = PixArtTransformer2DModel.from_pretrained(
        tiny_pixart_alpha, subfolder="transformer", quantization_config=EffalgLinearConfig(), output_loading_info=True
    )
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    q = m.hf_quantizer
    assert isinstance(q, EffalgLinearQuantizer) and q.pre_quantized is False
    assert q.is_serializable is True and q.is_trainable is False  # properties in diffusers
    assert isinstance(m.transformer_blocks[0].attn1.to_q, W8A8Linear)
    assert isinstance(m.transformer_blocks[1].ff.net[2], W8A8Linear)
    for name in ("pos_embed", "adaln_single", "caption_projection", "proj_out"):
        assert not any(isinstance(x, W8A8Linear) for x in m.get_submodule(name).modules()), name
    assert type(m.proj_out) is nn.Linear
    # pos_embed is a conv patch embedder (nothing to convert), so only Linear-holding defaults are recorded
    assert sorted(m.config.quantization_config.modules_to_not_convert) == [
        "adaln_single",
        "caption_projection",
        "proj_out",
    ]
    assert all(p.device.type == "cpu" for p in list(m.parameters()) + list(m.buffers()))
    assert m.transformer_blocks[0].attn1.to_q.weight_scale.dtype == torch.float32
    out, ref = (
        T.run_denoiser(m),
        T.run_denoiser(PixArtTransformer2DModel.from_pretrained(tiny_pixart_alpha, subfolder="transformer")),
    )
    assert (out - ref).abs().max() < 0.02


def test_on_the_fly_matches_core_from_float(tiny_pixart_alpha):
    fp = PixArtTransformer2DModel.from_pretrained(tiny_pixart_alpha, subfolder="transformer")
    m = _pixart(tiny_pixart_alpha, weight_bits=4)
    for name in m.hf_quantizer.converted:
        expect = W4A8Linear.from_float(fp.get_submodule(name))
        got = m.get_submodule(name)
        assert torch.equal(got.qweight, expect.qweight) and torch.equal(got.weight_scale, expect.weight_scale), name
        assert torch.equal(got.bias, expect.bias), name


def test_modules_to_not_convert_explicit(tiny_pixart_alpha):
    m = _pixart(tiny_pixart_alpha, modules_to_not_convert=[])
    assert isinstance(m.proj_out, W8A8Linear) and m.config.quantization_config.modules_to_not_convert == []
    m = _pixart(tiny_pixart_alpha, modules_to_not_convert=["transformer_blocks.0", r".*\.ff\..*"])
    assert type(m.transformer_blocks[0].attn1.to_q) is nn.Linear
    assert type(m.transformer_blocks[1].ff.net[2]) is nn.Linear
    assert isinstance(m.transformer_blocks[1].attn1.to_q, W8A8Linear)
    with pytest.raises(ValueError, match=r"no module of PixArtTransformer2DModel matches \['nope'\]"):
        _pixart(tiny_pixart_alpha, modules_to_not_convert=["nope"])


def test_no_quantizable_layers(tiny_pixart_alpha):
    with pytest.raises(ValueError, match="effalg_linear: no quantizable layers in PixArtTransformer2DModel"):
        _pixart(
            tiny_pixart_alpha,
            modules_to_not_convert=[
                "transformer_blocks",
                "pos_embed",
                "adaln_single",
                "caption_projection",
                "proj_out",
            ],
        )


def test_config_object_not_mutated(tiny_pixart_alpha, tiny_sd):
    cfg = EffalgLinearConfig()
    a = _pixart(tiny_pixart_alpha)
    b = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet", quantization_config=cfg)
    assert cfg.modules_to_not_convert is None
    assert "time_embedding" in b.config.quantization_config.modules_to_not_convert
    assert "adaln_single" in a.config.quantization_config.modules_to_not_convert


def test_bf16_load(tiny_pixart_alpha, tmp_path):
    m = PixArtTransformer2DModel.from_pretrained(
        tiny_pixart_alpha, subfolder="transformer", quantization_config=EffalgLinearConfig(), torch_dtype=torch.bfloat16
    )
    lin = m.transformer_blocks[0].attn1.to_q
    assert lin.weight_scale.dtype == torch.float32 and lin.bias.dtype == torch.bfloat16
    assert m.transformer_blocks[0].attn1.to_q.plain_qweight().dtype == torch.int8
    m.save_pretrained(tmp_path / "q")
    r = PixArtTransformer2DModel.from_pretrained(tmp_path / "q", torch_dtype=torch.bfloat16)
    lin2 = r.transformer_blocks[0].attn1.to_q
    assert torch.equal(lin2.weight_scale, lin.weight_scale) and lin2.weight_scale.dtype == torch.float32
    inp = T.denoiser_inputs(m)
    inp = {k: v.bfloat16() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inp.items()}
    with torch.no_grad():
        assert torch.equal(m(**inp)[0], r(**inp)[0])


def test_dequantize(tiny_pixart_alpha):
    m = _pixart(tiny_pixart_alpha)
    out = T.run_denoiser(m)
    m.dequantize()
    assert not any(isinstance(x, W8A8Linear) for x in m.modules())
    assert (T.run_denoiser(m) - out).abs().max() < 0.02


# ---- pre-quantized --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_w8a8(tiny_pixart_alpha, tmp_path_factory):
    d = tmp_path_factory.mktemp("w8a8") / "transformer"
    m = _pixart(tiny_pixart_alpha)
    m.save_pretrained(d)
    return d, T.run_denoiser(m)


def test_save_writes_packed_weights_config_and_card(saved_w8a8):
    d, _ = saved_w8a8
    assert sorted(os.listdir(d)) == ["README.md", "config.json", WEIGHTS]
    sd = load_file(d / WEIGHTS)
    assert sd["transformer_blocks.0.attn1.to_q.qweight"].dtype == torch.int8
    assert sd["transformer_blocks.0.attn1.to_q.weight_scale"].dtype == torch.float32
    assert "transformer_blocks.0.attn1.to_q.weight" not in sd and "proj_out.weight" in sd
    qc = json.load(open(d / "config.json"))["quantization_config"]
    assert qc["quant_method"] == "effalg_linear" and qc["version"] == 1 and qc["weight_bits"] == 8
    card = (d / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\ntags:\n- effalg\n- effalg-linear\n- w8a8\n")
    assert "import effalg.diffusers" in card and "PixArtTransformer2DModel.from_pretrained(" in card
    # saved as "transformer": the (pipeline-style) parent folder gets a card too
    assert (d.parent / "README.md").exists()


def test_pre_quantized_reload_identical(saved_w8a8):
    d, out = saved_w8a8
    m, info = PixArtTransformer2DModel.from_pretrained(d, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert m.hf_quantizer.pre_quantized is True
    assert isinstance(m.transformer_blocks[0].attn1.to_q, W8A8Linear)
    assert torch.equal(T.run_denoiser(m), out)


def test_pre_quantized_missing_tensors_named(saved_w8a8, tmp_path):
    d, _ = saved_w8a8
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    sd = load_file(bad / WEIGHTS)
    del sd["transformer_blocks.1.attn2.to_k.qweight"], sd["transformer_blocks.0.ff.net.2.weight_scale"]
    save_file(sd, bad / WEIGHTS, metadata={"format": "pt"})
    with pytest.raises(
        ValueError,
        match=r"missing quantized tensor\(s\) \['transformer_blocks.0.ff.net.2.weight_scale', "
        r"'transformer_blocks.1.attn2.to_k.qweight'\]",
    ):
        PixArtTransformer2DModel.from_pretrained(bad)


def test_float_checkpoint_marked_quantized_errors(tiny_pixart_alpha, tmp_path):
    bad = tmp_path / "fp_marked"
    shutil.copytree(os.path.join(tiny_pixart_alpha, "transformer"), bad)
    cfg = json.load(open(bad / "config.json"))
    cfg["quantization_config"] = EffalgLinearConfig().to_dict()
    json.dump(cfg, open(bad / "config.json", "w"))
    with pytest.raises(ValueError, match=r"missing quantized tensor\(s\) \[.*to_k.qweight.*\]"):
        PixArtTransformer2DModel.from_pretrained(bad)


def test_save_into_source_folder_refused(saved_w8a8):
    d, out = saved_w8a8
    m = PixArtTransformer2DModel.from_pretrained(d)
    before = (d / WEIGHTS).read_bytes()
    with pytest.raises(ValueError, match="refusing to write into"):
        m.save_pretrained(d)
    assert (d / WEIGHTS).read_bytes() == before
    assert torch.equal(T.run_denoiser(PixArtTransformer2DModel.from_pretrained(d)), out)


def test_offline_quantize_then_save(tiny_pixart_alpha, tmp_path):
    """Offline flow used by calibration methods: swap modules in memory, attach the config, save, plain reload."""
    from effalg.core.config import quantize_

    m = PixArtTransformer2DModel.from_pretrained(tiny_pixart_alpha, subfolder="transformer")
    cfg = EffalgLinearConfig(weight_bits=4).resolved_for(m)
    quantize_(m, cfg.to_core_config())
    m.register_to_config(quantization_config=cfg)
    out = T.run_denoiser(m)
    m.save_pretrained(tmp_path / "off")
    r = PixArtTransformer2DModel.from_pretrained(tmp_path / "off")
    assert isinstance(r.transformer_blocks[0].attn1.to_q, W4A8Linear)
    assert torch.equal(T.run_denoiser(r), out)


# ---- bounded memory while quantizing on load (issue: real-size models) ---------------------------------------------


@pytest.fixture(scope="module")
def full_width_pixart(tmp_path_factory):
    """PixArt-alpha at full width (hidden 1152, caption 4096) with 4 of its 28 blocks, bf16, in 60 MB shards."""
    return T.make_full_size("pixart_alpha", tmp_path_factory.mktemp("pixart_full_width"), layers=4,
                            max_shard_size="60MB")[0]  # fmt: skip


@pytest.mark.parametrize(
    "config",
    ["ViDiTQConfig(8, 8)", "ViDiTQConfig(4, 8)", "EffalgLinearConfig(8, 8)", "EffalgLinearConfig(4, 8)"],
)
def test_quantize_on_load_memory_is_bounded(full_width_pixart, config, monkeypatch):
    """Default environment, default (low_cpu_mem_usage) path, sharded checkpoint: anonymous memory peaks within 200
    MiB of the quantized model and drops back to it after the load. Without effalg's bounded section glibc kept 310-450
    MiB of freed per-layer buffers on this model (measured)."""
    from effalg.core.testing.memory import measure_in_subprocess

    assert len([f for f in os.listdir(full_width_pixart) if f.endswith(".safetensors")]) > 1
    setup = """
    import torch
    from diffusers import PixArtTransformer2DModel
    from effalg.diffusers import EffalgLinearConfig, ViDiTQConfig
    torch.set_num_threads(1)
    """
    code = (f"model = PixArtTransformer2DModel.from_pretrained({str(full_width_pixart)!r}, torch_dtype=torch.bfloat16, "
            f"quantization_config={config})")  # fmt: skip
    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX"):
        monkeypatch.delenv(var, raising=False)  # glibc's defaults
    r = measure_in_subprocess(code, setup)
    assert r["model"] > 80  # the quantized model: 130 MiB at W8A8, 90 MiB at W4A8
    assert r["peak_over_model"] < 200, r
    assert r["after_over_model"] < 48, r


@pytest.mark.parametrize("config", ["linear_w8a8", "vidit_q_w4a8"])
def test_disk_offloaded_quantized_model_equals_in_memory(tiny_pixart_alpha, tmp_path, config):
    """accelerate device map with transformer blocks on disk: packed weights and scales move with their modules."""
    from effalg.diffusers import ViDiTQConfig

    cfg = {"linear_w8a8": EffalgLinearConfig(8, 8), "vidit_q_w4a8": ViDiTQConfig(4, 8)}[config]
    model = PixArtTransformer2DModel.from_pretrained(tiny_pixart_alpha, subfolder="transformer",
                                                     quantization_config=cfg)  # fmt: skip
    model.save_pretrained(tmp_path / "q")
    ref = PixArtTransformer2DModel.from_pretrained(tmp_path / "q").eval()
    top = {n: "cpu" for n, _ in ref.named_children()} | {"scale_shift_table": "cpu", "transformer_blocks": "disk"}
    off = PixArtTransformer2DModel.from_pretrained(tmp_path / "q", device_map=top, offload_folder=tmp_path / "off").eval()
    on_disk = off.transformer_blocks[1].attn1.to_q
    assert isinstance(on_disk, QuantModuleBase) and on_disk.qweight.is_meta  # reloaded from disk at each forward
    assert any(f.startswith("transformer_blocks.1.attn1.to_q.qweight") for f in os.listdir(tmp_path / "off"))
    in_memory = PixArtTransformer2DModel.from_pretrained(tmp_path / "q", device_map={"": "cpu"}).eval()
    assert "qweight" in in_memory.transformer_blocks[0].attn1.to_q._buffers  # no offload: buffers, prepacked
    auto = PixArtTransformer2DModel.from_pretrained(tmp_path / "q", device_map="auto", max_memory={"cpu": "20KB"},
                                                    offload_folder=tmp_path / "off_auto").eval()  # fmt: skip
    assert "disk" in set(auto.hf_device_map.values())
    with torch.no_grad():
        want = T.run_denoiser(ref)
        for m in (off, in_memory, auto):
            assert torch.equal(T.run_denoiser(m), want)


def test_quantize_on_load_to_disk_is_a_clear_error(tiny_pixart_alpha, tmp_path):
    with pytest.raises(ValueError, match=r"'transformer_blocks' on 'disk'.*quantize first"):
        PixArtTransformer2DModel.from_pretrained(tiny_pixart_alpha, subfolder="transformer",
                                                 quantization_config=EffalgLinearConfig(8, 8),
                                                 device_map={"": "cpu", "transformer_blocks": "disk"},
                                                 offload_folder=tmp_path / "off")  # fmt: skip
