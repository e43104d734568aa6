"""Multi-condition GPS with BADMM: one guiding policy ψ_c per condition, one shared π.

A *condition* c is one environment — for learning optimizers, one training objective (Li & Malik
2016: "20 trajectories of 40 steps per training objective"). Each condition keeps everything the
single-condition :class:`~l2o.gps.trainer.GPSTrainer` keeps for its one ψ: ψ_c, its dynamics and
cost models (refitted each iteration on its own samples; a prior buffer of its own transitions),
the dual variables λ_c,t, the Bregman weights ν_c,t with their schedule, the trust region ε_c with
its ratio test, and the last η_c. The shared π (a torch module) is fitted by one weighted
regression on the samples of *all* conditions (BADMM's θ-subproblem summed over conditions), and
its covariance Σ^π is the ν-weighted harmonic mean of every condition's G_c,t (the closed form of
:func:`~l2o.gps.badmm.pi_covariance` over the pooled (c, t) pairs).

Per iteration (:meth:`MultiConditionGPSTrainer.step`):

1. for each condition in order: sample M trajectories from ψ_c; ε_c ratio test; fit p̃_c, c̃_c;
   π̂_c (the linear-Gaussian fit of π on ψ_c's states, covariance Σ^π); ψ_c-step (LQG with λ_c,
   ν_c, π̂_c, KL budget T·ε_c);
2. π-step on the pooled samples: targets y = μ^ψc − G_c λ_c/ν_c with weights ν_c G_c⁻¹ per sample
   (a sample's weight is its condition's), Adam, ``pi_epochs`` epochs; Σ^π in closed form;
3. per condition: dual step on λ_c, ν_c schedule on E D_KL(ψ_c‖π);
4. evaluate π (mean action) on every condition with a fixed per-condition seed;
5. log one record (aggregates plus per-condition lists) and checkpoint everything
   (``checkpoint.safetensors``) so that a resumed run continues bit for bit.

The same :class:`~l2o.gps.trainer.GPSConfig` configures it; ``samples`` and ``eval_samples`` are
*per condition*.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
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
)
from .cost import QuadraticCost, fit_quadratic_cost
from .dynamics import GaussianPrior, GMMPrior, fit_dynamics, pooled_transitions
from .env import Environment, LinearGaussianController, ModuleController, Trajectories
from .errors import GPSError
from .linear_gaussian import DTYPE, LinearGaussianPolicy, fit_linear_gaussian_policy
from .lqg import expected_cost, solve_trust_region
from .trainer import GPSConfig, GPSIterationError

__all__ = ["CHECKPOINT_KIND", "CHECKPOINT_NAME", "LOG_NAME", "MultiConditionGPSTrainer"]

CHECKPOINT_KIND = "gps-multi-trainer"
CHECKPOINT_NAME = "checkpoint.safetensors"
LOG_NAME = "log.jsonl"


def _module_dtype(module: nn.Module) -> torch.dtype:
    p = next(iter(module.parameters()), None)
    return p.dtype if p is not None else torch.get_default_dtype()


def _finite_or_none(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


class _Condition:
    """The per-condition state of BADMM (ψ_c, λ_c, ν_c, ε_c, η_c and their bookkeeping)."""

    def __init__(self, env: Environment, psi: LinearGaussianPolicy, config: GPSConfig, sample_seed: int) -> None:
        T, d = env.horizon, env.action_dim
        self.env = env
        self.psi = psi
        self.lam = torch.zeros(T, d, dtype=DTYPE)
        self.nu = torch.full((T,), config.nu, dtype=DTYPE)
        self.epsilon = float(config.epsilon)
        self.eta: float | None = None
        self.kl_prev: Tensor | None = None
        self.pending: Tensor | None = None  # [c̃(ψ_old), c̃(ψ_new), mean true cost of ψ_old's samples]
        self.prior_buffer: list[Tensor] = []
        self.sample_gen = torch.Generator().manual_seed(sample_seed)


def _weighted_loss(pred: Tensor, targets: Tensor, W: Tensor) -> Tensor:
    """(1/N) Σ_n Σ_t ½ r_ntᵀ W_nt r_nt, r = pred − targets; pred/targets [N, T, d], W [N, T, d, d]."""
    r = pred - targets
    return 0.5 * torch.einsum("nti,ntij,ntj->n", r, W, r).sum() / pred.shape[0]


class MultiConditionGPSTrainer:
    """GPS/BADMM over several conditions (see the module docstring).

    Args:
        envs: one :class:`~l2o.gps.env.Environment` per condition, all with the same (T, D, d)
            and observation size.
        policy_module: μ^π on observations [N, T, O] → [N, T, d]; trained in place.
        config: :class:`~l2o.gps.trainer.GPSConfig` (``samples``/``eval_samples`` per condition).
        out_dir: where ``log.jsonl`` and ``checkpoint.safetensors`` go.
        initial_psi: ψ₀ for every condition, or a sequence with one per condition; default
            K = 0, k = 0, G = ``init_noise``·I.
    """

    def __init__(
        self,
        envs: Sequence[Environment],
        policy_module: nn.Module,
        config: GPSConfig,
        out_dir: str | os.PathLike,
        initial_psi: LinearGaussianPolicy | Sequence[LinearGaussianPolicy] | None = None,
        _fresh: bool = True,
    ) -> None:
        envs = list(envs)
        if not envs:
            raise ValueError("need at least one condition")
        dims = {(e.horizon, e.state_dim, e.action_dim) for e in envs}
        if len(dims) != 1:
            raise ValueError(f"all conditions must have the same (T, D, d), got {sorted(dims)}")
        T, D, d = dims.pop()
        self.T, self.D, self.d = T, D, d
        self.module, self.config = policy_module, config
        self.out_dir = Path(out_dir)
        if _fresh and (self.out_dir / CHECKPOINT_NAME).exists():
            raise FileExistsError(f"{self.out_dir / CHECKPOINT_NAME} exists; use "
                                  "MultiConditionGPSTrainer.resume(...) to continue it")
        c = config
        if initial_psi is None or isinstance(initial_psi, LinearGaussianPolicy):
            base = initial_psi or LinearGaussianPolicy.from_gain(torch.zeros(d, D, dtype=DTYPE), cov=c.init_noise, T=T)
            psis = [base] * len(envs)
        else:
            psis = list(initial_psi)
            if len(psis) != len(envs):
                raise ValueError(f"need one initial ψ per condition ({len(envs)}), got {len(psis)}")
        for p in psis:
            if (p.T, p.dim_a, p.dim_s) != (T, d, D):
                raise ValueError(f"initial ψ must have T, d, D = {(T, d, D)}")
        seeder = torch.Generator().manual_seed(c.seed)
        seeds = torch.randint(2**62, (len(envs),), generator=seeder).tolist()
        self.conditions = [_Condition(e, p, c, s) for e, p, s in zip(envs, psis, seeds, strict=True)]
        self.pi_cov = c.init_noise * torch.eye(d, dtype=DTYPE)  # Σ^π, shared
        self.iteration = 0
        self.logs: list[dict[str, Any]] = []
        self.pi_gen = torch.Generator().manual_seed(c.seed + 1)

    @property
    def n_conditions(self) -> int:
        return len(self.conditions)

    # ------------------------------------------------------------------ checkpointing
    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors: dict[str, Tensor] = {"pi_cov": self.pi_cov}
        for name, v in self.module.state_dict().items():
            tensors[f"pi.{name}"] = v.detach().clone()
        cond_meta = []
        for i, cd in enumerate(self.conditions):
            p = f"c{i}."
            tensors.update({p + "psi.K": cd.psi.K, p + "psi.k": cd.psi.k, p + "psi.cov": cd.psi.cov,
                            p + "lambda": cd.lam, p + "nu": cd.nu,
                            p + "scalars": torch.tensor([cd.epsilon, math.nan if cd.eta is None else cd.eta],
                                                        dtype=DTYPE)})
            if cd.kl_prev is not None:
                tensors[p + "kl_prev"] = cd.kl_prev
            if cd.pending is not None:
                tensors[p + "pending"] = cd.pending
            for j, x in enumerate(cd.prior_buffer):
                tensors[f"{p}prior_buffer.{j}"] = x
            cond_meta.append({"prior_buffer": len(cd.prior_buffer), "sample_rng": generator_state(cd.sample_gen)})
        meta = {
            "config": self.config.to_dict(),
            "iteration": self.iteration,
            "dims": [self.T, self.D, self.d],
            "conditions": cond_meta,
            "logs": self.logs,
            "rng": {"pi": generator_state(self.pi_gen), "global": rng_state()},
        }
        return tensors, meta

    def save(self) -> Path:
        """Write ``checkpoint.safetensors`` atomically (all conditions' state, π, RNGs, logs)."""
        tensors, meta = self._state()
        return save_checkpoint(self.out_dir / CHECKPOINT_NAME, tensors, meta, CHECKPOINT_KIND)

    @classmethod
    def resume(
        cls,
        out_dir: str | os.PathLike,
        envs: Sequence[Environment],
        policy_module: nn.Module,
        iterations: int | None = None,
        progress: bool | None = None,
    ) -> MultiConditionGPSTrainer:
        """Continue the run saved in ``out_dir`` exactly (``envs`` and ``policy_module`` built as
        for the original run; ``iterations`` may extend it)."""
        out = Path(out_dir)
        raw, meta = load_checkpoint(out / CHECKPOINT_NAME, CHECKPOINT_KIND)
        # Clone: safetensors buffers may be aligned differently, and BLAS may round differently on them.
        tensors = {k: v.clone() for k, v in raw.items()}
        cfg = dict(meta["config"])
        if iterations is not None:
            cfg["iterations"] = int(iterations)
        if progress is not None:
            cfg["progress"] = bool(progress)
        config = GPSConfig.from_dict(cfg)
        envs = list(envs)
        if len(envs) != len(meta["conditions"]):
            raise CheckpointError(f"checkpoint {out} has {len(meta['conditions'])} conditions, got {len(envs)} environments")
        for e in envs:
            if [e.horizon, e.state_dim, e.action_dim] != meta["dims"]:
                raise CheckpointError(f"checkpoint {out} is for (T, D, d) = {tuple(meta['dims'])}, "
                                      f"an environment has {(e.horizon, e.state_dim, e.action_dim)}")
        self = cls(envs, policy_module, config, out, _fresh=False)
        sd = {k[3:]: v for k, v in tensors.items() if k.startswith("pi.")}
        try:
            policy_module.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {out}: the policy module does not match the saved π: {e}") from e
        self.pi_cov = tensors["pi_cov"]
        for i, (cd, cm) in enumerate(zip(self.conditions, meta["conditions"], strict=True)):
            p = f"c{i}."
            cd.psi = LinearGaussianPolicy(tensors[p + "psi.K"], tensors[p + "psi.k"], tensors[p + "psi.cov"])
            cd.lam, cd.nu = tensors[p + "lambda"], tensors[p + "nu"]
            eps, eta = (float(x) for x in tensors[p + "scalars"])
            cd.epsilon, cd.eta = eps, (None if math.isnan(eta) else eta)
            cd.kl_prev = tensors.get(p + "kl_prev")
            cd.pending = tensors.get(p + "pending")
            cd.prior_buffer = [tensors[f"{p}prior_buffer.{j}"] for j in range(int(cm["prior_buffer"]))]
            cd.sample_gen = restore_generator(cm["sample_rng"])
        self.iteration = int(meta["iteration"])
        self.logs = list(meta["logs"])
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
        """Run iterations until ``config.iterations`` (or ``stop_after`` more), checkpointing after
        every one; returns all records (also in ``log.jsonl``)."""
        from tqdm.auto import tqdm

        if self.iteration == 0 and not self.logs:
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

    def _prior(self, cd: _Condition, it: int):
        c = self.config
        if c.prior == "none":
            return None
        pooled = torch.cat(cd.prior_buffer)
        prior = (GaussianPrior(m=c.prior_strength, n0=c.prior_strength) if c.prior == "gaussian"
                 else GMMPrior(n_components=c.prior_components, m=c.prior_strength, n0=c.prior_strength, seed=c.seed + it))
        return prior.fit(pooled)

    def _cost_model(self, env: Environment, traj: Trajectories) -> QuadraticCost:
        c = self.config
        local = getattr(env, "local_cost", None)
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
        with torch.no_grad():
            return self.module(observations.to(_module_dtype(self.module))).to(DTYPE)

    def _psi_step(self, it: int, i: int) -> dict[str, Any]:
        """Sample, fit and solve the ψ-step of condition i (nothing of the condition is changed)."""
        c, T, cd = self.config, self.T, self.conditions[i]
        stage = f"condition {i}, "
        raw = cd.env.rollout(LinearGaussianController(cd.psi, noise=True), c.samples, cd.sample_gen)
        traj = raw.valid_only()
        if traj.n_valid < c.min_valid:
            raise GPSIterationError(it, stage + "sampling", f"only {traj.n_valid} of {raw.n} trajectories from ψ "
                                    f"are finite (need {c.min_valid}); ψ diverges")
        X, U = traj.states, traj.actions
        psi_cost = float(traj.total_costs().mean())
        eps_used, rho = cd.epsilon, None
        if cd.pending is not None:
            old_model, new_pred, old_real = (float(x) for x in cd.pending)
            predicted, actual = old_model - new_pred, old_real - psi_cost
            min_gain = 1e-3 * abs(old_model) + 1e-12
            rho = actual / predicted if predicted > min_gain else None
            eps_used = update_epsilon(cd.epsilon, predicted, actual, c.epsilon_min, c.epsilon_max,
                                      shrink=c.epsilon_shrink, grow=c.epsilon_grow, min_predicted=min_gain)
        try:
            prior_buffer = cd.prior_buffer
            if c.prior != "none":
                pooled, _ = pooled_transitions(X, U)
                prior_buffer = (cd.prior_buffer + [pooled])[-c.prior_iterations:]
            if c.dynamics_model == "local":
                local_dyn = getattr(cd.env, "local_dynamics", None)
                if not callable(local_dyn):
                    raise ValueError("dynamics_model='local' but the environment has no local_dynamics(trajectories)")
                dyn = local_dyn(traj)
            else:
                cd.prior_buffer, saved = prior_buffer, cd.prior_buffer
                try:
                    prior = self._prior(cd, it)
                finally:
                    cd.prior_buffer = saved
                dyn = fit_dynamics(X, U, prior=prior, ridge=c.dynamics_ridge)
        except (ValueError, RuntimeError) as e:
            raise GPSIterationError(it, stage + "dynamics fit", str(e), t=getattr(e, "t", None)) from e
        try:
            cost = self._cost_model(cd.env, traj)
        except (ValueError, RuntimeError) as e:
            raise GPSIterationError(it, stage + "cost model", str(e), t=getattr(e, "t", None)) from e
        mu0 = X[:, 0].mean(0)
        xc = X[:, 0] - mu0
        sigma0 = xc.T @ xc / traj.n + 1e-6 * torch.eye(self.D, dtype=DTYPE)
        obs = traj.observations
        pi_mean_old = self._pi_mean(obs)
        if not bool(torch.isfinite(pi_mean_old).all()):
            t = int(torch.nonzero(~torch.isfinite(pi_mean_old))[0, 1])
            raise GPSIterationError(it, stage + "π̂ fit", "π's mean action is not finite on ψ's samples", t=t)
        try:
            pi_fit = fit_linear_gaussian_policy(X, pi_mean_old, cov=self.pi_cov.expand(T, self.d, self.d))
        except (ValueError, RuntimeError) as e:
            raise GPSIterationError(it, stage + "π̂ fit", str(e)) from e
        t0 = time.perf_counter()
        try:
            res = solve_trust_region(dyn, cost, cd.psi, mu0, sigma0, eps_used * T, lambda_=cd.lam,
                                     nu=cd.nu, pi_fit=pi_fit, eta_init=cd.eta)
        except (GPSError, ValueError) as e:
            raise GPSIterationError(it, stage + "ψ-step (LQG)", str(e), t=getattr(e, "t", None)) from e
        lqg_s = time.perf_counter() - t0
        model_old = float(expected_cost(cd.psi, dyn, cost, mu0, sigma0).sum())
        model_new = float(expected_cost(res.policy, dyn, cost, mu0, sigma0).sum())
        targets, W = pi_targets(res.policy, X, cd.lam, cd.nu)
        return {"traj": traj, "raw_n_diverged": raw.n_diverged, "X": X, "obs": obs, "psi_new": res.policy,
                "eta": res.eta, "kl_step": res.kl, "eps_used": eps_used, "rho": rho, "psi_cost": psi_cost,
                "model_old": model_old, "model_new": model_new, "targets": targets, "W": W,
                "pi_mean_old": pi_mean_old, "psi_mean": res.policy.mean(X), "prior_buffer": prior_buffer,
                "lqg_s": lqg_s}

    def _pi_step(self, it: int, obs: Tensor, targets: Tensor, W: Tensor) -> float:
        """Adam on the pooled weighted regression (per-sample weights W [N, T, d, d])."""
        c = self.config
        dt = _module_dtype(self.module)
        X, Y, Wm = obs.to(dt), targets.to(dt), W.to(dt)
        N = X.shape[0]
        bs = N if c.pi_batch_size == 0 else min(c.pi_batch_size, N)
        opt = torch.optim.Adam(self.module.parameters(), lr=c.pi_lr)
        for epoch in range(c.pi_epochs):
            order = torch.arange(N) if bs == N else torch.randperm(N, generator=self.pi_gen)
            for j in range(0, N, bs):
                idx = order[j:j + bs]
                opt.zero_grad(set_to_none=True)
                loss = _weighted_loss(self.module(X[idx]), Y[idx], Wm[idx])
                if not torch.isfinite(loss):
                    raise GPSIterationError(it, "π-step", f"non-finite regression loss at epoch {epoch}")
                loss.backward()
                opt.step()
        with torch.no_grad():
            pred = self.module(X)
            if not bool(torch.isfinite(pred).all()):
                t = int(torch.nonzero(~torch.isfinite(pred))[0, 1])
                raise GPSIterationError(it, "π-step", "π's mean action is not finite", t=t)
            return float(_weighted_loss(pred, Y, Wm))

    def step(self) -> dict[str, Any]:
        """One multi-condition GPS/BADMM iteration; returns its record (also logged and checkpointed).

        Aggregates are means over conditions (``psi_cost``, ``pi_cost``, ``pi_mse*``) or sums
        (``kl_psi_pi``, ``n_valid``, ``n_diverged``); ``per_condition`` lists, per condition,
        psi_cost, psi_cost_predicted, pi_cost, kl_psi_pi, kl_psi_step, eta, epsilon, rho, nu_mean,
        pi_mse_before, pi_mse, n_diverged, lqg_s.
        """
        c, it = self.config, self.iteration
        t_start = time.perf_counter()
        steps = [self._psi_step(it, i) for i in range(self.n_conditions)]
        # π-step on all conditions' samples
        obs = torch.cat([s["obs"] for s in steps])
        targets = torch.cat([s["targets"] for s in steps])
        W = torch.cat([s["W"].unsqueeze(0).expand(s["X"].shape[0], -1, -1, -1) for s in steps])
        pi_loss = self._pi_step(it, obs, targets, W)
        G_all = torch.cat([s["psi_new"].cov for s in steps])
        nu_all = torch.cat([cd.nu for cd in self.conditions])
        self.pi_cov = pi_covariance(G_all, nu_all)
        per: list[dict[str, Any]] = []
        for cd, s in zip(self.conditions, steps, strict=True):
            pi_mean_new = self._pi_mean(s["obs"])
            kl_t = kl_psi_pi(s["psi_new"], s["X"], pi_mean_new, self.pi_cov)
            nu_used = cd.nu
            cd.lam = dual_step(cd.lam, cd.nu, pi_mean_new, s["psi_mean"], c.alpha)
            cd.nu = update_nu(cd.nu, kl_t, cd.kl_prev, c.kl_target, c.nu_min, c.nu_max,
                              increase=c.nu_increase, decrease=c.nu_decrease, low=c.kl_low)
            cd.kl_prev = kl_t
            cd.pending = torch.tensor([s["model_old"], s["model_new"], s["psi_cost"]], dtype=DTYPE)
            cd.psi, cd.eta, cd.epsilon, cd.prior_buffer = s["psi_new"], s["eta"], s["eps_used"], s["prior_buffer"]
            per.append({
                "psi_cost": s["psi_cost"], "psi_cost_predicted": s["model_new"],
                "kl_psi_pi": float(kl_t.sum()), "kl_psi_step": s["kl_step"], "eta": s["eta"],
                "epsilon": s["eps_used"], "rho": _finite_or_none(s["rho"]), "nu_mean": float(nu_used.mean()),
                "pi_mse_before": float((s["pi_mean_old"] - s["psi_mean"]).square().sum(-1).mean()),
                "pi_mse": float((pi_mean_new - s["psi_mean"]).square().sum(-1).mean()),
                "n_diverged": s["raw_n_diverged"], "lqg_s": round(s["lqg_s"], 3),
            })
        # evaluate π (mean action; a fixed seed per condition: common random numbers across iterations)
        pi_costs, pi_div = [], 0
        if c.eval_samples > 0:
            for i, (cd, p) in enumerate(zip(self.conditions, per, strict=True)):
                ev = cd.env.rollout(ModuleController(self.module, noise=False), c.eval_samples,
                                    torch.Generator().manual_seed(c.seed + 2 + 1009 * i))
                pi_div += ev.n_diverged
                p["pi_cost"] = _finite_or_none(ev.valid_only().total_costs().mean()) if ev.n_valid else None
                pi_costs.append(p["pi_cost"])
        self.iteration = it + 1
        finite_pi = [x for x in pi_costs if x is not None]
        mean = lambda k: float(sum(p[k] for p in per) / len(per))
        rec = {
            "iteration": it,
            "conditions": self.n_conditions,
            "psi_cost": mean("psi_cost"),
            "psi_cost_predicted": mean("psi_cost_predicted"),
            "pi_cost": (sum(finite_pi) / len(finite_pi)) if (c.eval_samples > 0 and len(finite_pi) == len(per)) else None,
            "pi_eval_diverged": pi_div if c.eval_samples > 0 else None,
            "n_valid": sum(s["traj"].n_valid for s in steps),
            "n_diverged": sum(p["n_diverged"] for p in per),
            "kl_psi_pi": float(sum(p["kl_psi_pi"] for p in per)),
            "kl_psi_step": float(sum(p["kl_psi_step"] for p in per)),
            "epsilon_mean": mean("epsilon"),
            "nu_mean": mean("nu_mean"),
            "pi_loss": pi_loss,
            "pi_mse_before": mean("pi_mse_before"),
            "pi_mse": mean("pi_mse"),
            "wall_s": round(time.perf_counter() - t_start, 3),
            "per_condition": per,
        }
        for k_, v_ in rec.items():
            if isinstance(v_, float) and not math.isfinite(v_):
                raise GPSIterationError(it, "logging", f"{k_} is not finite ({v_})")
        self.logs.append(rec)
        self.save()
        self._append_log(rec)
        return rec
