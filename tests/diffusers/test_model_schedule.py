"""OMS-DPM model schedules (effalg.diffusers.model_schedule): the router, save / reload, the search, errors."""

import json
import warnings

import pytest
import torch
from diffusers import DiffusionPipeline, PixArtTransformer2DModel

import effalg.diffusers as ED
from effalg.core.model_schedule import ModelSchedule
from effalg.diffusers import ModelScheduleRouter
from effalg.diffusers import testing as T


@pytest.fixture
def zoo_pipe(tiny_pixart_alpha):
    pipe = DiffusionPipeline.from_pretrained(tiny_pixart_alpha)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(5)
    small = PixArtTransformer2DModel.from_config({**dict(pipe.transformer.config), "num_layers": 1}).eval()
    return pipe, {"large": pipe.transformer, "small": small}


def _kw(pipe, steps=4):
    k = T.pipeline_kwargs(pipe)
    k["num_inference_steps"] = steps
    return k


def _times(pipe, steps=4):
    pipe.scheduler.set_timesteps(steps)
    return [float(t) for t in pipe.scheduler.timesteps]


def test_one_member_schedule_equals_that_members_pipeline(zoo_pipe):
    pipe, zoo = zoo_pipe
    want = pipe(**_kw(pipe)).images
    sched = ModelSchedule(["large", "small"], ["large"] * 4, metadata={"timesteps": _times(pipe)})
    pipe.transformer = ModelScheduleRouter.from_members(zoo, sched)
    assert torch.equal(pipe(**_kw(pipe)).images, want)


def test_mixed_route_runs_each_member_at_its_steps_and_reloads(zoo_pipe, tmp_path):
    pipe, zoo = zoo_pipe
    calls = []
    for name, m in zoo.items():
        m.register_forward_pre_hook(lambda mod, a, kw, name=name: calls.append((name, float(kw["timestep"][0]))),
                                    with_kwargs=True)  # fmt: skip
    times = _times(pipe)
    sched = ModelSchedule(["large", "small"], ["large", "small", "small", "large"], metadata={"timesteps": times})
    pipe.transformer = ModelScheduleRouter.from_members(zoo, sched)
    images = pipe(**_kw(pipe)).images
    assert calls == list(zip(["large", "small", "small", "large"], times))
    pipe.save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "model_index.json"))["transformer"] == [
        "effalg.diffusers.model_schedule", "ModelScheduleRouter"]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = DiffusionPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    assert isinstance(again.transformer, ModelScheduleRouter) and again.transformer.schedule.route == sched.route
    assert torch.equal(again(**_kw(pipe)).images, images)
    with pytest.raises(ValueError, match=r"is not one of the 4 steps the schedule was searched for"):
        again(**_kw(pipe, steps=6))


def test_search_respects_the_measured_budget(zoo_pipe):
    pipe, zoo = zoo_pipe
    own = pipe.transformer
    kw = T.calibration_kwargs(pipe)
    ms = ED.search_model_schedule(zoo, pipe, ["a cat", "a dog"], steps=4, time_budget=0.8, max_evals=12,
                                  reference_steps=10, progress=False, **kw)  # fmt: skip
    assert pipe.transformer is own and ms.steps == 4 and set(ms.route) <= {"large", "small"}
    assert ms.latency["large"] > ms.latency["small"] > 0
    assert ms.cost() <= 0.8 * 4 * ms.latency["large"] + 1e-12 and ms.metadata["timesteps"] == _times(pipe)
    assert ms.metadata["search"]["evaluated"] <= 12
    assert ModelSchedule.from_dict(json.loads(json.dumps(ms.to_dict()))) == ms


def test_errors(zoo_pipe):
    pipe, zoo = zoo_pipe
    cfg = dict(zoo["large"].config)
    other = PixArtTransformer2DModel.from_config({**cfg, "in_channels": 8, "out_channels": 16})
    with pytest.raises(ValueError, match=r"must share the latent space .*'odd' has in_channels=8"):
        ModelScheduleRouter.from_members({"large": zoo["large"], "odd": other},
                                         ModelSchedule(["large", "odd"], ["large"]))  # fmt: skip
    text = PixArtTransformer2DModel.from_config({**cfg, "caption_channels": 16})
    with pytest.raises(ValueError, match=r"caption_channels"):
        ED.search_model_schedule({"large": zoo["large"], "t": text}, pipe, ["a"], steps=2, time_budget=0.5)
    with pytest.raises(ValueError, match=r"time_budget=0.01 is below the fastest member alone"):
        ED.search_model_schedule(zoo, pipe, ["a"], steps=2, time_budget=0.01, **T.calibration_kwargs(pipe))
    with pytest.raises(ValueError, match=r"time_budget must be in \(0, 1\]"):
        ED.search_model_schedule(zoo, pipe, ["a"], steps=2, time_budget=1.5)
    with pytest.raises(ValueError, match=r"route names unknown member\(s\) \['tiny'\]"):
        ModelSchedule(["large"], ["tiny"])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['zoo_order'\]"):
        ModelSchedule.from_dict({"members": ["a"], "route": ["a"], "zoo_order": [0]})


@pytest.mark.parametrize("what", ["usf", "oms"])
def test_schedule_searches_sharded_over_two_processes(tiny_pixart_alpha, tmp_path, what):
    """torchrun with 2 CPU processes (gloo): candidates are scored across both; both processes end with the same
    schedule (OMS: on the main process's measured latencies); USF's equals the single-process one."""
    import subprocess
    import sys
    from pathlib import Path

    from effalg.core.testing.launch import torchrun

    script = Path(__file__).with_name("_launch_sharded.py")
    log = torchrun(script, what, tiny_pixart_alpha, tmp_path / "two.json", nproc=2)
    assert "process 2/2 takes" in log
    r0, r1 = (json.loads((tmp_path / f"two.json.{r}").read_text()) for r in (0, 1))

    def strip(plan):  # the search's wall time differs between runs and processes
        plan["metadata"].get("search", {}).pop("seconds", None)
        return plan

    assert strip(r0["plan"]) == strip(r1["plan"]) and r0["processes"] == 2
    if what == "usf":
        subprocess.run([sys.executable, str(script), what, str(tiny_pixart_alpha), str(tmp_path / "one.json")],
                       check=True, capture_output=True)  # fmt: skip
        assert strip(json.loads((tmp_path / "one.json").read_text())["plan"]) == r0["plan"]


def test_effalg_compressed_members_save_and_reload(zoo_pipe, tiny_pixart_alpha, tmp_path):
    """A zoo of one model and its ViDiT-Q W8A8 variant: each member saves in its own folder with its quantization
    config and reloads through its quantizer."""
    from effalg.core.modules import W8A8Linear
    from effalg.diffusers import ViDiTQConfig

    pipe, zoo = zoo_pipe
    q = PixArtTransformer2DModel.from_pretrained(tiny_pixart_alpha, subfolder="transformer",
                                                 quantization_config=ViDiTQConfig(8, 8))  # fmt: skip
    sched = ModelSchedule(["fp", "w8a8"], ["w8a8", "fp", "w8a8", "fp"], metadata={"timesteps": _times(pipe)})
    pipe.transformer = ModelScheduleRouter.from_members({"fp": zoo["large"], "w8a8": q}, sched)
    images = pipe(**_kw(pipe)).images
    pipe.save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "transformer" / "members" / "w8a8" / "config.json"))["quantization_config"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = DiffusionPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    assert isinstance(again.transformer.zoo["w8a8"].transformer_blocks[0].attn1.to_q, W8A8Linear)
    assert torch.equal(again(**_kw(pipe)).images, images)
