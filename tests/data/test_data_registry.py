"""Names, splits, search order, not-found messages, the Dataset record, and sklearn digits."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

import l2o.data as data
from l2o.data import DataNotFoundError, Dataset, data_search_path, dataset_names, load_dataset


def test_public_api():
    for name in (
        "Dataset",
        "DatasetError",
        "DataNotFoundError",
        "ChecksumError",
        "CorruptDataError",
        "load_dataset",
        "dataset_names",
        "data_search_path",
    ):
        assert hasattr(data, name)
    for err in (data.DataNotFoundError, data.ChecksumError, data.CorruptDataError):
        assert issubclass(err, data.DatasetError)
    assert [f.name for f in dataclasses.fields(Dataset)] == [
        "name",
        "images",
        "labels",
        "num_classes",
        "split",
        "description",
        "is_subset",
        "files",
    ]


def test_dataset_names():
    names = dataset_names()
    assert set(names) == {
        "mnist",
        "fashion-mnist",
        "cifar10",
        "cifar100",
        "cifar100-coarse",
        "fer2013",
        "tfd",
        "faces",
        "digits",
    }


def test_unknown_name_and_split():
    with pytest.raises(ValueError, match="valid names: .*cifar10.*mnist"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="valid splits: 'train', 'test'"):
        load_dataset("mnist", "validation")
    with pytest.raises(ValueError, match="valid splits: 'train'"):
        load_dataset("digits", "test")


def test_aliases(tmp_path, gen):
    gen.write_idx(tmp_path, dirname="fashion-mnist", n=3)
    assert load_dataset("Fashion_MNIST", data_dir=tmp_path).name == "fashion-mnist"


def test_digits():
    ds = load_dataset("digits")
    assert ds.name == "digits" and ds.split == "train" and len(ds) == 1797
    assert ds.images.shape == (1797, 8, 8) and ds.images.dtype == np.uint8
    assert ds.images.max() == 255 and ds.images.min() == 0
    assert ds.labels.dtype == np.int64 and set(np.unique(ds.labels)) == set(range(10))
    assert "1797" in ds.description and not ds.is_subset and ds.files == ()


def test_search_path_order(tmp_path, hermetic, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("L2O_DATA_DIR", os.pathsep.join([str(a), "", str(b)]))
    roots = data_search_path(tmp_path / "explicit")
    assert roots == [tmp_path / "explicit", a, b, hermetic.cache, hermetic.system]
    assert data_search_path()[0] == a


def test_search_order_precedence(tmp_path, gen, hermetic, monkeypatch):
    explicit, env = tmp_path / "explicit", tmp_path / "env"
    gen.write_idx(hermetic.system, n=5)
    assert len(load_dataset("mnist")) == 5
    gen.write_idx(hermetic.cache, n=4)
    assert len(load_dataset("mnist")) == 4
    gen.write_idx(env, n=3)
    monkeypatch.setenv("L2O_DATA_DIR", str(env))
    assert len(load_dataset("mnist")) == 3
    gen.write_idx(explicit, n=2)
    assert len(load_dataset("mnist", data_dir=explicit)) == 2


def test_incomplete_root_is_skipped(tmp_path, gen, hermetic):
    """A root with only the image file of a split does not count; the next root is used."""
    _, _, _, lp = gen.write_idx(tmp_path, n=2)
    lp.unlink()
    gen.write_idx(hermetic.cache, n=6)
    assert len(load_dataset("mnist", data_dir=tmp_path)) == 6


def test_not_found_lists_expected_paths(tmp_path, hermetic):
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("mnist", "test", data_dir=tmp_path)
    msg = str(err.value)
    for root in (tmp_path, hermetic.cache, hermetic.system):
        assert str(root / "mnist" / "t10k-images-idx3-ubyte.gz") in msg
        assert str(root / "mnist" / "t10k-labels-idx1-ubyte.gz") in msg
    assert "yann.lecun.com" in msg and "download=True" in msg


def test_cifar_not_found_lists_both_layouts(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("cifar100", data_dir=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "cifar-100-python") in msg and str(tmp_path / "cifar-100-binary") in msg


def test_dataset_record_validation():
    images, labels = np.zeros((2, 4, 4), np.uint8), np.array([0, 1], np.int64)
    kw = dict(name="x", num_classes=2, split="train", description="d", is_subset=False, files=())
    ds = Dataset(images=images, labels=labels, **kw)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.name = "y"  # type: ignore[misc]
    assert "uint8(2, 4, 4)" in repr(ds)
    with pytest.raises(ValueError):
        Dataset(images=images.astype(np.float32), labels=labels, **kw)
    with pytest.raises(ValueError):
        Dataset(images=images, labels=labels.astype(np.int32), **kw)
    with pytest.raises(ValueError):
        Dataset(images=images, labels=np.array([0, 2]), **kw)
    with pytest.raises(ValueError):
        Dataset(images=images, labels=labels[:1], **kw)
    with pytest.raises(ValueError):
        Dataset(images=images, labels=labels, **{**kw, "split": "valid"})
