"""Mixed-precision bit allocation solved exactly as an integer program (``scipy.optimize.milp``).

Variables ``x[l, b]`` in {0, 1}: layer ``l`` gets ``b`` bits. Exactly one choice per layer; the budget is
``sum_l size_l * bits_l <= avg_bits * sum_l size_l`` and/or ``sum_l size_l * bits_l / 8 <= max_bytes``; the objective
minimizes ``sum cost[l][b]`` (turn a sensitivity you want to *maximize*, e.g. SQNR/SSIM, into a cost first, e.g.
``max_s - s``). MixDQ solves the same problem per layer group (content / quality): :func:`allocate_bits_by_group`;
:func:`normalize_costs_by_group` puts sensitivities measured under different metrics on one scale (ViDiT-Q).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Allocation", "allocate_bits", "allocate_bits_by_group", "normalize_costs_by_group"]

logger = logging.getLogger(__name__)


@dataclass
class Allocation:
    """Result of :func:`allocate_bits`: ``bits`` (layer -> bits), total cost, achieved size-weighted average bits."""

    bits: dict[str, int]
    total_cost: float
    avg_bits: float
    total_bits: int = 0
    extras: dict = field(default_factory=dict)

    @property
    def total_bytes(self) -> float:
        """Weight storage implied by the allocation, ``total_bits / 8``."""
        return self.total_bits / 8

    def __getitem__(self, layer: str) -> int:
        return self.bits[layer]


def _validate(costs: Mapping, sizes: Mapping) -> tuple[list[str], list[list[tuple[int, float]]], list[int]]:
    if not isinstance(costs, Mapping):
        raise TypeError(f"allocate_bits: costs must be a mapping layer -> {{bits: cost}}, got {type(costs).__name__}")
    if not isinstance(sizes, Mapping):
        raise TypeError(f"allocate_bits: sizes must be a mapping layer -> int, got {type(sizes).__name__}")
    if len(costs) == 0:
        raise ValueError("allocate_bits: costs is empty (no layers to allocate)")
    missing = [k for k in costs if k not in sizes]
    if missing:
        raise ValueError(
            f"allocate_bits: sizes is missing layer(s) {missing[:10]}" + (" ..." if len(missing) > 10 else "")
        )
    extra = [k for k in sizes if k not in costs]
    if extra:
        raise ValueError(
            f"allocate_bits: sizes has layer(s) not in costs: {extra[:10]}" + (" ..." if len(extra) > 10 else "")
        )
    layers = list(costs)
    options: list[list[tuple[int, float]]] = []
    size_list: list[int] = []
    for layer in layers:
        size = sizes[layer]
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"allocate_bits: sizes[{layer!r}] must be a positive int, got {size!r}")
        opts = costs[layer]
        if not isinstance(opts, Mapping) or len(opts) == 0:
            raise ValueError(f"allocate_bits: costs[{layer!r}] must be a non-empty mapping bits -> cost, got {opts!r}")
        row = []
        for b, c in opts.items():
            if isinstance(b, bool) or not isinstance(b, int) or b <= 0:
                raise ValueError(f"allocate_bits: costs[{layer!r}] has invalid bit width {b!r} (positive int expected)")
            try:
                c = float(c)
            except (TypeError, ValueError):
                raise ValueError(f"allocate_bits: costs[{layer!r}][{b}] must be a number, got {c!r}") from None
            if math.isnan(c) or math.isinf(c):
                raise ValueError(f"allocate_bits: costs[{layer!r}][{b}] must be finite, got {c}")
            if c < 0:
                raise ValueError(f"allocate_bits: costs[{layer!r}][{b}] must be >= 0, got {c}")
            row.append((b, c))
        row.sort()
        options.append(row)
        size_list.append(size)
    return layers, options, size_list


def allocate_bits(
    costs: Mapping[str, Mapping[int, float]],
    sizes: Mapping[str, int],
    *,
    avg_bits: float | None = None,
    max_bytes: float | None = None,
    time_limit: float | None = None,
) -> Allocation:
    """Choose one bit width per layer minimizing total cost under a size-weighted bit budget (exact MILP).

    Args:
        costs: ``{layer: {bits: cost}}``; costs must be finite and >= 0; layers may have different candidate sets.
        sizes: ``{layer: number_of_elements}`` (positive ints), the weights of the budget.
        avg_bits: budget on the size-weighted average bit width.
        max_bytes: budget on ``sum(size * bits) / 8``. At least one of ``avg_bits`` / ``max_bytes`` is required.
        time_limit: optional solver time limit in seconds (the result is then not guaranteed optimal; a warning is
            logged if the solver stops early with a feasible solution).

    Raises:
        ValueError: empty/invalid input, or an infeasible budget (the message states the minimum achievable).
    """
    layers, options, size_list = _validate(costs, sizes)
    if avg_bits is None and max_bytes is None:
        raise ValueError("allocate_bits: give avg_bits and/or max_bytes")
    total_size = sum(size_list)
    min_bits_total = sum(s * row[0][0] for s, row in zip(size_list, options))
    budgets = []  # upper bounds on sum(size * bits)
    if avg_bits is not None:
        if isinstance(avg_bits, bool) or not isinstance(avg_bits, (int, float)) or not math.isfinite(avg_bits):
            raise ValueError(f"allocate_bits: avg_bits must be a finite number, got {avg_bits!r}")
        if min_bits_total > avg_bits * total_size * (1 + 1e-12):
            raise ValueError(
                f"allocate_bits: avg_bits={avg_bits} is infeasible; the minimum achievable average is "
                f"{min_bits_total / total_size:.6g} bits"
            )
        budgets.append(avg_bits * total_size)
    if max_bytes is not None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, float)) or not math.isfinite(max_bytes):
            raise ValueError(f"allocate_bits: max_bytes must be a finite number, got {max_bytes!r}")
        if min_bits_total / 8 > max_bytes * (1 + 1e-12):
            raise ValueError(
                f"allocate_bits: max_bytes={max_bytes} is infeasible; the minimum achievable size is "
                f"{min_bits_total / 8:.6g} bytes"
            )
        budgets.append(max_bytes * 8)
    budget = min(budgets)

    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_array

    n_vars = sum(len(r) for r in options)
    c = np.empty(n_vars)
    w = np.empty(n_vars)  # budget row, normalized by total_size (keeps coefficients ~bits)
    rows, cols = [], []
    var_index: list[tuple[int, int]] = []
    j = 0
    for i, (row, s) in enumerate(zip(options, size_list)):
        for b, cost in row:
            c[j] = cost
            w[j] = s * b / total_size
            rows.append(i)
            cols.append(j)
            var_index.append((i, b))
            j += 1
    one_hot = coo_array((np.ones(n_vars), (rows, cols)), shape=(len(layers), n_vars)).tocsr()
    constraints = [
        LinearConstraint(one_hot, lb=np.ones(len(layers)), ub=np.ones(len(layers))),
        LinearConstraint(w[None, :], lb=-np.inf, ub=budget / total_size),
    ]
    options_ = {"mip_rel_gap": 0.0, "presolve": True}
    if time_limit is not None:
        options_["time_limit"] = float(time_limit)
    res = milp(c, integrality=np.ones(n_vars), bounds=Bounds(0, 1), constraints=constraints, options=options_)
    if res.x is None:
        raise RuntimeError(f"allocate_bits: MILP solver failed (status {res.status}): {res.message}")
    if res.status != 0:
        logger.warning("allocate_bits: solver stopped early (%s); the allocation may be suboptimal", res.message)
    chosen: dict[str, int] = {}
    for j, val in enumerate(res.x):
        if val > 0.5:
            i, b = var_index[j]
            chosen[layers[i]] = b
    if len(chosen) != len(layers):  # pragma: no cover - guarded by the equality constraints
        raise RuntimeError("allocate_bits: solver returned an incomplete assignment")
    total_bits = sum(size_list[i] * chosen[layer] for i, layer in enumerate(layers))
    total_cost = float(sum(dict(options[i])[chosen[layer]] for i, layer in enumerate(layers)))
    return Allocation(
        bits=chosen,
        total_cost=total_cost,
        avg_bits=total_bits / total_size,
        total_bits=total_bits,
        extras={"solver_status": int(res.status), "solver_message": str(res.message)},
    )


def normalize_costs_by_group(
    sensitivity: Mapping[str, Mapping[int, float]], groups: Mapping[str, str]
) -> tuple[dict[str, dict[int, float]], dict[str, float]]:
    """Costs on one scale from errors measured under per-group metrics; returns ``(costs, {group: scale})``.

    Each layer's errors are divided by its group's ``scale``: the group's mean error at the lowest bit width all its
    layers share (so that mean becomes 1; a scale <= 0 gives costs 0). Costs are clamped to >= 0 and a non-finite one
    becomes ``1e6``. ``costs`` lists the groups in sorted order, each group's layers in ``sensitivity`` order.
    """
    missing = [n for n in sensitivity if n not in groups]
    if missing:
        raise ValueError(f"normalize_costs_by_group: groups is missing layer(s) {missing[:10]}")
    costs: dict[str, dict[int, float]] = {}
    norms: dict[str, float] = {}
    for g in sorted({groups[n] for n in sensitivity}):
        members = [n for n in sensitivity if groups[n] == g]
        common = set.intersection(*(set(sensitivity[n]) for n in members))
        if not common:
            raise ValueError(f"normalize_costs_by_group: the layers of group {g!r} share no bit width")
        low = min(common)
        scale = sum(sensitivity[n][low] for n in members) / len(members)
        norms[g] = scale
        for n in members:
            row = {b: (v / scale if scale > 0 else 0.0) for b, v in sensitivity[n].items()}
            costs[n] = {b: max(0.0, v if math.isfinite(v) else 1e6) for b, v in row.items()}
    return costs, norms


def allocate_bits_by_group(
    costs: Mapping[str, Mapping[int, float]],
    sizes: Mapping[str, int],
    groups: Mapping[str, str],
    avg_bits: float | Mapping[str, float],
    *,
    time_limit: float | None = None,
) -> Allocation:
    """One :func:`allocate_bits` MILP per layer group, each under its own average-bit budget (MixDQ).

    ``avg_bits`` is ``{group: budget}`` (every group of ``costs`` needs one) or one number for all groups. The merged
    :class:`Allocation` has the summed cost and bits; ``extras["groups"]`` holds each group's :class:`Allocation`.
    """
    missing = [n for n in costs if n not in groups]
    if missing:
        raise ValueError(f"allocate_bits_by_group: groups is missing layer(s) {missing[:10]}")
    names = sorted({groups[n] for n in costs})
    if isinstance(avg_bits, Mapping):
        lacking = [g for g in names if g not in avg_bits]
        if lacking:
            raise ValueError(f"allocate_bits_by_group: avg_bits has no budget for group(s) {lacking}")
        budgets = {g: avg_bits[g] for g in names}
    else:
        budgets = dict.fromkeys(names, avg_bits)
    per_group: dict[str, Allocation] = {}
    for g in names:
        members = [n for n in costs if groups[n] == g]
        try:
            per_group[g] = allocate_bits(
                {n: costs[n] for n in members},
                {n: sizes[n] for n in members if n in sizes},
                avg_bits=budgets[g],
                time_limit=time_limit,
            )
        except ValueError as e:
            raise ValueError(f"allocate_bits_by_group: group {g!r}: {e}") from None
    bits = {n: per_group[groups[n]].bits[n] for n in costs}
    total_bits = sum(a.total_bits for a in per_group.values())
    return Allocation(
        bits=bits,
        total_cost=sum(a.total_cost for a in per_group.values()),
        avg_bits=total_bits / sum(sizes[n] for n in costs),
        total_bits=total_bits,
        extras={"groups": per_group},
    )
