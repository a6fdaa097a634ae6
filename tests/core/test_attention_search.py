"""MoA search math: influence vs. brute-force masking, rule costs/densities vs. explicit masks, MILP vs. brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from effalg.core.attention_search import (
    ElasticRule,
    attention_influence,
    candidate_rules,
    rule_cost,
    rule_costs,
    rule_density,
    rule_kept_blocks,
    rule_score_density,
    select_rules,
    window_length,
)


def _mask(n: int, window: int, sink: int) -> torch.Tensor:
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    return (j <= i) & ((i - j < window) | (j < sink))


def _brute_influence(scores: torch.Tensor, loss_fn) -> torch.Tensor:
    """Loss change of masking each causal entry (i, j) (score -> -inf, row renormalized), [H, N, N]."""
    h, n, _ = scores.shape
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    base = loss_fn(torch.softmax(scores.masked_fill(~causal, -math.inf), -1))
    out = torch.zeros(h, n, n, dtype=torch.float64)
    for hh in range(h):
        for i in range(1, n):  # row 0 has a single key: masking it is undefined
            for j in range(i + 1):
                s = scores.masked_fill(~causal, -math.inf).clone()
                s[hh, i, j] = -math.inf
                out[hh, i, j] = loss_fn(torch.softmax(s, -1)) - base
    return out


def test_influence_exact_for_linear_loss():
    torch.manual_seed(0)
    h, n = 2, 7
    scores = torch.randn(h, n, n, dtype=torch.float64)
    c = torch.randn(h, n, n, dtype=torch.float64)
    loss_fn = lambda a: float((a * c).sum())  # noqa: E731  (linear in A: first order is exact)
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    a = torch.softmax(scores.masked_fill(~causal, -math.inf), -1)
    ref = _brute_influence(scores, loss_fn).abs()
    got = attention_influence(a, c, block_size=1)
    assert got.shape == (h, n, n)
    # row 0 uses -G*A (masking its only key is undefined); compare the other rows exactly
    torch.testing.assert_close(got[:, 1:].double(), ref[:, 1:], rtol=1e-4, atol=1e-5)
    assert torch.all(torch.triu(got, 1) == 0)


def test_influence_first_order_nonlinear_loss_autograd():
    torch.manual_seed(1)
    h, n, d = 1, 24, 4
    scores = 0.3 * torch.randn(h, n, n, dtype=torch.float64)  # flat-ish rows: every A_ij is small
    v = torch.randn(h, n, d, dtype=torch.float64)

    def loss_t(a):  # cross-entropy-like (log-sum-exp of a readout of the attention output)
        return torch.logsumexp(a @ v, -1).sum()

    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    a = torch.softmax(scores.masked_fill(~causal, -math.inf), -1).requires_grad_(True)
    loss_t(a).backward()
    got = attention_influence(a.detach(), a.grad, block_size=1)
    ref = _brute_influence(scores, lambda p: float(loss_t(p))).abs()
    # first order: good where rows hold many keys (masking a small probability)
    rows = slice(12, n)
    rel = (got[:, rows].double() - ref[:, rows]).norm() / ref[:, rows].norm()
    assert rel < 0.1, rel
    # and block sums are sums of the token-level values
    blk = attention_influence(a.detach(), a.grad, block_size=4)
    torch.testing.assert_close(blk, got.reshape(h, 6, 4, 6, 4).sum((2, 4)))


def test_influence_batched_and_padded_blocks():
    torch.manual_seed(2)
    a = torch.softmax(torch.randn(3, 2, 10, 10), -1).tril()
    g = torch.randn(3, 2, 10, 10)
    out = attention_influence(a, g, block_size=4)
    assert out.shape == (2, 3, 3)
    ref = sum(attention_influence(a[b], g[b], 4) for b in range(3))
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="grad_probs shape"):
        attention_influence(a, g[:, :1], 4)


@pytest.mark.parametrize("n,bs", [(37, 8), (64, 16), (20, 1)])
def test_kept_blocks_and_density_match_explicit_mask(n, bs):
    for window, sink in [(1, 0), (5, 3), (n, 0), (9, 12), (13, 1)]:
        m = _mask(n, window, sink).double()
        nb = -(-n // bs)
        mp = torch.nn.functional.pad(m, (0, nb * bs - n, 0, nb * bs - n))
        kept, causal = rule_kept_blocks(n, bs, window, sink)
        torch.testing.assert_close(kept, mp.reshape(nb, bs, nb, bs).sum((1, 3)))
        tri = torch.nn.functional.pad(torch.tril(torch.ones(n, n)).double(), (0, nb * bs - n, 0, nb * bs - n))
        torch.testing.assert_close(causal, tri.reshape(nb, bs, nb, bs).sum((1, 3)))
        assert rule_score_density(window, 0.0, sink, n) == pytest.approx(float(m.sum()) / (n * (n + 1) / 2))
        assert ElasticRule(window, 0.0, sink).score_density(n) == rule_score_density(window, 0.0, sink, n)
        # density = kept KV-cache fraction: the keys the last query row can ever need, min(N, sink + window)
        assert rule_density(window, 0.0, sink, n) == min(n, sink + window) / n


def test_rule_cost_token_granularity():
    torch.manual_seed(3)
    n = 24
    e = torch.rand(3, n, n).tril()  # token-level influence of 3 heads
    rule = ElasticRule(alpha=2.0, beta=0.25, sink=2)
    w = rule.window(n)
    assert w == window_length(2.0, 0.25, n) == 8
    dropped = (~_mask(n, w, 2) & torch.tril(torch.ones(n, n, dtype=torch.bool))).double()
    exact = (e.double() * dropped).sum((1, 2))
    torch.testing.assert_close(rule_cost(e, 2.0, 0.25, 2, n, 1), exact)
    # with blocks: equal to the exact cost when influence is uniform within each block's causal entries
    bs = 4
    blocks = torch.rand(3, n // bs, n // bs).tril()
    _, causal = rule_kept_blocks(n, bs, n, 0)
    tok = (blocks / causal.float().clamp_min(1)).repeat_interleave(bs, 1).repeat_interleave(bs, 2).tril()
    exact_b = (tok.double() * dropped).sum((1, 2))
    torch.testing.assert_close(rule_cost(blocks, 2.0, 0.25, 2, n, bs), exact_b)
    many = rule_costs(blocks, [rule, ElasticRule(0.0, 1.0, 0)], n, bs)
    assert many.shape == (3, 2)
    torch.testing.assert_close(many[:, 1], torch.zeros(3, dtype=torch.float64))  # full window drops nothing
    with pytest.raises(ValueError, match="blocks"):
        rule_cost(blocks, 0, 0.5, 0, 2 * n, bs)


def test_candidate_rules_filter():
    rules = candidate_rules([0, 256, 1024], [0.0, 0.5, 1.0], [4], [256, 512, 1024])
    for r in rules:
        assert r.alpha + r.beta * 256 > 0
        assert r.alpha + r.beta * 1024 <= 1024
    assert ElasticRule(0.0, 1.0, 4) in rules
    assert ElasticRule(0.0, 0.0, 4) not in rules  # window 0
    assert ElasticRule(256.0, 1.0, 4) not in rules  # window > N
    assert ElasticRule(1024.0, 0.0, 4) in rules
    with pytest.raises(ValueError, match="no valid rule"):
        candidate_rules([1000], [0.0], [0], [256])
    with pytest.raises(ValueError, match="alphas"):
        candidate_rules([-256], [0.5], [0], [256])
    with pytest.raises(ValueError, match="betas"):
        candidate_rules([0], [-0.5], [0], [256])


def _brute_select(costs, densities, budgets, min_fraction, weights):
    nl, nh, nc = costs[0].shape
    norms = [c.max(-1).sum() for c in costs]
    best = (math.inf, None)
    for combo in itertools.product(range(nc), repeat=nl * nh):
        idx = np.array(combo).reshape(nl, nh)
        ok = True
        for d, b in zip(densities, budgets):
            avg = d[idx].mean()
            if avg > b + 1e-9 or (min_fraction is not None and avg < min_fraction * b - 1e-9):
                ok = False
        if not ok:
            continue
        val = sum(w * np.take_along_axis(c, idx[..., None], -1).sum() / z for w, c, z in zip(weights, costs, norms))
        if val < best[0] - 1e-12:
            best = (val, idx)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_select_rules_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    nl, nh, nc = 2, 2, 4
    dens = [np.array([0.2, 0.4, 0.7, 1.0]), np.array([0.15, 0.35, 0.7, 1.0]), np.array([0.1, 0.3, 0.7, 1.0])]
    costs = [rng.random((nl, nh, nc)) * (1 - d)[None, None] for d in dens[:2]]  # longer windows drop less
    weights = [1.0, 0.5]
    sel = select_rules(costs, dens, 0.5, min_fraction=0.9, weights=weights)
    val, idx = _brute_select(costs, dens, [0.5] * 3, 0.9, weights)
    assert sel.objective == pytest.approx(val, abs=1e-7)
    assert np.array_equal(np.array(sel.choice), idx) or sel.objective == pytest.approx(val, abs=1e-9)
    for d, avg in zip(dens, sel.densities):
        assert 0.45 - 1e-9 <= avg <= 0.5 + 1e-9
        assert avg == pytest.approx(d[np.array(sel.choice)].mean())


def test_select_rules_errors():
    costs = [np.ones((1, 2, 2))]
    dens = [np.array([0.3, 0.6])]
    with pytest.raises(ValueError, match=r"minimum achievable density is 0\.3"):
        select_rules(costs, dens, 0.2)
    with pytest.raises(ValueError, match="maximum achievable density"):
        select_rules(costs, [np.array([0.01, 0.02])], 0.5)
    with pytest.raises(ValueError, match="candidates"):
        select_rules(costs, [np.array([0.3, 0.6, 0.9])], 0.5)
    with pytest.raises(ValueError, match="negative"):
        select_rules([-np.ones((1, 2, 2))], dens, 0.5)
    with pytest.raises(ValueError, match="budget"):
        select_rules(costs, dens, float("nan"))
    sel = select_rules(costs, dens, 0.45, min_fraction=None)
    assert sel.choice == [[0, 0]] or sorted(sel.choice[0]) == [0, 0]


def test_density_matches_plan():
    from effalg.core.attention_plan import ElasticWindowPlan

    rules = [[ElasticRule(0.0, 0.3, 4), ElasticRule(16.0, 0.0, 0)], [ElasticRule(3.5, 0.61, 7), ElasticRule(0, 1.0, 2)]]
    plan = ElasticWindowPlan.from_rules([[r.as_dict() for r in layer] for layer in rules])
    for n in (1, 5, 100, 257):
        ref = np.mean([r.density(n) for layer in rules for r in layer])
        assert plan.density(n) == pytest.approx(ref, rel=1e-12)
        assert plan.head_density(n).tolist() == [[r.density(n) for r in layer] for layer in rules]
        ref_s = np.mean([r.score_density(n) for layer in rules for r in layer])
        assert plan.score_density(n) == pytest.approx(ref_s, rel=1e-12)
        assert plan.windows(n).tolist() == [[r.window(n) for r in layer] for layer in rules]
