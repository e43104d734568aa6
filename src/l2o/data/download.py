"""Downloading dataset files from their official sources, safely.

Why: ``load_dataset(..., download=True)`` must never leave a half-written or unverified file
where a loader would pick it up, and must never let an archive write outside the data root.
Hence: a connect/read timeout, a temp file in the destination directory renamed into place only
after its MD5 matched, mirrors tried in order, and tar members checked (no absolute paths, no
``..``, no links or devices, everything under the expected top directory) before extraction
with ``filter="data"`` where available.

:data:`MIRRORS` is a module-level table of base URLs so tests can point it at ``file://`` URLs.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from .base import ChecksumError, CorruptDataError, DownloadError

__all__ = ["CONNECT_TIMEOUT", "MIRRORS", "fetch", "safe_extract", "urls_for"]

#: Seconds to wait when connecting (and for each read) before giving up on a URL.
CONNECT_TIMEOUT = 15.0

#: Base URLs, tried in order; a file's URL is base + file name.
MIRRORS: dict[str, list[str]] = {
    "mnist": [
        "http://yann.lecun.com/exdb/mnist/",
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
    ],
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    "cifar10": ["https://www.cs.toronto.edu/~kriz/"],
    "cifar100": ["https://www.cs.toronto.edu/~kriz/"],
}

_CHUNK = 1 << 20


def urls_for(key: str, filename: str) -> list[str]:
    """The candidate URLs of ``filename`` for the mirror group ``key``."""
    return [base.rstrip("/") + "/" + filename for base in MIRRORS[key]]


def _md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch_one(url: str, tmp: Path, progress: bool, desc: str) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "l2o-data/0.1"})
    with urllib.request.urlopen(request, timeout=CONNECT_TIMEOUT) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        with (
            open(tmp, "wb") as out,
            tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar,
        ):
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                out.write(chunk)
                bar.update(len(chunk))


def fetch(
    urls: Sequence[str],
    dest: Path,
    md5: str,
    *,
    progress: bool = True,
    content_md5: str | None = None,
) -> Path:
    """Download the first URL that works into ``dest`` and verify it.

    The bytes go to a temp file next to ``dest``; it is renamed to ``dest`` only when its MD5 is
    ``md5`` (or, for a gzip file, its decompressed MD5 is ``content_md5``), else it is deleted and
    the next URL is tried. Raises ChecksumError if some URL served wrong bytes and none served
    right ones, DownloadError if no URL could be fetched at all.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    bad_digest: list[str] = []
    for url in urls:
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            try:
                _fetch_one(url, tmp, progress, dest.name)
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
                failures.append(f"{url}: {exc}")
                continue
            actual = _md5_file(tmp)
            ok = actual == md5
            if not ok and content_md5 is not None:
                ok = _gunzip_md5(tmp) == content_md5
            if not ok:
                bad_digest.append(f"{url}: expected MD5 {md5}, got {actual}")
                continue
            os.replace(tmp, dest)
            return dest
        finally:
            tmp.unlink(missing_ok=True)
    if bad_digest:
        raise ChecksumError(
            f"downloaded {dest.name} failed verification (file discarded): " + "; ".join(bad_digest)
        )
    raise DownloadError(f"could not download {dest.name}: " + "; ".join(failures))


def _gunzip_md5(path: Path) -> str | None:
    """MD5 of the decompressed content, streamed; None if damaged or larger than the cap on a
    data file's decompressed size (a gzip bomb is not decompressed to the end)."""
    from .idx import MAX_DECOMPRESSED

    h = hashlib.md5()
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                total += len(chunk)
                if total > MAX_DECOMPRESSED:
                    return None
                h.update(chunk)
    except (OSError, EOFError, zlib.error):
        return None
    return h.hexdigest()


def safe_extract(archive: Path, root: Path, top: str) -> Path:
    """Extract a tar archive whose members all lie under ``top/`` into ``root/top``.

    Members are validated first (relative, no ``..``, regular files or directories only, under
    ``top``); extraction goes to a temp directory in ``root`` (with ``filter="data"`` when the
    Python has it) and the files are then moved into ``root/top``. Raises CorruptDataError naming
    the archive and member otherwise.
    """
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise CorruptDataError(f"{archive}: not a readable tar archive: {exc}") from exc
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise CorruptDataError(f"{archive}: damaged tar archive: {exc}") from exc
        for m in members:
            parts = PurePosixPath(m.name).parts
            if (
                m.name.startswith(("/", "\\"))
                or PurePosixPath(m.name).is_absolute()
                or ".." in parts
                or "\\" in m.name
                or not parts
                or parts[0] != top
            ):
                raise CorruptDataError(
                    f"{archive}: refusing unsafe member path {m.name!r} (must lie under {top}/)"
                )
            if not (m.isfile() or m.isdir()):
                raise CorruptDataError(
                    f"{archive}: refusing member {m.name!r}: links and special files not allowed"
                )
        tmpdir = Path(tempfile.mkdtemp(dir=root, prefix=".extract-"))
        try:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmpdir, members=members, filter="data")
            else:  # pragma: no cover - Python without extraction filters
                tar.extractall(tmpdir, members=members)
            target = root / top
            for src in sorted((tmpdir / top).rglob("*")):
                dst = target / src.relative_to(tmpdir / top)
                if src.is_dir():
                    dst.mkdir(parents=True, exist_ok=True)
                else:
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, dst)
            target.mkdir(parents=True, exist_ok=True)
            return target
        except (tarfile.TarError, EOFError) as exc:
            raise CorruptDataError(f"{archive}: damaged tar archive: {exc}") from exc
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
