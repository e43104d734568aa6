"""One run: an optimizer on a task for T iterations, recording the true objective f(x⁽ᵗ⁾).

Each iteration draws one mini-batch from a generator seeded by the run's seed, builds the closure
f̂_B (zero grads, forward, backward, return the loss) and calls ``optimizer.step(closure)``; the
closure may be called several times (CG and L-BFGS line searches), always on the same batch, and
every call is counted. The same seed gives every optimizer the same x⁽⁰⁾ and the same batch
sequence (common random numbers), so differences between optimizers are not sampling noise.
A run whose objective becomes NaN/inf is recorded as diverged at that iteration, not dropped.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from l2o.baselines.registry import OptimizerSpec
from l2o.tasks.base import Task

BATCH_SEED_OFFSET = 1_000_003


@dataclass
class RunResult:
    """The record of one run; ``true_loss[t]`` is f(x⁽ᵗ⁾) for t = 0..T (None after divergence)."""

    task: str
    optimizer: str
    seed: int
    iterations: int
    true_loss: list[float | None]
    batch_loss: list[float | None]
    evals: list[int]
    diverged_at: int | None
    wall_time_s: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None

    @property
    def final(self) -> float:
        """f(x⁽ᵀ⁾), or inf for a diverged run."""
        v = self.true_loss[-1]
        return math.inf if v is None else v

    @property
    def auc(self) -> float:
        """Area under the curve, normalised: the mean of f(x⁽ᵗ⁾) over t = 1..T (the paper's meta-loss
        Σ f(x⁽ᵗ⁾) divided by T); inf for a diverged run."""
        vals = self.true_loss[1:]
        if self.diverged or not vals:
            return math.inf
        return math.fsum(vals) / len(vals)

    def key(self) -> dict[str, Any]:
        return {"task": self.task, "optimizer": self.optimizer, "seed": self.seed, "iterations": self.iterations}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        fields = {"task", "optimizer", "seed", "iterations", "true_loss", "batch_loss", "evals", "diverged_at", "wall_time_s", "meta"}
        missing = fields - set(d)
        if missing:
            raise ValueError(f"run record lacks fields {sorted(missing)}")
        r = cls(**{k: d[k] for k in fields})
        if len(r.true_loss) != r.iterations + 1:
            raise ValueError(f"run record has {len(r.true_loss)} objective values for {r.iterations} iterations")
        return r


def _finite(x: float) -> bool:
    return math.isfinite(x)


def run_optimizer(
    task: Task,
    spec: OptimizerSpec,
    seed: int,
    iterations: int,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> RunResult:
    """Run ``spec`` on ``task`` from x⁽⁰⁾(seed) for ``iterations`` steps; see the module docstring."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    params = {k: v.requires_grad_(True) for k, v in task.init_params(seed, dtype).items()}
    tensors = [params[g.name] for g in task.groups]
    opt = spec.build(tensors)
    gen = torch.Generator().manual_seed(BATCH_SEED_OFFSET + seed)

    true_loss: list[float | None] = [task.true_loss(params)]
    batch_loss: list[float | None] = []
    evals: list[int] = []
    diverged_at: int | None = None if _finite(true_loss[0]) else 0
    t0 = time.perf_counter()

    steps = range(iterations)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"{spec} on {task.name}", leave=False)
    for t in steps:
        if diverged_at is not None:
            break
        idx = task.sample_batch(gen)
        calls = 0

        def closure() -> torch.Tensor:
            nonlocal calls
            calls += 1
            opt.zero_grad(set_to_none=False)
            loss = task.loss(params, idx)
            loss.backward()
            return loss

        try:
            loss = opt.step(closure)
        except FloatingPointError:
            loss = None
        f_batch = float(loss.detach()) if loss is not None else math.nan
        batch_loss.append(f_batch if _finite(f_batch) else None)
        evals.append(calls)
        f_true = task.true_loss(params)
        if not (_finite(f_batch) and _finite(f_true)):
            diverged_at = t + 1
            true_loss.append(None)
        else:
            true_loss.append(f_true)

    n_missing = iterations + 1 - len(true_loss)
    true_loss += [None] * n_missing
    batch_loss += [None] * (iterations - len(batch_loss))
    evals += [0] * (iterations - len(evals))
    return RunResult(
        task=task.name,
        optimizer=str(spec),
        seed=seed,
        iterations=iterations,
        true_loss=true_loss,
        batch_loss=batch_loss,
        evals=evals,
        diverged_at=diverged_at,
        wall_time_s=time.perf_counter() - t0,
        meta={"dim": task.dim, "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__},
    )
