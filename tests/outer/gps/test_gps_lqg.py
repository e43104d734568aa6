"""LQG backward pass, the augmented cost ℓ̄ and the KL trust-region dual on η."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
import torch

from l2o.outer.gps import (
    LinearGaussianDynamics,
    LinearGaussianPolicy,
    NotPositiveDefiniteError,
    QuadraticCost,
    TrustRegionError,
    augmented_cost,
    backward,
    expected_cost,
    forward,
    kl_divergence,
    neg_log_policy_cost,
    solve_fixed_eta,
    solve_trust_region,
)

DT = torch.float64


def lti(T: int, A: torch.Tensor, B: torch.Tensor, noise: float = 0.0) -> LinearGaussianDynamics:
    D, d = B.shape
    return LinearGaussianDynamics(
        A.expand(T - 1, D, D), B.expand(T - 1, D, d), torch.zeros(T - 1, D, dtype=DT),
        noise * torch.eye(D, dtype=DT).expand(T - 1, D, D),
    )


def lqr_cost(T: int, Q: torch.Tensor, R: torch.Tensor) -> QuadraticCost:
    return QuadraticCost.from_blocks(Q.expand(T, *Q.shape), R.expand(T, *R.shape))


def test_infinite_horizon_limit_is_dare(rp) -> None:
    """T = 200, time-invariant A, B, c = ½sᵀQs + ½aᵀRa: K_t far from the horizon is the DARE gain."""
    g = torch.Generator().manual_seed(30)
    T, D, d = 200, 3, 2
    A = rp.stable(D, g, radius=1.2)  # open-loop unstable
    B = torch.randn(D, d, dtype=DT, generator=g)
    Q, R = rp.spd(D, g), rp.spd(d, g)
    dyn, cost = lti(T, A, B, noise=0.01), lqr_cost(T, Q, R)
    pol, val = backward(dyn, cost)
    P = torch.from_numpy(scipy.linalg.solve_discrete_are(A.numpy(), B.numpy(), Q.numpy(), R.numpy()))
    K_dare = -torch.linalg.solve(R + B.T @ P @ B, B.T @ P @ A)
    for t in (0, 50, 100):
        assert float((pol.K[t] - K_dare).abs().max()) < 1e-8
        assert float((val.Vxx[t] - P).abs().max()) < 1e-8 * float(P.abs().max())
    assert float(pol.k.abs().max()) < 1e-12  # no linear terms: k_t = 0
    torch.testing.assert_close(pol.K[-1], torch.zeros(d, D, dtype=DT))  # last step: no future
    torch.testing.assert_close(pol.cov[0], torch.linalg.inv(R + B.T @ P @ B))
    # Through the trust-region cost with η → 0 (ψ_old's pull vanishes): the same gain.
    old = LinearGaussianPolicy.from_gain(torch.zeros(d, D), cov=1.0, T=T)
    pol_eta, _ = backward(dyn, augmented_cost(cost, old, eta=1e-9))
    assert float((pol_eta.K[0] - K_dare).abs().max()) < 1e-6


def _objective(dyn, cost, mu0, sigma0, K, k, G):
    pol = LinearGaussianPolicy(K, k, G)
    return expected_cost(pol, dyn, cost, mu0, sigma0).sum()


def test_riccati_matches_brute_force(rp) -> None:
    """T = 3, D = 2, d = 1: the Riccati policy minimises the expected total cost (computed by
    forward) over all (K_t, k_t): zero gradient there, and BFGS from zero finds the same optimum."""
    g = torch.Generator().manual_seed(31)
    T, D, d = 3, 2, 1
    dyn, cost = rp.dynamics(T, D, d, g, noise=0.2), rp.cost(T, D, d, g)
    mu0, sigma0 = torch.randn(D, dtype=DT, generator=g), rp.spd(D, g)
    pol, _ = backward(dyn, cost)
    K, k = pol.K.clone().requires_grad_(), pol.k.clone().requires_grad_()
    J = _objective(dyn, cost, mu0, sigma0, K, k, pol.cov)
    gK, gk = torch.autograd.grad(J, (K, k))
    J = J.detach()
    assert float(gK.abs().max()) < 1e-10 and float(gk.abs().max()) < 1e-10

    nK = T * d * D

    def f(x: np.ndarray) -> tuple[float, np.ndarray]:
        xt = torch.tensor(x, dtype=DT, requires_grad=True)
        val = _objective(dyn, cost, mu0, sigma0, xt[:nK].reshape(T, d, D), xt[nK:].reshape(T, d), pol.cov)
        (grad,) = torch.autograd.grad(val, xt)
        return float(val.detach()), grad.numpy()

    res = scipy.optimize.minimize(f, np.zeros(nK + T * d), jac=True, method="BFGS", options={"gtol": 1e-10})
    assert res.fun >= float(J) - 1e-10
    assert abs(res.fun - float(J)) < 1e-8
    np.testing.assert_allclose(res.x, torch.cat([pol.K.flatten(), pol.k.flatten()]).numpy(), atol=1e-5)


def _lagrangian(dyn, cost, mu0, sigma0, old, eta, lam, nu, pi_fit, K, k, G):
    """Σ_t E[c̃_t − λ_tᵀa] + η Σ_t E KL(ψ‖ψ_old) + Σ_t ν_t E KL(ψ‖π̂), from forward/kl_divergence."""
    pol = LinearGaussianPolicy(K, k, G)
    dist = forward(pol, dyn, mu0, sigma0)
    D = cost.dim_s
    c = cost.expected(dist.xu_mean, dist.xu_cov) - (lam * dist.xu_mean[:, D:]).sum(-1)
    kl_old = kl_divergence(pol, old, dist.state_mean, dist.state_cov)
    kl_pi = kl_divergence(pol, pi_fit, dist.state_mean, dist.state_cov)
    return (c + eta * kl_old + nu * kl_pi).sum()


@pytest.mark.parametrize("nu_kind", ["constant", "time-varying"])
def test_fixed_eta_solution_minimises_the_lagrangian(rp, nu_kind: str) -> None:
    """At fixed η, ν, λ, π̂ the LQG policy (K_t, k_t and G_t) is a stationary point — and the
    minimum found by BFGS — of the Lagrangian written with forward() and kl_divergence()."""
    g = torch.Generator().manual_seed(32)
    T, D, d = 3, 2, 1
    dyn, cost = rp.dynamics(T, D, d, g, noise=0.2), rp.cost(T, D, d, g)
    mu0, sigma0 = torch.randn(D, dtype=DT, generator=g), rp.spd(D, g)
    old, pi_fit = rp.policy(T, D, d, g), rp.policy(T, D, d, g)
    lam = torch.randn(T, d, dtype=DT, generator=g)
    nu = torch.full((T,), 0.3, dtype=DT) if nu_kind == "constant" else torch.tensor([0.05, 0.8, 0.3], dtype=DT)
    eta = 0.7
    pol, _ = solve_fixed_eta(dyn, cost, old, eta, lambda_=lam, nu=nu, pi_fit=pi_fit)
    if nu_kind == "constant":  # exactly the GPS form: G_t = Q̄_uu⁻¹ of the scaled cost ℓ̄
        ref, _ = backward(dyn, augmented_cost(cost, old, eta, lambda_=lam, nu=nu, pi_fit=pi_fit))
        for a, b in ((pol.K, ref.K), (pol.k, ref.k), (pol.cov, ref.cov)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    args = (dyn, cost, mu0, sigma0, old, eta, lam, nu, pi_fit)

    def max_grad(p: LinearGaussianPolicy) -> tuple[torch.Tensor, float]:
        K, k, G = (x.clone().requires_grad_() for x in (p.K, p.k, p.cov))
        val = _lagrangian(*args, K, k, G)
        return val.detach(), max(float(x.abs().max()) for x in torch.autograd.grad(val, (K, k, G)))

    L0, gmax = max_grad(pol)
    assert gmax < 1e-9
    if nu_kind == "time-varying":  # GPS's per-step division by (η + ν_t) is not stationary here
        gps_form, _ = backward(dyn, augmented_cost(cost, old, eta, lambda_=lam, nu=nu, pi_fit=pi_fit))
        assert max_grad(gps_form)[1] > 1e-2

    nK, nk = T * d * D, T * d

    def f(x: np.ndarray) -> tuple[float, np.ndarray]:
        xt = torch.tensor(x, dtype=DT, requires_grad=True)
        logG = xt[nK + nk :].reshape(T, d, d)  # d = 1: G_t = exp(·)
        val = _lagrangian(*args, xt[:nK].reshape(T, d, D), xt[nK : nK + nk].reshape(T, d), logG.exp())
        (grad,) = torch.autograd.grad(val, xt)
        return float(val.detach()), grad.numpy()

    x0 = torch.cat([old.K.flatten(), old.k.flatten(), old.cov.log().flatten()]).numpy()
    res = scipy.optimize.minimize(f, x0, jac=True, method="BFGS", options={"gtol": 1e-10})
    assert res.fun >= float(L0) - 1e-9 and abs(res.fun - float(L0)) < 1e-7


def test_neg_log_policy_cost_and_augmented_cost(rp) -> None:
    g = torch.Generator().manual_seed(33)
    T, D, d = 4, 3, 2
    old, pi_fit, cost = rp.policy(T, D, d, g), rp.policy(T, D, d, g), rp.cost(T, D, d, g)
    lam = torch.randn(T, d, dtype=DT, generator=g)
    nu = torch.rand(T, dtype=DT, generator=g)
    s, a = torch.randn(6, T, D, dtype=DT, generator=g), torch.randn(6, T, d, dtype=DT, generator=g)
    torch.testing.assert_close(neg_log_policy_cost(old)(s, a), -old.log_prob(a, s))
    eta = 2.5
    aug = augmented_cost(cost, old, eta, lambda_=lam, nu=nu, pi_fit=pi_fit)
    ref = (cost(s, a) - (lam * a).sum(-1) - eta * old.log_prob(a, s) - nu * pi_fit.log_prob(a, s)) / (eta + nu)
    torch.testing.assert_close(aug(s, a), ref)
    with pytest.raises(ValueError, match="pi_fit"):
        augmented_cost(cost, old, eta, nu=nu)
    with pytest.raises(ValueError, match="η \\+ ν_t must be > 0"):
        augmented_cost(cost, old, 0.0)


def _tr_problem(rp, seed: int, T: int = 12, D: int = 3, d: int = 2):
    g = torch.Generator().manual_seed(seed)
    dyn, cost = rp.dynamics(T, D, d, g, noise=0.1), rp.cost(T, D, d, g)
    old = rp.policy(T, D, d, g, gain=0.1, var=0.5)
    return dyn, cost, old, torch.randn(D, dtype=DT, generator=g), 0.1 * rp.spd(D, g)


@pytest.mark.parametrize("epsilon", [0.05, 0.5, 5.0])
def test_trust_region_hits_the_kl_band(rp, epsilon: float) -> None:
    dyn, cost, old, mu0, sigma0 = _tr_problem(rp, 34)
    rtol = 0.1
    pol, eta, kl = solve_trust_region(dyn, cost, old, mu0, sigma0, epsilon, rtol=rtol)
    assert 1e-6 < eta < 1e16
    assert epsilon * (1 - rtol) <= kl <= epsilon * (1 + rtol)
    dist = forward(pol, dyn, mu0, sigma0)
    torch.testing.assert_close(torch.tensor(kl, dtype=DT), kl_divergence(pol, old, dist.state_mean, dist.state_cov).sum())
    # The new policy is cheaper than the old one (the trust region moves towards the optimum).
    assert float(expected_cost(pol, dyn, cost, mu0, sigma0).sum()) < float(expected_cost(old, dyn, cost, mu0, sigma0).sum())
    # A warm start lands in the band as well.
    _, _, kl2 = solve_trust_region(dyn, cost, old, mu0, sigma0, epsilon, rtol=rtol, eta_init=eta * 3)
    assert epsilon * (1 - rtol) <= kl2 <= epsilon * (1 + rtol)


def test_trust_region_kl_vanishes_with_epsilon(rp) -> None:
    dyn, cost, old, mu0, sigma0 = _tr_problem(rp, 35)
    prev_eta, prev_dK = 0.0, math.inf
    for eps in (1e-1, 1e-3, 1e-5):
        pol, eta, kl = solve_trust_region(dyn, cost, old, mu0, sigma0, eps)
        assert kl <= eps * 1.1
        dK = float((pol.K - old.K).abs().max() + (pol.k - old.k).abs().max())
        assert eta > prev_eta and dK < prev_dK
        prev_eta, prev_dK = eta, dK
    assert prev_dK < 0.05


def test_trust_region_inactive_at_lower_bound(rp) -> None:
    """A huge ε: the constraint is inactive, η stays at its lower bound with KL < ε(1 − rtol)."""
    dyn, cost, old, mu0, sigma0 = _tr_problem(rp, 36)
    pol, eta, kl = solve_trust_region(dyn, cost, old, mu0, sigma0, 1e6, eta_bounds=(1e-3, 1e16))
    assert eta == 1e-3 and kl < 1e6 * 0.9
    ref, _ = backward(dyn, augmented_cost(cost, old, 1e-3))
    torch.testing.assert_close(pol.K, ref.K)


def test_trust_region_with_badmm_terms(rp) -> None:
    dyn, cost, old, mu0, sigma0 = _tr_problem(rp, 37)
    g = torch.Generator().manual_seed(0)
    T, D, d = 12, 3, 2
    pi_fit = rp.policy(T, D, d, g, gain=0.1, var=0.5)
    lam = 0.1 * torch.randn(T, d, dtype=DT, generator=g)
    nu = torch.logspace(-2, 0, T, dtype=DT)
    _, _, kl = solve_trust_region(dyn, cost, old, mu0, sigma0, 0.5, lambda_=lam, nu=nu, pi_fit=pi_fit)
    assert 0.45 <= kl <= 0.55


def test_non_pd_action_block_is_repaired_by_eta(rp) -> None:
    """c̃ with a negative-definite action block: ℓ̄'s Q_uu = −½ I/η + G_old⁻¹ + … is PD only for
    η large enough, so the dual must raise η past that point; with η_max below it, it must fail."""
    g = torch.Generator().manual_seed(38)
    T, D, d = 6, 2, 1
    A, B = rp.stable(D, g, 0.5), 0.1 * torch.randn(D, d, dtype=DT, generator=g)
    dyn = lti(T, A, B, noise=0.05)
    cost = lqr_cost(T, torch.eye(D, dtype=DT), -0.5 * torch.eye(d, dtype=DT))
    with pytest.raises(NotPositiveDefiniteError) as info:
        backward(dyn, cost, group="layer0/W")
    assert info.value.t == T - 1 and info.value.group == "layer0/W"
    assert "group='layer0/W', t=5" in str(info.value)
    old = LinearGaussianPolicy.from_gain(torch.zeros(d, D), cov=1.0, T=T)
    mu0, sigma0 = torch.zeros(D, dtype=DT), 0.1 * torch.eye(D, dtype=DT)
    # At the last step Q_uu = −0.5/η + 1, so η must exceed 0.5 (earlier steps add BᵀV B/η ≥ 0).
    with pytest.raises(NotPositiveDefiniteError):
        backward(dyn, augmented_cost(cost, old, eta=0.45))
    pol, eta, kl = solve_trust_region(dyn, cost, old, mu0, sigma0, epsilon=0.5)
    assert eta > 0.5 and 0.45 <= kl <= 0.55
    assert bool(torch.isfinite(pol.cov).all())
    with pytest.raises(TrustRegionError, match="not positive definite even at η_max") as info2:
        solve_trust_region(dyn, cost, old, mu0, sigma0, epsilon=0.5, eta_bounds=(1e-6, 0.4), group="layer0/W")
    assert info2.value.group == "layer0/W" and "layer0/W" in str(info2.value)


def test_trust_region_infeasible_kl_raises(rp) -> None:
    """η_max too small to pull ψ within ε of ψ_old: a clear TrustRegionError, not a silent result."""
    dyn, cost, old, mu0, sigma0 = _tr_problem(rp, 39)
    with pytest.raises(TrustRegionError, match="even at η_max"):
        solve_trust_region(dyn, cost, old, mu0, sigma0, 1e-3, eta_bounds=(1e-6, 1e-3))


def test_shape_errors(rp) -> None:
    g = torch.Generator().manual_seed(40)
    dyn, cost = rp.dynamics(5, 2, 1, g), rp.cost(4, 2, 1, g)
    with pytest.raises(ValueError, match="transitions"):
        backward(dyn, cost)


@pytest.mark.parametrize("nu_kind", ["none", "constant", "time-varying"])
def test_the_dual_search_solver_equals_solve_fixed_eta_bitwise(rp, nu_kind: str) -> None:
    """The trust-region search builds the η-independent cost terms once; for every η its ψ must be
    bitwise the ψ of :func:`solve_fixed_eta` (which rebuilds everything), so results are unchanged."""
    from l2o.outer.gps.lqg import _FixedEtaSolver

    dyn, cost, old, _, _ = _tr_problem(rp, 38)
    g = torch.Generator().manual_seed(1)
    T, D, d = 12, 3, 2
    pi_fit = rp.policy(T, D, d, g, gain=0.1, var=0.5)
    lam = 0.1 * torch.randn(T, d, dtype=DT, generator=g)
    nu = {"none": None, "constant": 0.3, "time-varying": torch.logspace(-2, 0, T, dtype=DT)}[nu_kind]
    solver = _FixedEtaSolver(dyn, cost, old, lam, nu, pi_fit if nu is not None else None, None)
    for eta in (1e-6, 0.37, 5.0, 1e4):
        a, _ = solver(eta)
        b, _ = solve_fixed_eta(dyn, cost, old, eta, lambda_=lam, nu=nu, pi_fit=pi_fit if nu is not None else None)
        for x, y in ((a.K, b.K), (a.k, b.k), (a.cov, b.cov)):
            assert torch.equal(x, y)
