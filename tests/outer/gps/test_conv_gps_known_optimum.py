"""Convolutional GPS learns: on separable quadratics, where the best time-varying step-size schedule
on the gradient is known (:func:`l2o.tasks.quadratic.best_schedule`), Conv-GPS started from a ψ₀
ten times too timid reaches that optimum's cost, and π tracks it, with and without gradient noise.

One coordinate group, state s_t = ∇f_t (so ψ's class, a_t = −k_t ∇f_t + noise, contains the
optimum), f(x) = ½ Σ_j h_j x_j² with h_j log-uniform on [0.1, 1]. The criterion is the closed-form
expected cost J of ψ's mean schedule, as a fraction of the gap ψ₀ left:
(J(ψ) − J*) / (J(ψ₀) − J*).
"""

from __future__ import annotations

import pytest
import torch

from l2o.features.sets import FeatureSet, Memory
from l2o.outer.gps.conv_trainer import ConvGPSConfig, ConvGPSTrainer
from l2o.tasks.quadratic import SeparableQuadratic, best_schedule, expected_mean_loss

T = 20


class GradientOnly(FeatureSet):
    """s_t = (∇f_t), Ψ_t = (∇f_t, t/T): the smallest state in which the optimum is a linear ψ."""

    name = "gradient-only"
    state_dim, obs_dim, grad_feature = 1, 2, 0

    def init(self, n: int, horizon: int, dtype: torch.dtype = torch.float32) -> Memory:
        return {}

    def step(self, mem, t, x, g, f, need_state=True):
        return (g.unsqueeze(-1) if need_state else None), torch.stack([g, torch.full_like(g, t / T)], -1), mem


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_conv_gps_reaches_the_known_optimal_schedule(tmp_path, noise):
    """Without gradient noise the best schedule is irregular (it spreads its steps over the
    curvatures); with noise σ = 0.3 it decays (1.3 → 0.15), which tests ψ's time-varying part."""
    task = SeparableQuadratic(dim=500, h_min=0.1, h_max=1.0, noise=noise)
    k_const, _ = best_schedule(task.h, T, noise, constant=True)
    k_star, J_star = best_schedule(task.h, T, noise)
    k0 = 0.1 * float(k_const[0])
    J0 = float(expected_mean_loss(torch.full((T,), k0, dtype=torch.float64), task.h, noise))
    assert J0 > 4 * J_star  # the start is far from the optimum
    if noise > 0:
        assert float(k_star[0]) > 3 * float(k_star[-2])  # the best schedule decays
    cfg = ConvGPSConfig(task="separable-quadratic", features="gradient-only", horizon=T, iterations=10, samples=4,
                        coords_per_group=128, init_gain=k0, init_noise=0.3, noise_floor=0.3, epsilon=1.0,
                        epsilon_max=4.0, nu=1e-8, nu_min=1e-8, nu_max=1e-8, eval_every=1, curvature_every=1,
                        pi_steps=30, pi_first_steps=100)
    trainer = ConvGPSTrainer(cfg, tmp_path, task=task, progress=False, features=GradientOnly())
    log = trainer.train()

    def excess(K: torch.Tensor) -> float:
        return (float(expected_mean_loss(-K, task.h, noise)) - J_star) / (J0 - J_star)

    gaps = [excess(trainer.groups[0].psi.K[:, 0, 0])]
    print(f"excess {gaps[-1]:.4f}, π {log[-1]['pi_auc']:.3f}, J* {J_star:.3f}, J0 {J0:.3f}")
    assert gaps[-1] <= 0.05, f"ψ's schedule is {gaps[-1]:.3f} of the initial gap from the optimum"
    # π (the LSTM, deterministic) on held-out seeds: its true mean objective is near J* too.
    assert log[-1]["pi_auc"] <= J_star + 0.1 * (J0 - J_star), (log[-1]["pi_auc"], J_star, J0)
    assert all(r["psi_step_failures"] == 0 for r in log)
