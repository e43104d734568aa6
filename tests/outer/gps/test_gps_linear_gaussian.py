"""Linear-Gaussian policy ψ, dynamics p̃, state propagation and the expected KL."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from l2o.outer.gps import (
    LinearGaussianDynamics,
    LinearGaussianPolicy,
    fit_linear_gaussian_policy,
    forward,
    kl_divergence,
)

DT = torch.float64


def test_policy_validation_names_the_field() -> None:
    T, d, D = 3, 2, 4
    K, k, G = torch.zeros(T, d, D), torch.zeros(T, d), torch.eye(d).expand(T, d, d).clone()
    pol = LinearGaussianPolicy(K, k, G)
    assert pol.K.dtype == DT and (pol.T, pol.dim_a, pol.dim_s) == (T, d, D)
    with pytest.raises(ValueError, match=r"^k must"):
        LinearGaussianPolicy(K, torch.zeros(T, d + 1), G)
    with pytest.raises(ValueError, match=r"^cov must"):
        LinearGaussianPolicy(K, k, torch.eye(d))
    with pytest.raises(ValueError, match=r"^K must"):
        LinearGaussianPolicy(torch.zeros(d, D), k, G)
    bad = G.clone()
    bad[1, 0, 1] = 0.5
    with pytest.raises(ValueError, match=r"cov is not symmetric"):
        LinearGaussianPolicy(K, k, bad)
    bad = G.clone()
    bad[2] = -bad[2]
    with pytest.raises(ValueError, match=r"cov \(G_t\) is not positive definite at t=2"):
        LinearGaussianPolicy(K, k, bad)
    nan = K.clone()
    nan[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match=r"^K contains non-finite"):
        LinearGaussianPolicy(nan, k, G)


def test_dynamics_validation() -> None:
    Tm1, D, d = 4, 3, 2
    A, B, c, F = torch.zeros(Tm1, D, D), torch.zeros(Tm1, D, d), torch.zeros(Tm1, D), torch.zeros(Tm1, D, D)
    dyn = LinearGaussianDynamics(A, B, c, F)  # F = 0 (deterministic) is allowed
    assert (dyn.horizon, dyn.dim_s, dyn.dim_a) == (Tm1 + 1, D, d)
    with pytest.raises(ValueError, match=r"^c must"):
        LinearGaussianDynamics(A, B, torch.zeros(Tm1, D + 1), F)
    Fneg = F.clone()
    Fneg[1] = -torch.eye(D)
    with pytest.raises(ValueError, match=r"F .* not positive semi-definite at t=1"):
        LinearGaussianDynamics(A, B, c, Fneg)


def test_mean_sample_log_prob(rp) -> None:
    g = torch.Generator().manual_seed(0)
    T, D, d = 5, 4, 3
    pol = rp.policy(T, D, d, g)
    s = torch.randn(7, T, D, dtype=DT, generator=g)
    a = torch.randn(7, T, d, dtype=DT, generator=g)
    m_all = pol.mean(s)
    lp_all = pol.log_prob(a, s)
    for t in range(T):
        m = pol.mean(s[:, t], t)
        torch.testing.assert_close(m, s[:, t] @ pol.K[t].T + pol.k[t])
        torch.testing.assert_close(m_all[:, t], m)
        ref = MultivariateNormal(m, covariance_matrix=pol.cov[t]).log_prob(a[:, t])
        torch.testing.assert_close(pol.log_prob(a[:, t], s[:, t], t), ref)
        torch.testing.assert_close(lp_all[:, t], ref)
    ent = MultivariateNormal(torch.zeros(d, dtype=DT), covariance_matrix=pol.cov[0]).entropy()
    torch.testing.assert_close(pol.entropy()[0], ent)
    # Sampling: reproducible with a generator, right mean and covariance.
    s0 = torch.randn(D, dtype=DT, generator=g).expand(40000, D)
    x1 = pol.sample(s0, 2, torch.Generator().manual_seed(5))
    x2 = pol.sample(s0, 2, torch.Generator().manual_seed(5))
    torch.testing.assert_close(x1, x2)
    torch.testing.assert_close(x1.mean(0), pol.mean(s0[0], 2), atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(x1.T), pol.cov[2], atol=0.05, rtol=0)
    assert pol.sample(s, None, g).shape == (7, T, d)


def test_from_gain() -> None:
    pol = LinearGaussianPolicy.from_gain(torch.tensor([[-0.1, 0.0, 0.0]]), cov=0.04, T=6)
    assert pol.K.shape == (6, 1, 3) and pol.k.shape == (6, 1)
    torch.testing.assert_close(pol.cov, torch.full((6, 1, 1), 0.04, dtype=DT))
    pol = LinearGaussianPolicy.from_gain(torch.zeros(4, 2, 3), k=torch.ones(2), cov=torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(pol.cov[3], torch.diag(torch.tensor([1.0, 2.0], dtype=DT)))
    torch.testing.assert_close(pol.k, torch.ones(4, 2, dtype=DT))
    with pytest.raises(ValueError, match="T is required"):
        LinearGaussianPolicy.from_gain(torch.zeros(1, 3))


def test_kl_divergence_exact_at_point_state(rp) -> None:
    """Σ_t = 0: the expected KL is the KL of two Gaussians at s = μ_t (torch reference)."""
    g = torch.Generator().manual_seed(1)
    T, D, d = 4, 3, 2
    p, q = rp.policy(T, D, d, g), rp.policy(T, D, d, g)
    mu = torch.randn(T, D, dtype=DT, generator=g)
    kl = kl_divergence(p, q, mu, torch.zeros(T, D, D, dtype=DT))
    for t in range(T):
        ref = torch.distributions.kl_divergence(
            MultivariateNormal(p.mean(mu[t], t), covariance_matrix=p.cov[t]),
            MultivariateNormal(q.mean(mu[t], t), covariance_matrix=q.cov[t]),
        )
        torch.testing.assert_close(kl[t], ref)
    torch.testing.assert_close(kl_divergence(p, p, mu, torch.zeros(T, D, D)), torch.zeros(T, dtype=DT))


def test_kl_divergence_matches_monte_carlo(rp) -> None:
    """E_{s~N(μ,Σ)} KL(p‖q) = E_{s, a~p}[log p(a|s) − log q(a|s)], within 3 standard errors."""
    g = torch.Generator().manual_seed(2)
    T, D, d, N = 4, 3, 2, 200_000
    p, q = rp.policy(T, D, d, g, gain=0.5), rp.policy(T, D, d, g, gain=0.5)
    mu = torch.randn(T, D, dtype=DT, generator=g)
    sigma = torch.stack([rp.spd(D, g) for _ in range(T)])
    kl = kl_divergence(p, q, mu, sigma)
    for t in range(T):
        s = MultivariateNormal(mu[t], covariance_matrix=sigma[t]).sample((N,))
        a = p.sample(s, t, g)
        x = p.log_prob(a, s, t) - q.log_prob(a, s, t)
        se = x.std() / math.sqrt(N)
        assert abs(float(x.mean() - kl[t])) < 3 * float(se), (t, float(x.mean()), float(kl[t]), float(se))
    # The Σ_t term matters: dropping it changes the answer by much more than the MC error.
    kl0 = kl_divergence(p, q, mu, torch.zeros_like(sigma))
    assert bool((kl - kl0 > 0.05).all())


def test_forward_matches_simulation(rp) -> None:
    g = torch.Generator().manual_seed(3)
    T, D, d, N = 5, 3, 2, 100_000
    pol, dyn = rp.policy(T, D, d, g, gain=0.5), rp.dynamics(T, D, d, g, noise=0.3)
    mu0 = torch.randn(D, dtype=DT, generator=g)
    sigma0 = rp.spd(D, g)
    dist = forward(pol, dyn, mu0, sigma0)
    assert dist.state_mean.shape == (T, D) and dist.xu_cov.shape == (T, D + d, D + d)
    s = MultivariateNormal(mu0, covariance_matrix=sigma0).sample((N,))
    for t in range(T):
        a = pol.sample(s, t, g)
        xu = torch.cat([s, a], -1)
        se = xu.std(0) / math.sqrt(N)
        assert bool(((xu.mean(0) - dist.xu_mean[t]).abs() < 4 * se).all()), t
        torch.testing.assert_close(torch.cov(xu.T), dist.xu_cov[t], atol=0.03 * float(dist.xu_cov[t].abs().max()), rtol=0)
        if t < T - 1:
            noise = MultivariateNormal(torch.zeros(D, dtype=DT), covariance_matrix=dyn.F[t]).sample((N,))
            s = dyn.predict(s, a, t) + noise


def test_fit_linear_gaussian_policy(rp) -> None:
    g = torch.Generator().manual_seed(4)
    T, D, d, N = 3, 4, 2, 500
    pol = rp.policy(T, D, d, g)
    S = torch.randn(N, T, D, dtype=DT, generator=g)
    fit = fit_linear_gaussian_policy(S, pol.mean(S), cov=pol.cov, ridge=1e-12)
    torch.testing.assert_close(fit.K, pol.K, atol=1e-8, rtol=0)
    torch.testing.assert_close(fit.k, pol.k, atol=1e-8, rtol=0)
    A = pol.sample(S, None, g)
    fit = fit_linear_gaussian_policy(S, A)
    torch.testing.assert_close(fit.K, pol.K, atol=0.3, rtol=0)
    torch.testing.assert_close(fit.cov, pol.cov, atol=0.4, rtol=0)
