"""Persistent Evolution Strategies (Vicol, Metz & Sohl-Dickstein, ICML 2021) on truncated unrolls.

Antithetic ES with N pairs, perturbations ε_i ~ N(0, σ²I):
  ĝ = 1/(2Nσ²) Σ_i [L(θ + ε_i) − L(θ − ε_i)] ε_i,
unbiased for ∇ E_ε L(θ + ε) (:func:`antithetic_es_gradient`).

Truncated unrolls: each particle i runs an inner run of T steps (``horizon``) in truncations of W
steps (``truncation``); after each truncation k, θ takes one Adam step along
  ĝ_k = 1/(2Nσ²) Σ_i [L_k^+ − L_k^−] ξ_i,   ξ_i = Σ_{k' ≤ k} ε_i^{(k')}  (reset when the run restarts),
where L_k^± is the mean inner loss over the truncation of the branch run with θ ± ε_i^{(k)} from its
own carried state. ``persistent=False`` uses ξ_i = ε_i^{(k)} (plain truncated ES, biased: it ignores
θ's effect on the state carried in). Particles start staggered (particle i is first advanced
⌊i·(T/W)/N⌋·W steps with the unperturbed θ₀), so truncations of all ages are mixed in every ĝ_k.
Optional centred-rank fitness shaping replaces the 2N losses by their ranks scaled to [−½, ½].
One inner step of all 2N runs is one batched computation of the :class:`~l2o.outer.base.InnerProblem`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from l2o.checkpoint import generator_state
from l2o.outer.base import InnerProblem, OuterTrainer, State


def antithetic_es_gradient(f: Callable[[Tensor], Tensor], theta: Tensor, sigma: float, n_pairs: int,
                           gen: torch.Generator) -> Tensor:
    """ĝ = 1/(2Nσ²) Σ_i [f(θ+ε_i) − f(θ−ε_i)] ε_i; ``f`` maps a batch [M, D] of θ's to losses [M]."""
    eps = torch.randn(n_pairs, theta.numel(), generator=gen, dtype=theta.dtype) * sigma
    losses = f(torch.cat([theta + eps, theta - eps]))
    diff = losses[:n_pairs] - losses[n_pairs:]
    return (diff.unsqueeze(-1) * eps).sum(0) / (2 * n_pairs * sigma**2)


def centred_ranks(x: Tensor) -> Tensor:
    """Ranks of the entries of ``x`` (any shape) mapped linearly to [−½, ½] (ties broken by order)."""
    flat = x.reshape(-1)
    ranks = torch.empty_like(flat)
    ranks[flat.argsort()] = torch.arange(flat.numel(), dtype=flat.dtype)
    return (ranks / max(1, flat.numel() - 1) - 0.5).reshape(x.shape)


@dataclass(frozen=True)
class PESFields:
    """The PES hyperparameters a meta-training config shares with :class:`PESConfig` (all but Adam's
    betas); :attr:`pes` checks them. Subclasses may override the defaults."""

    n_pairs: int = 8
    sigma: float = 0.01
    truncation: int = 20
    horizon: int = 400
    persistent: bool = True
    stagger: bool = True
    rank_shaping: bool = False
    meta_lr: float = 1e-3
    loss_clip: float = 0.0
    late_weight: float = 0.0

    @property
    def pes(self) -> PESConfig:
        """These fields as a validated :class:`PESConfig` (``ValueError`` names a bad one)."""
        return PESConfig(**{f.name: getattr(self, f.name) for f in fields(PESConfig) if hasattr(self, f.name)})


@dataclass(frozen=True)
class PESConfig(PESFields):
    """PES hyperparameters. ``loss_clip`` > 0 clips every inner loss (NaN/inf → the clip) and restarts
    runs whose state stops being finite; 0 = off. ``meta_lr``/``beta1``/``beta2``: Adam on θ.
    ``late_weight`` p ≥ 0 weighs the loss of inner step t (1-based) by w(t) = (p+1)·(t/T)^p, whose
    mean over a run is ≈ 1: p = 0 is the paper's meta-objective (the mean loss over the trajectory),
    p > 0 moves weight towards the end of the run, i.e. towards the final objective f(x_T)."""

    beta1: float = 0.9
    beta2: float = 0.999

    def __post_init__(self) -> None:
        for name in ("n_pairs", "truncation", "horizon"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"pes: {name} must be an int >= 1, got {v!r}")
        if self.horizon % self.truncation:
            raise ValueError(f"pes: horizon ({self.horizon}) must be a multiple of truncation ({self.truncation})")
        for name in ("sigma", "meta_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"pes: {name} must be > 0, got {getattr(self, name)!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"pes: {name} must be in [0, 1), got {getattr(self, name)!r}")
        if not self.loss_clip >= 0:
            raise ValueError(f"pes: loss_clip must be >= 0 (0 = off), got {self.loss_clip!r}")
        if not (math.isfinite(self.late_weight) and self.late_weight >= 0):
            raise ValueError(f"pes: late_weight must be a finite number >= 0 (0 = the mean loss), got {self.late_weight!r}")


def training_info(step: int, wall: float, log: list[dict[str, Any]], config: Mapping[str, Any],
                  command: str | None, **extra: Any) -> dict[str, Any]:
    """What a PES driver's exported policy records of its run at outer step ``step`` (``extra`` added):
    wall time, config, command, and the mean meta-loss of the last 100 logged steps with its definition."""
    tail = [r["meta_loss"] for r in log[-100:] if r.get("meta_loss") is not None]
    return {"outer_steps": step, "wall_s": round(wall, 2), "config": config, "command": command, **extra,
            "meta_loss_mean_last100": sum(tail) / len(tail) if tail else None,
            "meta_loss_definition": "mean mini-batch loss f̂(x_t) over a truncation of W steps, "
                                    "averaged over the 2N branches", "torch": torch.__version__}


class PESTrainer(OuterTrainer):
    """PES (or truncated ES) with Adam on θ over an :class:`InnerProblem`; exact resume via
    :meth:`state_tensors`. ``theta0`` [D] is the starting θ; ``seed`` seeds every random draw."""

    kind = "l2o-outer-pes"

    def __init__(self, problem: InnerProblem, config: PESConfig, theta0: Tensor, seed: int = 0) -> None:
        if theta0.dim() != 1 or theta0.numel() != problem.dim:
            raise ValueError(f"pes: θ₀ must be a vector of length {problem.dim}, got shape {tuple(theta0.shape)}")
        self.problem, self.config = problem, config
        self._theta = theta0.detach().clone().requires_grad_(True)
        self.adam = torch.optim.Adam([self._theta], lr=config.meta_lr, betas=(config.beta1, config.beta2))
        self.gen = torch.Generator().manual_seed(seed)
        N = config.n_pairs
        self.state: State = {}
        self.xi = torch.zeros(N, problem.dim, dtype=theta0.dtype)
        self.t = torch.zeros(N, dtype=torch.long)
        self.runs = torch.zeros(N, dtype=torch.long)  # completed inner runs per particle
        self.started = False
        self.outer_steps = 0

    @property
    def theta(self) -> Tensor:
        return self._theta.detach()

    # -- inner runs ---------------------------------------------------------------------------

    def _fresh(self, idx: Tensor) -> State:
        """Fresh runs for particles ``idx`` (both branches): ``problem.init_particles(idx, gen)`` when the
        problem has it (runs that depend on the particle, e.g. a task mixture), else ``init_runs``."""
        init = getattr(self.problem, "init_particles", None)
        runs = init(idx, self.gen) if init is not None else self.problem.init_runs(idx.numel(), self.gen)
        return {k: v.unsqueeze(0).expand(2, *v.shape).clone() for k, v in runs.items()}

    def _restart(self, mask: Tensor) -> None:
        idx = mask.nonzero().flatten()
        if idx.numel() == 0:
            return
        fresh = self._fresh(idx)
        for k in self.state:
            self.state[k][:, idx] = fresh[k]
        self.xi[idx] = 0
        self.t[idx] = 0
        self.runs[idx] += 1

    def weight(self, t: Tensor) -> Tensor:
        """The meta-objective's weight of the loss at 0-based inner step ``t`` (step t + 1 of T)."""
        p = self.config.late_weight
        if p == 0:
            return torch.ones(t.shape, dtype=torch.float64)
        return (p + 1) * ((t + 1).to(torch.float64) / self.config.horizon) ** p

    def _unroll(self, theta_pm: Tensor) -> Tensor:
        """W inner steps of every run; returns the mean (clipped, :meth:`weight`-ed) loss per branch [2, N]."""
        cfg = self.config
        total = torch.zeros(2, cfg.n_pairs, dtype=theta_pm.dtype)
        for s in range(cfg.truncation):
            loss, self.state = self.problem.step(theta_pm, self.state, self.t + s, self.gen)
            if cfg.loss_clip > 0:
                loss = torch.nan_to_num(loss, nan=cfg.loss_clip, posinf=cfg.loss_clip, neginf=-cfg.loss_clip)
                loss = loss.clamp(max=cfg.loss_clip)
            if cfg.late_weight:
                loss = loss * self.weight(self.t + s).to(loss.dtype)
            total = total + loss.to(total.dtype)
        return total / cfg.truncation

    def _start(self) -> None:
        """Fresh runs for all particles, then the staggered burn-in with the unperturbed θ."""
        cfg = self.config
        N = cfg.n_pairs
        self.state = self._fresh(torch.arange(N))
        if not cfg.stagger:
            self.started = True
            return
        k_max = cfg.horizon // cfg.truncation
        offsets = torch.tensor([(i * k_max) // N for i in range(N)], dtype=torch.long) * cfg.truncation
        theta_pm = self.theta.expand(2, N, -1)
        for r in range(int(offsets.max()) // cfg.truncation):
            active = offsets > r * cfg.truncation
            before = {k: v.clone() for k, v in self.state.items()}
            self._unroll(theta_pm)
            self.state = {k: torch.where(active.view((1, N) + (1,) * (v.dim() - 2)), v, before[k])
                          for k, v in self.state.items()}
            self.t = torch.where(active, self.t + cfg.truncation, self.t)
        self.started = True

    # -- the estimator and the outer step -----------------------------------------------------------

    def score(self, L: Tensor) -> Tensor:
        """The fitness used in ĝ from the truncation losses L [2, N]: L, or its centred ranks."""
        return centred_ranks(L) if self.config.rank_shaping else L

    def estimate(self) -> tuple[Tensor, dict[str, Any]]:
        """One truncation of every particle; returns ĝ_k (PES, or truncated ES) and diagnostics.
        Runs that reach the horizon (or stop being finite) restart with ξ = 0."""
        cfg = self.config
        if not self.started:
            self._start()
        N, D = cfg.n_pairs, self.problem.dim
        eps = torch.randn(N, D, generator=self.gen, dtype=self.xi.dtype) * cfg.sigma
        if cfg.persistent:
            self.xi = self.xi + eps
        else:
            self.xi = eps.clone()
        theta = self.theta
        theta_pm = torch.stack([theta + eps, theta - eps])
        L = self._unroll(theta_pm)
        score = self.score(L)
        ghat = ((score[0] - score[1]).unsqueeze(-1) * self.xi).sum(0) / (2 * N * cfg.sigma**2)
        self.t = self.t + cfg.truncation
        finite = torch.ones(N, dtype=torch.bool)
        for v in self.state.values():
            if v.is_floating_point():
                finite &= torch.isfinite(v.reshape(2, N, -1)).all(-1).all(0)
        restart = (self.t >= cfg.horizon) | ~finite
        info = {"meta_loss": float(L.mean()), "restarts": int(restart.sum()), "nonfinite": int((~finite).sum())}
        self._restart(restart)
        return ghat, info

    def step(self) -> dict[str, Any]:
        ghat, info = self.estimate()
        if not torch.isfinite(ghat).all():
            info["skipped"] = True
        else:
            self.adam.zero_grad(set_to_none=True)
            self._theta.grad = ghat.to(self._theta.dtype)
            self.adam.step()
        self.outer_steps += 1
        info["grad_norm"] = float(ghat.norm())
        return info

    # -- exact resume -------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, Tensor]:
        out = {"theta": self.theta.clone(), "xi": self.xi, "t": self.t, "runs": self.runs,
               "rng": torch.tensor(generator_state(self.gen), dtype=torch.uint8),
               "started": torch.tensor(int(self.started)), "outer_steps": torch.tensor(self.outer_steps)}
        st = self.adam.state.get(self._theta, {})
        for name, v in st.items():
            out[f"adam.{name}"] = v if torch.is_tensor(v) else torch.tensor(v)
        for k, v in self.state.items():
            out[f"state.{k}"] = v
        return out

    def load_state_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        with torch.no_grad():
            self._theta.copy_(tensors["theta"])
        self.xi = tensors["xi"].clone()
        self.t = tensors["t"].clone()
        self.runs = tensors["runs"].clone()
        self.gen.set_state(tensors["rng"].clone())
        self.started = bool(int(tensors["started"]))
        self.outer_steps = int(tensors["outer_steps"])
        adam_state = {name[len("adam."):]: v.clone() for name, v in tensors.items() if name.startswith("adam.")}
        sd = self.adam.state_dict()
        self.adam.load_state_dict({"state": {0: adam_state} if adam_state else {}, "param_groups": sd["param_groups"]})
        self.state = {name[len("state."):]: v.clone() for name, v in tensors.items() if name.startswith("state.")}

