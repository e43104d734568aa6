"""The cost model of Convolutional GPS (gps.md §5, option (a), our CHOICE; Li & Malik 2017 leave it open):
from the recorded rollouts (:mod:`l2o.outer.gps.conv_env`) to one quadratic cost c̃_{g,t} per group.

The cost of a trajectory is Σ_t f(x_t), which telescopes into T f(x_0) + Σ_t w_t [f(x_{t+1}) − f(x_t)] with w_t = T − 1 − t. To second order
each increment is Σ_j ∇_j f a_j + ½ aᵀ∇²f a. We read ∇_j f from the state's gradient feature
Φ2_0 = ḡ_t/(|ḡ_{t−5}|+1) (≈ the three-step average gradient when |ḡ| ≪ 1, as for these nets) and
split the curvature term over groups as ½ Σ_g h_{g,t}|a_g|², with h_{g,t} the measured effective
curvature along ψ's steps (exact for the step taken). So the per-coordinate cost is
c̃_{g,t}(s, a) = w_t (Φ2_0 a + ½ h_{g,t} a²): a bilinear state–action term and an action
curvature, both identical for all coordinates of the group — block-diagonal and shared, as §3.5
requires — and summed over coordinates it is the model of the whole trajectory's cost.
The gradient shrinkage ρ_{g,t} (:func:`gradient_shrinkage`) discounts the mini-batch noise in Φ2_0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from l2o.features.conv2017 import STATE_DIM

from .conv_env import GRAD_FEATURE, Rollout
from .cost import QuadraticCost
from .errors import GPSError
from .linear_gaussian import DTYPE

__all__ = ["curvature_profile", "gradient_shrinkage", "telescoped_cost"]


def telescoped_cost(curvature: Tensor, horizon: int, rho: Tensor | None = None, state_dim: int = STATE_DIM,
                    grad_feature: int = GRAD_FEATURE, discount: float = 1.0) -> QuadraticCost:
    """c̃_t(s, a) = w_t (ρ_t Φ2_0·a + ½ h_t a²), w_t = T − 1 − t, over xu = [s (D); a (1)], with
    Φ2_0 = s[grad_feature] (D = 77 and Φ2_0 for the paper's state).

    ``curvature`` [T] is the group's h_t (> 0); ``rho`` [T] (default 1) the regression coefficient
    of the true gradient on Φ2_0. See the module docstring for the derivation. ``discount`` γ < 1
    assumes a change of f made at step t persists only as γ^k k steps later (later steps of a
    convergent optimizer partly make up for it): w_t = Σ_{k<T−1−t} γ^k = (1 − γ^{T−1−t})/(1 − γ).
    """
    T = int(horizon)
    h = torch.as_tensor(curvature, dtype=DTYPE)
    if h.shape != (T,) or not bool((h > 0).all()):
        raise ValueError(f"curvature must be [T] = [{T}] and positive")
    r = torch.ones(T, dtype=DTYPE) if rho is None else torch.as_tensor(rho, dtype=DTYPE)
    if r.shape != (T,) or not bool(torch.isfinite(r).all()):
        raise ValueError(f"rho must be [T] = [{T}] and finite")
    D = int(state_dim)
    m = D + 1
    if not 0 < discount <= 1:
        raise ValueError(f"discount must be in (0, 1], got {discount}")
    w = (T - 1 - torch.arange(T, dtype=DTYPE))
    if discount < 1:
        w = (1 - discount ** w) / (1 - discount)
    C = torch.zeros(T, m, m, dtype=DTYPE)
    C[:, grad_feature, D] = w * r  # ½ xuᵀCxu holds w·ρ·Φ2_0·a through both off-diagonal entries
    C[:, D, grad_feature] = w * r
    C[:, D, D] = w * h
    return QuadraticCost(C, torch.zeros(T, m, dtype=DTYPE), torch.zeros(T, dtype=DTYPE), D)


def curvature_profile(samples: list[Rollout], group: int, horizon: int, floor: float) -> Tensor:
    """h_{g,t} for t = 0..T−1: the mean over trajectories of the measured effective curvatures,
    linearly interpolated between measured steps, floored at ``floor`` × their mean magnitude."""
    steps = samples[0].curvature_steps.to(DTYPE)
    vals = torch.stack([r.curvature[:, group] for r in samples]).nanmean(0)
    ok = torch.isfinite(vals)
    if not bool(ok.any()):
        raise GPSError(f"group {group}: no finite curvature measurement")
    steps, vals = steps[ok], vals[ok]
    lo = floor * float(vals.abs().mean())
    return _interpolate(steps, vals, horizon).clamp(min=max(lo, 1e-12))


def _interpolate(steps: Tensor, vals: Tensor, horizon: int) -> Tensor:
    t = torch.arange(horizon, dtype=DTYPE)
    if len(steps) == 1:
        return vals.expand(horizon).clone()
    idx = torch.searchsorted(steps, t).clamp(1, len(steps) - 1)
    t0, t1, v0, v1 = steps[idx - 1], steps[idx], vals[idx - 1], vals[idx]
    return v0 + ((t - t0) / (t1 - t0)).clamp(0, 1) * (v1 - v0)


def gradient_shrinkage(samples: list[Rollout], group: int, horizon: int) -> Tensor:
    """ρ_{g,t} = Σ_j ∇_j f Φ2_0^j / Σ_j (Φ2_0^j)², pooled over trajectories and the group's
    coordinates: the least-squares coefficient of the true gradient on the state's (noisy,
    mini-batch) gradient feature, interpolated over t and clipped to [0, 1]. Without it the cost
    model would credit ψ with the mini-batch noise in Φ2_0 as if it were descent."""
    steps = samples[0].eval_steps.to(DTYPE)
    mom = torch.stack([r.grad_moments[:, group] for r in samples]).nansum(0)  # [E, 2]
    ok = (mom[:, 1] > 0) & (steps < horizon)
    if not bool(ok.any()):
        raise GPSError(f"group {group}: no gradient-feature moments recorded")
    return _interpolate(steps[ok], (mom[ok, 0] / mom[ok, 1]).clamp(0.0, 1.0), horizon)
