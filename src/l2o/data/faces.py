"""Face-expression datasets: FER2013 (Kaggle CSV) and the Toronto Faces Dataset (TFD, MATLAB).

Why: the paper's TFD is licence-restricted and never downloaded; FER2013 has the same image
size (48x48 grayscale) and label structure (7 expressions) and stands in for it under the name
"faces" when TFD is absent -- and says so in its description. Neither can be downloaded
automatically; the not-found message says where to get the files and where to put them.
Both are verified structurally (header, column count, pixel count and range, label range);
a complete 35,887-row ``fer2013.csv`` must also match its published MD5.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import CorruptDataError, DataNotFoundError, Dataset, digests, read_bytes
from .checksums import STRUCTURAL, VERIFIED, check_official

__all__ = ["FER2013", "TFD", "FerSource", "TfdSource", "parse_fer_csv"]

SIDE = 48
FER_HEADER = ("emotion", "pixels", "Usage")
FER_USAGES = {"train": ("Training",), "test": ("PublicTest", "PrivateTest")}
FER_OFFICIAL = {"train": 28709, "test": 3589 + 3589}
FER_URL = (
    "https://www.kaggle.com/c/challenges-in-representation-learning-facial-expression-"
    "recognition-challenge/data"
)


class SplitEmptyError(DataNotFoundError):
    """The file exists but holds no example of the requested split (a partial copy)."""


def _parse_pixel_rows(fields: list[bytes], rows: list[int], path: Path) -> np.ndarray:
    """Parse space-separated 0..255 pixel fields (one per image) into ``(n, 48, 48)`` uint8.

    Vectorised over the bytes (a token's value is read from its last 1-3 digits), in chunks of
    rows to bound memory on the full 300 MB file; every row must hold exactly 2304 values.
    """
    per = SIDE * SIDE
    out = np.empty((len(fields), per), dtype=np.uint8)
    chunk = 2048
    for c0 in range(0, len(fields), chunk):
        part = fields[c0 : c0 + chunk]
        buf = np.frombuffer(b" ".join(part) + b" ", dtype=np.uint8)
        is_digit = (buf >= 48) & (buf <= 57)
        bad = ~is_digit & (buf != 32)
        if bad.any():
            k = int(np.searchsorted(np.cumsum([len(f) + 1 for f in part]), np.argmax(bad), "right"))
            raise CorruptDataError(
                f"{path}: line {rows[c0 + k]}: pixels contain characters other than digits"
            )
        prev = np.empty_like(is_digit)
        prev[0], prev[1:] = False, is_digit[:-1]
        starts = np.flatnonzero(is_digit & ~prev)
        ends = np.flatnonzero(is_digit & ~np.append(is_digit[1:], False))
        # tokens per row: row k spans [offset_k, offset_k + len_k] in buf
        offsets = np.concatenate(([0], np.cumsum([len(f) + 1 for f in part])[:-1]))
        counts = np.diff(np.append(np.searchsorted(starts, offsets), len(starts)))
        if (counts != per).any():
            k = int(np.argmax(counts != per))
            raise CorruptDataError(
                f"{path}: line {rows[c0 + k]} has {int(counts[k])} pixel values, expected {per}"
            )
        lengths = ends - starts + 1
        values = buf[ends].astype(np.int64) - 48
        two, three = lengths >= 2, lengths >= 3
        values[two] += 10 * (buf[ends[two] - 1].astype(np.int64) - 48)
        values[three] += 100 * (buf[ends[three] - 2].astype(np.int64) - 48)
        too_big = (lengths > 3) | (values > 255)
        if too_big.any():
            k = int(np.argmax(too_big)) // per
            raise CorruptDataError(f"{path}: line {rows[c0 + k]}: pixel value above 255")
        out[c0 : c0 + len(part)] = values.reshape(len(part), per)
    return out.reshape(-1, SIDE, SIDE)


def parse_fer_csv(raw: bytes, path: Path, split: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Parse the FER2013 CSV; return ``(images (n,48,48) uint8, labels int64, total data rows)``
    for the rows of ``split``. Every row's column count, label and usage are checked; pixels of
    the selected rows are checked for count (2304) and range (0..255)."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines = raw.splitlines()
    header = tuple(h.strip() for h in lines[0].split(b",")) if lines else ()
    if header != tuple(h.encode() for h in FER_HEADER):
        got = lines[0][:60] if lines else b""
        raise CorruptDataError(f"{path}: bad header {got!r} (expected 'emotion,pixels,Usage')")
    usages = {u.encode() for u in FER_USAGES[split]}
    known = {u.encode() for us in FER_USAGES.values() for u in us}
    labels: list[int] = []
    pixels: list[bytes] = []
    rows: list[int] = []
    total = 0
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split(b",")
        if len(parts) != 3:
            raise CorruptDataError(f"{path}: line {lineno} has {len(parts)} columns, expected 3")
        emotion, usage = parts[0].strip(), parts[2].strip()
        if not emotion.isdigit() or int(emotion) >= 7:
            raise CorruptDataError(f"{path}: line {lineno}: emotion {emotion!r} not in 0..6")
        if usage not in known:
            raise CorruptDataError(f"{path}: line {lineno}: unknown Usage {usage!r}")
        total += 1
        if usage in usages:
            labels.append(int(emotion))
            pixels.append(parts[1].strip().strip(b'"').strip())
            rows.append(lineno)
    if not labels:
        return np.zeros((0, SIDE, SIDE), np.uint8), np.zeros(0, np.int64), total
    return _parse_pixel_rows(pixels, rows, path), np.asarray(labels, dtype=np.int64), total


@dataclass(frozen=True)
class FerSource:
    """FER2013 from ``<root>/fer2013/fer2013.csv``; train = Training, test = Public+PrivateTest."""

    name: str = "fer2013"
    title: str = "FER2013"
    num_classes: int = 7
    downloadable: bool = False

    def locate(self, root: Path, split: str) -> Path | None:
        path = root / "fer2013" / "fer2013.csv"
        return path if path.is_file() else None

    def expected_paths(self, root: Path, split: str) -> list[str]:
        return [str(root / "fer2013" / "fer2013.csv")]

    def how_to_get(self) -> str:
        return (
            "FER2013 cannot be downloaded automatically (Kaggle login required): download "
            "fer2013.tar.gz from the Kaggle competition 'challenges-in-representation-learning-"
            f"facial-expression-recognition-challenge' ({FER_URL}), extract fer2013.csv and put it "
            "at <data root>/fer2013/fer2013.csv"
        )

    def load(self, found: Path, split: str, stand_in: bool = False) -> Dataset:
        raw = read_bytes(found)
        images, labels, total = parse_fer_csv(raw, found, split)
        md5, sha = digests(raw)
        ok = check_official("fer2013", found, records=total, file_md5=md5)
        n = len(labels)
        usage = "+".join(FER_USAGES[split])
        if n == 0:
            raise SplitEmptyError(f"{found} holds no rows with Usage {usage} ({total} rows in all)")
        official = FER_OFFICIAL[split]
        is_subset = n < official
        count = f"{n} of {official} images (subset)" if is_subset else f"{n} images"
        title = f"FER2013 ({n:,}-image TFD stand-in)" if stand_in else self.title
        description = (
            f"{title} {split}, {count}, Usage={usage}, 48x48 grayscale, 7 expressions "
            f"({found}; {VERIFIED if ok else STRUCTURAL})"
        )
        return Dataset(
            name=self.name,
            images=images,
            labels=labels,
            num_classes=self.num_classes,
            split=split,
            description=description,
            is_subset=is_subset,
            files=((str(found), sha),),
        )

    def download(self, root: Path, split: str, progress: bool) -> None:
        raise DataNotFoundError(self.how_to_get())


@dataclass(frozen=True)
class TfdSource:
    """TFD from ``<root>/tfd/TFD_48x48.mat`` (fields images, labs_ex, folds); fold 0 is used:
    train = labelled images with folds[:, 0] in {1, 2} (train+valid), test = folds[:, 0] == 3;
    labels = labs_ex - 1."""

    name: str = "tfd"
    title: str = "TFD"
    num_classes: int = 7
    downloadable: bool = False

    def locate(self, root: Path, split: str) -> Path | None:
        path = root / "tfd" / "TFD_48x48.mat"
        return path if path.is_file() else None

    def expected_paths(self, root: Path, split: str) -> list[str]:
        return [str(root / "tfd" / "TFD_48x48.mat")]

    def how_to_get(self) -> str:
        return (
            "the Toronto Faces Dataset is licence-restricted and never downloaded: obtain "
            "TFD_48x48.mat from its licence holders (University of Toronto, Susskind, Anderson & "
            "Hinton) and put it at <data root>/tfd/TFD_48x48.mat"
        )

    def load(self, found: Path, split: str) -> Dataset:
        import scipy.io

        raw = read_bytes(found)
        _, sha = digests(raw)
        try:
            mat = scipy.io.loadmat(found)
        except NotImplementedError as exc:  # MATLAB v7.3 (HDF5)
            raise CorruptDataError(
                f"{found}: MATLAB v7.3 files are not supported; re-save with -v7 ({exc})"
            ) from exc
        except Exception as exc:
            raise CorruptDataError(f"{found}: not a readable MATLAB file ({exc})") from exc
        for key in ("images", "labs_ex", "folds"):
            if key not in mat:
                raise CorruptDataError(f"{found}: missing field {key!r}")
        images, labs, folds = (
            np.asarray(mat["images"]),
            np.asarray(mat["labs_ex"]),
            np.asarray(mat["folds"]),
        )
        if images.ndim != 3 or images.shape[1:] != (SIDE, SIDE):
            raise CorruptDataError(
                f"{found}: 'images' has shape {images.shape}, expected (N, 48, 48)"
            )
        n = images.shape[0]
        labs = labs.reshape(-1) if labs.size == n else labs
        if labs.shape != (n,):
            raise CorruptDataError(
                f"{found}: 'labs_ex' has shape {mat['labs_ex'].shape}, expected ({n}, 1)"
            )
        if folds.ndim != 2 or folds.shape[0] != n or folds.shape[1] < 1:
            raise CorruptDataError(f"{found}: 'folds' has shape {folds.shape}, expected ({n}, 5)")
        if images.dtype != np.uint8:
            if (
                not np.issubdtype(images.dtype, np.number)
                or images.min() < 0
                or images.max() > 255
                or not np.array_equal(images, np.round(images))
            ):
                raise CorruptDataError(f"{found}: 'images' values are not integers in 0..255")
        if not np.isin(labs, [-1, 1, 2, 3, 4, 5, 6, 7]).all():
            raise CorruptDataError(f"{found}: 'labs_ex' values must be -1 (unlabelled) or 1..7")
        fold0 = folds[:, 0]
        if not np.isin(fold0, [0, 1, 2, 3]).all():
            raise CorruptDataError(f"{found}: 'folds' values must be 0..3")
        wanted = np.isin(fold0, [1, 2]) if split == "train" else fold0 == 3
        mask = (labs >= 1) & wanted
        if not mask.any():
            raise SplitEmptyError(f"{found} holds no labelled {split} images in fold 0")
        description = (
            f"TFD {split} (fold 0, {'train+valid' if split == 'train' else 'test'}), "
            f"{int(mask.sum())} labelled 48x48 images, 7 expressions ({found}; "
            "structurally verified, TFD has no published digest)"
        )
        return Dataset(
            name=self.name,
            images=images[mask].astype(np.uint8),
            labels=(labs[mask] - 1).astype(np.int64),
            num_classes=self.num_classes,
            split=split,
            description=description,
            is_subset=False,
            files=((str(found), sha),),
        )

    def download(self, root: Path, split: str, progress: bool) -> None:
        raise DataNotFoundError(self.how_to_get())


FER2013 = FerSource()
TFD = TfdSource()
