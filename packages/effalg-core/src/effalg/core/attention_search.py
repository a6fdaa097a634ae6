"""MoA search math (framework-agnostic): attention influence, elastic-rule costs and densities, rule selection (MILP).

A rule ``(alpha, beta, sink)`` keeps, at input length ``N``, a causal band of ``w = clamp(ceil(alpha + beta * N), 1, N)``
keys plus the first ``sink`` keys: query ``i`` sees key ``j`` iff ``j <= i`` and (``i - j < w`` or ``j < sink``), the
mask semantics of :class:`effalg.core.attention_plan.ElasticWindowPlan`. A rule's **density** at ``N`` is the fraction of
the KV cache it keeps, ``min(N, sink + window) / N`` (as ``ElasticWindowPlan.density``); its score density (kept
fraction of the causal score matrix) is :func:`rule_score_density`.

Costs are computed at **token granularity** on block-summed influence: the influence of a ``block_size x block_size``
block is assumed spread uniformly over its causal entries, and a rule pays the dropped fraction of it (exact for
``block_size = 1``). Selection picks one rule per (layer, KV head) with ``scipy.optimize.milp`` (HiGHS), under an
average-density (kept KV fraction) budget at several lengths (no Gurobi).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

__all__ = [
    "ElasticRule",
    "RuleSelection",
    "attention_influence",
    "candidate_rules",
    "rule_cost",
    "rule_costs",
    "rule_density",
    "rule_kept_blocks",
    "rule_score_density",
    "select_rules",
    "window_length",
]

logger = logging.getLogger(__name__)


class ElasticRule(NamedTuple):
    """``window(N) = clamp(ceil(alpha + beta * N), 1, N)`` plus ``sink`` global tokens."""

    alpha: float
    beta: float
    sink: int

    def window(self, n: int) -> int:
        return window_length(self.alpha, self.beta, n)

    def density(self, n: int) -> float:
        """Kept KV-cache fraction at length ``n``: ``min(n, sink + window) / n``."""
        return rule_density(self.alpha, self.beta, self.sink, n)

    def score_density(self, n: int) -> float:
        """Kept fraction of the causal ``n x n`` score matrix."""
        return rule_score_density(self.alpha, self.beta, self.sink, n)

    def as_dict(self) -> dict:
        return {"alpha": float(self.alpha), "beta": float(self.beta), "sink": int(self.sink)}


def _check_len(n, name: str = "N") -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be a positive int, got {n!r}")
    return n


def window_length(alpha: float, beta: float, n: int) -> int:
    """``clamp(ceil(alpha + beta * n), 1, n)``."""
    _check_len(n)
    v = float(alpha) + float(beta) * n
    if not math.isfinite(v):
        raise ValueError(f"window_length: alpha + beta * N is not finite (alpha={alpha}, beta={beta}, N={n})")
    return int(min(max(math.ceil(v), 1), n))


def _kept_per_row(n: int, window: int, sink: int) -> torch.Tensor:
    """Kept keys per query row (float64 [n])."""
    i = torch.arange(n, dtype=torch.float64)
    band = torch.clamp(i + 1, max=window)
    extra = torch.clamp(torch.clamp(i - window + 1, min=0), max=sink)  # sink keys j < sink with j <= i - window
    return band + extra


def _check_sink(sink, fn: str) -> int:
    if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
        raise ValueError(f"{fn}: sink must be an int >= 0, got {sink!r}")
    return sink


def rule_density(alpha: float, beta: float, sink: int, n: int) -> float:
    """Fraction of the KV cache the rule keeps at length ``n``: ``min(n, sink + window) / n`` (the slots of
    :meth:`effalg.core.attention_plan.ElasticWindowPlan.cache_slots`; a sink overlapping the window counts once)."""
    w = window_length(alpha, beta, n)
    return min(n, _check_sink(sink, "rule_density") + w) / n


def rule_score_density(alpha: float, beta: float, sink: int, n: int) -> float:
    """Fraction of the causal ``n x n`` score matrix kept by the rule (exact count / ``n (n + 1) / 2``)."""
    w = window_length(alpha, beta, n)
    return float(_kept_per_row(n, w, _check_sink(sink, "rule_score_density")).sum()) / (n * (n + 1) / 2)


def rule_kept_blocks(n: int, block_size: int, window: int, sink: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept, causal)``: float64 ``[nb, nb]`` counts of kept and of causal entries per block, ``nb = ceil(n / bs)``.

    O(n * nb): per row ``i`` and column block ``[j0, j1)``, the band keeps ``max(j0, i - w + 1) <= j <= min(j1 - 1, i)``
    and the sink adds ``j0 <= j <= min(j1 - 1, sink - 1, i - w)``.
    """
    _check_len(n)
    _check_len(block_size, "block_size")
    nb = -(-n // block_size)
    i = torch.arange(n, dtype=torch.int64)[:, None]
    j0 = torch.arange(nb, dtype=torch.int64)[None, :] * block_size
    j1 = torch.clamp(j0 + block_size, max=n)  # exclusive
    hi = torch.minimum(j1 - 1, i)
    causal = torch.clamp(hi - j0 + 1, min=0)
    band = torch.clamp(hi - torch.maximum(j0, i - window + 1) + 1, min=0)
    sink_hi = torch.minimum(torch.minimum(j1 - 1, torch.full_like(i, sink - 1)), i - window)
    sinkc = torch.clamp(sink_hi - j0 + 1, min=0)
    kept = (band + sinkc).to(torch.float64)
    pad = nb * block_size - n
    rows = torch.nn.functional.pad(kept, (0, 0, 0, pad)).reshape(nb, block_size, nb).sum(1)
    crow = torch.nn.functional.pad(causal.to(torch.float64), (0, 0, 0, pad)).reshape(nb, block_size, nb).sum(1)
    return rows, crow


def attention_influence(attn_probs: torch.Tensor, grad_probs: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block-summed |first-order loss change| of masking each causal score entry, ``[H, nb, nb]`` (float32).

    ``attn_probs`` A and ``grad_probs`` G = dL/dA are ``[H, N, N]`` or ``[B, H, N, N]`` (batch is summed). Masking
    entry (i, j) and renormalizing row i changes the loss by ``E = -A (G - rowsum(G * A)) / (1 - A)``; where
    ``1 - A`` is ~0 (a row with a single key) ``E = -G * A`` is used. Entries above the diagonal are ignored.
    """
    if not isinstance(attn_probs, torch.Tensor) or not isinstance(grad_probs, torch.Tensor):
        raise TypeError("attention_influence: attn_probs and grad_probs must be tensors")
    if attn_probs.shape != grad_probs.shape:
        raise ValueError(
            f"attention_influence: grad_probs shape {tuple(grad_probs.shape)} != attn_probs shape "
            f"{tuple(attn_probs.shape)}"
        )
    if attn_probs.dim() == 3:
        attn_probs, grad_probs = attn_probs[None], grad_probs[None]
    if attn_probs.dim() != 4 or attn_probs.shape[-1] != attn_probs.shape[-2]:
        raise ValueError(f"attention_influence: expected [H, N, N] or [B, H, N, N], got {tuple(attn_probs.shape)}")
    _check_len(block_size, "block_size")
    b, h, n, _ = attn_probs.shape
    nb = -(-n // block_size)
    pad = nb * block_size - n
    out = torch.zeros(h, nb, nb, dtype=torch.float32, device=attn_probs.device)
    causal = torch.ones(n, n, dtype=torch.bool, device=attn_probs.device).tril()
    for hh in range(h):  # one head at a time: temporaries of B x N x N only
        a = attn_probs[:, hh].float()
        g = grad_probs[:, hh].float()
        s = (g * a).sum(-1, keepdim=True)
        one_minus = 1.0 - a
        safe = one_minus > 1e-6
        e = torch.where(safe, -a * (g - s) / torch.where(safe, one_minus, torch.ones_like(a)), -g * a)
        e = (e.abs().sum(0) * causal).float()
        if pad:
            e = torch.nn.functional.pad(e, (0, pad, 0, pad))
        out[hh] = e.reshape(nb, block_size, nb, block_size).sum((1, 3))
    return out


def _check_influence(influence: torch.Tensor, n: int, block_size: int, fn: str) -> torch.Tensor:
    if not isinstance(influence, torch.Tensor) or influence.dim() < 2:
        raise ValueError(f"{fn}: influence_blocks must be a tensor [..., nb, nb]")
    nb = -(-n // block_size)
    if influence.shape[-1] != nb or influence.shape[-2] != nb:
        raise ValueError(
            f"{fn}: influence_blocks has {tuple(influence.shape[-2:])} blocks, expected ({nb}, {nb}) for N={n}, "
            f"block_size={block_size}"
        )
    return influence.to(torch.float64)


def rule_cost(
    influence_blocks: torch.Tensor, alpha: float, beta: float, sink: int, N: int, block_size: int  # noqa: N803
) -> torch.Tensor:
    """Influence a rule drops at length ``N``: ``sum_blocks influence * dropped / causal`` (token granularity,
    uniform within a block); ``influence_blocks`` is ``[..., nb, nb]``, the result ``[...]`` (float64)."""
    return rule_costs(influence_blocks, [ElasticRule(alpha, beta, sink)], N, block_size)[..., 0]


def rule_costs(influence_blocks: torch.Tensor, rules: Sequence, N: int, block_size: int) -> torch.Tensor:  # noqa: N803
    """:func:`rule_cost` for many rules: ``[..., nb, nb]`` -> ``[..., C]`` (float64)."""
    _check_len(N)
    inf = _check_influence(influence_blocks, N, block_size, "rule_costs")
    cols = []
    cache: dict[tuple[int, int], torch.Tensor] = {}
    for r in rules:
        r = ElasticRule(*r) if not isinstance(r, ElasticRule) else r
        key = (r.window(N), int(r.sink))
        if key not in cache:
            kept, causal = rule_kept_blocks(N, block_size, *key)
            cache[key] = torch.where(causal > 0, (causal - kept) / causal.clamp_min(1), torch.zeros_like(causal))
        cols.append((inf * cache[key]).sum((-1, -2)))
    return torch.stack(cols, -1)


def candidate_rules(
    alphas: Sequence[float], betas: Sequence[float], sinks: Sequence[int], lengths: Sequence[int]
) -> list[ElasticRule]:
    """The ``alphas x betas x sinks`` grid, keeping rules whose raw window ``alpha + beta * N`` is > 0 at the shortest
    length and <= N at the longest (duplicates removed, order kept). Alphas and betas must be >= 0 (unlike the
    original MoA grid, an :class:`~effalg.core.attention_plan.ElasticWindowPlan` forbids negative alpha)."""
    lengths = [_check_len(n, "lengths") for n in lengths]
    if not lengths:
        raise ValueError("candidate_rules: lengths is empty")
    for name, vals in (("alphas", alphas), ("betas", betas), ("sinks", sinks)):
        if len(vals) == 0:
            raise ValueError(f"candidate_rules: {name} is empty")
    for b in betas:
        if not math.isfinite(b) or b < 0:
            raise ValueError(f"candidate_rules: betas must be finite and >= 0, got {b}")
    for a in alphas:
        if not math.isfinite(a) or a < 0:
            raise ValueError(f"candidate_rules: alphas must be finite and >= 0 (plans forbid negative alpha), got {a}")
    for s in sinks:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"candidate_rules: sinks must be ints >= 0, got {s!r}")
    nmin, nmax = min(lengths), max(lengths)
    out: list[ElasticRule] = []
    seen = set()
    for a, b, s in itertools.product(alphas, betas, sinks):
        if a + b * nmin <= 0 or a + b * nmax > nmax:
            continue
        r = ElasticRule(float(a), float(b), int(s))
        if r not in seen:
            seen.add(r)
            out.append(r)
    if not out:
        raise ValueError(
            f"candidate_rules: no valid rule in the grid for lengths {list(lengths)} (need alpha + beta * N > 0 at "
            f"N={nmin} and <= N at N={nmax})"
        )
    return out


@dataclass
class RuleSelection:
    """Result of :func:`select_rules`: ``choice[l][h]`` = candidate index; objective and average densities."""

    choice: list[list[int]]
    objective: float
    densities: list[float]
    costs: list[float] = field(default_factory=list)  # normalized cost per cost length


def _as_2d_float(x, name: str):
    import numpy as np

    arr = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"select_rules: {name} must be finite")
    return arr


def select_rules(
    costs: Sequence,
    densities: Sequence,
    budget: float | Sequence[float],
    *,
    min_fraction: float | None = 0.9,
    weights: Sequence[float] | None = None,
    normalize: bool = True,
    time_limit: float | None = None,
) -> RuleSelection:
    """One candidate rule per (layer, KV head) minimizing the (normalized, weighted) summed cost, exact MILP.

    Args:
        costs: per cost length, ``[L, Hkv, C]`` (influence dropped by each rule, >= 0).
        densities: per constraint length, ``[C]`` density of each rule (may be more lengths than ``costs``); with
            :func:`rule_density` the kept KV-cache fraction.
        budget: average density bound (one for all lengths or one per constraint length): for every constraint length
            ``mean_{l,h} density[choice] <= budget`` and, if ``min_fraction`` is set, ``>= min_fraction * budget``.
        weights: objective weight per cost length (default all 1). With ``normalize`` each length's cost is divided by
            ``sum_{l,h} max_c cost`` so lengths weigh alike.
        time_limit: solver time limit in seconds.

    Raises:
        ValueError: bad shapes/values, or an infeasible budget (the message gives the achievable density range).
    """
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_array

    if len(costs) == 0:
        raise ValueError("select_rules: costs is empty")
    if len(densities) == 0:
        raise ValueError("select_rules: densities is empty")
    cs = [_as_2d_float(c, f"costs[{i}]") for i, c in enumerate(costs)]
    shape = cs[0].shape
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"select_rules: costs[0] must be [L, Hkv, C], got shape {shape}")
    for i, c in enumerate(cs):
        if c.shape != shape:
            raise ValueError(f"select_rules: costs[{i}] has shape {c.shape}, costs[0] has {shape}")
        if (c < 0).any():
            raise ValueError(f"select_rules: costs[{i}] has negative entries")
    nl, nh, nc = shape
    ds = [_as_2d_float(d, f"densities[{i}]").reshape(-1) for i, d in enumerate(densities)]
    for i, d in enumerate(ds):
        if d.shape != (nc,):
            raise ValueError(f"select_rules: densities[{i}] has {d.shape[0]} entries, costs have {nc} candidates")
    budgets = [float(budget)] * len(ds) if np.isscalar(budget) else [float(b) for b in budget]
    if len(budgets) != len(ds):
        raise ValueError(f"select_rules: {len(budgets)} budgets for {len(ds)} density lengths")
    for b in budgets:
        if not math.isfinite(b) or b <= 0:
            raise ValueError(f"select_rules: budget must be a finite number > 0, got {b}")
    if min_fraction is not None and not 0 <= min_fraction <= 1:
        raise ValueError(f"select_rules: min_fraction must be in [0, 1], got {min_fraction}")
    w = [1.0] * len(cs) if weights is None else [float(x) for x in weights]
    if len(w) != len(cs) or any(not math.isfinite(x) or x < 0 for x in w):
        raise ValueError(f"select_rules: weights must be {len(cs)} finite numbers >= 0, got {weights!r}")
    # Quick infeasibility messages (each head may take any candidate, so the achievable average is [min, max]).
    for i, (d, b) in enumerate(zip(ds, budgets)):
        if d.min() > b * (1 + 1e-9):
            raise ValueError(
                f"select_rules: density budget {b:.4g} is infeasible at constraint length #{i}; the minimum "
                f"achievable density is {d.min():.4g}"
            )
        if min_fraction is not None and d.max() < min_fraction * b * (1 - 1e-9):
            raise ValueError(
                f"select_rules: lower bound {min_fraction} x {b:.4g} is infeasible at constraint length #{i}; the "
                f"maximum achievable density is {d.max():.4g} (lower min_fraction or the budget)"
            )

    norms = []
    for c in cs:
        z = c.max(-1).sum() if normalize else 1.0
        norms.append(z if z > 0 else 1.0)
    obj = sum(wi * c / z for wi, c, z in zip(w, cs, norms)).reshape(-1)  # [L*Hkv*C]
    nvar = nl * nh * nc
    groups = np.repeat(np.arange(nl * nh), nc)
    one_per = LinearConstraint(coo_array((np.ones(nvar), (groups, np.arange(nvar))), shape=(nl * nh, nvar)), 1, 1)
    a_rows = np.stack([np.tile(d, nl * nh) / (nl * nh) for d in ds])
    lo = [(min_fraction * b if min_fraction is not None else -np.inf) for b in budgets]
    dens = LinearConstraint(a_rows, lo, budgets)
    options = {"disp": False}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    res = milp(obj, constraints=[one_per, dens], integrality=np.ones(nvar), bounds=Bounds(0, 1), options=options)
    if res.x is None:
        mins = ", ".join(f"{d.min():.4g}" for d in ds)
        lower = f" and the lower bound {min_fraction} x budget" if min_fraction is not None else ""
        raise ValueError(
            f"select_rules: no rule assignment meets the density budget {budgets}{lower} at all lengths jointly "
            f"(solver: {res.message}); minimum achievable density per length: [{mins}]"
        )
    if res.status != 0:
        logger.warning("select_rules: solver stopped early (%s); the selection may not be optimal", res.message)
    x = np.round(res.x).reshape(nl, nh, nc)
    choice = x.argmax(-1).tolist()
    idx = np.array(choice)
    avg = [float(d[idx].mean()) for d in ds]
    lcost = [float(np.take_along_axis(c, idx[..., None], -1).sum() / z) for c, z in zip(cs, norms)]
    return RuleSelection(choice=choice, objective=float(obj @ res.x), densities=avg, costs=lcost)
