"""The 2016 history features, the optimizer MDP built on them, and the 2016 policy network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from l2o.features.history2016 import HistoryTracker, feature_dim, history_features
from l2o.outer.meta_gps2016 import gradient_descent_psi
from l2o.outer.gps.env import LinearGaussianController
from l2o.outer.gps.linear_gaussian import LinearGaussianPolicy
from l2o.outer.gps.optimizer_env import OptimizerEnv2016
from l2o.learned.lto2016 import MLPPolicy2016
from l2o.tasks import FAMILIES, Group, Task, flatten, unflatten


def _reference(x, g, f, t, H):
    n = x.shape[1]
    dobj = [f[t] - f[t - i] if t - i >= 0 else 0.0 for i in range(1, H + 1)]
    grads = [g[t - i] if t - i >= 0 else np.zeros(n) for i in range(H)]
    steps = [x[t - i] - x[t - i - 1] if t - i - 1 >= 0 else np.zeros(n) for i in range(H)]
    return np.concatenate([dobj, np.concatenate(grads), np.concatenate(steps)])


def test_history_features_match_reference_and_online_tracker():
    rng = np.random.default_rng(0)
    T, n, H = 12, 3, 5
    x, g, f = rng.normal(size=(T + 1, n)), rng.normal(size=(T + 1, n)), rng.normal(size=T + 1)
    feats = history_features(torch.tensor(x), torch.tensor(g), torch.tensor(f), H)
    assert feats.shape == (T + 1, feature_dim(n, H))
    tracker = HistoryTracker(n, H)
    for t in range(T + 1):
        np.testing.assert_allclose(feats[t].numpy(), _reference(x, g, f, t, H), atol=1e-15)
        online = tracker.update(torch.tensor(x[t]), torch.tensor(g[t]), float(f[t]))
        np.testing.assert_allclose(online.numpy(), feats[t].numpy(), atol=1e-15)
        if t == 6:  # a tracker restored from its state continues identically
            clone = HistoryTracker(n, H)
            clone.load_state_dict(tracker.state_dict())
    for t in range(7, T + 1):
        torch.testing.assert_close(clone.update(torch.tensor(x[t]), torch.tensor(g[t]), float(f[t])), feats[t])


def _gd_policy(env: OptimizerEnv2016, lr: float) -> LinearGaussianPolicy:
    """ψ = gradient descent with step ``lr`` (the driver's ψ₀), with small exploration noise."""
    return gradient_descent_psi(env, lr, 1e-4)


def test_a_gradient_descent_psi_reproduces_gradient_descent_in_the_mdp():
    fam = FAMILIES["logreg"]()
    tasks = [fam.sample("train", i) for i in range(3)]
    env = OptimizerEnv2016(tasks, horizon=10, history=4)
    assert env.state_dim == env.n + feature_dim(env.n, 4)
    traj = env.rollout(LinearGaussianController(_gd_policy(env, 0.5), noise=False), 4, torch.Generator().manual_seed(0))
    assert traj.n_valid == 4
    for j in range(4):
        task = tasks[int(traj.task_index[j])]
        x = traj.states[j, 0, : env.n].clone()
        for t in range(10):
            torch.testing.assert_close(traj.states[j, t, : env.n], x)
            assert float(traj.costs[j, t]) == pytest.approx(float(task.loss(unflatten(x, task.groups))), rel=1e-12)
            g = flatten(torch.func.grad(task.loss)(unflatten(x, task.groups)), task.groups)
            x = x - 0.5 * g
        torch.testing.assert_close(traj.observations[j], traj.states[j, :, env.n:])


class _Quadratic(Task):
    """f(x) = ½ xᵀAx + bᵀx + 3, one group; the telescoped cost model is exact for it."""

    def __init__(self, A, b):
        self.A, self.b = A, b
        self.name, self.groups, self.num_examples, self.batch_size = "quad", (Group("x", (b.numel(),)),), 1, None

    def init_params(self, seed, dtype=torch.float64):
        return {"x": torch.randn(self.b.numel(), generator=torch.Generator().manual_seed(seed), dtype=dtype)}

    def loss(self, params, indices=None):
        x = params["x"]
        return 0.5 * x @ self.A @ x + self.b @ x + 3.0


def test_local_cost_sums_to_the_true_total_cost_on_quadratics():
    rng = np.random.default_rng(0)
    tasks = []
    for _ in range(3):  # objectives with different minimisers, same curvature
        M = torch.tensor(rng.normal(size=(4, 4)))
        tasks.append(_Quadratic(M @ M.T / 4 + 0.1 * torch.eye(4, dtype=torch.float64), torch.tensor(rng.normal(size=4))))
    for t in tasks[1:]:
        t.A = tasks[0].A
    env = OptimizerEnv2016(tasks, horizon=8, history=3)
    policy = _gd_policy(env, 0.3)
    traj = env.rollout(LinearGaussianController(policy, noise=True), 5, torch.Generator().manual_seed(1))
    cost = env.local_cost(traj)
    for j in range(5):
        total = 0.0
        for t in range(8):
            xu = torch.cat([traj.states[j, t], traj.actions[j, t]])
            total += float(0.5 * xu @ cost.C[t] @ xu + cost.d[t] @ xu + cost.h[t])
        total += float(traj.costs[j, 0]) * 8 - 8 * float(traj.costs[:, 0].mean())  # h_0 uses the mean start
        assert total == pytest.approx(float(traj.costs[j].sum()), rel=1e-10)
    for t in range(8):
        assert torch.linalg.eigvalsh(cost.C[t, env.state_dim:, env.state_dim:]).min() >= -1e-12


def test_diverging_runs_are_marked_invalid():
    task = FAMILIES["smallnet"]().sample("train", 0)
    env = OptimizerEnv2016([task], horizon=8, history=2, max_abs_iterate=1e3)
    traj = env.rollout(LinearGaussianController(_gd_policy(env, -1e4), noise=False), 2, torch.Generator().manual_seed(0))
    assert traj.n_diverged == 2


def test_environment_rejects_mixed_dimensions():
    with pytest.raises(ValueError, match="same number of coordinates"):
        OptimizerEnv2016([FAMILIES["logreg"]().sample("train", 0), FAMILIES["smallnet"]().sample("train", 0)])


def test_mlp_policy_shapes_and_errors():
    pi = MLPPolicy2016(obs_dim=10, action_dim=4)
    assert pi(torch.zeros(7, 10)).shape == (7, 4)
    assert sum(p.numel() for p in pi.parameters()) == 10 * 50 + 50 + 50 * 4 + 4
    with pytest.raises(ValueError, match="10 features"):
        pi(torch.zeros(3, 9))


def test_learned_optimizer_2016_steps_by_its_policy_and_round_trips(tmp_path):
    from l2o.learned.lto2016 import LearnedOptimizer2016, save_policy

    task = FAMILIES["logreg"]().sample("test", 0)
    H = 3
    pi = MLPPolicy2016(feature_dim(task.dim, H), task.dim, seed=1)
    path = save_policy(tmp_path / "p.safetensors", pi, H, {"family": "logreg"})
    params = {k: v.requires_grad_(True) for k, v in task.init_params(0, torch.float64).items()}
    opt = LearnedOptimizer2016([params[g.name] for g in task.groups], path)
    tracker = HistoryTracker(task.dim, H)

    def closure():
        opt.zero_grad()
        loss = task.loss(params)
        loss.backward()
        return loss

    for t in range(6):
        x = flatten({k: v.detach() for k, v in params.items()}, task.groups)
        f, g = float(task.loss(params).detach()), flatten(torch.func.grad(task.loss)({k: v.detach() for k, v in params.items()}), task.groups)
        expected = x + pi(tracker.update(x, g, f).unsqueeze(0))[0].detach()
        opt.step(closure)
        torch.testing.assert_close(flatten({k: v.detach() for k, v in params.items()}, task.groups), expected)
        if t == 2:
            saved = opt.state_dict()
            snapshot = {k: v.detach().clone() for k, v in params.items()}
    after = {k: v.detach().clone() for k, v in params.items()}
    params2 = {k: v.clone().requires_grad_(True) for k, v in snapshot.items()}
    opt2 = LearnedOptimizer2016([params2[g.name] for g in task.groups], path)
    opt2.load_state_dict(saved)

    def closure2():
        opt2.zero_grad()
        loss = task.loss(params2)
        loss.backward()
        return loss

    for _ in range(3):
        opt2.step(closure2)
    for k in after:
        torch.testing.assert_close(params2[k].detach(), after[k])
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    wrong = FAMILIES["smallnet"]().sample("test", 0)
    with pytest.raises(ValueError, match="coordinates"):
        LearnedOptimizer2016(list(wrong.init_params(0).values()), path)


def test_local_dynamics_are_exact_on_a_single_quadratic_objective():
    rng = np.random.default_rng(1)
    M = torch.tensor(rng.normal(size=(3, 3)))
    task = _Quadratic(M @ M.T / 3 + 0.2 * torch.eye(3, dtype=torch.float64), torch.tensor(rng.normal(size=3)))
    env = OptimizerEnv2016([task], horizon=7, history=3)
    traj = env.rollout(LinearGaussianController(_gd_policy(env, 0.2), noise=True), 6, torch.Generator().manual_seed(2))
    dyn = env.local_dynamics(traj)
    assert dyn.A.shape == (6, env.state_dim, env.state_dim)
    obj = slice(env.n, env.n + env.H)  # objective changes: bilinear in (g, a), linearised at the means
    other = torch.ones(env.state_dim, dtype=torch.bool)
    other[obj] = False
    for t in range(6):
        pred = traj.states[:, t] @ dyn.A[t].T + traj.actions[:, t] @ dyn.B[t].T + dyn.c[t]
        # Every block but the objective changes is exact per sample (x, shifts, g + H a) ...
        torch.testing.assert_close(pred[:, other], traj.states[:, t + 1, other], rtol=1e-9, atol=1e-9)
        assert float(dyn.F[t][other][:, other].trace()) < 1e-6
        # ... and the objective changes are exact in the mean over samples.
        torch.testing.assert_close(pred[:, obj].mean(0), traj.states[:, t + 1, obj].mean(0), rtol=1e-9, atol=1e-9)
