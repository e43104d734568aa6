"""Task specifications: a short string names a task, and :func:`make_task` builds it.

Spec strings (one grammar for the CLI, configs and result files):

- ``DATASET:IN-HIDDEN:bBATCH[:pSEED]`` — the 2017 MLP classifier, e.g. ``mnist:48-48:b64`` is the
  paper's meta-training objective (48 projected inputs, 48 hidden units, batch 64, projection
  seed 0). ``bfull`` means the full training set each step.
- ``FAMILY/SPLIT/INDEX`` — one instance of a 2016 family, e.g. ``logreg/test/3``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache

from l2o.tasks.base import Task
from l2o.tasks.mlp import MLPClassifierTask, ProjectedData, project
from l2o.tasks.synthetic import FAMILIES

_MLP_RE = re.compile(r"^(?P<ds>[a-z0-9_-]+):(?P<inp>\d+)-(?P<hid>\d+):b(?P<batch>\d+|full)(?::p(?P<seed>\d+))?$")
_RANGE_RE = re.compile(r"^(?P<prefix>[a-z0-9-]+/(?:train|test))/(?P<lo>\d+)-(?P<hi>\d+)$")
_FAMILY_RE = re.compile(r"^(?P<fam>[a-z0-9-]+)/(?P<split>train|test)/(?P<idx>\d+)$")

META_TRAINING_TASK = "mnist:48-48:b64"
"""The paper's meta-training objective (Li & Malik 2017, §4)."""


@dataclass(frozen=True)
class MLPTaskSpec:
    """The 2017 objective: a two-layer MLP on a randomly projected dataset."""

    dataset: str
    input_dim: int
    hidden: int
    batch_size: int | None
    projection_seed: int = 0

    def __str__(self) -> str:
        b = "full" if self.batch_size is None else str(self.batch_size)
        s = f"{self.dataset}:{self.input_dim}-{self.hidden}:b{b}"
        return s if self.projection_seed == 0 else f"{s}:p{self.projection_seed}"


def parse_task(spec: str) -> MLPTaskSpec | tuple[str, str, int]:
    """Parse a task spec string; raise ``ValueError`` explaining the grammar on failure."""
    m = _MLP_RE.match(spec)
    if m:
        batch = None if m["batch"] == "full" else int(m["batch"])
        if batch == 0 or int(m["inp"]) == 0 or int(m["hid"]) == 0:
            raise ValueError(f"task {spec!r}: sizes must be positive")
        return MLPTaskSpec(m["ds"], int(m["inp"]), int(m["hid"]), batch, int(m["seed"] or 0))
    m = _FAMILY_RE.match(spec)
    if m:
        if m["fam"] not in FAMILIES:
            raise ValueError(f"task {spec!r}: unknown family {m['fam']!r}; known: {sorted(FAMILIES)}")
        return (m["fam"], m["split"], int(m["idx"]))
    raise ValueError(
        f"cannot parse task {spec!r}: expected DATASET:IN-HIDDEN:bBATCH[:pSEED] (e.g. 'mnist:48-48:b64') "
        f"or FAMILY/SPLIT/INDEX with FAMILY in {sorted(FAMILIES)} (e.g. 'logreg/test/0')"
    )


MAX_RANGE = 10_000
"""Most instances one task range may expand to (a typo like ``0-99999999`` fails at once)."""


def expand_task_specs(specs: list[str] | tuple[str, ...]) -> list[str]:
    """Expand ranges of family instances, ``logreg/test/0-99`` → ``logreg/test/0`` … ``/99``
    (at most ``MAX_RANGE`` instances per range)."""
    out: list[str] = []
    for spec in specs:
        m = _RANGE_RE.match(spec)
        if m:
            lo, hi = int(m["lo"]), int(m["hi"])
            if hi < lo:
                raise ValueError(f"task range {spec!r} is empty")
            if hi - lo + 1 > MAX_RANGE:
                raise ValueError(f"task range {spec!r} has {hi - lo + 1} instances; at most {MAX_RANGE} per range")
            out += [f"{m['prefix']}/{i}" for i in range(lo, hi + 1)]
        else:
            out.append(spec)
    return out


@lru_cache(maxsize=16)
def projected_dataset(dataset: str, dim: int, seed: int, data_dir: str | None = None) -> ProjectedData:
    """Load the training split of ``dataset`` and project it (cached per process)."""
    from l2o.data import load_dataset

    ds = load_dataset(dataset, split="train", data_dir=data_dir, progress=False)
    return project(ds.images, ds.labels, ds.num_classes, dim, seed, ds.description)


def make_task(spec: str, data_dir: str | os.PathLike | None = None) -> Task:
    """Build the task a spec string names (datasets are read from ``data_dir`` / ``L2O_DATA_DIR``)."""
    parsed = parse_task(spec)
    if isinstance(parsed, MLPTaskSpec):
        data = projected_dataset(parsed.dataset, parsed.input_dim, parsed.projection_seed, None if data_dir is None else str(data_dir))
        return MLPClassifierTask(data, parsed.hidden, parsed.batch_size, name=str(parsed))
    fam, split, idx = parsed
    return FAMILIES[fam]().sample(split, idx)
