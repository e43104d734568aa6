"""The Guided Policy Search training loop with Bregman ADMM (Li & Malik 2017 §3.4; gps.md §3–7).

Per iteration k (:meth:`GPSTrainer.step`):

1. sample M trajectories from ψ (exploration noise G_t); drop diverged ones (counted);
2. ε schedule on the previous ψ-step (the new ψ's real cost vs the model's prediction);
3. fit the dynamics p̃ (NIW prior on the transitions of the last few iterations) and the cost
   model c̃ (exact, from ``env.local_cost``, or fitted by regression); s_0 ~ N(μ₀, Σ₀) empirical;
4. π̂: linear-Gaussian fit of π's mean actions on ψ's sampled states (footnote 2), covariance Σ^π;
5. ψ-step: :func:`~l2o.gps.lqg.solve_trust_region` with λ_t, ν_t, π̂ and Σ_t KL ≤ T·ε;
6. π-step: weighted regression of the torch module μ^π onto the targets of
   :func:`~l2o.gps.badmm.pi_targets` (Adam, a few epochs), then Σ^π in closed form;
7. dual step on λ_t, ν_t schedule on E D_KL(ψ‖π);
8. evaluate π (mean action, fixed evaluation seed: common random numbers across iterations);
9. log a record (returned, and appended to ``log.jsonl``) and checkpoint everything needed to
   continue bit-for-bit (``checkpoint.safetensors``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import (
    CheckpointError,
    generator_state,
    load_checkpoint,
    restore_generator,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .badmm import (
    dual_step,
    kl_psi_pi,
    pi_covariance,
    pi_targets,
    update_epsilon,
    update_nu,
    weighted_regression_loss,
)
from .cost import QuadraticCost, fit_quadratic_cost
from .dynamics import GaussianPrior, GMMPrior, fit_dynamics, pooled_transitions
from .env import Environment, LinearGaussianController, ModuleController, Trajectories
from .errors import GPSError
from .linear_gaussian import DTYPE, LinearGaussianPolicy, fit_linear_gaussian_policy
from .lqg import expected_cost, solve_trust_region

__all__ = ["GPSConfig", "GPSTrainer", "GPSIterationError"]

CHECKPOINT_KIND = "gps-trainer"
CHECKPOINT_NAME = "checkpoint.safetensors"
LOG_NAME = "log.jsonl"


class GPSIterationError(GPSError):
    """A GPS iteration failed (sampling, a fit, the LQG or the π-step); names the iteration,
    the stage and, where known, the time step t."""

    def __init__(self, iteration: int, stage: str, message: str, t: int | None = None) -> None:
        self.iteration, self.stage, self.t = iteration, stage, t
        where = f"GPS iteration {iteration}, {stage}" + (f", t={t}" if t is not None else "")
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class GPSConfig:
    """Hyperparameters of :class:`GPSTrainer` (validated; :meth:`from_dict` rejects unknown keys).

    ε is the KL budget *per time step* (gps.md §8 units): the ψ-step bounds Σ_t KL by T·ε.
    ν_t starts at ``nu`` for every t; ``kl_target`` is per time step. The ε ratio test ignores
    predicted gains below 1e-3 of the model's cost (noise).
    """

    iterations: int = 10
    samples: int = 20  # M, trajectories from ψ per iteration
    eval_samples: int = 20  # rollouts of π (mean action) per iteration; 0 = do not evaluate π
    init_noise: float = 1.0  # initial G_t = σ² I of ψ (and initial Σ^π)
    # ε: per-step KL trust region and its schedule (gps.md §7.5)
    epsilon: float = 0.5
    epsilon_min: float = 0.05
    epsilon_max: float = 2.0
    epsilon_shrink: float = 0.5
    epsilon_grow: float = 2.0
    # ν_t: Bregman penalty weights and their schedule (gps.md §7.4)
    nu: float = 1e-2
    nu_min: float = 1e-4
    nu_max: float = 1e4
    nu_increase: float = 2.0
    nu_decrease: float = 0.5
    kl_target: float = 0.05  # per-step target for E D_KL(ψ‖π)
    kl_low: float = 0.1  # "well below": D_t < kl_low·kl_target lowers ν_t
    alpha: float = 0.1  # dual step size on λ_t
    # π-step
    pi_epochs: int = 100
    pi_lr: float = 1e-2
    pi_batch_size: int = 0  # trajectories per Adam step; 0 = all
    # dynamics prior
    prior: str = "gaussian"  # "gaussian" | "gmm" | "none" (default prior from this iteration only)
    prior_components: int = 4
    prior_strength: float = 1.0  # m = n₀, in samples
    prior_iterations: int = 3  # iterations of transitions kept for the prior
    dynamics_ridge: float = 1e-6
    # cost model
    cost_model: str = "auto"  # "auto" (exact if env.local_cost exists) | "exact" | "fit"
    dynamics_model: str = "fit"  # "fit" (regression with prior) | "local" (env.local_dynamics: known structure)
    cost_window: int = 1
    cost_ridge: float = 1e-6
    cost_action_floor: float | None = None  # clip C_aa eigenvalues of a fitted cost
    min_valid: int = 2  # fewer valid ψ samples than this is an error
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"GPSConfig: {msg}")

        ints = ("iterations", "samples", "eval_samples", "pi_epochs", "pi_batch_size", "prior_components",
                "prior_iterations", "cost_window", "min_valid", "seed")
        for name in ints:
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool), f"{name} must be an int, got {v!r}")
        floats = ("init_noise", "epsilon", "epsilon_min", "epsilon_max", "epsilon_shrink", "epsilon_grow", "nu",
                  "nu_min", "nu_max", "nu_increase", "nu_decrease", "kl_target", "kl_low", "alpha", "pi_lr",
                  "prior_strength", "dynamics_ridge", "cost_ridge")
        for name in floats:
            v = getattr(self, name)
            check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                  f"{name} must be a finite number, got {v!r}")
        check(self.iterations >= 0, "iterations must be ≥ 0")
        check(self.samples >= 2, "samples (M) must be ≥ 2")
        check(self.eval_samples >= 0, "eval_samples must be ≥ 0")
        check(self.init_noise > 0, "init_noise must be > 0")
        check(0 < self.epsilon_min <= self.epsilon <= self.epsilon_max, "need 0 < epsilon_min ≤ epsilon ≤ epsilon_max")
        check(0 < self.epsilon_shrink <= 1 <= self.epsilon_grow, "need 0 < epsilon_shrink ≤ 1 ≤ epsilon_grow")
        check(0 < self.nu_min <= self.nu <= self.nu_max, "need 0 < nu_min ≤ nu ≤ nu_max")
        check(0 < self.nu_decrease <= 1 <= self.nu_increase, "need 0 < nu_decrease ≤ 1 ≤ nu_increase")
        check(self.kl_target > 0, "kl_target must be > 0")
        check(0 <= self.kl_low <= 1, "kl_low must be in [0, 1]")
        check(self.alpha >= 0, "alpha must be ≥ 0")
        check(self.pi_epochs >= 0, "pi_epochs must be ≥ 0")
        check(self.pi_lr > 0, "pi_lr must be > 0")
        check(self.pi_batch_size >= 0, "pi_batch_size must be ≥ 0")
        check(self.prior in ("gaussian", "gmm", "none"), f"prior must be 'gaussian', 'gmm' or 'none', got {self.prior!r}")
        check(self.prior_components >= 1, "prior_components must be ≥ 1")
        check(self.prior_strength >= 0, "prior_strength must be ≥ 0")
        check(self.prior_iterations >= 1, "prior_iterations must be ≥ 1")
        check(self.dynamics_ridge >= 0 and self.cost_ridge >= 0, "ridges must be ≥ 0")
        check(self.dynamics_model in ("fit", "local"), f"dynamics_model must be 'fit' or 'local', got {self.dynamics_model!r}")
        check(self.cost_model in ("auto", "exact", "fit"), f"cost_model must be 'auto', 'exact' or 'fit', got {self.cost_model!r}")
        check(self.cost_window >= 0, "cost_window must be ≥ 0")
        check(self.cost_action_floor is None or (isinstance(self.cost_action_floor, (int, float))
                                                 and self.cost_action_floor > 0), "cost_action_floor must be None or > 0")
        check(2 <= self.min_valid <= self.samples, "need 2 ≤ min_valid ≤ samples")
        check(isinstance(self.progress, bool), "progress must be a bool")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPSConfig:
        """Build from a mapping, rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPS config key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _module_dtype(module: nn.Module) -> torch.dtype:
    p = next(iter(module.parameters()), None)
    return p.dtype if p is not None else torch.get_default_dtype()


def _finite_or_none(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


class GPSTrainer:
    """GPS with BADMM: a time-varying linear-Gaussian ψ guides a torch policy module π.

    Args:
        env: an :class:`~l2o.gps.env.Environment`.
        policy_module: μ^π, mapping observations [N, T, O] (and per step [n, O]) to mean actions
            [..., d]; trained in place.
        config: :class:`GPSConfig`.
        out_dir: where ``log.jsonl`` and ``checkpoint.safetensors`` go (refuses to start over an
            existing checkpoint: use :meth:`resume`).
        initial_psi: ψ₀; default K_t = 0, k_t = 0, G_t = ``init_noise``·I.
        _fresh: internal (False when :meth:`resume` rebuilds a trainer over its checkpoint).
    """

    def __init__(
        self,
        env: Environment,
        policy_module: nn.Module,
        config: GPSConfig,
        out_dir: str | os.PathLike,
        initial_psi: LinearGaussianPolicy | None = None,
        _fresh: bool = True,
    ) -> None:
        self.env, self.module, self.config = env, policy_module, config
        self.out_dir = Path(out_dir)
        T, D, d = env.horizon, env.state_dim, env.action_dim
        self.T, self.D, self.d = T, D, d
        if _fresh and (self.out_dir / CHECKPOINT_NAME).exists():
            raise FileExistsError(f"{self.out_dir / CHECKPOINT_NAME} exists; use GPSTrainer.resume(...) to continue it")
        c = config
        if initial_psi is None:
            initial_psi = LinearGaussianPolicy.from_gain(torch.zeros(d, D, dtype=DTYPE), cov=c.init_noise, T=T)
        if (initial_psi.T, initial_psi.dim_a, initial_psi.dim_s) != (T, d, D):
            raise ValueError(f"initial_psi must have T, d, D = {(T, d, D)}")
        self.psi = initial_psi
        self.pi_cov = c.init_noise * torch.eye(d, dtype=DTYPE)  # Σ^π
        self.lam = torch.zeros(T, d, dtype=DTYPE)  # λ_t
        self.nu = torch.full((T,), c.nu, dtype=DTYPE)  # ν_t
        self.epsilon = float(c.epsilon)
        self.eta: float | None = None
        self.kl_prev: Tensor | None = None  # E D_KL(ψ‖π) per t of the last iteration
        # For the ε schedule: [c̃_k(ψ_old), c̃_k(ψ_new), mean true cost of ψ_old's samples].
        self.pending: Tensor | None = None
        self.prior_buffer: list[Tensor] = []  # pooled transitions of the last iterations
        self.iteration = 0
        self.logs: list[dict[str, Any]] = []
        self.sample_gen = torch.Generator().manual_seed(c.seed)
        self.pi_gen = torch.Generator().manual_seed(c.seed + 1)

    # ------------------------------------------------------------------ checkpointing
    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors: dict[str, Tensor] = {
            "psi.K": self.psi.K, "psi.k": self.psi.k, "psi.cov": self.psi.cov,
            "pi_cov": self.pi_cov, "lambda": self.lam, "nu": self.nu,
        }
        for name, v in self.module.state_dict().items():
            tensors[f"pi.{name}"] = v.detach().clone()
        if self.kl_prev is not None:
            tensors["kl_prev"] = self.kl_prev
        if self.pending is not None:
            tensors["pending"] = self.pending
        for i, x in enumerate(self.prior_buffer):
            tensors[f"prior_buffer.{i}"] = x
        scalars = torch.tensor([self.epsilon, math.nan if self.eta is None else self.eta], dtype=DTYPE)
        tensors["scalars"] = scalars  # exact floats (ε, η)
        meta = {
            "config": self.config.to_dict(),
            "iteration": self.iteration,
            "dims": [self.T, self.D, self.d],
            "prior_buffer": len(self.prior_buffer),
            "logs": self.logs,
            "rng": {
                "sample": generator_state(self.sample_gen),
                "pi": generator_state(self.pi_gen),
                "global": rng_state(),
            },
        }
        return tensors, meta

    def save(self) -> Path:
        """Write ``checkpoint.safetensors`` atomically: ψ, π's state, Σ^π, λ, ν, ε, η, the ε-schedule
        bookkeeping, the prior's transition buffer, generator/RNG states, iteration and logs."""
        tensors, meta = self._state()
        path = save_checkpoint(self.out_dir / CHECKPOINT_NAME, tensors, meta, CHECKPOINT_KIND)
        return path

    @classmethod
    def resume(
        cls,
        out_dir: str | os.PathLike,
        env: Environment,
        policy_module: nn.Module,
        iterations: int | None = None,
        progress: bool | None = None,
    ) -> GPSTrainer:
        """Continue the run saved in ``out_dir`` exactly where its last checkpoint left it.

        ``env`` and ``policy_module`` must be built as for the original run (same sizes and
        architecture; the module's weights are overwritten). ``iterations`` may extend the run;
        ``progress`` toggles the bar. Everything else comes from the checkpoint.
        """
        out = Path(out_dir)
        tensors, meta = load_checkpoint(out / CHECKPOINT_NAME, CHECKPOINT_KIND)
        cfg = dict(meta["config"])
        if iterations is not None:
            cfg["iterations"] = int(iterations)
        if progress is not None:
            cfg["progress"] = bool(progress)
        config = GPSConfig.from_dict(cfg)
        if [env.horizon, env.state_dim, env.action_dim] != meta["dims"]:
            raise CheckpointError(f"checkpoint {out} is for (T, D, d) = {tuple(meta['dims'])}, "
                                  f"env has {(env.horizon, env.state_dim, env.action_dim)}")
        self = cls(env, policy_module, config, out, _fresh=False)
        self.psi = LinearGaussianPolicy(tensors["psi.K"], tensors["psi.k"], tensors["psi.cov"])
        self.pi_cov, self.lam, self.nu = tensors["pi_cov"], tensors["lambda"], tensors["nu"]
        sd = {k[3:]: v for k, v in tensors.items() if k.startswith("pi.")}
        try:
            policy_module.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {out}: the policy module does not match the saved π: {e}") from e
        self.kl_prev = tensors.get("kl_prev")
        self.pending = tensors.get("pending")
        self.prior_buffer = [tensors[f"prior_buffer.{i}"] for i in range(int(meta["prior_buffer"]))]
        eps, eta = (float(x) for x in tensors["scalars"])
        self.epsilon, self.eta = eps, (None if math.isnan(eta) else eta)
        self.iteration = int(meta["iteration"])
        self.logs = list(meta["logs"])
        self.sample_gen = restore_generator(meta["rng"]["sample"])
        self.pi_gen = restore_generator(meta["rng"]["pi"])
        set_rng_state(meta["rng"]["global"])
        self._rewrite_log()
        return self

    def _rewrite_log(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / (LOG_NAME + ".tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in self.logs))
        os.replace(tmp, self.out_dir / LOG_NAME)

    def _append_log(self, record: dict[str, Any]) -> None:
        with open(self.out_dir / LOG_NAME, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    # ------------------------------------------------------------------ the loop
    def train(self, stop_after: int | None = None) -> list[dict[str, Any]]:
        """Run iterations until ``config.iterations`` (or ``stop_after`` more); checkpoint after
        every one. Returns all records so far (also in ``log.jsonl``)."""
        from tqdm.auto import tqdm

        if self.iteration == 0 and not self.logs:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._rewrite_log()
        end = self.config.iterations
        if stop_after is not None:
            end = min(end, self.iteration + int(stop_after))
        bar = tqdm(total=self.config.iterations, initial=self.iteration, desc="GPS", unit="it",
                   disable=not self.config.progress)
        try:
            while self.iteration < end:
                rec = self.step()
                bar.update()
                bar.set_postfix(psi=f"{rec['psi_cost']:.4g}", pi=rec["pi_cost"], kl=f"{rec['kl_psi_pi']:.3g}")
        finally:
            bar.close()
        return self.logs

    def _prior(self, it: int):
        c = self.config
        if c.prior == "none":
            return None
        pooled = torch.cat(self.prior_buffer)
        prior = (GaussianPrior(m=c.prior_strength, n0=c.prior_strength) if c.prior == "gaussian"
                 else GMMPrior(n_components=c.prior_components, m=c.prior_strength, n0=c.prior_strength, seed=c.seed + it))
        return prior.fit(pooled)

    def _cost_model(self, traj: Trajectories) -> QuadraticCost:
        c = self.config
        local = getattr(self.env, "local_cost", None)
        if c.cost_model == "exact" or (c.cost_model == "auto" and callable(local)):
            if not callable(local):
                raise ValueError("cost_model='exact' but the environment has no local_cost(trajectories)")
            cost = local(traj)
        else:
            cost = fit_quadratic_cost(traj.states, traj.actions, traj.costs, ridge=c.cost_ridge,
                                      window=c.cost_window, action_eig_floor=c.cost_action_floor)
        if (cost.T, cost.dim_s, cost.dim_a) != (self.T, self.D, self.d):
            raise ValueError(f"cost model has (T, D, d) = {(cost.T, cost.dim_s, cost.dim_a)}")
        return cost

    def _pi_mean(self, observations: Tensor) -> Tensor:
        """μ^π on observations [N, T, O] → [N, T, d] float64 (no grad)."""
        with torch.no_grad():
            return self.module(observations.to(_module_dtype(self.module))).to(DTYPE)

    def _pi_step(self, it: int, obs: Tensor, targets: Tensor, W: Tensor) -> float:
        """Adam on the weighted regression; returns the final full-batch loss."""
        c = self.config
        dt = _module_dtype(self.module)
        X, Y, Wm = obs.to(dt), targets.to(dt), W.to(dt)
        N = X.shape[0]
        bs = N if c.pi_batch_size == 0 else min(c.pi_batch_size, N)
        opt = torch.optim.Adam(self.module.parameters(), lr=c.pi_lr)
        for epoch in range(c.pi_epochs):
            order = torch.arange(N) if bs == N else torch.randperm(N, generator=self.pi_gen)
            for i in range(0, N, bs):
                idx = order[i:i + bs]
                opt.zero_grad(set_to_none=True)
                loss = weighted_regression_loss(self.module(X[idx]), Y[idx], Wm)
                if not torch.isfinite(loss):
                    raise GPSIterationError(it, "π-step", f"non-finite regression loss at epoch {epoch}")
                loss.backward()
                opt.step()
        with torch.no_grad():
            pred = self.module(X)
            if not bool(torch.isfinite(pred).all()):
                t = int(torch.nonzero(~torch.isfinite(pred))[0, 1])
                raise GPSIterationError(it, "π-step", "π's mean action is not finite", t=t)
            return float(weighted_regression_loss(pred, Y, Wm))

    def step(self) -> dict[str, Any]:
        """One GPS/BADMM iteration; returns its record (also logged and checkpointed).

        Record: ``iteration``; ``psi_cost`` (mean Σ_t c_t of this iteration's ψ samples) and
        ``psi_cost_predicted`` (the model's E Σ_t c̃_t of the new ψ); ``pi_cost`` (mean Σ_t c_t of π
        rolled out with its mean action, fixed evaluation seed; None if not evaluated);
        ``n_valid``/``n_diverged`` (ψ samples kept/dropped), ``pi_eval_diverged``; ``kl_psi_pi``
        (Σ_t E D_KL(ψ_new‖π_new) on the samples) and its max over t; ``kl_psi_step`` (Σ_t KL to
        ψ_old) and ``eta``; ``epsilon`` (per-step ε used) and ``rho`` (the ratio test behind it);
        ``nu_mean/min/max`` (ν_t used); ``lambda_norm`` (after the dual step); ``pi_loss`` (the
        weighted regression objective after the π-step) and ``pi_mse_before``/``pi_mse``
        (E‖μ^π − μ^ψ_new‖² on ψ's states before/after the π-step: π's regression error).
        """
        c, it, T = self.config, self.iteration, self.T
        # 1. samples from ψ
        raw = self.env.rollout(LinearGaussianController(self.psi, noise=True), c.samples, self.sample_gen)
        traj = raw.valid_only()
        if traj.n_valid < c.min_valid:
            raise GPSIterationError(it, "sampling", f"only {traj.n_valid} of {raw.n} trajectories from ψ are finite "
                                    f"(need {c.min_valid}); ψ diverges")
        X, U = traj.states, traj.actions
        psi_cost = float(traj.total_costs().mean())
        # 2. ε schedule on the previous ψ-step
        eps_used = self.epsilon
        rho = None
        if self.pending is not None:
            old_model, new_pred, old_real = (float(x) for x in self.pending)
            predicted, actual = old_model - new_pred, old_real - psi_cost
            min_gain = 1e-3 * abs(old_model) + 1e-12
            rho = actual / predicted if predicted > min_gain else None
            eps_used = update_epsilon(self.epsilon, predicted, actual, c.epsilon_min, c.epsilon_max,
                                      shrink=c.epsilon_shrink, grow=c.epsilon_grow, min_predicted=min_gain)
        # 3. dynamics (with prior), cost model, initial-state distribution
        try:
            if c.prior != "none":
                pooled, _ = pooled_transitions(X, U)
                self.prior_buffer = (self.prior_buffer + [pooled])[-c.prior_iterations:]
            if c.dynamics_model == "local":
                local_dyn = getattr(self.env, "local_dynamics", None)
                if not callable(local_dyn):
                    raise ValueError("dynamics_model='local' but the environment has no local_dynamics(trajectories)")
                dyn = local_dyn(traj)
            else:
                dyn = fit_dynamics(X, U, prior=self._prior(it), ridge=c.dynamics_ridge)
        except (ValueError, RuntimeError) as e:
            raise GPSIterationError(it, "dynamics fit", str(e), t=getattr(e, "t", None)) from e
        try:
            cost = self._cost_model(traj)
        except (ValueError, RuntimeError) as e:
            raise GPSIterationError(it, "cost model", str(e), t=getattr(e, "t", None)) from e
        mu0 = X[:, 0].mean(0)
        xc = X[:, 0] - mu0
        sigma0 = xc.T @ xc / traj.n + 1e-6 * torch.eye(self.D, dtype=DTYPE)
        # 4. π̂, the linear-Gaussian fit of π on ψ's samples
        obs = traj.observations
        pi_mean_old = self._pi_mean(obs)
        if not bool(torch.isfinite(pi_mean_old).all()):
            t = int(torch.nonzero(~torch.isfinite(pi_mean_old))[0, 1])
            raise GPSIterationError(it, "π̂ fit", "π's mean action is not finite on ψ's samples", t=t)
        try:
            pi_fit = fit_linear_gaussian_policy(X, pi_mean_old, cov=self.pi_cov.expand(T, self.d, self.d))
        except (ValueError, RuntimeError) as e:
            raise GPSIterationError(it, "π̂ fit", str(e)) from e
        # 5. ψ-step
        try:
            res = solve_trust_region(dyn, cost, self.psi, mu0, sigma0, eps_used * T, lambda_=self.lam,
                                     nu=self.nu, pi_fit=pi_fit, eta_init=self.eta)
        except (GPSError, ValueError) as e:
            raise GPSIterationError(it, "ψ-step (LQG)", str(e), t=getattr(e, "t", None)) from e
        psi_new = res.policy
        model_old = float(expected_cost(self.psi, dyn, cost, mu0, sigma0).sum())
        model_new = float(expected_cost(psi_new, dyn, cost, mu0, sigma0).sum())
        # 6. π-step and Σ^π
        targets, W = pi_targets(psi_new, X, self.lam, self.nu)
        psi_mean = psi_new.mean(X)
        mse_before = float((pi_mean_old - psi_mean).square().sum(-1).mean())
        pi_loss = self._pi_step(it, obs, targets, W)
        self.pi_cov = pi_covariance(psi_new.cov, self.nu)
        pi_mean_new = self._pi_mean(obs)
        mse_after = float((pi_mean_new - psi_mean).square().sum(-1).mean())
        # 7. dual step, ν schedule
        kl_t = kl_psi_pi(psi_new, X, pi_mean_new, self.pi_cov)
        self.lam = dual_step(self.lam, self.nu, pi_mean_new, psi_mean, c.alpha)
        nu_used = self.nu
        self.nu = update_nu(self.nu, kl_t, self.kl_prev, c.kl_target, c.nu_min, c.nu_max,
                            increase=c.nu_increase, decrease=c.nu_decrease, low=c.kl_low)
        self.kl_prev = kl_t
        # 8. evaluate π with its mean action (same evaluation seed every iteration)
        pi_cost, pi_div = None, None
        if c.eval_samples > 0:
            ev = self.env.rollout(ModuleController(self.module, noise=False), c.eval_samples,
                                  torch.Generator().manual_seed(c.seed + 2))
            pi_div = ev.n_diverged
            pi_cost = _finite_or_none(ev.valid_only().total_costs().mean()) if ev.n_valid else None
        # 9. record, advance, checkpoint
        self.pending = torch.tensor([model_old, model_new, psi_cost], dtype=DTYPE)
        self.psi, self.eta, self.epsilon = psi_new, res.eta, eps_used
        self.iteration = it + 1
        rec = {
            "iteration": it,
            "psi_cost": psi_cost,
            "psi_cost_predicted": model_new,
            "pi_cost": pi_cost,
            "n_valid": traj.n_valid,
            "n_diverged": raw.n_diverged,
            "pi_eval_diverged": pi_div,
            "kl_psi_pi": float(kl_t.sum()),
            "kl_psi_pi_max": float(kl_t.max()),
            "kl_psi_step": res.kl,
            "eta": res.eta,
            "epsilon": eps_used,
            "rho": _finite_or_none(rho) if rho is not None else None,
            "nu_mean": float(nu_used.mean()),
            "nu_min": float(nu_used.min()),
            "nu_max": float(nu_used.max()),
            "lambda_norm": float(self.lam.norm()),
            "pi_loss": pi_loss,
            "pi_mse_before": mse_before,
            "pi_mse": mse_after,
        }
        for k_, v_ in rec.items():
            if isinstance(v_, float) and not math.isfinite(v_):
                raise GPSIterationError(it, "logging", f"{k_} is not finite ({v_})")
        self.logs.append(rec)
        self.save()
        self._append_log(rec)
        return rec
