"""The samplers against oracles: a perfect predictor, and a Gaussian problem with an analytic denoiser."""

import math

import pytest
import torch

from LTDiffPPLib.sampler import SCHEDULES, SOLVERS, add_noise, alpha_sigma, initial_noise, sample, time_grid


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_endpoints_and_monotone(schedule):
    assert alpha_sigma(0.0, schedule) == pytest.approx((1.0, 0.0), abs=1e-12)
    assert alpha_sigma(1.0, schedule) == (0.0, 1.0)  # zero terminal SNR
    alphas = [alpha_sigma(t, schedule)[0] for t in time_grid(50, schedule)]
    assert all(a0 <= a1 for a0, a1 in zip(alphas, alphas[1:]))  # grid runs t=1 -> 0, so alpha increases
    for t in (0.1, 0.5, 0.9):
        a, s = alpha_sigma(t, schedule)
        assert a * a + s * s == pytest.approx(1.0)


@pytest.mark.parametrize("spacing", ["logsnr", "uniform"])
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 50])
def test_time_grid_runs_from_1_to_0_strictly_decreasing(spacing, steps):
    ts = time_grid(steps, spacing=spacing)
    assert len(ts) == steps + 1 and ts[0] == 1.0 and ts[-1] == 0.0
    assert all(a > b for a, b in zip(ts, ts[1:]))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        alpha_sigma(1.5)
    with pytest.raises(ValueError):
        time_grid(0)
    with pytest.raises(ValueError):
        time_grid(5, spacing="karras")
    with pytest.raises(ValueError):
        sample(lambda x, t: x, torch.zeros(1), solver="euler")


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("prediction", ["v", "x0"])
@pytest.mark.parametrize("steps", [1, 3, 8, 20])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_perfect_predictor_returns_x0(solver, prediction, steps, schedule):
    """A predictor that knows x0 must make the sampler land exactly on x0, from any noise."""
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def oracle(x_t, t):
        a, s = alpha_sigma(t, schedule)
        return (a * x_t - x0) / s if prediction == "v" else x0

    out = sample(oracle, initial_noise((2, 4, 8, 8), seed=3), steps=steps, solver=solver, prediction=prediction, schedule=schedule)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)


def _gaussian_v(mu: float, sd: float):
    """Exact v-predictor for data x0 ~ N(mu, sd²): E[x0 | x_t] is analytic."""

    def v(x_t, t):
        a, s = alpha_sigma(t, "cosine")
        x0_hat = mu + a * sd**2 / (a * a * sd**2 + s * s) * (x_t - a * mu)
        return (a * x_t - x0_hat) / s

    return v


@pytest.mark.parametrize("sd", [1.0, 0.3, 0.05])
@pytest.mark.parametrize("solver,steps,tol", [("dpmpp2m", 10, 0.06), ("dpmpp2m", 20, 0.03), ("ddim", 100, 0.04)])
def test_gaussian_data_distribution_is_recovered(sd, solver, steps, tol):
    """The probability-flow ODE maps N(0, 1) onto N(mu, sd²); the sampled mean and SD must match.
    A wrong step formula or a bad time grid fails this (a perfect-x0 oracle cannot tell)."""
    mu = 1.5
    out = sample(_gaussian_v(mu, sd), initial_noise((200_000,), seed=0), steps=steps, solver=solver)
    assert out.mean().item() == pytest.approx(mu, abs=0.01)
    assert out.std().item() / sd == pytest.approx(1.0, abs=tol)


def test_logsnr_grid_keeps_fine_texture_variance():
    """Low-variance components (fine texture) lose most of their SD on a uniform-t grid at 10 steps."""
    sd = 0.05
    noise = initial_noise((100_000,), seed=2)
    ratio = {g: sample(_gaussian_v(0.0, sd), noise, steps=10, grid=g).std().item() / sd for g in ("logsnr", "uniform")}
    assert abs(ratio["logsnr"] - 1) < 0.06
    assert ratio["uniform"] < 0.5


def test_dpmpp_beats_ddim_at_equal_steps():
    """Second order pays: at 6 steps DPM-Solver++(2M) reproduces the target SD more closely than DDIM."""
    sd = 0.3
    noise = initial_noise((100_000,), seed=1)
    err = {solver: abs(sample(_gaussian_v(0.0, sd), noise, steps=6, solver=solver).std().item() - sd) for solver in SOLVERS}
    assert err["dpmpp2m"] < err["ddim"] / 2


def test_noise_is_seeded_and_device_independent():
    a = initial_noise((3, 5, 5), seed=7)
    assert torch.equal(a, initial_noise((3, 5, 5), seed=7))
    assert not torch.equal(a, initial_noise((3, 5, 5), seed=8))


def test_add_noise_matches_v_definition():
    x0 = torch.randn(4, 2, 3, 3)
    eps = torch.randn(4, 2, 3, 3)
    t = torch.tensor([0.0, 0.3, 0.7, 1.0])
    x_t, v = add_noise(x0, eps, t)
    for i, ti in enumerate(t.tolist()):
        a, s = alpha_sigma(ti)
        torch.testing.assert_close(x_t[i], a * x0[i] + s * eps[i])
        torch.testing.assert_close(v[i], a * eps[i] - s * x0[i])
        # v-prediction recovers x0 exactly
        torch.testing.assert_close(a * x_t[i] - s * v[i], x0[i], atol=1e-6, rtol=0)


def test_callback_sees_every_step_and_can_stop():
    seen = []
    sample(lambda x, t: torch.zeros_like(x), torch.zeros(3), steps=5, callback=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 5) for i in range(1, 6)]

    class Stop(Exception):
        pass

    def stop_at_2(i, n):
        if i == 2:
            raise Stop

    calls = []
    with pytest.raises(Stop):
        sample(lambda x, t: calls.append(t) or torch.zeros_like(x), torch.zeros(3), steps=5, callback=stop_at_2)
    assert len(calls) == 2
    assert math.isclose(calls[0], 1.0)
