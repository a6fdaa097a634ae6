"""effalg.core.ditfastattn_plan: validation, JSON round trip, cache rules and FLOP counts."""

import json

import pytest
import torch

from effalg.core.ditfastattn_plan import DiTFastAttnPlan, band_pairs
from effalg.core.plans import Plan, PlanError, load_plan

MD = dict(window=2, num_steps=4, num_tokens=16, text_tokens=0, cfg=True, hidden_size=32)


def _plan(entries, **md):
    return DiTFastAttnPlan(entries=entries, metadata={**MD, **md})


def test_round_trip_and_alias(tmp_path):
    plan = _plan({"a": ["full", "wars", "ast", "asc"], "b": ["full+asc", "wars+asc", "ast", "full"]})
    assert plan.entries["a"][3] == "full+asc"  # "asc" is full attention on the conditional half
    plan.save(tmp_path / "p.json")
    again = load_plan(tmp_path / "p.json")
    assert isinstance(again, DiTFastAttnPlan) and again == plan
    assert json.load(open(tmp_path / "p.json"))["kind"] == "ditfastattn"


@pytest.mark.parametrize(
    "entries, md, match",
    [
        ({"a": ["full", "window", "ast", "ast"]}, {}, r"layer 'a', step 1: unknown method 'window'"),
        ({"a": ["ast", "ast", "ast", "ast"]}, {}, r"layer 'a': step 0 must be 'full' or 'full\+asc'"),
        ({"a": ["full", "ast"]}, {}, r"layer 'a' has 2 steps but num_steps is 4"),
        ({"a": ["full"] * 4}, {"window": 16}, r"window ±16 is not smaller than the sequence of 16"),
        ({"a": ["full", "full+asc", "ast", "ast"]}, {"cfg": False}, r"layer 'a' shares across CFG branches"),
        ({"a": ["full"] * 4}, {"timesteps": [1, 2]}, r"'timesteps' must be 4 numbers"),
        ({}, {}, r"the plan has no layers"),
    ],
)
def test_invalid_plans(entries, md, match):
    with pytest.raises(PlanError, match=match):
        _plan(entries, **md)


def test_missing_metadata_and_unknown_method_in_file(tmp_path):
    with pytest.raises(PlanError, match=r"metadata is missing \['num_tokens'"):
        DiTFastAttnPlan(entries={"a": ["full"]}, metadata={"window": 1, "num_steps": 1})
    d = _plan({"a": ["full"] * 4}).to_dict()
    d["entries"]["a"][2] = "skip"
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(PlanError, match=r"step 2: unknown method 'skip'.*bad\.json"):
        Plan.load(tmp_path / "bad.json")


def test_cache_rules():
    plan = _plan({"a": ["full", "wars", "full+asc", "ast"], "b": ["full", "ast", "wars+asc", "full"]})
    assert plan.residual_steps("a") == [True, False, False, False]  # step 2's residual: no later WA-RS
    assert plan.output_steps("a") == [False, False, True, False]
    assert plan.residual_steps("b") == [True, False, False, False]  # the AST at step 1 does not end the span
    assert plan.output_steps("b") == [True, False, False, False]


def _mask_pairs(n, w, t):
    i = torch.arange(n + t)
    near = ((i[:, None] - i[None, :]).abs() <= w) | (i[:, None] < t) | (i[None, :] < t)
    return int(near.sum())


@pytest.mark.parametrize("n, w, t", [(16, 2, 0), (16, 15, 0), (10, 3, 4), (7, 1, 1)])
def test_band_pairs_counts_the_mask(n, w, t):
    assert band_pairs(n, w, t) == _mask_pairs(n, w, t)


def test_attention_flops_fraction():
    layers = ["a", "b"]
    assert DiTFastAttnPlan.uniform(layers, ["full"] * 4, **MD).attention_flops_fraction() == 1.0
    assert DiTFastAttnPlan.uniform(layers, "ast", **MD).attention_flops_fraction() == pytest.approx(0.25)
    assert DiTFastAttnPlan.uniform(layers, "full+asc", **MD).attention_flops_fraction() == pytest.approx(
        (1 + 3 * 0.5) / 4
    )
    n, d, w = MD["num_tokens"], MD["hidden_size"], MD["window"]
    proj, core, win = 8 * n * d * d, 4 * n * n * d, 4 * band_pairs(n, w) * d
    # step 0 full (+ the window attention for the residual), then three WA-RS steps
    expected = (proj + core + win + 3 * (proj + win)) / (4 * (proj + core))
    plan = DiTFastAttnPlan.uniform(layers, "wars", **MD)
    assert plan.attention_flops_fraction() == pytest.approx(expected)
    assert plan.attention_flops_fraction(projections=False) == pytest.approx((core + 4 * win) / (4 * core))
    assert plan.method_counts() == {"ast": 0, "wars+asc": 0, "wars": 6, "full+asc": 0, "full": 2}
