"""OMS-DPM model schedules (Liu et al., ICML 2023): which member of a model zoo runs at each denoising step.

A :class:`ModelSchedule` names the zoo members (by name, never by position in a folder listing), the member of every
model call in order (``route``, one entry per step: its length is the step count it was searched for), each member's
measured latency per call, and the search's record. ``cost()`` is the summed latency of a route.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .solver_schedule import from_kinded_dict

__all__ = ["ModelSchedule", "MODEL_SCHEDULE_KIND"]

MODEL_SCHEDULE_KIND = "oms_model_schedule"


@dataclass
class ModelSchedule:
    """Args:
    members: zoo member names (the router's components), each used or not.
    route: the member of each model call, in order (``len(route)`` = steps).
    latency: seconds per call of each member, as measured for the search (optional).
    metadata: what the schedule was searched for (budget, score, ...).
    """

    members: list[str]
    route: list[str]
    latency: dict[str, float] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    version: int = 1

    def __post_init__(self) -> None:
        if self.version != 1:
            raise ValueError(f"ModelSchedule: version {self.version} is not supported (supported: 1)")
        if isinstance(self.members, str) or not self.members or len(set(self.members)) != len(self.members):
            raise ValueError(f"ModelSchedule: members must be distinct names, got {self.members!r}")
        self.members, self.route = list(self.members), list(self.route)
        if not self.route:
            raise ValueError("ModelSchedule: route is empty")
        unknown = sorted({m for m in self.route if m not in self.members})
        if unknown:
            raise ValueError(f"ModelSchedule: route names unknown member(s) {unknown} (members: {self.members})")
        bad = sorted(set(self.latency) - set(self.members))
        if bad:
            raise ValueError(f"ModelSchedule: latency for unknown member(s) {bad}")
        self.latency = {k: float(v) for k, v in self.latency.items()}
        self.metadata = dict(self.metadata)

    @property
    def steps(self) -> int:
        return len(self.route)

    def cost(self, route: Sequence[str] | None = None) -> float:
        """Summed measured latency of ``route`` (default: this schedule's)."""
        route = self.route if route is None else route
        missing = sorted({m for m in route if m not in self.latency})
        if missing:
            raise ValueError(f"ModelSchedule.cost: no latency for member(s) {missing}")
        return sum(self.latency[m] for m in route)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": MODEL_SCHEDULE_KIND, "version": self.version, "members": list(self.members),
                "route": list(self.route), "latency": dict(self.latency), "metadata": dict(self.metadata)}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSchedule:
        return from_kinded_dict(cls, data, MODEL_SCHEDULE_KIND)
