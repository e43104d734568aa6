"""Convolutional GPS with mlp-lopt's MLP as π (issue 12's GPS × MLP cell): the recorded inputs and
the rollout controller are exactly mlp-lopt's optimizer, π₀ is exactly ψ₀ = AdaGrad, and a short
run exports a checkpoint the ``mlp-lopt`` optimizer loads."""

from __future__ import annotations

import pytest
import torch

from l2o.learned import mlp_lopt
from l2o.outer.gps.conv_env import rollout
from l2o.outer.gps.conv_policies import MLPController, MLPLOptFeatures
from l2o.outer.gps.conv_trainer import ConvGPSConfig, ConvGPSTrainer
from l2o.tasks.base import flatten, unflatten
from tests.conftest import tiny_mlp_task


def _theta(hidden: int = 8) -> tuple[dict[str, torch.Tensor], mlp_lopt.MLPLOptArch]:
    """A θ whose every part acts: mixed directions, a schedule, a non-zero MLP output."""
    arch = mlp_lopt.MLPLOptArch(hidden=hidden)
    theta = mlp_lopt.init_theta(arch, seed=3)
    g = torch.Generator().manual_seed(5)
    theta["u"] = torch.tensor([0.6, 0.2, 0.3, 0.0, -0.1, 0.1, 0.05])
    theta["c"] = torch.tensor([0.1, -0.3, 0.2, 0.1])
    theta["W2"] = torch.randn(hidden, 2, generator=g) * 0.5
    theta["b2"] = torch.tensor([0.1, -0.2])
    return theta, arch


def test_rollout_under_the_mlp_controller_is_the_mlp_lopt_optimizer():
    """The features Conv-GPS records (per-tensor RMS included) and the controller acting on them give
    the iterates of ``MLPLOpt`` on the same mini-batches, so the π GPS regresses is the π that ships."""
    task = tiny_mlp_task()
    theta, arch = _theta()
    features = MLPLOptFeatures([g.numel for g in task.groups])
    T = 12
    r = rollout(task, MLPController(theta, arch), seed=4, horizon=T, coords_per_group=2, record_states=False,
                return_history=True, features=features)
    xs = r.history[0]
    params = {k: v.clone().requires_grad_(True) for k, v in task.init_params(4).items()}
    opt = mlp_lopt.MLPLOpt([params[g.name] for g in task.groups], theta=theta, arch=arch)
    batches = torch.Generator().manual_seed(1_000_003 + 4)  # the rollout's mini-batch generator
    for t in range(T):
        x = flatten({k: v.detach() for k, v in params.items()}, task.groups)
        torch.testing.assert_close(x, xs[t], rtol=1e-5, atol=1e-6)
        opt.zero_grad()
        task.loss(params, task.sample_batch(batches)).backward()
        opt.step()
    moved = (xs[T] - xs[0]).abs().max()
    assert moved > 1e-3
    torch.testing.assert_close(flatten({k: v.detach() for k, v in params.items()}, task.groups), xs[T],
                               rtol=1e-5, atol=1e-6)
    # a per-tensor statistic: the same gradients split into other tensors give other inputs
    g = torch.arange(1.0, 10.0)
    acc = mlp_lopt.update_state({k: torch.rand(9, generator=torch.Generator().manual_seed(i)) * 10
                                 for i, k in enumerate(mlp_lopt.STATE_KEYS)}, g)
    a = mlp_lopt.inputs(acc, g, torch.tensor(3.0), [9])
    b = mlp_lopt.inputs(acc, g, torch.tensor(3.0), [3, 6])
    assert not torch.allclose(a[:, 7:15], b[:, 7:15]) and torch.equal(a[:, :7], b[:, :7])
    assert unflatten(xs[T], task.groups).keys() == params.keys()


def _config(**kw) -> ConvGPSConfig:
    base = dict(horizon=10, iterations=2, samples=3, coords_per_group=4, pi_steps=5, pi_first_steps=10,
                eval_every=5, curvature_every=5, policy="mlp-lopt", features="mlp-lopt", mlp_hidden=8,
                init_direction="adagrad", init_gain=0.1, noise_floor=0.3, psi_step_failure="keep",
                epsilon_min_gain=0.0)
    return ConvGPSConfig(**{**base, **kw})


def test_pi0_is_psi0_adagrad_and_a_short_run_exports_a_loadable_mlp_lopt(tmp_path):
    task = tiny_mlp_task()
    tr = ConvGPSTrainer(_config(), tmp_path / "run", task=task, progress=False)
    s = tr.setting
    assert s.pi_ready  # θ₀ is AdaGrad, not a placeholder: BADMM ties ψ to it from iteration 0
    (cd,) = s.initial_conditions()
    (batch,) = s.sample(0, [cd])
    for u, prob in zip(cd.units, batch.problems):
        pi, psi = s.pi_mean(prob.obs), u.psi.mean(prob.X)
        assert psi.abs().max() > 0
        # π₀ = AdaGrad(lr 0.1) = ψ₀'s mean on ψ₀'s own samples, to float32 rounding
        torch.testing.assert_close(pi, psi, rtol=1e-4, atol=1e-7 * float(psi.abs().max()))
    tr.train(stop_after=1)  # iteration 0 always exports its π (the best so far)
    path = tmp_path / "run" / "mlp-lopt.safetensors"
    theta, arch, meta = mlp_lopt.load_policy(path)
    assert arch.hidden == 8 and "Convolutional GPS" in meta["info"]["method"]
    for k, v in theta.items():
        torch.testing.assert_close(v, tr.net[k], rtol=0, atol=0)
    assert not torch.equal(theta["W2"], torch.zeros_like(theta["W2"]))  # the π-step moved θ off θ₀
    log = tr.train()  # continues from the checkpoint
    assert len(log) == 2 and all(r["pi_auc"] is not None and r["psi_auc"] > 0 for r in log)
    w = torch.nn.Parameter(torch.ones(3))
    opt = mlp_lopt.MLPLOpt([w], checkpoint=path)
    w.grad = torch.tensor([1.0, -2.0, 0.5])
    opt.step()
    assert torch.isfinite(w).all() and not torch.equal(w.detach(), torch.ones(3))


def test_policy_and_feature_set_go_together():
    with pytest.raises(ValueError, match="go together"):
        ConvGPSConfig(policy="mlp-lopt", features="scale-free")
    with pytest.raises(ValueError, match="go together"):
        ConvGPSConfig(policy="psd", features="mlp-lopt")
    with pytest.raises(ValueError, match="mlp_hidden"):
        _config(mlp_hidden=33)
    with pytest.raises(ValueError, match="policy"):
        ConvGPSConfig(policy="lstm")


def test_the_shipped_gps_mlp_config_loads():
    from pathlib import Path

    cfg = ConvGPSConfig.from_file(Path(__file__).resolve().parents[3] / "configs" / "mlp-lopt-gps.toml")
    assert (cfg.policy, cfg.features, cfg.mlp_hidden, cfg.init_direction) == ("mlp-lopt", "mlp-lopt", 16, "adagrad")
