"""USFScheduler (effalg.diffusers.usf): exactness against diffusers' solvers, pipelines, save / reload, errors; and
search_solver_schedule (effalg.diffusers.usf_search)."""

import json

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, EulerDiscreteScheduler

import effalg.diffusers as ED
from effalg.core.solver_schedule import SolverSchedule
from effalg.diffusers import USFScheduler
from effalg.diffusers import testing as T

NOISE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
_W = torch.randn(16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.3


def _model(x, t):  # a smooth stand-in denoiser
    return torch.tanh(x.double() @ _W) * 0.5 + 0.1 * x.double() * (float(t) / 1000)


def _trajectory(s, x, scale=1.0):
    x, out = x * scale, []
    for t in s.timesteps:
        x = s.step(_model(s.scale_model_input(x, t), t), t, x).prev_sample
        out.append(x)
    return out


@pytest.fixture
def x():
    return torch.randn(4, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("n", [4, 5, 8])
def test_first_order_schedule_equals_ddim_and_euler_step_for_step(n, x):
    ddim = DDIMScheduler(**NOISE, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    ddim.set_timesteps(n)
    usf = USFScheduler(**NOISE, schedule=SolverSchedule.ddim([*map(float, ddim.timesteps), -1.0]))
    usf.set_timesteps(n)
    ours = _trajectory(usf, x)
    for a, b in zip(_trajectory(ddim, x), ours):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    euler = EulerDiscreteScheduler(**NOISE, timestep_spacing="trailing")
    euler.set_timesteps(n)
    assert euler.timesteps.tolist() == usf.timesteps.tolist()
    sigmas = euler.sigmas.double()
    theirs = _trajectory(euler, x, float((sigmas[0] ** 2 + 1) ** 0.5))  # Euler works on x / alpha
    for i, (a, b) in enumerate(zip(theirs, ours)):
        torch.testing.assert_close(a / (sigmas[i + 1] ** 2 + 1) ** 0.5, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpmsolver_pp_2m_schedule_equals_diffusers(prediction_type, x):
    kw = dict(NOISE, prediction_type=prediction_type)
    dpm = DPMSolverMultistepScheduler(**kw, timestep_spacing="trailing", final_sigmas_type="zero", solver_order=2)
    dpm.set_timesteps(6)
    usf = USFScheduler(**kw, schedule=SolverSchedule.dpmsolver_pp_2m([*map(float, dpm.timesteps), -1.0]))
    usf.set_timesteps(6)
    for a, b in zip(_trajectory(dpm, x), _trajectory(usf, x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_without_schedule_runs_dpmsolver_pp_for_any_step_count(x):
    usf = USFScheduler(**NOISE)
    for n in (3, 7):
        usf.set_timesteps(n)
        assert len(usf.timesteps) == n and torch.isfinite(_trajectory(usf, x)[-1]).all()


def test_from_another_schedulers_config_keeps_the_noise_schedule_quietly(caplog):
    dpm = DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    with caplog.at_level("WARNING"):
        usf = USFScheduler.from_config(dpm.config)
    assert (usf.config.beta_schedule, usf.config.prediction_type) == ("squaredcos_cap_v2", "v_prediction")
    assert "solver_order" not in usf.config and "not expected" not in caplog.text
    torch.testing.assert_close(usf.alphas_cumprod, dpm.alphas_cumprod.float())


def test_errors():
    sched = SolverSchedule.predictor_corrector([999.0, 500.0, 100.0, -1.0])
    usf = USFScheduler(**NOISE, schedule=sched)
    with pytest.raises(ValueError, match="searched for 3 steps .* got num_inference_steps=4"):
        usf.set_timesteps(4)
    with pytest.raises(ValueError, match="timesteps= must give the schedule's 3"):
        usf.set_timesteps(timesteps=[999, 10])
    with pytest.raises(ValueError, match="call set_timesteps first"):
        USFScheduler(**NOISE, schedule=sched).step(torch.zeros(2), 999, torch.zeros(2))
    with pytest.raises(ValueError, match="timestep 1200.0 is outside"):
        USFScheduler(**NOISE, schedule=SolverSchedule.ddim([1200.0, 0.0])).set_timesteps(1)
    with pytest.raises(ValueError, match="beta_schedule 'sigmoid' is not supported"):
        USFScheduler(beta_schedule="sigmoid")


def test_pipeline_save_reload_and_custom_timesteps(tiny_pixart_alpha, tmp_path):
    pipe = DiffusionPipeline.from_pretrained(tiny_pixart_alpha)
    pipe.set_progress_bar_config(disable=True)
    sched = SolverSchedule.predictor_corrector([999.0, 700.5, 400.0, 150.0, -1.0], order=3)
    pipe.scheduler = USFScheduler.from_config(pipe.scheduler.config, schedule=sched)

    def kw(steps=4, **extra):
        k = T.pipeline_kwargs(pipe)
        k.update(num_inference_steps=steps, **extra)
        return k

    images = pipe(**kw()).images
    assert torch.isfinite(images).all()
    pipe.save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "model_index.json"))["scheduler"] == ["effalg.diffusers.usf", "USFScheduler"]
    saved = json.load(open(tmp_path / "scheduler" / "scheduler_config.json"))
    assert saved["_class_name"] == "USFScheduler" and saved["schedule"]["kind"] == "usf_solver_schedule"
    again = DiffusionPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    assert isinstance(again.scheduler, USFScheduler) and again.scheduler.schedule == sched
    assert torch.equal(again(**kw()).images, images)
    with pytest.raises(ValueError, match="searched for 4 steps"):
        again(**kw(steps=6))
    k = kw(steps=None, timesteps=[999, 700, 400, 150])  # diffusers' retrieve_timesteps path
    assert torch.isfinite(again(**k).images).all() and again.scheduler.timesteps.tolist() == [999, 700, 400, 150]
    bad = dict(saved, schedule=dict(saved["schedule"], skip_coefficients=[1.0]))
    json.dump(bad, open(tmp_path / "scheduler" / "scheduler_config.json", "w"))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['skip_coefficients'\]"):
        DiffusionPipeline.from_pretrained(tmp_path)


def test_search_beats_its_hand_made_seeds(tiny_pixart_alpha):
    pipe = DiffusionPipeline.from_pretrained(tiny_pixart_alpha)
    pipe.set_progress_bar_config(disable=True)
    own = pipe.scheduler
    kw = T.calibration_kwargs(pipe)
    kw.pop("num_inference_steps", None)
    sched = ED.search_solver_schedule(pipe, ["a cat", "a dog"], nfe=3, max_evals=40, reference_steps=20,
                                      progress=False, **kw)  # fmt: skip
    assert pipe.scheduler is own and sched.nfe == 3
    meta = sched.metadata
    assert meta["nfe"] == 3 and meta["search"]["evaluated"] == 40
    assert meta["score"]["value"] <= meta["search"]["best_seed_score"]
    json.dumps(sched.to_dict())
    with pytest.raises(ValueError, match=r"nfe must be an int in \[2, 20\]"):
        ED.search_solver_schedule(pipe, ["a cat"], nfe=1)
    with pytest.raises(ValueError, match="prompts is empty"):
        ED.search_solver_schedule(pipe, [], nfe=3)


def test_unet_pipeline_search_and_run(tiny_sd):
    """The scheduler and the search on a UNet pipeline (SD: epsilon prediction, its own beta schedule)."""
    pipe = DiffusionPipeline.from_pretrained(tiny_sd)
    pipe.set_progress_bar_config(disable=True)
    kw = T.calibration_kwargs(pipe)
    sched = ED.search_solver_schedule(pipe, ["a cat", "a dog"], nfe=3, max_evals=16, reference_steps=10,
                                      progress=False, **kw)  # fmt: skip
    assert sched.metadata["score"]["value"] <= sched.metadata["search"]["best_seed_score"]
    pipe.scheduler = USFScheduler.from_config(pipe.scheduler.config, schedule=sched)
    k = T.pipeline_kwargs(pipe)
    k["num_inference_steps"] = 3
    assert torch.isfinite(pipe(**k).images).all()
