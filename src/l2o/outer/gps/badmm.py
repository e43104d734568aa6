"""Bregman ADMM pieces of GPS (Li & Malik 2017 §3.4; gps.md §7): π-step targets, Σ^π, the dual
step on λ_t and the ν_t / ε schedules. Pure functions; float64 with time as the leading dim.

Symbols: ψ(a|s,t) = N(K_t s + k_t, G_t); π(a|o) = N(μ^π(o), Σ^π); λ_t the dual variables of the
mean-action constraint E_ψ[a_t] = E_ψ[E_π[a_t|s_t]]; ν_t the Bregman (KL) penalty weights;
ε the per-iteration KL trust region of the ψ-step; η its multiplier.

The θ-subproblem (π-step) is

    min_θ Σ_t λ_tᵀ E_ψ[μ^π(o_t)] + ν_t E_ψ D_KL(π(·|o_t) ‖ ψ(·|s_t, t)),

and with D_KL(π‖ψ) = ½[tr(G_t⁻¹Σ^π) − log|Σ^π| + (μ^π − μ^ψ_t)ᵀ G_t⁻¹ (μ^π − μ^ψ_t)] + const
(μ^ψ_t = K_t s_t + k_t) it splits into

* the mean: completing the square,
  λ_tᵀμ + (ν_t/2)(μ − μ^ψ)ᵀG_t⁻¹(μ − μ^ψ) = (ν_t/2)(μ − y_t)ᵀ G_t⁻¹ (μ − y_t) + const with
  y_t = μ^ψ_t − G_t λ_t / ν_t: a weighted regression of μ^π onto y_t with weight W_t = ν_t G_t⁻¹
  (:func:`pi_targets`, :func:`weighted_regression_loss`);
* the covariance: Σ_t (ν_t/2)(tr(G_t⁻¹Σ) − log|Σ|), whose gradient Σ_t (ν_t/2)(G_t⁻¹ − Σ⁻¹) = 0
  gives the ν-weighted harmonic mean Σ^π = (Σ_t ν_t G_t⁻¹ / Σ_t ν_t)⁻¹ (:func:`pi_covariance`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .linear_gaussian import LinearGaussianPolicy, _as64, _sym

__all__ = [
    "pi_targets",
    "weighted_regression_loss",
    "pi_covariance",
    "dual_step",
    "kl_psi_pi",
    "update_nu",
    "update_epsilon",
]


def _nu_vec(nu: Tensor | float, T: int) -> Tensor:
    v = _as64(nu, "nu")
    v = v.expand(T).clone() if v.ndim == 0 else v
    if v.shape != (T,):
        raise ValueError(f"nu must be a scalar or [T] = [{T}], got {tuple(v.shape)}")
    if not bool(torch.isfinite(v).all()) or bool((v <= 0).any()):
        raise ValueError("ν_t must be finite and > 0")
    return v


def pi_targets(
    psi: LinearGaussianPolicy, states: Tensor, lambda_: Tensor | None, nu: Tensor | float
) -> tuple[Tensor, Tensor]:
    """Regression targets and weights of the π-step.

    targets[n, t] = K_t s_nt + k_t − G_t λ_t / ν_t, [N, T, d]; weights W_t = ν_t G_t⁻¹, [T, d, d].
    With λ = 0 the target is exactly ψ's mean action. ``states`` [N, T, D]; ``lambda_`` [T, d]
    or None (0); ``nu`` scalar or [T], > 0.
    """
    S = _as64(states, "states")
    T, d = psi.T, psi.dim_a
    if S.ndim != 3 or S.shape[1:] != (T, psi.dim_s):
        raise ValueError(f"states must be [N, {T}, {psi.dim_s}], got {tuple(S.shape)}")
    v = _nu_vec(nu, T)
    y = psi.mean(S)
    if lambda_ is not None:
        lam = _as64(lambda_, "lambda_")
        if lam.shape != (T, d):
            raise ValueError(f"lambda_ must be [T, d] = {(T, d)}, got {tuple(lam.shape)}")
        y = y - (psi.cov @ lam.unsqueeze(-1)).squeeze(-1) / v[:, None]
    W = _sym(v[:, None, None] * psi.precision)
    return y, W


def weighted_regression_loss(
    pred: Tensor, targets: Tensor, weights: Tensor, sample_weights: Tensor | None = None
) -> Tensor:
    """(1/N) Σ_n Σ_t ½ r_ntᵀ W_t r_nt with r = pred − targets: the π-step objective up to a
    constant (E_ψ as the sample mean). pred/targets [N, T, d], weights [T, d, d];
    ``sample_weights`` [N] (normalised to mean 1 over the batch) optionally reweights samples.
    Differentiable in ``pred``; computed in ``pred``'s dtype."""
    if pred.shape != targets.shape or pred.ndim != 3:
        raise ValueError(f"pred and targets must both be [N, T, d]; got {tuple(pred.shape)}, {tuple(targets.shape)}")
    r = pred - targets.to(pred.dtype)
    W = weights.to(pred.dtype)
    per = 0.5 * torch.einsum("nti,tij,ntj->nt", r, W, r).sum(1)  # [N]
    if sample_weights is None:
        return per.mean()
    w = sample_weights.to(pred.dtype)
    return (per * w).sum() / w.sum()


def pi_covariance(G: Tensor, nu: Tensor | float) -> Tensor:
    """Σ^π = (Σ_t ν_t G_t⁻¹ / Σ_t ν_t)⁻¹, the minimiser of Σ_t (ν_t/2)(tr(G_t⁻¹Σ) − log|Σ|).

    G [T, d, d] (ψ's covariances), ν scalar or [T] (> 0) → [d, d].
    """
    G = _as64(G, "G")
    v = _nu_vec(nu, G.shape[0])
    P = torch.einsum("t,tij->ij", v, torch.linalg.inv(G)) / v.sum()
    return _sym(torch.linalg.inv(_sym(P)))


def _expect_t(x: Tensor, sample_weights: Tensor | None) -> Tensor:
    """[N, T, d] → E over samples [T, d]; [T, d] passes through."""
    x = _as64(x, "x")
    if x.ndim == 2:
        return x
    if sample_weights is None:
        return x.mean(0)
    w = _as64(sample_weights, "sample_weights")
    return torch.einsum("n,ntd->td", w / w.sum(), x)


def dual_step(
    lambda_: Tensor,
    nu: Tensor | float,
    pi_actions: Tensor,
    psi_actions: Tensor,
    alpha: float,
    sample_weights: Tensor | None = None,
) -> Tensor:
    """λ_t ← λ_t + α ν_t (E_ψ[μ^π(o_t)] − E_ψ[a_t]).

    ``pi_actions`` / ``psi_actions``: π's and ψ's mean actions on ψ's samples, [N, T, d] (averaged
    here) or their expectations [T, d]. Where π's action exceeds ψ's, λ_t grows: the π-step's
    λ_tᵀμ^π term then penalises the excess and the ψ-step's −λ_tᵀa term rewards ψ for moving up.
    """
    lam = _as64(lambda_, "lambda_")
    T = lam.shape[0]
    v = _nu_vec(nu, T)
    diff = _expect_t(pi_actions, sample_weights) - _expect_t(psi_actions, sample_weights)
    if diff.shape != lam.shape:
        raise ValueError(f"expected actions of shape {tuple(lam.shape)}, got {tuple(diff.shape)}")
    return lam + float(alpha) * v[:, None] * diff


def kl_psi_pi(psi: LinearGaussianPolicy, states: Tensor, pi_mean: Tensor, pi_cov: Tensor,
              sample_weights: Tensor | None = None) -> Tensor:
    """E_ψ D_KL(ψ(·|s_t, t) ‖ π(·|o_t)) per t, [T], as the (weighted) mean over ψ's samples.

    ½[tr(Σπ⁻¹G_t) − d + log|Σπ| − log|G_t| + (μ^ψ − μ^π)ᵀ Σπ⁻¹ (μ^ψ − μ^π)];
    ``states`` [N, T, D], ``pi_mean`` μ^π(o) [N, T, d], ``pi_cov`` Σ^π [d, d].
    """
    S = _as64(states, "states")
    mp = _as64(pi_mean, "pi_mean")
    Sp = _sym(_as64(pi_cov, "pi_cov"))
    d = psi.dim_a
    L = torch.linalg.cholesky(Sp)
    r = psi.mean(S) - mp  # [N, T, d]
    z = torch.linalg.solve_triangular(L, r.reshape(-1, d).T, upper=False).T.reshape(r.shape)
    maha = z.square().sum(-1)  # [N, T]
    maha = maha.mean(0) if sample_weights is None else torch.einsum(
        "n,nt->t", _as64(sample_weights, "sample_weights") / _as64(sample_weights, "sample_weights").sum(), maha)
    V = torch.linalg.solve_triangular(L.expand(psi.T, d, d), psi.chol, upper=False)
    trace = V.square().sum((-2, -1))
    logdet_p = 2.0 * torch.log(torch.diagonal(L)).sum()
    return 0.5 * (trace - d + logdet_p - psi.logdet_cov + maha)


def update_nu(
    nu: Tensor,
    kl: Tensor,
    kl_prev: Tensor | None,
    kl_target: float,
    nu_min: float,
    nu_max: float,
    increase: float = 2.0,
    decrease: float = 0.5,
    low: float = 0.1,
) -> Tensor:
    """ν_t schedule (gps.md §7.4), per t with D_t = E D_KL(ψ‖π) at step t:

    * raise, ν_t ← ``increase``·ν_t, where D_t > ``kl_target``, or where D_t grew
      (D_t > D_t^prev) while above ``low``·``kl_target``;
    * lower, ν_t ← ``decrease``·ν_t, where D_t < ``low``·``kl_target`` (well below the target);
    * otherwise keep; finally clip to [``nu_min``, ``nu_max``].
    """
    v = _as64(nu, "nu").clone()
    D = _as64(kl, "kl")
    if D.shape != v.shape:
        raise ValueError(f"kl must have the shape of nu {tuple(v.shape)}, got {tuple(D.shape)}")
    if not (0 < nu_min <= nu_max) or not kl_target > 0 or not (increase >= 1 >= decrease > 0) or not 0 <= low <= 1:
        raise ValueError("need 0 < nu_min ≤ nu_max, kl_target > 0, increase ≥ 1 ≥ decrease > 0, 0 ≤ low ≤ 1")
    floor = low * kl_target
    up = D > kl_target
    if kl_prev is not None:
        up = up | ((D > _as64(kl_prev, "kl_prev")) & (D > floor))
    down = (D < floor) & ~up
    v = torch.where(up, v * increase, torch.where(down, v * decrease, v))
    return v.clamp(nu_min, nu_max)


def update_epsilon(
    epsilon: float,
    predicted_improvement: float,
    actual_improvement: float,
    eps_min: float,
    eps_max: float,
    shrink: float = 0.5,
    grow: float = 2.0,
    rho_low: float = 0.25,
    rho_high: float = 0.75,
    min_predicted: float = 0.0,
) -> float:
    """ε schedule (gps.md §7.5), the trust-region ratio test on the ψ-step.

    predicted_improvement = c̃(ψ_old) − c̃(ψ_new), both under last iteration's fitted model;
    actual_improvement = c(ψ_old) − c(ψ_new), the sample means of the true cost.
    With ρ = actual / predicted:

    * ρ < ``rho_low`` (the new ψ's real cost is worse than the model predicted): ε ← ``shrink``·ε;
    * ρ > ``rho_high`` (as good as predicted, or better): ε ← ``grow``·ε;
    * otherwise keep. If the model predicted no improvement (predicted ≤ ``min_predicted``, e.g.
      the BADMM terms dominated the step) ρ is meaningless and ε is kept.

    The result is clipped to [``eps_min``, ``eps_max``].
    """
    if not (0 < eps_min <= eps_max) or not (0 < shrink <= 1 <= grow) or not rho_low <= rho_high:
        raise ValueError("need 0 < eps_min ≤ eps_max, 0 < shrink ≤ 1 ≤ grow, rho_low ≤ rho_high")
    eps = float(epsilon)
    p, a = float(predicted_improvement), float(actual_improvement)
    if not (math.isfinite(p) and math.isfinite(a)):
        raise ValueError("improvements must be finite")
    if p > max(float(min_predicted), 0.0):
        rho = a / p
        if rho < rho_low:
            eps *= shrink
        elif rho > rho_high:
            eps *= grow
    return min(max(eps, eps_min), eps_max)
