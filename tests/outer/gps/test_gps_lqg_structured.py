"""The LQG's gather form of [A_t B_t] (shift and selection rows, as in the 2016 optimizer MDP)
gives the dense products' results to float tolerance, and is used only where it pays."""

from __future__ import annotations

import pytest
import torch

from l2o.outer.gps import lqg
from l2o.outer.gps.env import LinearGaussianController
from l2o.outer.gps.linear_gaussian import LinearGaussianPolicy, fit_linear_gaussian_policy, forward
from l2o.outer.gps.optimizer_env import OptimizerEnv2016
from l2o.tasks.synthetic import FAMILIES

DT = torch.float64


@pytest.fixture(scope="module")
def problem():
    """A 2016-MDP local problem: two logistic-regression objectives, T = 8, H = 3."""
    fam = FAMILIES["logreg"]()
    env = OptimizerEnv2016([fam.sample("train", 0), fam.sample("train", 1)], horizon=8, history=3)
    T, D, d = env.horizon, env.state_dim, env.action_dim
    K = torch.zeros(T, d, D, dtype=DT)
    g0 = env.n + env.H
    K[:, :, g0:g0 + d] = -0.5 * torch.eye(d, dtype=DT)
    psi = LinearGaussianPolicy(K, torch.zeros(T, d, dtype=DT), 1e-3 * torch.eye(d, dtype=DT).expand(T, d, d).clone())
    g = torch.Generator().manual_seed(0)
    traj = env.rollout(LinearGaussianController(psi, noise=True), 12, g).valid_only()
    dyn, cost = env.local_dynamics(traj), env.local_cost(traj)
    X = traj.states
    mu0 = X[:, 0].mean(0)
    xc = X[:, 0] - mu0
    sigma0 = xc.T @ xc / X.shape[0] + 1e-6 * torch.eye(D, dtype=DT)
    pi_fit = fit_linear_gaussian_policy(X, psi.mean(X) + 0.01 * torch.randn(X.shape[0], T, d, generator=g, dtype=DT),
                                        cov=1e-3 * torch.eye(d, dtype=DT).expand(T, d, d))
    return env, dyn, cost, psi, mu0, sigma0, pi_fit


@pytest.fixture
def dense(monkeypatch):
    """Turns the gather form off (the dense products of before)."""
    def use_dense():
        monkeypatch.setattr(lqg._RowGather, "maybe", classmethod(lambda cls, M: None))
        lqg._STRUCTURE.clear()
    yield use_dense
    lqg._STRUCTURE.clear()


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-9) -> bool:
    return bool(torch.allclose(a, b, rtol=rtol, atol=rtol * float(b.abs().max())))


def test_row_gather_is_the_product():
    g = torch.Generator().manual_seed(1)
    M = torch.zeros(40, 30, dtype=DT)
    M[torch.arange(40), torch.randint(30, (40,), generator=g)] = torch.randn(40, generator=g, dtype=DT)
    M[:5, 3] += 1.0  # some rows with two nonzeros
    M[7] = torch.randn(30, generator=g, dtype=DT)  # and a dense one
    M[9] = 0.0
    op = lqg._RowGather.maybe(M)
    assert op is not None and op.dense_rows.tolist() == [7]
    X = torch.randn(30, 11, generator=g, dtype=DT)
    assert close(op(X), M @ X, 1e-14)
    assert close(op(X[:, 0]), M @ X[:, 0], 1e-14)
    assert lqg._RowGather.maybe(torch.randn(10, 10, generator=g, dtype=DT)) is None  # dense: not used


def test_structure_found_on_the_2016_mdp(problem):
    _, dyn, *_ = problem
    lqg._STRUCTURE.clear()
    AB, st = lqg._structure(dyn)
    assert torch.equal(AB, dyn.AB)
    assert all(s is not None for s in st)
    dense_rows = st[0][0].dense_rows.numel()
    assert dense_rows <= 0.25 * dyn.dim_s


def test_backward_forward_and_dual_match_dense(problem, dense):
    env, dyn, cost, psi, mu0, sigma0, pi_fit = problem
    T, d = env.horizon, env.action_dim
    lam = 0.01 * torch.ones(T, d, dtype=DT)
    kw = dict(lambda_=lam, nu=torch.full((T,), 0.1, dtype=DT), pi_fit=pi_fit)
    lqg._STRUCTURE.clear()
    pol_s, val_s = lqg.solve_fixed_eta(dyn, cost, psi, 3.0, **kw)
    dist_s = lqg._forward(pol_s, dyn, mu0, sigma0)
    dist_n = lqg._forward(pol_s, dyn, mu0, sigma0, joint=False)  # without the joint moments: the same
    assert dist_n.xu_cov is None and torch.equal(dist_n.state_cov, dist_s.state_cov)
    ec_s = lqg.expected_cost(pol_s, dyn, cost, mu0, sigma0)
    tr_s = lqg.solve_trust_region(dyn, cost, psi, mu0, sigma0, 0.5 * T, **kw)
    dense()
    pol_d, val_d = lqg.solve_fixed_eta(dyn, cost, psi, 3.0, **kw)
    dist_d = forward(pol_d, dyn, mu0, sigma0)
    ec_d = lqg.expected_cost(pol_d, dyn, cost, mu0, sigma0)
    tr_d = lqg.solve_trust_region(dyn, cost, psi, mu0, sigma0, 0.5 * T, **kw)
    for a, b in ((pol_s.K, pol_d.K), (pol_s.k, pol_d.k), (pol_s.cov, pol_d.cov), (val_s.Vxx, val_d.Vxx),
                 (val_s.Vx, val_d.Vx), (val_s.Qxuxu, val_d.Qxuxu)):
        assert close(a, b)
    for a, b in zip(dist_s, dist_d):
        assert close(a, b)
    assert close(ec_s, ec_d)
    assert abs(tr_s.eta - tr_d.eta) <= 1e-9 * tr_d.eta and abs(tr_s.kl - tr_d.kl) <= 1e-9 * tr_d.kl
    assert close(tr_s.policy.K, tr_d.policy.K)


def test_dense_dynamics_keep_the_dense_path(problem):
    """Random (dense) dynamics: no gather form, bitwise the products of before."""
    from tests.outer.gps.conftest import random_dynamics
    g = torch.Generator().manual_seed(0)
    dyn = random_dynamics(5, 6, 2, g, noise=0.1)
    assert all(s is None for s in lqg._structure(dyn)[1])
