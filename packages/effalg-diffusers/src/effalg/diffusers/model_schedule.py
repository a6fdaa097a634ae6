"""OMS-DPM model schedules as a diffusers component: ``ModelScheduleRouter`` is one denoiser that routes each step to
a member of a model zoo, and ``search_model_schedule`` searches the route under a measured time budget.

    router = ModelScheduleRouter.from_members({"large": pipe.transformer, "small": small}, schedule)
    pipe.transformer = router          # the pipeline sees a normal denoiser (the reference member's config)
    pipe.save_pretrained(dir)          # transformer/ holds the zoo and the schedule
    pipe = DiffusionPipeline.from_pretrained(dir)   # after ``import effalg.diffusers``

Routing keys on the timestep value: the schedule records the timesteps of the steps it was searched for, so separate
CFG calls at one step use one member, and a run with another step count is a clear error.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

import diffusers
from diffusers import ModelMixin  # noqa: F401  (diffusers loads components through this module attribute)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils import logging
from effalg.core.distributed import from_main_process, sharded_map
from effalg.core.memory import reports_peak_memory
from effalg.core.model_schedule import ModelSchedule
from effalg.core.schedule_search import predictor_guided_search

from .pipeline_calibration import metric_name, quiet_progress, reference_error, seeded_output

__all__ = ["ModelScheduleRouter", "search_model_schedule"]

logger = logging.get_logger(__name__)

#: Config keys that must agree between zoo members (same latent space, same conditioning).
_SHARED_KEYS = ("in_channels", "out_channels", "sample_size", "patch_size", "caption_channels", "cross_attention_dim",
                "joint_attention_dim", "pooled_projection_dim", "num_embeds_ada_norm", "use_additional_conditions")  # fmt: skip
_OWN_KEYS = ("members", "schedule", "reference")


def _check_zoo(zoo: Mapping[str, nn.Module]) -> None:
    if not zoo:
        raise ValueError("ModelScheduleRouter: the zoo is empty")
    names = list(zoo)
    ref = zoo[names[0]]
    for name in names[1:]:
        m = zoo[name]
        for k in _SHARED_KEYS:
            a, b = getattr(ref.config, k, None), getattr(m.config, k, None)
            if a != b:
                raise ValueError(
                    f"ModelScheduleRouter: zoo members must share the latent space and the conditioning: "
                    f"{names[0]!r} has {k}={a!r}, {name!r} has {k}={b!r}"
                )


def _json_config(m: nn.Module) -> dict[str, Any]:
    """A member's config as plain JSON values (its ``quantization_config`` lives in its own folder)."""
    out = {}
    for k, v in dict(m.config).items():
        if k.startswith("_") or k in _OWN_KEYS or k == "quantization_config":
            continue
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


class ModelScheduleRouter(ModelMixin, ConfigMixin):
    """One denoiser over a zoo: each model call runs the member the :class:`~effalg.core.ModelSchedule` names for
    that step. Its config is the reference (first) member's (what pipelines read), plus ``members`` (each member's
    class name), ``schedule`` and ``reference``. ``save_pretrained`` writes each member with its own
    ``save_pretrained`` under ``members/<name>/`` (so effalg-compressed members keep their quantization config), and
    ``from_pretrained`` loads them back the same way."""

    @register_to_config
    def __init__(self, members: dict | None = None, schedule: dict | None = None, reference: str | None = None) -> None:
        super().__init__()
        if not members or schedule is None:
            raise ValueError("ModelScheduleRouter: members and schedule are required (use from_members / "
                             "from_pretrained)")  # fmt: skip
        self.schedule = ModelSchedule.from_dict(schedule)
        missing = sorted(set(self.schedule.members) - set(members))
        if missing:
            raise ValueError(f"ModelScheduleRouter: the schedule names member(s) {missing} the zoo lacks")
        self.zoo = nn.ModuleDict()
        self._timesteps = self.schedule.metadata.get("timesteps")

    @classmethod
    def from_members(cls, zoo: Mapping[str, nn.Module], schedule: ModelSchedule | dict) -> ModelScheduleRouter:
        """A router holding the given (loaded) members; the first is the reference whose config pipelines read."""
        _check_zoo(zoo)
        schedule = ModelSchedule.from_dict(schedule)
        reference = next(iter(zoo))
        with torch.device("meta"):
            router = cls(members={n: type(m).__name__ for n, m in zoo.items()}, schedule=schedule.to_dict(),
                         reference=reference)  # fmt: skip
        router.zoo = nn.ModuleDict(dict(zoo))
        router.register_to_config(**_json_config(zoo[reference]))  # in_channels, sample_size, ... for pipelines
        return router

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """``config.json`` (members, schedule, the reference member's config) and each member's own
        ``save_pretrained`` under ``members/<name>/``."""
        os.makedirs(save_directory, exist_ok=True)
        keep = {k: v for k, v in kwargs.items() if k in ("safe_serialization", "max_shard_size", "variant")}
        for name, member in self.zoo.items():
            member.save_pretrained(os.path.join(save_directory, "members", name), **keep)
        self.save_config(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> ModelScheduleRouter:
        """Load a saved router: each member with its class's ``from_pretrained`` (effalg-quantized members through
        their quantizer), then :meth:`from_members`. ``subfolder``, ``torch_dtype`` and the usual loading arguments
        are passed on; a folder from the Hub is fetched first (``huggingface_hub.snapshot_download``)."""
        root = str(pretrained_model_name_or_path)
        sub = kwargs.pop("subfolder", None)
        if not os.path.isdir(root):
            from huggingface_hub import snapshot_download

            root = snapshot_download(root, cache_dir=kwargs.get("cache_dir"), revision=kwargs.get("revision"),
                                     local_files_only=kwargs.get("local_files_only", False))  # fmt: skip
        if sub:
            root = os.path.join(root, sub)
        config = cls.load_config(root)
        members = config.get("members") or {}
        if not members or "schedule" not in config:
            raise ValueError(f"ModelScheduleRouter.from_pretrained: {root} has no members / schedule in config.json")
        keep = {k: v for k, v in kwargs.items() if k in ("torch_dtype", "low_cpu_mem_usage", "variant", "use_safetensors",
                                                         "device_map", "max_memory", "offload_folder")}  # fmt: skip
        zoo = {}
        for name, class_name in members.items():
            member_cls = getattr(diffusers, class_name, None)
            if member_cls is None:
                raise ValueError(f"ModelScheduleRouter: member {name!r} has unknown class {class_name!r}")
            folder = os.path.join(root, "members", name)
            if not os.path.isdir(folder):
                raise ValueError(f"ModelScheduleRouter.from_pretrained: member {name!r} is missing ({folder})")
            zoo[name] = member_cls.from_pretrained(folder, **keep)
        order = [config.get("reference") or next(iter(members))] + [n for n in members if n != config.get("reference")]
        return cls.from_members({n: zoo[n] for n in order}, config["schedule"])

    def member_for(self, timestep: Any) -> str:
        """The member that runs at ``timestep`` (one of the schedule's recorded timesteps)."""
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        ts = self._timesteps
        if ts is None:
            raise ValueError("ModelScheduleRouter: the schedule records no timesteps (metadata['timesteps'])")
        for i, s in enumerate(ts):
            if abs(s - t) <= 1e-3 * max(1.0, abs(s)):
                return self.schedule.route[i]
        raise ValueError(
            f"ModelScheduleRouter: timestep {t:g} is not one of the {len(ts)} steps the schedule was searched for "
            f"({[round(x, 3) for x in ts]}); run the pipeline with num_inference_steps={len(ts)} and the same "
            "scheduler, or search a schedule for this step count"
        )

    def forward(self, hidden_states: torch.Tensor, *args: Any, timestep: Any = None, **kwargs: Any) -> Any:
        if timestep is None:
            raise ValueError("ModelScheduleRouter: the call has no timestep= to route on")
        return self.zoo[self.member_for(timestep)](hidden_states, *args, timestep=timestep, **kwargs)


# ---- search ---------------------------------------------------------------------------------------------------------
def _route_features(route: tuple[str, ...], names: list[str]) -> list[float]:
    f = [1.0]
    for m in route:
        f += [float(m == n) for n in names[1:]]
    return f


@reports_peak_memory(logger, "OMS-DPM search")
@torch.no_grad()
def search_model_schedule(
    zoo: Mapping[str, nn.Module],
    pipe: Any,
    prompts: Sequence[str],
    steps: int,
    time_budget: float,
    *,
    guidance_scale: float | None = None,
    reference_steps: int = 50,
    max_evals: int = 80,
    children: int = 48,
    evaluate_top: int = 4,
    seed: int = 0,
    metric: Callable[[torch.Tensor, torch.Tensor], float] | None = None,
    progress: bool = True,
    **call_kwargs: Any,
) -> ModelSchedule:
    """Search which zoo member runs at each of ``steps`` steps of ``pipe`` (its scheduler unchanged).

    Args:
        zoo: ``{name: denoiser}``; members share the latent space and the conditioning. The slowest member is the
            reference: ``reference_steps`` steps of it on ``prompts`` (seed ``seed``) are the quality target.
        pipe: the pipeline (its denoiser is swapped for a router while searching, then restored).
        time_budget: the route's measured time as a fraction of the slowest member alone (``0 < b <= 1``).
        max_evals, children, evaluate_top: as in :func:`~effalg.diffusers.search_solver_schedule`.
        metric: ``metric(images, reference_images)`` on decoded images; None: latent MSE.

    Each member is timed as it runs in the pipeline (median seconds per call over one run of ``steps``); a route's
    cost is the sum over its steps. Returns the best route within the budget as a :class:`~effalg.core.ModelSchedule`
    (members, route, latencies, the step timesteps, budget and score in its metadata).
    """
    names = list(zoo)
    _check_zoo(zoo)
    if not 0 < float(time_budget) <= 1:
        raise ValueError(f"search_model_schedule: time_budget must be in (0, 1] (a fraction), got {time_budget!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"search_model_schedule: steps must be a positive int, got {steps!r}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("search_model_schedule: prompts is empty")
    attr = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
    original = getattr(pipe, attr)
    kw = dict(call_kwargs, output_type="latent" if metric is None else "pt")
    if guidance_scale is not None:
        kw["guidance_scale"] = guidance_scale
    pipe.scheduler.set_timesteps(steps)
    timesteps = [float(t) for t in pipe.scheduler.timesteps]

    def run(route: Sequence[str], n: int, times: list[float]) -> torch.Tensor:
        setattr(pipe, attr, ModelScheduleRouter.from_members(zoo, ModelSchedule(names, list(route),
                                                                                metadata={"timesteps": times})))  # fmt: skip
        return seeded_output(pipe, prompts, n, seed, **kw)

    try:
        with quiet_progress(pipe):
            latency = {}
            for name in names:  # timed as it runs: per-call wall time inside the pipeline
                calls: list[float] = []
                member = zoo[name]
                pre = member.register_forward_pre_hook(lambda *a, c=calls: c.append(-time.perf_counter()))
                post = member.register_forward_hook(lambda *a, c=calls: c.append(c.pop() + time.perf_counter()))
                try:
                    run([name] * steps, steps, timesteps)
                finally:
                    pre.remove()
                    post.remove()
                latency[name] = statistics.median(calls)
            latency = from_main_process(latency)  # one budget for every process of a launch
            measured = ", ".join(f"{n} {latency[n] * 1e3:.2f} ms" for n in names)
            slowest, fast = max(names, key=latency.get), min(names, key=latency.get)
            budget = float(time_budget) * latency[slowest] * steps
            if latency[fast] * steps > budget * (1 + 1e-9):
                raise ValueError(
                    f"search_model_schedule: time_budget={time_budget} is below the fastest member alone "
                    f"({latency[fast] / latency[slowest]:.2f} of the slowest; measured per call: {measured})"
                )
            fits = lambda r: sum(latency[m] for m in r) <= budget * (1 + 1e-9)  # noqa: E731
            pipe.scheduler.set_timesteps(reference_steps)
            ref = run([slowest] * reference_steps, reference_steps, [float(t) for t in pipe.scheduler.timesteps])

            def mutate(route: tuple[str, ...], rng: random.Random) -> tuple[str, ...] | None:
                r = list(route)
                for _ in range(rng.randint(1, 2)):
                    r[rng.randrange(steps)] = rng.choice(names)
                return tuple(r) if fits(r) else None

            seeds = [((name,) * steps, f"{name} alone") for name in names if fits((name,) * steps)]
            for k in range(1, steps):  # the slowest member on the first / the last k steps, the fastest elsewhere
                for r in ((slowest,) * k + (fast,) * (steps - k), (fast,) * (steps - k) + (slowest,) * k):
                    if fits(r):
                        seeds.append((r, f"{slowest} x{k}"))
            results = predictor_guided_search(
                seeds,
                lambda batch: sharded_map(lambda r: reference_error(run(r, steps, timesteps), ref, metric), batch,
                                          progress=False),
                mutate, lambda r: _route_features(r, names), lambda r: r,
                max_evals=max_evals, children=children, evaluate_top=evaluate_top, seed=seed,
                desc=f"OMS-DPM search steps={steps}", unit="route", progress=progress,
            )  # fmt: skip
    finally:
        setattr(pipe, attr, original)
    err, route, origin = min(results, key=lambda v: v[0])
    if len(results) < max_evals:
        logger.warning("search_model_schedule: only %d route(s) fit time_budget=%s (measured per call: %s); a larger "
                       "budget leaves more to search", len(results), time_budget, measured)  # fmt: skip
    schedule = ModelSchedule(
        names, list(route), latency,
        {"timesteps": timesteps, "steps": steps, "time_budget": float(time_budget), "budget_s": budget,
         "score": {"metric": metric_name(metric), "value": err, "reference": f"{slowest} x{reference_steps}"},
         "search": {"evaluated": len(results), "origin": origin}},
    )  # fmt: skip
    schedule.metadata["cost_s"] = schedule.cost()
    return schedule
