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

SHARED_DATA = Path(os.environ.get("L2O_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def shared_data_or_skip(sub: str) -> Path:
    """The shared real copy of a dataset folder, or skip the test saying why."""
    p = SHARED_DATA / sub
    if not p.exists():
        pytest.skip(f"real dataset copy not present at {p} (set L2O_SHARED_DATA)")
    return p


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
