"""Grid-search tuning of the hand-designed baselines on the meta-training objective.

Every grid point of every baseline is run on the tuning task for several seeds; the point with the
lowest mean criterion wins ("auc": mean true objective over the run — the paper's meta-loss,
normalised; "final": f(x_T)). A grid point with any diverged seed is disqualified. Tuning seeds
start at ``seed_offset`` (default 1000) so they are disjoint from evaluation seeds (0, 1, …).
"""

from __future__ import annotations

import math
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from l2o.baselines.registry import BASELINES, OptimizerSpec, get_optimizer
from l2o.baselines.tuned import TunedSettings
from l2o.config import check_keys
from l2o.execution import Executor, check_backend
from l2o.experiments.benchmark import environment, run_grid
from l2o.experiments.store import RunKey
from l2o.tasks.registry import META_TRAINING_TASK

CRITERIA = ("auc", "final")


@dataclass(frozen=True)
class TuningConfig:
    """``task`` is one task spec or a list of them (e.g. a 2016 family's training objectives);
    the criterion is averaged over tasks × seeds."""

    task: str | tuple[str, ...] = META_TRAINING_TASK
    optimizers: tuple[str, ...] = BASELINES
    seeds: int = 3
    iterations: int = 400
    criterion: str = "auc"
    jobs: int | None = 1  # worker processes (local) / CPUs of the local Ray instance; None = all CPUs
    seed_offset: int = 1000
    data_dir: str | None = None
    backend: str = "local"  # where runs execute: "local" or "ray" (see l2o.execution)
    address: str | None = None  # Ray cluster address (backend "ray" only)
    # Per-optimizer grid overrides, e.g. {"sgd": {"lr": [1.0, 3.0, 10.0]}}: a listed hyperparameter's
    # values replace the registry grid's (unlisted ones keep the registry's values).
    grids: dict[str, dict[str, tuple[Any, ...]]] | None = None

    @property
    def tasks(self) -> tuple[str, ...]:
        return (self.task,) if isinstance(self.task, str) else tuple(self.task)

    def __post_init__(self) -> None:
        # A repeated task would weigh twice in the criterion, a repeated optimizer be tuned twice.
        if not isinstance(self.task, str):
            object.__setattr__(self, "task", tuple(dict.fromkeys(self.task)))
        object.__setattr__(self, "optimizers", tuple(dict.fromkeys(self.optimizers)))
        if not self.tasks:
            raise ValueError("tuning needs at least one task")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {self.criterion!r}")
        if self.seeds < 1 or self.iterations < 1 or (self.jobs is not None and self.jobs < 1):
            raise ValueError("seeds, iterations and jobs must be >= 1")
        check_backend(self.backend, self.jobs, self.address)
        for name in self.optimizers:
            if get_optimizer(name).learned:
                raise ValueError(f"{name!r} is a learned optimizer: it is meta-trained, not grid-searched")
        for name, g in (self.grids or {}).items():
            if name not in self.optimizers:
                raise ValueError(f"grids: {name!r} is not among the tuned optimizers {list(self.optimizers)}")
            unknown = set(g) - get_optimizer(name).hyperparameters
            if unknown:
                raise ValueError(f"grids: {name!r} has no hyperparameter(s) {sorted(unknown)}")
            if any(len(v) == 0 for v in g.values()):
                raise ValueError(f"grids: {name!r} has an empty list of values")

    def grid_points(self, name: str) -> list[dict[str, Any]]:
        """The settings searched for optimizer ``name``: its registry grid with the overrides of
        :attr:`grids` applied (Cartesian product)."""
        grid = {**get_optimizer(name).grid, **{k: tuple(v) for k, v in (self.grids or {}).get(name, {}).items()}}
        points: list[dict[str, Any]] = [{}]
        for key, values in grid.items():
            points = [{**p, key: v} for p in points for v in values]
        return points

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TuningConfig:
        check_keys(cls, d, "tuning")
        d = dict(d)
        from l2o.tasks.registry import expand_task_specs

        if "optimizers" in d:
            d["optimizers"] = tuple(d["optimizers"])
        if d.get("grids") is not None:
            d["grids"] = {n: {k: tuple(v) for k, v in g.items()} for n, g in d["grids"].items()}
        if "task" in d:
            tasks = expand_task_specs([d["task"]] if isinstance(d["task"], str) else d["task"])
            d["task"] = tasks[0] if len(tasks) == 1 else tuple(tasks)
        return cls(**d)


def tune(config: TuningConfig, out: Path, progress: bool = True, command: str | None = None,
         executor: Executor | None = None) -> TunedSettings:
    """Run the grid (resumable under ``out``; on ``executor`` if given, else on config's backend)
    and return the chosen settings with all scores."""
    seeds = list(range(config.seed_offset, config.seed_offset + config.seeds))
    specs = {name: [OptimizerSpec.make(name, {**get_optimizer(name).defaults, **p})
                    for p in config.grid_points(name)] for name in config.optimizers}
    keys = [RunKey(task, s, seed, config.iterations)
            for ss in specs.values() for s in ss for task in config.tasks for seed in seeds]
    results = run_grid(keys, Path(out), config.jobs, config.data_dir, progress, desc="tuning",
                       backend=config.backend, address=config.address, executor=executor)
    by_spec: dict[str, list] = {}
    for r in results:
        by_spec.setdefault(r.optimizer, []).append(r)

    settings: dict[str, dict[str, Any]] = {}
    grid: dict[str, list[dict[str, Any]]] = {}
    for name, ss in specs.items():
        rows = []
        for s in ss:
            runs = by_spec[str(s)]
            vals = [(r.auc if config.criterion == "auc" else r.final) for r in runs]
            diverged = sum(r.diverged for r in runs)
            score = float(np.mean(vals)) if not diverged and all(map(math.isfinite, vals)) else None
            rows.append({"hparams": s.kwargs, "score": score, "diverged": diverged,
                         "final_mean": float(np.mean([r.final for r in runs])) if not diverged else None})
        grid[name] = rows
        valid = [r for r in rows if r["score"] is not None]
        if not valid:
            raise RuntimeError(f"every grid point of {name!r} diverged on {config.task}; widen its grid")
        settings[name] = min(valid, key=lambda r: r["score"])["hparams"]
    cmd = command or "l2o " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    task = config.tasks[0] if len(config.tasks) == 1 else list(config.tasks)
    return TunedSettings(task, config.iterations, tuple(seeds), config.criterion, cmd,
                         environment(), settings, grid)


def format_tuned(t: TunedSettings, names: Sequence[str] | None = None) -> str:
    """A Markdown table of the chosen hyperparameters and their scores."""
    where = t.task if isinstance(t.task, str) else f"{len(t.task)} tasks ({t.task[0]} … {t.task[-1]})"
    lines = [f"Tuned on `{where}`, T={t.iterations}, seeds {list(t.seeds)}, criterion {t.criterion}.", "",
             "| optimizer | hyperparameters | score | final f(x_T) |", "|---|---|---|---|"]
    for name in names or t.settings:
        row = next(r for r in t.grid[name] if r["hparams"] == t.settings[name])
        hp = ", ".join(f"{k}={v}" for k, v in t.settings[name].items())
        lines.append(f"| {name} | {hp} | {row['score']:.4f} | {row['final_mean']:.4f} |")
    return "\n".join(lines)
