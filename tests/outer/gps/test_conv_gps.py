"""Convolutional GPS: rollouts recorded per coordinate group, the per-group cost model, and the
trainer's checkpoint / exact resume."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import pytest
import torch
from torch import Tensor

from l2o.checkpoint import CheckpointError
from l2o.features.conv2017 import observation_features, states
from l2o.outer.gps.conv_env import (
    GRAD_FEATURE,
    GroupLinearGaussianController,
    LSTMController,
    rollout,
)
from l2o.outer.gps.conv_trainer import (
    CHECKPOINT_NAME,
    LOG_NAME,
    POLICY_NAME,
    ConvGPSConfig,
    ConvGPSTrainer,
    initial_psi,
)
from l2o.outer.gps.conv_cost import gradient_shrinkage, telescoped_cost
from l2o.learned import psd
from l2o.tasks.base import Group, Task
from tests.conftest import tiny_mlp_task


class DiagonalQuadratic(Task):
    """f(x) = ½ Σ_g h_g |x_g − 1|² (deterministic): group g has curvature h_g exactly."""

    def __init__(self, curvatures: tuple[float, ...] = (0.5, 2.0), sizes: tuple[int, ...] = (6, 3)) -> None:
        self.name = "diag-quadratic"
        self.groups = tuple(Group(f"g{i}", (n,)) for i, n in enumerate(sizes))
        self.num_examples = 1
        self.batch_size = None
        self.h = curvatures

    def init_params(self, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {g.name: torch.randn(g.shape, generator=gen, dtype=dtype) for g in self.groups}

    def loss(self, params: Mapping[str, Tensor], indices: Tensor | None = None) -> Tensor:
        return sum(0.5 * h * (params[g.name] - 1).square().sum() for h, g in zip(self.h, self.groups)) + 1.0


def _psi(T: int, gain: float, std: float = 1e-3):
    return initial_psi(T, gain, std)


def test_recorded_states_observations_and_actions_match_the_offline_features():
    task = tiny_mlp_task()
    T = 12
    ctrl = GroupLinearGaussianController(task, [_psi(T, 0.5)] * len(task.groups))
    r = rollout(task, ctrl, seed=3, horizon=T, coords_per_group=4, eval_every=5, curvature_every=4,
                return_history=True)
    xs, gs, fs = r.history
    S_all = states(xs[:T], gs[:T], fs[:T])  # [T, n, 77]
    O_all = observation_features(xs[:T], gs[:T], fs[:T])
    start = 0
    for gi, g in enumerate(task.groups):
        idx = r.coords[gi] + start
        torch.testing.assert_close(r.states[gi], S_all[:, idx])
        torch.testing.assert_close(r.observations[gi], O_all[:, idx])
        torch.testing.assert_close(r.actions[gi], (xs[1:] - xs[:-1])[:, idx], rtol=0, atol=1e-6)
        start += g.numel
    # the true objective is recorded at the evaluation steps, and x_T is the last iterate
    assert r.eval_steps.tolist() == [0, 5, 10, 12]
    assert r.true_loss[0] == pytest.approx(task.true_loss(task.init_params(3)))
    assert not r.diverged


def test_psi_acts_per_group_with_a_shared_gain():
    task = DiagonalQuadratic()
    T = 5
    pols = [_psi(T, 0.3, 1e-12), _psi(T, 0.7, 1e-12)]
    r = rollout(task, GroupLinearGaussianController(task, pols, noise=False), 0, T, 10, return_history=True)
    xs, gs, fs = r.history
    S = states(xs[:T], gs[:T], fs[:T])
    for gi, (sl, gain) in enumerate(((slice(0, 6), 0.3), (slice(6, 9), 0.7))):
        torch.testing.assert_close(xs[1:, sl] - xs[:-1, sl], -gain * S[:, sl, GRAD_FEATURE], rtol=1e-5, atol=1e-7)


def test_curvature_along_the_step_is_the_groups_exact_curvature():
    task = DiagonalQuadratic(curvatures=(0.5, 2.0))
    T = 6
    r = rollout(task, GroupLinearGaussianController(task, [_psi(T, 0.4, 0.1)] * 2), 1, T, 10, curvature_every=2)
    assert r.curvature.shape == (3, 2)
    torch.testing.assert_close(r.curvature, torch.tensor([[0.5, 2.0]] * 3, dtype=torch.float64), rtol=1e-5, atol=0)


def test_gradient_moments_with_a_standing_iterate():
    """Zero steps: ḡ = g at every t, so Φ2_0 = g/(|g|+1) and the moments follow in closed form."""
    task = DiagonalQuadratic()
    T = 4
    zero = initial_psi(T, 1e-30, 1e-30)
    r = rollout(task, GroupLinearGaussianController(task, [zero, zero], noise=False), 2, T, 10, eval_every=2)
    x0 = torch.cat([v.reshape(-1) for v in task.init_params(2).values()]).double()
    g = torch.cat([0.5 * (x0[:6] - 1), 2.0 * (x0[6:] - 1)])
    feat = g / (g.abs() + 1)
    for gi, sl in enumerate((slice(0, 6), slice(6, 9))):
        expected = torch.tensor([float((g[sl] * feat[sl]).sum()), float(feat[sl].square().sum())], dtype=torch.float64)
        torch.testing.assert_close(r.grad_moments[0, gi], expected, rtol=1e-5, atol=1e-8)
    rho = gradient_shrinkage([r], 0, T)
    assert rho.shape == (T,)
    # ρ = Σ g·g/(|g|+1) / Σ (g/(|g|+1))² ≥ 1 here, clipped to 1
    assert torch.all(rho == 1.0)


def test_telescoped_cost_is_exact_on_a_one_dimensional_quadratic():
    """With Φ2_0 replaced by the exact gradient (ρ = 1), Σ_t c̃_t(s_t, a_t) + T f(x_0) = Σ_t f(x_t)."""
    T, h = 7, 1.7
    cost = telescoped_cost(torch.full((T,), h, dtype=torch.float64), T)
    gen = torch.Generator().manual_seed(0)
    x = [torch.randn((), generator=gen, dtype=torch.float64)]
    a = torch.randn(T, generator=gen, dtype=torch.float64)
    for t in range(T - 1):
        x.append(x[-1] + a[t])
    f = [0.5 * h * xi**2 for xi in x]
    total = T * f[0]
    for t in range(T):
        s = torch.zeros(77, dtype=torch.float64)
        s[GRAD_FEATURE] = h * x[t]  # the exact gradient
        total = total + cost(s, a[t : t + 1], t)
    assert float(total) == pytest.approx(float(sum(f)), rel=1e-12)


def test_telescoped_cost_rejects_bad_curvature():
    with pytest.raises(ValueError, match="curvature"):
        telescoped_cost(torch.tensor([1.0, -1.0]), 2)
    with pytest.raises(ValueError, match="rho"):
        telescoped_cost(torch.ones(2), 2, rho=torch.tensor([math.nan, 1.0]))


def test_lstm_controller_rollout_matches_the_policy_on_offline_features():
    task = tiny_mlp_task()
    net = psd.init_net(1)
    net["W_out"] = torch.randn(1, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    T = 8
    r = rollout(task, LSTMController(net), 4, T, 3, record_states=False, return_history=True)
    xs, gs, fs = r.history
    steps, _ = psd.run_sequence(net, observation_features(xs[:T], gs[:T], fs[:T]))
    torch.testing.assert_close(xs[1:] - xs[:-1], steps, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- trainer
def _config(**kw) -> ConvGPSConfig:
    base = dict(task="tiny", horizon=10, iterations=2, samples=2, coords_per_group=4, pi_steps=2, pi_first_steps=3,
                pi_batch=8, eval_every=5, curvature_every=3, eval_seeds=1)
    base.update(kw)
    return ConvGPSConfig(**base)


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="bogus"):
        ConvGPSConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="samples"):
        ConvGPSConfig(samples=1)
    with pytest.raises(ValueError, match="epsilon"):
        ConvGPSConfig(epsilon=5.0, epsilon_max=1.0)
    with pytest.raises(ValueError, match="horizon"):
        ConvGPSConfig(horizon="400")  # type: ignore[arg-type]


def test_trainer_runs_logs_and_saves_a_loadable_policy(tmp_path):
    tr = ConvGPSTrainer(_config(), tmp_path, task=tiny_mlp_task(), progress=False)
    log = tr.train()
    assert [r["iteration"] for r in log] == [0, 1]
    for r in log:
        assert math.isfinite(r["psi_auc"]) and r["pi_auc"] is not None and math.isfinite(r["pi_auc"])
        assert len(r["groups"]) == 4 and all("kl_psi_pi" in g for g in r["groups"])
        assert math.isfinite(r["pi_regression_rel_rmse"])
    lines = (tmp_path / LOG_NAME).read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == [0, 1]
    _net, meta = psd.load_policy(tmp_path / POLICY_NAME)
    assert meta["training"]["config"]["horizon"] == 10
    assert meta["training"]["heldout_auc"] == pytest.approx(min(r["pi_auc"] for r in log))


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tmp_path):
    task = tiny_mlp_task()
    full = ConvGPSTrainer(_config(iterations=3), tmp_path / "full", task=task, progress=False)
    full.train()
    part = ConvGPSTrainer(_config(iterations=1), tmp_path / "part", task=task, progress=False)
    part.train()
    # "kill" after iteration 1: a fresh process object continues from the checkpoint
    resumed = ConvGPSTrainer(_config(iterations=3), tmp_path / "part", task=task, progress=False)
    resumed.train()
    for k in psd.NET_KEYS:
        assert torch.equal(full.net[k], resumed.net[k]), k
    for a, b in zip(full.groups, resumed.groups):
        assert torch.equal(a.psi.K, b.psi.K) and torch.equal(a.lam, b.lam) and torch.equal(a.nu, b.nu)
    strip = lambda log: [{k: v for k, v in r.items() if k != "wall_s"} for r in log]
    assert strip(full.log) == strip(resumed.log)


def test_resume_refuses_a_different_config_and_a_tampered_checkpoint(tmp_path):
    task = tiny_mlp_task()
    ConvGPSTrainer(_config(iterations=1), tmp_path, task=task, progress=False).train()
    with pytest.raises(CheckpointError, match="different config"):
        ConvGPSTrainer(_config(iterations=2, samples=3), tmp_path, task=task, progress=False).train()
    path = tmp_path / CHECKPOINT_NAME
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        ConvGPSTrainer(_config(iterations=2), tmp_path, task=task, progress=False).train()


def test_curvature_along_the_mean_action_ignores_the_exploration_noise():
    """On f = ½ Σ h_j x_j², h_{g,0} along ψ's mean step m is Σ h m² / Σ m² exactly, whatever the
    exploration noise; along the noisy step taken it is not."""
    from l2o.tasks.quadratic import SeparableQuadratic

    task = SeparableQuadratic(dim=50, h_min=0.1, h_max=1.0)
    psi = initial_psi(3, 0.5, 0.3)
    x0, h = task.init_params(4)["x"].double(), task.h
    # ψ acts on the paper state's Φ2_0 = g/(|g|+1) (t = 0): the mean step is −0.5·g/(|g|+1)
    g = h * x0
    m = g / (g.abs() + 1)
    expected = float((h * m ** 2).sum() / (m ** 2).sum())
    ctrl = GroupLinearGaussianController(task, [psi])
    mean = rollout(task, ctrl, 4, 3, 5, curvature_every=1, curvature_along="mean")
    step = rollout(task, ctrl, 4, 3, 5, curvature_every=1, curvature_along="step")
    assert float(mean.curvature[0, 0]) == pytest.approx(expected, rel=1e-5)
    assert abs(float(step.curvature[0, 0]) - expected) > 1e-3 * expected
    with pytest.raises(ValueError, match="curvature_along"):
        rollout(task, ctrl, 4, 3, 5, curvature_along="sideways")


def test_curvature_on_an_independent_batch_is_that_batchs_hessian_along_the_step():
    """curvature_batch='independent': h_{g,0} = a_gᵀ(Ĥ_B a)_g / a_gᵀa_g for the batch B drawn by the
    rollout's own curvature generator, not the batch the step came from."""
    from l2o.tasks.base import unflatten

    task = tiny_mlp_task()
    T, seed = 2, 3
    ctrl = GroupLinearGaussianController(task, [_psi(T, 0.5, 1e-12)] * len(task.groups), noise=False)
    same = rollout(task, ctrl, seed, T, 4, curvature_every=1, return_history=True)
    indep = rollout(task, ctrl, seed, T, 4, curvature_every=1, curvature_batch="independent", return_history=True)
    xs = indep.history[0]
    torch.testing.assert_close(xs, same.history[0])  # the trajectory itself is unchanged
    a = xs[1] - xs[0]
    x0 = xs[0].clone().requires_grad_(True)
    batch = task.sample_batch(torch.Generator().manual_seed(4_000_003 + seed))
    (g,) = torch.autograd.grad(task.loss(unflatten(x0, task.groups), batch), x0, create_graph=True)
    (hv,) = torch.autograd.grad(g, x0, grad_outputs=a)
    start = 0
    for gi, grp in enumerate(task.groups):
        s = slice(start, start + grp.numel)
        expected = float((a[s] * hv[s]).sum() / a[s].square().sum())
        assert float(indep.curvature[0, gi]) == pytest.approx(expected, rel=1e-4, abs=1e-6)
        start += grp.numel
    assert not torch.allclose(indep.curvature, same.curvature)
    with pytest.raises(ValueError, match="curvature_batch"):
        ConvGPSConfig(curvature_batch="other")


def test_an_unknown_initial_direction_is_named(tmp_path):
    cfg = ConvGPSConfig(horizon=4, iterations=1, samples=2, coords_per_group=2, init_direction="adagard")
    with pytest.raises(ValueError, match="init_direction: 'adagard' is not a state feature"):
        ConvGPSTrainer(cfg, tmp_path / "run", task=tiny_mlp_task(), progress=False)


def test_preconditioned_curvature_makes_the_cost_exact_for_the_step():
    """precondition = "adam": κ_{g,t} = a_gᵀH a_g / Σ_j p_j² a_j², so ½κ Σ_j u_j² = ½ a_gᵀH a_g; on
    f = ½ Σ_g h_g |x_g − 1|², a_gᵀH a_g = h_g |a_g|²."""
    task = DiagonalQuadratic(curvatures=(0.5, 2.0))
    T = 6
    psi = initial_psi(T, 0.4, 0.1, state_dim=78)
    r = rollout(task, GroupLinearGaussianController(task, [psi] * 2), 1, T, 10, curvature_every=2,
                return_history=True, precondition="adam")
    xs, gs, _ = r.history
    v = torch.zeros_like(gs[0])
    for k, t in enumerate(range(T)):
        v = 0.999 * v + 0.001 * gs[t] * gs[t]
        if t % 2:
            continue
        p = ((v / (1 - 0.999 ** (t + 1))).sqrt() + 1e-8).sqrt()
        a = xs[t + 1] - xs[t]
        for gi, (sl, h) in enumerate(((slice(0, 6), 0.5), (slice(6, 9), 2.0))):
            expected = h * float(a[sl].square().sum()) / float((p[sl] * a[sl]).square().sum())
            assert float(r.curvature[t // 2, gi]) == pytest.approx(expected, rel=1e-4)


def test_preconditioned_conv_gps_regresses_pi_in_the_optimizers_action_space(tmp_path):
    """A short preconditioned run: s' has D + 1 numbers, and π's mean in ψ's space is p·μ^π(Ψ)."""
    cfg = ConvGPSConfig(horizon=8, iterations=1, samples=3, coords_per_group=3, pi_steps=0, pi_first_steps=3,
                        eval_every=4, curvature_every=4, features="scale-free", init_direction="adagrad",
                        init_gain=0.1, precondition="adam", psi_step_failure="keep", epsilon_min_gain=0.0)
    tr = ConvGPSTrainer(cfg, tmp_path / "run", task=tiny_mlp_task(), progress=False)
    (rec,) = tr.train()
    assert tr.setting.D == 11 and rec["psi_auc"] > 0
    gen = torch.Generator().manual_seed(0)  # own draws: the global generator's state depends on earlier tests
    O = torch.randn(4, 8, 13, generator=gen)
    Pc = torch.rand(4, 8, 1, dtype=torch.float64, generator=gen) + 0.5
    mu = psd.run_sequence(tr.net, O.transpose(0, 1))[0].T.to(torch.float64).unsqueeze(-1)  # μ^π(Ψ) in a
    torch.testing.assert_close(tr.setting.pi_mean((O, Pc)), mu * Pc)
    with pytest.raises(ValueError, match="precondition"):
        ConvGPSConfig(precondition="rmsprop")
    # The π-step takes ψ's targets in u: targets equal to π's own mean in u are already fitted
    # (pi_steps = 0 after iteration 0: fit_pi returns the weighted relative error of the current π).
    from types import SimpleNamespace

    probs = [SimpleNamespace(obs=(O, Pc)), SimpleNamespace(obs=(O[:2], Pc[:2] * 3))]
    targets = [tr.setting.pi_mean(p.obs) for p in probs]
    weights = [torch.ones(8, 1, 1, dtype=torch.float64)] * 2
    assert tr.setting.fit_pi(1, probs, targets, weights) < 1e-5
    a_space = [y / p.obs[1] for y, p in zip(targets, probs)]  # π's mean in a, not u = p·a
    assert tr.setting.fit_pi(1, probs, a_space, weights) > 1e-2  # a-space targets are not (here: 1.05)


def test_discounted_telescoped_weights_are_geometric_sums():
    T, gamma = 6, 0.7
    cost = telescoped_cost(torch.ones(T, dtype=torch.float64), T, discount=gamma)
    w = torch.tensor([sum(gamma ** k for k in range(T - 1 - t)) for t in range(T)], dtype=torch.float64)
    torch.testing.assert_close(cost.C[:, 77, 77], w)
    torch.testing.assert_close(telescoped_cost(torch.ones(T, dtype=torch.float64), T, discount=1.0).C[:, 77, 77],
                               torch.arange(T - 1, -1, -1, dtype=torch.float64))
    with pytest.raises(ValueError, match="discount"):
        telescoped_cost(torch.ones(T, dtype=torch.float64), T, discount=0.0)
    with pytest.raises(ValueError, match="cost_discount"):
        ConvGPSConfig(cost_discount=1.5)
