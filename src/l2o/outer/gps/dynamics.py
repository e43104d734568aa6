"""Fitting time-varying linear-Gaussian dynamics p̃ with a normal-inverse-Wishart prior (gps.md §4).

Per transition t (s_t, a_t → s_{t+1}, t = 0..T−2) take y = [s_t; a_t; s_{t+1}] (size p = 2D + d)
from N samples, with empirical mean μ̂ and (maximum-likelihood) covariance Σ̂. A prior
(μ₀, Φ₀, m, n₀), fitted on data pooled over all t, gives the MAP covariance

    Σ = (Φ₀ + N Σ̂ + (N m / (N + m)) (μ̂ − μ₀)(μ̂ − μ₀)ᵀ) / (N + n₀),

and conditioning N(μ̂, Σ) on [s_t; a_t] (with a small ridge on that block) yields
[A_t B_t] = Σ_{y,xu} Σ_{xu,xu}⁻¹, c_t = μ̂_y − [A_t B_t] μ̂_xu and F_t = Σ_yy − [A_t B_t] Σ_{xu,y}.
As in the GPS reference code the mean is the empirical μ̂ (the prior only regularises Σ).

Priors implement :class:`DynamicsPrior`: ``fit(pooled, weights=None)`` then
``eval(pts) -> (μ₀, Φ₀, m, n₀)`` where ``pts`` are the rows y of the transition being fitted
(a GMM prior uses them to choose its components). Convention: Φ₀ = n₀ · S₀ for a prior covariance
S₀, so with N = 0 the fit returns S₀, and Σ is a convex combination of S₀ and Σ̂ when μ̂ = μ₀.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .linear_gaussian import DTYPE, LinearGaussianDynamics, _as64, _sym

__all__ = [
    "DynamicsPrior",
    "GaussianPrior",
    "GMMPrior",
    "transition_samples",
    "pooled_transitions",
    "fit_dynamics",
]


@runtime_checkable
class DynamicsPrior(Protocol):
    """Normal-inverse-Wishart prior over the joint Gaussian of [s_t; a_t; s_{t+1}]."""

    def fit(self, pooled: Tensor, weights: Tensor | None = None) -> DynamicsPrior:
        """Fit on rows [M, p] pooled over t (``weights`` [M], all > 0 if given); returns self."""
        ...

    def eval(self, pts: Tensor) -> tuple[Tensor, Tensor, float, float]:
        """(μ₀ [p], Φ₀ [p, p], m, n₀) for the transition whose rows are ``pts`` [N, p]."""
        ...


def _weighted_moments(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    w = w / w.sum()
    mean = w @ x
    xc = x - mean
    cov = _sym((xc * w[:, None]).T @ xc)
    return mean, cov


def _ridge_eye(cov: Tensor, ridge: float) -> Tensor:
    p = cov.shape[-1]
    scale = float(torch.diagonal(cov).mean()) if p else 1.0
    scale = scale if scale > 0 and math.isfinite(scale) else 1.0
    return ridge * scale * torch.eye(p, dtype=DTYPE)


class GaussianPrior:
    """Single-Gaussian NIW prior: μ₀ = pooled mean, Φ₀ = n₀ (pooled covariance + ridge).

    ``m`` and ``n₀`` are pseudo-counts (how many samples the prior is worth). ``m = n₀ = 0`` turns
    the prior off (plain maximum-likelihood fit).
    """

    def __init__(self, m: float = 1.0, n0: float = 1.0, ridge: float = 1e-6) -> None:
        if m < 0 or n0 < 0:
            raise ValueError("m and n0 must be non-negative")
        self.m = float(m)
        self.n0 = float(n0)
        self.ridge = float(ridge)
        self.mu0: Tensor | None = None
        self.cov0: Tensor | None = None

    def fit(self, pooled: Tensor, weights: Tensor | None = None) -> GaussianPrior:
        x = _as64(pooled, "pooled")
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"pooled must be a non-empty [M, p] matrix, got {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("pooled contains non-finite values")
        w = torch.ones(x.shape[0], dtype=DTYPE) if weights is None else _as64(weights, "weights")
        return self.fit_moments(*_weighted_moments(x, w))

    def fit_moments(self, mean: Tensor, cov: Tensor) -> GaussianPrior:
        """Set the prior from the pooled mean [p] and (maximum-likelihood) covariance [p, p]."""
        mean, cov = _as64(mean, "mean"), _sym(_as64(cov, "cov"))
        self.mu0 = mean
        self.cov0 = cov + _ridge_eye(cov, self.ridge)
        return self

    def eval(self, pts: Tensor) -> tuple[Tensor, Tensor, float, float]:
        if self.mu0 is None or self.cov0 is None:
            raise RuntimeError("GaussianPrior is not fitted; call fit(pooled) first")
        return self.mu0, self.n0 * self.cov0, self.m, self.n0


class GMMPrior:
    """GMM NIW prior (as in GPS): a Gaussian mixture fitted by EM on the pooled rows.

    ``eval(pts)`` averages the components' responsibilities over ``pts`` to weights w_k and
    moment-matches the mixture: μ₀ = Σ w_k μ_k, S₀ = Σ w_k (Σ_k + (μ_k − μ₀)(μ_k − μ₀)ᵀ),
    Φ₀ = n₀ S₀.
    """

    def __init__(
        self,
        n_components: int = 8,
        m: float = 1.0,
        n0: float = 1.0,
        ridge: float = 1e-6,
        max_iters: int = 100,
        tol: float = 1e-6,
        seed: int = 0,
    ) -> None:
        if n_components < 1:
            raise ValueError("n_components must be ≥ 1")
        self.n_components = int(n_components)
        self.m = float(m)
        self.n0 = float(n0)
        self.ridge = float(ridge)
        self.max_iters = int(max_iters)
        self.tol = float(tol)
        self.seed = int(seed)
        self.weights: Tensor | None = None  # [K] mixing weights
        self.means: Tensor | None = None  # [K, p]
        self.covs: Tensor | None = None  # [K, p, p]
        self._chols: Tensor | None = None

    def _log_joint(self, x: Tensor) -> Tensor:
        """log w_k + log N(x | μ_k, Σ_k), [M, K]."""
        assert self.means is not None and self._chols is not None and self.weights is not None
        p = x.shape[1]
        diff = x[:, None, :] - self.means[None]  # [M, K, p]
        L = self._chols.expand(x.shape[0], *self._chols.shape)
        z = torch.linalg.solve_triangular(L, diff.unsqueeze(-1), upper=False).squeeze(-1)
        logdet = 2.0 * torch.log(torch.diagonal(self._chols, dim1=-2, dim2=-1)).sum(-1)
        logn = -0.5 * (z.square().sum(-1) + logdet + p * math.log(2 * math.pi))
        return logn + torch.log(self.weights)

    def _set_components(self, weights: Tensor, means: Tensor, covs: Tensor, global_cov: Tensor) -> None:
        reg = _ridge_eye(global_cov, self.ridge)
        covs = _sym(covs) + reg
        self.weights, self.means, self.covs = weights, means, covs
        self._chols = torch.linalg.cholesky(covs)

    def fit(self, pooled: Tensor, weights: Tensor | None = None) -> GMMPrior:
        x = _as64(pooled, "pooled")
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"pooled must be a non-empty [M, p] matrix, got {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("pooled contains non-finite values")
        M, p = x.shape
        sw = torch.ones(M, dtype=DTYPE) if weights is None else _as64(weights, "weights")
        sw = sw / sw.sum()
        K = min(self.n_components, M)
        _, gcov = _weighted_moments(x, sw)
        # Init: k-means++ seeding (on whitened data) and a few Lloyd steps → hard responsibilities.
        g = torch.Generator().manual_seed(self.seed)
        z = x / torch.diagonal(gcov).clamp_min(1e-300).sqrt()
        centers = z[torch.randint(M, (1,), generator=g)]
        for _ in range(1, K):
            d2 = torch.cdist(z, centers).square().min(1).values
            prob = d2 if float(d2.sum()) > 0 else torch.ones(M, dtype=DTYPE)
            centers = torch.cat([centers, z[torch.multinomial(prob, 1, generator=g)]])
        for _ in range(10):
            lab = torch.cdist(z, centers).argmin(1)
            onehot = torch.nn.functional.one_hot(lab, K).to(DTYPE)
            cnt = onehot.sum(0)
            centers = torch.where(cnt[:, None] > 0, (onehot.T @ z) / cnt.clamp_min(1)[:, None], centers)
        resp = torch.nn.functional.one_hot(torch.cdist(z, centers).argmin(1), K).to(DTYPE)
        prev = -math.inf
        for _ in range(self.max_iters):
            r = resp * sw[:, None]  # [M, K]
            nk = r.sum(0).clamp_min(1e-300)
            means = (r.T @ x) / nk[:, None]
            diff = x[:, None, :] - means[None]
            covs = torch.einsum("mk,mki,mkj->kij", r, diff, diff) / nk[:, None, None]
            self._set_components(nk / nk.sum(), means, covs, gcov)
            logj = self._log_joint(x)
            ll_each = torch.logsumexp(logj, dim=1)
            ll = float(sw @ ll_each)
            resp = torch.exp(logj - ll_each[:, None])
            if abs(ll - prev) <= self.tol * max(1.0, abs(ll)):
                break
            prev = ll
        return self

    def eval(self, pts: Tensor) -> tuple[Tensor, Tensor, float, float]:
        if self.means is None or self.covs is None:
            raise RuntimeError("GMMPrior is not fitted; call fit(pooled) first")
        x = _as64(pts, "pts")
        if x.ndim != 2 or x.shape[0] == 0:
            w = self.weights
        else:
            logj = self._log_joint(x)
            resp = torch.exp(logj - torch.logsumexp(logj, dim=1, keepdim=True))
            w = resp.mean(0)
        assert w is not None
        mu0 = w @ self.means
        dm = self.means - mu0
        cov0 = torch.einsum("k,kij->ij", w, self.covs) + torch.einsum("k,ki,kj->ij", w, dm, dm)
        return mu0, self.n0 * _sym(cov0), self.m, self.n0


def _check_xu(X: Tensor, U: Tensor) -> tuple[Tensor, Tensor]:
    X = _as64(X, "X")
    U = _as64(U, "U")
    if X.ndim != 3 or U.ndim != 3 or X.shape[:2] != U.shape[:2]:
        raise ValueError(f"X must be [N, T, D] and U [N, T, d] with equal N, T; got {tuple(X.shape)}, {tuple(U.shape)}")
    if X.shape[1] < 2:
        raise ValueError("need T ≥ 2 time steps to fit transitions")
    return X, U


def _transition_weights(weights: Tensor | None, N: int, T: int) -> Tensor:
    """Weights of the T−1 transitions of each sample, [N, T−1]."""
    if weights is None:
        return torch.ones(N, T - 1, dtype=DTYPE)
    w = _as64(weights, "weights")
    if w.shape == (N,):
        w = w[:, None].expand(N, T - 1)
    elif w.shape != (N, T - 1):
        raise ValueError(f"weights must be [N] = [{N}] or [N, T-1] = [{N}, {T - 1}], got {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("weights must be finite and non-negative")
    return w


def transition_samples(X: Tensor, U: Tensor) -> Tensor:
    """Rows y = [s_t; a_t; s_{t+1}] per transition, [N, T−1, 2D + d]."""
    X, U = _check_xu(X, U)
    return torch.cat([X[:, :-1], U[:, :-1], X[:, 1:]], dim=-1)


def _valid_rows(Y: Tensor, w: Tensor) -> Tensor:
    """Mask of rows with positive weight; raise if any of them is non-finite."""
    keep = w > 0
    bad = keep & ~torch.isfinite(Y).all(-1)
    if bool(bad.any()):
        idx = torch.nonzero(bad)[0].tolist()
        raise ValueError(
            f"non-finite values in a sample with positive weight (index {idx}); "
            "drop diverged trajectories with weight 0"
        )
    return keep


def pooled_transitions(X: Tensor, U: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """All transition rows with positive weight pooled over t: ([M, 2D + d], weights [M])."""
    Y = transition_samples(X, U)
    N, Tm1, p = Y.shape
    w = _transition_weights(weights, N, Tm1 + 1)
    keep = _valid_rows(Y, w)
    return Y[keep], w[keep]


def fit_dynamics(
    X: Tensor,
    U: Tensor,
    weights: Tensor | None = None,
    prior: DynamicsPrior | None = None,
    ridge: float = 1e-6,
    min_noise: float = 1e-9,
) -> LinearGaussianDynamics:
    """Fit p̃(s_{t+1}|s_t, a_t) = N(A_t s_t + B_t a_t + c_t, F_t), t = 0..T−2, from samples.

    Args:
        X: states [N, T, D]; U: actions [N, T, d] (U[:, T−1] is unused).
        weights: [N] per trajectory or [N, T−1] per transition; 0 drops a sample (it may then
            contain NaN/inf). Non-finite values in a sample with positive weight raise ValueError.
            The sample count in the NIW update is Kish's effective size (Σw)²/Σw².
        prior: a fitted :class:`DynamicsPrior`; ``None`` fits a default :class:`GaussianPrior`
            on the pooled transitions of (X, U).
        ridge: added to Σ_{xu,xu} before conditioning, relative to its mean diagonal.
        min_noise: floor on the eigenvalues of F_t, relative to the mean variance of s_{t+1}.
    """
    X, U = _check_xu(X, U)
    N, T, D = X.shape
    d = U.shape[-1]
    n = D + d
    w_all = _transition_weights(weights, N, T)
    # Pass 1: per-t rows (never materialising all of them at once), weighted moments.
    rows, stats = [], []
    for t in range(T - 1):
        y_t = torch.cat([X[:, t], U[:, t], X[:, t + 1]], -1)
        keep = _valid_rows(y_t, w_all[:, t])
        y, w = y_t[keep], w_all[keep, t]
        rows.append(y)
        if y.shape[0] == 0:
            stats.append(None)
        else:
            mu, emp = _weighted_moments(y, w)
            stats.append((float(w.sum()), float(w.sum() ** 2 / w.square().sum()), mu, emp))
    if prior is None:
        # Default single-Gaussian prior from the pooled moments (parallel-axis combination).
        valid = [st for st in stats if st is not None]
        if not valid:
            raise ValueError("no samples with positive weight")
        W = sum(st[0] for st in valid)
        mean = sum(st[0] * st[2] for st in valid) / W
        cov = sum(st[0] * (st[3] + torch.outer(st[2] - mean, st[2] - mean)) for st in valid) / W
        prior = GaussianPrior().fit_moments(mean, cov)
    # Pass 2: NIW posterior per t and conditioning on [s_t; a_t].
    eye_n = torch.eye(n, dtype=DTYPE)
    A, B, c, F = [], [], [], []
    for t in range(T - 1):
        mu0, Phi0, m, n0 = prior.eval(rows[t])
        mu0, Phi0 = _as64(mu0, "mu0"), _as64(Phi0, "Phi0")
        if stats[t] is None:
            Nt = 0.0
            mu, emp = mu0, torch.zeros_like(Phi0)
        else:
            _, Nt, mu, emp = stats[t]
        if Nt + n0 <= 0:
            raise ValueError(f"t={t}: no samples and an improper prior (n0 = 0)")
        dmu = mu - mu0
        shrink = Nt * m / (Nt + m) if Nt + m > 0 else 0.0
        sigma = _sym((Phi0 + Nt * emp + shrink * torch.outer(dmu, dmu)) / (Nt + n0))
        Sxx = sigma[:n, :n]
        Sxx = Sxx + ridge * max(float(torch.diagonal(Sxx).mean()), 1e-300) * eye_n
        Sxy = sigma[:n, n:]
        AB = torch.linalg.solve(Sxx, Sxy).T  # [D, n]
        Ft = _sym(sigma[n:, n:] - AB @ Sxy)
        floor = min_noise * max(float(torch.diagonal(sigma[n:, n:]).mean()), 1e-300)
        ev, V = torch.linalg.eigh(Ft)
        if float(ev.min()) < floor:
            Ft = _sym((V * ev.clamp_min(floor)) @ V.T)
        A.append(AB[:, :D])
        B.append(AB[:, D:])
        c.append(mu[n:] - AB @ mu[:n])
        F.append(Ft)
    return LinearGaussianDynamics(torch.stack(A), torch.stack(B), torch.stack(c), torch.stack(F))
