"""The inner problem of meta-training ``mlp-lopt``: the learned optimizer with parameters θ run on
instances of an MLP task (:mod:`l2o.tasks`), all population members and task instances at once.

A run is one optimizee trajectory: x₀ = ``task.init_params(seed)`` (seeds ≥ 10⁶, disjoint from the
evaluation seeds 0–4 and the tuning seeds 1000–1002), then x_{t+1} = x_t + Δx(θ; ∇f̂_{B_t}(x_t)) with
:func:`l2o.learned.mlp_lopt.policy_step` per coordinate group (per parameter tensor, as
:class:`~l2o.learned.mlp_lopt.MLPLOpt` does). The loss at step t is f̂_{B_t}(x_t), the mini-batch
objective at the iterate on the batch its gradient uses — an unbiased estimate of f(x_t), so the
meta-objective (mean over the run) estimates the paper's mean true objective (the AUC).

Mini-batches are drawn with replacement (``torch.randint``; B ≪ 60,000 makes this close to the
harness's without-replacement batches) and shared by the two antithetic branches of a particle.
One step = one ``vmap``-ed forward/backward of all 2N optimizees
(:func:`l2o.tasks.base.batched_value_and_grad`) and one ``vmap``-ed policy step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from l2o.learned.mlp_lopt import STATE_KEYS, MLPLOptArch, flat_to_theta, policy_step
from l2o.outer.base import State
from l2o.tasks.base import Task, batched_value_and_grad, flatten

SEED_BASE = 1_000_000
"""Optimizee x₀ seeds used in meta-training are drawn from [SEED_BASE, 2³¹)."""


Bounds = list[tuple[str, tuple[int, ...], int, int]]
"""Per coordinate group of a task: its name, shape and [start, end) in the flat iterate."""


def branch_value_and_grad(task: Task, bounds: Bounds, x: Tensor, gen: torch.Generator
                          ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """For iterates ``x`` [2, N, n] of N antithetic pairs: draws one with-replacement mini-batch per
    pair (shared by its two branches) and returns x as [2N, n], the losses [2N] and the gradients by
    group name, each [2N, *shape]."""
    two, N = x.shape[0], x.shape[1]
    M = two * N
    idx = torch.randint(0, task.num_examples, (N, task.batch_size), generator=gen)
    idx = idx.unsqueeze(0).expand(two, -1, -1).reshape(M, -1)
    x = x.reshape(M, task.dim)
    params = {name: x[:, a:b].reshape(M, *shape) for name, shape, a, b in bounds}
    loss, grads = batched_value_and_grad(task, params, idx)
    return x, loss, grads


class MLPLOptProblem:
    """Runs of ``mlp-lopt`` with θ [D] on ``task`` (any :class:`Task` whose loss vmaps)."""

    def __init__(self, task: Task, arch: MLPLOptArch, dtype: torch.dtype = torch.float32) -> None:
        if task.batch_size is None:
            raise ValueError("mlp-lopt meta-training needs a mini-batch task (bfull is not supported)")
        self.task, self.arch, self.dtype = task, arch, dtype
        self.dim = arch.dim
        self.n = task.dim
        bounds, i = [], 0
        for g in task.groups:
            bounds.append((g.name, g.shape, i, i + g.numel))
            i += g.numel
        self.bounds = bounds
        self._vstep = torch.func.vmap(self._member_step)

    def init_runs(self, n: int, gen: torch.Generator) -> State:
        seeds = torch.randint(SEED_BASE, 2**31 - 1, (n,), generator=gen)
        x = torch.stack([flatten(self.task.init_params(int(s), self.dtype), self.task.groups) for s in seeds])
        state: State = {"x": x}
        for k in STATE_KEYS:
            state[k] = torch.zeros_like(x)
        return state

    def _member_step(self, theta_flat: Tensor, st: dict[str, Tensor], grads: dict[str, Tensor], t: Tensor
                     ) -> tuple[Tensor, dict[str, Tensor]]:
        theta = flat_to_theta(theta_flat, self.arch)
        deltas, new_parts = [], {k: [] for k in STATE_KEYS}
        for name, _shape, a, b in self.bounds:
            old = {k: st[k][a:b] for k in STATE_KEYS}
            d, new = policy_step(theta, old, grads[name].reshape(-1), t, self.arch)
            deltas.append(d)
            for k in STATE_KEYS:
                new_parts[k].append(new[k])
        return torch.cat(deltas), {k: torch.cat(v) for k, v in new_parts.items()}

    def step(self, theta: Tensor, state: State, t: Tensor, gen: torch.Generator) -> tuple[Tensor, State]:
        two, N = theta.shape[0], theta.shape[1]
        M = two * N
        x, loss, grads = branch_value_and_grad(self.task, self.bounds, state["x"], gen)
        tt = (t + 1).to(self.dtype).unsqueeze(0).expand(two, -1).reshape(M)
        st = {k: state[k].reshape(M, self.n) for k in STATE_KEYS}
        delta, new = self._vstep(theta.reshape(M, -1).to(self.dtype), st, grads, tt)
        out: State = {"x": (x + delta).reshape(two, N, self.n)}
        for k in STATE_KEYS:
            out[k] = new[k].reshape(two, N, self.n)
        return loss.reshape(two, N), out


class MLPLOptMixture:
    """Runs of ``mlp-lopt`` on a mixture of tasks: particle i runs on ``problems[i % K]``.

    The N PES particles are assigned to the K tasks round-robin (so with ``stagger`` every task
    gets runs of mixed ages) and keep their task for the whole training run, restarts included
    (:meth:`init_particles`). One inner step steps each task's sub-population with its own
    :meth:`MLPLOptProblem.step` (one ``vmap`` per task; mini-batches drawn per task, in task order,
    from the shared generator). Tasks may have different parameter counts (e.g. 48-48 and 100-200
    nets): the state is one tensor [2, N, n_max] per key, task k's runs using its first n_k
    coordinates (the rest stay 0), so :class:`~l2o.outer.pes.PESTrainer` sees one state.

    A particle's meta-loss is its task's raw mini-batch loss, unweighted: the tasks are MNIST
    classifiers (cross-entropy of an MLP on projected MNIST, see
    :class:`l2o.outer.meta_mlp_lopt.MetaMLPLOptConfig`) whose losses are on one scale (tuned
    AdaGrad's 400-step AUC: 0.48 on ``mnist:48-48:b64``, 0.75 on ``:b10``, 1.07 on
    ``mnist:100-200:b10``), so ĝ is the gradient of the mixture's mean AUC, each task weighted by
    its share of particles. Not normalised per task: a task whose loss reacts more to θ weighs more
    in ĝ (in docs/RESULTS.md's mixture run, ``mnist:100-200:b10`` dominated).
    """

    def __init__(self, problems: list[MLPLOptProblem]) -> None:
        if not problems:
            raise ValueError("mlp-lopt mixture: needs at least one task")
        first = problems[0]
        for p in problems[1:]:
            if p.arch != first.arch or p.dtype != first.dtype:
                raise ValueError("mlp-lopt mixture: every task's problem needs the same arch and dtype")
        self.problems = problems
        self.dim = first.dim
        self.n = max(p.n for p in problems)

    @property
    def names(self) -> list[str]:
        return [p.task.name for p in self.problems]

    def assignment(self, n_particles: int) -> Tensor:
        """The task index of each particle [N] (round-robin)."""
        return torch.arange(n_particles) % len(self.problems)

    def init_particles(self, idx: Tensor, gen: torch.Generator) -> State:
        """Fresh runs [len(idx), n_max] for particles ``idx``, each on its own task (drawn task by task)."""
        task_of = idx % len(self.problems)
        dtype = self.problems[0].dtype
        out: State = {k: torch.zeros(idx.numel(), self.n, dtype=dtype) for k in ("x", *STATE_KEYS)}
        for k, problem in enumerate(self.problems):
            rows = (task_of == k).nonzero().flatten()
            if rows.numel() == 0:
                continue
            runs = problem.init_runs(rows.numel(), gen)
            for key, v in runs.items():
                out[key][rows, :problem.n] = v
        return out

    def init_runs(self, n: int, gen: torch.Generator) -> State:
        """Fresh runs for particles 0..n-1."""
        return self.init_particles(torch.arange(n), gen)

    def step(self, theta: Tensor, state: State, t: Tensor, gen: torch.Generator) -> tuple[Tensor, State]:
        N = theta.shape[1]
        task_of = self.assignment(N)
        loss = torch.empty(2, N, dtype=self.problems[0].dtype)
        out: State = {k: torch.zeros_like(v) for k, v in state.items()}
        for k, problem in enumerate(self.problems):
            sel = (task_of == k).nonzero().flatten()
            if sel.numel() == 0:
                continue
            n = problem.n
            sub = {key: v[:, sel, :n] for key, v in state.items()}
            sub_loss, sub_state = problem.step(theta[:, sel], sub, t[sel], gen)
            loss[:, sel] = sub_loss.to(loss.dtype)
            for key, v in sub_state.items():
                out[key][:, sel, :n] = v
        return loss, out
