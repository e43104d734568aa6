"""CIFAR-10 / CIFAR-100 in the official binary or python (pickle) versions.

Why: the binary version needs no unpickling at all and is parsed record by record (the record
size must divide the file size; label bytes must be in range). The python version is read with a
restricted unpickler that only admits NumPy array reconstruction, so a malicious pickle cannot
run code. Directories with some batches missing load what is present, say which files were read
and set ``is_subset``. Digests per :mod:`l2o.data.checksums` (python files only: the binary files
have no published per-file digests).
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import download as dl
from .base import CorruptDataError, Dataset, digests, read_bytes
from .checksums import ARCHIVE_MD5, STRUCTURAL, VERIFIED, check_official

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "CIFAR100_COARSE",
    "CifarSource",
    "RestrictedUnpickler",
    "safe_unpickle",
]

PIXELS = 3 * 32 * 32


# ---------------------------------------------------------------------------------------------
# Restricted unpickling
# ---------------------------------------------------------------------------------------------


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode`` (how protocol-2 pickles made by Python 3 store bytes),
    limited to the latin-1 codec that this use needs."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    try:  # NumPy >= 2
        from numpy._core import multiarray as _ma  # type: ignore[attr-defined]
        from numpy._core import numeric as _num  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core import multiarray as _ma  # type: ignore[no-redef]
        from numpy.core import numeric as _num  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for mod in ("numpy.core", "numpy._core"):
        # Array reconstruction (protocols 0-4, as in the official Python 2 pickles) ...
        allowed[(f"{mod}.multiarray", "_reconstruct")] = _ma._reconstruct
        # ... and protocol 5 (np.frombuffer + reshape, no code execution).
        if hasattr(_num, "_frombuffer"):
            allowed[(f"{mod}.numeric", "_frombuffer")] = _num._frombuffer
    allowed[("_codecs", "encode")] = _latin1_encode
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals NumPy arrays need; anything else
    (``os.system``, ``builtins.eval``, ...) raises ``pickle.UnpicklingError`` before it can be
    called. dict/list/bytes/int are built by opcodes and need no globals."""

    _ALLOWED: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if RestrictedUnpickler._ALLOWED is None:
            RestrictedUnpickler._ALLOWED = _allowed_globals()
        try:
            return RestrictedUnpickler._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: not needed by CIFAR files"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


MAX_PICKLE_OPS = 1_000_000
"""Most opcodes a CIFAR pickle may hold (an official batch has about 30,000)."""
MAX_MEMO_INDEX = 1_000_000
"""Largest memo slot a CIFAR pickle may name (the unpickler sizes its memo table by it)."""


def _prescan(data: bytes, path: Path) -> None:
    """Walk the opcodes without executing any: refuse absurd opcode counts and memo indices
    before the unpickler allocates anything for them."""
    import pickletools

    count = 0
    try:
        for op, arg, _pos in pickletools.genops(data):
            count += 1
            if count > MAX_PICKLE_OPS:
                raise CorruptDataError(f"{path}: pickle has more than {MAX_PICKLE_OPS} opcodes (not a CIFAR batch)")
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET") and int(arg) > MAX_MEMO_INDEX:
                raise CorruptDataError(f"{path}: pickle uses memo slot {arg} (not a CIFAR batch)")
            if op.name == "STOP":
                return
    except CorruptDataError:
        raise
    except Exception as exc:
        raise CorruptDataError(f"{path}: unsafe or damaged pickle: {exc}") from exc


def safe_unpickle(data: bytes, path: Path) -> Any:
    """Unpickle ``data`` (bytes-encoded strings, as the official Python 2 files need) with
    :class:`RestrictedUnpickler`, after an opcode scan (:func:`_prescan`); every failure
    becomes CorruptDataError naming ``path``."""
    _prescan(data, path)
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # any exception a hostile or damaged pickle can provoke
        raise CorruptDataError(f"{path}: unsafe or damaged pickle: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


def _check_range(values: np.ndarray, limit: int, path: Path, what: str) -> None:
    if values.size and (values.min() < 0 or values.max() >= limit):
        bad = int(np.argmax((values < 0) | (values >= limit)))
        raise CorruptDataError(
            f"{path}: {what} label {int(values[bad])} at record {bad} out of range [0, {limit})"
        )


def parse_binary(
    data: bytes, path: Path, label_bytes: int, limits: tuple[int, ...], use: int
) -> tuple[np.ndarray, np.ndarray]:
    """Parse a CIFAR binary file: records of ``label_bytes`` label bytes + 3072 pixels.

    ``limits`` gives the class count of each label byte; ``use`` picks the label returned.
    """
    record = label_bytes + PIXELS
    if len(data) == 0 or len(data) % record:
        raise CorruptDataError(
            f"{path}: size {len(data)} bytes is not a positive multiple of the record size "
            f"{record} ({label_bytes} label byte(s) + {PIXELS} pixels)"
        )
    arr = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
    for i, limit in enumerate(limits):
        _check_range(arr[:, i], limit, path, ("coarse", "fine")[i] if label_bytes == 2 else "class")
    labels = arr[:, use].astype(np.int64)
    images = arr[:, label_bytes:].reshape(-1, 3, 32, 32).copy()
    return images, labels


def _get(d: dict[Any, Any], key: str) -> Any:
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise KeyError(key)


def parse_python(
    data: bytes, path: Path, label_keys: tuple[tuple[str, int], ...], use: int
) -> tuple[np.ndarray, np.ndarray]:
    """Parse a CIFAR python-version pickle: dict with ``data`` (n, 3072) uint8 and label lists.

    ``label_keys`` are ``(key, num_classes)`` pairs all checked; ``use`` picks the one returned.
    """
    obj = safe_unpickle(data, path)
    if not isinstance(obj, dict):
        raise CorruptDataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    try:
        pixels = _get(obj, "data")
    except KeyError:
        raise CorruptDataError(f"{path}: pickled dict has no 'data' entry") from None
    if (
        not isinstance(pixels, np.ndarray)
        or pixels.dtype != np.uint8
        or pixels.ndim != 2
        or pixels.shape[1] != PIXELS
    ):
        desc = (
            f"{pixels.dtype}{pixels.shape}"
            if isinstance(pixels, np.ndarray)
            else type(pixels).__name__
        )
        raise CorruptDataError(
            f"{path}: 'data' must be a uint8 array of shape (n, {PIXELS}), got {desc}"
        )
    n = pixels.shape[0]
    if n == 0:
        raise CorruptDataError(f"{path}: holds no images")
    result: list[np.ndarray] = []
    for key, limit in label_keys:
        try:
            raw = _get(obj, key)
        except KeyError:
            raise CorruptDataError(f"{path}: pickled dict has no {key!r} entry") from None
        # Check the length and the element types *before* converting: nested lists of shared
        # references (a few KB of pickle) would expand to gigabytes inside np.asarray.
        if isinstance(raw, np.ndarray):
            if raw.ndim != 1 or not np.issubdtype(raw.dtype, np.integer):
                raise CorruptDataError(f"{path}: {key!r} must be a list of integers")
        elif not isinstance(raw, (list, tuple)) or not all(type(v) is int for v in raw):
            raise CorruptDataError(f"{path}: {key!r} must be a list of integers")
        if len(raw) != n:
            raise CorruptDataError(f"{path}: {n} images but {len(raw)} entries in {key!r}")
        try:
            labels = np.asarray(raw, dtype=np.int64)
        except OverflowError:
            raise CorruptDataError(f"{path}: {key!r} holds integers out of range") from None
        _check_range(labels, limit, path, key)
        result.append(labels.astype(np.int64))
    images = pixels.reshape(n, 3, 32, 32).copy()
    return images, result[use]


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    dirname: str
    files: dict[str, tuple[str, ...]]  # split -> file names, in order
    parse: Callable[[bytes, Path], tuple[np.ndarray, np.ndarray]]
    checked: bool  # whether OFFICIAL has digests for this layout


@dataclass(frozen=True)
class CifarFound:
    layout: _Layout
    directory: Path
    present: tuple[str, ...]
    missing: tuple[str, ...]


@dataclass(frozen=True)
class CifarSource:
    """CIFAR-10 or CIFAR-100 (fine or coarse labels); python version preferred when both exist."""

    name: str
    title: str
    num_classes: int
    layouts: tuple[_Layout, ...]
    archive: str  # python-version archive downloaded with download=True
    mirror_key: str
    official_count: dict[str, int]
    label_note: str = ""
    downloadable: bool = True

    def locate(self, root: Path, split: str) -> CifarFound | None:
        for layout in self.layouts:
            directory = root / layout.dirname
            names = layout.files[split]
            present = tuple(n for n in names if (directory / n).is_file())
            if present:
                missing = tuple(n for n in names if n not in present)
                return CifarFound(layout, directory, present, missing)
        return None

    def expected_paths(self, root: Path, split: str) -> list[str]:
        return [
            f"{root / layout.dirname}/{{{','.join(layout.files[split])}}}"
            for layout in self.layouts
        ]

    def how_to_get(self) -> str:
        base = dl.MIRRORS[self.mirror_key][0]
        return (
            f"get {self.archive} (python version) or its binary version from {base} and "
            "extract it into the data root"
        )

    def load(self, found: CifarFound, split: str) -> Dataset:
        images_parts, label_parts, files, verified = [], [], [], []
        for fname in found.present:
            path = found.directory / fname
            data = read_bytes(path)
            images, labels = found.layout.parse(data, path)
            md5, sha = digests(data)
            ok = found.layout.checked and check_official(
                found.layout.dirname, path, records=len(labels), file_md5=md5
            )
            verified.append(ok)
            images_parts.append(images)
            label_parts.append(labels)
            files.append((str(path), sha))
        images = images_parts[0] if len(images_parts) == 1 else np.concatenate(images_parts)
        labels = label_parts[0] if len(label_parts) == 1 else np.concatenate(label_parts)
        n, official = len(labels), self.official_count[split]
        is_subset = n < official
        read = ", ".join(found.present)
        if is_subset:
            which = f"{read} only" + (
                f"; missing {', '.join(found.missing)}" if found.missing else ""
            )
            count = f"{n} of {official} images (subset: {which})"
        else:
            count = f"{n} images ({read})"
        if all(verified):
            status = VERIFIED
        elif found.layout.checked:
            status = STRUCTURAL
        else:
            status = "structurally verified, no official digest exists for the binary files"
        description = (
            f"{self.title} {split}{self.label_note}, {count} from {found.directory}; {status}"
        )
        return Dataset(
            name=self.name,
            images=images,
            labels=labels,
            num_classes=self.num_classes,
            split=split,
            description=description,
            is_subset=is_subset,
            files=tuple(files),
        )

    def download(self, root: Path, split: str, progress: bool) -> None:
        archive = root / self.archive
        md5 = ARCHIVE_MD5[self.archive]
        root.mkdir(parents=True, exist_ok=True)
        if not (archive.is_file() and dl._md5_file(archive) == md5):
            dl.fetch(dl.urls_for(self.mirror_key, self.archive), archive, md5, progress=progress)
        dl.safe_extract(archive, root, self.layouts[0].dirname)


def _cifar10_layouts() -> tuple[_Layout, ...]:
    batches = tuple(f"data_batch_{i}" for i in range(1, 6))
    py = _Layout(
        "cifar-10-batches-py",
        {"train": batches, "test": ("test_batch",)},
        lambda d, p: parse_python(d, p, (("labels", 10),), 0),
        checked=True,
    )
    binary = _Layout(
        "cifar-10-batches-bin",
        {"train": tuple(f"{b}.bin" for b in batches), "test": ("test_batch.bin",)},
        lambda d, p: parse_binary(d, p, 1, (10,), 0),
        checked=False,
    )
    return (py, binary)


def _cifar100_layouts(use: int) -> tuple[_Layout, ...]:
    # use: 0 = coarse, 1 = fine (binary record byte order; same index into label_keys below)
    py = _Layout(
        "cifar-100-python",
        {"train": ("train",), "test": ("test",)},
        lambda d, p: parse_python(d, p, (("coarse_labels", 20), ("fine_labels", 100)), use),
        checked=True,
    )
    binary = _Layout(
        "cifar-100-binary",
        {"train": ("train.bin",), "test": ("test.bin",)},
        lambda d, p: parse_binary(d, p, 2, (20, 100), use),
        checked=False,
    )
    return (py, binary)


CIFAR10 = CifarSource(
    name="cifar10",
    title="CIFAR-10",
    num_classes=10,
    layouts=_cifar10_layouts(),
    archive="cifar-10-python.tar.gz",
    mirror_key="cifar10",
    official_count={"train": 50000, "test": 10000},
)
CIFAR100 = CifarSource(
    name="cifar100",
    title="CIFAR-100",
    num_classes=100,
    layouts=_cifar100_layouts(1),
    archive="cifar-100-python.tar.gz",
    mirror_key="cifar100",
    official_count={"train": 50000, "test": 10000},
    label_note=" (100 fine labels)",
)
CIFAR100_COARSE = CifarSource(
    name="cifar100-coarse",
    title="CIFAR-100",
    num_classes=20,
    layouts=_cifar100_layouts(0),
    archive="cifar-100-python.tar.gz",
    mirror_key="cifar100",
    official_count={"train": 50000, "test": 10000},
    label_note=" (20 coarse labels)",
)
