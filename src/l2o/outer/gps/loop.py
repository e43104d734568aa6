"""The Guided Policy Search iteration, written once (Li & Malik 2016 §3, 2017 §3.4–3.5; gps.md §3–7).

GPS alternates trust-region LQG steps on time-varying linear-Gaussian guiding policies ψ with a
regression of the learned policy π onto them, tied by Bregman ADMM. A *condition* is one sampled
environment; it holds *units*, the local LQG problems with their own ψ, λ_t, ν_t, η (one per
condition in plain and multi-condition GPS, one per coordinate group in Convolutional GPS). What
differs between settings is a :class:`Setting`: how samples become local problems (dynamics fit,
cost model), π's form and regression, and π's evaluation. One iteration (:meth:`GPSLoop.step`):

1. the setting samples the current ψ's and builds one :class:`LocalProblem` per unit;
2. per condition, the ε ratio test on its previous ψ-step (true vs predicted cost change);
3. per unit: π̂ (the linear-Gaussian fit of π on ψ's states, covariance Σ^π), the ψ-step by
   :func:`~l2o.outer.gps.lqg.solve_trust_region` (λ_t, ν_t, π̂, Σ_t KL ≤ T·ε), :func:`floor_noise`. A failed
   ψ-step is an error, or with ``psi_step_failure = "keep"`` a warned, counted fallback keeping ψ
   that adds nothing to the predicted improvement (so the ε test compares like with like);
4. π-step: the setting regresses π onto y_t = μ^ψ_t − G_t λ_t/ν_t with weights ν_t G_t⁻¹; Σ^π in
   closed form, shared by all units or one per unit;
5. per unit: dual step on λ_t, ν_t schedule on E D_KL(ψ‖π);
6. the setting evaluates π; the record is logged (``log.jsonl``) and everything needed to continue
   bit for bit is checkpointed (``checkpoint.safetensors``).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from l2o.checkpoint import CheckpointError, rng_state, set_rng_state
from l2o.config import Config, check_field_types
from l2o.execution import Executor
from l2o.outer.base import CHECKPOINT_NAME, LOG_NAME, OuterTrainer, config_resume_check, read_log, restore, run_outer

from .badmm import dual_step, kl_psi_pi, pi_covariance, pi_targets, update_epsilon, update_nu
from .cost import QuadraticCost
from .errors import GPSError, GPSIterationError
from .linear_gaussian import DTYPE, LinearGaussianDynamics, LinearGaussianPolicy, fit_linear_gaussian_policy, floor_noise
from .lqg import expected_cost, solve_trust_region

__all__ = [
    "CHECKPOINT_NAME", "LOG_NAME", "BADMMConfig", "Condition", "GPSLoop", "LocalProblem", "Samples", "Setting", "Unit",
    "finite_or_none", "first_nonfinite_t", "minibatch_adam",
]


@dataclass(frozen=True)
class BADMMConfig(Config):
    """What every GPS setting shares, with one set of defaults: the budget, the ε trust region and
    its ratio test, the Bregman weights ν_t and their schedule, the dual step, π's learning rate,
    the dynamics ridge, the exploration floor and the ψ-step failure policy (validated).

    ε is the KL budget *per time step* (gps.md §8 units): each ψ-step bounds Σ_t KL by T·ε. The ε
    ratio test ignores predicted improvements below ``epsilon_min_gain`` × |the model's cost of
    the old ψ| (noise). ν_t starts at ``nu``; ``kl_target`` is per step. ``noise_floor`` > 0 keeps
    ψ's exploration std at least that fraction of the RMS of its mean action (:func:`floor_noise`).
    """

    iterations: int = 10
    samples: int = 20  # M, trajectories from ψ per iteration (per condition)
    min_valid: int = 2  # fewer finite ψ samples than this is an error
    seed: int = 0
    epsilon: float = 0.5
    epsilon_min: float = 0.05
    epsilon_max: float = 2.0
    epsilon_shrink: float = 0.5
    epsilon_grow: float = 2.0
    epsilon_min_gain: float = 1e-3
    nu: float = 1e-2
    nu_min: float = 1e-4
    nu_max: float = 1e4
    nu_increase: float = 2.0
    nu_decrease: float = 0.5
    kl_target: float = 0.05
    kl_low: float = 0.1  # "well below": D_t < kl_low·kl_target lowers ν_t
    alpha: float = 0.1  # dual step size on λ_t
    pi_lr: float = 1e-2
    dynamics_ridge: float = 1e-6
    noise_floor: float = 0.0
    psi_step_failure: str = "error"  # "error" | "keep" (ψ kept, warned, counted)

    _label = "GPS"

    def __post_init__(self) -> None:
        check_field_types(self, self._label)
        self.require(ge0=("iterations", "seed", "epsilon_min_gain", "alpha", "dynamics_ridge", "noise_floor"),
                     gt0=("kl_target", "pi_lr"), choices={"psi_step_failure": ("error", "keep")})
        self.check(self.samples >= 2, "samples (M) must be ≥ 2")
        self.check(2 <= self.min_valid <= self.samples, "need 2 ≤ min_valid ≤ samples")
        self.check(0 < self.epsilon_min <= self.epsilon <= self.epsilon_max, "need 0 < epsilon_min ≤ epsilon ≤ epsilon_max")
        self.check(0 < self.epsilon_shrink <= 1 <= self.epsilon_grow, "need 0 < epsilon_shrink ≤ 1 ≤ epsilon_grow")
        self.check(0 < self.nu_min <= self.nu <= self.nu_max, "need 0 < nu_min ≤ nu ≤ nu_max")
        self.check(0 < self.nu_decrease <= 1 <= self.nu_increase, "need 0 < nu_decrease ≤ 1 ≤ nu_increase")
        self.check(0 <= self.kl_low <= 1, "kl_low must be in [0, 1]")


def first_nonfinite_t(x: Tensor) -> int | None:
    """The first time index (dim 1 of [N, T, ...]) holding a non-finite value, or None."""
    bad = ~torch.isfinite(x)
    return int(torch.nonzero(bad)[0, 1]) if bool(bad.any()) else None


def minibatch_adam(it: int, params: list[Tensor], lr: float, batches: Iterable[Any],
                   loss_of: Callable[[Any], Tensor], clip: float | None = None) -> None:
    """The π-step's optimiser: one Adam step on ``params`` per batch of ``batches`` on ``loss_of(batch)``,
    the gradient's norm clipped at ``clip`` if given; a non-finite loss is a :class:`GPSIterationError`."""
    opt = torch.optim.Adam(params, lr=lr)
    for step, batch in enumerate(batches):
        loss = loss_of(batch)
        if not torch.isfinite(loss):
            raise GPSIterationError(it, "π-step", f"non-finite regression loss at Adam step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()


# --------------------------------------------------------------------------- state
@dataclass
class Unit:
    """The BADMM variables of one local problem: ψ, λ_t [T, d], ν_t [T], the last η and
    E D_KL(ψ‖π) per t, Σ^π as this unit sees it, and (for a dynamics prior) recent transitions."""

    name: str
    psi: LinearGaussianPolicy
    lam: Tensor
    nu: Tensor
    pi_cov: Tensor
    eta: float | None = None
    kl_prev: Tensor | None = None
    prior_buffer: list[Tensor] = field(default_factory=list)

    def tensors(self) -> dict[str, Tensor]:
        """The unit's tensors by checkpoint key (ψ's K, k, cov; λ as ``lambda``; ...)."""
        t = {"K": self.psi.K, "k": self.psi.k, "cov": self.psi.cov, "lambda": self.lam, "nu": self.nu,
             "pi_cov": self.pi_cov.clone(), "kl_prev": self.kl_prev}
        t.update({f"prior_buffer.{b}": x for b, x in enumerate(self.prior_buffer)})
        return {k: v for k, v in t.items() if v is not None}

    @classmethod
    def from_tensors(cls, meta: dict[str, Any], t: dict[str, Tensor]) -> Unit:
        """Inverse of :meth:`tensors` with the unit's JSON meta (name, η, prior buffer length)."""
        return cls(meta["name"], LinearGaussianPolicy(t["K"], t["k"], t["cov"]), t["lambda"], t["nu"], t["pi_cov"],
                   meta["eta"], t.get("kl_prev"), [t[f"prior_buffer.{b}"] for b in range(int(meta["prior_buffer"]))])


@dataclass
class Condition:
    """One sampled environment: its units, its trust region ε and the bookkeeping of its ratio test
    (``pending`` = [c̃(ψ_old), c̃(ψ_new), true cost of ψ_old's samples] of the last ψ-step)."""

    units: list[Unit]
    epsilon: float
    pending: Tensor | None = None

    def __getattr__(self, name: str) -> Any:
        """A one-unit condition reads as its unit (ψ_c, λ_c, ν_c, η_c, ...)."""
        units = self.__dict__.get("units")
        if units is not None and len(units) == 1:
            return getattr(units[0], name)
        raise AttributeError(name)


@dataclass
class LocalProblem:
    """One unit's problem of this iteration: ψ's sampled states X [N, T, D] (float64), π's inputs
    for the same samples, the fitted dynamics p̃, the cost model c̃, the initial-state distribution
    N(μ₀, Σ₀), the unit's weight in its condition's cost, and fields for the unit's record."""

    X: Tensor
    obs: Any
    dynamics: LinearGaussianDynamics
    cost: QuadraticCost
    mu0: Tensor
    sigma0: Tensor
    weight: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Samples:
    """One condition's samples: their mean true cost, one :class:`LocalProblem` per unit, and
    fields for the condition's record (e.g. counts of valid and diverged trajectories)."""

    cost: float
    problems: list[LocalProblem]
    info: dict[str, Any] = field(default_factory=dict)


class Setting(ABC):
    """What differs between GPS settings: ``T``, ``D``, ``d`` (every unit's horizon, state and action
    sizes), ``n_conditions``, whether Σ^π is shared by all units, and the methods below."""

    name: str
    T: int
    D: int
    d: int
    n_conditions: int = 1
    shared_pi_cov: bool = True
    pi_ready: bool = True  # False while π is a placeholder (then the ψ-step has no BADMM terms)
    executor: Executor | None = None  # where rollouts run (l2o.execution); None: in this process

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        """``[fn(x) for x in items]``, on the executor if there is one. ``fn`` must be picklable and
        a deterministic function of its item, so that every backend gives the same result."""
        return self.executor.map(fn, items) if self.executor is not None else [fn(x) for x in items]

    @abstractmethod
    def initial_conditions(self) -> list[Condition]:
        """Conditions and units at iteration 0 (ψ₀, λ = 0, ν = config.nu, Σ^π₀)."""

    @abstractmethod
    def sample(self, it: int, conditions: list[Condition]) -> list[Samples]:
        """Roll out each condition's ψ's and build its units' local problems."""

    @abstractmethod
    def pi_mean(self, obs: Any) -> Tensor:
        """μ^π on one problem's observations → [N, T, d] float64 (no grad)."""

    @abstractmethod
    def fit_pi(self, it: int, problems: list[LocalProblem], targets: list[Tensor], weights: list[Tensor]) -> float:
        """The π-step onto every unit's targets [N, T, d] with weights [T, d, d]; returns its loss."""

    @abstractmethod
    def evaluate(self, it: int) -> dict[str, Any]:
        """Evaluate π (fields for :meth:`record`)."""

    @abstractmethod
    def record(self, it: int, cds: list[Condition], conditions: list[dict[str, Any]], units: list[dict[str, Any]],
               pi_loss: float, evaluation: dict[str, Any], wall_s: float) -> dict[str, Any]:
        """The iteration's log record from the updated conditions, fields per condition and per unit (in order)."""

    def postfix(self, record: dict[str, Any]) -> dict[str, Any]:
        """What the progress bar shows of a record."""
        return {}

    def after_step(self, record: dict[str, Any]) -> None:
        """Runs before the checkpoint; may add fields to the record (e.g. after exporting the best π)."""

    @abstractmethod
    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """π's parameters, generators and anything else to checkpoint (tensors, JSON meta)."""

    @abstractmethod
    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Restore what :meth:`state` saved."""


# --------------------------------------------------------------------------- the loop
class GPSLoop(OuterTrainer):
    """GPS/BADMM iterations of a :class:`Setting` under a :class:`BADMMConfig`, an
    :class:`~l2o.outer.base.OuterTrainer` (one outer step = one GPS iteration) run by
    :func:`~l2o.outer.base.run_outer`: ``out/log.jsonl`` gets one record per iteration and
    ``out/checkpoint.safetensors`` is rewritten after each. ``fresh`` refuses to start over an
    existing checkpoint (continue it with :meth:`load`, or a front end's ``resume``)."""

    def __init__(self, setting: Setting, config: BADMMConfig, out: str | os.PathLike, progress: bool = True,
                 fresh: bool = True) -> None:
        self.setting, self.config, self.out, self.progress = setting, config, Path(out), progress
        self.kind = f"l2o-gps/{setting.name}"
        if fresh and (self.out / CHECKPOINT_NAME).exists():
            raise FileExistsError(f"{self.out / CHECKPOINT_NAME} exists; use {type(self).__name__}.resume(...) "
                                  "to continue it")
        self.conditions: list[Condition] = []
        self.iteration = 0
        self.logs: list[dict[str, Any]] = []
        self._loaded: dict[str, Tensor] = {}

    @property
    def units(self) -> list[Unit]:
        return [u for cd in self.conditions for u in cd.units]

    # ------------------------------------------------------------------ checkpoint (OuterTrainer)
    @property
    def theta(self) -> Tensor:
        """π's parameters as one float64 vector."""
        return torch.cat([v.reshape(-1).to(DTYPE) for v in self.setting.state()[0].values()])

    def state_tensors(self) -> dict[str, Tensor]:
        """Every condition's ε and ratio-test bookkeeping, every unit's ψ, λ, ν, Σ^π, last KL and
        prior buffer, and the setting's tensors."""
        tensors: dict[str, Tensor] = {}
        for i, cd in enumerate(self.conditions):
            tensors[f"c{i}.epsilon"] = torch.tensor([cd.epsilon], dtype=DTYPE)
            if cd.pending is not None:
                tensors[f"c{i}.pending"] = cd.pending
            for j, u in enumerate(cd.units):
                tensors.update({f"c{i}.u{j}.{k}": v for k, v in u.tensors().items()})
        tensors.update({f"setting.{k}": v for k, v in self.setting.state()[0].items()})
        return tensors

    def state_meta(self) -> dict[str, Any]:
        """The config, the iteration, units' names and η, the sizes, the setting's JSON and the global RNG."""
        conds = [[{"name": u.name, "eta": u.eta, "prior_buffer": len(u.prior_buffer)} for u in cd.units]
                 for cd in self.conditions]
        return {"config": self.config.to_dict(), "iteration": self.iteration, "conditions": conds,
                "dims": [self.setting.T, self.setting.D, self.setting.d], "setting": self.setting.state()[1],
                "rng": rng_state()}

    def load_state_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        # Fresh (aligned) copies: BLAS kernels may round differently on differently aligned
        # buffers, which would break bit-exact resume.
        self._loaded = {k: v.clone() for k, v in tensors.items()}

    def _config_check(self) -> Callable[[Mapping[str, Any]], None]:
        """Resuming needs the saved config to equal this loop's except the budget, the progress bar
        and the data folder (keys added since it was written take their defaults)."""
        return config_resume_check(self.out, self.config.to_dict(), ("iterations", "progress", "data_dir"),
                                   type(self.config)().to_dict())

    def load_state_meta(self, meta: Mapping[str, Any]) -> None:
        """Restore the loop from the loaded tensors and ``meta`` (whose sizes must be the setting's)."""
        path, tensors = self.out / CHECKPOINT_NAME, self._loaded
        s = self.setting
        if meta["dims"] != [s.T, s.D, s.d] or len(meta["conditions"]) != s.n_conditions:
            raise CheckpointError(f"checkpoint {path} has {len(meta['conditions'])} conditions of (T, D, d) = "
                                  f"{tuple(meta['dims'])}, the setting {s.n_conditions} of {(s.T, s.D, s.d)}")

        def part(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.conditions = [Condition([Unit.from_tensors(um, part(f"c{i}.u{j}.")) for j, um in enumerate(units)],
                                     float(tensors[f"c{i}.epsilon"][0]), tensors.get(f"c{i}.pending"))
                           for i, units in enumerate(meta["conditions"])]
        try:
            s.load_state(part("setting."), meta["setting"])
        except CheckpointError as e:
            raise CheckpointError(f"checkpoint {path}: {e}") from e
        self.iteration = int(meta["iteration"])
        set_rng_state(meta["rng"])

    def load(self) -> bool:
        """Continue from ``out/checkpoint.safetensors`` if it exists (False if not)."""
        path = self.out / CHECKPOINT_NAME
        if not path.exists():
            return False
        restore(self, path, self._config_check())
        self.logs = read_log(self.out / LOG_NAME, self.iteration)
        return True

    def postfix(self, record: Mapping[str, Any]) -> dict[str, Any]:
        return self.setting.postfix(dict(record))

    def train(self, stop_after: int | None = None, callback: Callable[[dict[str, Any]], None] | None = None
              ) -> list[dict[str, Any]]:
        """Run (or continue the checkpoint in ``out``) until ``config.iterations``, or ``stop_after``
        more; ``callback`` gets every record. Returns all records (also in ``log.jsonl``)."""

        def each(_trainer: OuterTrainer, n: int, log: list[dict[str, Any]], _wall: float) -> None:
            if callback is not None and log and log[-1]["step"] == n:
                callback(log[-1])

        result = run_outer(self, self.out, self.config.iterations, meta={}, resume=(self.out / CHECKPOINT_NAME).exists(),
                           max_new=stop_after, progress=self.progress, desc=f"GPS ({self.setting.name})",
                           on_checkpoint=each, resume_check=self._config_check())
        self.logs = result.log
        return self.logs

    # ------------------------------------------------------------------ one iteration
    def _ratio_test(self, cd: Condition, real_cost: float) -> tuple[float, float | None]:
        """ε for this iteration's ψ-step and the ratio ρ = actual / predicted behind it."""
        c = self.config
        if cd.pending is None:
            return cd.epsilon, None
        old_model, new_model, old_real = (float(x) for x in cd.pending)
        predicted, actual = old_model - new_model, old_real - real_cost
        min_gain = c.epsilon_min_gain * abs(old_model) + 1e-12
        rho = actual / predicted if predicted > min_gain else None
        eps = update_epsilon(cd.epsilon, predicted, actual, c.epsilon_min, c.epsilon_max, shrink=c.epsilon_shrink,
                             grow=c.epsilon_grow, min_predicted=min_gain)
        return eps, rho

    def _pi_mean(self, it: int, stage: str, obs: Any) -> Tensor:
        """μ^π on one problem's observations; not finite is an error of ``stage``."""
        pi_mean = self.setting.pi_mean(obs)
        t_bad = first_nonfinite_t(pi_mean)
        if t_bad is not None:
            raise GPSIterationError(it, stage, "π's mean action is not finite on ψ's samples", t=t_bad)
        return pi_mean

    def _psi_step(self, it: int, stage: str, u: Unit, prob: LocalProblem, epsilon: float) -> dict[str, Any]:
        """π̂ fit and the trust-region LQG of one unit; returns ψ_new, the model costs and record fields."""
        s, c, T = self.setting, self.config, self.setting.T
        pi_mean_old = self._pi_mean(it, stage + "π̂ fit", prob.obs)
        with GPSIterationError.raised_in(it, stage + "π̂ fit"):
            pi_fit = fit_linear_gaussian_policy(prob.X, pi_mean_old, cov=u.pi_cov.expand(T, s.d, s.d))
        badmm = {"lambda_": u.lam, "nu": u.nu, "pi_fit": pi_fit} if s.pi_ready else {}
        t0 = time.perf_counter()
        out: dict[str, Any] = {"pi_mean_old": pi_mean_old, "model_old": 0.0, "model_new": 0.0}
        try:
            res = solve_trust_region(prob.dynamics, prob.cost, u.psi, prob.mu0, prob.sigma0, epsilon * T,
                                     eta_init=u.eta, **badmm)
        except (GPSError, ValueError) as e:
            if c.psi_step_failure == "error":
                raise GPSIterationError(it, stage + "ψ-step (LQG)", str(e), t=getattr(e, "t", None)) from e
            warnings.warn(f"GPS iteration {it}: ψ-step of {u.name} failed, ψ kept: {e}", RuntimeWarning, stacklevel=3)
            out.update(psi=u.psi, eta=u.eta, info={"error": str(e)}, failed=True)
            return out
        psi_new = floor_noise(res.policy, prob.X, c.noise_floor)
        out.update(psi=psi_new, eta=res.eta, failed=False,
                   model_old=float(expected_cost(u.psi, prob.dynamics, prob.cost, prob.mu0, prob.sigma0).sum()),
                   model_new=float(expected_cost(psi_new, prob.dynamics, prob.cost, prob.mu0, prob.sigma0).sum()),
                   info={"eta": res.eta, "kl_psi_step": res.kl, "lqg_s": round(time.perf_counter() - t0, 3)})
        return out

    def step(self) -> dict[str, Any]:
        """One GPS/BADMM iteration; returns its record (:meth:`train` logs and checkpoints it)."""
        s, c, it = self.setting, self.config, self.iteration
        t_start = time.perf_counter()
        if not self.conditions:
            self.conditions = s.initial_conditions()
        batches = s.sample(it, self.conditions)
        # ε ratio tests and ψ-steps
        cond_recs: list[dict[str, Any]] = []
        steps: list[list[dict[str, Any]]] = []
        for i, (cd, b) in enumerate(zip(self.conditions, batches, strict=True)):
            eps, rho = self._ratio_test(cd, b.cost)
            stage = f"condition {i}, " if len(self.conditions) > 1 else ""
            steps.append([self._psi_step(it, stage + (f"{u.name}, " if len(cd.units) > 1 else ""), u, p, eps)
                          for u, p in zip(cd.units, b.problems, strict=True)])
            model_old = sum(p.weight * r["model_old"] for p, r in zip(b.problems, steps[-1]))
            model_new = sum(p.weight * r["model_new"] for p, r in zip(b.problems, steps[-1]))
            cd.pending = torch.tensor([model_old, model_new, b.cost], dtype=DTYPE)
            cd.epsilon = eps
            cond_recs.append({"psi_cost": b.cost, "psi_cost_predicted": model_new, "predicted_improvement":
                              model_old - model_new, "epsilon": eps, "rho": finite_or_none(rho),
                              "psi_step_failures": sum(r["failed"] for r in steps[-1]), **b.info})
        # π-step on every unit's samples
        problems = [p for b in batches for p in b.problems]
        flat = [r for rs in steps for r in rs]
        units = self.units
        tw = [pi_targets(r["psi"], p.X, u.lam, u.nu) for u, p, r in zip(units, problems, flat, strict=True)]
        pi_loss = s.fit_pi(it, problems, [y for y, _ in tw], [w for _, w in tw])
        if s.shared_pi_cov:
            shared = pi_covariance(torch.cat([r["psi"].cov for r in flat]), torch.cat([u.nu for u in units]))
        pi_means = [self._pi_mean(it, "π-step", p.obs) for p in problems]
        # dual step and ν schedule, per unit
        unit_recs: list[dict[str, Any]] = []
        for u, p, r, pi_mean_new in zip(units, problems, flat, pi_means, strict=True):
            psi_mean = r["psi"].mean(p.X)
            u.pi_cov = shared if s.shared_pi_cov else pi_covariance(r["psi"].cov, u.nu)
            kl_t = kl_psi_pi(r["psi"], p.X, pi_mean_new, u.pi_cov)
            nu_used = u.nu
            u.lam = dual_step(u.lam, u.nu, pi_mean_new, psi_mean, c.alpha)
            u.nu = update_nu(u.nu, kl_t, u.kl_prev, c.kl_target, c.nu_min, c.nu_max, increase=c.nu_increase,
                             decrease=c.nu_decrease, low=c.kl_low)
            u.kl_prev, u.psi, u.eta = kl_t, r["psi"], r["eta"]
            unit_recs.append({**p.info, **r["info"], "kl_psi_pi": float(kl_t.sum()),
                              "kl_psi_pi_mean": float(kl_t.mean()), "kl_psi_pi_max": float(kl_t.max()),
                              "nu_mean": float(nu_used.mean()), "nu_min": float(nu_used.min()),
                              "nu_max": float(nu_used.max()), "nu_next": float(u.nu.mean()),
                              "lambda_norm": float(u.lam.norm()),
                              "pi_mse_before": float((r["pi_mean_old"] - psi_mean).square().sum(-1).mean()),
                              "pi_mse": float((pi_mean_new - psi_mean).square().sum(-1).mean())})
        evaluation = s.evaluate(it)
        self.iteration = it + 1
        rec = s.record(it, self.conditions, cond_recs, unit_recs, pi_loss, evaluation, time.perf_counter() - t_start)
        for k, v in rec.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise GPSIterationError(it, "logging", f"{k} is not finite ({v})")
        s.after_step(rec)
        return rec


def finite_or_none(x: float | Tensor | None) -> float | None:
    """``x`` as a float, or None when it is None or not finite (for log records)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None

