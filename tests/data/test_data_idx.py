"""IDX (MNIST / Fashion-MNIST): round trips, structural rejection, and the MD5 rule."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

import l2o.data.checksums as checksums
from l2o.data import ChecksumError, CorruptDataError, load_dataset
from l2o.data.checksums import OfficialDigest


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("split", ["train", "test"])
def test_round_trip(tmp_path, gen, gz, split):
    images, labels, ip, lp = gen.write_idx(tmp_path, split=split, n=17, gz=gz)
    ds = load_dataset("mnist", split, data_dir=tmp_path)
    assert ds.name == "mnist" and ds.split == split and ds.num_classes == 10
    assert ds.images.dtype == np.uint8 and ds.images.shape == (17, 28, 28)
    assert ds.labels.dtype == np.int64
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.is_subset  # 17 < official count
    assert ds.files == ((str(ip), gen.sha256_file(ip)), (str(lp), gen.sha256_file(lp)))
    assert str(tmp_path / "mnist") in ds.description and "subset" in ds.description
    assert "structurally verified" in ds.description


def test_fashion_mnist_round_trip(tmp_path, gen):
    images, labels, *_ = gen.write_idx(tmp_path, dirname="fashion-mnist", n=5)
    ds = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert ds.name == "fashion-mnist" and "Fashion-MNIST" in ds.description
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)


def test_gz_preferred_over_uncompressed(tmp_path, gen):
    images, labels, *_ = gen.write_idx(tmp_path, n=4, gz=True, seed=1)
    gen.write_idx(tmp_path, n=6, gz=False, seed=2)
    ds = load_dataset("mnist", data_dir=tmp_path)
    np.testing.assert_array_equal(ds.images, images)


def _expect_corrupt(tmp_path, bad_name):
    with pytest.raises(CorruptDataError) as err:
        load_dataset("mnist", data_dir=tmp_path)
    assert bad_name in str(err.value)
    return str(err.value)


def test_bad_image_magic(tmp_path, gen):
    imgs = np.zeros((3, 28, 28), np.uint8)
    gen.write_idx(tmp_path, n=3, images_bytes=gen.idx_images(imgs, magic=2049))
    assert "magic" in _expect_corrupt(tmp_path, "train-images-idx3-ubyte.gz")


def test_bad_label_magic(tmp_path, gen):
    gen.write_idx(tmp_path, n=3, labels_bytes=gen.idx_labels(np.zeros(3), magic=2051))
    assert "magic" in _expect_corrupt(tmp_path, "train-labels-idx1-ubyte.gz")


def test_truncated_payload(tmp_path, gen):
    payload = gen.idx_images(np.zeros((3, 28, 28), np.uint8))[:-5]
    gen.write_idx(tmp_path, n=3, images_bytes=payload)
    assert "truncated" in _expect_corrupt(tmp_path, "train-images-idx3-ubyte.gz")


def test_trailing_data(tmp_path, gen):
    payload = gen.idx_labels(np.zeros(3)) + b"\x00"
    gen.write_idx(tmp_path, n=3, labels_bytes=payload)
    assert "trailing" in _expect_corrupt(tmp_path, "train-labels-idx1-ubyte.gz")


def test_short_header(tmp_path, gen):
    gen.write_idx(tmp_path, n=3, labels_bytes=b"\x00\x00\x08")
    _expect_corrupt(tmp_path, "train-labels-idx1-ubyte.gz")


def test_truncated_gzip(tmp_path, gen):
    _, _, ip, _ = gen.write_idx(tmp_path, n=50)
    data = ip.read_bytes()
    ip.write_bytes(data[: len(data) // 2])
    msg = _expect_corrupt(tmp_path, "train-images-idx3-ubyte.gz")
    assert "gzip" in msg


def test_not_gzip(tmp_path, gen):
    _, _, ip, _ = gen.write_idx(tmp_path, n=3)
    ip.write_bytes(b"this is not gzip data at all")
    _expect_corrupt(tmp_path, "train-images-idx3-ubyte.gz")


def test_label_out_of_range(tmp_path, gen):
    gen.write_idx(tmp_path, n=3, labels_bytes=gen.idx_labels(np.array([1, 10, 2])))
    msg = _expect_corrupt(tmp_path, "train-labels-idx1-ubyte.gz")
    assert "out of range" in msg


def test_count_mismatch(tmp_path, gen):
    gen.write_idx(tmp_path, n=3, labels_bytes=gen.idx_labels(np.array([1, 2])))
    msg = _expect_corrupt(tmp_path, "train-labels-idx1-ubyte.gz")
    assert "3 images" in msg and "2 labels" in msg


# ------------------------------------------------------------------------------ MD5 rule


def _patch_official(monkeypatch, gen, dirname, ip, lp, records):
    """Make the generated files 'official': their digests and counts go into the table."""
    table = dict(checksums.OFFICIAL[dirname])
    for path in (ip, lp):
        gz = path.read_bytes()
        table[path.name] = OfficialDigest(gen.md5(gz), records, gen.md5(gzip.decompress(gz)))
    monkeypatch.setitem(checksums.OFFICIAL, dirname, table)


def test_md5_verified_and_tampering_detected(tmp_path, gen, monkeypatch):
    images, labels, ip, lp = gen.write_idx(tmp_path, n=8)
    _patch_official(monkeypatch, gen, "mnist", ip, lp, records=8)
    ds = load_dataset("mnist", data_dir=tmp_path)
    assert "MD5-verified" in ds.description
    np.testing.assert_array_equal(ds.images, images)

    # Recompressed with other settings: gzip bytes differ, content identical -> still accepted.
    content = gzip.decompress(ip.read_bytes())
    ip.write_bytes(gzip.compress(content, compresslevel=1, mtime=12345))
    assert "MD5-verified" in load_dataset("mnist", data_dir=tmp_path).description

    # One pixel changed: structurally fine, same size, but neither digest matches.
    tampered = bytearray(content)
    tampered[100] ^= 0xFF
    ip.write_bytes(gzip.compress(bytes(tampered), mtime=0))
    with pytest.raises(ChecksumError) as err:
        load_dataset("mnist", data_dir=tmp_path)
    msg = str(err.value)
    assert str(ip) in msg
    expected = checksums.OFFICIAL["mnist"][ip.name]
    assert expected.md5 in msg and expected.content_md5 in msg
    assert gen.md5(ip.read_bytes()) in msg and gen.md5(bytes(tampered)) in msg


def test_md5_uncompressed_copy(tmp_path, gen, monkeypatch):
    _, _, ip, lp = gen.write_idx(tmp_path, n=8)
    _patch_official(monkeypatch, gen, "mnist", ip, lp, records=8)
    raw_dir = tmp_path / "raw"
    (raw_dir / "mnist").mkdir(parents=True)
    for p in (ip, lp):
        (raw_dir / "mnist" / p.name[:-3]).write_bytes(gzip.decompress(p.read_bytes()))
    assert "MD5-verified" in load_dataset("mnist", data_dir=raw_dir).description
    lbl = raw_dir / "mnist" / lp.name[:-3]
    data = bytearray(lbl.read_bytes())
    data[-1] = (data[-1] + 1) % 10
    lbl.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="train-labels-idx1-ubyte"):
        load_dataset("mnist", data_dir=raw_dir)


def test_md5_not_applied_below_official_count(tmp_path, gen, monkeypatch):
    """A file named like an official one but holding fewer records is a subset: structural only."""
    _, _, ip, lp = gen.write_idx(tmp_path, n=8)
    _patch_official(monkeypatch, gen, "mnist", ip, lp, records=9)
    ds = load_dataset("mnist", data_dir=tmp_path)
    assert ds.is_subset and "structurally verified" in ds.description


def test_real_table_rejects_fake_full_size_labels(tmp_path, gen):
    """With the real table: a generated full-size (10000) t10k file cannot pass as official."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=10000)
    images = np.zeros((10000, 28, 28), np.uint8)
    gen.write_idx(
        tmp_path,
        split="test",
        n=10000,
        images_bytes=gen.idx_images(images),
        labels_bytes=gen.idx_labels(labels),
    )
    with pytest.raises(ChecksumError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("mnist", "test", data_dir=tmp_path)
