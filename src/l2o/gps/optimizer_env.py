"""The MDP of Learning to Optimize (Li & Malik 2016) over a family of objective functions.

A trajectory is one optimization run of T steps on one training objective of the family, from a
random initial iterate: state s_t = (x⁽ᵗ⁾, history features of :mod:`l2o.features.history2016`),
action a_t = Δx, x⁽ᵗ⁺¹⁾ = x⁽ᵗ⁾ + a_t, cost c(s_t) = f(x⁽ᵗ⁾). The policy π observes the features
only (o_t = s_t without x⁽ᵗ⁾).

CHOICE (multiple training objectives): rather than one guiding policy per objective, each sampled
trajectory draws its objective uniformly from the training set, and one time-varying ψ is fitted
to them all. ψ acts on gradient and step features, so one linear policy can serve every objective
(gradient descent itself is such a policy); the objective-to-objective variation enters the fitted
dynamics as noise. The local cost model telescopes the total cost into per-step objective
decreases, which the state's gradient block gives to first order (see :meth:`local_cost`); only
the curvature is pooled (Hessians by autograd — the 2016 problems have a handful of coordinates).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from l2o.features.history2016 import HistoryTracker, feature_dim
from l2o.gps.cost import QuadraticCost
from l2o.gps.env import Controller, Trajectories, as_controller
from l2o.gps.linear_gaussian import LinearGaussianPolicy
from l2o.tasks.base import Task, flatten, unflatten

DTYPE = torch.float64


class OptimizerEnv2016:
    """Optimization runs on ``tasks`` as an MDP (see the module docstring)."""

    def __init__(self, tasks: Sequence[Task], horizon: int = 40, history: int = 25,
                 max_abs_iterate: float = 1e6) -> None:
        if not tasks:
            raise ValueError("need at least one training objective")
        dims = {t.dim for t in tasks}
        if len(dims) != 1:
            raise ValueError(f"all objectives must have the same number of coordinates, got {sorted(dims)}")
        if horizon < 2 or history < 1:
            raise ValueError("horizon must be >= 2 and history >= 1")
        self.tasks = list(tasks)
        self.n = dims.pop()
        self.H = history
        self._horizon = horizon
        self.max_abs_iterate = max_abs_iterate
        self._last_task_index: Tensor | None = None

    @property
    def state_dim(self) -> int:
        return self.n + feature_dim(self.n, self.H)

    @property
    def action_dim(self) -> int:
        return self.n

    @property
    def obs_dim(self) -> int:
        return feature_dim(self.n, self.H)

    @property
    def horizon(self) -> int:
        return self._horizon

    def _f_and_grad(self, task: Task, x: Tensor) -> tuple[float, Tensor]:
        def f(v: Tensor) -> Tensor:
            return task.loss(unflatten(v, task.groups))

        g, val = torch.func.grad_and_value(f)(x)
        return float(val), g

    def rollout(self, controller: Controller | LinearGaussianPolicy, n: int, generator: torch.Generator) -> Trajectories:
        """n runs of T steps: objective and x⁽⁰⁾ drawn by ``generator``; actions from ``controller``."""
        ctrl = as_controller(controller)
        T, D, d = self.horizon, self.state_dim, self.action_dim
        S = torch.zeros(n, T, D, dtype=DTYPE)
        U = torch.zeros(n, T, d, dtype=DTYPE)
        C = torch.zeros(n, T, dtype=DTYPE)
        valid = torch.ones(n, dtype=torch.bool)
        which = torch.randint(len(self.tasks), (n,), generator=generator)
        seeds = torch.randint(2**31 - 1, (n,), generator=generator)
        xs = torch.stack([flatten(self.tasks[int(k)].init_params(int(s), DTYPE), self.tasks[int(k)].groups)
                          for k, s in zip(which, seeds, strict=True)])
        trackers = [HistoryTracker(self.n, self.H, DTYPE) for _ in range(n)]
        ctrl.reset(n)
        for t in range(T):
            for j in range(n):
                if not valid[j]:
                    continue
                f, g = self._f_and_grad(self.tasks[int(which[j])], xs[j])
                if not (math.isfinite(f) and torch.isfinite(g).all() and xs[j].abs().max() < self.max_abs_iterate):
                    valid[j] = False
                    continue
                S[j, t, : self.n] = xs[j]
                S[j, t, self.n:] = trackers[j].update(xs[j], g, f)
                C[j, t] = f
            a = ctrl.act(t, S[:, t], S[:, t, self.n:], generator).to(DTYPE)
            U[:, t] = torch.where(valid.view(-1, 1), a, torch.zeros_like(a))
            xs = xs + U[:, t]
        self._last_task_index = which
        return Trajectories(S, S[:, :, self.n:], U, C, valid)

    def local_cost(self, trajectories: Trajectories) -> QuadraticCost:
        """c̃_t(s, a) = w_t (g_tᵀa + ½ aᵀH̄_t a) + h_t, w_t = T − 1 − t; h_0 = T·mean f(x⁽⁰⁾), else 0.

        Telescoping the total cost, Σ_t f(x⁽ᵗ⁾) = T f(x⁽⁰⁾) + Σ_t (T−1−t)[f(x⁽ᵗ⁺¹⁾) − f(x⁽ᵗ⁾)],
        and each increment is g_tᵀa_t + ½a_tᵀH a_t to second order, with g_t = ∇f(x⁽ᵗ⁾) read
        from the state's current-gradient block. Only the curvature H̄_t (the PSD projection of the
        samples' mean Hessian at step t) is pooled across objectives, so the model does not
        depend on which objective a sample came from; for a quadratic objective it is exact.
        """
        if self._last_task_index is None or self._last_task_index.shape[0] != trajectories.n:
            raise ValueError("local_cost needs the trajectories of this environment's last rollout")
        T, n, D, d = self.horizon, self.n, self.state_dim, self.action_dim
        m = D + d
        g0 = n + self.H  # current-gradient block of the state
        rows = [j for j in range(trajectories.n) if trajectories.valid[j]]
        if not rows:
            raise ValueError("every sampled trajectory diverged; no cost model can be built")
        Cq = torch.zeros(T, m, m, dtype=DTYPE)
        hq = torch.zeros(T, dtype=DTYPE)
        hq[0] = T * trajectories.costs[rows, 0].mean()
        eye = torch.eye(n, dtype=DTYPE)
        for t in range(T - 1):
            w = float(T - 1 - t)
            Hs = []
            for j in rows:
                task = self.tasks[int(self._last_task_index[j])]

                def f(v: Tensor, task: Task = task) -> Tensor:
                    return task.loss(unflatten(v, task.groups))

                Hs.append(torch.func.hessian(f)(trajectories.states[j, t, :n]))
            H_mean = torch.stack(Hs).mean(0)
            evals, evecs = torch.linalg.eigh(0.5 * (H_mean + H_mean.T))
            Cq[t, D:, D:] = w * (evecs * evals.clamp(min=0.0)) @ evecs.T
            Cq[t, g0:g0 + n, D:] = w * eye  # ½ xuᵀ C xu contains w gᵀa through both off-diagonal blocks
            Cq[t, D:, g0:g0 + n] = w * eye
        return QuadraticCost(Cq, torch.zeros(T, m, dtype=DTYPE), hq, D)
