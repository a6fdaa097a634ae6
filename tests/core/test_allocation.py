import itertools
import math
import random

import pytest

from effalg.core.allocation import allocate_bits, allocate_bits_by_group, normalize_costs_by_group


def _brute_force(costs, sizes, budget_bits):
    layers = list(costs)
    best = math.inf
    for combo in itertools.product(*[list(costs[name]) for name in layers]):
        total_bits = sum(sizes[n] * b for n, b in zip(layers, combo))
        if total_bits <= budget_bits + 1e-9:
            best = min(best, sum(costs[n][b] for n, b in zip(layers, combo)))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_milp_equals_brute_force(seed):
    rng = random.Random(seed)
    n_layers = rng.randint(2, 6)
    costs, sizes = {}, {}
    for i in range(n_layers):
        choices = rng.choice([(2, 4, 8), (4, 8), (3, 4, 8), (2, 8)])
        c = sorted((rng.uniform(0, 10) for _ in choices), reverse=True)  # more bits -> cheaper, usually
        if rng.random() < 0.3:
            rng.shuffle(c)
        costs[f"layer{i}"] = dict(zip(choices, c))
        sizes[f"layer{i}"] = rng.randint(1, 1000)
    total = sum(sizes.values())
    min_avg = sum(sizes[n] * min(costs[n]) for n in costs) / total
    avg = rng.uniform(min_avg, 8.0)
    alloc = allocate_bits(costs, sizes, avg_bits=avg)
    expected = _brute_force(costs, sizes, avg * total)
    assert alloc.total_cost == pytest.approx(expected, abs=1e-9)
    assert alloc.avg_bits <= avg + 1e-9
    assert set(alloc.bits) == set(costs)
    assert alloc.total_cost == pytest.approx(sum(costs[n][b] for n, b in alloc.bits.items()))
    assert alloc.total_bits == sum(sizes[n] * b for n, b in alloc.bits.items())


def test_max_bytes_budget_and_both():
    costs = {"a": {4: 5.0, 8: 0.0}, "b": {4: 1.0, 8: 0.0}}
    sizes = {"a": 8, "b": 8}
    # 12 bytes = 96 bits: one layer at 8 bits (64) + one at 4 (32)
    alloc = allocate_bits(costs, sizes, max_bytes=12)
    assert alloc.bits == {"a": 8, "b": 4}
    assert alloc.total_bytes == 12 and alloc.total_cost == 1.0
    both = allocate_bits(costs, sizes, avg_bits=8, max_bytes=8)
    assert both.bits == {"a": 4, "b": 4}
    assert allocate_bits(costs, sizes, avg_bits=8).bits == {"a": 8, "b": 8}


def test_infeasible_states_minimum():
    costs = {"a": {4: 1.0, 8: 0.0}, "b": {2: 3.0, 8: 0.0}}
    sizes = {"a": 1, "b": 3}
    with pytest.raises(ValueError, match=r"minimum achievable average is 2\.5"):
        allocate_bits(costs, sizes, avg_bits=2.4)
    with pytest.raises(ValueError, match=r"minimum achievable size is 1\.25 bytes"):
        allocate_bits(costs, sizes, max_bytes=1)


@pytest.mark.parametrize(
    "costs,sizes,match",
    [
        ({}, {}, "costs is empty"),
        ({"a": {4: -1.0}}, {"a": 1}, r"costs\['a'\]\[4\] must be >= 0"),
        ({"a": {4: float("nan")}}, {"a": 1}, "must be finite"),
        ({"a": {4: 1.0}}, {}, "sizes is missing"),
        ({"a": {4: 1.0}}, {"a": 0}, r"sizes\['a'\] must be a positive int"),
        ({"a": {}}, {"a": 1}, "non-empty mapping"),
        ({"a": {0: 1.0}}, {"a": 1}, "invalid bit width"),
    ],
)
def test_bad_inputs(costs, sizes, match):
    with pytest.raises(ValueError, match=match):
        allocate_bits(costs, sizes, avg_bits=8)


def test_budget_required():
    with pytest.raises(ValueError, match="avg_bits and/or max_bytes"):
        allocate_bits({"a": {4: 1.0}}, {"a": 1})


def test_normalize_costs_by_group():
    sens = {
        "a": {4: 2.0, 8: 1.0},
        "x": {2: 30.0, 4: 10.0},
        "b": {4: 6.0, 8: float("inf")},
        "y": {2: 10.0, 4: 0.0},
    }
    costs, norms = normalize_costs_by_group(sens, {"a": "g1", "b": "g1", "x": "g2", "y": "g2"})
    assert norms == {"g1": 4.0, "g2": 20.0}  # mean at each group's lowest shared bit width
    assert list(costs) == ["a", "b", "x", "y"]  # groups sorted, layers in input order
    assert costs["a"] == {4: 0.5, 8: 0.25} and costs["b"] == {4: 1.5, 8: 1e6}  # non-finite -> 1e6
    assert costs["x"] == {2: 1.5, 4: 0.5} and costs["y"] == {2: 0.5, 4: 0.0}
    with pytest.raises(ValueError, match="groups is missing layer"):
        normalize_costs_by_group(sens, {"a": "g1"})


def test_allocate_bits_by_group():
    costs = {"a": {2: 5.0, 4: 1.0, 8: 0.0}, "b": {2: 1.0, 4: 0.5, 8: 0.0}, "q": {4: 3.0, 8: 0.0}, "r": {4: 1.0, 8: 0.0}}
    sizes = {"a": 1, "b": 1, "q": 1, "r": 1}
    groups = {"a": "content", "b": "content", "q": "quality", "r": "quality"}
    alloc = allocate_bits_by_group(costs, sizes, groups, {"content": 3.0, "quality": 6.0})
    assert alloc.bits == {"a": 4, "b": 2, "q": 8, "r": 4}  # each group within its own budget
    assert alloc.total_cost == pytest.approx(3.0) and alloc.avg_bits == 4.5 and alloc.total_bits == 18
    assert alloc.extras["groups"]["content"].avg_bits == 3.0
    assert allocate_bits_by_group(costs, sizes, groups, 8).bits == {"a": 8, "b": 8, "q": 8, "r": 8}
    with pytest.raises(ValueError, match=r"avg_bits has no budget for group\(s\) \['quality'\]"):
        allocate_bits_by_group(costs, sizes, groups, {"content": 3.0})
    with pytest.raises(ValueError, match=r"group 'quality': allocate_bits: avg_bits=3.0 is infeasible"):
        allocate_bits_by_group(costs, sizes, groups, {"content": 3.0, "quality": 3.0})
