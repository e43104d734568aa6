"""Time-varying linear-Gaussian policies ψ and dynamics p̃, and Gaussian state propagation.

Conventions (shared by all of :mod:`l2o.outer.gps`):

* Everything is float64; inputs are converted.
* Time is the leading dimension of stacked tensors; time steps are t = 0, …, T−1.
* The policy has T entries: ψ(a_t | s_t, t) = N(K_t s_t + k_t, G_t), t = 0..T−1.
* The dynamics have **T−1** entries: entry t is the transition s_t → s_{t+1},
  p̃(s_{t+1} | s_t, a_t) = N(A_t s_t + B_t a_t + c_t, F_t), t = 0..T−2. (The last action a_{T−1}
  has no successor state; it only enters the step cost c̃_{T−1}(s, a).)
* xu = [s; a] is the joint state–action vector of size n = D + d.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

import torch
from torch import Tensor

DTYPE = torch.float64

__all__ = [
    "LinearGaussianPolicy",
    "LinearGaussianDynamics",
    "StateDistribution",
    "forward",
    "kl_divergence",
    "fit_linear_gaussian_policy",
    "floor_noise",
]


def _as64(x: Tensor | float, name: str) -> Tensor:
    try:
        t = torch.as_tensor(x, dtype=DTYPE)
    except (TypeError, ValueError) as e:  # pragma: no cover - defensive
        raise ValueError(f"{name}: cannot convert to a float64 tensor ({e})") from e
    return t


def _sym(x: Tensor) -> Tensor:
    return 0.5 * (x + x.mT)


def _check_symmetric(x: Tensor, name: str, rtol: float = 1e-8) -> Tensor:
    xd = x.detach()
    scale = max(1.0, float(xd.abs().max())) if x.numel() else 1.0
    err = float((xd - xd.mT).abs().max()) if x.numel() else 0.0
    if err > rtol * scale:
        raise ValueError(f"{name} is not symmetric (max |X − Xᵀ| = {err:.3g})")
    return _sym(x)


def _check_finite(x: Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains non-finite values")


def _chol_logdet(L: Tensor) -> Tensor:
    return 2.0 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)


@dataclass(frozen=True, eq=False)
class LinearGaussianPolicy:
    """ψ(a_t | s_t, t) = N(K_t s_t + k_t, G_t), t = 0..T−1.

    Attributes:
        K: feedback gains, [T, d, D].
        k: open-loop terms, [T, d].
        cov: action covariances G_t, [T, d, d] (symmetric positive definite).
    """

    K: Tensor
    k: Tensor
    cov: Tensor
    _chol: Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        K = _as64(self.K, "K")
        k = _as64(self.k, "k")
        cov = _as64(self.cov, "cov")
        if K.ndim != 3:
            raise ValueError(f"K must have shape [T, d, D], got {tuple(K.shape)}")
        T, d, D = K.shape
        if k.shape != (T, d):
            raise ValueError(f"k must have shape [T, d] = {(T, d)}, got {tuple(k.shape)}")
        if cov.shape != (T, d, d):
            raise ValueError(f"cov must have shape [T, d, d] = {(T, d, d)}, got {tuple(cov.shape)}")
        for name, x in (("K", K), ("k", k), ("cov", cov)):
            _check_finite(x, name)
        cov = _check_symmetric(cov, "cov")
        L, info = torch.linalg.cholesky_ex(cov)
        if bool((info != 0).any()):
            t = int(torch.nonzero(info)[0, 0])
            raise ValueError(f"cov (G_t) is not positive definite at t={t}")
        object.__setattr__(self, "K", K)
        object.__setattr__(self, "k", k)
        object.__setattr__(self, "cov", cov)
        object.__setattr__(self, "_chol", L)

    # ----------------------------------------------------------------- shapes and factors
    @property
    def T(self) -> int:
        return self.K.shape[0]

    @property
    def dim_a(self) -> int:
        """d, the action size."""
        return self.K.shape[1]

    @property
    def dim_s(self) -> int:
        """D, the state size."""
        return self.K.shape[2]

    @property
    def chol(self) -> Tensor:
        """Lower Cholesky factors of G_t, [T, d, d]."""
        return self._chol

    @cached_property
    def precision(self) -> Tensor:
        """G_t⁻¹, [T, d, d]."""
        return _sym(torch.cholesky_inverse(self._chol))

    @cached_property
    def logdet_cov(self) -> Tensor:
        """log det G_t, [T]."""
        return _chol_logdet(self._chol)

    def entropy(self) -> Tensor:
        """Differential entropy of ψ(·|s, t) (independent of s), [T]."""
        d = self.dim_a
        return 0.5 * (self.logdet_cov + d * (1.0 + math.log(2.0 * math.pi)))

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_gain(
        cls,
        K: Tensor,
        k: Tensor | None = None,
        cov: Tensor | float = 1.0,
        T: int | None = None,
    ) -> LinearGaussianPolicy:
        """Build a policy from a (possibly time-invariant) gain.

        K: [d, D] (repeated over ``T`` steps, ``T`` required) or [T, d, D].
        k: None (zeros), [d] or [T, d].
        cov: scalar σ² (G_t = σ² I), [d] (diagonal), [d, d] or [T, d, d].
        """
        K = _as64(K, "K")
        if K.ndim == 2:
            if T is None:
                raise ValueError("T is required when K is a single [d, D] gain")
            K = K.expand(T, *K.shape).clone()
        elif K.ndim != 3:
            raise ValueError(f"K must have shape [d, D] or [T, d, D], got {tuple(K.shape)}")
        T_, d, _ = K.shape
        if T is not None and T != T_:
            raise ValueError(f"K has {T_} time steps but T={T}")
        if k is None:
            k = torch.zeros(T_, d, dtype=DTYPE)
        else:
            k = _as64(k, "k")
            if k.ndim == 1:
                k = k.expand(T_, d).clone()
        cov = _as64(cov, "cov")
        if cov.ndim == 0:
            cov = cov * torch.eye(d, dtype=DTYPE).expand(T_, d, d).clone()
        elif cov.ndim == 1:
            cov = torch.diag(cov).expand(T_, d, d).clone()
        elif cov.ndim == 2:
            cov = cov.expand(T_, d, d).clone()
        return cls(K, k, cov)

    # ----------------------------------------------------------------- evaluation
    def mean(self, s: Tensor, t: int | None = None) -> Tensor:
        """K_t s + k_t. With ``t``: s [..., D] → [..., d]; without: s [..., T, D] → [..., T, d]."""
        s = _as64(s, "s")
        if t is None:
            return torch.einsum("tij,...tj->...ti", self.K, s) + self.k
        return s @ self.K[t].mT + self.k[t]

    def sample(self, s: Tensor, t: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """a ~ ψ(·|s, t); shapes as in :meth:`mean`."""
        m = self.mean(s, t)
        z = torch.randn(m.shape, dtype=DTYPE, generator=generator)
        L = self._chol if t is None else self._chol[t]
        return m + (L @ z.unsqueeze(-1)).squeeze(-1)

    def log_prob(self, a: Tensor, s: Tensor, t: int | None = None) -> Tensor:
        """log ψ(a|s, t); a [..., d], s [..., D] (or [..., T, ·] without ``t``) → [...]."""
        a = _as64(a, "a")
        r = a - self.mean(s, t)
        L = self._chol if t is None else self._chol[t]
        L = L.expand(*r.shape[:-1], *L.shape[-2:])
        z = torch.linalg.solve_triangular(L, r.unsqueeze(-1), upper=False).squeeze(-1)
        logdet = self.logdet_cov if t is None else self.logdet_cov[t]
        return -0.5 * (z.square().sum(-1) + logdet + self.dim_a * math.log(2.0 * math.pi))


@dataclass(frozen=True, eq=False)
class LinearGaussianDynamics:
    """p̃(s_{t+1} | s_t, a_t) = N(A_t s_t + B_t a_t + c_t, F_t), t = 0..T−2 (T−1 transitions).

    Attributes:
        A: [T−1, D, D]; B: [T−1, D, d]; c: [T−1, D];
        F: [T−1, D, D] transition noise covariance (symmetric positive semi-definite; F = 0 is a
           deterministic system).
    """

    A: Tensor
    B: Tensor
    c: Tensor
    F: Tensor

    def __post_init__(self) -> None:
        A, B, c, F = (_as64(x, n) for x, n in ((self.A, "A"), (self.B, "B"), (self.c, "c"), (self.F, "F")))
        if A.ndim != 3 or A.shape[1] != A.shape[2]:
            raise ValueError(f"A must have shape [T-1, D, D], got {tuple(A.shape)}")
        Tm1, D, _ = A.shape
        if B.ndim != 3 or B.shape[:2] != (Tm1, D):
            raise ValueError(f"B must have shape [T-1, D, d] = [{Tm1}, {D}, d], got {tuple(B.shape)}")
        if c.shape != (Tm1, D):
            raise ValueError(f"c must have shape [T-1, D] = {(Tm1, D)}, got {tuple(c.shape)}")
        if F.shape != (Tm1, D, D):
            raise ValueError(f"F must have shape [T-1, D, D] = {(Tm1, D, D)}, got {tuple(F.shape)}")
        for name, x in (("A", A), ("B", B), ("c", c), ("F", F)):
            _check_finite(x, name)
        F = _check_symmetric(F, "F")
        if Tm1 > 0:
            ev = torch.linalg.eigvalsh(F)
            scale = max(1.0, float(ev.abs().max()))
            if float(ev.min()) < -1e-9 * scale:
                t = int(torch.nonzero(ev.min(-1).values < -1e-9 * scale)[0, 0])
                raise ValueError(f"F (transition covariance) is not positive semi-definite at t={t}")
        object.__setattr__(self, "A", A)
        object.__setattr__(self, "B", B)
        object.__setattr__(self, "c", c)
        object.__setattr__(self, "F", F)

    @property
    def horizon(self) -> int:
        """T (the number of time steps; there are T−1 transitions)."""
        return self.A.shape[0] + 1

    @property
    def dim_s(self) -> int:
        return self.A.shape[1]

    @property
    def dim_a(self) -> int:
        return self.B.shape[2]

    @property
    def AB(self) -> Tensor:
        """[A_t B_t], [T−1, D, D + d]."""
        return torch.cat([self.A, self.B], dim=-1)

    def predict(self, s: Tensor, a: Tensor, t: int) -> Tensor:
        """E[s_{t+1} | s_t = s, a_t = a] = A_t s + B_t a + c_t; s [..., D], a [..., d]."""
        return _as64(s, "s") @ self.A[t].mT + _as64(a, "a") @ self.B[t].mT + self.c[t]


class StateDistribution(NamedTuple):
    """Gaussian marginals of the trajectory distribution, per t = 0..T−1."""

    state_mean: Tensor  # [T, D]
    state_cov: Tensor  # [T, D, D]
    xu_mean: Tensor  # [T, D + d], mean of [s_t; a_t]
    xu_cov: Tensor  # [T, D + d, D + d]


def check_sizes(policy: LinearGaussianPolicy, dynamics: LinearGaussianDynamics) -> None:
    """ψ and p̃ must agree on T (p̃ has T − 1 transitions), the state and the action sizes."""
    if dynamics.horizon != policy.T:
        raise ValueError(f"dynamics has {dynamics.horizon - 1} transitions, policy has T={policy.T} steps (need T−1)")
    if dynamics.dim_s != policy.dim_s or dynamics.dim_a != policy.dim_a:
        raise ValueError("policy and dynamics state/action sizes differ")


def joint_moments(policy: LinearGaussianPolicy, t: int, mu: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and covariance of [s_t; a_t] for s_t ~ N(μ, Σ) and a_t ~ ψ_t(·|s_t)."""
    K = policy.K[t]
    SK = sigma @ K.T
    xu_mean = torch.cat([mu, K @ mu + policy.k[t]])
    xu_cov = torch.cat([torch.cat([sigma, SK], 1), torch.cat([SK.T, _sym(K @ SK + policy.cov[t])], 1)], 0)
    return xu_mean, xu_cov


def forward(
    policy: LinearGaussianPolicy,
    dynamics: LinearGaussianDynamics,
    mu0: Tensor,
    sigma0: Tensor,
) -> StateDistribution:
    """Propagate s_0 ~ N(μ₀, Σ₀) under ψ and p̃.

    Joint of [s_t; a_t]: mean [μ_t; K_t μ_t + k_t], covariance [[Σ_t, Σ_t K_tᵀ], [K_t Σ_t,
    K_t Σ_t K_tᵀ + G_t]]; then μ_{t+1} = [A_t B_t] μ_xu + c_t, Σ_{t+1} = [A_t B_t] Σ_xu [A_t B_t]ᵀ + F_t.
    """
    check_sizes(policy, dynamics)
    T, D = policy.T, policy.dim_s
    mu = _as64(mu0, "mu0").reshape(D)
    sigma = _sym(_as64(sigma0, "sigma0").reshape(D, D))
    AB = dynamics.AB
    means, covs, xu_means, xu_covs = [], [], [], []
    for t in range(T):
        xu_mean, xu_cov = joint_moments(policy, t, mu, sigma)
        means.append(mu)
        covs.append(sigma)
        xu_means.append(xu_mean)
        xu_covs.append(xu_cov)
        if t < T - 1:
            mu = AB[t] @ xu_mean + dynamics.c[t]
            sigma = _sym(AB[t] @ xu_cov @ AB[t].T + dynamics.F[t])
    return StateDistribution(
        torch.stack(means), torch.stack(covs), torch.stack(xu_means), torch.stack(xu_covs)
    )


def kl_divergence(
    p: LinearGaussianPolicy,
    q: LinearGaussianPolicy,
    state_mean: Tensor,
    state_cov: Tensor,
) -> Tensor:
    """E_{s ~ N(μ_t, Σ_t)} KL(p(·|s, t) ‖ q(·|s, t)) for every t, [T].

    With P = G^p_t, Q = G^q_t, ΔK = K^p_t − K^q_t, Δk = k^p_t − k^q_t:
    ½ [tr(Q⁻¹P) − d + log det Q − log det P + (ΔK μ + Δk)ᵀ Q⁻¹ (ΔK μ + Δk) + tr(ΔKᵀ Q⁻¹ ΔK Σ)].
    """
    if (p.T, p.dim_a, p.dim_s) != (q.T, q.dim_a, q.dim_s):
        raise ValueError("p and q have different shapes")
    mu = _as64(state_mean, "state_mean")
    sigma = _as64(state_cov, "state_cov")
    if mu.shape != (p.T, p.dim_s) or sigma.shape != (p.T, p.dim_s, p.dim_s):
        raise ValueError("state_mean must be [T, D] and state_cov [T, D, D]")
    Lq = q.chol
    dK = p.K - q.K
    dm = (dK @ mu.unsqueeze(-1)).squeeze(-1) + (p.k - q.k)  # [T, d]
    z = torch.linalg.solve_triangular(Lq, dm.unsqueeze(-1), upper=False).squeeze(-1)
    maha = z.square().sum(-1)
    W = torch.linalg.solve_triangular(Lq, dK, upper=False)  # Lq⁻¹ ΔK, [T, d, D]
    quad_sigma = torch.einsum("tij,tjk,tik->t", W, sigma, W)  # tr(ΔKᵀ Q⁻¹ ΔK Σ)
    V = torch.linalg.solve_triangular(Lq, p.chol, upper=False)
    trace = V.square().sum((-2, -1))  # tr(Q⁻¹ P)
    return 0.5 * (trace - p.dim_a + q.logdet_cov - p.logdet_cov + maha + quad_sigma)


def fit_linear_gaussian_policy(
    states: Tensor,
    actions: Tensor,
    cov: Tensor | None = None,
    weights: Tensor | None = None,
    ridge: float = 1e-6,
) -> LinearGaussianPolicy:
    """Least-squares fit of a linear-Gaussian policy per t (e.g. π̂ from π's mean actions).

    states [N, T, D], actions [N, T, d]; weights [N] (0 drops a sample). ``ridge`` is added to
    the state covariance (relative to its mean diagonal). ``cov`` [T, d, d] (e.g. Σ^π) is used as
    G_t when given; otherwise the residual covariance plus ``ridge`` times the identity.
    """
    S = _as64(states, "states")
    U = _as64(actions, "actions")
    N, T, D = S.shape
    d = U.shape[-1]
    w = torch.ones(N, dtype=DTYPE) if weights is None else _as64(weights, "weights")
    keep = w > 0
    S, U, w = S[keep], U[keep], w[keep]
    _check_finite(S, "states")
    _check_finite(U, "actions")
    w = w / w.sum()
    ms = torch.einsum("n,ntd->td", w, S)
    mu = torch.einsum("n,ntd->td", w, U)
    Sc, Uc = S - ms, U - mu
    Sss = torch.einsum("n,nti,ntj->tij", w, Sc, Sc)
    Sus = torch.einsum("n,nti,ntj->tij", w, Uc, Sc)
    reg = ridge * torch.diagonal(Sss, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)
    Sss = Sss + reg[:, None, None] * torch.eye(D, dtype=DTYPE)
    K = torch.linalg.solve(Sss, Sus.mT).mT  # [T, d, D]
    k = mu - (K @ ms.unsqueeze(-1)).squeeze(-1)
    if cov is None:
        R = Uc - torch.einsum("tij,ntj->nti", K, Sc)
        cov = torch.einsum("n,nti,ntj->tij", w, R, R) + ridge * torch.eye(d, dtype=DTYPE)
    else:
        cov = _as64(cov, "cov")
        if cov.ndim == 2:
            cov = cov.expand(T, d, d).clone()
    return LinearGaussianPolicy(K, k, _sym(cov))


def floor_noise(psi: LinearGaussianPolicy, states: Tensor, ratio: float) -> LinearGaussianPolicy:
    """ψ with covariance G_t ≥ (ratio · RMS_t μ^ψ)², the RMS over the sampled states [N, T, D].

    Why: the LQG's covariance is (η + ν)·Q_uu⁻¹, which collapses as η → 0 when the cost's curvature
    is large in its own units; the next KL trust region, measured against that collapsed ψ, then
    allows only a vanishing change of the mean, and GPS stalls far from the optimum (the
    known-optimum test on separable quadratics showed this). Keeping the exploration a fixed
    fraction of the step lets every iteration move the gains by a bounded relative amount."""
    if ratio <= 0:
        return psi
    rms = psi.mean(states).square().mean(dim=(0, 2)).sqrt()  # [T]
    floor = (ratio * rms).square().view(-1, 1, 1) * torch.eye(psi.cov.shape[-1], dtype=psi.cov.dtype)
    return LinearGaussianPolicy(psi.K, psi.k, torch.maximum(psi.cov, floor))
