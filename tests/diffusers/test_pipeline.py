"""Pipeline-level loading forms, save / reload, offline Hub-cache load and loading without the plugin."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import DiffusionPipeline, PixArtTransformer2DModel
from diffusers.quantizers import PipelineQuantizationConfig
from torch import nn

import effalg.diffusers  # noqa: F401
from effalg.core.modules import QuantModuleBase, W4A8Linear, W8A8Linear
from effalg.diffusers import EffalgLinearConfig
from effalg.diffusers import testing as T


def _n_quant(module):
    return sum(isinstance(m, QuantModuleBase) for m in module.modules())


def _assert_only_denoiser_quantized(pipe, denoiser="transformer", cls=W8A8Linear):
    assert any(isinstance(m, cls) for m in getattr(pipe, denoiser).modules())
    for name in ("text_encoder", "text_encoder_2", "vae"):
        comp = getattr(pipe, name, None)
        if comp is not None:
            assert _n_quant(comp) == 0, name
            assert getattr(comp, "hf_quantizer", None) is None, name


def test_model_level_form(tiny_pixart_alpha):
    m = PixArtTransformer2DModel.from_pretrained(
        tiny_pixart_alpha, subfolder="transformer", quantization_config=EffalgLinearConfig(weight_bits=8, act_bits=8)
    )
    assert _n_quant(m) == len(m.hf_quantizer.converted) > 0


def test_pipeline_quantization_config_form(tiny_pixart_alpha):
    cfg = PipelineQuantizationConfig(quant_mapping={"transformer": EffalgLinearConfig(weight_bits=4)})
    pipe = DiffusionPipeline.from_pretrained(tiny_pixart_alpha, quantization_config=cfg)
    _assert_only_denoiser_quantized(pipe, cls=W4A8Linear)


@pytest.mark.parametrize(
    "name,denoiser",
    [
        ("pixart_alpha", "transformer"),
        ("pixart_sigma", "transformer"),
        ("sd", "unet"),
        ("sd3", "transformer"),
        ("flux", "transformer"),
    ],
)
def test_direct_config_form(request, name, denoiser):
    path = request.getfixturevalue(f"tiny_{name}")
    pipe = DiffusionPipeline.from_pretrained(path, quantization_config=EffalgLinearConfig())
    _assert_only_denoiser_quantized(pipe, denoiser)
    ref = T.run_pipeline(DiffusionPipeline.from_pretrained(path))
    out = T.run_pipeline(pipe)
    assert out.shape == ref.shape and (out - ref).abs().max() < 0.05


@pytest.fixture(scope="module")
def saved_pipe(tiny_pixart_alpha, tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe_q") / "pixart-w8a8"
    pipe = DiffusionPipeline.from_pretrained(tiny_pixart_alpha, quantization_config=EffalgLinearConfig())
    images = T.run_pipeline(pipe)
    pipe.save_pretrained(d)
    return d, images


def test_pipeline_save_layout(saved_pipe, tiny_pixart_alpha):
    d, _ = saved_pipe
    assert json.load(open(d / "model_index.json"))["transformer"] == ["diffusers", "PixArtTransformer2DModel"]
    qc = json.load(open(d / "transformer" / "config.json"))["quantization_config"]
    assert qc["quant_method"] == "effalg_linear" and qc["version"] == 1
    for comp in ("text_encoder", "vae"):
        assert "quantization_config" not in json.load(open(d / comp / "config.json"))
    card = (d / "README.md").read_text()
    assert "library_name: diffusers" in card and "- effalg\n" in card and "- w8a8\n" in card
    assert "import effalg.diffusers" in card and "DiffusionPipeline.from_pretrained(" in card


def test_pipeline_reload_bit_identical(saved_pipe):
    d, images = saved_pipe
    pipe = DiffusionPipeline.from_pretrained(d)
    assert pipe.transformer.hf_quantizer.pre_quantized
    _assert_only_denoiser_quantized(pipe)
    assert torch.equal(T.run_pipeline(pipe), images)


def test_pipeline_save_into_source_refused_and_source_intact(saved_pipe, tmp_path):
    d, images = saved_pipe
    src = tmp_path / "src"
    shutil.copytree(d, src)
    pipe = DiffusionPipeline.from_pretrained(src)
    with pytest.raises(ValueError, match="refusing to write into"):
        pipe.save_pretrained(src)
    assert torch.equal(T.run_pipeline(DiffusionPipeline.from_pretrained(src)), images)


def test_user_readme_not_replaced(saved_pipe, tmp_path):
    d, _ = saved_pipe
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my card\n")
    DiffusionPipeline.from_pretrained(d).save_pretrained(out)
    assert (out / "README.md").read_text() == "my card\n"
    assert "effalg" in (out / "transformer" / "README.md").read_text()


_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from diffusers import DiffusionPipeline
    repo = sys.argv[1]
    try:
        DiffusionPipeline.from_pretrained(repo)
    except ValueError as e:
        print("NOPLUGIN:", e)
    else:
        raise SystemExit("loaded without the plugin")
    import effalg.diffusers
    assert "effalg.transformers" not in sys.modules, "effalg.diffusers imported effalg.transformers"
    from effalg.diffusers import testing as T
    pipe = DiffusionPipeline.from_pretrained(repo)
    assert torch.equal(T.run_pipeline(pipe), torch.load(sys.argv[2])), "outputs differ"
    print("OK", type(pipe.transformer.hf_quantizer).__name__)
    """
)


def test_offline_hub_cache_load_and_no_plugin_error(saved_pipe, tmp_path, hub_cache):
    """Repo-id load from a filled HF cache with HF_HUB_OFFLINE=1, in a fresh process (only `import effalg.diffusers`)."""
    d, images = saved_pipe
    env = hub_cache(d, "effalg-test/tiny-pixart-w8a8")
    torch.save(images, tmp_path / "expected.pt")
    res = subprocess.run(
        [sys.executable, "-c", _SCRIPT, "effalg-test/tiny-pixart-w8a8", str(tmp_path / "expected.pt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "NOPLUGIN: Unknown quantization type, got effalg_linear" in res.stdout
    assert "OK EffalgLinearQuantizer" in res.stdout


def test_float_components_untouched_types(tiny_sd):
    pipe = DiffusionPipeline.from_pretrained(tiny_sd, quantization_config=EffalgLinearConfig(weight_bits=4))
    _assert_only_denoiser_quantized(pipe, "unet", W4A8Linear)
    assert type(pipe.unet.time_embedding.linear_1) is nn.Linear
