"""Against the real dataset copies in $L2O_DATA_DIR (.ci/run points it at ../shared/data; see its
README.md) and, if installed, Debian's dataset-fashion-mnist. Skipped, with the reason, where
those copies are absent; failed instead when $L2O_REQUIRE_REAL_DATA is set (as in CI)."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from l2o.data import ChecksumError, load_dataset
from tests.conftest import SHARED_DATA, shared_data_or_skip

FASHION = Path("/usr/share/datasets/fashion-mnist")


def _need(*parts: str) -> Path:
    """The file under $L2O_DATA_DIR (skip, or in CI fail, when it is absent)."""
    return shared_data_or_skip(*parts)


def _root() -> Path:
    assert SHARED_DATA is not None
    return SHARED_DATA


def test_mnist_train_full_and_verified():
    _need("mnist", "train-images-idx3-ubyte.gz")
    ds = load_dataset("mnist", "train", data_dir=_root())
    assert ds.images.shape == (60000, 28, 28) and ds.images.dtype == np.uint8
    assert np.bincount(ds.labels).tolist() == [
        5923,
        6742,
        5958,
        6131,
        5842,
        5421,
        5918,
        6265,
        5851,
        5949,
    ]
    assert not ds.is_subset and "MD5-verified" in ds.description
    path, sha = ds.files[0]
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == sha


def test_mnist_t10k():
    _need("mnist", "t10k-images-idx3-ubyte.gz")
    ds = load_dataset("mnist", "test", data_dir=_root())
    assert ds.images.shape == (10000, 28, 28) and not ds.is_subset
    assert "MD5-verified" in ds.description


def test_real_digests_catch_tampered_and_accept_recompressed(tmp_path):
    """Real table: re-gzipped official t10k labels pass (content MD5); one changed label fails."""
    src = _need("mnist")
    dst = tmp_path / "mnist"
    dst.mkdir()
    shutil.copy(src / "t10k-images-idx3-ubyte.gz", dst)
    content = gzip.decompress((src / "t10k-labels-idx1-ubyte.gz").read_bytes())
    labels_path = dst / "t10k-labels-idx1-ubyte.gz"
    labels_path.write_bytes(gzip.compress(content, compresslevel=1, mtime=0))
    assert "MD5-verified" in load_dataset("mnist", "test", data_dir=tmp_path).description
    tampered = bytearray(content)
    tampered[8] = (tampered[8] + 1) % 10
    labels_path.write_bytes(gzip.compress(bytes(tampered), mtime=0))
    with pytest.raises(
        ChecksumError, match="t10k-labels-idx1-ubyte.gz.*ec29112dd5afa0611ce80d1b7f02629c"
    ):
        load_dataset("mnist", "test", data_dir=tmp_path)


def test_cifar10_subset():
    _need("cifar-10-batches-bin", "data_batch_1.bin")
    ds = load_dataset("cifar10", "train", data_dir=_root())
    assert ds.images.shape == (10000, 3, 32, 32)
    assert np.bincount(ds.labels, minlength=10).tolist() == [1000] * 10
    assert ds.is_subset and "data_batch_1.bin only" in ds.description


def test_cifar100_subset():
    _need("cifar-100-binary", "train.bin")
    fine = load_dataset("cifar100", "train", data_dir=_root())
    assert fine.images.shape == (10000, 3, 32, 32) and fine.num_classes == 100
    assert np.bincount(fine.labels, minlength=100).tolist() == [100] * 100
    assert fine.is_subset
    coarse = load_dataset("cifar100-coarse", "train", data_dir=_root())
    assert np.bincount(coarse.labels, minlength=20).tolist() == [500] * 20


def test_fer2013_and_faces():
    _need("fer2013", "fer2013.csv")
    ds = load_dataset("fer2013", "train", data_dir=_root())
    assert ds.images.shape == (3300, 48, 48) and ds.num_classes == 7
    assert set(np.unique(ds.labels)) == set(range(7)) and ds.is_subset
    faces = load_dataset("faces", "train", data_dir=_root())
    assert faces.name == "fer2013" and "FER2013 (3,300-image TFD stand-in)" in faces.description
    np.testing.assert_array_equal(faces.labels, ds.labels)


@pytest.mark.skipif(
    not FASHION.is_dir(), reason="Debian package dataset-fashion-mnist not installed"
)
def test_fashion_mnist_debian_package():
    ds = load_dataset("fashion-mnist", "train", data_dir=FASHION.parent)
    assert ds.images.shape == (60000, 28, 28)
    assert np.bincount(ds.labels).tolist() == [6000] * 10
    assert "MD5-verified" in ds.description and not ds.is_subset
