"""Core types of :mod:`l2o.data`: the ``Dataset`` record, the error classes, the data search path
and file hashing.

Why: every loader (IDX, CIFAR, faces, digits) returns the same immutable record carrying its
provenance (a human-readable description, whether it is a subset, and the sha256 of every file
read) and raises the same error hierarchy, so callers can report exactly which data a result used
and can tell "not there" (:class:`DataNotFoundError`) from "there but wrong"
(:class:`ChecksumError`, :class:`CorruptDataError`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = [
    "ENV_VAR",
    "SPLITS",
    "SYSTEM_DATA_DIRS",
    "ChecksumError",
    "CorruptDataError",
    "DataNotFoundError",
    "Dataset",
    "DatasetError",
    "DownloadError",
    "Source",
    "data_search_path",
    "default_cache_dir",
    "digests",
    "read_bytes",
    "writable_root",
]

#: Environment variable holding extra data roots, separated by ``os.pathsep``.
ENV_VAR = "L2O_DATA_DIR"
#: System-wide roots searched last (Debian's ``dataset-*`` packages install under the first).
#: A module-level tuple so tests can monkeypatch it.
SYSTEM_DATA_DIRS: tuple[str, ...] = ("/usr/share/datasets",)
#: The splits every dataset may offer.
SPLITS: tuple[str, ...] = ("train", "test")


class DatasetError(Exception):
    """Base class of every error raised by :mod:`l2o.data`."""


class DataNotFoundError(DatasetError):
    """The requested files are in none of the searched roots; the message says which files to
    put where, and how to get them."""


class DownloadError(DataNotFoundError):
    """Every download URL failed (network, HTTP error, timeout); the data is still missing."""


class ChecksumError(DatasetError):
    """A file that claims to be an official file does not have the official digest."""


class CorruptDataError(DatasetError):
    """A file is structurally invalid (bad header, size, label range, unsafe pickle, ...)."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """An in-memory image-classification split with its provenance.

    ``eq=False``: a record holding arrays compares and hashes by identity (field-wise ``==`` on
    arrays is ambiguous).
    """

    name: str
    images: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    num_classes: int
    split: str
    description: str
    is_subset: bool
    files: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.images, np.ndarray) or self.images.dtype != np.uint8:
            raise ValueError("Dataset.images must be a uint8 numpy array")
        if not isinstance(self.labels, np.ndarray) or self.labels.dtype != np.int64:
            raise ValueError("Dataset.labels must be an int64 numpy array")
        if self.images.ndim < 2 or self.labels.ndim != 1:
            raise ValueError("Dataset.images must be (N, ...) and Dataset.labels (N,)")
        if len(self.images) != len(self.labels):
            raise ValueError(f"Dataset has {len(self.images)} images but {len(self.labels)} labels")
        if self.num_classes <= 0:
            raise ValueError("Dataset.num_classes must be positive")
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise ValueError(f"Dataset.labels must lie in [0, {self.num_classes})")
        if self.split not in SPLITS:
            raise ValueError(f"Dataset.split must be one of {SPLITS}, got {self.split!r}")

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, split={self.split!r}, "
            f"images=uint8{tuple(self.images.shape)}, num_classes={self.num_classes}, "
            f"is_subset={self.is_subset}, description={self.description!r})"
        )


class Source(Protocol):
    """What the registry needs from a file-backed dataset loader."""

    name: str
    title: str
    num_classes: int
    downloadable: bool

    def locate(self, root: Path, split: str) -> Any | None:
        """Return a handle on the files of ``split`` under ``root``, or None if absent."""

    def expected_paths(self, root: Path, split: str) -> list[str]:
        """Paths (with alternatives) that :meth:`locate` looks for, for error messages."""

    def how_to_get(self) -> str:
        """Where the files come from, for error messages."""

    def load(self, found: Any, split: str) -> Dataset:
        """Read and verify the located files."""

    def download(self, root: Path, split: str, progress: bool) -> None:
        """Fetch the files of ``split`` into ``root`` (only if ``downloadable``)."""


def default_cache_dir() -> Path:
    """``~/.cache/l2o/data`` (``~`` resolved from ``$HOME`` at call time)."""
    return Path(os.path.expanduser("~")) / ".cache" / "l2o" / "data"


def data_search_path(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The roots searched for data, in order: ``data_dir``; each entry of ``$L2O_DATA_DIR``
    (``os.pathsep``-separated); ``~/.cache/l2o/data``; :data:`SYSTEM_DATA_DIRS`.

    Paths are made absolute; duplicates keep their first position.
    """
    candidates: list[Path] = []
    if data_dir is not None:
        candidates.append(Path(data_dir).expanduser())
    for entry in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if entry.strip():
            candidates.append(Path(entry.strip()).expanduser())
    candidates.append(default_cache_dir())
    candidates.extend(Path(p) for p in SYSTEM_DATA_DIRS)
    roots: list[Path] = []
    seen: set[str] = set()
    for c in candidates:
        p = Path(os.path.abspath(c))
        if str(p) not in seen:
            seen.add(str(p))
            roots.append(p)
    return roots


def _is_writable_dir(path: Path) -> bool:
    """True if a file can actually be created in the existing directory ``path``.

    Tries it rather than trusting ``os.access`` (which says yes to root on read-only bind mounts).
    """
    try:
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


def writable_root(roots: list[Path]) -> Path:
    """The first root that exists and is writable, or does not exist but could be created."""
    for root in roots:
        if root.is_dir():
            if _is_writable_dir(root):
                return root
            continue
        if root.exists():  # a file, not a directory
            continue
        parent = root.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
            return root
    raise DataNotFoundError(
        "no writable data root to download into; searched: " + ", ".join(map(str, roots))
    )


def read_bytes(path: Path) -> bytes:
    """Read a whole file, turning OS errors into :class:`DatasetError` naming the file."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc


def digests(data: bytes) -> tuple[str, str]:
    """``(md5, sha256)`` hex digests of ``data``."""
    return hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest()
