"""Shared pipeline calibration (effalg.diffusers.pipeline_calibration): registry dispatch, the float pass over
prompts x steps x CFG branches, per-layer sensitivity under custom metric groups."""

import math

import pytest
import torch
from diffusers import DiffusionPipeline

import effalg.diffusers as ED
from effalg.core.metrics import cosine_similarity
from effalg.core.modules import QuantModuleBase, W4A8Linear, W8A8Linear
from effalg.diffusers import EffalgLinearConfig, ViDiTQConfig
from effalg.diffusers import pipeline_calibration as PC
from effalg.diffusers import testing as T
from effalg.diffusers.vidit_q import calibrate as vidit_q_calibrate

LAYERS = ("transformer_blocks.0.attn2.to_k", "transformer_blocks.0.ff.net.2", "transformer_blocks.1.attn1.to_q")


def _runner(path, steps=2):
    pipe = DiffusionPipeline.from_pretrained(path)
    kw = T.pipeline_kwargs(pipe)
    for k in ("prompt", "num_inference_steps", "generator", "output_type"):
        kw.pop(k)
    _, model = PC.float_denoiser(pipe, ViDiTQConfig())
    return PC.PipelineRunner(pipe, model, steps, seed=0, call_kwargs=kw)


# ---- registry -------------------------------------------------------------------------------------------------------
class _Cfg:
    pass


class _SubCfg(_Cfg):
    pass


def test_registry_dispatch(monkeypatch):
    monkeypatch.setattr(PC, "_CALIBRATORS", dict(PC._CALIBRATORS))
    seen = []

    @PC.register_calibrator(_Cfg)
    def fake(pipe, prompts, config, **kw):
        seen.append((pipe, prompts, type(config), kw))
        return pipe

    assert ED.calibrate("pipe", ["a"], _SubCfg(), num_inference_steps=3, height=8) == "pipe"  # nearest base class
    assert seen == [("pipe", ["a"], _SubCfg, {"num_inference_steps": 3, "height": 8})]
    assert PC.registered_calibrators()[ViDiTQConfig] is vidit_q_calibrate
    with pytest.raises(TypeError, match=r"no calibration is registered for EffalgLinearConfig.*'ViDiTQConfig', '_Cfg'"):
        ED.calibrate("pipe", ["a"], EffalgLinearConfig())
    with pytest.raises(TypeError, match="config_type must be a class"):
        PC.register_calibrator("ViDiTQConfig")


def test_argument_checks(tiny_pixart_alpha):
    assert PC.check_prompts("a cat", 1) == ["a cat"]
    with pytest.raises(ValueError, match="prompts is empty"):
        PC.check_prompts([], 1)
    with pytest.raises(TypeError, match="prompts must be strings, got int"):
        PC.check_prompts(["a", 3], 1)
    with pytest.raises(ValueError, match="num_inference_steps must be an int >= 1, got 0"):
        PC.check_prompts(["a"], 0)
    with pytest.raises(TypeError, match="pipe must be a DiffusionPipeline with a denoiser component"):
        PC.float_denoiser(object(), ViDiTQConfig())
    quantized = DiffusionPipeline.from_pretrained(tiny_pixart_alpha, quantization_config=ViDiTQConfig())
    with pytest.raises(ValueError, match=r"pipe.transformer is already quantized"):
        PC.float_denoiser(quantized, ViDiTQConfig())
    model = _runner(tiny_pixart_alpha).model
    assert list(PC.select_layers(model, [], lambda n, m: m if n in LAYERS else None)) == sorted(LAYERS)
    with pytest.raises(ValueError, match=r"no quantizable layers in PixArtTransformer2DModel"):
        PC.select_layers(model, ["transformer_blocks"], lambda n, m: m if n in LAYERS else None)


# ---- the float pass -------------------------------------------------------------------------------------------------
def test_float_pass_sees_every_step_and_both_cfg_branches(tiny_pixart_alpha, capsys):
    runner = _runner(tiny_pixart_alpha, steps=3)
    layer = runner.model.get_submodule(LAYERS[1])
    run = PC.run_float(runner, ["a cat", "a dog"], modules={LAYERS[1]: layer}, record=1, desc="test pass")
    assert "test pass" in capsys.readouterr().err
    assert run.stats[LAYERS[1]].num_calls == 2 * 3  # one denoiser call per step and prompt
    assert len(run.calls) == 3 and len(run.latents) == 1 and run.recorded_prompts == ["a cat"]  # first prompt only
    steps = {float(kw["timestep"].flatten()[0]) for _, kw in run.calls}
    assert len(steps) == 3  # every timestep
    for args, kw in run.calls:  # CFG batch [uncond; cond]: both branches, with different text conditions
        uncond, cond = kw["encoder_hidden_states"].chunk(2)
        assert args[0].shape[0] == 2 and not torch.equal(uncond, cond)
    assert torch.equal(run.latents[0], runner.latents("a cat", 0))  # deterministic: seed + i
    again = runner.replay(run.calls)[""]  # "" = the denoiser's own output
    assert len(again) == 3 and again[0].shape[0] == 2


# ---- sensitivity ----------------------------------------------------------------------------------------------------
class _Recording(PC.LayerMetric):
    """A custom metric: 1 - cosine similarity of the final latents; checks the layer is quantized when scored."""

    def __init__(self):
        self.prepared, self.scored = [], []

    def prepare(self, run, layers):
        self.prepared.append(list(layers))

    def error(self, run, layer):
        assert isinstance(run.runner.model.get_submodule(layer), QuantModuleBase)
        self.scored.append(layer)
        return sum(
            1.0 - cosine_similarity(r, run.runner.latents(p, i))
            for i, (p, r) in enumerate(zip(run.prompts, run.latents))
        )


def test_sensitivity_custom_groups_and_restore(tiny_pixart_alpha):
    runner = _runner(tiny_pixart_alpha)
    model = runner.model
    ref = runner.latents("a cat", 0)
    originals = {n: model.get_submodule(n) for n in LAYERS}
    run = PC.run_float(runner, ["a cat"], record=1, progress=False)
    content = _Recording()
    groups = {
        "content": PC.MetricGroup(content, (4, 8)),
        "quality": PC.MetricGroup(PC.ModuleOutputMetric(), (8,)),  # relative error of the denoiser output
    }
    layer_groups = {n: "content" if ("attn2" in n or "ff" in n) else "quality" for n in LAYERS}

    def build(name, bits):
        return (W4A8Linear if bits == 4 else W8A8Linear).from_float(originals[name])

    table = PC.layer_sensitivity(run, layer_groups, groups, build, progress=False)
    assert {n: sorted(v) for n, v in table.items()} == {LAYERS[0]: [4, 8], LAYERS[1]: [4, 8], LAYERS[2]: [8]}
    assert all(math.isfinite(e) and e >= 0 for row in table.values() for e in row.values())
    assert all(0 < row[8] < row[4] for n, row in table.items() if 4 in row)  # W8 closer to float than W4
    assert content.prepared == [[LAYERS[0], LAYERS[1]]] and content.scored == [LAYERS[0]] * 2 + [LAYERS[1]] * 2
    assert all(model.get_submodule(n) is m for n, m in originals.items())  # restored
    assert torch.equal(runner.latents("a cat", 0), ref)
    with pytest.raises(ValueError, match=r"no MetricGroup for group\(s\) \['quality'\]"):
        PC.layer_sensitivity(run, layer_groups, {"content": groups["content"]}, build, progress=False)


def test_sensitivity_sweep_sharded_over_two_processes_gives_the_same_plan(tiny_pixart_alpha, tmp_path):
    """torchrun with 2 CPU processes (gloo): the per-layer sweep is split between them (accelerate) and the plan equals
    the single-process one, sensitivities included."""
    import json
    import re
    import subprocess
    import sys
    from pathlib import Path

    from effalg.core.testing.launch import torchrun

    script = Path(__file__).with_name("_launch_sharded.py")
    log = torchrun(script, "vidit_q", tiny_pixart_alpha, tmp_path / "two.json", nproc=2)
    shares = re.findall(r"ViDiT-Q sensitivity: process (\d)/2 takes (\d+) of (\d+) items", log)
    assert sorted(p for p, _, _ in shares) == ["1", "2"]  # each process measured its own share
    assert sum(int(k) for _, k, _ in shares) == int(shares[0][2]) and all(int(k) > 0 for _, k, _ in shares)
    subprocess.run([sys.executable, str(script), "vidit_q", str(tiny_pixart_alpha), str(tmp_path / "one.json")], check=True,
                   capture_output=True)  # fmt: skip
    two, one = (json.loads((tmp_path / f).read_text()) for f in ("two.json", "one.json"))
    assert (two["processes"], one["processes"]) == (2, 1)
    assert two["plan"] == one["plan"]
    assert two["calibration"] == one["calibration"]
