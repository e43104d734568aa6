"""Fitting p̃ with a NIW prior: recovery of a known time-varying linear-Gaussian system."""

from __future__ import annotations

import math

import pytest
import torch

from l2o.outer.gps import GaussianPrior, GMMPrior, LinearGaussianDynamics, fit_dynamics, pooled_transitions

DT = torch.float64


def simulate(dyn: LinearGaussianDynamics, N: int, g: torch.Generator, action_std: float = 1.0):
    """Trajectories with exploratory actions a_t = K_t s_t + k_t + noise (random K_t, k_t)."""
    T, D, d = dyn.horizon, dyn.dim_s, dyn.dim_a
    K = 0.3 * torch.randn(T, d, D, dtype=DT, generator=g)
    k = 0.5 * torch.randn(T, d, dtype=DT, generator=g)
    X = torch.empty(N, T, D, dtype=DT)
    U = torch.empty(N, T, d, dtype=DT)
    X[:, 0] = 1.0 + torch.randn(N, D, dtype=DT, generator=g)
    for t in range(T):
        U[:, t] = X[:, t] @ K[t].T + k[t] + action_std * torch.randn(N, d, dtype=DT, generator=g)
        if t < T - 1:
            L = torch.linalg.cholesky(dyn.F[t])
            X[:, t + 1] = dyn.predict(X[:, t], U[:, t], t) + torch.randn(N, D, dtype=DT, generator=g) @ L.T
    return X, U


@pytest.mark.parametrize("noise", [0.1, 0.02])
@pytest.mark.parametrize("with_prior", [True, False])
def test_recovers_known_system(rp, noise: float, with_prior: bool) -> None:
    """D=4, d=2, N=200 trajectories, T=6; A_t, B_t, c_t, F_t random and independent across t;
    transition noise N(0, F_t) with F_t ≈ σ² (I + W Wᵀ/D), σ = ``noise``.

    Tolerances, per t. Sampling: the least-squares standard error of a coefficient of [A_t B_t]
    is ≤ SE = σ_t √(max diag Σ_xu⁻¹ / N) (σ_t² = largest eigenvalue of F_t, Σ_xu the empirical
    covariance of [s_t; a_t]); for c_t, SE_c = σ_t √((1 + μ_xuᵀ Σ_xu⁻¹ μ_xu) / N); for F_t the
    relative error of a covariance estimate is ≈ √(2/N). Prior (n₀ = m = 1 pseudo-sample, pooled
    over t): it moves Σ by w = n₀/(N + n₀) towards the pooled covariance S₀, which shifts
    [A_t B_t] by w (S₀_{y,xu} − [A_t B_t] S₀_{xu,xu}) Σ_{xu,xu}⁻¹ (norm bound b_t). For F_t: the
    conditional covariance is the minimum over predictors L of [−L I] Σ [−L I]ᵀ, so taking
    L = [A_t B_t] gives 0 ≤ F̂_t − (1 − w) F_t ≲ (n₀ R_t(S₀) + κ R_t(δδᵀ)) / (N + n₀) up to sampling
    error, R_t(M) = [−A_t −B_t I] M [·]ᵀ, κ = N m/(N + m), δ = μ̂ − μ₀. Bounds:
    |Δ[A B]| ≤ 5 SE + 2 b_t, |Δc| ≤ 5 SE_c + 2 b_t |μ_xu|, ‖ΔF‖ ≤ (4 √(2/N) + w) ‖F‖ + ‖prior
    term‖ (all prior terms vanish with the prior off).
    """
    g = torch.Generator().manual_seed(10)
    T, D, d, N = 6, 4, 2, 200
    n = D + d
    dyn = rp.dynamics(T, D, d, g, noise=noise)
    X, U = simulate(dyn, N, g)
    pooled = pooled_transitions(X, U)[0]
    prior = GaussianPrior() if with_prior else GaussianPrior(m=0, n0=0)
    prior.fit(pooled)
    fit = fit_dynamics(X, U, prior=prior)
    assert fit.horizon == T and fit.dim_s == D and fit.dim_a == d
    S0 = prior.cov0
    w = prior.n0 / (N + prior.n0)
    kappa = N * prior.m / (N + prior.m) if prior.m > 0 else 0.0
    for t in range(T - 1):
        xu = torch.cat([X[:, t], U[:, t]], -1)
        mu, S = xu.mean(0), torch.cov(xu.T, correction=0)
        Sinv = torch.linalg.inv(S)
        smax = float(torch.linalg.eigvalsh(dyn.F[t]).max()) ** 0.5
        se_ab = smax * math.sqrt(float(Sinv.diagonal().max()) / N)
        se_c = smax * math.sqrt((1 + float(mu @ Sinv @ mu)) / N)
        Spost = (1 - w) * S + w * S0[:n, :n]
        shift = S0[n:, :n] - dyn.AB[t] @ S0[:n, :n]
        b = w * float(torch.linalg.matrix_norm(shift, ord=2) / torch.linalg.eigvalsh(Spost).min())
        err_ab = float((fit.AB[t] - dyn.AB[t]).abs().max())
        err_c = float((fit.c[t] - dyn.c[t]).abs().max())
        assert err_ab < 5 * se_ab + 2 * b, (t, err_ab, se_ab, b)
        assert err_c < 5 * se_c + 2 * b * float(mu.norm()), (t, err_c, se_c, b)
        err_f = float(torch.linalg.matrix_norm(fit.F[t] - dyn.F[t]))
        y = torch.cat([X[:, t], U[:, t], X[:, t + 1]], -1)
        delta = y.mean(0) - prior.mu0
        L = torch.cat([-dyn.AB[t], torch.eye(D, dtype=DT)], -1)
        prior_term = L @ (prior.n0 * S0 + kappa * torch.outer(delta, delta)) @ L.T / (N + prior.n0)
        normF = float(torch.linalg.matrix_norm(dyn.F[t]))
        tol_f = (4 * math.sqrt(2 / N) + w) * normF + float(torch.linalg.matrix_norm(prior_term))
        assert err_f < tol_f, (t, err_f, tol_f)


def test_map_formula(rp) -> None:
    """The fit is the conditional of Σ = (Φ₀ + N Σ̂ + (N m/(N+m)) δδᵀ)/(N + n₀) (gps.md §4)."""
    g = torch.Generator().manual_seed(15)
    T, D, d, N = 3, 2, 1, 7
    n = D + d
    dyn = rp.dynamics(T, D, d, g)
    X, U = simulate(dyn, N, g)
    prior = GaussianPrior(m=2.5, n0=4.0).fit(torch.randn(50, 2 * D + d, dtype=DT, generator=g))
    fit = fit_dynamics(X, U, prior=prior, ridge=0.0)
    mu0, Phi0, m, n0 = prior.eval(None)
    for t in range(T - 1):
        y = torch.cat([X[:, t], U[:, t], X[:, t + 1]], -1)
        mh, Sh = y.mean(0), torch.cov(y.T, correction=0)
        dm = mh - mu0
        Sig = (Phi0 + N * Sh + (N * m / (N + m)) * torch.outer(dm, dm)) / (N + n0)
        AB = torch.linalg.solve(Sig[:n, :n], Sig[:n, n:]).T
        torch.testing.assert_close(fit.AB[t], AB, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(fit.c[t], mh[n:] - AB @ mh[:n], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(fit.F[t], Sig[n:, n:] - AB @ Sig[:n, n:], rtol=1e-9, atol=1e-11)


def test_few_samples_stay_finite_and_pd(rp) -> None:
    """N = 3 < D + d: Σ̂ is singular, the prior (pooled over t) keeps Σ, F_t finite and PD."""
    g = torch.Generator().manual_seed(11)
    T, D, d = 12, 4, 2
    dyn = rp.dynamics(T, D, d, g, noise=0.1)
    X, U = simulate(dyn, 3, g)
    fit = fit_dynamics(X, U)
    for x in (fit.A, fit.B, fit.c, fit.F):
        assert bool(torch.isfinite(x).all())
    assert int(torch.linalg.cholesky_ex(fit.F)[1].abs().sum()) == 0
    assert float(torch.linalg.eigvalsh(fit.F).min()) > 0
    # Even one sample per step works with a prior fitted on other data.
    prior = GaussianPrior().fit(pooled_transitions(*simulate(dyn, 5, g))[0])
    fit1 = fit_dynamics(X[:1], U[:1], prior=prior)
    assert bool(torch.isfinite(fit1.AB).all()) and float(torch.linalg.eigvalsh(fit1.F).min()) > 0


def test_weights_drop_diverged_trajectories(rp) -> None:
    g = torch.Generator().manual_seed(12)
    T, D, d = 5, 3, 2
    dyn = rp.dynamics(T, D, d, g)
    X, U = simulate(dyn, 50, g)
    ref = fit_dynamics(X, U)
    Xb = torch.cat([X, torch.full((2, T, D), math.nan, dtype=DT)])
    Ub = torch.cat([U, torch.full((2, T, d), math.inf, dtype=DT)])
    w = torch.cat([torch.ones(50), torch.zeros(2)])
    fit = fit_dynamics(Xb, Ub, weights=w)
    for a, b in ((fit.A, ref.A), (fit.B, ref.B), (fit.c, ref.c), (fit.F, ref.F)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="non-finite"):
        fit_dynamics(Xb, Ub)
    # Per-transition weights: a trajectory that diverges after t = 2 keeps its first transitions.
    wt = torch.ones(52, T - 1)
    wt[50:] = 0.0
    torch.testing.assert_close(fit_dynamics(Xb, Ub, weights=wt).A, ref.A, rtol=1e-10, atol=1e-12)
    Xc = X.clone()
    Xc[0, 3:] = math.nan
    wt = torch.ones(50, T - 1)
    wt[0, 2:] = 0.0
    fit = fit_dynamics(Xc, U, weights=wt)
    assert bool(torch.isfinite(fit.AB).all())
    with pytest.raises(ValueError, match="weights must be"):
        fit_dynamics(X, U, weights=torch.ones(7))


def test_no_prior_is_plain_regression(rp) -> None:
    """m = n₀ = 0 and no ridge: [A_t B_t], c_t equal ordinary least squares exactly."""
    g = torch.Generator().manual_seed(13)
    T, D, d, N = 4, 3, 1, 40
    dyn = rp.dynamics(T, D, d, g)
    X, U = simulate(dyn, N, g)
    fit = fit_dynamics(X, U, prior=GaussianPrior(m=0, n0=0).fit(pooled_transitions(X, U)[0]), ridge=0.0)
    for t in range(T - 1):
        Z = torch.cat([X[:, t], U[:, t], torch.ones(N, 1, dtype=DT)], -1)
        beta = torch.linalg.lstsq(Z, X[:, t + 1]).solution.T
        torch.testing.assert_close(fit.AB[t], beta[:, :-1], rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(fit.c[t], beta[:, -1], rtol=1e-9, atol=1e-10)
        resid = X[:, t + 1] - Z @ beta.T
        torch.testing.assert_close(fit.F[t], resid.T @ resid / N, rtol=1e-8, atol=1e-10)


def test_gmm_prior_picks_the_right_component(rp) -> None:
    g = torch.Generator().manual_seed(14)
    p, M = 5, 400
    a = torch.randn(M, p, dtype=DT, generator=g) * 0.3 + 5.0
    b = torch.randn(M, p, dtype=DT, generator=g) * 0.3 - 5.0
    prior = GMMPrior(n_components=2, n0=3.0, m=2.0).fit(torch.cat([a, b]))
    mu0, Phi0, m, n0 = prior.eval(a[:10])
    torch.testing.assert_close(mu0, torch.full((p,), 5.0, dtype=DT), atol=0.1, rtol=0)
    torch.testing.assert_close(Phi0 / n0, 0.09 * torch.eye(p, dtype=DT), atol=0.04, rtol=0)
    assert (m, n0) == (2.0, 3.0)
    mu0, _, _, _ = prior.eval(b[:10])
    torch.testing.assert_close(mu0, torch.full((p,), -5.0, dtype=DT), atol=0.1, rtol=0)
    # As a dynamics prior it is at least as good as the single Gaussian (it is more local).
    T, D, d = 5, 3, 2
    dyn = rp.dynamics(T, D, d, g, noise=0.05)
    X, U = simulate(dyn, 100, g)
    pooled = pooled_transitions(X, U)[0]
    err_gmm = float((fit_dynamics(X, U, prior=GMMPrior(n_components=3).fit(pooled)).AB - dyn.AB).abs().max())
    err_gauss = float((fit_dynamics(X, U, prior=GaussianPrior().fit(pooled)).AB - dyn.AB).abs().max())
    assert err_gmm < 1.25 * err_gauss + 0.01 and err_gmm < 0.1, (err_gmm, err_gauss)


def test_unfitted_prior_raises() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        GaussianPrior().eval(torch.zeros(1, 3))
