"""Convolutional GPS (Li & Malik 2017, §3.5): GPS with every model block-diagonal over coordinates
and shared within a coordinate group, so each coordinate is one sample of a small per-group problem.

One iteration (gps.md §3–§7), per coordinate group g with state size D = 77 and action size 1:

1. sample M trajectories of the task under ψ (all groups act together; every coordinate of g uses
   ψ_g), recording a subsample of each group's coordinates (:mod:`l2o.gps.conv_env`);
2. fit the dynamics p̃_g(s_{t+1}|s_t, a_t) = N(A_t s + B_t a + c_t, F_t) by regression with a
   pooled Gaussian (normal-inverse-Wishart) prior, the coordinates of all M trajectories as samples;
3. build the cost model c̃_g (see :func:`telescoped_cost`) and the linear-Gaussian fit π̂_g of π;
4. ψ-step: LQG with the KL trust region Σ_t KL(ψ_g‖ψ_g,old) ≤ T·ε and the BADMM terms λ_g, ν_g;
5. π-step: weighted regression of the LSTM μ^π(Ψ) onto ψ's targets y_t = μ^ψ_t − G_t λ_t/ν_t with
   weights ν_t G_t⁻¹, by back-propagation through time over the recorded Ψ sequences (all groups'
   coordinates are rows of one batch; one LSTM shared by all groups, see :mod:`l2o.policies.psd_lstm`);
6. dual step on λ_g, the ν_g schedule (one weight vector per group), the ε ratio test;
7. evaluate π (deterministic) on a held-out seed of the training objective; log; checkpoint.

The cost model (gps.md §5, option (a), our CHOICE). The cost of a trajectory is Σ_t f(x_t), which
telescopes into T f(x_0) + Σ_t w_t [f(x_{t+1}) − f(x_t)] with w_t = T − 1 − t. To second order
each increment is Σ_j ∇_j f a_j + ½ aᵀ∇²f a. We read ∇_j f from the state's gradient feature
Φ2_0 = ḡ_t/(|ḡ_{t−5}|+1) (≈ the three-step average gradient when |ḡ| ≪ 1, as for these nets) and
split the curvature term over groups as ½ Σ_g h_{g,t}|a_g|², with h_{g,t} the measured effective
curvature along ψ's steps (exact for the step taken). So the per-coordinate cost is
c̃_{g,t}(s, a) = w_t (Φ2_0 a + ½ h_{g,t} a²): a bilinear state–action term and an action
curvature, both identical for all coordinates of the group — block-diagonal and shared, as §3.5
requires — and summed over coordinates it is the model of the whole trajectory's cost.

Everything needed to continue is checkpointed after every iteration; all randomness is derived from
(seed, iteration), so a run resumed after a kill reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from l2o.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from l2o.config import check_field_types, check_keys, read_config_file
from l2o.features.conv2017 import STATE_DIM
from l2o.features.sets import FeatureSet, get_feature_set
from l2o.gps.badmm import (
    dual_step,
    kl_psi_pi,
    pi_covariance,
    pi_targets,
    update_epsilon,
    update_nu,
)
from l2o.gps.conv_env import (
    GRAD_FEATURE,
    GroupLinearGaussianController,
    LSTMController,
    Rollout,
    rollout,
)
from l2o.gps.cost import QuadraticCost
from l2o.gps.dynamics import fit_dynamics
from l2o.gps.errors import GPSError
from l2o.gps.linear_gaussian import (
    DTYPE,
    LinearGaussianPolicy,
    fit_linear_gaussian_policy,
)
from l2o.gps.lqg import expected_cost, solve_trust_region
from l2o.policies import psd_lstm
from l2o.tasks.base import Task

TRAIN_KIND = "l2o-conv-gps-train"
CHECKPOINT_NAME = "checkpoint.safetensors"
LOG_NAME = "log.jsonl"
POLICY_NAME = "psd.safetensors"
TRAIN_SEED_BASE = 100_000
"""Trajectory seeds of meta-training: 100000 + seed·10⁴ + iteration·M + m (disjoint from the
benchmark seeds 0–999 and the tuning seeds 1000–1002)."""
EVAL_SEED_BASE = 200_000
"""Held-out seeds of the training objective on which π is evaluated (model selection)."""


@dataclass(frozen=True)
class ConvGPSConfig:
    """Hyperparameters of :class:`ConvGPSTrainer` (validated; unknown keys are rejected).

    ε is the per-time-step KL budget of each group's ψ-step (the bound is T·ε); ν_t starts at
    ``nu`` and ``kl_target`` is per step. ``features`` names the feature set of s_t and Ψ_t
    (:mod:`l2o.features.sets`). ψ₀ is a = −``init_gain``·s_t[``init_direction``] (default: the set's
    gradient feature, i.e. gradient descent; with ``features = "scale-free"`` and
    ``init_direction = "adagrad"`` it is AdaGrad with lr ``init_gain``), with exploration std
    ``init_noise`` × the group's RMS step. ``noise_floor`` > 0 keeps ψ's exploration std at least
    that fraction of the RMS of its mean action at every t (see :func:`floor_noise`; 0 = off, the
    paper's behaviour). ``curvature_along = "mean"`` measures the cost model's curvature h_{g,t}
    along ψ's mean action instead of the noisy step taken (``"step"``, the original behaviour);
    ``curvature_batch = "independent"`` measures it on a mini-batch independent of the step's
    (``"same"``: the step's own batch, the original behaviour, biased upwards; see
    :func:`l2o.gps.conv_env.rollout`).
    """

    task: str = "mnist:48-48:b64"
    features: str = "paper2017"
    init_direction: str | None = None
    horizon: int = 400
    iterations: int = 10
    samples: int = 6
    coords_per_group: int = 64
    seed: int = 0
    init_gain: float = 1.0
    init_noise: float = 0.3
    epsilon: float = 0.1
    epsilon_min: float = 0.01
    epsilon_max: float = 1.0
    nu: float = 1e-2
    nu_min: float = 1e-4
    nu_max: float = 1e4
    kl_target: float = 0.1
    alpha: float = 0.1
    curvature_floor: float = 0.05
    noise_floor: float = 0.0
    curvature_along: str = "step"
    curvature_batch: str = "same"
    pi_steps: int = 30
    pi_first_steps: int = 120
    pi_lr: float = 3e-3
    pi_batch: int = 256
    eval_seeds: int = 1
    eval_every: int = 10
    curvature_every: int = 20
    dynamics_ridge: float = 1e-6
    threads: int = 1
    data_dir: str | None = None

    def __post_init__(self) -> None:
        check_field_types(self, "conv-GPS")
        for name in ("horizon", "samples", "coords_per_group", "eval_seeds", "eval_every", "curvature_every",
                     "threads", "pi_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"conv-GPS config: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("iterations", "seed", "pi_steps", "pi_first_steps", "noise_floor"):
            if getattr(self, name) < 0:
                raise ValueError(f"conv-GPS config: {name} must be >= 0, got {getattr(self, name)}")
        for name in ("init_gain", "init_noise", "nu", "kl_target", "pi_lr", "curvature_floor"):
            if getattr(self, name) <= 0:
                raise ValueError(f"conv-GPS config: {name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.epsilon_min <= self.epsilon <= self.epsilon_max:
            raise ValueError("conv-GPS config: need 0 < epsilon_min <= epsilon <= epsilon_max")
        if not 0 < self.nu_min <= self.nu <= self.nu_max:
            raise ValueError("conv-GPS config: need 0 < nu_min <= nu <= nu_max")
        if self.samples < 2:
            raise ValueError("conv-GPS config: samples (M) must be >= 2")
        if self.curvature_batch not in ("same", "independent"):
            raise ValueError(f"conv-GPS config: curvature_batch must be 'same' or 'independent', got {self.curvature_batch!r}")
        if self.curvature_along not in ("step", "mean"):
            raise ValueError(f"conv-GPS config: curvature_along must be 'step' or 'mean', got {self.curvature_along!r}")
        if self.horizon < 2:
            raise ValueError("conv-GPS config: horizon must be >= 2")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConvGPSConfig:
        check_keys(cls, d, "conv-GPS config")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides: Any) -> ConvGPSConfig:
        """A TOML (or JSON) file; ``overrides`` that are not None replace its values."""
        return cls.from_dict(read_config_file(path, overrides))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- pure pieces
def initial_psi(T: int, gain: float, std: float, state_dim: int = STATE_DIM,
                index: int = GRAD_FEATURE) -> LinearGaussianPolicy:
    """ψ₀: a_t = −gain·s_t[index] + N(0, std²) for every t (by default gradient descent on the
    paper state's gradient feature Φ2_0)."""
    K = torch.zeros(T, 1, state_dim, dtype=DTYPE)
    K[:, 0, index] = -float(gain)
    return LinearGaussianPolicy(K, torch.zeros(T, 1, dtype=DTYPE), torch.full((T, 1, 1), float(std) ** 2, dtype=DTYPE))


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


def telescoped_cost(curvature: Tensor, horizon: int, rho: Tensor | None = None, state_dim: int = STATE_DIM,
                    grad_feature: int = GRAD_FEATURE) -> QuadraticCost:
    """c̃_t(s, a) = w_t (ρ_t Φ2_0·a + ½ h_t a²), w_t = T − 1 − t, over xu = [s (D); a (1)], with
    Φ2_0 = s[grad_feature] (D = 77 and Φ2_0 for the paper's state).

    ``curvature`` [T] is the group's h_t (> 0); ``rho`` [T] (default 1) the regression coefficient
    of the true gradient on Φ2_0. See the module docstring for the derivation.
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
    w = (T - 1 - torch.arange(T, dtype=DTYPE))
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
    t = torch.arange(horizon, dtype=DTYPE)
    idx = torch.searchsorted(steps, t).clamp(1, max(1, len(steps) - 1))
    if len(steps) == 1:
        out = vals.expand(horizon).clone()
    else:
        t0, t1 = steps[idx - 1], steps[idx]
        v0, v1 = vals[idx - 1], vals[idx]
        lam = ((t - t0) / (t1 - t0)).clamp(0, 1)
        out = v0 + lam * (v1 - v0)
    return out.clamp(min=max(lo, 1e-12))


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


def group_samples(samples: list[Rollout], group: int) -> tuple[Tensor, Tensor, Tensor]:
    """Stack the group's recorded coordinates of all trajectories as samples: states [N, T, 77],
    actions [N, T, 1] (float64) and observations [N, T, 3] (float32), N = M·S."""
    S = torch.cat([r.states[group].transpose(0, 1) for r in samples]).to(DTYPE)
    A = torch.cat([r.actions[group].transpose(0, 1) for r in samples]).to(DTYPE).unsqueeze(-1)
    O = torch.cat([r.observations[group].transpose(0, 1) for r in samples]).to(torch.float32)
    return S, A, O


def pi_means(net: dict[str, Tensor], obs: Tensor, chunk: int = 2048) -> Tensor:
    """μ^π along the recorded Ψ sequences (teacher forcing): obs [N, T, 3] → [N, T, 1] float64."""
    out = []
    with torch.no_grad():
        for i in range(0, obs.shape[0], chunk):
            a, _ = psd_lstm.run_sequence(net, obs[i:i + chunk].transpose(0, 1))
            out.append(a.T)
    return torch.cat(out).to(DTYPE).unsqueeze(-1)


# --------------------------------------------------------------------------- trainer
@dataclass
class GroupState:
    """Per-group GPS variables: ψ_g, λ_g [T, 1], ν_g [T], last KL(ψ‖π) [T] and η."""

    psi: LinearGaussianPolicy
    lam: Tensor
    nu: Tensor
    kl_prev: Tensor | None
    eta: float | None


class ConvGPSTrainer:
    """Meta-trains PSD's π with Convolutional GPS on one task; see the module docstring.

    ``out`` receives ``checkpoint.safetensors`` (after every iteration), ``log.jsonl`` (one record
    per iteration: ψ's and π's true cost, KLs, η, ν, ε, π's regression error, wall time) and
    ``psd.safetensors`` (the π with the lowest held-out AUC so far, with its provenance).
    """

    def __init__(self, config: ConvGPSConfig, out: str | os.PathLike, task: Task | None = None,
                 command: str | None = None, progress: bool = True, features: FeatureSet | None = None) -> None:
        self.config = config
        self.out = Path(out)
        self.command = command
        self.progress = progress
        if task is None:
            from l2o.tasks.registry import make_task

            task = make_task(config.task, data_dir=config.data_dir)
        self.task = task
        if features is None:
            features = get_feature_set(config.features)
        elif features.name != config.features:
            raise ValueError(f"config.features is {config.features!r} but the feature set passed is {features.name!r}")
        self.features = features
        self.init_index = self._direction_index(config.init_direction)
        self.T = config.horizon
        self.sizes = [g.numel for g in task.groups]
        self.iteration = 0
        self.epsilon = config.epsilon
        self.net = psd_lstm.init_net(config.seed, input_size=features.obs_dim)
        self.normalised = False
        self.groups: list[GroupState] = []
        self.log: list[dict[str, Any]] = []
        self.best_auc = math.inf
        self.wall = 0.0
        self.last_prediction: float | None = None
        self.last_psi_cost: float | None = None

    # ------------------------------------------------------------------ set-up and I/O
    def _direction_index(self, name: str | None) -> int:
        """Index in s_t of ψ₀'s direction: ``name`` among the feature set's state names, or the
        gradient feature when None."""
        if not name:
            return self.features.grad_feature
        names = self.features.state_names
        if name not in names:
            raise ValueError(f"conv-GPS config: init_direction {name!r} is not a state feature of "
                             f"{self.features.name!r}; known: {list(names)}")
        return names.index(name)

    def _initial_psi(self, std: float) -> LinearGaussianPolicy:
        return initial_psi(self.T, self.config.init_gain, std, self.features.state_dim, self.init_index)

    def _rollout(self, controller: Any, seed: int, horizon: int, coords: int, eval_every: int, curvature_every: int,
                 record_states: bool = True) -> Rollout:
        return rollout(self.task, controller, seed, horizon, coords, eval_every, curvature_every,
                       record_states=record_states, features=self.features, curvature_along=self.config.curvature_along,
                       curvature_batch=self.config.curvature_batch)

    def _init_groups(self) -> None:
        c = self.config
        probe = self._rollout(GroupLinearGaussianController(self.task, [self._initial_psi(1e-12)] * len(self.sizes),
                                                            noise=False),
                              TRAIN_SEED_BASE - 1 - c.seed, min(self.T, 20), 1, eval_every=10 ** 6, curvature_every=10 ** 6)
        rms = probe.action_rms.nanmean(0)
        self.groups = [GroupState(self._initial_psi(c.init_noise * float(r)), torch.zeros(self.T, 1, dtype=DTYPE),
                                  torch.full((self.T,), c.nu, dtype=DTYPE), None, None) for r in rms]

    def _tensors(self) -> dict[str, Tensor]:
        t = {f"net.{k}": v for k, v in self.net.items()}
        for i, g in enumerate(self.groups):
            t[f"g{i}.K"], t[f"g{i}.k"], t[f"g{i}.cov"] = g.psi.K, g.psi.k, g.psi.cov
            t[f"g{i}.lam"], t[f"g{i}.nu"] = g.lam, g.nu
            if g.kl_prev is not None:
                t[f"g{i}.kl_prev"] = g.kl_prev
        return t

    def save(self) -> Path:
        meta = {"config": self.config.to_dict(), "iteration": self.iteration, "epsilon": self.epsilon,
                "normalised": self.normalised, "etas": [g.eta for g in self.groups], "best_auc": self.best_auc
                if math.isfinite(self.best_auc) else None, "wall_s": self.wall, "last_prediction": self.last_prediction,
                "last_psi_cost": self.last_psi_cost, "command": self.command}
        return save_checkpoint(self.out / CHECKPOINT_NAME, self._tensors(), meta, kind=TRAIN_KIND)

    def load(self) -> bool:
        """Restore from ``out/checkpoint.safetensors`` if present; the config must match except
        ``iterations`` (which may be raised to continue) and ``data_dir``."""
        path = self.out / CHECKPOINT_NAME
        if not path.exists():
            return False
        tensors, meta = load_checkpoint(path, kind=TRAIN_KIND)
        # Fresh (aligned) copies: BLAS kernels may round differently on differently aligned
        # buffers, which would break bit-exact resume.
        tensors = {k: v.clone() for k, v in tensors.items()}
        old = dict(meta["config"])
        new = self.config.to_dict()
        defaults = ConvGPSConfig().to_dict()  # keys added since the checkpoint was written take their defaults
        diff = sorted(k for k in new if k not in ("iterations", "data_dir") and old.get(k, defaults[k]) != new[k])
        if diff:
            raise CheckpointError(f"checkpoint {path} was made with a different config ({', '.join(diff)}); "
                                  "use a new --out folder or the same config")
        self.net = {k: tensors[f"net.{k}"] for k in psd_lstm.NET_KEYS}
        psd_lstm.check_net(self.net)
        self.groups = []
        for i in range(len(self.sizes)):
            psi = LinearGaussianPolicy(tensors[f"g{i}.K"], tensors[f"g{i}.k"], tensors[f"g{i}.cov"])
            self.groups.append(GroupState(psi, tensors[f"g{i}.lam"], tensors[f"g{i}.nu"], tensors.get(f"g{i}.kl_prev"),
                                          meta["etas"][i]))
        self.iteration = int(meta["iteration"])
        self.epsilon = float(meta["epsilon"])
        self.normalised = bool(meta["normalised"])
        self.best_auc = math.inf if meta["best_auc"] is None else float(meta["best_auc"])
        self.wall = float(meta["wall_s"])
        self.last_prediction = meta["last_prediction"]
        self.last_psi_cost = meta["last_psi_cost"]
        log_path = self.out / LOG_NAME
        self.log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.exists() else []
        self.log = self.log[: self.iteration]
        self._write_log()
        return True

    def _write_log(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / (LOG_NAME + ".tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in self.log))
        os.replace(tmp, self.out / LOG_NAME)

    def policy_meta(self) -> dict[str, Any]:
        return {"method": "Predicted Step Descent (Li & Malik 2017), Convolutional GPS",
                "features": self.features.name,
                "training": {"command": self.command, "config": self.config.to_dict(), "iteration": self.iteration,
                             "heldout_auc": self.best_auc, "wall_s": round(self.wall, 1), "torch": torch.__version__}}

    # ------------------------------------------------------------------ one iteration
    def _sample(self, it: int) -> list[Rollout]:
        c = self.config
        ctrl = GroupLinearGaussianController(self.task, [g.psi for g in self.groups])
        seeds = [TRAIN_SEED_BASE + c.seed * 10_000 + it * c.samples + m for m in range(c.samples)]
        return [self._rollout(ctrl, s, self.T, c.coords_per_group, c.eval_every, c.curvature_every) for s in seeds]

    def _evaluate_pi(self) -> tuple[float, float]:
        c = self.config
        runs = [self._rollout(LSTMController(self.net), EVAL_SEED_BASE + c.seed * 100 + k, self.T, 1, c.eval_every,
                        10 ** 9, record_states=False) for k in range(c.eval_seeds)]
        if any(r.diverged for r in runs):
            return math.inf, math.inf
        return (sum(r.auc() for r in runs) / len(runs), sum(float(r.true_loss[-1]) for r in runs) / len(runs))

    def _pi_step(self, it: int, obs: list[Tensor], targets: list[Tensor], weights: list[Tensor]) -> float:
        """Weighted regression of μ^π onto ψ's targets by BPTT; returns the final weighted RMS error
        relative to the targets' RMS (over all groups)."""
        c = self.config
        if not self.normalised:
            allo = torch.cat([o.reshape(-1, o.shape[-1]) for o in obs])
            self.net["in_mean"] = allo.mean(0).to(self.net["in_mean"].dtype)
            self.net["in_std"] = allo.std(0).clamp(min=1e-8).to(self.net["in_std"].dtype)
            ally = torch.cat([y.reshape(-1) for y in targets])
            self.net["out_scale"] = ally.square().mean().sqrt().reshape(1).to(self.net["out_scale"].dtype)
            self.normalised = True
        O = torch.cat(obs)  # [N, T, 3]
        Y = torch.cat(targets).to(torch.float32).squeeze(-1)  # [N, T]
        # ν_t G_t⁻¹ per group, normalised to mean 1 within each group so the groups weigh alike.
        W = torch.cat([(w[:, 0, 0] / w[:, 0, 0].mean()).to(torch.float32).expand(o.shape[0], -1)
                       for w, o in zip(weights, obs)])
        params = {k: self.net[k].clone().requires_grad_(True) for k in psd_lstm.TRAINED_KEYS}
        fixed = {k: self.net[k] for k in psd_lstm.NET_KEYS if k not in psd_lstm.TRAINED_KEYS}
        opt = torch.optim.Adam(params.values(), lr=c.pi_lr)
        gen = torch.Generator().manual_seed(7_000_003 + 1000 * c.seed + it)
        steps = c.pi_first_steps if it == 0 else c.pi_steps
        scale = float(Y.square().mean()) + 1e-30
        it_steps = range(steps)
        if self.progress:
            from tqdm.auto import tqdm

            it_steps = tqdm(it_steps, desc=f"iteration {it}: π-step", leave=False)
        for _ in it_steps:
            idx = torch.randperm(O.shape[0], generator=gen)[: c.pi_batch]
            pred, _ = psd_lstm.run_sequence({**params, **fixed}, O[idx].transpose(0, 1))
            loss = (W[idx] * (pred.T - Y[idx]).square()).mean() / scale
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            opt.step()
        self.net.update({k: v.detach() for k, v in params.items()})
        pred = pi_means(self.net, O).squeeze(-1).to(torch.float32)
        return float(((W * (pred - Y).square()).mean() / scale).sqrt())

    def step(self) -> dict[str, Any]:
        """One GPS iteration; returns its log record."""
        c = self.config
        it = self.iteration
        t0 = time.perf_counter()
        if not self.groups:
            self._init_groups()
        samples = self._sample(it)
        valid = [r for r in samples if not r.diverged]
        if len(valid) < 2:
            raise GPSError(f"iteration {it}: {len(samples) - len(valid)} of {len(samples)} ψ trajectories diverged")
        psi_auc = sum(r.auc() for r in valid) / len(valid)
        psi_final = sum(float(r.true_loss[-1]) for r in valid) / len(valid)
        psi_cost = psi_auc * self.T
        # ε ratio test on last iteration's prediction
        if self.last_prediction is not None and self.last_psi_cost is not None:
            self.epsilon = update_epsilon(self.epsilon, self.last_prediction, self.last_psi_cost - psi_cost,
                                          c.epsilon_min, c.epsilon_max)
        rec: dict[str, Any] = {"iteration": it, "psi_auc": psi_auc, "psi_final": psi_final,
                               "psi_diverged": len(samples) - len(valid), "epsilon": self.epsilon, "groups": []}
        obs_all, tgt_all, w_all, states_all = [], [], [], []
        predicted = 0.0
        failures = 0
        for gi, (g, n_g) in enumerate(zip(self.groups, self.sizes)):
            S, A, O = group_samples(valid, gi)
            dyn = fit_dynamics(S, A, ridge=c.dynamics_ridge)
            rho = gradient_shrinkage(valid, gi, self.T)
            cost = telescoped_cost(curvature_profile(valid, gi, self.T, c.curvature_floor), self.T, rho,
                                   self.features.state_dim, self.features.grad_feature)
            mu0 = S[:, 0].mean(0)
            sigma0 = torch.cov(S[:, 0].T) + 1e-8 * torch.eye(self.features.state_dim, dtype=DTYPE)
            pi_cov = pi_covariance(g.psi.cov, g.nu)
            pi_fit = fit_linear_gaussian_policy(S, pi_means(self.net, O), cov=pi_cov.expand(self.T, 1, 1))
            old = g.psi
            info: dict[str, Any] = {"group": self.task.groups[gi].name, "rho_mean": float(rho.mean()),
                                    "rho_last": float(rho[-1])}
            try:
                # Until π has had its first π-step it is a placeholder (zero steps): no BADMM terms yet.
                badmm = {"lambda_": g.lam, "nu": g.nu, "pi_fit": pi_fit} if self.normalised else {}
                res = solve_trust_region(dyn, cost, old, mu0, sigma0, self.epsilon * self.T, eta_init=g.eta,
                                         group=self.task.groups[gi].name, **badmm)
                g.psi, g.eta = floor_noise(res.policy, S, c.noise_floor), res.eta
                info.update(eta=res.eta, kl_step=res.kl / self.T)
                gain = float(expected_cost(old, dyn, cost, mu0, sigma0).sum() - expected_cost(g.psi, dyn, cost, mu0, sigma0).sum())
                predicted += n_g * gain
            except GPSError as e:
                # An explicit, counted fallback: ψ_g is kept, so this group's predicted improvement
                # is 0 and the ε ratio test compares like with like.
                failures += 1
                info.update(error=str(e))
                warnings.warn(f"conv-GPS iteration {it}: ψ-step of group {self.task.groups[gi].name} failed, "
                              f"ψ kept: {e}", RuntimeWarning, stacklevel=2)
            y, W = pi_targets(g.psi, S, g.lam, g.nu)
            obs_all.append(O)
            tgt_all.append(y)
            w_all.append(W)
            states_all.append(S)
            info["gain_K_grad"] = float(g.psi.K[:, 0, self.init_index].mean())
            info["psi_std"] = float(g.psi.cov[:, 0, 0].sqrt().mean())
            rec["groups"].append(info)
        self.last_prediction, self.last_psi_cost = predicted, psi_cost
        rec["predicted_improvement"] = predicted
        rec["psi_step_failures"] = failures
        rec["pi_regression_rel_rmse"] = self._pi_step(it, obs_all, tgt_all, w_all)
        # BADMM dual step and ν schedule, per group
        for gi, g in enumerate(self.groups):
            mu_pi = pi_means(self.net, obs_all[gi])
            mu_psi = g.psi.mean(states_all[gi])
            g.lam = dual_step(g.lam, g.nu, mu_pi, mu_psi, c.alpha)
            kl = kl_psi_pi(g.psi, states_all[gi], mu_pi, pi_covariance(g.psi.cov, g.nu))
            g.nu = update_nu(g.nu, kl, g.kl_prev, c.kl_target, c.nu_min, c.nu_max)
            g.kl_prev = kl
            rec["groups"][gi].update(kl_psi_pi=float(kl.mean()), nu=float(g.nu.mean()))
        pi_auc, pi_final = self._evaluate_pi()
        rec.update(pi_auc=pi_auc if math.isfinite(pi_auc) else None, pi_final=pi_final if math.isfinite(pi_final) else None)
        self.iteration += 1
        self.wall += time.perf_counter() - t0
        rec["wall_s"] = round(self.wall, 1)
        if pi_auc < self.best_auc:
            self.best_auc = pi_auc
            psd_lstm.save_policy(self.out / POLICY_NAME, self.net, self.policy_meta())
        rec["best_pi_auc"] = self.best_auc if math.isfinite(self.best_auc) else None
        self.log.append(rec)
        self._write_log()
        self.save()
        return rec

    def train(self, callback: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Run (or continue) until ``config.iterations``; a checkpoint is written after each."""
        torch.set_num_threads(self.config.threads)
        self.out.mkdir(parents=True, exist_ok=True)
        self.load()
        while self.iteration < self.config.iterations:
            rec = self.step()
            if callback is not None:
                callback(rec)
        return self.log
