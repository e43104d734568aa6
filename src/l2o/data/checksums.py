"""Official digests of the dataset files, and the rule that decides when a file must match one.

Rule ("claimed official"): a file is checked against this table only when (a) its name is in the
table for its dataset directory AND (b) it holds exactly the official number of examples (for
IDX files the count in the header, which the parser has already checked against the payload
size, i.e. the decompressed size equals the official one; for CIFAR pickles the rows of
``data``; for ``fer2013.csv`` the data rows). Such a full-size file must match a known digest,
else :class:`~l2o.data.base.ChecksumError`. For ``.gz`` files either digest is accepted: the MD5
of the gzip file as distributed, or the MD5 of its decompressed content -- because copies
recompressed by others (the shared MNIST train files, Debian's Fashion-MNIST) have different gzip
bytes but identical content. An uncompressed copy (``train-images-idx3-ubyte``) is checked
against the content MD5.

Every other file -- smaller subsets, tiny generated test files, formats with no published digest
(CIFAR binary ``.bin`` files, TFD) -- is verified structurally by its parser (magic numbers,
record sizes, pixel counts, label ranges) and the dataset is flagged ``is_subset`` when it holds
fewer examples than the official split. So a tampered full-size official file fails, while a
genuine subset passes and is reported as one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .base import ChecksumError

__all__ = ["ARCHIVE_MD5", "OFFICIAL", "OfficialDigest", "check_official", "VERIFIED", "STRUCTURAL"]

VERIFIED = "MD5-verified against the official digest"
STRUCTURAL = "structurally verified, no official digest applies"


@dataclass(frozen=True)
class OfficialDigest:
    """Digests of one official file."""

    md5: str  # MD5 of the file as officially distributed
    records: int  # number of examples it holds
    content_md5: str | None = None  # MD5 of the decompressed content (gzip files only)


# Keys: the dataset directory name under a data root; inner keys: file names.
OFFICIAL: dict[str, dict[str, OfficialDigest]] = {
    # gzip MD5s: the official MNIST page / torchvision. content_md5: train values are given in
    # /work/shared/data/README.md; t10k values were computed here (md5 of `gunzip -c`) from the
    # shared t10k files, whose gzip MD5s equal the official ones, i.e. they are the official bytes.
    "mnist": {
        "train-images-idx3-ubyte.gz": OfficialDigest(
            "f68b3c2dcbeaaa9fbdd348bbdeb94873", 60000, "6bbc9ace898e44ae57da46a324031adb"
        ),
        "train-labels-idx1-ubyte.gz": OfficialDigest(
            "d53e105ee54ea40749a09fcbcd1e9432", 60000, "a25bea736e30d166cdddb491f175f624"
        ),
        "t10k-images-idx3-ubyte.gz": OfficialDigest(
            "9fb629c4189551a2d022fa330f9573f3", 10000, "2646ac647ad5339dbf082846283269ea"
        ),
        "t10k-labels-idx1-ubyte.gz": OfficialDigest(
            "ec29112dd5afa0611ce80d1b7f02629c", 10000, "27ae3e4e09519cfbb04c329615203637"
        ),
    },
    # gzip MD5s: the Fashion-MNIST README. content_md5: computed here (md5 of `gunzip -c`) from
    # Debian's package dataset-fashion-mnist 0.0~git20200523.55506a9-1
    # (/usr/share/datasets/fashion-mnist/*.gz, recompressed by Debian, content upstream's;
    # headers and class counts checked: 6000 per class in train, 1000 per class in t10k).
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": OfficialDigest(
            "8d4fb7e6c68d591d4c3dfef9ec88bf0d", 60000, "f4a8712d7a061bf5bd6d2ca38dc4d50a"
        ),
        "train-labels-idx1-ubyte.gz": OfficialDigest(
            "25c81989df183df01b3e8a0aad5dffbe", 60000, "9018921c3c673c538a1fc5bad174d6f9"
        ),
        "t10k-images-idx3-ubyte.gz": OfficialDigest(
            "bef4ecab320f06d8554ea6380940ec79", 10000, "8181f5470baa50b63fa0f6fddb340f0a"
        ),
        "t10k-labels-idx1-ubyte.gz": OfficialDigest(
            "bb300cfdad3c16e7a12a480ee83cd310", 10000, "15d484375f8d13e6eb1aabb0c3f46965"
        ),
    },
    # Files inside the official python-version archives (torchvision's tables).
    "cifar-10-batches-py": {
        "data_batch_1": OfficialDigest("c99cafc152244af753f735de768cd75f", 10000),
        "data_batch_2": OfficialDigest("d4bba439e000b95fd0a9bffe97cbabec", 10000),
        "data_batch_3": OfficialDigest("54ebc095f3ab1f0389bbae665268c751", 10000),
        "data_batch_4": OfficialDigest("634d18415352ddfa80567beed471001a", 10000),
        "data_batch_5": OfficialDigest("482c414d41f54cd18b22e5b47cb7c3cb", 10000),
        "test_batch": OfficialDigest("40351d587109b95175f43aff81a1287e", 10000),
    },
    "cifar-100-python": {
        "train": OfficialDigest("16019d7e3df5f24257cddd939b257f8d", 50000),
        "test": OfficialDigest("f0ef6b0ae62326f3e7ffdfab6717acfc", 10000),
    },
    # The complete Kaggle fer2013.csv (35,887 rows), digest from torchvision's FER2013 resources.
    "fer2013": {
        "fer2013.csv": OfficialDigest("f8428a1edbd21e88f42c73edd2a14f95", 35887),
    },
}

#: MD5 of the official archives (the binary ones are listed for manual checks; downloads use the
#: python versions, whose member files have digests above).
ARCHIVE_MD5: dict[str, str] = {
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530",
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
    "cifar-100-binary.tar.gz": "03b5dce01913d631647c71ecec9e9cb8",
}


def check_official(
    group: str,
    path: Path,
    *,
    records: int,
    file_md5: str,
    content_md5: str | None = None,
) -> bool:
    """Apply the module's rule to one parsed file.

    Returns True when the file is a full-size official file and matches its digest, False when
    no official digest applies (structural verification only); raises ChecksumError when a
    full-size file named in the table matches none of its known digests.
    ``content_md5`` is the MD5 of the decompressed bytes of a ``.gz`` file.
    """
    table = OFFICIAL.get(group, {})
    entry = table.get(path.name)
    compressed = path.name.endswith(".gz")
    if entry is None and not compressed:
        entry = table.get(path.name + ".gz")  # uncompressed copy of an official .gz file
        if entry is not None and entry.content_md5 is None:
            entry = None
    if entry is None or records != entry.records:
        return False
    if path.name in table:
        if file_md5 == entry.md5:
            return True
        if compressed and entry.content_md5 is not None and content_md5 == entry.content_md5:
            return True
        expected = f"{entry.md5}" + (
            f" (gzip file) or {entry.content_md5} (decompressed content)"
            if compressed and entry.content_md5
            else ""
        )
        actual = file_md5 + (
            f" (gzip file) / {content_md5} (decompressed content)" if compressed else ""
        )
    else:
        if file_md5 == entry.content_md5:
            return True
        expected = f"{entry.content_md5} (content of the official {path.name}.gz)"
        actual = file_md5
    raise ChecksumError(
        f"{path}: MD5 mismatch for a full-size ({records} examples) official file: "
        f"expected {expected}, got {actual}. The file is damaged or not the official one; "
        "delete it and fetch it again."
    )
