"""What the GPS trainer samples from: environments, controllers and sampled trajectories.

An :class:`Environment` is any object with ``state_dim`` (D), ``action_dim`` (d), ``horizon`` (T)
and ``rollout(controller, n, generator) -> Trajectories``. It is deliberately abstract so that the
2016 optimizer MDP (state = history of objective changes, gradients and steps; π an MLP) and the
2017 convolutional one (per-coordinate samples of a per-group problem; π an LSTM on Ψ) can
implement it. Optionally it provides ``local_cost(trajectories) -> QuadraticCost``, a local
quadratic model c̃_t of the true cost built from exact derivatives (gps.md §5 option (a)); without
it the trainer fits one by regression (option (b)).

A *controller* acts step by step: ``reset(n)`` before a rollout of n trajectories, then
``act(t, states [n, D], observations [n, O], generator) -> actions [n, d]`` (float64). Two exist:

* :class:`LinearGaussianController` — ψ, a :class:`LinearGaussianPolicy`, with exploration noise
  drawn from G_t (``noise=False``: its mean K_t s + k_t);
* :class:`ModuleController` — π, a torch module mapping observations to mean actions μ^π(o), with
  an optional fixed covariance Σ^π for exploration (``noise=False``, the default, is the
  deterministic evaluation of gps.md §9). A module with a ``step(o_t, hidden) -> (mean, hidden)``
  method (a recurrent π) is stepped with its hidden state; otherwise ``module(o_t)`` is called.

:class:`LinearQuadraticEnv` is a concrete test environment with a known LQR optimum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .cost import QuadraticCost
from .linear_gaussian import DTYPE, LinearGaussianDynamics, LinearGaussianPolicy, _as64, _sym

__all__ = [
    "Trajectories",
    "Controller",
    "LinearGaussianController",
    "ModuleController",
    "as_controller",
    "Environment",
    "LinearQuadraticEnv",
]


@dataclass(frozen=True, eq=False)
class Trajectories:
    """N sampled trajectories of T steps.

    Attributes:
        states: s_t, [N, T, D] (float64).
        observations: o_t, what π consumes, [N, T, O] (any dtype; for fully observed problems the
            states themselves).
        actions: a_t, [N, T, d] (float64).
        costs: the true cost c_t of step t, [N, T] (float64).
        valid: [N] bool. A trajectory with any non-finite state, action, cost or observation is
            marked invalid here whatever the environment said (diverged); consumers drop invalid
            trajectories (never average them in) and report :attr:`n_diverged`.
        task_index: [N] (int), which of the environment's objectives each trajectory ran on, for
            environments with several (carried with the samples, so that models built from them
            need no state of the environment: a rollout may have run in another process).
    """

    states: Tensor
    observations: Tensor
    actions: Tensor
    costs: Tensor
    valid: Tensor | None = None
    task_index: Tensor | None = None

    def __post_init__(self) -> None:
        S, U, c = _as64(self.states, "states"), _as64(self.actions, "actions"), _as64(self.costs, "costs")
        O = torch.as_tensor(self.observations)
        if S.ndim != 3 or U.ndim != 3 or S.shape[:2] != U.shape[:2]:
            raise ValueError(f"states must be [N, T, D] and actions [N, T, d]; got {tuple(S.shape)}, {tuple(U.shape)}")
        N, T = S.shape[:2]
        if c.shape != (N, T):
            raise ValueError(f"costs must be [N, T] = {(N, T)}, got {tuple(c.shape)}")
        if O.ndim < 2 or O.shape[:2] != (N, T):
            raise ValueError(f"observations must be [N, T, ...] with N, T = {(N, T)}, got {tuple(O.shape)}")
        v = torch.ones(N, dtype=torch.bool) if self.valid is None else torch.as_tensor(self.valid, dtype=torch.bool)
        if v.shape != (N,):
            raise ValueError(f"valid must be [N] = [{N}], got {tuple(v.shape)}")
        finite = (
            torch.isfinite(S).flatten(1).all(1)
            & torch.isfinite(U).flatten(1).all(1)
            & torch.isfinite(c).all(1)
        )
        if O.is_floating_point():
            finite &= torch.isfinite(O).flatten(1).all(1)
        for name, x in (("states", S), ("observations", O), ("actions", U), ("costs", c), ("valid", v & finite)):
            object.__setattr__(self, name, x)

    @property
    def n(self) -> int:
        return self.states.shape[0]

    @property
    def horizon(self) -> int:
        return self.states.shape[1]

    @property
    def n_valid(self) -> int:
        return int(self.valid.sum())

    @property
    def n_diverged(self) -> int:
        return self.n - self.n_valid

    def select(self, mask: Tensor) -> Trajectories:
        """The trajectories where ``mask`` [N] (bool) is true."""
        m = torch.as_tensor(mask, dtype=torch.bool)
        return Trajectories(self.states[m], self.observations[m], self.actions[m], self.costs[m], self.valid[m],
                            None if self.task_index is None else self.task_index[m])

    def valid_only(self) -> Trajectories:
        """Drop the diverged trajectories."""
        return self.select(self.valid)

    def total_costs(self) -> Tensor:
        """Σ_t c_t per trajectory, [N]."""
        return self.costs.sum(1)


@runtime_checkable
class Controller(Protocol):
    """Acts step by step in a rollout of n parallel trajectories."""

    def reset(self, n: int) -> None: ...

    def act(self, t: int, states: Tensor, observations: Tensor, generator: torch.Generator | None) -> Tensor:
        """Actions [n, d] (float64) at step t for states [n, D] and observations [n, O]."""
        ...


class LinearGaussianController:
    """ψ as a controller: a_t ~ N(K_t s_t + k_t, G_t) (``noise=False``: the mean)."""

    def __init__(self, policy: LinearGaussianPolicy, noise: bool = True) -> None:
        self.policy = policy
        self.noise = bool(noise)

    def reset(self, n: int) -> None:
        pass

    def act(self, t: int, states: Tensor, observations: Tensor, generator: torch.Generator | None) -> Tensor:
        if self.noise:
            return self.policy.sample(states, t, generator=generator)
        return self.policy.mean(states, t)


class ModuleController:
    """π as a controller: a_t = μ^π(o_t) (+ noise from Σ^π when ``noise=True``).

    Observations are cast to the module's parameter dtype; actions come back as float64.
    A module with ``step(o_t, hidden) -> (mean, hidden)`` is treated as recurrent.
    """

    def __init__(self, module: nn.Module, cov: Tensor | None = None, noise: bool = False) -> None:
        self.module = module
        self.noise = bool(noise)
        if self.noise and cov is None:
            raise ValueError("ModuleController(noise=True) needs the covariance Σ^π")
        self.chol = None if cov is None else torch.linalg.cholesky(_sym(_as64(cov, "cov")))
        p = next(iter(module.parameters()), None)
        self.dtype = p.dtype if p is not None else torch.get_default_dtype()
        self._hidden: Any = None

    def reset(self, n: int) -> None:
        self._hidden = None

    @torch.no_grad()
    def act(self, t: int, states: Tensor, observations: Tensor, generator: torch.Generator | None) -> Tensor:
        o = torch.as_tensor(observations).to(self.dtype)
        step = getattr(self.module, "step", None)
        if callable(step):
            mean, self._hidden = step(o, self._hidden)
        else:
            mean = self.module(o)
        a = mean.to(DTYPE)
        if self.noise:
            assert self.chol is not None
            z = torch.randn(a.shape, dtype=DTYPE, generator=generator)
            a = a + z @ self.chol.T
        return a


def as_controller(x: Controller | LinearGaussianPolicy) -> Controller:
    """A :class:`LinearGaussianPolicy` becomes a noisy :class:`LinearGaussianController`."""
    if isinstance(x, LinearGaussianPolicy):
        return LinearGaussianController(x, noise=True)
    if isinstance(x, Controller):
        return x
    raise TypeError(f"expected a Controller or a LinearGaussianPolicy, got {type(x).__name__}")


@runtime_checkable
class Environment(Protocol):
    """The MDP GPS samples from (see the module docstring)."""

    @property
    def state_dim(self) -> int: ...

    @property
    def action_dim(self) -> int: ...

    @property
    def horizon(self) -> int: ...

    def rollout(
        self, controller: Controller | LinearGaussianPolicy, n: int, generator: torch.Generator
    ) -> Trajectories: ...


class LinearQuadraticEnv:
    """s_{t+1} = A s_t + B a_t + c + w_t, w_t ~ N(0, F); s_0 ~ N(μ₀, Σ₀); o_t = s_t.

    The step cost depends on the state *and* the action: c_t(s, a) = ½ sᵀQs + ½ aᵀRa for every
    t = 0..T−1 (the cost model of :mod:`l2o.outer.gps` is a quadratic in [s; a], so no state
    augmentation is needed). ``costs[:, t]`` of a rollout is c_t(s_t, a_t).
    :meth:`local_cost` gives the exact quadratic; :meth:`lqr_policy` the finite-horizon optimum
    (time-varying K_t, k_t from the Riccati recursion on the true model), and
    :meth:`expected_cost` the exact expected total cost of any linear controller, so tests can
    compare against the optimum without sampling noise.
    """

    def __init__(
        self,
        A: Tensor,
        B: Tensor,
        Q: Tensor,
        R: Tensor,
        horizon: int,
        c: Tensor | None = None,
        noise_cov: Tensor | float = 0.0,
        init_mean: Tensor | None = None,
        init_cov: Tensor | float = 0.0,
    ) -> None:
        A, B, Q, R = (_as64(x, n) for x, n in ((A, "A"), (B, "B"), (Q, "Q"), (R, "R")))
        if A.ndim != 2 or A.shape[0] != A.shape[1] or B.ndim != 2 or B.shape[0] != A.shape[0]:
            raise ValueError("A must be [D, D] and B [D, d]")
        D, d = B.shape
        if Q.shape != (D, D) or R.shape != (d, d):
            raise ValueError(f"Q must be [{D}, {D}] and R [{d}, {d}]")
        if int(horizon) < 2:
            raise ValueError("horizon must be ≥ 2")
        self.A, self.B, self.Q, self.R = A, B, _sym(Q), _sym(R)
        self.T = int(horizon)
        self.c = torch.zeros(D, dtype=DTYPE) if c is None else _as64(c, "c").reshape(D)
        self.F = self._cov(noise_cov, D, "noise_cov")
        self.mu0 = torch.zeros(D, dtype=DTYPE) if init_mean is None else _as64(init_mean, "init_mean").reshape(D)
        self.sigma0 = self._cov(init_cov, D, "init_cov")
        self._LF = self._factor(self.F)
        self._L0 = self._factor(self.sigma0)

    @staticmethod
    def _cov(x: Tensor | float, D: int, name: str) -> Tensor:
        v = _as64(x, name)
        if v.ndim == 0:
            v = v * torch.eye(D, dtype=DTYPE)
        if v.shape != (D, D):
            raise ValueError(f"{name} must be a scalar or [{D}, {D}]")
        return _sym(v)

    @staticmethod
    def _factor(S: Tensor) -> Tensor:
        ev, V = torch.linalg.eigh(S)
        if float(ev.min()) < -1e-12 * max(1.0, float(ev.abs().max())):
            raise ValueError("covariance is not positive semi-definite")
        return V * ev.clamp_min(0).sqrt()

    @classmethod
    def random(
        cls,
        D: int,
        d: int,
        horizon: int,
        seed: int = 0,
        radius: float = 1.05,
        action_cost: float = 0.1,
        noise: float = 0.01,
        init_scale: float = 1.0,
        init_var: float = 0.05,
    ) -> LinearQuadraticEnv:
        """A random system with A of spectral norm ``radius`` (>1: open-loop unstable), Q = I,
        R = ``action_cost``·I, F = ``noise``·I, μ₀ = ``init_scale``·(random unit direction)·√D,
        Σ₀ = ``init_var``·I."""
        g = torch.Generator().manual_seed(seed)
        M = torch.randn(D, D, dtype=DTYPE, generator=g)
        A = radius * M / torch.linalg.matrix_norm(M, ord=2)
        B = torch.randn(D, d, dtype=DTYPE, generator=g) / math.sqrt(d)
        mu0 = torch.randn(D, dtype=DTYPE, generator=g)
        mu0 = init_scale * math.sqrt(D) * mu0 / mu0.norm()
        eye = torch.eye(D, dtype=DTYPE)
        return cls(A, B, eye, action_cost * torch.eye(d, dtype=DTYPE), horizon,
                   noise_cov=noise * eye, init_mean=mu0, init_cov=init_var * eye)

    # ------------------------------------------------------------------ Environment protocol
    @property
    def state_dim(self) -> int:
        return self.A.shape[0]

    @property
    def action_dim(self) -> int:
        return self.B.shape[1]

    @property
    def horizon(self) -> int:
        return self.T

    def step_cost(self, s: Tensor, a: Tensor) -> Tensor:
        """½ sᵀQs + ½ aᵀRa, s [..., D], a [..., d] → [...]."""
        return 0.5 * ((s @ self.Q) * s).sum(-1) + 0.5 * ((a @ self.R) * a).sum(-1)

    def rollout(
        self, controller: Controller | LinearGaussianPolicy, n: int, generator: torch.Generator
    ) -> Trajectories:
        """n trajectories under ``controller``; s_0, the process noise and the controller's noise
        all come from ``generator`` (reproducible)."""
        ctrl = as_controller(controller)
        D, d, T = self.state_dim, self.action_dim, self.T
        s = self.mu0 + torch.randn(n, D, dtype=DTYPE, generator=generator) @ self._L0.T
        ctrl.reset(n)
        S = torch.empty(n, T, D, dtype=DTYPE)
        U = torch.empty(n, T, d, dtype=DTYPE)
        C = torch.empty(n, T, dtype=DTYPE)
        for t in range(T):
            a = ctrl.act(t, s, s, generator)
            S[:, t], U[:, t], C[:, t] = s, a, self.step_cost(s, a)
            if t < T - 1:
                w = torch.randn(n, D, dtype=DTYPE, generator=generator) @ self._LF.T
                s = s @ self.A.T + a @ self.B.T + self.c + w
        return Trajectories(S, S.clone(), U, C)

    def local_cost(self, trajectories: Trajectories | None = None) -> QuadraticCost:
        """The exact cost as a :class:`QuadraticCost`: C_t = blockdiag(Q, R), d_t = 0, h_t = 0."""
        T = self.T
        return QuadraticCost.from_blocks(self.Q.expand(T, *self.Q.shape), self.R.expand(T, *self.R.shape))

    # ------------------------------------------------------------------ references for tests
    def true_dynamics(self) -> LinearGaussianDynamics:
        """The true p(s_{t+1}|s_t, a_t) as :class:`LinearGaussianDynamics` (T−1 transitions)."""
        T, D, d = self.T, self.state_dim, self.action_dim
        return LinearGaussianDynamics(
            self.A.expand(T - 1, D, D), self.B.expand(T - 1, D, d), self.c.expand(T - 1, D), self.F.expand(T - 1, D, D)
        )

    def lqr_policy(self) -> LinearGaussianPolicy:
        """The finite-horizon LQR optimum (its mean K_t s + k_t is the optimal controller; its
        covariance is the max-entropy G_t = Q_uu⁻¹, irrelevant for the deterministic optimum)."""
        from .lqg import backward

        policy, _ = backward(self.true_dynamics(), self.local_cost())
        return policy

    def expected_cost(self, K: Tensor, k: Tensor | None = None, cov: Tensor | None = None) -> float:
        """Exact E Σ_t c_t(s_t, a_t) under a_t = K_t s_t + k_t (+ N(0, cov_t) noise if given).

        K: [d, D] (stationary) or [T, d, D]; k: None, [d] or [T, d]; cov: None, [d, d] or
        [T, d, d]. Moments: μ_{t+1} = (A + BK_t)μ_t + Bk_t + c,
        Σ_{t+1} = (A + BK_t)Σ_t(A + BK_t)ᵀ + B cov_t Bᵀ + F.
        """
        T, D, d = self.T, self.state_dim, self.action_dim
        K = _as64(K, "K")
        K = K.expand(T, d, D) if K.ndim == 2 else K
        k = torch.zeros(T, d, dtype=DTYPE) if k is None else _as64(k, "k")
        k = k.expand(T, d) if k.ndim == 1 else k
        G = torch.zeros(T, d, d, dtype=DTYPE) if cov is None else _as64(cov, "cov")
        G = G.expand(T, d, d) if G.ndim == 2 else G
        mu, S = self.mu0.clone(), self.sigma0.clone()
        total = 0.0
        for t in range(T):
            am = K[t] @ mu + k[t]
            Sa = K[t] @ S @ K[t].T + G[t]
            total += 0.5 * float(torch.trace(self.Q @ S) + mu @ self.Q @ mu)
            total += 0.5 * float(torch.trace(self.R @ Sa) + am @ self.R @ am)
            Acl = self.A + self.B @ K[t]
            mu = Acl @ mu + self.B @ k[t] + self.c
            S = _sym(Acl @ S @ Acl.T + self.B @ G[t] @ self.B.T + self.F)
        return total

    def optimal_cost(self) -> float:
        """Exact expected total cost of the deterministic LQR optimum."""
        pol = self.lqr_policy()
        return self.expected_cost(pol.K, pol.k)
