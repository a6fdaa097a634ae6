"""effalg.core.solver_schedule: the schedule format, its checks, and the exponential-integrator math."""

import json
import math

import pytest
import torch

from effalg.core.solver_schedule import SolverSchedule, SolverStep, _phi, solver_update, taylor_weights


def test_taylor_weights_exact_on_polynomials():
    dl = [-0.7, -1.5, -2.2]
    f = lambda x: 1.0 + 2.0 * x - 0.5 * x**2 + 0.25 * x**3  # noqa: E731
    for n, want in ((1, 2.0), (2, -1.0), (3, 1.5)):
        w = taylor_weights(dl, n)
        assert sum(wj * (f(d) - f(0.0)) for wj, d in zip(w, dl)) == pytest.approx(want, abs=1e-9)


def test_phi_series_matches_closed_form():
    for k in (1, 2, 3):
        for z in (-3e-4, 3e-4, 0.5, -2.0):
            closed = math.expm1(z) / z
            for j in range(1, k):
                closed = (closed - 1 / math.factorial(j)) / z
            assert _phi(k, z) == pytest.approx(closed, rel=1e-6)
        assert _phi(k, 1e-5) == pytest.approx(1 / math.factorial(k), rel=1e-4)


def test_first_order_data_step_is_exact_for_a_constant_prediction():
    x0 = torch.randn(5, dtype=torch.float64)
    a_s, s_s, a_t, s_t = 0.3, math.sqrt(1 - 0.09), 0.8, 0.6
    eps = torch.randn(5, dtype=torch.float64)
    x_s = a_s * x0 + s_s * eps
    lam_s = math.log(a_s / s_s)
    out = solver_update(x_s, lam_s, x0, [], a_s, s_s, a_t, s_t, 1, "data")
    torch.testing.assert_close(out, a_t * x0 + s_t * eps)  # the exact ODE solution for a constant x0
    out = solver_update(x_s, lam_s, eps, [], a_s, s_s, a_t, s_t, 1, "noise")
    torch.testing.assert_close(out, a_t * x0 + s_t * eps)
    assert torch.equal(solver_update(x_s, lam_s, x0, [], a_s, s_s, 1.0, 0.0, 1, "data"), x0)


def test_round_trip_and_nfe():
    s = SolverSchedule.predictor_corrector([999.0, 600.0, 300.0, 100.0, -1.0], order=3, prediction="noise", nfe=4)
    assert s.nfe == 4 and s.model_timesteps == [999.0, 600.0, 300.0, 100.0]
    assert [st.order for st in s.steps] == [1, 2, 3, 1] and [st.corrector for st in s.steps] == [1, 1, 1, 0]
    again = SolverSchedule.from_dict(json.loads(json.dumps(s.to_dict())))
    assert again == s and again.metadata == {"nfe": 4}


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(timesteps=[999, 500, -1], steps=[SolverStep(1), SolverStep(2, points=1)]), "must be first order"),
        (dict(timesteps=[999, 500, 0], steps=[SolverStep(2), SolverStep(1)]),
         "order is above what the step history allows"),
        (dict(timesteps=[999, 500, 0], steps=[SolverStep(1), SolverStep(1, corrector=True)]), "last step cannot"),
        (dict(timesteps=[999, 999, 0], steps=[SolverStep(1), SolverStep(1)]), "strictly descending"),
        (dict(timesteps=[999, 0], steps=[SolverStep(1), SolverStep(1)]), "2 steps need 3 timesteps"),
        (dict(timesteps=[999, -1, -1], steps=[SolverStep(1), SolverStep(1)]), "strictly descending"),
    ],
)
def test_bad_schedules(kw, match):
    with pytest.raises(ValueError, match=match):
        SolverSchedule(**kw)


def test_bad_steps_and_dicts():
    with pytest.raises(ValueError, match="order must be 1..3"):
        SolverStep(4)
    with pytest.raises(ValueError, match="prediction must be one of"):
        SolverStep(1, "velocity")
    with pytest.raises(ValueError, match="relaxation must be a float or 'dpmsolver-2'"):
        SolverStep(2, relaxation="unipc")
    good = SolverSchedule.ddim([999.0, 0.0]).to_dict()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['skip_coefficients'\]"):
        SolverSchedule.from_dict({**good, "skip_coefficients": [1.0]})
    with pytest.raises(ValueError, match=r"step 0 has unknown key\(s\) \['afs'\]"):
        SolverSchedule.from_dict({**good, "steps": [{"order": 1, "afs": "zero_x0"}]})
    with pytest.raises(ValueError, match="kind must be"):
        SolverSchedule.from_dict({**good, "kind": "model_schedule"})
    with pytest.raises(ValueError, match="version 2 is not supported"):
        SolverSchedule.from_dict({**good, "version": 2})
