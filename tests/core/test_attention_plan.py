import json
import math

import pytest
import torch

from effalg.core import ElasticWindowPlan, PlanError, load_plan


def _mask(n, window, sink, pad=0):
    """Explicit band+sink mask from the design's semantics: bool[n, n] (query, key)."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    return (j >= pad) & (j <= i) & (i >= pad) & ((i - j < window) | (j - pad < sink))


def _plan():
    return ElasticWindowPlan.from_rules(
        [
            [{"alpha": 4, "beta": 0.25, "sink": 2}, {"alpha": 1.5, "beta": 0.0, "sink": 0}],
            [{"alpha": 0, "beta": 1.0, "sink": 1}, {"alpha": 100.0, "beta": 0.5, "sink": 3}],
            [{"alpha": 3, "beta": 0.1, "sink": 40}, {"alpha": 0.0, "beta": 0.0}],
        ],
        model={"class": "Tiny"},
    )


def test_shape_windows_sinks():
    plan = _plan()
    assert plan.num_layers == 3 and plan.num_kv_heads == 2
    n = 20
    w = plan.windows(n)
    assert w.dtype == torch.int64 and w.shape == (3, 2)
    expected = [
        [min(max(math.ceil(r["alpha"] + r["beta"] * n), 1), n) for r in layer]
        for layer in [[plan.rule(i, h) for h in range(2)] for i in range(3)]
    ]
    assert w.tolist() == expected == [[9, 2], [20, 20], [5, 1]]
    assert plan.sinks().tolist() == [[2, 0], [1, 3], [40, 0]]
    assert plan.rule(2, 1) == {"alpha": 0.0, "beta": 0.0, "sink": 0}


@pytest.mark.parametrize("n", [1, 2, 7, 20, 33])
def test_score_density_matches_explicit_mask(n):
    plan = _plan()
    w, s = plan.windows(n), plan.sinks()
    counts = torch.tensor([[int(_mask(n, int(w[i, h]), int(s[i, h])).sum()) for h in range(2)] for i in range(3)])
    assert torch.equal(plan.kept_scores(n), counts)
    assert plan.score_density(n) == pytest.approx(float(counts.double().mean()) / (n * (n + 1) / 2))
    full = ElasticWindowPlan.uniform(3, 2, alpha=0, beta=1.0, sink=0)
    assert full.score_density(n) == pytest.approx(1.0)


@pytest.mark.parametrize("n", [1, 2, 7, 20, 33])
def test_density_is_kv_fraction(n):
    """density(N) = mean over heads of min(N, sink + window) / N (the kept KV-cache fraction)."""
    plan = _plan()
    w, s = plan.windows(n), plan.sinks()
    ref = sum(min(n, int(w[i, h]) + int(s[i, h])) for i in range(3) for h in range(2)) / (6 * n)
    assert plan.density(n) == pytest.approx(ref, rel=1e-12)
    assert plan.cache_fraction(n) == plan.density(n)
    assert plan.head_density(n).mean().item() == pytest.approx(ref, rel=1e-12)
    assert 0 < plan.density(n) <= 1
    # a full head with sinks keeps N slots, not N + sink
    full = ElasticWindowPlan.uniform(3, 2, alpha=0, beta=1.0, sink=4)
    assert full.density(n) == 1.0 and full.cache_slots(n).eq(n).all()
    # (window', sink') of the cache: sink' + window' = cache slots, and the same mask for every query < N
    cw, cs = plan.cache_rules(n)
    assert torch.equal(cw + cs, plan.cache_slots(n)) and (cw >= 1).all() and (cs <= n - 1).all()
    for i in range(3):
        for h in range(2):
            assert torch.equal(_mask(n, int(cw[i, h]), int(cs[i, h])), _mask(n, int(w[i, h]), int(s[i, h])))


def test_uniform_and_cache_bytes():
    plan = ElasticWindowPlan.uniform(4, 2, alpha=2, beta=0.5, sink=4)
    assert plan.windows(64).unique().tolist() == [34]
    assert plan.cache_slots(64).sum().item() == 4 * 2 * 38
    assert plan.kv_cache_bytes(64, batch_size=3, head_dim=8, dtype=torch.bfloat16) == 4 * 2 * 38 * 2 * 3 * 8 * 2
    assert plan.density(64) == pytest.approx(38 / 64)
    assert plan.kv_cache_bytes(64, head_dim=8) == pytest.approx(plan.density(64) * 4 * 2 * 64 * 2 * 8 * 4)
    assert "4 layers x 2 KV heads" in plan.summary((64,)) and "score density" in plan.summary((64,))


def test_json_roundtrip(tmp_path):
    plan = _plan()
    path = tmp_path / "moa.json"
    plan.save(path)
    raw = json.loads(path.read_text())
    assert raw["kind"] == "moa" and raw["version"] == 1 and raw["entries"]["2"][1]["sink"] == 0
    loaded = load_plan(path)
    assert isinstance(loaded, ElasticWindowPlan)
    assert loaded.to_dict() == plan.to_dict()
    assert torch.equal(ElasticWindowPlan.load(path).windows(50), plan.windows(50))
    assert ElasticWindowPlan.from_dict(json.loads(json.dumps(plan.to_dict()))).entries == plan.entries


def test_validate_against_names_mismatch():
    plan = _plan()
    plan.validate_against(3, 2)
    with pytest.raises(PlanError, match="plan has 3 layers, model has 4"):
        plan.validate_against(4, 2)
    with pytest.raises(PlanError, match="layer 0: plan has 2 KV heads, model has 4"):
        plan.validate_against(3, 4)

    class Cfg:
        num_hidden_layers = 3
        num_key_value_heads = 1

    with pytest.raises(PlanError, match="plan has 2 KV heads, model has 1"):
        plan.validate_against_config(Cfg())
    with pytest.raises(PlanError, match="plan has 2 KV heads, model has 1"):
        plan.validate_against(Cfg())


@pytest.mark.parametrize(
    "rule,match",
    [
        ({"alpha": float("nan"), "beta": 0.1}, r"layer 1, KV head 1: alpha must be finite and >= 0, got nan"),
        ({"alpha": 1.0, "beta": -0.5}, r"layer 1, KV head 1: beta must be finite and >= 0, got -0.5"),
        ({"alpha": 1.0, "beta": float("inf")}, r"layer 1, KV head 1: beta must be finite"),
        ({"alpha": 1.0, "beta": 0.1, "sink": -1}, r"layer 1, KV head 1: sink must be an int >= 0, got -1"),
        ({"alpha": 1.0, "beta": 0.1, "sink": 1.5}, r"sink must be an int"),
        ({"alpha": "1", "beta": 0.1}, r"alpha must be a number"),
        ({"alpha": 1.0}, r"missing key\(s\) \['beta'\]"),
        ({"alpha": 1.0, "beta": 0.0, "gamma": 1}, r"unknown key\(s\) \['gamma'\]"),
    ],
)
def test_bad_rules_name_layer_and_head(rule, match):
    good = {"alpha": 1.0, "beta": 0.1, "sink": 1}
    with pytest.raises(PlanError, match=match):
        ElasticWindowPlan.from_rules([[good, good], [good, rule]])


def test_bad_structure():
    good = {"alpha": 1.0, "beta": 0.1}
    with pytest.raises(PlanError, match="layer 1 has 1 KV heads, layer 0 has 2"):
        ElasticWindowPlan.from_rules([[good, good], [good]])
    with pytest.raises(PlanError, match="layer keys must be"):
        ElasticWindowPlan(entries={"0": [good], "2": [good]})
    with pytest.raises(PlanError, match="no layers"):
        ElasticWindowPlan(entries={})
    with pytest.raises(PlanError, match="layer 0: expected a non-empty list"):
        ElasticWindowPlan(entries={"0": []})
    with pytest.raises(ValueError, match="N must be a positive int"):
        ElasticWindowPlan.uniform(1, 1, 1, 0).windows(0)
