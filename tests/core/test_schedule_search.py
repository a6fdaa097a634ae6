"""effalg.core.schedule_search: the predictor-guided evolutionary search on a toy problem."""

import math

from effalg.core.schedule_search import Ridge, predictor_guided_search


def test_ridge_recovers_a_linear_function():
    x = [[1.0, float(i), float(i % 3)] for i in range(12)]
    y = [2.0 + 0.5 * a - 1.5 * b for _, a, b in x]
    pred = Ridge(alpha=1e-9).fit(x, y).predict([[1.0, 20.0, 1.0]])
    assert math.isclose(pred[0], 2.0 + 10.0 - 1.5, rel_tol=1e-6)


def test_search_improves_on_its_seeds_within_the_budget():
    target = (3, 1, 4, 1, 5)
    score = lambda c: float(sum((a - b) ** 2 for a, b in zip(c, target))) + 1.0  # noqa: E731

    def mutate(c, rng):
        c = list(c)
        c[rng.randrange(len(c))] = rng.randint(0, 6)
        return tuple(c)

    calls = []

    def score_batch(batch):
        calls.append(len(batch))
        return [score(c) if c != (6,) * 5 else math.nan for c in batch]  # a non-finite score counts as inf

    results = predictor_guided_search(
        [((0,) * 5, "zeros"), ((6,) * 5, "sixes")], score_batch, mutate,
        lambda c: [1.0, *map(float, c), *(float(v) ** 2 for v in c)], lambda c: c,
        max_evals=60, children=24, evaluate_top=4, progress=False,
    )  # fmt: skip
    assert len(results) == 60 == sum(calls) and len({c for _, c, _ in results}) == 60
    by_origin = {o: s for s, _, o in results if o != "search"}
    assert by_origin == {"zeros": score((0,) * 5), "sixes": math.inf}
    assert min(s for s, _, _ in results) < by_origin["zeros"] / 4
