"""Meta-training the 2016 learned optimizer with Guided Policy Search (Li & Malik 2016).

``l2o meta-train gps2016 --config configs/lto2016-logreg.toml`` builds the optimizer MDP over the
training objectives of one family (:class:`~l2o.outer.gps.optimizer_env.OptimizerEnv2016`), π = the MLP
of :class:`~l2o.learned.lto2016.MLPPolicy2016`, and runs GPS in one of two modes:

* ``conditions = C > 0`` (multi-condition GPS, :class:`~l2o.outer.gps.trainer.MultiConditionGPSTrainer`):
  the first C training objectives are the conditions, each with its own ψ_c, dynamics and cost
  models, λ_c, ν_c and trust region ε_c; one π is regressed on all conditions' samples. A *fixed*
  set, not a rotating one: ψ_c's trust-region ratio test and the λ_c/ν_c schedules compare
  consecutive iterations on the same condition. The training objectives are i.i.d. draws, so
  the first C are as good a sample as any C.
* ``conditions = 0`` (the earlier pooled mode, :class:`~l2o.outer.gps.trainer.GPSTrainer`): one ψ over
  trajectories whose objective is drawn from all ``train_objectives``. Not used for the shipped
  policies: gradient size and curvature are correlated across objectives, so one pooled
  linear-Gaussian model over-predicts the improvement (seen in an early logistic-regression trial).

ψ starts as gradient descent (gps.md §2 CHOICE: K_t selects −lr × the current gradient block of
the state) with exploration noise, so the first samples are sane runs, not random walks. After
every GPS iteration the trainer checkpoints; a killed run resumes with ``--resume``. At the end
π is exported as ``policy.safetensors`` for :class:`~l2o.learned.lto2016.LearnedOptimizer2016`.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from l2o.config import check_keys
from l2o.execution import Executor
from l2o.features.history2016 import feature_dim
from l2o.outer.gps.linear_gaussian import LinearGaussianPolicy

from l2o.outer.gps.optimizer_env import OptimizerEnv2016
from l2o.outer.gps.trainer import CHECKPOINT_NAME, GPSConfig, GPSTrainer, MultiConditionGPSTrainer
from l2o.learned.lto2016 import save_policy
from l2o.learned.lto2016 import MLPPolicy2016
from l2o.tasks.synthetic import FAMILIES

POLICY_NAME = "policy.safetensors"


@dataclass(frozen=True)
class LTO2016Config:
    """What to meta-train on and how (the ``gps`` table holds :class:`GPSConfig` fields)."""

    family: str = "logreg"
    train_objectives: int = 90  # 2016 paper: 90 logistic-regression training objectives
    horizon: int = 40  # 2016 paper: trajectories of 40 steps
    history: int = 25  # H
    hidden: int = 50
    init_lr: float = 0.1  # ψ₀ = gradient descent with this step size
    init_noise: float = 1e-3  # ψ₀'s exploration variance per coordinate
    seed: int = 0
    conditions: int = 0  # > 0: multi-condition GPS on the first `conditions` training objectives
    gps: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {self.family!r}")
        if self.train_objectives < 1 or self.horizon < 2 or self.history < 1 or self.hidden < 1:
            raise ValueError("train_objectives, horizon, history and hidden must be positive (horizon ≥ 2)")
        if not 0 <= self.conditions <= self.train_objectives:
            raise ValueError(f"conditions must be in [0, train_objectives = {self.train_objectives}], got {self.conditions}")
        GPSConfig.from_dict({**self.gps_defaults(), **self.gps})  # validate early, naming bad keys

    def gps_defaults(self) -> dict[str, Any]:
        return {"init_noise": self.init_noise, "seed": self.seed}

    def gps_config(self) -> GPSConfig:
        return GPSConfig.from_dict({**self.gps_defaults(), **self.gps})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LTO2016Config:
        check_keys(cls, d, "gps2016")
        return cls(**d)


def build(config: LTO2016Config) -> tuple[OptimizerEnv2016, MLPPolicy2016]:
    """The MDP over the family's training objectives, and a fresh π."""
    fam = FAMILIES[config.family]()
    env = OptimizerEnv2016([fam.sample("train", i) for i in range(config.train_objectives)],
                           horizon=config.horizon, history=config.history)
    pi = MLPPolicy2016(env.obs_dim, env.action_dim, config.hidden, seed=config.seed)
    return env, pi


def build_conditions(config: LTO2016Config) -> list[OptimizerEnv2016]:
    """One MDP per condition: training objective i for i < ``config.conditions``."""
    fam = FAMILIES[config.family]()
    return [OptimizerEnv2016([fam.sample("train", i)], horizon=config.horizon, history=config.history)
            for i in range(config.conditions)]


def gradient_descent_psi(env: OptimizerEnv2016, lr: float, noise: float) -> LinearGaussianPolicy:
    """ψ with mean −lr ∇f(x⁽ᵗ⁾) (read from the state's current-gradient block) and variance ``noise``."""
    T, D, d = env.horizon, env.state_dim, env.action_dim
    K = torch.zeros(T, d, D, dtype=torch.float64)
    g0 = env.n + env.H  # state layout: x (n), objective changes (H), gradients (H·n), steps (H·n)
    K[:, :, g0:g0 + d] = -lr * torch.eye(d, dtype=torch.float64)
    cov = noise * torch.eye(d, dtype=torch.float64).expand(T, d, d).clone()
    return LinearGaussianPolicy(K, torch.zeros(T, d, dtype=torch.float64), cov)


def meta_train(config: LTO2016Config, out: Path, resume: bool = False, progress: bool = True,
               iterations: int | None = None, command: str | None = None, executor: Executor | None = None) -> Path:
    """Run (or resume) GPS; export π to ``out/policy.safetensors`` and return that path.
    ``iterations`` overrides the config's number of GPS iterations (also when resuming); the
    conditions' trajectories run on ``executor`` (:mod:`l2o.execution`) if given, same result."""
    torch.set_num_threads(1)
    out = Path(out)
    env, pi = build(config)
    envs = build_conditions(config) if config.conditions > 0 else None
    trainer: GPSTrainer | MultiConditionGPSTrainer
    if resume:
        if not (out / CHECKPOINT_NAME).exists():
            raise FileNotFoundError(f"nothing to resume: {out / CHECKPOINT_NAME} does not exist")
        if envs is not None:
            trainer = MultiConditionGPSTrainer.resume(out, envs, pi, iterations=iterations, progress=progress, executor=executor)
        else:
            trainer = GPSTrainer.resume(out, env, pi, iterations=iterations, progress=progress, executor=executor)
    else:
        gps = config.gps_config()
        gps = GPSConfig.from_dict({**gps.to_dict(), "progress": progress,
                                   **({"iterations": iterations} if iterations is not None else {})})
        psi0 = gradient_descent_psi(env, config.init_lr, config.init_noise)
        if envs is not None:
            trainer = MultiConditionGPSTrainer(envs, pi, gps, out, initial_psi=psi0, executor=executor)
        else:
            trainer = GPSTrainer(env, pi, gps, out, initial_psi=psi0, executor=executor)
    trainer.train()
    assert feature_dim(env.n, env.H) == pi.obs_dim
    return save_policy(out / POLICY_NAME, pi, config.history, {
        "family": config.family, "config": asdict(config), "gps_iterations": trainer.iteration,
        "command": command or "l2o " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    })
