"""Shared fixtures: where the real dataset copies live, and a tiny in-memory MLP task."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from l2o.tasks import MLPClassifierTask, project

# One intra-op thread: steadier timings on the 2-core machines, and no oversubscription when
# tests spawn worker processes.
torch.set_num_threads(1)



def _real_data_dir() -> Path | None:
    """The real-data root the tests use: the first existing entry of $L2O_DATA_DIR (what the
    library itself reads), read once at import, before any test changes the environment."""
    for entry in os.environ.get("L2O_DATA_DIR", "").split(os.pathsep):
        if entry and Path(entry).is_dir():
            return Path(entry)
    return None


SHARED_DATA = _real_data_dir()
"""Root of the real dataset copies (``.ci/run`` points $L2O_DATA_DIR at ``../shared/data``)."""
REQUIRE_REAL_DATA = os.environ.get("L2O_REQUIRE_REAL_DATA", "") not in ("", "0")
"""Set by ``.ci/run``: a missing real dataset fails the test instead of skipping it."""


def shared_data_or_skip(*parts: str) -> Path:
    """The real copy of a dataset file or folder under $L2O_DATA_DIR, or skip the test saying
    why (fail instead when $L2O_REQUIRE_REAL_DATA is set, as in CI)."""
    if SHARED_DATA is None:
        reason = "no real-data folder: set L2O_DATA_DIR to it (.ci/run sets it to ../shared/data)"
    else:
        p = SHARED_DATA.joinpath(*parts)
        if p.exists():
            return p
        reason = f"real dataset copy not present at {p}"
    if REQUIRE_REAL_DATA:
        pytest.fail(reason + " (L2O_REQUIRE_REAL_DATA is set)")
    pytest.skip(reason)


def tiny_mlp_task(n: int = 200, pixels: int = 30, dim: int = 6, hidden: int = 5, classes: int = 3,
                  batch: int | None = 16, seed: int = 0) -> MLPClassifierTask:
    """A small MLP task on random 'images', for fast tests."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, pixels), dtype=np.uint8)
    labels = rng.integers(0, classes, size=n).astype(np.int64)
    data = project(images, labels, classes, dim, seed=seed, description="random")
    return MLPClassifierTask(data, hidden, batch, name="tiny")


@pytest.fixture
def tiny_task() -> MLPClassifierTask:
    return tiny_mlp_task()
