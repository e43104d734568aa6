"""One run: an optimizer on a task for T iterations, recording the true objective f(x⁽ᵗ⁾).

Each iteration draws one mini-batch from a generator seeded by the run's seed, builds the closure
f̂_B (zero grads, forward, backward, return the loss) and calls ``optimizer.step(closure)``; the
closure may be called several times (CG and L-BFGS line searches), always on the same batch, and
every call is counted. The same seed gives every optimizer the same x⁽⁰⁾ and the same batch
sequence (common random numbers), so differences between optimizers are not sampling noise.
A run whose objective becomes NaN/inf is recorded as diverged at that iteration, not dropped.

Wall clock: ``wall_clock_s[t-1]`` is the cumulative time (seconds, ``time.perf_counter``) spent in
``optimizer.step(closure)`` — closure calls included, batch sampling and the true-objective
evaluation excluded — after iterations 1..t, measured in the process that ran the run. Records of
format 1 (written before wall clocks were recorded) load with ``wall_clock_s = None``.
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
RECORD_FORMAT = 2
"""Version of the run-record format: 1 = no ``format`` key and no wall clock; 2 = ``wall_clock_s``."""


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
    wall_clock_s: list[float | None] | None = None
    """Cumulative seconds in ``optimizer.step`` after iterations 1..T (None after divergence);
    None for a format-1 record."""

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
        d = asdict(self)
        if self.wall_clock_s is None:  # a format-1 record read back: write it as it was
            del d["wall_clock_s"]
        else:
            d["format"] = RECORD_FORMAT
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        """Parse and validate a record of format 1 (no wall clock) or 2; anything else is a ``ValueError``."""
        fmt = d.get("format", 1)
        if fmt not in (1, 2):
            raise ValueError(f"run record has unknown format {fmt!r} (this l2o reads 1 and {RECORD_FORMAT})")
        fields = {"task", "optimizer", "seed", "iterations", "true_loss", "batch_loss", "evals", "diverged_at", "wall_time_s", "meta"}
        if fmt == 2:
            fields.add("wall_clock_s")
        missing = fields - set(d)
        if missing:
            raise ValueError(f"run record lacks fields {sorted(missing)}")
        r = cls(**{k: d[k] for k in fields})
        if len(r.true_loss) != r.iterations + 1:
            raise ValueError(f"run record has {len(r.true_loss)} objective values for {r.iterations} iterations")
        if r.wall_clock_s is not None:
            w = r.wall_clock_s
            if not isinstance(w, list) or len(w) != r.iterations:
                raise ValueError(f"run record's wall_clock_s must list {r.iterations} cumulative times")
            known = [v for v in w if v is not None]
            if any(not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 for v in known) or \
                    any(b < a for a, b in zip(known, known[1:])):
                raise ValueError("run record's wall_clock_s must be finite, non-negative and non-decreasing")
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
    wall_clock: list[float | None] = []
    diverged_at: int | None = None if _finite(true_loss[0]) else 0
    t0 = time.perf_counter()
    in_step = 0.0

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

        ts = time.perf_counter()
        try:
            loss = opt.step(closure)
        except FloatingPointError:
            loss = None
        in_step += time.perf_counter() - ts
        wall_clock.append(in_step)
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
    wall_clock += [None] * (iterations - len(wall_clock))
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
        wall_clock_s=wall_clock,
    )
