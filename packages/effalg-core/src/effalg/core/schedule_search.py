"""Predictor-guided evolutionary search, shared by the USF solver-schedule and the OMS-DPM model-schedule searches.

Seeds are scored first; then each round mutates the best candidates into ``children`` new ones, a ridge regression
on the candidates' features (fit to every score so far, on log scores) ranks them, and only the ``evaluate_top``
best predicted are scored. ``score_batch`` scores a list of candidates (the caller may split it across processes).
A tqdm bar counts the scored candidates and shows the best score.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import torch
from tqdm.auto import tqdm

__all__ = ["predictor_guided_search", "Ridge"]

C = TypeVar("C")


class Ridge:
    """Least squares with an L2 penalty (the performance predictor)."""

    def __init__(self, alpha: float = 1e-2) -> None:
        self.alpha, self.w = alpha, None

    def fit(self, x: Sequence[Sequence[float]], y: Sequence[float]) -> Ridge:
        a = torch.tensor(x, dtype=torch.float64)
        b = torch.tensor(y, dtype=torch.float64)
        self.w = torch.linalg.solve(a.T @ a + self.alpha * torch.eye(a.shape[1], dtype=torch.float64), a.T @ b)
        return self

    def predict(self, x: Sequence[Sequence[float]]) -> list[float]:
        return (torch.tensor(x, dtype=torch.float64) @ self.w).tolist()


def predictor_guided_search(
    seeds: Sequence[tuple[C, str]],
    score_batch: Callable[[list[C]], list[float]],
    mutate: Callable[[C, random.Random], C | None],
    features: Callable[[C], list[float]],
    key: Callable[[C], Hashable],
    *,
    max_evals: int,
    children: int = 48,
    evaluate_top: int = 4,
    seed: int = 0,
    out_of_time: Callable[[], bool] = lambda: False,
    desc: str = "search",
    unit: str = "candidate",
    progress: bool = True,
) -> list[tuple[float, C, str]]:
    """Return every scored ``(score, candidate, origin)`` (lower is better); origin is the seed's name or
    ``"search"``. Non-finite scores count as ``inf``."""
    scored: dict[Hashable, tuple[float, C, str]] = {}
    bar = tqdm(total=max_evals, desc=desc, unit=unit, disable=not progress)

    def score(batch: list[tuple[C, str]]) -> None:
        fresh: dict[Hashable, tuple[C, str]] = {}
        for c, o in batch:
            if key(c) not in scored:
                fresh.setdefault(key(c), (c, o))
        todo = list(fresh.values())[: max_evals - len(scored)]
        for (c, o), s in zip(todo, score_batch([c for c, _ in todo])):
            scored[key(c)] = (s if math.isfinite(s) else math.inf, c, o)
        bar.update(len(todo))
        if scored:
            bar.set_postfix(best=f"{min(v[0] for v in scored.values()):.3e}")

    score(list(seeds))
    rng = random.Random(seed)
    model = Ridge()
    while len(scored) < max_evals and not out_of_time():
        finite = sorted((v for v in scored.values() if math.isfinite(v[0])), key=lambda v: v[0])
        if not finite:
            break
        model.fit([features(v[1]) for v in finite], [math.log(v[0] + 1e-20) for v in finite])
        parents = [v[1] for v in finite[: max(4, len(finite) // 5)]]
        pool: dict[Hashable, C] = {}
        for _ in range(children * 4):
            c = mutate(rng.choice(parents), rng)
            if c is not None and key(c) not in scored:
                pool[key(c)] = c
            if len(pool) >= children:
                break
        if not pool:
            break
        cands = list(pool.values())
        ranked = sorted(zip(model.predict([features(c) for c in cands]), range(len(cands))))
        score([(cands[i], "search") for _, i in ranked[:evaluate_top]])
    bar.close()
    return list(scored.values())
