"""Bregman-ADMM pieces: π-step targets and weights, Σ^π, the dual step, E KL(ψ‖π), ν/ε schedules."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch

from l2o.outer.gps import (
    LinearGaussianPolicy,
    dual_step,
    kl_divergence,
    kl_psi_pi,
    pi_covariance,
    pi_targets,
    solve_fixed_eta,
    update_epsilon,
    update_nu,
    weighted_regression_loss,
)

DT = torch.float64


def _problem(seed: int, N: int = 7, T: int = 5, D: int = 3, d: int = 2, rp=None):
    g = torch.Generator().manual_seed(seed)
    psi = rp.policy(T, D, d, g)
    S = torch.randn(N, T, D, dtype=DT, generator=g)
    lam = torch.randn(T, d, dtype=DT, generator=g)
    nu = 0.1 + torch.rand(T, dtype=DT, generator=g)
    return g, psi, S, lam, nu


def test_targets_with_zero_lambda_are_psi_mean(rp) -> None:
    _, psi, S, _, nu = _problem(0, rp=rp)
    for lam in (None, torch.zeros(psi.T, psi.dim_a, dtype=DT)):
        y, W = pi_targets(psi, S, lam, nu)
        assert torch.equal(y, psi.mean(S))
        torch.testing.assert_close(W, nu[:, None, None] * torch.linalg.inv(psi.cov))


def test_targets_complete_the_square(rp) -> None:
    """Σ_t λ_tᵀμ + (ν_t/2)(μ − μ^ψ)ᵀG_t⁻¹(μ − μ^ψ) − loss(μ) is the same for every μ, and the
    loss is minimised (zero gradient) at the target."""
    g, psi, S, lam, nu = _problem(1, rp=rp)
    y, W = pi_targets(psi, S, lam, nu)
    m, P = psi.mean(S), psi.precision

    def theta_objective(mu: torch.Tensor) -> torch.Tensor:
        r = mu - m
        per = (mu * lam).sum(-1) + 0.5 * nu * torch.einsum("nti,tij,ntj->nt", r, P, r)
        return per.sum(1).mean()

    consts = []
    for _ in range(4):
        mu = torch.randn(m.shape, dtype=DT, generator=g) * 3
        consts.append(float(theta_objective(mu) - weighted_regression_loss(mu, y, W)))
    assert np.ptp(consts) < 1e-10
    mu = y.clone().requires_grad_(True)
    weighted_regression_loss(mu, y, W).backward()
    assert float(mu.grad.abs().max()) == 0.0
    # and the theta-objective's own gradient vanishes there too
    mu = y.clone().requires_grad_(True)
    theta_objective(mu).backward()
    assert float(mu.grad.abs().max()) < 1e-12


def test_weighted_loss_sample_weights_and_dtype(rp) -> None:
    _, psi, S, lam, nu = _problem(2, rp=rp)
    y, W = pi_targets(psi, S, lam, nu)
    pred = (y + 0.1).float()
    full = weighted_regression_loss(pred, y, W)
    assert full.dtype == torch.float32
    w = torch.zeros(S.shape[0], dtype=DT)
    w[:3] = 1.0
    torch.testing.assert_close(weighted_regression_loss(pred, y, W, sample_weights=w),
                               weighted_regression_loss(pred[:3], y[:3], W))


@pytest.mark.parametrize("d", [1, 2, 3])
def test_pi_covariance_is_the_minimiser(rp, d: int) -> None:
    """Σ^π = (Σ ν_t G_t⁻¹ / Σ ν_t)⁻¹ against a numerical minimiser of Σ_t ν_t/2 (tr(G_t⁻¹Σ) − log|Σ|)."""
    g = torch.Generator().manual_seed(10 + d)
    T = 6
    G = torch.stack([rp.spd(d, g, scale=float(s)) for s in torch.linspace(0.2, 3.0, T)])
    nu = 0.05 + torch.rand(T, dtype=DT, generator=g) * 2
    Sigma = pi_covariance(G, nu)
    Ginv = torch.linalg.inv(G).numpy()
    nun = nu.numpy()
    il = np.tril_indices(d)

    def f(x: np.ndarray) -> float:
        L = np.zeros((d, d))
        L[il] = x
        S = L @ L.T
        sign, logdet = np.linalg.slogdet(S)
        if sign <= 0:
            return 1e30
        return float(sum(n / 2 * (np.trace(Gi @ S) - logdet) for n, Gi in zip(nun, Ginv)))

    x0 = np.eye(d)[il]
    res = scipy.optimize.minimize(f, x0, method="BFGS", options={"gtol": 1e-10})
    L = np.zeros((d, d))
    L[il] = res.x
    np.testing.assert_allclose(Sigma.numpy(), L @ L.T, rtol=1e-5, atol=1e-7)
    assert f(np.linalg.cholesky(Sigma.numpy())[il]) <= res.fun + 1e-9
    if d == 1:  # scalar case: the ν-weighted harmonic mean of the G_t
        hm = nu.sum() / (nu / G[:, 0, 0]).sum()
        torch.testing.assert_close(Sigma[0, 0], hm)


def test_pi_covariance_constant_nu_identical_G(rp) -> None:
    g = torch.Generator().manual_seed(3)
    G1 = rp.spd(2, g)
    torch.testing.assert_close(pi_covariance(G1.expand(4, 2, 2), 0.3), G1)


def test_dual_step_sign_and_effect(rp) -> None:
    """π's action above ψ's raises λ_t (∝ α ν_t); the next π-step target then lies below ψ's mean
    (the excess is penalised), and the next ψ-step's action moves up (−λᵀa rewards it)."""
    g, psi, S, _, _ = _problem(4, rp=rp)
    T, d = psi.T, psi.dim_a
    nu = torch.linspace(0.5, 2.0, T, dtype=DT)
    lam0 = torch.zeros(T, d, dtype=DT)
    m_psi = psi.mean(S)
    excess = torch.tensor([0.3, -0.2], dtype=DT)
    lam = dual_step(lam0, nu, m_psi + excess, m_psi, alpha=0.1)
    torch.testing.assert_close(lam, 0.1 * nu[:, None] * excess.expand(T, d))
    assert torch.equal(dual_step(lam0, nu, m_psi, m_psi, alpha=0.1), lam0)
    # [T, d] expectations are accepted too
    torch.testing.assert_close(dual_step(lam0, nu, (m_psi + excess).mean(0), m_psi.mean(0), 0.1), lam)
    # π-step: target shifted against the excess, by G_t λ_t / ν_t
    y, _ = pi_targets(psi, S, lam, nu)
    shift = (y - m_psi)[0]  # [T, d], same for every sample
    assert bool(((shift * excess).sum(-1) < 0).all())
    # ψ-step: the λ term moves ψ's open-loop action in the direction of the excess (λᵀΔk > 0)
    dyn, cost = rp.dynamics(T, psi.dim_s, d, g), rp.cost(T, psi.dim_s, d, g)
    base, _ = solve_fixed_eta(dyn, cost, psi, 1.0)
    moved, _ = solve_fixed_eta(dyn, cost, psi, 1.0, lambda_=lam)
    assert bool(((moved.k - base.k) * lam).sum(-1).gt(0).all())
    torch.testing.assert_close(moved.K, base.K)


def test_kl_psi_pi_matches_closed_form_for_linear_pi(rp) -> None:
    """For a linear π the sample average equals the Gaussian formula with the samples' moments."""
    g, psi, S, _, _ = _problem(5, N=50, rp=rp)
    T, d, D = psi.T, psi.dim_a, psi.dim_s
    Kp = torch.randn(d, D, dtype=DT, generator=g)
    kp = torch.randn(d, dtype=DT, generator=g)
    Sp = rp.spd(d, g)
    pi_lin = LinearGaussianPolicy.from_gain(Kp, kp, Sp, T=T)
    mean = S.mean(0)
    Sc = S - mean
    cov = torch.einsum("nti,ntj->tij", Sc, Sc) / S.shape[0]
    ref = kl_divergence(psi, pi_lin, mean, cov)
    got = kl_psi_pi(psi, S, S @ Kp.T + kp, Sp)
    torch.testing.assert_close(got, ref)
    assert float(kl_psi_pi(psi, S, psi.mean(S), psi.cov[0]).min()) >= -1e-12


def test_update_nu_rules() -> None:
    nu = torch.full((6,), 1.0, dtype=DT)
    target = 0.1  # low = 0.1 → "well below" threshold 0.01
    kl = torch.tensor([0.5, 0.05, 0.05, 0.001, 0.05, 0.02], dtype=DT)
    prev = torch.tensor([0.1, 0.04, 0.06, 0.0005, 0.05, 0.03], dtype=DT)
    new = update_nu(nu, kl, prev, target, 1e-3, 1e3)
    # above target ×2; grew (mid band) ×2; fell (mid band) keep; well below ×0.5 (even if grew);
    # unchanged keep; fell, mid band keep
    torch.testing.assert_close(new, torch.tensor([2.0, 2.0, 1.0, 0.5, 1.0, 1.0], dtype=DT))
    # without history only the level counts
    torch.testing.assert_close(update_nu(nu, kl, None, target, 1e-3, 1e3),
                               torch.tensor([2.0, 1.0, 1.0, 0.5, 1.0, 1.0], dtype=DT))
    # bounds
    torch.testing.assert_close(update_nu(torch.tensor([1.5, 0.01], dtype=DT), torch.tensor([1.0, 0.0], dtype=DT),
                                         None, target, 0.008, 2.0), torch.tensor([2.0, 0.008], dtype=DT))
    with pytest.raises(ValueError):
        update_nu(nu, kl, prev, target, 1.0, 0.5)


def test_update_epsilon_rules() -> None:
    kw = dict(eps_min=0.05, eps_max=2.0)
    assert update_epsilon(0.4, 1.0, 0.1, **kw) == pytest.approx(0.2)  # ρ = 0.1: worse than predicted
    assert update_epsilon(0.4, 1.0, -0.5, **kw) == pytest.approx(0.2)  # cost went up
    assert update_epsilon(0.4, 1.0, 0.5, **kw) == pytest.approx(0.4)  # ρ = 0.5: keep
    assert update_epsilon(0.4, 1.0, 0.9, **kw) == pytest.approx(0.8)  # as predicted: grow
    assert update_epsilon(0.4, 1.0, 3.0, **kw) == pytest.approx(0.8)  # better than predicted: grow
    assert update_epsilon(0.4, -1.0, -3.0, **kw) == pytest.approx(0.4)  # no predicted gain: keep
    assert update_epsilon(0.4, 1e-9, 1.0, min_predicted=1e-6, **kw) == pytest.approx(0.4)
    assert update_epsilon(1.5, 1.0, 1.0, **kw) == pytest.approx(2.0)  # bounded above
    assert update_epsilon(0.06, 1.0, 0.0, **kw) == pytest.approx(0.05)  # bounded below
    with pytest.raises(ValueError):
        update_epsilon(0.4, float("nan"), 1.0, **kw)


def test_invalid_nu_rejected(rp) -> None:
    _, psi, S, lam, _ = _problem(6, rp=rp)
    with pytest.raises(ValueError, match="ν_t"):
        pi_targets(psi, S, lam, 0.0)
    with pytest.raises(ValueError):
        pi_covariance(psi.cov, torch.zeros(psi.T, dtype=DT))
    with pytest.raises(ValueError):
        pi_targets(psi, S[:, :-1], lam, 1.0)
