"""Where run records live on disk, written atomically so an interrupted run loses nothing finished.

Layout: ``OUT/runs/<task>/<optimizer>/seed<k>.json``. A record is written to a temporary file in
the same folder and renamed into place, so a file either holds a complete record or is absent.
On resume a record is reused only if it parses, is complete, and its key (task, optimizer with
hyperparameters, seed, iterations) is the one asked for; anything else is run again.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from l2o.baselines.registry import OptimizerSpec
from l2o.checkpoint import write_json_atomic
from l2o.experiments.runner import RunResult


def slug(text: str) -> str:
    """A file-name-safe rendering of a task or optimizer spec."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)


@dataclass(frozen=True)
class RunKey:
    """What identifies one run."""

    task: str
    optimizer: OptimizerSpec
    seed: int
    iterations: int

    def path(self, out: Path) -> Path:
        return Path(out) / "runs" / slug(self.task) / slug(str(self.optimizer)) / f"seed{self.seed}.json"

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task, "optimizer": str(self.optimizer), "seed": self.seed, "iterations": self.iterations}


def save_result(key: RunKey, result: RunResult, out: Path) -> Path:
    if result.key() != key.as_dict():
        raise ValueError(f"result {result.key()} does not belong to run {key.as_dict()}")
    path = key.path(out)
    write_json_atomic(path, result.to_dict())
    return path


def load_result(key: RunKey, out: Path) -> RunResult | None:
    """The stored record for ``key``, or None if absent, unreadable or for a different run."""
    path = key.path(out)
    if not path.exists():
        return None
    try:
        result = RunResult.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        warnings.warn(f"ignoring unreadable run record {path} ({e}); it will be run again", stacklevel=2)
        return None
    if result.key() != key.as_dict():
        return None
    return result
