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
from l2o.outer.gps.cost import QuadraticCost
from l2o.outer.gps.env import Controller, Trajectories, as_controller
from l2o.outer.gps.linear_gaussian import LinearGaussianDynamics, LinearGaussianPolicy, _sym
from l2o.tasks.base import Task, flatten, unflatten

DTYPE = torch.float64


def _dynamics(A: Tensor, B: Tensor, c: Tensor, F: Tensor) -> LinearGaussianDynamics:
    """LinearGaussianDynamics(A, B, c, F) for F = (a Gram matrix) + min_noise·I, positive definite
    by construction: the same object without the eigenvalue check of every F_t (D×D each, the
    bulk of the fit's time on the small-net state). Non-finite parts are still refused; F is
    symmetrised exactly as the validation would."""
    for name, x in (("A", A), ("B", B), ("c", c), ("F", F)):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains non-finite values")
    obj = object.__new__(LinearGaussianDynamics)
    for name, x in (("A", A), ("B", B), ("c", c), ("F", _sym(F))):
        object.__setattr__(obj, name, x)
    return obj


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
        return Trajectories(S, S[:, :, self.n:], U, C, valid, task_index=which)

    def _task_index(self, trajectories: Trajectories) -> Tensor:
        """Which training objective each row of ``trajectories`` ran on (recorded by :meth:`rollout`)."""
        idx = trajectories.task_index
        if idx is None or (idx.numel() and int(idx.max()) >= len(self.tasks)):
            raise ValueError("local models need trajectories from this environment's rollout (with their task_index)")
        return idx

    def _mean_hessians(self, trajectories: Trajectories) -> Tensor:
        """H̄_t [T, n, n]: the mean over valid samples of ∇²f at each sample's x⁽ᵗ⁾ (cached per rollout)."""
        index = self._task_index(trajectories)
        cached = getattr(self, "_hess_cache", None)
        if cached is not None and cached[0] is trajectories:
            return cached[1]
        rows = [j for j in range(trajectories.n) if trajectories.valid[j]]
        if not rows:
            raise ValueError("every sampled trajectory diverged; no local model can be built")
        out = torch.zeros(self.horizon, self.n, self.n, dtype=DTYPE)
        hess: dict[int, Tensor] = {}
        for k in sorted({int(index[j]) for j in rows}):  # one vmap over all of an objective's (sample, t)
            task = self.tasks[k]
            mine = [j for j in rows if int(index[j]) == k]

            def f(v: Tensor, task: Task = task) -> Tensor:
                return task.loss(unflatten(v, task.groups))

            x = trajectories.states[mine, :, : self.n]
            h = torch.func.vmap(torch.func.hessian(f))(x.reshape(-1, self.n)).reshape(len(mine), self.horizon,
                                                                                     self.n, self.n)
            hess.update(zip(mine, h))
        for j in rows:  # summed in sample order, as before
            out += hess[j]
        out /= len(rows)
        out = 0.5 * (out + out.transpose(1, 2))
        self._hess_cache = (trajectories, out)
        return out

    def local_dynamics(self, trajectories: Trajectories, min_noise: float = 1e-8) -> LinearGaussianDynamics:
        """p̃(s_{t+1} | s_t, a_t) from the MDP's known structure, linearised around the samples.

        x' = x + a; the history blocks shift by one lag (zeros stay zeros where undefined);
        the newest step is a; the newest gradient is g + H̄_t a; the newest objective changes are
        f(x⁽ᵗ⁺¹⁾) − f(x⁽ᵗ⁺¹⁻ⁱ⁾) = Δ + (f(x⁽ᵗ⁾) − f(x⁽ᵗ⁺¹⁻ⁱ⁾)) with Δ = gᵀa + ½aᵀH̄a linearised at
        the sample means. The offset c_t and noise F_t are the mean and covariance of the real
        transitions' residuals under this model, so objective-to-objective variation is noise.
        """
        T, n, H, D, d = self.horizon, self.n, self.H, self.state_dim, self.action_dim
        Hbar = self._mean_hessians(trajectories)
        v = trajectories.valid
        S, U = trajectories.states[v], trajectories.actions[v]
        g0, st0 = n + H, n + H + H * n  # first gradient block, first step block
        A = torch.zeros(T - 1, D, D, dtype=DTYPE)
        B = torch.zeros(T - 1, D, d, dtype=DTYPE)
        c = torch.zeros(T - 1, D, dtype=DTYPE)
        F = torch.zeros(T - 1, D, D, dtype=DTYPE)
        I = torch.eye(n, dtype=DTYPE)
        for t in range(T - 1):
            A[t, :n, :n] = I
            B[t, :n] = I
            A[t, g0:g0 + n, g0:g0 + n] = I
            B[t, g0:g0 + n] = Hbar[t]
            for i in range(1, H):
                A[t, g0 + i * n:g0 + (i + 1) * n, g0 + (i - 1) * n:g0 + i * n] = I
                A[t, st0 + i * n:st0 + (i + 1) * n, st0 + (i - 1) * n:st0 + i * n] = I
            B[t, st0:st0 + n] = I
            gbar, abar = S[:, t, g0:g0 + n].mean(0), U[:, t].mean(0)
            for i in range(1, H + 1):  # objective change at lag i, defined at t+1 iff t+1−i ≥ 0
                if t + 1 - i < 0:
                    continue
                r = n + i - 1
                if i >= 2:
                    A[t, r, r - 1] = 1.0
                A[t, r, g0:g0 + n] = abar
                B[t, r] = gbar + Hbar[t] @ abar
                c[t, r] = -(gbar @ abar) - 0.5 * abar @ Hbar[t] @ abar
            pred = S[:, t] @ A[t].T + U[:, t] @ B[t].T + c[t]
            resid = S[:, t + 1] - pred
            c[t] += resid.mean(0)
            rc = resid - resid.mean(0)
            F[t] = rc.T @ rc / max(rc.shape[0] - 1, 1) + min_noise * torch.eye(D, dtype=DTYPE)
        return _dynamics(A, B, c, F)

    def local_cost(self, trajectories: Trajectories) -> QuadraticCost:
        """c̃_t(s, a) = w_t (g_tᵀa + ½ aᵀH̄_t a) + h_t, w_t = T − 1 − t; h_0 = T·mean f(x⁽⁰⁾), else 0.

        Telescoping the total cost, Σ_t f(x⁽ᵗ⁾) = T f(x⁽⁰⁾) + Σ_t (T−1−t)[f(x⁽ᵗ⁺¹⁾) − f(x⁽ᵗ⁾)],
        and each increment is g_tᵀa_t + ½a_tᵀH a_t to second order, with g_t = ∇f(x⁽ᵗ⁾) read
        from the state's current-gradient block. Only the curvature H̄_t (the PSD projection of the
        samples' mean Hessian at step t) is pooled across objectives, so the model does not
        depend on which objective a sample came from; for a quadratic objective it is exact.
        """
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
        Hbar = self._mean_hessians(trajectories)
        for t in range(T - 1):
            w = float(T - 1 - t)
            evals, evecs = torch.linalg.eigh(Hbar[t])
            Cq[t, D:, D:] = w * (evecs * evals.clamp(min=0.0)) @ evecs.T
            Cq[t, g0:g0 + n, D:] = w * eye  # ½ xuᵀ C xu contains w gᵀa through both off-diagonal blocks
            Cq[t, D:, g0:g0 + n] = w * eye
        if not (bool(torch.isfinite(Cq).all()) and bool(torch.isfinite(hq).all())):
            raise ValueError("C contains non-finite values" if not bool(torch.isfinite(Cq).all())
                             else "h contains non-finite values")
        # symmetric by construction up to the rounding of evecs·diag·evecsᵀ; symmetrised exactly as
        # QuadraticCost's validation would (which costs more than building the model)
        return QuadraticCost._unchecked(_sym(Cq), torch.zeros(T, m, dtype=DTYPE), hq, D)
