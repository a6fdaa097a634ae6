"""``search_solver_schedule``: search a USF solver schedule for a pipeline at a given NFE (the S³ idea of Liu et al.,
ICLR 2024: evolutionary search over per-step solver recipes, with a performance predictor that prunes candidates).

1. **Reference**: the pipeline on ``prompts`` (seeds ``seed + i``) with ``reference_steps`` of DPM-Solver++(2M)
   (:class:`~effalg.diffusers.USFScheduler` without a schedule), final latents kept.
2. **Seeds**: hand-made solvers as schedules (DDIM/Euler, DPM-Solver++(2M), second / third order predictor-corrector,
   noise and data forms) on three timestep spacings (uniform in time, uniform in log-SNR, quadratic), each scored.
3. **Evolution**: each round mutates the best schedules so far (inner timesteps moved in log-SNR, order, prediction
   type, corrector, first-derivative relaxation, history points, final time) into ``children`` candidates; a ridge
   regression on the schedules' features, fit to every score so far, ranks them; only the ``evaluate_top`` best
   predicted are run and scored. Stops after ``max_evals`` scored schedules or ``time_limit`` seconds (tqdm bar).
   Under an accelerate / torchrun launch each batch of schedules is scored across the processes.

Score (lower is better), on the same prompts, seeds and guidance scale as the reference: by default the mean squared
error of the final latents; ``metric(images, reference_images)`` scores decoded images instead (``output_type="pt"``),
e.g. a distribution distance, as the paper scores candidates by FID. The returned :class:`~effalg.core.SolverSchedule` records the NFE, the score and the search.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from diffusers.utils import logging
from effalg.core.distributed import from_main_process, sharded_map
from effalg.core.memory import reports_peak_memory
from effalg.core.schedule_search import predictor_guided_search
from effalg.core.solver_schedule import SolverSchedule, SolverStep

from .pipeline_calibration import metric_name, quiet_progress, reference_error, seeded_output
from .usf import USFScheduler

__all__ = ["search_solver_schedule", "seed_schedules"]

logger = logging.get_logger(__name__)


def _spacings(sched: USFScheduler, nfe: int) -> dict[str, list[float]]:
    """Model-call times (``nfe``, descending from the last training step) for three spacings."""
    n = sched.config.num_train_timesteps
    top = float(n - 1)
    lam = lambda t: math.log(sched.alpha_sigma(t)[0]) - math.log(sched.alpha_sigma(t)[1])  # noqa: E731
    lo_t = float(n // (4 * nfe))
    l0, l1 = lam(top), lam(lo_t)
    out = {
        "time": [round(top - i * n / nfe) for i in range(nfe)],
        "quadratic": [round(top * (1 - i / nfe) ** 2) for i in range(nfe)],
    }
    grid = [l0 + (l1 - l0) * i / (nfe - 1) for i in range(nfe)] if nfe > 1 else [l0]
    out["logsnr"] = [round(_time_at(sched, g)) for g in grid]
    clean = {}
    for k, ts in out.items():
        ts = sorted({float(min(top, max(1.0, t))) for t in ts}, reverse=True)
        if len(ts) == nfe:
            clean[k] = ts
    return clean


def _time_at(sched: USFScheduler, lam_target: float) -> float:
    lo, hi = 0.0, float(sched.config.num_train_timesteps - 1)
    for _ in range(60):  # lambda decreases with t
        mid = 0.5 * (lo + hi)
        a, s = sched.alpha_sigma(mid)
        if math.log(a) - math.log(s) > lam_target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def seed_schedules(sched: USFScheduler, nfe: int) -> dict[str, SolverSchedule]:
    """The hand-made solvers the search starts from, as schedules: ``{"<solver>/<spacing>": schedule}``."""
    out = {}
    for sp, calls in _spacings(sched, nfe).items():
        times = [*calls, -1.0]
        out[f"ddim/{sp}"] = SolverSchedule.ddim(times)
        out[f"dpm++2m/{sp}"] = SolverSchedule.dpmsolver_pp_2m(times)
        for order in (2, 3):
            for pred in ("data", "noise"):
                out[f"pc{order}-{pred}/{sp}"] = SolverSchedule.predictor_corrector(times, order, pred)
    return out


def _features(s: SolverSchedule, top: float) -> list[float]:
    f: list[float] = [1.0]
    for t in s.timesteps[1:]:
        f.append(max(t, 0.0) / top)
    f.append(1.0 if s.timesteps[-1] == -1 else 0.0)
    for st in s.steps:
        f += [float(st.order == 1), float(st.order == 2), float(st.order == 3), float(st.prediction == "data"),
              float(st.corrector), float(st.points - st.order + 1),
              st.relaxation if isinstance(st.relaxation, float) else 0.0,
              float(isinstance(st.relaxation, str))]  # fmt: skip
    return f


def _mutate(s: SolverSchedule, rng: random.Random, sched: USFScheduler) -> SolverSchedule | None:
    times = list(s.timesteps)
    steps = [copy.copy(st) for st in s.steps]
    n = len(steps)
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(["time", "time", "order", "prediction", "corrector", "relax", "points", "final"])
        i = rng.randrange(n)
        if op == "time" and n > 1:
            j = rng.randrange(1, n)  # an inner model-call time, moved in log-SNR between its neighbours
            hi, lo = times[j - 1], max(times[j + 1], 0.0)
            lam = lambda t: math.log(sched.alpha_sigma(t)[0]) - math.log(sched.alpha_sigma(t)[1])  # noqa: E731
            l_hi, l_lo = lam(hi), lam(lo) if lo > 0 else lam(0.0)
            w = min(0.95, max(0.05, (lam(times[j]) - l_hi) / (l_lo - l_hi) + rng.gauss(0, 0.15)))
            times[j] = float(round(_time_at(sched, l_hi + w * (l_lo - l_hi)), 1))
        elif op == "order":
            steps[i].order = rng.randint(1, min(3, i + 1))
            steps[i].points = max(steps[i].points, steps[i].order - 1)
        elif op == "prediction":
            steps[i].prediction = "noise" if steps[i].prediction == "data" else "data"
        elif op == "corrector" and i < n - 1:
            steps[i].corrector = not steps[i].corrector
        elif op == "relax":
            base = steps[i].relaxation if isinstance(steps[i].relaxation, float) else 0.0
            steps[i].relaxation = "dpmsolver-2" if rng.random() < 0.2 else round(base + rng.gauss(0, 0.1), 3)
        elif op == "points":
            steps[i].points = rng.randint(steps[i].order - 1, min(i, steps[i].order))
        elif op == "final":
            times[-1] = 0.0 if times[-1] == -1 else -1.0
    if times[-1] == -1:
        steps[-1].order, steps[-1].points = 1, min(steps[-1].points, n - 1)
    steps[-1].corrector = False
    for i, st in enumerate(steps):
        st.order = min(st.order, i + 1)
        st.points = min(max(st.points, st.order - 1), i)
    try:
        return SolverSchedule(times, [SolverStep(**st.to_dict()) for st in steps])
    except ValueError:
        return None


def _key(s: SolverSchedule) -> str:
    return repr((s.timesteps, [st.to_dict() for st in s.steps]))


@reports_peak_memory(logger, "USF search")
@torch.no_grad()
def search_solver_schedule(
    pipe: Any,
    prompts: Sequence[str],
    nfe: int,
    *,
    guidance_scale: float | None = None,
    reference_steps: int = 50,
    max_evals: int = 120,
    time_limit: float | None = None,
    children: int = 48,
    evaluate_top: int = 4,
    seed: int = 0,
    metric: Callable[[torch.Tensor, torch.Tensor], float] | None = None,
    progress: bool = True,
    **call_kwargs: Any,
) -> SolverSchedule:
    """Search a solver schedule for ``pipe`` at ``nfe`` model calls (see the module docstring).

    Args:
        pipe: a diffusers pipeline of a discrete VP model (its scheduler's config gives the noise schedule).
        prompts: calibration prompts, run as one batch with generator seed ``seed``.
        nfe: the number of model calls (``num_inference_steps`` of the schedule); 2-20.
        guidance_scale: passed to the pipeline (None: its default).
        reference_steps: steps of the DPM-Solver++(2M) reference.
        max_evals / time_limit: stop after this many scored schedules / seconds (seeds included).
        children / evaluate_top: candidates proposed per round / scored per round (the predictor picks them).
        metric: ``metric(images, reference_images) -> float`` on decoded images (lower is better); None: latent MSE.
        progress: tqdm bar over scored schedules.
        **call_kwargs: other pipeline arguments (``height``, ``width``, ``use_resolution_binning``, ...).
    """
    if isinstance(nfe, bool) or not isinstance(nfe, int) or not 2 <= nfe <= 20:
        raise ValueError(f"search_solver_schedule: nfe must be an int in [2, 20], got {nfe!r}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("search_solver_schedule: prompts is empty")
    original = pipe.scheduler
    base = USFScheduler.from_config(original.config)
    kw = dict(call_kwargs, output_type="latent" if metric is None else "pt")
    if guidance_scale is not None:
        kw["guidance_scale"] = guidance_scale

    def run(schedule: SolverSchedule | None, steps: int) -> torch.Tensor:
        pipe.scheduler = USFScheduler.from_config(base.config, schedule=schedule)
        return seeded_output(pipe, prompts, steps, seed, **kw)

    start = time.monotonic()
    top = float(base.config.num_train_timesteps - 1)
    try:
        with quiet_progress(pipe):
            ref = run(None, reference_steps)
            results = predictor_guided_search(
                [(s, name) for name, s in seed_schedules(base, nfe).items()],
                # candidates split across a launch's processes, if any
                lambda batch: sharded_map(lambda c: reference_error(run(c, nfe), ref, metric), batch, progress=False),
                lambda c, rng: _mutate(c, rng, base),
                lambda c: _features(c, top),
                _key,
                max_evals=max_evals, children=children, evaluate_top=evaluate_top, seed=seed,
                out_of_time=lambda: from_main_process(time_limit is not None and time.monotonic() - start > time_limit),
                desc=f"USF search NFE={nfe}", unit="schedule", progress=progress,
            )  # fmt: skip
    finally:
        pipe.scheduler = original
    err, best, origin = min(results, key=lambda v: v[0])
    seeds = {o: e for e, _, o in results if o != "search"}
    best_seed = min(seeds.items(), key=lambda kv: kv[1]) if seeds else (None, None)
    best.metadata = {
        "nfe": nfe,
        "score": {"metric": metric_name(metric),
                  "value": err, "reference": f"dpm++2m x{reference_steps}",
                  "prompts": len(prompts), "seed": seed, "guidance_scale": guidance_scale},
        "search": {"evaluated": len(results), "seconds": round(time.monotonic() - start, 1), "origin": origin,
                   "best_seed_solver": best_seed[0], "best_seed_score": best_seed[1]},
        "model": str(getattr(pipe, "name_or_path", None) or ""),
    }  # fmt: skip
    logger.info("USF search NFE=%d: best %.3e (%s) vs best hand-made %s %.3e, %d schedules scored", nfe, err, origin,
                best_seed[0], best_seed[1] or float("nan"), len(results))  # fmt: skip
    return best
