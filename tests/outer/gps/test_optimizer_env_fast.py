"""The 2016 MDP's local models after the speed-ups of issue 14 are the models of before: the
Hessians in one vmap per objective (summed in sample order) to float tolerance (vmap over
samples may round differently: bitwise equal on the small nets here, not on logistic regression),
and given those, the dynamics without the eigenvalue check of F_t and the cost model without
re-validation bitwise."""

from __future__ import annotations

import pytest
import torch

from l2o.outer.gps.cost import QuadraticCost
from l2o.outer.gps.env import LinearGaussianController
from l2o.outer.gps.linear_gaussian import LinearGaussianDynamics, LinearGaussianPolicy
from l2o.outer.gps.optimizer_env import OptimizerEnv2016
from l2o.tasks.base import Task, unflatten
from l2o.tasks.synthetic import FAMILIES

DT = torch.float64


def _env_and_samples(family: str, n_tasks: int):
    fam = FAMILIES[family]()
    env = OptimizerEnv2016([fam.sample("train", i) for i in range(n_tasks)], horizon=7, history=3)
    T, D, d = env.horizon, env.state_dim, env.action_dim
    K = torch.zeros(T, d, D, dtype=DT)
    g0 = env.n + env.H
    K[:, :, g0:g0 + d] = -0.3 * torch.eye(d, dtype=DT)
    psi = LinearGaussianPolicy(K, torch.zeros(T, d, dtype=DT), 1e-3 * torch.eye(d, dtype=DT).expand(T, d, d).clone())
    traj = env.rollout(LinearGaussianController(psi, noise=True), 9, torch.Generator().manual_seed(3)).valid_only()
    return env, traj


def _reference_hessians(env: OptimizerEnv2016, traj) -> torch.Tensor:
    """The per-sample loop of before."""
    out = torch.zeros(env.horizon, env.n, env.n, dtype=DT)
    rows = [j for j in range(traj.n) if traj.valid[j]]
    for j in rows:
        task = env.tasks[int(traj.task_index[j])]

        def f(v: torch.Tensor, task: Task = task) -> torch.Tensor:
            return task.loss(unflatten(v, task.groups))

        out += torch.func.vmap(torch.func.hessian(f))(traj.states[j, :, : env.n])
    out /= len(rows)
    return 0.5 * (out + out.transpose(1, 2))


@pytest.mark.parametrize("family,n_tasks", [("smallnet", 1), ("smallnet", 3), ("logreg", 4)])
def test_models_bitwise_as_before(family: str, n_tasks: int) -> None:
    env, traj = _env_and_samples(family, n_tasks)
    H, ref = env._mean_hessians(traj), _reference_hessians(env, traj)
    assert torch.allclose(H, ref, rtol=1e-12, atol=1e-14 * float(ref.abs().max()))
    dyn = env.local_dynamics(traj)
    checked = LinearGaussianDynamics(dyn.A, dyn.B, dyn.c, dyn.F)  # the validating constructor
    for a, b in ((dyn.A, checked.A), (dyn.B, checked.B), (dyn.c, checked.c), (dyn.F, checked.F)):
        assert torch.equal(a, b)
    cost = env.local_cost(traj)
    checked = QuadraticCost(cost.C, cost.d, cost.h, cost.dim_s)
    assert torch.equal(cost.C, checked.C) and torch.equal(cost.d, checked.d) and torch.equal(cost.h, checked.h)


def test_non_finite_dynamics_are_refused() -> None:
    from l2o.outer.gps.optimizer_env import _dynamics

    A = torch.zeros(2, 3, 3, dtype=DT)
    B = torch.zeros(2, 3, 1, dtype=DT)
    c = torch.zeros(2, 3, dtype=DT)
    F = torch.eye(3, dtype=DT).expand(2, 3, 3).clone()
    _dynamics(A, B, c, F)
    c[1, 0] = float("nan")
    with pytest.raises(ValueError, match="c contains non-finite"):
        _dynamics(A, B, c, F)
