"""MixDQ (effalg.diffusers.mixdq): load forms, BOS-aware cross-attention, calibration (static ranges, shortcut split,
float layers), metric-decoupled mixed precision, bit maps, save / reload, errors."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from diffusers.quantizers import PipelineQuantizationConfig
from safetensors.torch import load_file
from torch import nn

import effalg.diffusers as ED
from effalg.core.modules import BOSAwareWxA8Linear, InputSplitConv2d, QuantModuleBase, WxA8Conv2d, WxA8Linear
from effalg.diffusers import MixDQConfig, load_mixdq_bit_maps
from effalg.diffusers import testing as T
from effalg.diffusers.mixdq import is_bos_layer, is_content_layer


def _load(path, **kw):
    pipe = DiffusionPipeline.from_pretrained(path, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _calibrated(path, config, prompts=("a cat", "a dog", "a red bird"), steps=2, **kw):
    pipe = _load(path)
    out = ED.calibrate(
        pipe, list(prompts), config, num_inference_steps=steps, progress=False, **T.calibration_kwargs(pipe), **kw
    )
    assert out is pipe
    return pipe


def run_with_bos(unet, ref=None):
    """``unet`` on seeded inputs whose text token 0 is the calibrated BOS features (of ``ref``, default ``unet``)."""
    kw = T.denoiser_inputs(unet)
    m = next(m for m in (ref or unet).modules() if isinstance(m, BOSAwareWxA8Linear))
    kw["encoder_hidden_states"][:, 0] = m.bos_input
    return unet(**kw)[0]


def _rel(a, b):
    return (
        float((a - b).norm() / a.norm())
        if a.requires_grad is False
        else float((a - b).detach().norm() / a.detach().norm())
    )


def _float_share(model, kind):
    """Share of ``kind`` layers' weight elements (quantized: at their float size) left in float."""
    total = left = 0
    for m in model.modules():
        if isinstance(m, kind):
            total += m.weight.numel()
            left += m.weight.numel()
        elif isinstance(m, (WxA8Conv2d, InputSplitConv2d) if kind is nn.Conv2d else (WxA8Linear,)):
            total += (
                m.out_channels * m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                if kind is nn.Conv2d
                else (m.out_features * m.in_features)
            )
    return left / total


# ---- config -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(weight_bits=5), r"weight_bits must be one of \[2, 4, 8\], got 5"),
        (dict(act_bits=4), r"act_bits must be 8, got 4"),
        (dict(act_bits=None), r"act_bits=None \(weight-only\) is not available"),
        (dict(mixed_precision=1.0), r"avg_bits must be a number in \[2, 8\]"),
        (dict(mixed_precision={"avg_bits": 4, "metric": "psnr"}), r"metric must be 'decoupled' or 'sqnr'"),
        (dict(float_layers=-1), r"float_layers must be 'auto' or an int >= 0"),
        (
            dict(plan={"a": 3}),
            r"plan: layer 'a' has \(weight_bits, act_bits\)=\(3, 8\); allowed: weight_bits in \[2, 4, 8\]",
        ),
        (dict(bos_rows="yes"), r"bos_rows must be None or 'precomputed'"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MixDQConfig(**kwargs)


def test_config_defaults_roundtrip():
    c = MixDQConfig()
    assert (c.weight_bits, c.act_bits, c.bos_aware, c.plan) == (8, 8, True, None)
    d = c.to_dict()
    assert d["quant_method"] == "effalg_mixdq" and d["version"] == 1
    assert MixDQConfig.from_dict(d) == c


def test_layer_groups():
    assert is_content_layer("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q")
    assert is_content_layer("up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2")
    assert not is_content_layer("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert not is_content_layer("down_blocks.0.resnets.0.conv1")
    assert is_bos_layer("mid_block.attentions.0.transformer_blocks.0.attn2.to_k")
    assert not is_bos_layer("mid_block.attentions.0.transformer_blocks.0.attn2.to_q")


# ---- quantize-on-load ---------------------------------------------------------------------------------------------
def test_literal_one_liner_loads_and_runs(tiny_sd):
    ref = _load(tiny_sd)
    pipe = DiffusionPipeline.from_pretrained(tiny_sd, quantization_config=MixDQConfig())
    unet = pipe.unet
    assert type(unet.hf_quantizer).__name__ == "MixDQQuantizer"
    types = {type(m) for m in unet.modules() if isinstance(m, QuantModuleBase)}
    assert types == {WxA8Linear, WxA8Conv2d, BOSAwareWxA8Linear}
    for name in ("text_encoder", "vae"):
        assert not any(isinstance(m, QuantModuleBase) for m in getattr(pipe, name).modules()), name
    # conv_in / conv_out and the time embedding stay float (MixDQ's defaults); every other conv is quantized.
    assert isinstance(unet.conv_in, nn.Conv2d) and isinstance(unet.conv_out, nn.Conv2d)
    assert isinstance(unet.time_embedding.linear_1, nn.Linear)
    assert _float_share(unet, nn.Conv2d) < 0.05
    assert all(isinstance(m, WxA8Linear) for n, m in unet.named_modules() if n.endswith("attn1.to_q"))
    ref_img, img = T.run_pipeline(ref), T.run_pipeline(pipe)
    assert _rel(ref_img, img) < 0.05


def test_three_load_places_agree(tiny_sd):
    a = _load(tiny_sd, quantization_config=MixDQConfig(weight_bits=4))
    b = _load(
        tiny_sd, quantization_config=PipelineQuantizationConfig(quant_mapping={"unet": MixDQConfig(weight_bits=4)})
    )
    unet = UNet2DConditionModel.from_pretrained(
        tiny_sd, subfolder="unet", quantization_config=MixDQConfig(weight_bits=4)
    )
    out = [T.run_denoiser(m) for m in (a.unet, b.unet, unet)]
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_bos_row_equals_float(tiny_sd, bits):
    ref = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    q = UNet2DConditionModel.from_pretrained(
        tiny_sd, subfolder="unet", quantization_config=MixDQConfig(weight_bits=bits)
    )
    names = [n for n, m in q.named_modules() if isinstance(m, BOSAwareWxA8Linear)]
    assert names and all(is_bos_layer(n) for n in names)
    x = torch.randn(2, 16, ref.config.cross_attention_dim) * 3
    x[:, 0] *= 100  # CLIP's BOS features are huge
    for n in names:
        f, m = ref.get_submodule(n), q.get_submodule(n)
        torch.testing.assert_close(m(x)[:, 0], f(x)[:, 0], rtol=1e-5, atol=1e-4), n  # float path (fp32 rounding only)
        assert _rel(f(x)[:, 1:], m(x)[:, 1:]) < {8: 0.02, 4: 0.2, 2: 0.8}[bits]


def test_bos_aware_off_quantizes_token_zero(tiny_sd):
    q = UNet2DConditionModel.from_pretrained(
        tiny_sd, subfolder="unet", quantization_config=MixDQConfig(bos_aware=False)
    )
    assert not any(isinstance(m, BOSAwareWxA8Linear) for m in q.modules())


def test_bos_aware_without_text_tokens_errors(tmp_path):
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2D", cross_attention_dim=32, norm_num_groups=16,
    )  # fmt: skip
    unet.save_pretrained(tmp_path / "u")
    with pytest.raises(ValueError, match=r"bos_aware=True, but UNet2DConditionModel has no cross-attention"):
        UNet2DConditionModel.from_pretrained(tmp_path / "u", quantization_config=MixDQConfig())
    q = UNet2DConditionModel.from_pretrained(tmp_path / "u", quantization_config=MixDQConfig(bos_aware=False))
    assert any(isinstance(m, WxA8Conv2d) for m in q.modules())


def test_bos_layer_rejects_single_token(tiny_sd):
    q = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet", quantization_config=MixDQConfig())
    m = next(m for m in q.modules() if isinstance(m, BOSAwareWxA8Linear))
    with pytest.raises(ValueError, match=r"expected text tokens .*bos_aware=False"):
        m(torch.randn(2, 1, m.in_features))


def test_on_load_errors(tiny_sd):
    with pytest.raises(ValueError, match=r"'no\.such\.layer'"):
        UNet2DConditionModel.from_pretrained(
            tiny_sd, subfolder="unet", quantization_config=MixDQConfig(plan={"no.such.layer": 4})
        )
    with pytest.raises(ValueError, match=r"mixed_precision needs calibration data"):
        UNet2DConditionModel.from_pretrained(
            tiny_sd, subfolder="unet", quantization_config=MixDQConfig(mixed_precision=4.0)
        )
    with pytest.raises(ValueError, match=r"static_act_layers is set but the checkpoint is not quantized"):
        UNet2DConditionModel.from_pretrained(
            tiny_sd, subfolder="unet", quantization_config=MixDQConfig(static_act_layers=["conv_in"])
        )


def test_plan_mixes_bit_widths_and_float(tiny_sd):
    plan = {
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2": 2,
        "down_blocks.0.resnets.0.conv1": 4,
        "mid_block.resnets.0.conv2": None,
    }
    q = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet", quantization_config=MixDQConfig(plan=plan))
    assert q.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2").weight_bits == 2
    assert q.get_submodule("down_blocks.0.resnets.0.conv1").weight_bits == 4
    assert type(q.get_submodule("mid_block.resnets.0.conv2")) is nn.Conv2d
    assert q.get_submodule("down_blocks.0.resnets.0.conv2").weight_bits == 8


# ---- released bit maps ----------------------------------------------------------------------------------------------
def test_mixdq_bit_maps(tiny_sd, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    names = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    names = [n for n in names if not n.startswith(("conv_in", "conv_out", "time_embedding"))]
    w = {f"model.{n}": (2 if is_content_layer(n) else 4) for n in names}
    a = {f"model.{n}": 8 for n in names[1:]}  # names[0] is absent: FP16-protected in the original
    (tmp_path / "w.yaml").write_text("\n".join(f"{k}: {v}" for k, v in w.items()))
    (tmp_path / "a.yaml").write_text("\n".join(f"{k}: {v}" for k, v in a.items()))
    plan = load_mixdq_bit_maps(tmp_path / "w.yaml", tmp_path / "a.yaml")
    assert plan[names[0]] == {"weight_bits": None, "act_bits": None}
    q = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet", quantization_config=MixDQConfig(plan=plan))
    assert type(q.get_submodule(names[0])) in (nn.Linear, nn.Conv2d)
    for n in names[1:]:
        assert q.get_submodule(n).weight_bits == (2 if is_content_layer(n) else 4), n
    (tmp_path / "bad.yaml").write_text("model.down_blocks.9.nothing: 4\n")
    with pytest.raises(ValueError, match=r"down_blocks\.9\.nothing"):
        UNet2DConditionModel.from_pretrained(
            tiny_sd, subfolder="unet", quantization_config=MixDQConfig(plan=load_mixdq_bit_maps(tmp_path / "bad.yaml"))
        )
    with pytest.raises(ValueError, match=r"weight bits must be 2, 4, 8"):
        load_mixdq_bit_maps({"model.a": 3})


# ---- calibration ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calibrated(tiny_sd, tmp_path_factory):
    ref = T.run_pipeline(_load(tiny_sd))
    pipe = _calibrated(tiny_sd, MixDQConfig())
    images = T.run_pipeline(pipe)
    d = tmp_path_factory.mktemp("mixdq") / "sd-mixdq"
    pipe.save_pretrained(d)
    return pipe, d, images, ref


def test_calibration_static_split_bos_float_layers(calibrated):
    pipe, _, images, ref = calibrated
    unet = pipe.unet
    qc = unet.config.quantization_config
    # BOS rows precomputed (the CLIP text encoder is causal), checked against float on the real text embedding.
    bos = [m for m in unet.modules() if isinstance(m, BOSAwareWxA8Linear)]
    assert bos and all(m.precomputed and m.bos_weight is None for m in bos) and qc.bos_rows == "precomputed"
    # Shortcut split: up-block resnets whose input concatenates a skip connection.
    assert qc.split_layers and all(n.startswith("up_blocks.") for n in qc.split_layers)
    for n, sizes in qc.split_layers.items():
        m = unet.get_submodule(n)
        assert isinstance(m, InputSplitConv2d) and m.split_sizes == sizes and sum(sizes) == m.in_channels
        assert all(p.static_act for p in m.parts)
    # Static activations everywhere calibrated; "auto" float layers: round(sqrt(n) / 3), at least 1.
    float_layers = qc.plan["metadata"]["float_layers"]
    n = len(float_layers) + sum(1 for m in unet.modules() if isinstance(m, (WxA8Linear, WxA8Conv2d, InputSplitConv2d)))
    assert len(float_layers) == max(1, round(n**0.5 / 3))
    for name in float_layers:
        assert type(unet.get_submodule(name)) in (nn.Linear, nn.Conv2d)
    static = [m for m in unet.modules() if isinstance(m, (WxA8Linear, WxA8Conv2d))]
    assert all(m.static_act for m in static)
    assert _rel(ref, images) < 0.05


def test_calibrated_beats_naive_static(tiny_sd, calibrated):
    _, _, images, ref = calibrated
    naive = _calibrated(
        tiny_sd, MixDQConfig(bos_aware=False, float_layers=0, modules_to_not_convert=[]), split_shortcuts=False
    )
    assert all(m.static_act for m in naive.unet.modules() if isinstance(m, (WxA8Linear, WxA8Conv2d)))
    assert _rel(ref, images) < _rel(ref, T.run_pipeline(naive))


def test_precomputed_bos_row_checked(calibrated):
    pipe, _, _, _ = calibrated
    name, m = next((n, m) for n, m in pipe.unet.named_modules() if isinstance(m, BOSAwareWxA8Linear))
    x = m.bos_input.expand(2, 5, -1).clone()
    y = m(x)
    assert torch.equal(y[:, 0], m.bos_output.expand(2, -1))
    x[:, 0] += 1.0  # e.g. a LoRA on the text encoder
    with pytest.raises(ValueError, match=r"token 0 is not the BOS features .*recalibrate"):
        m(x)


def test_calibrate_errors(tiny_sd, calibrated):
    pipe, _, _, _ = calibrated
    with pytest.raises(ValueError, match=r"pipe\.unet is already quantized"):
        ED.calibrate(pipe, ["a cat"], MixDQConfig(), num_inference_steps=2, progress=False)
    fresh = _load(tiny_sd)
    with pytest.raises(ValueError, match=r"prompts is empty"):
        ED.calibrate(fresh, [], MixDQConfig(), num_inference_steps=2)
    with pytest.raises(TypeError, match=r"calibrate: config must be a"):
        ED.calibrate(fresh, ["a"], object())


def test_save_layout_and_model_card(calibrated):
    _, d, _, _ = calibrated
    qc = json.load(open(d / "unet" / "config.json"))["quantization_config"]
    assert qc["quant_method"] == "effalg_mixdq" and qc["version"] == 1 and qc["bos_rows"] == "precomputed"
    sd = load_file(d / "unet" / "diffusion_pytorch_model.safetensors")
    name = next(k for k in sd if k.endswith("attn2.to_k.bos_output"))[: -len(".bos_output")]
    assert sd[f"{name}.bos_output"].dtype == torch.float32 and f"{name}.bos_weight" not in sd
    assert sd[f"{name}.act_scale"].dtype == torch.float32 and sd[f"{name}.act_zero"].dtype == torch.int32
    split = next(iter(qc["split_layers"]))
    assert f"{split}.parts.1.qweight" in sd and f"{split}.parts.0.act_scale" in sd
    assert all(sd[k].dtype in (torch.int8, torch.uint8) for k in sd if k.endswith("qweight"))
    for comp in ("text_encoder", "vae"):
        assert "quantization_config" not in json.load(open(d / comp / "config.json"))
    card = (d / "README.md").read_text()
    for s in ("library_name: diffusers", "- effalg\n", "- mixdq\n", "import effalg.diffusers"):
        assert s in card


def test_reload_bit_identical(calibrated):
    pipe, d, images, _ = calibrated
    again = _load(d)
    assert type(again.unet.hf_quantizer).__name__ == "MixDQQuantizer"
    assert torch.equal(T.run_pipeline(again), images)
    unet = UNet2DConditionModel.from_pretrained(d, subfolder="unet")
    assert torch.equal(run_with_bos(unet), run_with_bos(pipe.unet))


def test_disk_offloaded_unet_equals_in_memory(calibrated, tmp_path):
    """accelerate device map with the UNet's blocks on disk: packed weights, static qparams, split parts and BOS rows
    move with their modules."""
    pipe, d, _, _ = calibrated
    top = {n: "cpu" for n, _ in pipe.unet.named_children()} | {"down_blocks": "disk", "up_blocks": "disk"}
    off = UNet2DConditionModel.from_pretrained(d, subfolder="unet", device_map=top, offload_folder=tmp_path)
    bos = next(m for m in off.up_blocks.modules() if isinstance(m, BOSAwareWxA8Linear))
    assert bos.bos_output.is_meta and bos.qweight.is_meta  # reloaded from disk at each forward
    assert torch.equal(run_with_bos(off, ref=pipe.unet), run_with_bos(pipe.unet))


def test_reload_in_half_precision(calibrated):
    _, d, _, ref = calibrated
    pipe = _load(d, dtype=torch.bfloat16)
    m = next(m for m in pipe.unet.modules() if isinstance(m, BOSAwareWxA8Linear))
    assert m.bos_output.dtype == torch.float32 and m.act_scale.dtype == torch.float32
    assert pipe.unet.conv_in.weight.dtype == torch.bfloat16
    img = T.run_pipeline(pipe).float()
    assert torch.isfinite(img).all() and _rel(ref, img) < 0.1


_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import effalg.diffusers
    from diffusers import DiffusionPipeline
    from effalg.diffusers import testing as T
    pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
    assert torch.equal(T.run_pipeline(pipe), torch.load(sys.argv[2])), "outputs differ"
    print("OK", type(pipe.unet.hf_quantizer).__name__)
    """
)


def test_offline_hub_cache_load(calibrated, tmp_path, hub_cache):
    """Repo-id load from a filled HF cache with HF_HUB_OFFLINE=1 in a fresh process (only `import effalg.diffusers`)."""
    _, d, images, _ = calibrated
    env = hub_cache(d, "effalg-test/tiny-sd-mixdq")
    torch.save(images, tmp_path / "expected.pt")
    res = subprocess.run(
        [sys.executable, "-c", _SCRIPT, "effalg-test/tiny-sd-mixdq", str(tmp_path / "expected.pt")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "OK MixDQQuantizer" in res.stdout


# ---- mixed precision ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed(tiny_sd, tmp_path_factory):
    mp = {"avg_bits": 4.0, "num_ratios": 3, "num_targets": 2}
    pipe = _calibrated(tiny_sd, MixDQConfig(mixed_precision=mp), prompts=("a cat", "a dog"))
    images = T.run_pipeline(pipe)
    d = tmp_path_factory.mktemp("mixdq_mp") / "sd-mixdq-mp"
    pipe.save_pretrained(d)
    return pipe, d, images


def test_mixed_precision_plan(mixed, tiny_sd):
    pipe, d, images = mixed
    plan = pipe.unet.config.quantization_config.bit_plan
    meta = plan.metadata
    bits = {n: b for n, b in plan.weight_bits().items() if b is not None}
    sizes = {n: (lambda m: m.out_features * m.in_features if hasattr(m, "in_features") else
                 m.out_channels * m.in_channels * m.kernel_size[0] * m.kernel_size[1])(pipe.unet.get_submodule(n))
             for n in bits}  # fmt: skip
    avg = sum(sizes[n] * b for n, b in bits.items()) / sum(sizes.values())
    assert avg <= 4.0 + 1e-6 and abs(avg - meta["avg_bits"]) < 1e-9
    assert {b for n, b in bits.items() if not is_content_layer(n)} <= {4, 8}
    assert set(meta["groups"].values()) == {"content", "quality"} and meta["metric"] == "decoupled"
    assert meta["candidates"] >= 1 and len(meta["candidate_pixel_mse"]) == meta["candidates"]
    assert min(meta["candidate_pixel_mse"]) == meta["candidate_pixel_mse"][meta["chosen"]]
    for n, b in bits.items():
        assert pipe.unet.get_submodule(n).weight_bits == b
    ref = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    fp32 = sum(p.numel() * 4 for p in ref.parameters())
    q = sum(t.numel() * t.element_size() for t in list(pipe.unet.parameters()) + list(pipe.unet.buffers()))
    assert q < fp32 / 3
    assert torch.isfinite(images).all()
    again = _load(d)
    assert torch.equal(T.run_pipeline(again), images)


def test_mixed_precision_sqnr_only_and_infeasible(tiny_sd):
    pipe = _calibrated(tiny_sd, MixDQConfig(mixed_precision={"avg_bits": 5.0, "metric": "sqnr"}), prompts=("a cat",))
    meta = pipe.unet.config.quantization_config.bit_plan.metadata
    assert meta["metric"] == "sqnr" and meta["candidates"] == 1
    with pytest.raises(ValueError, match=r"avg_bits=2\.0 is infeasible"):
        _calibrated(tiny_sd, MixDQConfig(mixed_precision=2.0), prompts=("a cat",))
