"""Persistent ES against closed forms: the antithetic estimator on a quadratic (closed-form mean and
variance), PES unbiased vs truncated ES biased on s_{t+1} = s_t + θ, and a learned step size
recovering the known best constant step on random separable quadratics."""

from __future__ import annotations

import math

import pytest
import torch

from l2o.outer.pes import PESConfig, PESTrainer, antithetic_es_gradient, centred_ranks
from l2o.outer.problems import (
    AccumulatorProblem,
    QuadraticProblem,
    SeparableQuadraticStepSize,
    best_constant_step_size,
    expected_step_size_objective,
)


def _quadratic(D: int = 6, seed: int = 0) -> tuple[QuadraticProblem, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(D, D, generator=g, dtype=torch.float64)
    A = Q @ Q.T / D + torch.eye(D, dtype=torch.float64)
    b = torch.randn(D, generator=g, dtype=torch.float64)
    theta = torch.randn(D, generator=g, dtype=torch.float64)
    return QuadraticProblem(A, b), theta


def _check_against_closed_form(ghat: torch.Tensor, g: torch.Tensor, N: int) -> None:
    # For L quadratic, L(θ+ε) − L(θ−ε) = 2gᵀε exactly (g = Aθ + b), so one pair contributes (gᵀz)z,
    # z ~ N(0, I): mean g, covariance |g|²I + ggᵀ. The mean of N pairs has per-coordinate standard
    # error sqrt((|g|² + g_j²)/N), whatever σ. Bound: 4.5 standard errors per coordinate, and the
    # sum of squared z-scores (≈ χ²_D, mean D) below 4D.
    se = torch.sqrt((g.square().sum() + g.square()) / N)
    z = (ghat - g) / se
    assert z.abs().max() < 4.5, (ghat, g, se)
    assert float(z.square().sum()) < 4 * g.numel()


@pytest.mark.parametrize("sigma", [1e-3, 0.1, 1.0])
def test_antithetic_es_matches_the_gradient_of_a_quadratic(sigma: float) -> None:
    problem, theta = _quadratic()
    N = 20_000
    ghat = antithetic_es_gradient(problem.loss, theta, sigma, N, torch.Generator().manual_seed(1))
    _check_against_closed_form(ghat, problem.grad(theta), N)


def test_pes_trainer_estimate_on_a_one_step_quadratic() -> None:
    problem, theta = _quadratic(seed=3)
    N = 20_000
    cfg = PESConfig(n_pairs=N, sigma=0.05, truncation=1, horizon=1, stagger=False)
    tr = PESTrainer(problem, cfg, theta, seed=2)
    ghat, _ = tr.estimate()
    _check_against_closed_form(ghat, problem.grad(theta), N)
    # the estimate must also be wrong when it should be: at another θ the gradient differs
    other = problem.grad(theta + 1.0)
    assert ((ghat - other).abs() / torch.sqrt((other.square().sum() + other.square()) / N)).max() > 10


def _episode_gradient(persistent: bool, seed: int, N: int, T: int, W: int, theta: float) -> float:
    """Σ_k ĝ_k over the T/W truncations of one inner run, × W: an estimate of d/dθ Σ_t loss_t."""
    problem = AccumulatorProblem(c=10.0)
    cfg = PESConfig(n_pairs=N, sigma=0.01, truncation=W, horizon=T, persistent=persistent, stagger=False)
    tr = PESTrainer(problem, cfg, torch.tensor([theta], dtype=torch.float64), seed=seed)
    return W * sum(float(tr.estimate()[0]) for _ in range(T // W))


def test_pes_is_unbiased_and_truncated_es_is_biased_on_the_accumulator() -> None:
    T, W, theta, N, R = 40, 10, 0.5, 4000, 8
    problem = AccumulatorProblem(c=10.0)
    true = problem.total_loss_grad(theta, T)            # 2870
    truncated = problem.truncated_grad(theta, T, W)     # 220: what truncated ES estimates
    for persistent, target, other in ((True, true, truncated), (False, truncated, true)):
        est = torch.tensor([_episode_gradient(persistent, s, N, T, W, theta) for s in range(R)], dtype=torch.float64)
        mean, se = float(est.mean()), float(est.std() / math.sqrt(R))
        assert abs(mean - target) < 4.5 * se + 1e-9 * abs(target), (persistent, mean, target, se)
        assert abs(mean - other) > 20 * se, (persistent, mean, other, se)
    assert abs(true - truncated) > 0.5 * abs(true)  # the bias is large, not a rounding effect


def test_meta_training_a_step_size_recovers_the_best_constant_step() -> None:
    T, h_lo, h_hi = 20, 0.1, 1.0
    k_star = best_constant_step_size(T, h_lo, h_hi)
    # the brute-force optimum: the expected objective on a fine grid is minimal next to k*
    grid = torch.linspace(0.5, 2.0, 301).tolist()
    k_grid = min(grid, key=lambda k: expected_step_size_objective(k, T, h_lo, h_hi))
    assert abs(k_grid - k_star) <= 0.005
    # the quadrature agrees with a Monte Carlo estimate of the same expectation
    hs = h_lo + (h_hi - h_lo) * torch.rand(400_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mc = float(sum(0.5 * (hs * (1 - k_star * hs) ** (2 * t)).mean() for t in range(T)) / T)
    assert math.isclose(mc, expected_step_size_objective(k_star, T, h_lo, h_hi), rel_tol=5e-3)
    cfg = PESConfig(n_pairs=64, sigma=0.01, truncation=5, horizon=T, meta_lr=0.03)
    tr = PESTrainer(SeparableQuadraticStepSize(d=20, h_lo=h_lo, h_hi=h_hi), cfg,
                    torch.tensor([0.1 * k_star], dtype=torch.float64), seed=0)
    history = []
    for _ in range(600):
        tr.step()
        history.append(float(tr.theta))
    k_learned = sum(history[-100:]) / 100
    # tolerance 2% of k* (σ-smoothing shifts the optimum by O(σ²), far below this)
    assert abs(k_learned - k_star) < 0.02 * k_star, (k_learned, k_star)
    assert expected_step_size_objective(k_learned, T, h_lo, h_hi) < 1.001 * expected_step_size_objective(k_star, T, h_lo, h_hi)


def test_centred_ranks() -> None:
    r = centred_ranks(torch.tensor([[3.0, -1.0], [10.0, 0.0]]))
    torch.testing.assert_close(r, torch.tensor([[1 / 6, -0.5], [0.5, -1 / 6]]))


def test_staggered_starts_spread_particle_ages() -> None:
    cfg = PESConfig(n_pairs=4, sigma=0.01, truncation=5, horizon=20)
    tr = PESTrainer(SeparableQuadraticStepSize(d=3), cfg, torch.tensor([1.0], dtype=torch.float64), seed=0)
    tr.estimate()
    assert tr.t.tolist() == [5, 10, 15, 0]  # offsets 0, 5, 10, 15 then one truncation; the last restarted
    assert tr.runs.tolist() == [0, 0, 0, 1] and float(tr.xi[3].abs().sum()) == 0.0


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="multiple"):
        PESConfig(truncation=7, horizon=20)
    with pytest.raises(ValueError):
        PESConfig(sigma=0.0)
    with pytest.raises(ValueError):
        PESConfig(n_pairs=0)


class _LossIsTheStep:
    """An inner problem whose loss at 0-based step t is t + 1 + θ₀ (both branches): the meta-objective's
    weighting is then visible in closed form."""

    dim = 1

    def init_runs(self, n, gen):
        return {"x": torch.zeros(n, 1, dtype=torch.float64)}

    def step(self, theta, state, t, gen):
        return (t + 1).to(torch.float64).expand(2, -1) + theta[..., 0], state


@pytest.mark.parametrize("p", [0.0, 1.0, 2.5])
def test_late_weight_weighs_step_t_by_the_stated_power(p: float) -> None:
    """L of one truncation = mean over its steps s of (p+1)(s/T)^p · loss_s; p = 0 is the plain mean;
    over a whole run the weights average ≈ 1. A weight applied to the wrong step index fails."""
    T, W = 12, 4
    cfg = PESConfig(n_pairs=2, sigma=1e-9, truncation=W, horizon=T, stagger=False, late_weight=p)
    tr = PESTrainer(_LossIsTheStep(), cfg, torch.zeros(1, dtype=torch.float64), seed=0)
    tr._start()
    theta_pm = torch.zeros(2, 2, 1, dtype=torch.float64)
    for k in range(T // W):
        steps = torch.arange(k * W + 1, (k + 1) * W + 1, dtype=torch.float64)
        want = ((p + 1) * (steps / T) ** p * steps).mean()
        torch.testing.assert_close(tr._unroll(theta_pm), torch.full((2, 2), float(want), dtype=torch.float64))
        tr.t = tr.t + W
    w = tr.weight(torch.arange(T))
    assert float(w.mean()) == pytest.approx(1.0, abs=0.6 / T * (p + 1)) and (p > 0 or bool((w == 1).all()))
    with pytest.raises(ValueError, match="late_weight"):
        PESConfig(late_weight=-1.0)
