"""``USFScheduler``: a diffusers scheduler that runs a USF solver schedule (:class:`effalg.core.SolverSchedule`).

    pipe.scheduler = USFScheduler.from_config(pipe.scheduler.config, schedule=schedule)
    pipe.save_pretrained(dir)        # scheduler/scheduler_config.json holds the schedule (versioned)
    pipe = DiffusionPipeline.from_pretrained(dir)   # after ``import effalg.diffusers``

The noise schedule comes from the config (the pipeline's own: ``betas`` of a discrete VP model, its
``prediction_type``); the schedule decides, per step, the timesteps, the order, the prediction type integrated, the
derivative estimate and the corrector. ``num_inference_steps`` must be the schedule's NFE (a schedule is searched for
one NFE). Without a schedule the scheduler runs DPM-Solver++(2M) with trailing timesteps for any step count.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch

from diffusers import SchedulerMixin  # noqa: F401  (diffusers loads components through this module attribute)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from effalg.core.solver_schedule import SolverSchedule, solver_update

__all__ = ["USFScheduler"]


@dataclass
class _Record:
    lam: float
    x: torch.Tensor
    eps: torch.Tensor
    x0: torch.Tensor

    def form(self, prediction: str) -> torch.Tensor:
        return self.eps if prediction == "noise" else self.x0


class USFScheduler(SchedulerMixin, ConfigMixin):
    """Runs a USF solver schedule (exponential-integrator steps with a per-step recipe) on a discrete VP model.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the model's noise schedule
            (``linear``, ``scaled_linear`` or ``squaredcos_cap_v2``), as in diffusers' DDPM-family schedulers.
        prediction_type: what the model predicts: ``epsilon``, ``v_prediction`` or ``sample``.
        schedule: a :class:`~effalg.core.SolverSchedule` (or its dict); None: DPM-Solver++(2M), trailing timesteps.
    """

    _compatibles: list = []
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        prediction_type: str = "epsilon",
        schedule: dict | SolverSchedule | None = None,
    ) -> None:
        if trained_betas is not None:
            betas = torch.tensor(trained_betas, dtype=torch.float64)
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            betas = betas_for_alpha_bar(num_train_timesteps).double()
        else:
            raise ValueError(f"USFScheduler: beta_schedule {beta_schedule!r} is not supported "
                             "(linear, scaled_linear, squaredcos_cap_v2, or trained_betas)")  # fmt: skip
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"USFScheduler: prediction_type must be epsilon, v_prediction or sample, got "
                             f"{prediction_type!r}")  # fmt: skip
        self.log_alpha_bar = torch.cumprod(1.0 - betas, 0).log()  # float64, [N]
        self.alphas_cumprod = self.log_alpha_bar.exp().float()
        self.schedule = None if schedule is None else SolverSchedule.from_dict(schedule)
        if self.schedule is not None:
            self.register_to_config(schedule=self.schedule.to_dict())
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.tensor([], dtype=torch.long)
        self._active: SolverSchedule | None = None
        self._step_index: int | None = None
        self._history: list[_Record] = []

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """As diffusers' ``from_config``; another scheduler's keys (``solver_order``, ``timestep_spacing``, ...) are
        dropped quietly: only the noise schedule and ``prediction_type`` carry over."""
        if config is not None:
            keys = set(inspect.signature(cls.__init__).parameters)
            config = {k: v for k, v in dict(config).items() if k in keys or k.startswith("_")}
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # ---- noise schedule -----------------------------------------------------------------------------------------
    def alpha_sigma(self, t: float) -> tuple[float, float]:
        """``(alpha_t, sigma_t)`` at model time ``t`` (log alpha-bar interpolated linearly between integer times;
        ``t = -1``: no noise)."""
        if t == -1:
            return 1.0, 0.0
        n = self.log_alpha_bar.shape[0]
        if not 0 <= t <= n - 1:
            raise ValueError(f"USFScheduler: timestep {t} is outside [0, {n - 1}] (or -1)")
        lo = int(math.floor(t))
        hi = min(lo + 1, n - 1)
        w = t - lo
        lab = float((1 - w) * self.log_alpha_bar[lo] + w * self.log_alpha_bar[hi])
        return math.exp(0.5 * lab), math.sqrt(-math.expm1(lab))

    # ---- diffusers scheduler API --------------------------------------------------------------------------------
    def set_timesteps(
        self, num_inference_steps: int | None = None, device: Any = None, timesteps: list[float] | None = None
    ) -> None:
        """Prepare a run: the schedule's model-call timesteps (``timesteps=`` replaces them, same count)."""
        sched = self.schedule
        if sched is None:
            if num_inference_steps is None and timesteps is None:
                raise ValueError("USFScheduler.set_timesteps: pass num_inference_steps (no schedule is set)")
            n = self.config.num_train_timesteps
            calls = list(timesteps) if timesteps is not None else \
                [float(round(n - 1 - i * n / num_inference_steps)) for i in range(num_inference_steps)]  # fmt: skip
            sched = SolverSchedule.dpmsolver_pp_2m([*map(float, calls), -1.0])
        else:
            if num_inference_steps is not None and num_inference_steps != sched.nfe:
                raise ValueError(
                    f"USFScheduler: the schedule was searched for {sched.nfe} steps (NFE), got num_inference_steps="
                    f"{num_inference_steps}; search a schedule for {num_inference_steps} steps"
                )
            if timesteps is not None:
                if len(timesteps) != sched.nfe:
                    raise ValueError(f"USFScheduler: timesteps= must give the schedule's {sched.nfe} model-call "
                                     f"times, got {len(timesteps)}")  # fmt: skip
                sched = SolverSchedule([*map(float, timesteps), sched.timesteps[-1]], sched.steps, sched.metadata)
        for t in sched.timesteps:
            self.alpha_sigma(t)  # range check
        self._active = sched
        self._keep = max(st.points for st in sched.steps) + 2  # history a step (and its corrector) reads
        calls = sched.model_timesteps
        integral = all(float(t).is_integer() for t in calls)
        self.timesteps = torch.tensor(calls, dtype=torch.long if integral else torch.float32, device=device)
        self.num_inference_steps = sched.nfe
        self._step_index = None
        self._history = []

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample

    def _predictions(self, out: torch.Tensor, x: torch.Tensor, a: float, s: float) -> tuple[torch.Tensor, ...]:
        out, x = out.double(), x.double()
        kind = self.config.prediction_type
        if kind == "epsilon":
            return out, (x - s * out) / a
        if kind == "v_prediction":
            return s * x + a * out, a * x - s * out
        return (x - a * out) / s, out

    def step(
        self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, return_dict: bool = True, **kwargs: Any
    ) -> SchedulerOutput | tuple:
        """Advance from the current model call to the next time: the previous step's corrector (if any) with this
        output, then this step's predictor."""
        sched = self._active
        if sched is None:
            raise ValueError("USFScheduler.step: call set_timesteps first")
        i = 0 if self._step_index is None else self._step_index
        if i >= sched.nfe:
            raise ValueError(f"USFScheduler.step: all {sched.nfe} steps are done; call set_timesteps again")
        t = sched.timesteps[i]
        a, s = self.alpha_sigma(t)
        lam = math.log(a) - math.log(s)
        eps, x0 = self._predictions(model_output, sample, a, s)
        hist = self._history
        if i > 0 and sched.steps[i - 1].corrector:  # UniC-style: redo step i-1 with this output, one order higher
            st, prev = sched.steps[i - 1], hist[-1]
            a_p, s_p = self.alpha_sigma(sched.timesteps[i - 1])
            new = eps if st.prediction == "noise" else x0
            others = [(lam, new)] + [(r.lam, r.form(st.prediction)) for r in hist[-1 - st.points : -1][::-1]]
            sample = solver_update(prev.x, prev.lam, prev.form(st.prediction), others[: st.order], a_p, s_p, a, s,
                                   st.order + 1, st.prediction)  # fmt: skip
        hist.append(_Record(lam, sample, eps, x0))
        del hist[: -self._keep]
        st = sched.steps[i]
        a_n, s_n = self.alpha_sigma(sched.timesteps[i + 1])
        others = [(r.lam, r.form(st.prediction)) for r in hist[-1 - st.points : -1][::-1]]
        prev_sample = solver_update(sample, lam, hist[-1].form(st.prediction), others, a, s, a_n, s_n, st.order,
                                    st.prediction, st.relaxation)  # fmt: skip
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        ab = self.alphas_cumprod.to(original_samples.device)[timesteps.long()].to(original_samples.dtype)
        while ab.dim() < original_samples.dim():
            ab = ab.unsqueeze(-1)
        return ab.sqrt() * original_samples + (1 - ab).sqrt() * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps
