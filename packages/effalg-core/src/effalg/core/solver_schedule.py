"""USF solver schedules (Liu et al., ICLR 2024): a per-step recipe for an exponential-integrator ODE sampler.

A :class:`SolverSchedule` holds ``S + 1`` times (model-input timesteps of a discrete VP model, descending; ``-1``
means "no noise left") and one :class:`SolverStep` per interval: the prediction type the step integrates (``"noise"``:
DPM-Solver / DDIM form, ``"data"``: DPM-Solver++ form), its Taylor order, how many history points estimate the
derivatives (in log-SNR ``lambda``), a relaxation of the first derivative, and whether a UniC-style corrector
refines the step's result with the next model output (free: that output is the next step's history point). The model
is called at ``timesteps[0..S-1]``: NFE = S. With the right recipe this reproduces DDIM (= Euler), DPM-Solver++(2M)
and UniPC-style predictor-correctors (:meth:`SolverSchedule.ddim`, :meth:`SolverSchedule.dpmsolver_pp_2m`, ...).

:func:`solver_update` is one step of the recipe (framework-free math, float64 coefficients); the diffusers
scheduler that runs schedules is ``effalg.diffusers.USFScheduler``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

__all__ = ["SolverStep", "SolverSchedule", "solver_update", "taylor_weights", "SCHEDULE_KIND", "SCHEDULE_VERSION"]

SCHEDULE_KIND = "usf_solver_schedule"
SCHEDULE_VERSION = 1
PREDICTIONS = ("noise", "data")
MAX_ORDER = 3


@dataclass
class SolverStep:
    """One interval of a :class:`SolverSchedule`.

    Args:
        order: Taylor order (1-3); needs ``order - 1`` earlier model outputs.
        prediction: ``"noise"`` or ``"data"`` (the quantity expanded in ``lambda``).
        points: earlier model outputs used to estimate the derivatives (``>= order - 1``; default ``order - 1``).
        relaxation: first-derivative scale: a float ``c`` (``1 + c h``) or ``"dpmsolver-2"`` (DPM-Solver-2's factor).
        corrector: refine this step's result with the next model output (not on the last step).
    """

    order: int = 1
    prediction: str = "data"
    points: int | None = None
    relaxation: float | str = 0.0
    corrector: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.order, bool) or self.order not in range(1, MAX_ORDER + 1):
            raise ValueError(f"SolverStep: order must be 1..{MAX_ORDER}, got {self.order!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"SolverStep: prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.points is None:
            self.points = self.order - 1
        if isinstance(self.points, bool) or not isinstance(self.points, int) or self.points < self.order - 1:
            raise ValueError(f"SolverStep: points must be an int >= order - 1 = {self.order - 1}, got {self.points!r}")
        if isinstance(self.relaxation, str):
            if self.relaxation != "dpmsolver-2":
                raise ValueError(f"SolverStep: relaxation must be a float or 'dpmsolver-2', got {self.relaxation!r}")
        elif isinstance(self.relaxation, bool) or not isinstance(self.relaxation, (int, float)):
            raise ValueError(f"SolverStep: relaxation must be a float or 'dpmsolver-2', got {self.relaxation!r}")
        else:
            self.relaxation = float(self.relaxation)
        self.corrector = bool(self.corrector)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SolverSchedule:
    """A searched (or hand-made) solver schedule; versioned JSON via :meth:`to_dict` / :meth:`from_dict`.

    Args:
        timesteps: ``S + 1`` model-input times, strictly descending; the model runs at the first ``S``; the last may
            be ``-1`` (integrate to zero noise; that step must then be first order without a corrector).
        steps: ``S`` :class:`SolverStep` (or dicts).
        metadata: what the schedule was searched for (model, guidance scale, score, ...).
    """

    timesteps: list[float]
    steps: list[SolverStep]
    metadata: dict = field(default_factory=dict)
    version: int = SCHEDULE_VERSION

    def __post_init__(self) -> None:
        if self.version != SCHEDULE_VERSION:
            raise ValueError(f"SolverSchedule: version {self.version} is not supported (supported: {SCHEDULE_VERSION})")
        steps = []
        for i, st in enumerate(self.steps):
            if not isinstance(st, SolverStep):
                unknown = sorted(set(dict(st)) - {f.name for f in fields(SolverStep)})
                if unknown:
                    raise ValueError(f"SolverSchedule: step {i} has unknown key(s) {unknown} (not supported)")
                st = SolverStep(**dict(st))
            steps.append(st)
        self.steps = steps
        t = [float(x) for x in self.timesteps]
        if len(t) != len(self.steps) + 1 or len(self.steps) < 1:
            raise ValueError(
                f"SolverSchedule: {len(self.steps)} steps need {len(self.steps) + 1} timesteps, got {len(t)}"
            )
        if any(not math.isfinite(x) for x in t) or any(a <= b for a, b in zip(t, t[1:])):
            raise ValueError(f"SolverSchedule: timesteps must be finite and strictly descending, got {t}")
        if min(t) < -1 or (min(t) < 0 and t[-1] != -1):
            raise ValueError(f"SolverSchedule: timesteps must be >= 0 (or -1 as the last: zero noise), got {t}")
        self.timesteps = t
        for i, s in enumerate(self.steps):
            if s.points > i:
                raise ValueError(
                    f"SolverSchedule: step {i} uses {s.points} earlier model output(s) (order {s.order}) but only "
                    f"{i} exist before it; the solver order is above what the step history allows"
                )
        last = self.steps[-1]
        if last.corrector:
            raise ValueError("SolverSchedule: the last step cannot have a corrector (it would cost one more NFE)")
        if t[-1] == -1 and last.order != 1:
            raise ValueError("SolverSchedule: a last step to zero noise (timestep -1) must be first order")
        if not isinstance(self.metadata, Mapping):
            raise TypeError("SolverSchedule: metadata must be a dict")
        self.metadata = dict(self.metadata)

    @property
    def nfe(self) -> int:
        """Model calls: one per step (correctors reuse the next step's call)."""
        return len(self.steps)

    @property
    def model_timesteps(self) -> list[float]:
        """The times the model is called at, in order."""
        return self.timesteps[:-1]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": SCHEDULE_KIND, "version": self.version, "timesteps": list(self.timesteps),
                "steps": [s.to_dict() for s in self.steps], "metadata": dict(self.metadata)}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SolverSchedule:
        return from_kinded_dict(cls, data, SCHEDULE_KIND)

    # ---- hand-made solvers as schedules (the baselines, and the search's seeds) ----------------------------------
    @classmethod
    def ddim(cls, timesteps: Sequence[float], **metadata: Any) -> SolverSchedule:
        """DDIM (eta 0) = Euler on the probability-flow ODE: first order, noise prediction."""
        return cls(list(timesteps), [SolverStep(1, "noise") for _ in range(len(timesteps) - 1)], metadata)

    @classmethod
    def dpmsolver_pp_2m(cls, timesteps: Sequence[float], **metadata: Any) -> SolverSchedule:
        """DPM-Solver++(2M): data prediction, second order from the second step, first order on a last step to zero
        noise (diffusers' ``lower_order_final``)."""
        n = len(timesteps) - 1
        steps = [SolverStep(1 if i == 0 else 2, "data", relaxation="dpmsolver-2") for i in range(n)]
        if timesteps[-1] == -1 or n < 15:
            steps[-1] = SolverStep(1, "data")
        return cls(list(timesteps), steps, metadata)

    @classmethod
    def predictor_corrector(cls, timesteps: Sequence[float], order: int = 2, prediction: str = "data",
                            **metadata: Any) -> SolverSchedule:  # fmt: skip
        """A UniPC-style multistep predictor with a corrector on every step but the last.

        In the noise form the corrector of a step from a time where ``alpha`` is close to 0 (the first step of a
        ``squaredcos_cap_v2`` schedule, say) multiplies the derivative estimate by about ``alpha_t / alpha_s`` and
        diverges; the data form (the default) does not."""
        n = len(timesteps) - 1
        steps = []
        for i in range(n):
            o = 1 if timesteps[-1] == -1 and i == n - 1 else min(order, i + 1)
            steps.append(SolverStep(o, prediction, corrector=i < n - 1))
        return cls(list(timesteps), steps, metadata)


def from_kinded_dict(cls: type, data: Any, kind: str) -> Any:
    """``cls(**data)`` for a schedule dataclass saved with ``{"kind": kind, ...}``: an instance passes through;
    another kind or a key that is not a field is a ``ValueError`` naming it."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise TypeError(f"{cls.__name__}.from_dict: expected a dict, got {type(data).__name__}")
    d = dict(data)
    got = d.pop("kind", kind)
    if got != kind:
        raise ValueError(f"{cls.__name__}.from_dict: kind must be {kind!r}, got {got!r}")
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"{cls.__name__}.from_dict: unknown key(s) {unknown}")
    return cls(**d)


# ---- the math ------------------------------------------------------------------------------------------------------
def _phi(k: int, z: float) -> float:
    """``phi_k(z)``: ``phi_1 = (e^z - 1) / z``, ``phi_{k+1} = (phi_k - 1 / k!) / z`` (series near 0)."""
    if abs(z) < 1e-4:
        return sum(z**j / math.factorial(j + k) for j in range(6))
    p = math.expm1(z) / z
    for j in range(1, k):
        p = (p - 1.0 / math.factorial(j)) / z
    return p


def taylor_weights(dl: Sequence[float], n: int) -> list[float]:
    """Weights ``a`` with ``sum_j a_j dl_j^k / k! = [k == n]`` for ``k = 1..m`` (``m = len(dl)``): the ``n``-th
    derivative at 0 of a function from its differences ``F(dl_j) - F(0)`` (exact for polynomials of degree ``m``)."""
    m = len(dl)
    a = torch.tensor([[d**k / math.factorial(k) for d in dl] for k in range(1, m + 1)], dtype=torch.float64)
    b = torch.zeros(m, dtype=torch.float64)
    b[n - 1] = 1.0
    return torch.linalg.solve(a, b).tolist()


def _relax(relaxation: float | str, h: float, prediction: str) -> float:
    if isinstance(relaxation, str):  # "dpmsolver-2": DPM-Solver(++)-2's factor (evaluated at -h for data)
        z = h if prediction == "noise" else -h
        return 0.5 * z * math.expm1(z) / (math.expm1(z) - z)
    return 1.0 + relaxation * h


def solver_update(
    x_s: torch.Tensor,
    lam_s: float,
    f_s: torch.Tensor,
    others: Sequence[tuple[float, torch.Tensor]],
    a_s: float,
    s_s: float,
    a_t: float,
    s_t: float,
    order: int,
    prediction: str,
    relaxation: float | str = 0.0,
) -> torch.Tensor:
    """One exponential-integrator step from ``x_s`` (``alpha, sigma = a_s, s_s``; log-SNR ``lam_s``; model output
    ``f_s`` in the chosen form: predicted noise or data) to ``(a_t, s_t)``.

    ``others``: ``(lambda, F)`` of the other model outputs the derivatives are estimated from (``>= order - 1``; the
    earlier outputs for a predictor; the new one first, then the earlier ones, for a corrector). ``s_t == 0`` (zero
    noise) needs ``order == 1``.
    """
    if s_t == 0:
        if order != 1:
            raise ValueError("solver_update: a step to zero noise must be first order")
        if prediction == "data":
            return f_s.to(x_s.dtype)
        return ((x_s.double() - s_s * f_s.double()) / a_s).to(x_s.dtype)
    if len(others) < order - 1:
        raise ValueError(f"solver_update: order {order} needs {order - 1} other model outputs, got {len(others)}")
    lam_t = math.log(a_t) - math.log(s_t)
    h = lam_t - lam_s
    derivs = []
    if order > 1:
        dl = [lam - lam_s for lam, _ in others]
        for n in range(1, order):
            w = taylor_weights(dl, n)
            d = sum(wj * (f.double() - f_s.double()) for wj, (_, f) in zip(w, others))
            if n == 1:
                d = d * _relax(relaxation, h, prediction)
            derivs.append(d)
    if prediction == "noise":
        out = (a_t / a_s) * x_s.double() - s_t * h * _phi(1, h) * f_s.double()
        for k, d in enumerate(derivs, start=1):
            out = out - s_t * h ** (k + 1) * _phi(k + 1, h) * d
    else:
        out = (s_t / s_s) * x_s.double() + a_t * h * _phi(1, -h) * f_s.double()
        for k, d in enumerate(derivs, start=1):
            out = out + a_t * h ** (k + 1) * _phi(k + 1, -h) * d
    return out.to(x_s.dtype)
