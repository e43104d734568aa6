"""l2o.data: loading the image-classification datasets used by the learned-optimizer experiments.

Why: experiments need MNIST, Fashion-MNIST, CIFAR-10/100, FER2013/TFD faces and sklearn digits as
plain NumPy arrays, read from local copies found on a search path (never from fixed paths),
verified (official MD5s where they apply, strict structural checks otherwise), with provenance
attached, and downloaded from the official sources only on request.

Public API::

    Dataset                      frozen record: name, images, labels, num_classes, split,
                                 description, is_subset, files ((path, sha256), ...)
    DatasetError                 base error; DataNotFoundError, ChecksumError, CorruptDataError
    load_dataset(name, split="train", data_dir=None, download=False, progress=True) -> Dataset
    dataset_names() -> list[str]
    data_search_path(data_dir=None) -> list[Path]

Integrity rule (details in :mod:`l2o.data.checksums`): a file named in the official table that
holds the official number of examples must match an official MD5 (for .gz: of the gzip file or
of its decompressed content); every other file is verified structurally and a split with fewer
examples than the official one is flagged ``is_subset``. Search order and download behaviour:
:mod:`l2o.data.registry`.
"""

from .base import (
    ChecksumError,
    CorruptDataError,
    DataNotFoundError,
    Dataset,
    DatasetError,
    DownloadError,
    data_search_path,
)
from .registry import dataset_names, load_dataset

__all__ = [
    "ChecksumError",
    "CorruptDataError",
    "DataNotFoundError",
    "Dataset",
    "DatasetError",
    "DownloadError",
    "data_search_path",
    "dataset_names",
    "load_dataset",
]
