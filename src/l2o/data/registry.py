"""Dataset names, the search over data roots, and :func:`load_dataset`.

Why: one entry point that maps a name to its loader, searches the roots of
:func:`~l2o.data.base.data_search_path` in order (the first root holding the split wins; a
directory with some CIFAR batches missing counts as holding it and loads as a flagged subset),
downloads only when nothing is found and ``download=True``, and otherwise raises
:class:`DataNotFoundError` listing every path it looked for and how to get the files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .base import SPLITS, DataNotFoundError, Dataset, Source, data_search_path, writable_root
from .cifar import CIFAR10, CIFAR100, CIFAR100_COARSE
from .faces import FER2013, TFD
from .idx import FASHION_MNIST, MNIST

__all__ = ["dataset_names", "load_dataset", "load_digits_dataset"]

_SOURCES: dict[str, Source] = {
    s.name: s for s in (MNIST, FASHION_MNIST, CIFAR10, CIFAR100, CIFAR100_COARSE, FER2013, TFD)
}
_SPECIAL = ("faces", "digits")
_ALIASES = {
    "fashionmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "cifar-100-coarse": "cifar100-coarse",
}


def dataset_names() -> list[str]:
    """The canonical dataset names accepted by :func:`load_dataset`."""
    return sorted([*_SOURCES, *_SPECIAL])


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise ValueError(
            f"dataset name must be a string; valid names: {', '.join(dataset_names())}"
        )
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in _SOURCES and key not in _SPECIAL:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(dataset_names())}")
    return key


def load_digits_dataset(split: str = "train") -> Dataset:
    """scikit-learn's bundled 8x8 digits (no files needed), pixels 0..16 scaled to 0..255.

    The set has no official train/test split: "train" is all 1797 images; "test" is refused.
    """
    if split != "train":
        raise ValueError(
            f"split {split!r} not available for 'digits': valid splits: 'train' "
            "(all 1797 images; the set has no official test split)"
        )
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    return Dataset(
        name="digits",
        images=images,
        labels=labels,
        num_classes=10,
        split="train",
        description=(
            f"scikit-learn digits, all {len(labels)} 8x8 images as 'train' (no official split; "
            "pixel values 0..16 scaled to 0..255; bundled with scikit-learn, no files read)"
        ),
        is_subset=False,
        files=(),
    )


def _search(source: Source, split: str, roots: list[Path], notes: list[str]) -> Dataset | None:
    for root in roots:
        found = source.locate(root, split)
        if found is None:
            continue
        try:
            return source.load(found, split)
        except DataNotFoundError as exc:  # file present but without this split: keep looking
            notes.append(str(exc))
    return None


def _not_found(
    sources: list[Source], split: str, roots: list[Path], notes: list[str], download: bool
) -> DataNotFoundError:
    title = " / ".join(s.title for s in sources)
    lines = [f"{title} '{split}' split not found. Looked for (data roots in search order):"]
    for root in roots:
        for source in sources:
            lines.extend(f"  {p}" for p in source.expected_paths(root, split))
    lines.extend(f"Note: {n}" for n in notes)
    lines.append(
        "Roots come from the data_dir argument, then $L2O_DATA_DIR (os.pathsep-separated), "
        "then ~/.cache/l2o/data, then /usr/share/datasets."
    )
    for source in sources:
        lines.append(f"To get {source.title}: {source.how_to_get()}.")
        if source.downloadable and not download:
            lines.append(
                f"Or pass download=True to fetch {source.title} into the first writable root."
            )
    return DataNotFoundError("\n".join(lines))


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    progress: bool = True,
) -> Dataset:
    """Load split ``split`` of dataset ``name`` (see :func:`dataset_names`).

    Searches :func:`data_search_path(data_dir) <l2o.data.base.data_search_path>` in order and
    loads from the first root that holds the split. If none does and ``download`` is true (and the
    dataset is downloadable: MNIST, Fashion-MNIST, CIFAR), downloads it into the first writable
    root, verified, with a progress bar when ``progress``. "faces" is TFD when its file is found
    in any root, else FER2013 (described as a TFD stand-in). "digits" needs no files.

    Raises ValueError for unknown names/splits, DataNotFoundError, ChecksumError, CorruptDataError.
    """
    key = _canonical(name)
    if key == "digits":
        return load_digits_dataset(split)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for {key!r}; valid splits: 'train', 'test'")
    roots = data_search_path(data_dir)
    notes: list[str] = []
    if key == "faces":
        found = _search(TFD, split, roots, notes)
        if found is not None:
            return found
        for root in roots:
            path = FER2013.locate(root, split)
            if path is not None:
                try:
                    return FER2013.load(path, split, stand_in=True)
                except DataNotFoundError as exc:
                    notes.append(str(exc))
        raise _not_found([TFD, FER2013], split, roots, notes, download)
    source = _SOURCES[key]
    found = _search(source, split, roots, notes)
    if found is not None:
        return found
    if download and source.downloadable:
        root = writable_root(roots)
        source.download(root, split, progress)
        located = source.locate(root, split)
        if located is None:
            raise DataNotFoundError(
                f"{source.title} '{split}' still missing in {root} after download"
            )
        return source.load(located, split)
    if download:
        notes.append(f"{source.title} cannot be downloaded automatically")
    raise _not_found([source], split, roots, notes, download)
