"""Convolutional GPS (Li & Malik 2017, §3.5): GPS with every model block-diagonal over coordinates
and shared within a coordinate group, so each coordinate is one sample of a small per-group problem.

Per iteration, M trajectories of the task run under ψ (all groups act together; every coordinate of
group g follows ψ_g) and a subsample of each group's coordinates is recorded
(:mod:`l2o.outer.gps.conv_env`); their states (D = 77 for the paper's features), actions (size 1) and
observations Ψ are the samples of the group's problem. π, one LSTM μ^π(Ψ) shared by all groups
(:mod:`l2o.learned.psd`), is regressed onto every group's targets by back-propagation through
time. Dynamics, cost model (below), ψ-step, π-step, duals and schedules form the one GPS iteration
of :mod:`l2o.outer.gps.loop`; this module is its :class:`ConvSetting` and front end :class:`ConvGPSTrainer`.

All randomness derives from (seed, iteration): a run resumed after a kill reproduces the
uninterrupted run exactly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from functools import partial
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from l2o.execution import Executor
from l2o.features.conv2017 import STATE_DIM
from l2o.features.sets import FeatureSet, get_feature_set
from l2o.tasks.base import Task

from .badmm import pi_covariance
from .conv_cost import curvature_profile, gradient_shrinkage, telescoped_cost
from .conv_env import GRAD_FEATURE, PRECONDITIONERS, GroupLinearGaussianController, group_samples, rollout, seeded_rollout
from .conv_policies import MLPLOptFeatures, conv_policy
from .dynamics import fit_dynamics
from .errors import GPSIterationError
from .linear_gaussian import DTYPE, LinearGaussianPolicy
from .loop import CHECKPOINT_NAME, LOG_NAME, BADMMConfig, Condition, GPSLoop, LocalProblem, Samples, Setting, Unit
from .loop import finite_or_none, minibatch_adam

__all__ = ["CHECKPOINT_NAME", "LOG_NAME", "POLICY_NAME", "ConvGPSConfig", "ConvGPSTrainer", "ConvSetting", "initial_psi"]

POLICY_NAME = "psd.safetensors"
TRAIN_SEED_BASE = 100_000
"""Trajectory seeds of meta-training: 100000 + seed·10⁴ + iteration·M + m (disjoint from the
benchmark seeds 0–999 and the tuning seeds 1000–1002)."""
EVAL_SEED_BASE = 200_000
"""Held-out seeds of the training objective on which π is evaluated (model selection)."""


@dataclass(frozen=True)
class ConvGPSConfig(BADMMConfig):
    """:class:`~l2o.outer.gps.loop.BADMMConfig` plus what Convolutional GPS adds (validated; unknown keys
    are rejected).

    ``task`` is the meta-training objective and ``horizon`` its T; ``policy`` is π's form: the PSD
    LSTM (``"psd"``) or ``mlp-lopt``'s MLP of width ``mlp_hidden`` (``"mlp-lopt"``, with
    ``features = "mlp-lopt"``; :mod:`l2o.outer.gps.conv_policies`); ``features`` names the feature
    set of s_t and Ψ_t (:mod:`l2o.features.sets`). ψ₀ is a = −``init_gain``·s_t[``init_direction``]
    (default: the set's gradient feature, i.e. gradient descent; with ``features = "scale-free"``
    and ``init_direction = "adagrad"`` it is AdaGrad with lr ``init_gain``), with exploration std
    ``init_noise`` × the group's RMS step. ``coords_per_group`` coordinates of each group are
    recorded per trajectory. The cost model's curvature h_{g,t} is measured every
    ``curvature_every`` steps, floored at ``curvature_floor`` × its mean, along the noisy step
    taken (``curvature_along = "step"``) or ψ's mean action (``"mean"``), on the step's own
    mini-batch (``curvature_batch = "same"``, biased upwards) or an independent one
    (``"independent"``; see :func:`l2o.outer.gps.conv_env.rollout`). ``precondition = "adam"`` gives ψ
    the action u = p·a and the cost model a per-coordinate curvature κ·p² ∝ √v̂ (same function);
    ``cost_discount`` γ < 1 discounts the telescoped weights (:func:`~l2o.outer.gps.conv_cost.telescoped_cost`). The
    π-step is ``pi_steps`` Adam
    steps of BPTT on ``pi_batch`` sequences (``pi_first_steps`` the first time); π is evaluated
    on ``eval_seeds`` held-out seeds, its true loss every ``eval_every`` steps.
    """

    task: str = "mnist:48-48:b64"
    policy: str = "psd"
    mlp_hidden: int = 16
    features: str = "paper2017"
    init_direction: str | None = None
    horizon: int = 400
    coords_per_group: int = 64
    init_gain: float = 1.0
    init_noise: float = 0.3
    curvature_floor: float = 0.05
    curvature_along: str = "step"
    curvature_batch: str = "same"
    precondition: str = "none"
    cost_discount: float = 1.0
    pi_steps: int = 30
    pi_first_steps: int = 120
    pi_batch: int = 256
    eval_seeds: int = 1
    eval_every: int = 10
    curvature_every: int = 20
    threads: int = 1
    data_dir: str | None = None

    _label = "conv-GPS"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(ge1=("coords_per_group", "eval_seeds", "eval_every", "curvature_every", "threads", "pi_batch"),
                     ge0=("pi_steps", "pi_first_steps"), gt0=("init_gain", "init_noise", "curvature_floor"),
                     choices={"curvature_batch": ("same", "independent"), "curvature_along": ("step", "mean"),
                              "precondition": PRECONDITIONERS, "policy": ("psd", "mlp-lopt")})
        self.check((self.policy == "mlp-lopt") == (self.features == "mlp-lopt"),
                   "policy 'mlp-lopt' and features 'mlp-lopt' go together (π reads mlp-lopt's inputs)")
        self.check(1 <= self.mlp_hidden <= 32, f"mlp_hidden must be in [1, 32], got {self.mlp_hidden!r}")
        self.check(self.horizon >= 2, "horizon must be >= 2")
        self.check(0 < self.cost_discount <= 1, f"cost_discount must be in (0, 1], got {self.cost_discount!r}")


# --------------------------------------------------------------------------- pure pieces
def initial_psi(T: int, gain: float, std: float, state_dim: int = STATE_DIM,
                index: int = GRAD_FEATURE) -> LinearGaussianPolicy:
    """ψ₀: a_t = −gain·s_t[index] + N(0, std²) for every t (by default gradient descent on the
    paper state's gradient feature Φ2_0)."""
    K = torch.zeros(1, state_dim, dtype=DTYPE)
    K[0, index] = -float(gain)
    return LinearGaussianPolicy.from_gain(K, cov=float(std) ** 2, T=T)


# --------------------------------------------------------------------------- the setting
class ConvSetting(Setting):
    """Convolutional GPS as a :class:`~l2o.outer.gps.loop.Setting`: one condition (the task), one unit
    per coordinate group (weight = its number of coordinates), π one per-coordinate policy shared by
    all groups (:mod:`l2o.outer.gps.conv_policies`), Σ^π per group (the groups' step scales differ by
    orders of magnitude)."""

    name = "conv"
    shared_pi_cov = False

    def __init__(self, config: ConvGPSConfig, task: Task, features: FeatureSet, out: Path, progress: bool,
                 command: str | None) -> None:
        self.config, self.task, self.features, self.out = config, task, features, out
        self.progress, self.command = progress, command
        pre = config.precondition != "none"
        self.T, self.D, self.d = config.horizon, features.state_dim + int(pre), 1
        self.cost_feature = features.state_dim if pre else features.grad_feature  # Φ2_0 (or g/p) in s_t
        try:
            self.init_index = features.state_index(config.init_direction)
        except ValueError as e:
            raise ValueError(f"conv-GPS config: init_direction: {e}") from None
        self.policy = conv_policy(config.policy, config.seed, features, config.mlp_hidden)
        self.normalised = False  # π fitted at least once
        self.best_auc = math.inf
        self.wall = 0.0

    def _initial_psi(self, std: float) -> LinearGaussianPolicy:
        return initial_psi(self.T, self.config.init_gain, std, self.D, self.init_index)

    def _options(self, **kwargs: Any) -> dict[str, Any]:
        """Keyword arguments of :func:`~l2o.outer.gps.conv_env.rollout`: ``kwargs`` plus this
        setting's feature set and curvature measurement."""
        c = self.config
        return {**kwargs, "features": self.features, "curvature_along": c.curvature_along,
                "curvature_batch": c.curvature_batch, "precondition": c.precondition}

    net = property(lambda self: self.policy.net, doc="π's tensors ω.")

    @property
    def pi_ready(self) -> bool:
        return self.normalised or self.policy.ready_at_init  # the PSD LSTM is a placeholder until its first π-step

    def postfix(self, r: dict[str, Any]) -> dict[str, Any]:
        return {"psi": f"{r['psi_auc']:.4f}", "pi": f"{r['pi_auc'] or math.nan:.4f}"}

    def initial_conditions(self) -> list[Condition]:
        """ψ₀ per group, its exploration std ``init_noise`` × the group's RMS step under ψ₀'s mean
        (a short probe rollout)."""
        c = self.config
        probe = rollout(self.task, GroupLinearGaussianController(self.task, [self._initial_psi(1e-12)] * len(self.task.groups),
                                                                 noise=False),
                        TRAIN_SEED_BASE - 1 - c.seed, **self._options(horizon=min(self.T, 20), coords_per_group=1,
                                                                      eval_every=10 ** 6, curvature_every=10 ** 6))
        units = []
        for g, r in zip(self.task.groups, probe.action_rms.nanmean(0)):
            psi = self._initial_psi(c.init_noise * float(r))
            nu = torch.full((self.T,), c.nu, dtype=DTYPE)
            units.append(Unit(g.name, psi, torch.zeros(self.T, 1, dtype=DTYPE), nu, pi_covariance(psi.cov, nu)))
        return [Condition(units, float(c.epsilon))]

    def sample(self, it: int, conditions: list[Condition]) -> list[Samples]:
        c, T, D = self.config, self.T, self.D
        (cd,) = conditions
        ctrl = GroupLinearGaussianController(self.task, [u.psi for u in cd.units])
        seeds = [TRAIN_SEED_BASE + c.seed * 10_000 + it * c.samples + m for m in range(c.samples)]
        runs = self.map(partial(seeded_rollout, self.task, ctrl, self._options(
            horizon=T, coords_per_group=c.coords_per_group, eval_every=c.eval_every, curvature_every=c.curvature_every),
            c.threads), seeds)
        valid = [r for r in runs if not r.diverged]
        if len(valid) < c.min_valid:
            raise GPSIterationError(it, "sampling", f"{len(runs) - len(valid)} of {len(runs)} ψ trajectories diverged "
                                    f"(need {c.min_valid} finite); ψ diverges")
        psi_auc = sum(r.auc() for r in valid) / len(valid)
        problems = []
        for gi, g in enumerate(self.task.groups):
            S, A, O, Pc = group_samples(valid, gi)
            rho = gradient_shrinkage(valid, gi, T)
            cost = telescoped_cost(curvature_profile(valid, gi, T, c.curvature_floor), T, rho, D, self.cost_feature,
                                   c.cost_discount)
            sigma0 = torch.cov(S[:, 0].T) + 1e-8 * torch.eye(D, dtype=DTYPE)
            problems.append(LocalProblem(S, (O, Pc), fit_dynamics(S, A, ridge=c.dynamics_ridge), cost, S[:, 0].mean(0),
                                         sigma0, float(g.numel),
                                         {"group": g.name, "rho_mean": float(rho.mean()), "rho_last": float(rho[-1])}))
        return [Samples(psi_auc * T, problems, {
            "psi_auc": psi_auc, "psi_final": sum(float(r.true_loss[-1]) for r in valid) / len(valid),
            "psi_diverged": len(runs) - len(valid)})]

    def pi_mean(self, obs: tuple[Tensor, Tensor]) -> Tensor:
        """μ^π in ψ's action space: u = p·a (p = 1 unless preconditioned)."""
        O, Pc = obs
        return self.policy.means(O) * Pc

    def fit_pi(self, it: int, problems: list[LocalProblem], targets: list[Tensor], weights: list[Tensor]) -> float:
        """Weighted regression of μ^π onto ψ's targets by BPTT; returns the final weighted RMS error
        relative to the targets' RMS (over all groups)."""
        c = self.config
        obs = [p.obs[0] for p in problems]
        scales = [p.obs[1] for p in problems]
        # ψ's targets and weights are in its action space u = p·a: in a, y/p with weights ·p².
        targets = [y / Pc for y, Pc in zip(targets, scales)]
        pol = self.policy
        if not self.normalised:
            pol.prepare(torch.cat([o.reshape(-1, o.shape[-1]) for o in obs]), torch.cat([y.reshape(-1) for y in targets]))
            self.normalised = True
        O = torch.cat(obs)  # [N, T, O]
        Y = torch.cat(targets).to(torch.float32).squeeze(-1)  # [N, T]
        # ν_t G_t⁻¹ per group, normalised to mean 1 within each group so the groups weigh alike.
        W = torch.cat([(w[:, 0, 0] / w[:, 0, 0].mean()).to(torch.float32).expand(o.shape[0], -1)
                       * Pc.squeeze(-1).square().to(torch.float32) for w, o, Pc in zip(weights, obs, scales)])
        params = {k: pol.net[k].clone().requires_grad_(True) for k in pol.trained}
        fixed = {k: v for k, v in pol.net.items() if k not in pol.trained}
        gen = torch.Generator().manual_seed(7_000_003 + 1000 * c.seed + it)
        scale = float(Y.square().mean()) + 1e-30
        steps = range(c.pi_first_steps if it == 0 else c.pi_steps)
        if self.progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=f"iteration {it}: π-step", leave=False)
        batches = (torch.randperm(O.shape[0], generator=gen)[: c.pi_batch] for _ in steps)
        minibatch_adam(it, list(params.values()), c.pi_lr, batches, clip=1.0,
                       loss_of=lambda i: (W[i] * (pol.predict({**params, **fixed}, O[i]) - Y[i]).square()).mean() / scale)
        pol.net.update({k: v.detach() for k, v in params.items()})
        pred = pol.means(O).squeeze(-1).to(torch.float32)
        return float(((W * (pred - Y).square()).mean() / scale).sqrt())

    def evaluate(self, it: int) -> dict[str, Any]:
        """π's mean held-out AUC and final true loss (None if a run diverged or either is not finite)."""
        c = self.config
        options = self._options(horizon=self.T, coords_per_group=1, eval_every=c.eval_every, curvature_every=10 ** 9,
                                record_states=False)
        runs = [rollout(self.task, self.policy.controller(), EVAL_SEED_BASE + c.seed * 100 + k, **options)
                for k in range(c.eval_seeds)]
        if any(r.diverged for r in runs):
            return {"pi_auc": None, "pi_final": None}
        return {"pi_auc": finite_or_none(sum(r.auc() for r in runs) / len(runs)),
                "pi_final": finite_or_none(sum(float(r.true_loss[-1]) for r in runs) / len(runs))}

    def record(self, it: int, cds: list[Condition], conditions: list[dict[str, Any]], units: list[dict[str, Any]],
               pi_loss: float, evaluation: dict[str, Any], wall_s: float) -> dict[str, Any]:
        """ψ's and π's AUC and final loss, ε, the predicted improvement, ψ-step failures, π's
        regression error, cumulative wall time, and per group: η, KL(ψ‖ψ_old) and E KL(ψ‖π) per
        step, ν, ψ's mean gain on ψ₀'s direction, its exploration std, the gradient shrinkage ρ."""
        (cd,), (cr,) = cds, conditions
        self.wall += wall_s
        groups = []
        for u, ur in zip(cd.units, units, strict=True):
            g = {k: ur[k] for k in ("group", "rho_mean", "rho_last", "eta", "error") if k in ur}
            if "kl_psi_step" in ur:
                g["kl_step"] = ur["kl_psi_step"] / self.T
            g.update(kl_psi_pi=ur["kl_psi_pi_mean"], nu=ur["nu_next"], gain_K_grad=float(u.psi.K[:, 0, self.init_index].mean()),
                     psi_std=float(u.psi.cov[:, 0, 0].sqrt().mean()))
            groups.append(g)
        return {"iteration": it, "psi_auc": cr["psi_auc"], "psi_final": cr["psi_final"],
                "psi_diverged": cr["psi_diverged"], "epsilon": cr["epsilon"], "rho": cr["rho"], "groups": groups,
                "predicted_improvement": cr["predicted_improvement"], "psi_step_failures": cr["psi_step_failures"],
                "pi_regression_rel_rmse": pi_loss, **evaluation, "wall_s": round(self.wall, 1)}

    def after_step(self, record: dict[str, Any]) -> None:
        """Export π (``psd.safetensors`` or ``mlp-lopt.safetensors``) when its held-out AUC is the best so far."""
        auc = record["pi_auc"]
        if auc is not None and auc < self.best_auc:
            self.best_auc = auc
            self.policy.save(self.out / self.policy.file_name, self.policy_meta(record["iteration"] + 1))
        record["best_pi_auc"] = finite_or_none(self.best_auc)

    def policy_meta(self, iteration: int) -> dict[str, Any]:
        return {"method": self.policy.method + ", Convolutional GPS",
                "features": self.features.name,
                "training": {"command": self.command, "config": self.config.to_dict(), "iteration": iteration,
                             "heldout_auc": self.best_auc, "wall_s": round(self.wall, 1), "torch": torch.__version__}}

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return ({f"net.{k}": v for k, v in self.net.items()},
                {"normalised": self.normalised, "best_auc": finite_or_none(self.best_auc),
                 "wall_s": self.wall, "command": self.command})

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        net = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
        self.policy.check(net)
        self.policy.net = net
        self.normalised = bool(meta["normalised"])
        self.best_auc = math.inf if meta["best_auc"] is None else float(meta["best_auc"])
        self.wall = float(meta["wall_s"])


class ConvGPSTrainer(GPSLoop):
    """Meta-trains π (PSD's LSTM, or mlp-lopt's MLP) with Convolutional GPS on one task (``config.task``
    unless ``task`` is given); ``out`` receives ``checkpoint.safetensors``, ``log.jsonl`` (ψ's and π's
    true cost, KLs, η, ν, ε, π's regression error, wall time) and ``psd.safetensors`` (or
    ``mlp-lopt.safetensors``: the π with the lowest held-out AUC so far, with its provenance). :meth:`train` continues a checkpoint in ``out``.
    ``executor`` (:mod:`l2o.execution`) runs ψ's M trajectories in parallel, with the same result."""

    def __init__(self, config: ConvGPSConfig, out: str | os.PathLike, task: Task | None = None,
                 command: str | None = None, progress: bool = True, features: FeatureSet | None = None,
                 executor: Executor | None = None) -> None:
        if task is None:
            from l2o.tasks.registry import make_task

            task = make_task(config.task, data_dir=config.data_dir)
        if features is None:
            features = (MLPLOptFeatures([g.numel for g in task.groups]) if config.features == "mlp-lopt"
                        else get_feature_set(config.features))
        elif features.name != config.features:
            raise ValueError(f"config.features is {config.features!r} but the feature set passed is {features.name!r}")
        super().__init__(ConvSetting(config, task, features, Path(out), progress, command), config, out, progress,
                         fresh=False)
        self.setting.executor = executor

    log = property(lambda self: self.logs)
    groups = property(lambda self: self.units, doc="Per-group ψ_g, λ_g, ν_g, η_g, ... (empty before iteration 0).")
    net = property(lambda self: self.setting.net)
    wall = property(lambda self: self.setting.wall)

    def train(self, stop_after: int | None = None, callback: Callable[[dict[str, Any]], None] | None = None
              ) -> list[dict[str, Any]]:
        """Run (or continue) until ``config.iterations``; a checkpoint is written after each."""
        torch.set_num_threads(self.config.threads)
        return super().train(stop_after, callback)
