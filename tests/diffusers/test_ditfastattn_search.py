"""DiTFastAttn's greedy search (effalg.diffusers.ditfastattn_search)."""

import pytest
import torch
from diffusers import DiffusionPipeline

import effalg.diffusers as ED
from effalg.diffusers import testing as T
from effalg.diffusers.ditfastattn_search import relative_l1


@pytest.fixture
def pixart(tiny_pixart_alpha):
    pipe = DiffusionPipeline.from_pretrained(tiny_pixart_alpha)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _kw(pipe):
    kw = T.calibration_kwargs(pipe)
    kw["guidance_scale"] = 4.5
    return kw


def test_threshold_zero_keeps_full_attention(pixart):
    plan = ED.search_ditfastattn(pixart, ["a cat", "a dog"], threshold=0.0, num_inference_steps=5, **_kw(pixart))
    assert all(m == "full" for ms in plan.entries.values() for m in ms)
    assert plan.attention_flops_fraction() == 1.0


def test_candidates_in_decreasing_compression_order(pixart, capsys):
    plan = ED.search_ditfastattn(pixart, ["a cat"], threshold=1e9, num_inference_steps=5, **_kw(pixart))
    assert all(ms == ["full"] + ["ast"] * 4 for ms in plan.entries.values())  # AST is tried first
    md = plan.metadata
    assert md["num_steps"] == 5 and len(md["timesteps"]) == 5 and md["timesteps"][0] > md["timesteps"][-1]
    assert md["threshold"] == 1e9 and md["scheduler"] == "DPMSolverMultistepScheduler" and md["cfg"]
    assert md["num_tokens"] == 16 and md["window"] == 2 and md["guidance_scale"] == 4.5
    assert "DiTFastAttn search" in capsys.readouterr().err  # tqdm


def test_moderate_threshold_mixes_methods_within_budget(pixart):
    plans = [
        ED.search_ditfastattn(pixart, ["a cat", "a dog"], threshold=t, num_inference_steps=6, window=3, **_kw(pixart))
        for t in (0.02, 0.2, 2.0)
    ]
    fractions = [p.attention_flops_fraction() for p in plans]
    assert fractions == sorted(fractions, reverse=True) and fractions[-1] < fractions[0]
    for p in plans:
        assert all(ms[0] == "full" for ms in p.entries.values()) and p.window == 3
    ED.apply_ditfastattn(pixart, plans[1])
    images = pixart(["a cat"], num_inference_steps=6, output_type="pt", **_kw(pixart)).images
    assert torch.isfinite(images).all()


def test_dit_search_class_labels(tiny_dit):
    pipe = DiffusionPipeline.from_pretrained(tiny_dit)
    plan = ED.search_ditfastattn(pipe, [1, 2], threshold=0.5, num_inference_steps=4)
    assert plan.metadata["cfg"] and plan.metadata["guidance_scale"] == 4.0  # DiTPipeline's default


def test_relative_l1():
    a = torch.tensor([1.0, -2.0, 0.0])
    assert relative_l1(a, a) == 0.0
    assert relative_l1(a, -a) == pytest.approx((2 + 2 + 0) / 3, rel=1e-6)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(threshold=-1), "threshold must be a number >= 0"),
        (dict(num_inference_steps=0), "num_inference_steps must be a positive int"),
        (dict(window=0), r"window must be an int in \[1, 15\]"),
    ],
)
def test_bad_arguments(pixart, kw, match):
    with pytest.raises(ValueError, match=match):
        ED.search_ditfastattn(pixart, ["a cat"], **{**_kw(pixart), **kw})


def test_empty_prompts(pixart):
    with pytest.raises(ValueError, match="prompts must be a non-empty list"):
        ED.search_ditfastattn(pixart, [])


def test_search_sharded_over_two_processes_gives_the_same_plan(tiny_pixart_alpha, tmp_path):
    """torchrun with 2 CPU processes (gloo): each layer's candidates are split between them (accelerate) and the plan
    equals the single-process greedy one."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from effalg.core.testing.launch import torchrun

    script = Path(__file__).with_name("_launch_sharded.py")
    log = torchrun(script, "ditfastattn", tiny_pixart_alpha, tmp_path / "two.json", nproc=2)
    assert "DiTFastAttn candidates: process 2/2 takes" in log
    subprocess.run([sys.executable, str(script), "ditfastattn", str(tiny_pixart_alpha), str(tmp_path / "one.json")], check=True,
                   capture_output=True)  # fmt: skip
    two, one = (json.loads((tmp_path / f).read_text()) for f in ("two.json", "one.json"))
    assert (two["processes"], one["processes"]) == (2, 1)
    assert two["plan"] == one["plan"]
    assert len({m for ms in one["plan"]["entries"].values() for m in ms}) > 1  # a real mix of methods
