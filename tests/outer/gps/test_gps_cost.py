"""Quadratic cost model c̃_t(s, a) = ½ xuᵀ C_t xu + d_tᵀ xu + h_t: evaluation and fitting."""

from __future__ import annotations

import math

import pytest
import torch

from l2o.outer.gps import (
    QuadraticCost,
    cost_from_derivatives,
    fit_quadratic_cost,
    fit_quadratic_cost_from_moments,
    project_action_block,
)

DT = torch.float64


def random_quadratic(T: int, n: int, D: int, g: torch.Generator) -> QuadraticCost:
    M = torch.randn(T, n, n, dtype=DT, generator=g)
    return QuadraticCost(M + M.mT, torch.randn(T, n, dtype=DT, generator=g), torch.randn(T, dtype=DT, generator=g), D)


def test_evaluation_and_expectation() -> None:
    g = torch.Generator().manual_seed(20)
    T, D, d = 3, 3, 2
    cost = random_quadratic(T, D + d, D, g)
    s = torch.randn(5, T, D, dtype=DT, generator=g)
    a = torch.randn(5, T, d, dtype=DT, generator=g)
    vals = cost(s, a)
    for t in range(T):
        xu = torch.cat([s[0, t], a[0, t]])
        ref = 0.5 * xu @ cost.C[t] @ xu + cost.d[t] @ xu + cost.h[t]
        torch.testing.assert_close(vals[0, t], ref)
        torch.testing.assert_close(cost(s[:, t], a[:, t], t), vals[:, t])
    # E c̃ under a Gaussian equals the Monte-Carlo mean.
    mu = torch.randn(T, D + d, dtype=DT, generator=g)
    L = torch.randn(T, D + d, D + d, dtype=DT, generator=g) * 0.5
    S = L @ L.mT
    N = 50_000
    xu = mu + (L @ torch.randn(T, D + d, N, dtype=DT, generator=g)).mT.transpose(0, 1)
    mc = cost(xu[..., :D], xu[..., D:])
    se = mc.std(0) / math.sqrt(N)
    assert bool(((mc.mean(0) - cost.expected(mu, S)).abs() < 4 * se).all())


def test_validation_and_algebra() -> None:
    with pytest.raises(ValueError, match=r"^d must"):
        QuadraticCost(torch.zeros(2, 3, 3), torch.zeros(2, 4), torch.zeros(2), 2)
    with pytest.raises(ValueError, match=r"C is not symmetric"):
        QuadraticCost(torch.triu(torch.ones(2, 3, 3)), torch.zeros(2, 3), torch.zeros(2), 2)
    g = torch.Generator().manual_seed(21)
    a, b = random_quadratic(4, 3, 2, g), random_quadratic(4, 3, 2, g)
    s, u = torch.randn(4, 2, dtype=DT), torch.randn(4, 1, dtype=DT)
    torch.testing.assert_close((a + b)(s, u), a(s, u) + b(s, u))
    alpha = torch.rand(4, dtype=DT)
    torch.testing.assert_close(a.scale(alpha)(s, u), alpha * a(s, u))
    blocks = QuadraticCost.from_blocks(a.C[:, :2, :2], a.C[:, 2:, 2:], a.C[:, :2, 2:], a.d[:, :2], a.d[:, 2:], a.h)
    torch.testing.assert_close(blocks.C, a.C)
    torch.testing.assert_close(blocks(s, u), a(s, u))


def test_fit_reproduces_exact_quadratic() -> None:
    """Ridge regression on exact samples of an (indefinite) quadratic recovers C_t, d_t, h_t."""
    g = torch.Generator().manual_seed(22)
    T, D, d, N = 3, 4, 2, 200
    true = random_quadratic(T, D + d, D, g)
    S = 2.0 * torch.randn(N, T, D, dtype=DT, generator=g) + 1.0
    A = torch.randn(N, T, d, dtype=DT, generator=g)
    fit = fit_quadratic_cost(S, A, true(S, A), ridge=1e-12)
    torch.testing.assert_close(fit.C, true.C, atol=1e-7, rtol=0)
    torch.testing.assert_close(fit.d, true.d, atol=1e-7, rtol=0)
    torch.testing.assert_close(fit.h, true.h, atol=1e-7, rtol=0)
    # Zero-weight rows may be garbage; a window pools neighbouring steps of a time-invariant cost,
    # so 10 samples per step (fewer than the 28 features) suffice.
    inv = QuadraticCost(true.C[:1].expand(7, -1, -1), true.d[:1].expand(7, -1), true.h[:1].expand(7), D)
    S, A = torch.randn(12, 7, D, dtype=DT, generator=g), torch.randn(12, 7, d, dtype=DT, generator=g)
    y = inv(S, A)
    S[10:] = math.nan
    y[10:] = math.inf
    w = torch.ones(12)
    w[10:] = 0
    fit = fit_quadratic_cost(S, A, y, weights=w, ridge=1e-12, window=3)
    torch.testing.assert_close(fit.C, inv.C, atol=1e-6, rtol=0)
    torch.testing.assert_close(fit.h, inv.h, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="non-finite"):
        fit_quadratic_cost(S, A, y, ridge=1e-12)


def test_fewer_rows_than_features_is_ridge_solution() -> None:
    """With fewer rows than features the (dual-form) solution equals the primal ridge formula."""
    g = torch.Generator().manual_seed(23)
    D, d, N, ridge = 3, 2, 12, 1e-3
    n = D + d
    S = torch.randn(N, 1, D, dtype=DT, generator=g)
    A = torch.randn(N, 1, d, dtype=DT, generator=g)
    y = torch.randn(N, 1, dtype=DT, generator=g)
    fit = fit_quadratic_cost(S, A, y, ridge=ridge)
    # Reference: centred features, λ = ridge · mean column sum of squares (as documented).
    xu = torch.cat([S[:, 0], A[:, 0]], -1)
    iu = torch.triu_indices(n, n)
    quad = (xu[:, iu[0]] * xu[:, iu[1]]) * torch.where(iu[0] == iu[1], 0.5, 1.0).to(DT)
    X = torch.cat([quad, xu], -1)
    Xc, yc = (X - X.mean(0)) / math.sqrt(N), (y[:, 0] - y.mean()) / math.sqrt(N)
    lam = ridge * float(Xc.square().sum(0).mean())
    beta = torch.linalg.solve(Xc.T @ Xc + lam * torch.eye(X.shape[1], dtype=DT), Xc.T @ yc)
    pred = fit(S, A)[:, 0]
    ref = X @ beta + (y.mean() - X.mean(0) @ beta)
    torch.testing.assert_close(pred, ref, atol=1e-9, rtol=0)


def test_fit_from_group_moments() -> None:
    """Convolutional case (gps.md §5): cost = Σ_j quadratic(xu^j) + h, fitted from S1, S2 sums."""
    g = torch.Generator().manual_seed(24)
    T, D, d, R, J = 2, 2, 1, 80, 6
    true = random_quadratic(T, D + d, D, g)
    xu = torch.randn(R, T, J, D + d, dtype=DT, generator=g)
    per = 0.5 * torch.einsum("rtji,tik,rtjk->rtj", xu, true.C, xu) + torch.einsum("rtji,ti->rtj", xu, true.d)
    y = per.sum(-1) + true.h
    S1 = xu.sum(2)
    S2 = torch.einsum("rtji,rtjk->rtik", xu, xu)
    fit = fit_quadratic_cost_from_moments(S1, S2, y, D, ridge=1e-12)
    torch.testing.assert_close(fit.C, true.C, atol=1e-7, rtol=0)
    torch.testing.assert_close(fit.d, true.d, atol=1e-7, rtol=0)
    torch.testing.assert_close(fit.h, true.h, atol=1e-7, rtol=0)


def test_cost_from_derivatives_and_projection() -> None:
    g = torch.Generator().manual_seed(25)
    T, D, d = 3, 2, 2
    true = random_quadratic(T, D + d, D, g)
    x0 = torch.randn(T, D + d, dtype=DT, generator=g)
    val = true(x0[:, :D], x0[:, D:])
    grad = (true.C @ x0.unsqueeze(-1)).squeeze(-1) + true.d
    approx = cost_from_derivatives(x0, val, grad, true.C, D)
    s, a = torch.randn(9, T, D, dtype=DT, generator=g), torch.randn(9, T, d, dtype=DT, generator=g)
    torch.testing.assert_close(approx(s, a), true(s, a))
    proj = project_action_block(true, 0.3)
    assert float(torch.linalg.eigvalsh(proj.C[:, D:, D:]).min()) >= 0.3 - 1e-12
    torch.testing.assert_close(proj.C[:, :D], true.C[:, :D])
    fit = fit_quadratic_cost(s, a, true(s, a), action_eig_floor=0.3)
    assert float(torch.linalg.eigvalsh(fit.C[:, D:, D:]).min()) >= 0.3 - 1e-12
