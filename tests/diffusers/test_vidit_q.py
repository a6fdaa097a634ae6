"""ViDiT-Q (effalg.diffusers.vidit_q): load forms, calibration, channel balance, mixed precision, save / reload, errors."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import DiffusionPipeline, PixArtTransformer2DModel
from diffusers.quantizers import PipelineQuantizationConfig
from safetensors.torch import load_file, save_file
from torch import nn

import effalg.diffusers as ED
from effalg.core.metrics import psnr
from effalg.core.modules import QuantModuleBase, W4A8Linear, W8A8Linear
from effalg.core.quant.rotation import HadamardRotation
from effalg.diffusers import EffalgLinearConfig, ViDiTQConfig
from effalg.diffusers import testing as T
from effalg.diffusers.vidit_q import layer_metric_group


def _load(path, **kw):
    pipe = DiffusionPipeline.from_pretrained(path, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _calibrated(path, config, prompts=("a cat", "a dog"), steps=2, **kw):
    pipe = _load(path)
    out = ED.calibrate(
        pipe, list(prompts), config, num_inference_steps=steps, progress=False, **T.calibration_kwargs(pipe), **kw
    )
    assert out is pipe
    return pipe


def _quant_types(model):
    return {type(m) for m in model.modules() if isinstance(m, QuantModuleBase)}


def _float_components_untouched(pipe):
    for name in ("text_encoder", "vae"):
        comp = getattr(pipe, name)
        assert not any(isinstance(m, QuantModuleBase) for m in comp.modules()), name


# ---- config -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(weight_bits=5), r"weight_bits must be one of \[4, 8\], got 5"),
        (dict(weight_bits=2), r"weight_bits must be one of \[4, 8\]"),
        (dict(act_bits=4), r"act_bits must be one of \[8\], got 4"),
        (dict(smooth_alpha=0.0), r"smooth_alpha must be a float in \(0, 1\]"),
        (dict(smooth_alpha=1.5), r"smooth_alpha must be a float in \(0, 1\]"),
        (dict(mixed_precision=3.0), r"avg_bits must be a number in \[4, 8\]"),
        (
            dict(plan={"a": 3}),
            r"plan: layer 'a' has \(weight_bits, act_bits\)=\(3, 8\); allowed: weight_bits in \[4, 8\]",
        ),
        (dict(balance_layers="("), r"balance_layers: invalid regex"),
        (dict(rotation_block_size=12), r"rotation_block_size must be None or a power of two"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ViDiTQConfig(**kwargs)


def test_config_roundtrip_and_layer_groups():
    cfg = ViDiTQConfig(weight_bits=4, weight_group_size=16, plan={"x.to_q": 8}, mixed_precision=6)
    again = ViDiTQConfig(**cfg.to_dict())
    assert again == cfg and cfg.to_dict()["plan"]["kind"] == "bit_plan" and cfg.layer_bits("x.to_q") == 8
    assert cfg.layer_bits("y") == 4 and cfg.mixed_precision == {"avg_bits": 6.0, "candidate_bits": [4, 8]}
    assert layer_metric_group("transformer_blocks.0.attn2.to_k") == "cross"
    assert layer_metric_group("temporal_transformer_blocks.1.attn1.to_q") == "temporal"
    assert layer_metric_group("transformer_blocks.0.ff.net.2") == "visual"


# ---- the three load forms (quantize-on-load: data-free parts) -----------------------------------------------------
def test_load_forms(tiny_pixart_alpha):
    ref = T.run_pipeline(_load(tiny_pixart_alpha))
    # balance_layers=None: rotate every quantized layer (the default "auto" balances nothing without calibration)
    direct = _load(tiny_pixart_alpha, quantization_config=ViDiTQConfig(weight_bits=8, act_bits=8, balance_layers=None))
    mapped = _load(
        tiny_pixart_alpha,
        quantization_config=PipelineQuantizationConfig(
            quant_mapping={"transformer": ViDiTQConfig(weight_bits=4, balance_layers=None)}
        ),
    )
    model = PixArtTransformer2DModel.from_pretrained(
        tiny_pixart_alpha, subfolder="transformer", quantization_config=ViDiTQConfig(weight_bits=8)
    )
    assert _quant_types(direct.transformer) == {W8A8Linear} and _quant_types(mapped.transformer) == {W4A8Linear}
    assert _quant_types(model) == {W8A8Linear}
    for pipe in (direct, mapped):
        _float_components_untouched(pipe)
        layer = pipe.transformer.transformer_blocks[0].attn1.to_q
        assert isinstance(layer.input_transform, HadamardRotation) and layer.smooth_scale is None
    assert model.transformer_blocks[0].attn1.to_q.input_transform is None
    assert type(direct.transformer.proj_out) is nn.Linear  # final layer stays float
    assert psnr(ref, T.run_pipeline(direct)) > 40 and psnr(ref, T.run_pipeline(mapped)) > 30


def test_given_plan_mixed_precision_on_load(tiny_pixart_alpha):
    plan = {
        "transformer_blocks.0.ff.net.2": 4,
        "transformer_blocks.1.attn1.to_q": 4,
        "transformer_blocks.1.ff.net.2": None,
    }
    m = PixArtTransformer2DModel.from_pretrained(
        tiny_pixart_alpha, subfolder="transformer", quantization_config=ViDiTQConfig(weight_bits=8, plan=plan)
    )
    assert isinstance(m.transformer_blocks[0].ff.net[2], W4A8Linear)
    assert isinstance(m.transformer_blocks[1].attn1.to_q, W4A8Linear)
    assert type(m.transformer_blocks[1].ff.net[2]) is nn.Linear
    assert isinstance(m.transformer_blocks[0].attn1.to_q, W8A8Linear)
    assert torch.isfinite(T.run_denoiser(m)).all()


# ---- bad input ----------------------------------------------------------------------------------------------------
def test_plan_naming_missing_layers(tiny_pixart_alpha):
    cfg = ViDiTQConfig(plan={"transformer_blocks.9.attn1.to_q": 4, "transformer_blocks.0.attn1.to_q": 4})
    with pytest.raises(
        ValueError, match=r"not in the model PixArtTransformer2DModel: 'transformer_blocks.9.attn1.to_q'"
    ):
        PixArtTransformer2DModel.from_pretrained(tiny_pixart_alpha, subfolder="transformer", quantization_config=cfg)
    with pytest.raises(ValueError, match=r"transformer_blocks\.9\.attn1\.to_q"):
        ED.calibrate(_load(tiny_pixart_alpha), ["a cat"], cfg, num_inference_steps=1)


def test_empty_prompts_and_no_quantizable_layers(tiny_pixart_alpha):
    pipe = _load(tiny_pixart_alpha)
    with pytest.raises(ValueError, match="prompts is empty"):
        ED.calibrate(pipe, [], ViDiTQConfig())
    with pytest.raises(TypeError, match="config must be a .*ViDiTQConfig"):
        ED.calibrate(pipe, ["a"], EffalgLinearConfig())
    none = ViDiTQConfig(modules_to_not_convert=[".*"])
    with pytest.raises(ValueError, match="no quantizable layers in PixArtTransformer2DModel"):
        ED.calibrate(pipe, ["a cat"], none, num_inference_steps=1)
    with pytest.raises(ValueError, match="no quantizable layers in PixArtTransformer2DModel"):
        PixArtTransformer2DModel.from_pretrained(tiny_pixart_alpha, subfolder="transformer", quantization_config=none)
    with pytest.raises(ValueError, match="mixed_precision needs calibration"):
        PixArtTransformer2DModel.from_pretrained(
            tiny_pixart_alpha, subfolder="transformer", quantization_config=ViDiTQConfig(mixed_precision=6.0)
        )


# ---- calibration and fidelity -------------------------------------------------------------------------------------
def test_calibrate_progress_bar(tiny_pixart_alpha, capsys):
    pipe = _load(tiny_pixart_alpha)
    ED.calibrate(
        pipe, ["a cat", "a dog"], ViDiTQConfig(balance_layers=None), num_inference_steps=2, **T.calibration_kwargs(pipe)
    )
    err = capsys.readouterr().err
    assert "ViDiT-Q calibration" in err and "4/4" in err  # prompts x steps
    layer = pipe.transformer.transformer_blocks[0].ff.net[2]
    assert isinstance(layer, W8A8Linear) and layer.smooth_scale is not None
    assert isinstance(layer.input_transform, HadamardRotation)
    qc = pipe.transformer.config.quantization_config
    assert "transformer_blocks.0.ff.net.2" in qc.smoothed_layers


def test_channel_balance_lowers_w4a8_error(tiny_pixart_outliers):
    """Tiny PixArt with injected outlier channels: ViDiT-Q's balance vs plain per-channel / per-token W4A8."""
    ref = T.run_pipeline(_load(tiny_pixart_outliers))
    plain = T.run_pipeline(_load(tiny_pixart_outliers, quantization_config=EffalgLinearConfig(weight_bits=4)))
    prompts = ("a cat", "a dog", "a red circle")
    w4 = _calibrated(tiny_pixart_outliers, ViDiTQConfig(weight_bits=4, balance_layers="auto"), prompts)
    w8 = _calibrated(tiny_pixart_outliers, ViDiTQConfig(weight_bits=8, balance_layers="auto"), prompts)
    plain8 = T.run_pipeline(_load(tiny_pixart_outliers, quantization_config=EffalgLinearConfig(weight_bits=8)))
    p_plain, p_w4, p_w8 = psnr(ref, plain), psnr(ref, T.run_pipeline(w4)), psnr(ref, T.run_pipeline(w8))
    p_plain8 = psnr(ref, plain8)
    print(
        f"\nfinal-image PSNR vs FP: plain W4A8 {p_plain:.2f} dB, ViDiT-Q W4A8 {p_w4:.2f} dB; "
        f"plain W8A8 {p_plain8:.2f} dB, ViDiT-Q W8A8 {p_w8:.2f} dB"
    )
    balanced = w4.transformer.config.quantization_config.balance_layers
    assert balanced and all(n.endswith(("to_out.0", "ff.net.2")) for n in balanced)  # the outlier inputs
    assert p_w4 > p_plain + 1.0
    assert p_w8 > p_plain8 + 3.0 and p_w8 > 45.0


# ---- mixed precision, save / reload --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mp_saved(tiny_pixart_alpha, tmp_path_factory):
    pipe = _calibrated(tiny_pixart_alpha, ViDiTQConfig(balance_layers=None, mixed_precision={"avg_bits": 6.0}))
    images = T.run_pipeline(pipe)
    d = tmp_path_factory.mktemp("vq") / "pixart-vidit-q"
    pipe.save_pretrained(d)
    return pipe, d, images


def test_mixed_precision_plan_respects_budget_and_runs(mp_saved):
    pipe, _, images = mp_saved
    qc = pipe.transformer.config.quantization_config
    plan = qc.bit_plan
    bits = plan.weight_bits()
    sizes = {n: pipe.transformer.get_submodule(n).out_features * pipe.transformer.get_submodule(n).in_features
             for n in bits}  # fmt: skip
    avg = sum(sizes[n] * b for n, b in bits.items()) / sum(sizes.values())
    assert avg <= 6.0 + 1e-9 and set(bits.values()) == {4, 8}
    assert set(plan.metadata["groups"].values()) == {"cross", "visual"}
    for n, b in bits.items():
        assert isinstance(pipe.transformer.get_submodule(n), W4A8Linear if b == 4 else W8A8Linear), n
    assert torch.isfinite(images).all()


def test_save_layout_and_model_card(mp_saved):
    pipe, d, _ = mp_saved
    qc = json.load(open(d / "transformer" / "config.json"))["quantization_config"]
    assert qc["quant_method"] == "effalg_vidit_q" and qc["version"] == 1 and qc["plan"]["kind"] == "bit_plan"
    sd = load_file(d / "transformer" / "diffusion_pytorch_model.safetensors")
    name = "transformer_blocks.0.ff.net.2"
    assert sd[f"{name}.smooth_scale"].dtype == torch.float32
    assert set(sd[f"{name}.input_transform.signs"].unique().tolist()) <= {-1.0, 1.0}
    assert sd[f"{name}.qweight"].dtype in (torch.int8, torch.uint8)
    for comp in ("text_encoder", "vae"):
        assert "quantization_config" not in json.load(open(d / comp / "config.json"))
    card = (d / "README.md").read_text()
    for s in ("library_name: diffusers", "- effalg\n", "- vidit-q\n", "import effalg.diffusers", "from_pretrained("):
        assert s in card


def test_reload_bit_identical(mp_saved):
    pipe, d, images = mp_saved
    again = _load(d)
    assert type(again.transformer.hf_quantizer).__name__ == "ViDiTQQuantizer"
    assert _quant_types(again.transformer) == {W4A8Linear, W8A8Linear}
    assert torch.equal(T.run_pipeline(again), images)
    model = PixArtTransformer2DModel.from_pretrained(d, subfolder="transformer")
    assert torch.equal(T.run_denoiser(model), T.run_denoiser(pipe.transformer))


def test_checkpoint_missing_quantized_tensors(mp_saved, tmp_path):
    _, d, _ = mp_saved
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    f = bad / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    gone = ["transformer_blocks.0.ff.net.2.smooth_scale", "transformer_blocks.1.attn1.to_q.input_transform.signs"]
    for k in gone:
        del sd[k]
    save_file(sd, f)
    with pytest.raises(
        ValueError, match=r"missing quantized tensor.*ff\.net\.2\.smooth_scale.*to_q\.input_transform\.signs"
    ):
        DiffusionPipeline.from_pretrained(bad)


_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import effalg.diffusers
    from diffusers import DiffusionPipeline
    from effalg.diffusers import testing as T
    pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
    assert torch.equal(T.run_pipeline(pipe), torch.load(sys.argv[2])), "outputs differ"
    print("OK", type(pipe.transformer.hf_quantizer).__name__)
    """
)


def test_offline_hub_cache_load(mp_saved, tmp_path, hub_cache):
    """Repo-id load from a filled HF cache with HF_HUB_OFFLINE=1 in a fresh process (only `import effalg.diffusers`)."""
    _, d, images = mp_saved
    env = hub_cache(d, "effalg-test/tiny-pixart-vidit-q")
    torch.save(images, tmp_path / "expected.pt")
    res = subprocess.run(
        [sys.executable, "-c", _SCRIPT, "effalg-test/tiny-pixart-vidit-q", str(tmp_path / "expected.pt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "OK ViDiTQQuantizer" in res.stdout


# ---- video DiT: temporal-consistency metric ------------------------------------------------------------------------
def test_video_dit_mixed_precision_uses_three_metrics(tiny_latte):
    pipe = _calibrated(tiny_latte, ViDiTQConfig(mixed_precision=6.0), prompts=("a cat",))
    plan = pipe.transformer.config.quantization_config.bit_plan
    groups = plan.metadata["groups"]
    assert set(groups.values()) == {"cross", "temporal", "visual"}
    assert groups["temporal_transformer_blocks.0.attn1.to_q"] == "temporal"
    assert plan.metadata["avg_bits"] <= 6.0 + 1e-9
    frames = T.run_pipeline(pipe)
    assert frames.shape[1] == 4 and torch.isfinite(frames).all()
