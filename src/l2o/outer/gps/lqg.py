"""LQG with a KL trust region: the ψ-step of GPS (gps.md §6).

Minimise E_ψ̃[Σ_t c̃_t(s_t, a_t) − λ_tᵀ a_t] + Σ_t ν_t E D_KL(ψ ‖ π̂)
subject to Σ_t E_ψ̃ D_KL(ψ ‖ ψ_old) ≤ ε.

Conventions:

* ε bounds the **sum** over the T steps of the expected KL (taken along the state distribution
  of the new ψ under p̃), as in gps.md §6. For a per-step budget ε_step pass ε = T·ε_step.
* With the multiplier η, the per-step cost is scaled:
  ℓ̄_t = [c̃_t − λ_tᵀ a − η log ψ_old − ν_t log π̂] / (η + ν_t)
  (:func:`augmented_cost`), and the max-entropy LQG solution of E[Σ ℓ̄_t] − Σ_t H(ψ_t) is
  ψ_t = N(K_t s + k_t, G_t) with G_t = Q̄_uu⁻¹ of the *scaled* cost (:func:`backward`).
  :func:`solve_fixed_eta` (used by the dual) minimises the Lagrangian exactly: identical to the
  above when ν_t is constant in t; for a time-varying ν_t it uses G_t = (η + ν_t) Q_uu⁻¹ of the
  unscaled cost, which GPS's per-step division only approximates.
* :func:`backward` on a raw cost c̃ gives plain LQR gains, with G_t = Q_uu⁻¹ of c̃.
* Where [A_t B_t] is mostly shift and selection rows (the 2016 optimizer MDP: history blocks
  shift by one lag), the backward and forward passes apply it by gathering rows
  (:class:`_RowGather`) instead of D×D×(D+d) products; the same sums to float tolerance
  (tests/outer/gps/test_gps_lqg_structured.py). Dense dynamics take the dense products as before.
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .cost import QuadraticCost
from .errors import NotPositiveDefiniteError, TrustRegionError
from .linear_gaussian import (
    DTYPE,
    LinearGaussianDynamics,
    LinearGaussianPolicy,
    StateDistribution,
    _as64,
    _sym,
    check_sizes,
    forward,
    joint_moments,
    kl_divergence,
)

__all__ = [
    "ValueFunction",
    "TrustRegionResult",
    "backward",
    "neg_log_policy_cost",
    "augmented_cost",
    "solve_fixed_eta",
    "expected_cost",
    "solve_trust_region",
]


# --------------------------------------------------------------------------- structured dynamics
_MAX_GATHER = 2  # rows with at most this many nonzeros are gathered, the others multiplied densely
_MAX_DENSE_FRACTION = 0.25  # more dense rows than this: the plain dense product


class _RowGather:
    """X ↦ M X for a fixed M [r, c] most of whose rows have ≤ 2 nonzeros (shift and selection
    rows, as in the 2016 optimizer MDP's [A_t B_t]): those rows are gathered and scaled, the few
    others multiplied densely on their nonzero columns. The same sums as M @ X up to rounding
    (the nonzero terms of a row are added in a different order); O(r·k + dense rows·their
    columns·k) instead of O(r·c·k)."""

    def __init__(self, M: Tensor, rows: Tensor) -> None:
        self.n_rows = M.shape[0]
        self.dense_rows = rows
        self.used = torch.nonzero((M[rows] != 0).any(0)).flatten()  # the dense rows' nonzero columns
        self.dense = M[rows][:, self.used].contiguous()
        r, c = torch.nonzero(M, as_tuple=True)  # row-major: each row's nonzeros in column order
        keep = torch.ones(self.n_rows, dtype=torch.bool)
        keep[rows] = False
        sel = keep[r]
        r, c = r[sel], c[sel]
        v = M[r, c]
        start = torch.zeros(self.n_rows + 1, dtype=torch.long)
        start[1:] = torch.bincount(r, minlength=self.n_rows).cumsum(0)
        rank = torch.arange(r.numel()) - start[r]  # j: the j-th nonzero of its row
        first = rank == 0
        # the first nonzero of each gathered row (column 0, value 0 for empty and dense rows)
        self.cols0 = torch.zeros(self.n_rows, dtype=torch.long)
        self.vals0 = torch.zeros(self.n_rows, dtype=M.dtype)
        self.cols0[r[first]], self.vals0[r[first]] = c[first], v[first]
        self.ones0 = bool((self.vals0[keep] == 1).all())  # every gathered row selects: no scaling
        self.more = [(r[rank == j], c[rank == j], v[rank == j]) for j in range(1, _MAX_GATHER)]
        self.more = [(a, b, w) for a, b, w in self.more if a.numel()]

    def __call__(self, X: Tensor) -> Tensor:
        """M @ X for X [c] or [c, k]."""
        out = X.index_select(0, self.cols0)
        if not self.ones0:
            out.mul_(self.vals0 if X.ndim == 1 else self.vals0[:, None])
        for r, c, v in self.more:
            out.index_add_(0, r, X.index_select(0, c) * (v if X.ndim == 1 else v[:, None]))
        if self.dense_rows.numel():
            out[self.dense_rows] = self.dense @ X.index_select(0, self.used)
        return out

    def right(self, Y: Tensor) -> Tensor:
        """Y @ Mᵀ for Y [k, c]."""
        out = Y.index_select(1, self.cols0)
        if not self.ones0:
            out.mul_(self.vals0)
        for r, c, v in self.more:
            out.index_add_(1, r, Y.index_select(1, c) * v)
        if self.dense_rows.numel():
            out[:, self.dense_rows] = Y.index_select(1, self.used) @ self.dense.T
        return out

    @classmethod
    def maybe(cls, M: Tensor) -> _RowGather | None:
        """The gather form of M, or None when too many of its rows are dense for it to pay."""
        dense = torch.nonzero((M != 0).sum(1) > _MAX_GATHER).flatten()
        return cls(M, dense) if dense.numel() <= _MAX_DENSE_FRACTION * M.shape[0] else None


_STRUCTURE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _sym_into(x: Tensor, out: Tensor | None = None) -> Tensor:
    """_sym(x) = ½(x + xᵀ), bitwise, with one temporary fewer (into ``out`` if given)."""
    y = torch.add(x, x.mT, out=out) if out is not None else x + x.mT
    return y.mul_(0.5)


def _structure(dynamics: LinearGaussianDynamics) -> tuple[Tensor, list[tuple[_RowGather, _RowGather] | None]]:
    """[A_t B_t] and, per transition t, the gather forms of it and its transpose (None: dense
    products); built once per dynamics object (the dual solves dozens of LQGs on one)."""
    cached = _STRUCTURE.get(dynamics)
    if cached is None:
        AB = dynamics.AB
        st = []
        for t in range(AB.shape[0]):
            fwd, bwd = _RowGather.maybe(AB[t]), _RowGather.maybe(AB[t].T)
            st.append((fwd, bwd) if fwd is not None and bwd is not None else None)
        cached = _STRUCTURE[dynamics] = (AB, st)
    return cached


@dataclass(frozen=True, eq=False)
class ValueFunction:
    """Quadratic value and Q-function terms from the backward pass, t = 0..T−1.

    V_t(s) = ½ sᵀ Vxx_t s + Vx_tᵀ s + const; Q_t(xu) = ½ xuᵀ Qxuxu_t xu + Qxu_tᵀ xu + const.
    (Constants are not tracked.)
    """

    Vxx: Tensor  # [T, D, D]
    Vx: Tensor  # [T, D]
    Qxuxu: Tensor  # [T, n, n]
    Qxu: Tensor  # [T, n]


def backward(
    dynamics: LinearGaussianDynamics,
    cost: QuadraticCost,
    entropy_weight: Tensor | float | None = None,
    group: Any = None,
) -> tuple[LinearGaussianPolicy, ValueFunction]:
    """LQG backward Riccati recursion (V_T ≡ 0, i.e. no value beyond the last step).

    With F_t = [A_t B_t], f_t = c_t: Q_xuxu = ℓ_xuxu + F_tᵀ V_xx F_t, Q_xu = ℓ_xu + F_tᵀ(V_xx f_t + V_x);
    K_t = −Q_uu⁻¹ Q_ux, k_t = −Q_uu⁻¹ Q_u, G_t = w_t Q_uu⁻¹; V_xx = Q_xx + Q_xu K_t (symmetrised),
    V_x = Q_x + Q_xu k_t. This minimises Σ_t E[ℓ_t] − Σ_t w_t H(ψ_t); the entropy weight w_t
    (scalar or [T]) defaults to 1, the GPS form G_t = Q̄_uu⁻¹ for the scaled cost ℓ̄. (For plain
    LQR the gains K_t, k_t do not depend on w.) Raises :class:`NotPositiveDefiniteError` (with
    ``t``, ``group``) if Q_uu is not positive definite (or not finite) at some t.
    """
    return _backward(dynamics, cost, entropy_weight, group, True)


def _backward(dynamics: LinearGaussianDynamics, cost: QuadraticCost, entropy_weight: Tensor | float | None,
              group: Any, value: bool) -> tuple[LinearGaussianPolicy, ValueFunction | None]:
    """:func:`backward`; ``value=False`` does not collect the value function (None), which the
    dual search does not use."""
    T, D, d = cost.T, cost.dim_s, cost.dim_a
    w = torch.ones(T, dtype=DTYPE) if entropy_weight is None else _per_step(entropy_weight, T, "entropy_weight")
    if bool((w <= 0).any()):
        raise ValueError("entropy_weight must be > 0")
    if dynamics.horizon != T:
        raise ValueError(f"dynamics has {dynamics.horizon - 1} transitions, cost has T={T} steps (need T−1)")
    if dynamics.dim_s != D or dynamics.dim_a != d:
        raise ValueError("dynamics and cost state/action sizes differ")
    AB, structure = _structure(dynamics)
    Vxx = torch.zeros(D, D, dtype=DTYPE)
    Vx = torch.zeros(D, dtype=DTYPE)
    Ks: list[Tensor] = []
    ks: list[Tensor] = []
    Gs: list[Tensor] = []
    Vxxs: list[Tensor] = []
    Vxs: list[Tensor] = []
    Qxuxus: list[Tensor] = []
    Qxus: list[Tensor] = []
    for t in range(T - 1, -1, -1):
        Qxuxu, Qxu = cost.at(t) if isinstance(cost, _StepCosts) else (cost.C[t], cost.d[t])
        if t < T - 1 and structure[t] is not None:  # [A_t B_t] mostly shifts and selections
            ABt = structure[t][1]
            Z = ABt.right(ABt(Vxx))  # (Aᵀ V) A with Aᵀ's rows gathered
            Qxuxu = Z.add_(Qxuxu)  # = Qxuxu + Z
            Qxu = ABt(Vxx @ dynamics.c[t] + Vx).add_(Qxu)
        elif t < T - 1:
            Qxuxu = Qxuxu + AB[t].T @ Vxx @ AB[t]
            Qxu = Qxu + AB[t].T @ (Vxx @ dynamics.c[t] + Vx)
        Qxuxu = _sym_into(Qxuxu)
        if not (bool(torch.isfinite(Qxuxu).all()) and bool(torch.isfinite(Qxu).all())):
            raise NotPositiveDefiniteError(t=t, group=group, detail="non-finite Q-function")
        Quu, Qus = Qxuxu[D:, D:], Qxuxu[D:, :D]
        L, info = torch.linalg.cholesky_ex(Quu)
        if int(info) != 0:
            ev = float(torch.linalg.eigvalsh(Quu).min())
            raise NotPositiveDefiniteError(t=t, group=group, detail=f"min eigenvalue {ev:.3g}")
        K = -torch.cholesky_solve(Qus, L)
        k = -torch.cholesky_solve(Qxu[D:, None], L)[:, 0]
        G = _sym(torch.cholesky_inverse(L)) * w[t]
        if int(torch.linalg.cholesky_ex(G)[1]) != 0 or not bool(torch.isfinite(G).all()):
            raise NotPositiveDefiniteError(t=t, group=group, detail="Q_uu too ill-conditioned to invert")
        Qsu = Qxuxu[:D, D:]
        Vxx = _sym_into((Qsu @ K).add_(Qxuxu[:D, :D]))
        Vx = Qxu[:D] + Qsu @ k
        for lst, x in ((Ks, K), (ks, k), (Gs, G)) + (((Vxxs, Vxx), (Vxs, Vx), (Qxuxus, Qxuxu), (Qxus, Qxu))
                                                     if value else ()):
            lst.append(x)

    def stack(xs: list[Tensor]) -> Tensor:  # collected backwards in time
        return torch.stack(xs[::-1])

    policy = LinearGaussianPolicy(stack(Ks), stack(ks), stack(Gs))
    return policy, (ValueFunction(stack(Vxxs), stack(Vxs), stack(Qxuxus), stack(Qxus)) if value else None)


def neg_log_policy_cost(policy: LinearGaussianPolicy) -> QuadraticCost:
    """−log ψ(a|s, t) as a quadratic in xu = [s; a].

    With M_t = [−K_t  I] and P_t = G_t⁻¹: −log ψ = ½ (M xu − k)ᵀ P (M xu − k) + ½ log det(2π G),
    so C = Mᵀ P M, d = −Mᵀ P k, h = ½ kᵀ P k + ½ log det(2π G).
    """
    T, d = policy.T, policy.dim_a
    M = torch.cat([-policy.K, torch.eye(d, dtype=DTYPE).expand(T, d, d)], -1)  # [T, d, n]
    P = policy.precision
    Pk = (P @ policy.k.unsqueeze(-1)).squeeze(-1)
    C = M.mT @ P @ M
    lin = -(M.mT @ Pk.unsqueeze(-1)).squeeze(-1)
    h = 0.5 * (policy.k * Pk).sum(-1) + 0.5 * (policy.logdet_cov + d * math.log(2 * math.pi))
    return QuadraticCost(_sym(C), lin, h, policy.dim_s)


def _per_step(x: Tensor | float | None, T: int, name: str) -> Tensor:
    if x is None:
        return torch.zeros(T, dtype=DTYPE)
    v = _as64(x, name)
    if v.ndim == 0:
        v = v.expand(T)
    if v.shape != (T,):
        raise ValueError(f"{name} must be a scalar or [T] = [{T}], got {tuple(v.shape)}")
    if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
        raise ValueError(f"{name} must be finite and non-negative")
    return v.clone()


def _check_eta(eta: float) -> float:
    eta = float(eta)
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be finite and ≥ 0, got {eta}")
    return eta


def _with_duals(cost: QuadraticCost, lambda_: Tensor | None) -> QuadraticCost:
    """c̃_t(s, a) − λ_tᵀ a."""
    if lambda_ is None:
        return cost
    T, D, d = cost.T, cost.dim_s, cost.dim_a
    lam = _as64(lambda_, "lambda_")
    if lam.shape != (T, d):
        raise ValueError(f"lambda_ must be [T, d] = {(T, d)}, got {tuple(lam.shape)}")
    dd = cost.d.clone()
    dd[:, D:] -= lam
    return QuadraticCost(cost.C, dd, cost.h, D)


def _pi_term(pi_fit: LinearGaussianPolicy | None, nu_t: Tensor) -> QuadraticCost | None:
    """ν_t · (−log π̂(a|s, t)), or None where every ν_t is 0."""
    if not bool((nu_t > 0).any()):
        return None
    if pi_fit is None:
        raise ValueError("pi_fit (π̂) is required when ν > 0")
    return neg_log_policy_cost(pi_fit).scale(nu_t)


def augmented_cost(
    cost: QuadraticCost,
    prev_policy: LinearGaussianPolicy | None,
    eta: float,
    lambda_: Tensor | None = None,
    nu: Tensor | float | None = None,
    pi_fit: LinearGaussianPolicy | None = None,
    normalize: bool = True,
) -> QuadraticCost:
    """ℓ̄_t(s, a) = [c̃_t(s, a) − λ_tᵀ a − η log ψ_old(a|s, t) − ν_t log π̂(a|s, t)] / (η + ν_t).

    With ``normalize=False`` the numerator only (the Lagrangian's cost before division).

    Args:
        cost: c̃, [T] steps over xu = [s; a].
        prev_policy: ψ_old (may be None only when η = 0).
        eta: the trust-region multiplier η ≥ 0.
        lambda_: BADMM duals λ_t, [T, d] (None: 0).
        nu: BADMM weights ν_t, scalar or [T] (None: 0).
        pi_fit: π̂, the linear-Gaussian fit of π (required where ν_t > 0).
    """
    eta = _check_eta(eta)
    nu_t = _per_step(nu, cost.T, "nu")
    denom = eta + nu_t
    if bool((denom <= 0).any()):
        raise ValueError("η + ν_t must be > 0 for every t (use backward() directly for the raw cost)")
    total = _with_duals(cost, lambda_)
    if eta > 0:
        if prev_policy is None:
            raise ValueError("prev_policy (ψ_old) is required when η > 0")
        total = total + neg_log_policy_cost(prev_policy).scale(eta)
    pi_term = _pi_term(pi_fit, nu_t)
    if pi_term is not None:
        total = total + pi_term
    return total.scale(1.0 / denom) if normalize else total


def solve_fixed_eta(
    dynamics: LinearGaussianDynamics,
    cost: QuadraticCost,
    prev_policy: LinearGaussianPolicy | None,
    eta: float,
    lambda_: Tensor | None = None,
    nu: Tensor | float | None = None,
    pi_fit: LinearGaussianPolicy | None = None,
    group: Any = None,
) -> tuple[LinearGaussianPolicy, ValueFunction]:
    """The ψ minimising the Lagrangian at fixed η:

    Σ_t E_ψ̃[c̃_t − λ_tᵀ a_t] + η Σ_t E D_KL(ψ_t ‖ ψ_old,t) + Σ_t ν_t E D_KL(ψ_t ‖ π̂_t).

    Solved as the backward pass on the unnormalised cost (η + ν_t) ℓ̄_t with entropy weights
    w_t = η + ν_t, i.e. G_t = (η + ν_t) Q_uu⁻¹. When ν_t is the same for all t this is exactly
    ``backward(dynamics, augmented_cost(...))`` (the GPS form, G_t = Q̄_uu⁻¹ of the scaled cost);
    when ν_t varies over t, GPS's per-step division by (η + ν_t) is not the minimiser of this
    Lagrangian, while this is. May raise :class:`NotPositiveDefiniteError`.
    """
    num = augmented_cost(cost, prev_policy, eta, lambda_=lambda_, nu=nu, pi_fit=pi_fit, normalize=False)
    return _solve_numerator(dynamics, num, float(eta) + _per_step(nu, cost.T, "nu"), group)


def _solve_numerator(dynamics: LinearGaussianDynamics, num: QuadraticCost, w: Tensor,
                     group: Any, value: bool = True) -> tuple[LinearGaussianPolicy, ValueFunction | None]:
    """backward() on the Lagrangian's numerator with entropy weights w_t = η + ν_t."""
    if bool((w == w[0]).all()):
        return _backward(dynamics, num.scale(1.0 / w), None, group, value)
    return _backward(dynamics, num, w, group, value)


class _FixedEtaSolver:
    """:func:`solve_fixed_eta` for many η with the η-independent parts built once (c̃ − λᵀa,
    −log ψ_old and ν·(−log π̂)); the dual search evaluates dozens of η. The terms are summed in
    :func:`augmented_cost`'s order, so the result is bitwise the same."""

    def __init__(self, dynamics: LinearGaussianDynamics, cost: QuadraticCost, prev_policy: LinearGaussianPolicy,
                 lambda_: Tensor | None, nu: Tensor | float | None, pi_fit: LinearGaussianPolicy | None,
                 group: Any) -> None:
        self.nu = _per_step(nu, cost.T, "nu")
        self.base = _with_duals(cost, lambda_)
        self.neg_log_old = neg_log_policy_cost(prev_policy)
        self.pi_term = _pi_term(pi_fit, self.nu)
        self.dynamics, self.group = dynamics, group

    def __call__(self, eta: float, value: bool = True) -> tuple[LinearGaussianPolicy, ValueFunction | None]:
        eta = _check_eta(eta)
        w = eta + self.nu
        if bool((w <= 0).any()):
            raise ValueError("η + ν_t must be > 0 for every t (use backward() directly for the raw cost)")
        const = bool((w == w[0]).all())  # as _solve_numerator: scaled cost, or entropy weights w
        total = _StepCosts(self.base, self.neg_log_old if eta > 0 else None, eta, self.pi_term,
                           1.0 / w if const else None)
        return _backward(self.dynamics, total, None if const else w, self.group, value)


class _StepCosts:
    """((c̃ − λᵀa) + η·(−log ψ_old) + ν·(−log π̂))·s_t one step at a time, for the backward pass:
    per t the same elementwise operations as the sums and scalings of the [T, n, n] costs
    (bitwise the same C_t, d_t), without building those."""

    def __init__(self, base: QuadraticCost, neg_log_old: QuadraticCost | None, eta: float,
                 pi_term: QuadraticCost | None, scale: Tensor | None) -> None:
        self.base, self.old, self.pi_term, self.s = base, neg_log_old, pi_term, scale
        self.eta = torch.tensor(eta, dtype=DTYPE)
        self.T, self.dim_s, self.dim_a = base.T, base.dim_s, base.dim_a

    def at(self, t: int) -> tuple[Tensor, Tensor]:
        """C_t, d_t (fresh tensors; the sums in place, x + y = y + x bitwise)."""
        if self.old is not None:
            C, d = self.old.C[t] * self.eta, self.old.d[t] * self.eta
            C.add_(self.base.C[t])
            d.add_(self.base.d[t])
        else:
            C, d = self.base.C[t].clone(), self.base.d[t].clone()
        if self.pi_term is not None:
            C.add_(self.pi_term.C[t])
            d.add_(self.pi_term.d[t])
        if self.s is not None:
            C.mul_(self.s[t])
            d.mul_(self.s[t])
        return C, d


def _forward(policy: LinearGaussianPolicy, dynamics: LinearGaussianDynamics, mu0: Tensor, sigma0: Tensor,
             joint: bool = True, on_joint: Any = None) -> StateDistribution:
    """:func:`~l2o.outer.gps.linear_gaussian.forward` with [A_t B_t] applied in its gather form
    where it has one (:func:`_structure`; elsewhere the same dense products); ``joint=False``
    leaves out the joint [s; a] moments (None), which the dual's KL does not need; ``on_joint(t,
    mean, cov)`` is called with them per t instead."""
    AB, st = _structure(dynamics)
    if all(x is None for x in st):
        return forward(policy, dynamics, mu0, sigma0)
    check_sizes(policy, dynamics)
    T, D = policy.T, policy.dim_s
    mu = _as64(mu0, "mu0").reshape(D)
    covs = torch.empty(T, D, D, dtype=DTYPE)  # Σ_t written in place (no stacking)
    sigma = _sym_into(_as64(sigma0, "sigma0").reshape(D, D), out=covs[0])
    means, xu_means, xu_covs = [], [], []
    for t in range(T):
        xu_mean, xu_cov = joint_moments(policy, t, mu, sigma)
        means.append(mu)
        if on_joint is not None:
            on_joint(t, xu_mean, xu_cov)
        if joint:
            xu_means.append(xu_mean)
            xu_covs.append(xu_cov)
        if t < T - 1 and st[t] is not None:
            G = st[t][0]
            mu = G(xu_mean) + dynamics.c[t]
            # (A Σ) Aᵀ with A's rows gathered
            sigma = _sym_into(G.right(G(xu_cov)).add_(dynamics.F[t]), out=covs[t + 1])
        elif t < T - 1:
            mu = AB[t] @ xu_mean + dynamics.c[t]
            sigma = _sym_into(AB[t] @ xu_cov @ AB[t].T + dynamics.F[t], out=covs[t + 1])
    return StateDistribution(torch.stack(means), covs,
                             torch.stack(xu_means) if joint else None, torch.stack(xu_covs) if joint else None)


def expected_cost(
    policy: LinearGaussianPolicy,
    dynamics: LinearGaussianDynamics,
    cost: QuadraticCost,
    mu0: Tensor,
    sigma0: Tensor,
) -> Tensor:
    """E_ψ̃ c̃_t(s_t, a_t) per t, [T], under p̃, ψ and s_0 ~ N(μ₀, Σ₀)."""
    if all(x is None for x in _structure(dynamics)[1]):
        dist = forward(policy, dynamics, mu0, sigma0)
        return cost.expected(dist.xu_mean, dist.xu_cov)
    out = torch.empty(cost.T, dtype=DTYPE)

    def step(t: int, m: Tensor, S: Tensor) -> None:  # cost.expected's terms at one t
        out[t] = 0.5 * ((cost.C[t] * S.mT).sum() + m @ cost.C[t] @ m) + cost.d[t] @ m + cost.h[t]

    _forward(policy, dynamics, mu0, sigma0, joint=False, on_joint=step)
    return out


class TrustRegionResult(NamedTuple):
    policy: LinearGaussianPolicy
    eta: float
    kl: float  # Σ_t E D_KL(ψ_new ‖ ψ_old) along the new state distribution


def solve_trust_region(
    dynamics: LinearGaussianDynamics,
    cost: QuadraticCost,
    prev_policy: LinearGaussianPolicy,
    mu0: Tensor,
    sigma0: Tensor,
    epsilon: float,
    lambda_: Tensor | None = None,
    nu: Tensor | float | None = None,
    pi_fit: LinearGaussianPolicy | None = None,
    eta_bounds: tuple[float, float] = (1e-6, 1e16),
    rtol: float = 0.1,
    max_iters: int = 50,
    eta_init: float | None = None,
    group: Any = None,
) -> TrustRegionResult:
    """Dual on η by geometric bisection: find ψ with Σ_t E D_KL(ψ ‖ ψ_old) ∈ [ε(1−rtol), ε(1+rtol)].

    For each η: ψ = :func:`solve_fixed_eta` (= backward(augmented_cost(η)) for constant ν),
    forward-propagate s_0 ~ N(μ₀, Σ₀) under p̃ and ψ,
    and sum the expected KL over t. η is raised when the KL is above ε(1+rtol) or Q_uu is not PD,
    lowered when the KL is below ε(1−rtol). At η = η_min any KL ≤ ε(1+rtol) is accepted (the
    constraint is inactive). ``eta_init`` (e.g. last iteration's η) is tried first inside the
    bracket. If η_max still gives a non-PD Q_uu or KL > ε(1+rtol), :class:`TrustRegionError` is
    raised. If ``max_iters`` bisection steps do not reach the band, the feasible ψ with the
    largest KL found (KL < ε(1−rtol)) is returned with a warning.

    Returns (policy, eta, kl).
    """
    eps = float(epsilon)
    if not eps > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    eta_min, eta_max = (float(e) for e in eta_bounds)
    if not (0 < eta_min <= eta_max < math.inf):
        raise ValueError(f"eta_bounds must satisfy 0 < min ≤ max < inf, got {eta_bounds}")
    upper, lower = eps * (1 + rtol), eps * (1 - rtol)
    solve = _FixedEtaSolver(dynamics, cost, prev_policy, lambda_, nu, pi_fit, group)

    def evaluate(eta: float) -> tuple[LinearGaussianPolicy, float]:
        pol, _ = solve(eta, value=False)
        dist = _forward(pol, dynamics, mu0, sigma0, joint=False)
        kl = float(kl_divergence(pol, prev_policy, dist.state_mean, dist.state_cov).sum())
        return pol, (kl if math.isfinite(kl) else math.inf)

    # η at its lower bound: accept any KL ≤ ε(1+rtol).
    try:
        pol, kl = evaluate(eta_min)
        if kl <= upper:
            return TrustRegionResult(pol, eta_min, kl)
    except NotPositiveDefiniteError:
        pass
    if eta_max == eta_min:
        raise TrustRegionError(f"η fixed at {eta_min:g} violates the trust region or Q_uu is not PD", group=group)
    # η at its upper bound must be feasible.
    try:
        pol, kl = evaluate(eta_max)
    except NotPositiveDefiniteError as e:
        raise TrustRegionError(
            f"Q_uu is not positive definite even at η_max = {eta_max:g} "
            f"({'group=' + repr(group) + ', ' if group is not None else ''}t={e.t}); "
            "the cost's action block is too negative for the trust region",
            group=group,
            t=e.t,
        ) from e
    if kl > upper:
        raise TrustRegionError(
            f"KL = {kl:.4g} > ε(1+rtol) = {upper:.4g} even at η_max = {eta_max:g}"
            + (f" (group={group!r})" if group is not None else ""),
            group=group,
        )
    if kl >= lower:
        return TrustRegionResult(pol, eta_max, kl)
    best = TrustRegionResult(pol, eta_max, kl)
    # Bisection on log η; invariant: lo infeasible (KL too large or non-PD), hi has KL < ε(1−rtol).
    lo, hi = math.log(eta_min), math.log(eta_max)
    x = (lo + hi) / 2
    if eta_init is not None and eta_min < eta_init < eta_max:
        x = math.log(eta_init)
    for _ in range(max_iters):
        eta = math.exp(x)
        try:
            pol, kl = evaluate(eta)
        except NotPositiveDefiniteError:
            lo = x
        else:
            if kl > upper:
                lo = x
            elif kl < lower:
                hi = x
                best = TrustRegionResult(pol, eta, kl)
            else:
                return TrustRegionResult(pol, eta, kl)
        x = (lo + hi) / 2
    warnings.warn(
        f"trust-region dual did not reach KL ∈ [{lower:.4g}, {upper:.4g}] in {max_iters} steps; "
        f"returning η = {best.eta:.4g} with KL = {best.kl:.4g}",
        RuntimeWarning,
        stacklevel=2,
    )
    return best
