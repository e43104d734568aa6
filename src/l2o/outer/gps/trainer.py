"""GPS over conditions (Li & Malik 2016; gps.md §3–7): the :class:`~l2o.outer.gps.loop.Setting` in which each
*condition* is one :class:`~l2o.outer.gps.env.Environment` (for learning optimizers, one training
objective) with one guiding ψ_c, and π is a torch module shared by all conditions.

Per condition: M trajectories from ψ_c (diverged ones dropped and counted); dynamics p̃_c by
regression with a NIW prior on the condition's transitions of the last few iterations (or the
environment's ``local_dynamics``); cost model c̃_c exact (``env.local_cost``) or fitted;
s_0 ~ N(μ₀, Σ₀) empirical. The π-step is one weighted regression on all conditions' samples by
Adam; Σ^π is the ν-weighted harmonic mean of every condition's G_c,t. π is evaluated with its mean
action on a fixed seed per condition (common random numbers across iterations).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from l2o.checkpoint import CheckpointError, generator_state, load_checkpoint, restore_generator
from l2o.execution import Executor

from .cost import QuadraticCost, fit_quadratic_cost
from .dynamics import GaussianPrior, GMMPrior, fit_dynamics, pooled_transitions
from .env import Environment, LinearGaussianController, ModuleController, Trajectories
from .linear_gaussian import DTYPE, LinearGaussianPolicy
from .errors import GPSIterationError
from .loop import CHECKPOINT_NAME, LOG_NAME, BADMMConfig, Condition, GPSLoop, LocalProblem, Samples, Setting, Unit
from .loop import finite_or_none, minibatch_adam

__all__ = ["CHECKPOINT_NAME", "LOG_NAME", "ConditionSetting", "GPSConfig", "GPSIterationError", "GPSTrainer",
           "MultiConditionGPSTrainer"]


@dataclass(frozen=True)
class GPSConfig(BADMMConfig):
    """:class:`~l2o.outer.gps.loop.BADMMConfig` plus what the condition setting adds: π's evaluation
    rollouts, ψ₀'s covariance G_t = ``init_noise``·I (also Σ^π₀), the π-step's epochs and batch,
    the dynamics prior and model, the cost model, and the progress bar. ``samples`` and
    ``eval_samples`` are per condition."""

    eval_samples: int = 20  # rollouts of π (mean action) per iteration; 0 = do not evaluate π
    init_noise: float = 1.0
    pi_epochs: int = 100
    pi_batch_size: int = 0  # trajectories per Adam step; 0 = all
    prior: str = "gaussian"  # "gaussian" | "gmm" | "none" (default prior from this iteration only)
    prior_components: int = 4
    prior_strength: float = 1.0  # m = n₀, in samples
    prior_iterations: int = 3  # iterations of transitions kept for the prior
    cost_model: str = "auto"  # "auto" (exact if env.local_cost exists) | "exact" | "fit"
    dynamics_model: str = "fit"  # "fit" (regression with prior) | "local" (env.local_dynamics)
    cost_window: int = 1
    cost_ridge: float = 1e-6
    cost_action_floor: float | None = None  # clip C_aa eigenvalues of a fitted cost
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(ge0=("eval_samples", "pi_epochs", "pi_batch_size", "prior_strength", "cost_ridge", "cost_window"),
                     ge1=("prior_components", "prior_iterations"), gt0=("init_noise", "cost_action_floor"),
                     choices={"prior": ("gaussian", "gmm", "none"), "dynamics_model": ("fit", "local"),
                              "cost_model": ("auto", "exact", "fit")})


def _module_dtype(module: nn.Module) -> torch.dtype:
    p = next(iter(module.parameters()), None)
    return p.dtype if p is not None else torch.get_default_dtype()


class ConditionSetting(Setting):
    """Conditions = environments (one unit each), π = a torch module μ^π on observations
    [N, T, O] → [N, T, d] (see the module docstring)."""

    name = "conditions"
    shared_pi_cov = True

    def __init__(self, envs: Sequence[Environment], module: nn.Module, config: GPSConfig,
                 initial_psi: LinearGaussianPolicy | Sequence[LinearGaussianPolicy] | None = None) -> None:
        self.envs = list(envs)
        if not self.envs:
            raise ValueError("need at least one condition")
        dims = {(e.horizon, e.state_dim, e.action_dim) for e in self.envs}
        if len(dims) != 1:
            raise ValueError(f"all conditions must have the same (T, D, d), got {sorted(dims)}")
        self.T, self.D, self.d = dims.pop()
        self.n_conditions = len(self.envs)
        self.module, self.config = module, config
        T, D, d = self.T, self.D, self.d
        if initial_psi is None or isinstance(initial_psi, LinearGaussianPolicy):
            zero = LinearGaussianPolicy.from_gain(torch.zeros(d, D, dtype=DTYPE), cov=config.init_noise, T=T)
            initial_psi = [initial_psi or zero] * len(self.envs)
        self.psi0 = list(initial_psi)
        if len(self.psi0) != len(self.envs) or any((p.T, p.dim_a, p.dim_s) != (T, d, D) for p in self.psi0):
            raise ValueError(f"need one initial ψ per condition ({len(self.envs)}, got {len(self.psi0)}), "
                             f"each with T, d, D = {(T, d, D)}")
        seeds = torch.randint(2**62, (len(self.envs),), generator=torch.Generator().manual_seed(config.seed)).tolist()
        self.sample_gens = [torch.Generator().manual_seed(s) for s in seeds]
        self.pi_gen = torch.Generator().manual_seed(config.seed + 1)

    def initial_conditions(self) -> list[Condition]:
        c = self.config
        pi_cov = c.init_noise * torch.eye(self.d, dtype=DTYPE)
        return [Condition([Unit(f"condition {i}", psi, torch.zeros(self.T, self.d, dtype=DTYPE),
                                torch.full((self.T,), c.nu, dtype=DTYPE), pi_cov)], float(c.epsilon))
                for i, psi in enumerate(self.psi0)]

    # ------------------------------------------------------------------ samples → local problems
    def _prior(self, buffer: list[Tensor], it: int):
        c = self.config
        if c.prior == "none":
            return None
        prior = (GaussianPrior(m=c.prior_strength, n0=c.prior_strength) if c.prior == "gaussian"
                 else GMMPrior(n_components=c.prior_components, m=c.prior_strength, n0=c.prior_strength, seed=c.seed + it))
        return prior.fit(torch.cat(buffer))

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

    def _problem(self, it: int, i: int, cd: Condition, raw: Trajectories) -> Samples:
        c, env, (u,) = self.config, self.envs[i], cd.units
        stage = f"condition {i}, " if len(self.envs) > 1 else ""
        traj = raw.valid_only()
        if traj.n_valid < c.min_valid:
            raise GPSIterationError(it, stage + "sampling", f"only {traj.n_valid} of {raw.n} trajectories from ψ "
                                    f"are finite (need {c.min_valid}); ψ diverges")
        X, U = traj.states, traj.actions
        with GPSIterationError.raised_in(it, stage + "dynamics fit"):
            if c.prior != "none":
                u.prior_buffer = (u.prior_buffer + [pooled_transitions(X, U)[0]])[-c.prior_iterations:]
            if c.dynamics_model == "local":
                local_dyn = getattr(env, "local_dynamics", None)
                if not callable(local_dyn):
                    raise ValueError("dynamics_model='local' but the environment has no local_dynamics(trajectories)")
                dyn = local_dyn(traj)
            else:
                dyn = fit_dynamics(X, U, prior=self._prior(u.prior_buffer, it), ridge=c.dynamics_ridge)
        with GPSIterationError.raised_in(it, stage + "cost model"):
            cost = self._cost_model(env, traj)
        mu0 = X[:, 0].mean(0)
        xc = X[:, 0] - mu0
        sigma0 = xc.T @ xc / traj.n + 1e-6 * torch.eye(self.D, dtype=DTYPE)
        return Samples(float(traj.total_costs().mean()), [LocalProblem(X, traj.observations, dyn, cost, mu0, sigma0)],
                       {"n_valid": traj.n_valid, "n_diverged": raw.n_diverged})

    def sample(self, it: int, conditions: list[Condition]) -> list[Samples]:
        """M trajectories per condition from ψ_c (conditions in parallel on the executor, if any:
        each condition's generator travels with it, so every backend draws the same samples)."""
        jobs = [(env, cd.units[0].psi, self.config.samples, generator_state(g), torch.get_num_threads())
                for env, cd, g in zip(self.envs, conditions, self.sample_gens, strict=True)]
        samples = []
        for i, (cd, (raw, state)) in enumerate(zip(conditions, self.map(_sample_condition, jobs), strict=True)):
            self.sample_gens[i] = restore_generator(state)
            samples.append(self._problem(it, i, cd, raw))
        return samples

    # ------------------------------------------------------------------ π
    def pi_mean(self, obs: Tensor) -> Tensor:
        with torch.no_grad():
            return self.module(obs.to(_module_dtype(self.module))).to(DTYPE)

    def fit_pi(self, it: int, problems: list[LocalProblem], targets: list[Tensor], weights: list[Tensor]) -> float:
        """Adam on the pooled weighted regression, each sample weighted by its condition's ν G⁻¹."""
        c = self.config
        dt = _module_dtype(self.module)
        X = torch.cat([p.obs for p in problems]).to(dt)
        Y = torch.cat(targets).to(dt)
        cond = torch.cat([torch.full((p.X.shape[0],), i) for i, p in enumerate(problems)])
        Wc = torch.stack(weights).to(dt)  # [C, T, d, d]
        N = X.shape[0]
        bs = N if c.pi_batch_size == 0 else min(c.pi_batch_size, N)

        def loss_of(pred: Tensor, idx: Tensor) -> Tensor:
            r = pred - Y[idx]
            return 0.5 * torch.einsum("nti,ntij,ntj->n", r, Wc[cond[idx]], r).sum() / pred.shape[0]

        orders = (torch.arange(N) if bs == N else torch.randperm(N, generator=self.pi_gen) for _ in range(c.pi_epochs))
        batches = (order[j:j + bs] for order in orders for j in range(0, N, bs))
        minibatch_adam(it, list(self.module.parameters()), c.pi_lr, batches, lambda i: loss_of(self.module(X[i]), i))
        with torch.no_grad():
            return float(loss_of(self.module(X), torch.arange(N)))

    def evaluate(self, it: int) -> dict[str, Any]:
        c = self.config
        if c.eval_samples == 0:
            return {"pi_costs": [None] * len(self.envs), "diverged": None}
        costs, div = [], 0
        for i, env in enumerate(self.envs):
            ev = env.rollout(ModuleController(self.module, noise=False), c.eval_samples,
                             torch.Generator().manual_seed(c.seed + 2 + 1009 * i))
            div += ev.n_diverged
            costs.append(finite_or_none(ev.valid_only().total_costs().mean()) if ev.n_valid else None)
        return {"pi_costs": costs, "diverged": div}

    def record(self, it: int, cds: list[Condition], conditions: list[dict[str, Any]], units: list[dict[str, Any]],
               pi_loss: float, evaluation: dict[str, Any], wall_s: float) -> dict[str, Any]:
        """``per_condition`` (every condition's and its unit's fields and π's cost), and over
        conditions: means of costs, ε, ν and π's errors; sums of KLs and counts; extremes."""
        costs = evaluation["pi_costs"]
        per = [{**cr, **ur, "pi_cost": pc} for cr, ur, pc in zip(conditions, units, costs, strict=True)]

        def agg(f: Callable[[list[float]], float], *keys: str) -> dict[str, float]:
            return {k: f([p.get(k) or 0.0 for p in per]) for k in keys}

        return {"iteration": it, "conditions": len(per), **agg(lambda v: float(sum(v) / len(v)), "psi_cost",
                "psi_cost_predicted", "epsilon", "nu_mean", "pi_mse_before", "pi_mse"),
                **agg(sum, "n_valid", "n_diverged", "kl_psi_pi", "kl_psi_step", "psi_step_failures"),
                **agg(max, "kl_psi_pi_max", "nu_max"), **agg(min, "nu_min"),
                "pi_cost": sum(costs) / len(costs) if None not in costs else None,
                "pi_eval_diverged": evaluation["diverged"], "pi_loss": pi_loss, "wall_s": round(wall_s, 3),
                "per_condition": per}

    def postfix(self, r: dict[str, Any]) -> dict[str, Any]:
        return {"psi": f"{r['psi_cost']:.4g}", "pi": r["pi_cost"], "kl": f"{r['kl_psi_pi']:.3g}"}

    # ------------------------------------------------------------------ checkpoint
    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {f"pi.{k}": v.detach().clone() for k, v in self.module.state_dict().items()}
        return tensors, {"sample_rng": [generator_state(g) for g in self.sample_gens],
                         "pi_rng": generator_state(self.pi_gen)}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        sd = {k[3:]: v for k, v in tensors.items() if k.startswith("pi.")}
        try:
            self.module.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"the policy module does not match the saved π: {e}") from e
        self.sample_gens = [restore_generator(s) for s in meta["sample_rng"]]
        self.pi_gen = restore_generator(meta["pi_rng"])


def _sample_condition(job: tuple[Environment, LinearGaussianPolicy, int, Any, int]) -> tuple[Trajectories, Any]:
    """n trajectories of one condition under ψ with exploration, from the generator state given;
    returns them and the generator's next state (a picklable, deterministic job for executors)."""
    env, psi, n, state, threads = job
    torch.set_num_threads(threads)
    gen = restore_generator(state)
    return env.rollout(LinearGaussianController(psi, noise=True), n, gen), generator_state(gen)


class MultiConditionGPSTrainer(GPSLoop):
    """GPS/BADMM over conditions: ``envs`` (one :class:`~l2o.outer.gps.env.Environment` per condition,
    all of the same (T, D, d)), μ^π ``policy_module`` on observations [N, T, O] → [N, T, d] (trained
    in place), ``config`` (``samples``/``eval_samples`` per condition), ``out_dir`` for the log and
    checkpoint, and ψ₀ (one for all or one per condition; default K = 0, k = 0, G = ``init_noise``·I).
    ``executor`` (:mod:`l2o.execution`) runs the conditions' trajectories in parallel, same result.
    """

    def __init__(self, envs: Sequence[Environment] | Environment, policy_module: nn.Module, config: GPSConfig,
                 out_dir: str | os.PathLike,
                 initial_psi: LinearGaussianPolicy | Sequence[LinearGaussianPolicy] | None = None,
                 _fresh: bool = True, executor: Executor | None = None) -> None:
        envs = [envs] if isinstance(envs, Environment) else list(envs)
        super().__init__(ConditionSetting(envs, policy_module, config, initial_psi), config, out_dir,
                         progress=config.progress, fresh=_fresh)
        self.setting.executor = executor
        self.module = policy_module

    @property
    def n_conditions(self) -> int:
        return self.setting.n_conditions

    @property
    def pi_cov(self) -> Tensor:
        """Σ^π (shared by all conditions)."""
        return self.units[0].pi_cov

    @classmethod
    def resume(cls, out_dir: str | os.PathLike, envs: Sequence[Environment] | Environment, policy_module: nn.Module,
               iterations: int | None = None, progress: bool | None = None, executor: Executor | None = None):
        """Continue the run saved in ``out_dir`` exactly where its last checkpoint left it, with its
        config (``iterations`` may extend it, ``progress`` toggles the bar); ``envs`` and
        ``policy_module`` built as for the original run (the module's weights are overwritten)."""
        _, meta = load_checkpoint(Path(out_dir) / CHECKPOINT_NAME, f"l2o-gps/{ConditionSetting.name}")
        overrides = {"iterations": iterations, "progress": progress}
        cfg = {**meta["config"], **{k: v for k, v in overrides.items() if v is not None}}
        self = cls(envs, policy_module, GPSConfig.from_dict(cfg), out_dir, _fresh=False, executor=executor)
        self.load()
        return self


class GPSTrainer(MultiConditionGPSTrainer):
    """GPS with BADMM on one condition: a time-varying linear-Gaussian ψ guides a torch module π."""

    def __init__(self, env: Environment, policy_module: nn.Module, config: GPSConfig, out_dir: str | os.PathLike,
                 initial_psi: LinearGaussianPolicy | None = None, _fresh: bool = True,
                 executor: Executor | None = None) -> None:
        super().__init__(env, policy_module, config, out_dir, initial_psi, _fresh, executor)
        if self.n_conditions != 1:
            raise ValueError(f"GPSTrainer runs one condition, got {self.n_conditions}: use MultiConditionGPSTrainer")

    @property
    def psi(self) -> LinearGaussianPolicy:
        """The current ψ (ψ₀ before the first iteration)."""
        return self.units[0].psi if self.conditions else self.setting.psi0[0]
