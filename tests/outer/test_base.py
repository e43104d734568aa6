"""The outer-trainer driver (run_outer): exact resume, JSON state beside the tensors, and a log that
is never behind its checkpoint."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import Tensor

from l2o.checkpoint import CheckpointError
from l2o.outer.base import CHECKPOINT_NAME, LOG_NAME, OuterTrainer, run_outer


class RandomWalk(OuterTrainer):
    """θ ← θ + N(0, 1) from its own generator; a JSON counter rides in the checkpoint's metadata."""

    kind = "test-random-walk"

    def __init__(self) -> None:
        self._theta = torch.zeros(3, dtype=torch.float64)
        self.gen = torch.Generator().manual_seed(0)
        self.calls = 0

    @property
    def theta(self) -> Tensor:
        return self._theta

    def step(self) -> dict[str, Any]:
        self._theta = self._theta + torch.randn(3, generator=self.gen, dtype=torch.float64)
        self.calls += 1
        return {"meta_loss": float(self._theta.square().sum()), "calls": self.calls}

    def state_tensors(self) -> dict[str, Tensor]:
        return {"theta": self._theta.clone(), "rng": self.gen.get_state()}

    def load_state_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        self._theta = tensors["theta"].clone()
        self.gen.set_state(tensors["rng"].clone())

    def state_meta(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_meta(self, meta: Mapping[str, Any]) -> None:
        self.calls = int(meta["calls"])


def _strip(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in log]


def test_interrupted_runs_resume_exactly_with_their_json_state(tmp_path):
    full = run_outer(RandomWalk(), tmp_path / "full", 6, meta={}, progress=False)
    run_outer(RandomWalk(), tmp_path / "part", 6, meta={}, progress=False, max_new=2)
    run_outer(RandomWalk(), tmp_path / "part", 6, meta={}, progress=False, resume=True, stop_after=4)
    part = run_outer(RandomWalk(), tmp_path / "part", 6, meta={}, progress=False, resume=True)
    assert torch.equal(full.theta, part.theta)
    assert _strip(full.log) == _strip(part.log) and [r["calls"] for r in part.log] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in part.log] == list(range(1, 7))


def test_a_log_ahead_of_its_checkpoint_is_truncated_and_one_behind_is_refused(tmp_path):
    out = tmp_path / "run"
    run_outer(RandomWalk(), out, 4, meta={}, progress=False, max_new=2)
    log = out / LOG_NAME
    lines = log.read_text().splitlines()
    # A kill after the log was written but before the checkpoint: the log holds one record more.
    log.write_text("\n".join(lines + [json.dumps({"step": 3, "stale": True})]) + "\n")
    res = run_outer(RandomWalk(), out, 4, meta={}, progress=False, resume=True)
    assert _strip(res.log) == _strip(run_outer(RandomWalk(), tmp_path / "ref", 4, meta={}, progress=False).log)
    log.write_text(lines[0] + "\n")  # behind the step-4 checkpoint: cannot be reconstructed
    with pytest.raises(CheckpointError, match="holds 1 records but the checkpoint is at step 4"):
        run_outer(RandomWalk(), out, 5, meta={}, progress=False, resume=True)


def test_existing_checkpoints_are_not_overwritten(tmp_path):
    run_outer(RandomWalk(), tmp_path, 1, meta={}, progress=False)
    assert (tmp_path / CHECKPOINT_NAME).exists()
    with pytest.raises(ValueError, match="resume"):
        run_outer(RandomWalk(), tmp_path, 2, meta={}, progress=False)


def test_default_progress_postfix_shows_the_meta_loss():
    assert RandomWalk().postfix({"meta_loss": 0.5}) == {"meta_loss": "0.5000"}
    assert RandomWalk().postfix({"meta_loss": None}) == {}
