"""IDX files (MNIST, Fashion-MNIST): parsing, verification and the two dataset sources.

Why: the IDX format is simple enough to parse directly with NumPy (no torchvision), and strict
parsing -- magic numbers, dimensions against payload size, image/label count agreement, label
range, gzip integrity -- catches damaged or truncated copies with an error that names the file.
Official digests are applied per :mod:`l2o.data.checksums`.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import download as dl
from .base import CorruptDataError, Dataset, digests, read_bytes
from .checksums import OFFICIAL, STRUCTURAL, VERIFIED, check_official

__all__ = [
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "FASHION_MNIST",
    "MNIST",
    "IdxSource",
    "parse_idx_images",
    "parse_idx_labels",
    "read_idx_file",
]

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension


MAX_DECOMPRESSED = 256 * 2**20
"""Most bytes a ``.gz`` data file may decompress to (the largest official IDX file, MNIST's
training images, is 47 MB): a gzip bomb is refused instead of filling memory."""


def gunzip_bounded(raw: bytes, path: Path, limit: int | None = None) -> bytes:
    """Decompress gzip ``raw`` (one or more members) to at most ``limit`` bytes (default
    ``MAX_DECOMPRESSED``). The size in the gzip trailer is checked against the limit before
    anything is decompressed, and the stream is cut at the limit whatever the trailer says.
    Damaged, truncated or oversized input raises CorruptDataError naming the file."""
    limit = MAX_DECOMPRESSED if limit is None else limit
    if len(raw) < 18 or raw[:2] != b"\x1f\x8b":
        raise CorruptDataError(f"{path}: not a gzip file")
    stated = int.from_bytes(raw[-4:], "little")  # ISIZE of the (last) member, mod 2**32
    if stated > limit:
        raise CorruptDataError(f"{path}: damaged, truncated or oversized gzip file (its trailer says it "
                               f"decompresses to {stated} bytes, more than the {limit} allowed for a data file)")
    out = bytearray()
    data = raw
    try:
        while True:
            d = zlib.decompressobj(wbits=31)
            out += d.decompress(data, limit - len(out) + 1)
            if len(out) > limit or d.unconsumed_tail:
                raise CorruptDataError(f"{path}: decompresses to more than the {limit} bytes allowed for a data "
                                       f"file (its trailer says {stated})")
            if not d.eof:
                raise CorruptDataError(f"{path}: damaged or truncated gzip file (stream ends early)")
            data = d.unused_data
            if not data.strip(b"\0"):  # end, or zero padding after the last member
                return bytes(out)
    except zlib.error as exc:
        raise CorruptDataError(f"{path}: damaged or truncated gzip file ({exc})") from exc


def read_idx_file(path: Path) -> tuple[bytes, bytes]:
    """Return ``(file bytes, content bytes)``; the content is decompressed for ``.gz`` names.

    A damaged, truncated or oversized gzip stream raises CorruptDataError naming the file
    (see :func:`gunzip_bounded`).
    """
    raw = read_bytes(path)
    if not path.name.endswith(".gz"):
        return raw, raw
    return raw, gunzip_bounded(raw, path)


def _header(content: bytes, path: Path, magic: int, ndim: int) -> tuple[int, ...]:
    need = 4 + 4 * ndim
    if len(content) < need:
        raise CorruptDataError(f"{path}: file too short for an IDX header ({len(content)} bytes)")
    (found,) = struct.unpack(">I", content[:4])
    if found != magic:
        raise CorruptDataError(
            f"{path}: bad IDX magic number {found} (expected {magic}); not an IDX "
            f"{'image' if magic == IDX_IMAGES_MAGIC else 'label'} file"
        )
    return struct.unpack(f">{ndim}I", content[4:need])


def parse_idx_images(content: bytes, path: Path) -> np.ndarray:
    """Parse an IDX3 ubyte image file into a ``(N, rows, cols)`` uint8 array."""
    n, rows, cols = _header(content, path, IDX_IMAGES_MAGIC, 3)
    expected = n * rows * cols
    payload = len(content) - 16
    if payload != expected:
        raise CorruptDataError(
            f"{path}: header says {n} images of {rows}x{cols} = {expected} bytes, "
            f"but the payload has {payload} bytes "
            f"({'truncated' if payload < expected else 'trailing data'})"
        )
    return np.frombuffer(content, dtype=np.uint8, offset=16).reshape(n, rows, cols).copy()


def parse_idx_labels(content: bytes, path: Path, num_classes: int) -> np.ndarray:
    """Parse an IDX1 ubyte label file into an ``(N,)`` int64 array with values < num_classes."""
    (n,) = _header(content, path, IDX_LABELS_MAGIC, 1)
    payload = len(content) - 8
    if payload != n:
        raise CorruptDataError(
            f"{path}: header says {n} labels but the payload has {payload} bytes "
            f"({'truncated' if payload < n else 'trailing data'})"
        )
    labels = np.frombuffer(content, dtype=np.uint8, offset=8).astype(np.int64)
    if n and labels.max() >= num_classes:
        bad = int(np.argmax(labels >= num_classes))
        raise CorruptDataError(
            f"{path}: label {int(labels[bad])} at index {bad} out of range [0, {num_classes})"
        )
    return labels


@dataclass(frozen=True)
class IdxSource:
    """A dataset stored as IDX files: ``<root>/<dirname>/{train,t10k}-{images,labels}-...``."""

    name: str
    title: str
    dirname: str
    url_hint: str
    num_classes: int = 10
    downloadable: bool = True

    _BASENAMES = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }
    _OFFICIAL_COUNT = {"train": 60000, "test": 10000}

    def _pick(self, directory: Path, base: str) -> Path | None:
        for candidate in (directory / f"{base}.gz", directory / base):
            if candidate.is_file():
                return candidate
        return None

    def locate(self, root: Path, split: str) -> tuple[Path, Path] | None:
        directory = root / self.dirname
        found = [self._pick(directory, base) for base in self._BASENAMES[split]]
        if found[0] is None or found[1] is None:
            return None
        return found[0], found[1]

    def expected_paths(self, root: Path, split: str) -> list[str]:
        d = root / self.dirname
        return [f"{d / base}.gz (or {base})" for base in self._BASENAMES[split]]

    def how_to_get(self) -> str:
        names = ", ".join(f"{b}.gz" for s in ("train", "test") for b in self._BASENAMES[s])
        return f"get {names} from {self.url_hint}"

    def load(self, found: tuple[Path, Path], split: str) -> Dataset:
        img_path, lbl_path = found
        img_file, img_content = read_idx_file(img_path)
        lbl_file, lbl_content = read_idx_file(lbl_path)
        images = parse_idx_images(img_content, img_path)
        labels = parse_idx_labels(lbl_content, lbl_path, self.num_classes)
        if len(images) != len(labels):
            raise CorruptDataError(
                f"{img_path} holds {len(images)} images but {lbl_path} holds {len(labels)} labels"
            )
        files = []
        verified = []
        for path, file_bytes, content in (
            (img_path, img_file, img_content),
            (lbl_path, lbl_file, lbl_content),
        ):
            md5, sha = digests(file_bytes)
            content_md5 = md5 if content is file_bytes else hashlib.md5(content).hexdigest()
            verified.append(
                check_official(
                    self.dirname,
                    path,
                    records=len(labels),
                    file_md5=md5,
                    content_md5=content_md5,
                )
            )
            files.append((str(path), sha))
        n, official = len(labels), self._OFFICIAL_COUNT[split]
        is_subset = n < official
        count = f"{n} of {official} images (subset)" if is_subset else f"{n} images"
        status = VERIFIED if all(verified) else STRUCTURAL
        description = (
            f"{self.title} {split}, {count} ({img_path.parent}: {img_path.name}, "
            f"{lbl_path.name}; {status})"
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
        directory = root / self.dirname
        for base in self._BASENAMES[split]:
            fname = f"{base}.gz"
            dest = directory / fname
            if dest.is_file():
                continue
            entry = OFFICIAL[self.dirname][fname]
            dl.fetch(
                dl.urls_for(self.name, fname),
                dest,
                entry.md5,
                progress=progress,
                content_md5=entry.content_md5,
            )


MNIST = IdxSource(
    name="mnist",
    title="MNIST",
    dirname="mnist",
    url_hint="http://yann.lecun.com/exdb/mnist/ (mirror https://ossci-datasets.s3.amazonaws.com/mnist/)",
)
FASHION_MNIST = IdxSource(
    name="fashion-mnist",
    title="Fashion-MNIST",
    dirname="fashion-mnist",
    url_hint=(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ (or Debian/Ubuntu: "
        "apt-get install dataset-fashion-mnist, which installs /usr/share/datasets/fashion-mnist/)"
    ),
)
