"""CIFAR-10/100 in binary and python formats: round trips, partial directories, structural
rejection, the restricted unpickler, and the MD5 rule for the python files."""

from __future__ import annotations

import builtins
import os
import pickle

import numpy as np
import pytest

import l2o.data.checksums as checksums
from l2o.data import ChecksumError, CorruptDataError, load_dataset
from l2o.data.checksums import OfficialDigest

BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


def _write_cifar10(root, gen, fmt, names, n=6, protocol=2):
    """Write the named batches; returns {name: (images, labels)}."""
    d = root / ("cifar-10-batches-bin" if fmt == "bin" else "cifar-10-batches-py")
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for seed, name in enumerate(names):
        images, labels = gen.cifar_arrays(n, seed=seed)
        if fmt == "bin":
            (d / f"{name}.bin").write_bytes(gen.cifar10_binary(images, labels))
        else:
            (d / name).write_bytes(gen.cifar10_pickle(images, labels, protocol=protocol))
        out[name] = (images, labels)
    return out


@pytest.mark.parametrize("fmt", ["bin", "py"])
def test_cifar10_round_trip(tmp_path, gen, fmt):
    written = _write_cifar10(tmp_path, gen, fmt, BATCHES + ["test_batch"], n=6)
    train = load_dataset("cifar10", "train", data_dir=tmp_path)
    assert train.images.shape == (30, 3, 32, 32) and train.images.dtype == np.uint8
    np.testing.assert_array_equal(train.images, np.concatenate([written[b][0] for b in BATCHES]))
    np.testing.assert_array_equal(train.labels, np.concatenate([written[b][1] for b in BATCHES]))
    assert train.num_classes == 10 and train.is_subset  # 30 < 50000
    assert len(train.files) == 5
    test = load_dataset("cifar10", "test", data_dir=tmp_path)
    np.testing.assert_array_equal(test.images, written["test_batch"][0])
    np.testing.assert_array_equal(test.labels, written["test_batch"][1])


def test_cifar10_missing_batches_loads_subset(tmp_path, gen):
    written = _write_cifar10(tmp_path, gen, "bin", ["data_batch_1", "data_batch_3"], n=4)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert len(ds) == 8 and ds.is_subset
    np.testing.assert_array_equal(
        ds.labels, np.concatenate([written["data_batch_1"][1], written["data_batch_3"][1]])
    )
    assert "data_batch_1.bin, data_batch_3.bin only" in ds.description
    assert "missing data_batch_2.bin, data_batch_4.bin, data_batch_5.bin" in ds.description
    assert [os.path.basename(p) for p, _ in ds.files] == ["data_batch_1.bin", "data_batch_3.bin"]


def test_python_version_preferred(tmp_path, gen):
    py = _write_cifar10(tmp_path, gen, "py", ["data_batch_1"], n=3)
    _write_cifar10(tmp_path, gen, "bin", ["data_batch_2"], n=5)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    np.testing.assert_array_equal(ds.images, py["data_batch_1"][0])


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_python_protocols(tmp_path, gen, protocol):
    written = _write_cifar10(tmp_path, gen, "py", ["data_batch_2"], n=5, protocol=protocol)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    np.testing.assert_array_equal(ds.images, written["data_batch_2"][0])


@pytest.mark.parametrize("fmt", ["bin", "py"])
def test_cifar100_fine_and_coarse(tmp_path, gen, fmt):
    images, fine = gen.cifar_arrays(9, classes=100, seed=3)
    coarse = fine // 5
    if fmt == "bin":
        d = tmp_path / "cifar-100-binary"
        d.mkdir()
        (d / "train.bin").write_bytes(gen.cifar100_binary(images, coarse, fine))
    else:
        d = tmp_path / "cifar-100-python"
        d.mkdir()
        (d / "train").write_bytes(gen.cifar100_pickle(images, coarse, fine))
    ds = load_dataset("cifar100", data_dir=tmp_path)
    assert ds.name == "cifar100" and ds.num_classes == 100
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, fine)
    ds = load_dataset("cifar100-coarse", data_dir=tmp_path)
    assert ds.name == "cifar100-coarse" and ds.num_classes == 20
    np.testing.assert_array_equal(ds.labels, coarse)


def test_record_size_mismatch(tmp_path, gen):
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    images, labels = gen.cifar_arrays(2)
    (d / "data_batch_1.bin").write_bytes(gen.cifar10_binary(images, labels)[:-1])
    with pytest.raises(CorruptDataError, match="data_batch_1.bin.*record size"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_cifar100_binary_is_not_cifar10(tmp_path, gen):
    """A CIFAR-100 record (3074 bytes) in a CIFAR-10 directory breaks the record size check."""
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    images, fine = gen.cifar_arrays(3, classes=100)
    (d / "data_batch_1.bin").write_bytes(gen.cifar100_binary(images, fine // 5, fine))
    with pytest.raises(CorruptDataError, match="record size"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_binary_label_out_of_range(tmp_path, gen):
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    images, labels = gen.cifar_arrays(3)
    labels[1] = 10
    (d / "data_batch_1.bin").write_bytes(gen.cifar10_binary(images, labels))
    with pytest.raises(CorruptDataError, match=r"data_batch_1.bin.*label 10 at record 1"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_cifar100_fine_label_out_of_range(tmp_path, gen):
    d = tmp_path / "cifar-100-binary"
    d.mkdir()
    images, fine = gen.cifar_arrays(3, classes=100)
    fine[2] = 100
    (d / "train.bin").write_bytes(gen.cifar100_binary(images, np.zeros(3, np.int64), fine))
    with pytest.raises(CorruptDataError, match="train.bin.*fine label 100"):
        load_dataset("cifar100", data_dir=tmp_path)


def test_python_label_out_of_range_and_bad_structure(tmp_path, gen):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    images, labels = gen.cifar_arrays(3)
    labels[0] = 12
    (d / "data_batch_1").write_bytes(gen.cifar10_pickle(images, labels))
    with pytest.raises(CorruptDataError, match="data_batch_1.*out of range"):
        load_dataset("cifar10", data_dir=tmp_path)
    (d / "data_batch_1").write_bytes(
        pickle.dumps({b"data": images.reshape(3, -1), b"labels": [1, 2]})
    )
    with pytest.raises(CorruptDataError, match="3 images but 2"):
        load_dataset("cifar10", data_dir=tmp_path)
    (d / "data_batch_1").write_bytes(
        pickle.dumps({b"data": images.reshape(3, 3, -1), b"labels": [1, 2, 3]})
    )
    with pytest.raises(CorruptDataError, match="shape"):
        load_dataset("cifar10", data_dir=tmp_path)
    (d / "data_batch_1").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(CorruptDataError, match="dict"):
        load_dataset("cifar10", data_dir=tmp_path)
    (d / "data_batch_1").write_bytes(b"\x80\x02garbage")
    with pytest.raises(CorruptDataError, match="data_batch_1"):
        load_dataset("cifar10", data_dir=tmp_path)


# --------------------------------------------------------------------------- malicious pickles


class _SystemCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.eval, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("payload_cls", [_SystemCall, _EvalCall])
@pytest.mark.parametrize("where", ["top", "labels", "inside_data"])
def test_malicious_pickle_refused(tmp_path, gen, payload_cls, where):
    marker = tmp_path / "PWNED"
    evil = payload_cls(marker)
    images, labels = gen.cifar_arrays(2)
    if where == "top":
        obj = evil
    elif where == "labels":
        obj = {b"data": images.reshape(2, -1), b"labels": [0, evil]}
    else:
        obj = {b"labels": [0, 1], b"data": evil}
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "data_batch_1").write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(CorruptDataError) as err:
        load_dataset("cifar10", data_dir=tmp_path)
    assert "data_batch_1" in str(err.value) and "refusing" in str(err.value)
    assert not marker.exists()


def test_malicious_pickle_codecs_abuse_refused(tmp_path):
    """The _codecs.encode stand-in only does latin-1."""
    from l2o.data.cifar import safe_unpickle

    data = b"c_codecs\nencode\n(Vabc\nVrot13\ntR."
    with pytest.raises(CorruptDataError, match="refusing"):
        safe_unpickle(data, tmp_path / "x")


# --------------------------------------------------------------------------- MD5 rule


def test_python_md5_verified_and_tampering_detected(tmp_path, gen, monkeypatch):
    images, labels = gen.cifar_arrays(4)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    path = d / "data_batch_1"
    data = gen.cifar10_pickle(images, labels, protocol=4)
    path.write_bytes(data)
    table = dict(checksums.OFFICIAL["cifar-10-batches-py"])
    table["data_batch_1"] = OfficialDigest(gen.md5(data), 4)
    monkeypatch.setitem(checksums.OFFICIAL, "cifar-10-batches-py", table)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert "MD5-verified" in ds.description and ds.is_subset

    tampered = bytearray(data)
    tampered[data.find(images.tobytes()) + 10] ^= 0x01  # one pixel: still a valid pickle
    path.write_bytes(bytes(tampered))
    with pytest.raises(ChecksumError) as err:
        load_dataset("cifar10", data_dir=tmp_path)
    msg = str(err.value)
    assert str(path) in msg and gen.md5(data) in msg and gen.md5(bytes(tampered)) in msg


def test_real_table_rejects_fake_full_size_batch(tmp_path, gen):
    """With the real table: a generated 10000-image data_batch_1 cannot pass as official."""
    images = np.zeros((10000, 3, 32, 32), np.uint8)
    labels = np.arange(10000) % 10
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "data_batch_1").write_bytes(gen.cifar10_pickle(images, labels))
    with pytest.raises(ChecksumError, match="c99cafc152244af753f735de768cd75f"):
        load_dataset("cifar10", data_dir=tmp_path)


@pytest.mark.parametrize("payload_cls", [_SystemCall, _EvalCall])
def test_malicious_payload_is_live_control(tmp_path, payload_cls):
    """Control: the same payload does run under plain pickle, so the refusal above is meaningful."""
    marker = tmp_path / "CONTROL"
    pickle.loads(pickle.dumps(payload_cls(marker), protocol=2))
    assert marker.exists()
