"""Fixtures for the l2o.data tests: hermetic data roots, no network, and writers that produce
tiny files in each official format (IDX, CIFAR binary/python, FER2013 CSV, TFD .mat)."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import socket
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import l2o.data.base as base


@pytest.fixture(autouse=True)
def hermetic(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> SimpleNamespace:
    """Every test: $HOME and the system root point into a fresh temp dir, $L2O_DATA_DIR is unset,
    and opening a network socket fails (file:// URLs need none)."""
    top = tmp_path_factory.mktemp("env")
    home, system = top / "home", top / "system"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv(base.ENV_VAR, raising=False)
    monkeypatch.setattr(base, "SYSTEM_DATA_DIRS", (str(system),))

    def no_network(*args: object, **kwargs: object) -> None:
        raise RuntimeError("network access is disabled in the l2o.data tests")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return SimpleNamespace(home=home, system=system, cache=home / ".cache" / "l2o" / "data")


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------ IDX


def idx_images(images: np.ndarray, magic: int = 2051) -> bytes:
    n, r, c = images.shape
    return struct.pack(">IIII", magic, n, r, c) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray, magic: int = 2049) -> bytes:
    return struct.pack(">II", magic, len(labels)) + labels.astype(np.uint8).tobytes()


IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def write_idx(
    root: Path,
    split: str = "train",
    n: int = 12,
    dirname: str = "mnist",
    gz: bool = True,
    seed: int = 0,
    images_bytes: bytes | None = None,
    labels_bytes: bytes | None = None,
) -> tuple[np.ndarray, np.ndarray, Path, Path]:
    """Write a tiny IDX split; returns (images, labels, image path, label path)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).astype(np.int64)
    d = root / dirname
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for base_name, payload in zip(
        IDX_NAMES[split],
        (images_bytes or idx_images(images), labels_bytes or idx_labels(labels)),
        strict=True,
    ):
        path = d / (base_name + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(payload, mtime=0) if gz else payload)
        paths.append(path)
    return images, labels, paths[0], paths[1]


# ------------------------------------------------------------------------------------ CIFAR


def cifar_arrays(n: int, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, classes, size=n).astype(np.int64)
    return images, labels


def cifar10_binary(images: np.ndarray, labels: np.ndarray) -> bytes:
    n = len(labels)
    rec = np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(n, -1)], axis=1)
    return rec.tobytes()


def cifar100_binary(images: np.ndarray, coarse: np.ndarray, fine: np.ndarray) -> bytes:
    n = len(fine)
    rec = np.concatenate(
        [coarse.astype(np.uint8)[:, None], fine.astype(np.uint8)[:, None], images.reshape(n, -1)],
        axis=1,
    )
    return rec.tobytes()


def cifar10_pickle(images: np.ndarray, labels: np.ndarray, protocol: int = 2) -> bytes:
    n = len(labels)
    return pickle.dumps(
        {
            b"batch_label": b"generated batch",
            b"labels": [int(x) for x in labels],
            b"data": images.reshape(n, -1).copy(),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        },
        protocol=protocol,
    )


def cifar100_pickle(
    images: np.ndarray, coarse: np.ndarray, fine: np.ndarray, protocol: int = 2
) -> bytes:
    n = len(fine)
    return pickle.dumps(
        {
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
            b"batch_label": b"generated",
            b"fine_labels": [int(x) for x in fine],
            b"coarse_labels": [int(x) for x in coarse],
            b"data": images.reshape(n, -1).copy(),
        },
        protocol=protocol,
    )


# ------------------------------------------------------------------------------------ faces


def fer_csv(rows: list[tuple[int, np.ndarray, str]]) -> bytes:
    lines = ["emotion,pixels,Usage"]
    for emotion, img, usage in rows:
        lines.append(f"{emotion},{' '.join(str(int(v)) for v in img.reshape(-1))},{usage}")
    return ("\n".join(lines) + "\n").encode()


def fer_rows(
    n_train: int = 6, n_public: int = 3, n_private: int = 2, seed: int = 0
) -> list[tuple[int, np.ndarray, str]]:
    rng = np.random.default_rng(seed)
    usages = ["Training"] * n_train + ["PublicTest"] * n_public + ["PrivateTest"] * n_private
    rows = []
    for usage in usages:
        img = rng.integers(0, 256, size=(48, 48), dtype=np.uint8)
        img[0, 0], img[0, 1] = 0, 255  # make sure the extremes occur
        rows.append((int(rng.integers(0, 7)), img, usage))
    rng.shuffle(rows)  # type: ignore[arg-type]
    return rows


def write_fer(
    root: Path, rows: list[tuple[int, np.ndarray, str]] | None = None, raw: bytes | None = None
) -> Path:
    path = root / "fer2013" / "fer2013.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw if raw is not None else fer_csv(rows if rows is not None else fer_rows()))
    return path


def write_tfd(
    root: Path, n: int = 20, seed: int = 0, **override: np.ndarray
) -> tuple[Path, dict[str, np.ndarray]]:
    import scipy.io

    rng = np.random.default_rng(seed)
    fields = {
        "images": rng.integers(0, 256, size=(n, 48, 48), dtype=np.uint8),
        "labs_ex": np.where(rng.random(n) < 0.3, -1, rng.integers(1, 8, size=n)).reshape(n, 1),
        "folds": rng.integers(0, 4, size=(n, 5)),
    }
    fields.update(override)
    path = root / "tfd" / "TFD_48x48.mat"
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, fields)
    return path, fields


@pytest.fixture
def gen() -> SimpleNamespace:
    """The writers above, for tests."""
    return SimpleNamespace(
        md5=md5,
        sha256_file=sha256_file,
        idx_images=idx_images,
        idx_labels=idx_labels,
        write_idx=write_idx,
        cifar_arrays=cifar_arrays,
        cifar10_binary=cifar10_binary,
        cifar100_binary=cifar100_binary,
        cifar10_pickle=cifar10_pickle,
        cifar100_pickle=cifar100_pickle,
        fer_csv=fer_csv,
        fer_rows=fer_rows,
        write_fer=write_fer,
        write_tfd=write_tfd,
    )
