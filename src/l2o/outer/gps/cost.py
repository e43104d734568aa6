"""Quadratic cost models c̃_t(s, a) = ½ xuᵀ C_t xu + d_tᵀ xu + h_t with xu = [s; a] (gps.md §5).

Two ways to build one:

* (a) :func:`cost_from_derivatives`: second-order Taylor expansion around reference points
  (value, gradient and Hessian known, e.g. the gradient from the sampler plus a curvature estimate).
* (b) :func:`fit_quadratic_cost` / :func:`fit_quadratic_cost_from_moments`: ridge regression of
  observed costs on quadratic features, optionally pooled over a window of time steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .linear_gaussian import DTYPE, _as64, _check_finite, _check_symmetric, _sym

__all__ = [
    "QuadraticCost",
    "cost_from_derivatives",
    "fit_quadratic_cost",
    "fit_quadratic_cost_from_moments",
    "project_action_block",
]


@dataclass(frozen=True, eq=False)
class QuadraticCost:
    """c̃_t(s, a) = ½ [s; a]ᵀ C_t [s; a] + d_tᵀ [s; a] + h_t, t = 0..T−1.

    Attributes:
        C: [T, n, n] symmetric (n = D + d); d: [T, n]; h: [T]; dim_s: D.
    """

    C: Tensor
    d: Tensor
    h: Tensor
    dim_s: int

    def __post_init__(self) -> None:
        C, d, h = _as64(self.C, "C"), _as64(self.d, "d"), _as64(self.h, "h")
        if C.ndim != 3 or C.shape[1] != C.shape[2]:
            raise ValueError(f"C must have shape [T, n, n], got {tuple(C.shape)}")
        T, n, _ = C.shape
        if d.shape != (T, n):
            raise ValueError(f"d must have shape [T, n] = {(T, n)}, got {tuple(d.shape)}")
        if h.shape != (T,):
            raise ValueError(f"h must have shape [T] = {(T,)}, got {tuple(h.shape)}")
        if not 0 <= int(self.dim_s) <= n:
            raise ValueError(f"dim_s must be in [0, {n}], got {self.dim_s}")
        for name, x in (("C", C), ("d", d), ("h", h)):
            _check_finite(x, name)
        object.__setattr__(self, "C", _check_symmetric(C, "C"))
        object.__setattr__(self, "d", d)
        object.__setattr__(self, "h", h)
        object.__setattr__(self, "dim_s", int(self.dim_s))

    @classmethod
    def _unchecked(cls, C: Tensor, d: Tensor, h: Tensor, dim_s: int) -> QuadraticCost:
        """Build from parts known to be valid (sums and scalings of validated costs): skips the
        finiteness and symmetry checks, which dominated the LQG dual's time on large states."""
        obj = object.__new__(cls)
        for name, value in (("C", C), ("d", d), ("h", h), ("dim_s", int(dim_s))):
            object.__setattr__(obj, name, value)
        return obj

    @property
    def T(self) -> int:
        return self.C.shape[0]

    @property
    def n(self) -> int:
        return self.C.shape[1]

    @property
    def dim_a(self) -> int:
        return self.n - self.dim_s

    @classmethod
    def zeros(cls, T: int, dim_s: int, dim_a: int) -> QuadraticCost:
        n = dim_s + dim_a
        return cls(torch.zeros(T, n, n, dtype=DTYPE), torch.zeros(T, n, dtype=DTYPE), torch.zeros(T, dtype=DTYPE), dim_s)

    @classmethod
    def from_blocks(
        cls,
        Css: Tensor,
        Caa: Tensor,
        Csa: Tensor | None = None,
        ds: Tensor | None = None,
        da: Tensor | None = None,
        h: Tensor | None = None,
    ) -> QuadraticCost:
        """From blocks [T, D, D], [T, d, d], [T, D, d], [T, D], [T, d], [T] (missing ones zero)."""
        Css, Caa = _as64(Css, "Css"), _as64(Caa, "Caa")
        T, D, _ = Css.shape
        dd = Caa.shape[-1]
        Csa = torch.zeros(T, D, dd, dtype=DTYPE) if Csa is None else _as64(Csa, "Csa")
        ds = torch.zeros(T, D, dtype=DTYPE) if ds is None else _as64(ds, "ds")
        da = torch.zeros(T, dd, dtype=DTYPE) if da is None else _as64(da, "da")
        h = torch.zeros(T, dtype=DTYPE) if h is None else _as64(h, "h")
        C = torch.cat([torch.cat([Css, Csa], -1), torch.cat([Csa.mT, Caa], -1)], -2)
        return cls(C, torch.cat([ds, da], -1), h, D)

    def __add__(self, other: QuadraticCost) -> QuadraticCost:
        if not isinstance(other, QuadraticCost):
            return NotImplemented
        if (self.T, self.n, self.dim_s) != (other.T, other.n, other.dim_s):
            raise ValueError("cannot add costs of different shapes")
        return QuadraticCost._unchecked(self.C + other.C, self.d + other.d, self.h + other.h, self.dim_s)

    def scale(self, alpha: Tensor | float) -> QuadraticCost:
        """α_t c̃_t; α a scalar or [T]."""
        a = _as64(alpha, "alpha")
        a = a.expand(self.T) if a.ndim == 0 else a
        return QuadraticCost._unchecked(self.C * a[:, None, None], self.d * a[:, None], self.h * a, self.dim_s)

    def __call__(self, s: Tensor, a: Tensor, t: int | None = None) -> Tensor:
        """c̃_t(s, a). With ``t``: s [..., D], a [..., d] → [...]; without: [..., T, ·] → [..., T]."""
        xu = torch.cat([_as64(s, "s"), _as64(a, "a")], -1)
        if t is None:
            Cx = torch.einsum("...ti,tij->...tj", xu, self.C)
            d, h = self.d, self.h
        else:
            Cx = xu @ self.C[t]
            d, h = self.d[t], self.h[t]
        return 0.5 * (Cx * xu).sum(-1) + (xu * d).sum(-1) + h

    def expected(self, xu_mean: Tensor, xu_cov: Tensor) -> Tensor:
        """E c̃_t under xu_t ~ N(μ_t, Σ_t): ½ tr(C_t Σ_t) + ½ μ_tᵀ C_t μ_t + d_tᵀ μ_t + h_t, [T]."""
        mu = _as64(xu_mean, "xu_mean")
        S = _as64(xu_cov, "xu_cov")
        quad = torch.einsum("ti,tij,tj->t", mu, self.C, mu)
        return 0.5 * (torch.einsum("tij,tji->t", self.C, S) + quad) + (self.d * mu).sum(-1) + self.h


def project_action_block(cost: QuadraticCost, floor: float) -> QuadraticCost:
    """Clip the eigenvalues of the action block C_aa of every C_t to ≥ ``floor``."""
    D = cost.dim_s
    Caa = cost.C[:, D:, D:]
    ev, V = torch.linalg.eigh(Caa)
    Caa = _sym((V * ev.clamp_min(floor).unsqueeze(-2)) @ V.mT)
    C = cost.C.clone()
    C[:, D:, D:] = Caa
    return QuadraticCost(C, cost.d, cost.h, D)


def cost_from_derivatives(
    xu_ref: Tensor, value: Tensor, grad: Tensor, hess: Tensor, dim_s: int
) -> QuadraticCost:
    """Option (a): c̃_t(xu) = v_t + g_tᵀ(xu − xu₀_t) + ½ (xu − xu₀_t)ᵀ H_t (xu − xu₀_t).

    xu_ref [T, n], value [T], grad [T, n], hess [T, n, n] (symmetrised). Gives C = H,
    d = g − H xu₀, h = v − gᵀ xu₀ + ½ xu₀ᵀ H xu₀.
    """
    x0 = _as64(xu_ref, "xu_ref")
    v = _as64(value, "value")
    g = _as64(grad, "grad")
    H = _sym(_as64(hess, "hess"))
    Hx = (H @ x0.unsqueeze(-1)).squeeze(-1)
    return QuadraticCost(H, g - Hx, v - (g * x0).sum(-1) + 0.5 * (Hx * x0).sum(-1), dim_s)


def _quad_features(first: Tensor, second: Tensor) -> Tensor:
    """[..., n(n+1)/2 + n]: second[i, j] for i < j, ½ second[i, i], then first."""
    n = first.shape[-1]
    iu = torch.triu_indices(n, n)
    q = second[..., iu[0], iu[1]]
    q = torch.where(iu[0] == iu[1], 0.5 * q, q)
    return torch.cat([q, first], -1)


def _unpack(beta: Tensor, n: int) -> tuple[Tensor, Tensor]:
    iu = torch.triu_indices(n, n)
    nq = iu.shape[1]
    C = torch.zeros(n, n, dtype=DTYPE)
    C[iu[0], iu[1]] = beta[:nq]
    C = C + torch.triu(C, 1).T
    return C, beta[nq:]


def fit_quadratic_cost_from_moments(
    first: Tensor,
    second: Tensor,
    costs: Tensor,
    dim_s: int,
    weights: Tensor | None = None,
    ridge: float = 1e-8,
    window: int = 0,
    action_eig_floor: float | None = None,
) -> QuadraticCost:
    """Option (b) on moment features: costs[r, t] ≈ ½ tr(C_t second[r, t]) + d_tᵀ first[r, t] + h_t.

    For a single sample, first = xu and second = xu xuᵀ; for a convolutional group, the group sums
    S1 = Σ_j xu^j and S2 = Σ_j xu^j xu^jᵀ (gps.md §5, one shared intercept h_t).

    Args:
        first: [R, T, n]; second: [R, T, n, n]; costs: [R, T].
        weights: [R] or [R, T]; 0 drops a row (which may then be non-finite).
        ridge: Tikhonov penalty on (C, d) (not on h), relative to the mean variance of the
            centred features.
        window: rows of steps t−window..t+window (clipped to [0, T−1]) are pooled to fit step t.
        action_eig_floor: if given, clip the eigenvalues of C_aa to ≥ this (see
            :func:`project_action_block`).
    """
    S1 = _as64(first, "first")
    S2 = _as64(second, "second")
    y = _as64(costs, "costs")
    R, T, n = S1.shape
    if S2.shape != (R, T, n, n) or y.shape != (R, T):
        raise ValueError("first must be [R, T, n], second [R, T, n, n] and costs [R, T]")
    w = torch.ones(R, T, dtype=DTYPE) if weights is None else _as64(weights, "weights")
    if w.shape == (R,):
        w = w[:, None].expand(R, T)
    if w.shape != (R, T) or bool((w < 0).any()):
        raise ValueError("weights must be non-negative, [R] or [R, T]")
    Phi = _quad_features(S1, _sym(S2))  # [R, T, q]
    keep = w > 0
    finite = torch.isfinite(Phi).all(-1) & torch.isfinite(y)
    if bool((keep & ~finite).any()):
        raise ValueError("non-finite features or costs in a row with positive weight; give it weight 0")
    Phi = torch.where(keep[..., None], Phi, 0.0)
    y = torch.where(keep, y, 0.0)
    w = torch.where(keep, w, 0.0)
    Cs, ds, hs = [], [], []
    for t in range(T):
        lo, hi = max(0, t - window), min(T, t + window + 1)
        X = Phi[:, lo:hi].reshape(-1, Phi.shape[-1])
        yt = y[:, lo:hi].reshape(-1)
        wt = w[:, lo:hi].reshape(-1)
        sel = wt > 0
        X, yt, wt = X[sel], yt[sel], wt[sel]
        if X.shape[0] == 0:
            raise ValueError(f"no rows with positive weight to fit the cost at t={t}")
        wn = wt / wt.sum()
        xm, ym = wn @ X, wn @ yt
        sw = wn.sqrt()
        Xc = (X - xm) * sw[:, None]
        yc = (yt - ym) * sw
        scale = float(Xc.square().sum(0).mean())
        lam = ridge * (scale if scale > 0 else 1.0)
        q = Xc.shape[1]
        if Xc.shape[0] >= q:  # primal normal equations
            beta = torch.linalg.solve(Xc.T @ Xc + lam * torch.eye(q, dtype=DTYPE), Xc.T @ yc)
        else:  # dual (kernel) form, fewer rows than features
            alpha = torch.linalg.solve(Xc @ Xc.T + lam * torch.eye(Xc.shape[0], dtype=DTYPE), yc)
            beta = Xc.T @ alpha
        C, dt = _unpack(beta, n)
        Cs.append(C)
        ds.append(dt)
        hs.append(ym - xm @ beta)
    cost = QuadraticCost(torch.stack(Cs), torch.stack(ds), torch.stack(hs), dim_s)
    if action_eig_floor is not None:
        cost = project_action_block(cost, action_eig_floor)
    return cost


def fit_quadratic_cost(
    S: Tensor,
    A: Tensor,
    costs: Tensor,
    weights: Tensor | None = None,
    ridge: float = 1e-8,
    window: int = 0,
    action_eig_floor: float | None = None,
) -> QuadraticCost:
    """Option (b) per sample: ridge regression of costs [N, T] on quadratic features of
    xu = [s; a] (S [N, T, D], A [N, T, d]). See :func:`fit_quadratic_cost_from_moments`."""
    S = _as64(S, "S")
    A = _as64(A, "A")
    xu = torch.cat([S, A], -1)
    return fit_quadratic_cost_from_moments(
        xu,
        xu.unsqueeze(-1) * xu.unsqueeze(-2),
        costs,
        S.shape[-1],
        weights=weights,
        ridge=ridge,
        window=window,
        action_eig_floor=action_eig_floor,
    )
