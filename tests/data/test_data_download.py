"""download=True, exercised only against file:// URLs of locally generated files (the
``hermetic`` fixture makes any socket connection fail)."""

from __future__ import annotations

import gzip
import io
import tarfile

import numpy as np
import pytest

import l2o.data.checksums as checksums
import l2o.data.download as dl
from l2o.data import ChecksumError, CorruptDataError, DataNotFoundError, load_dataset
from l2o.data.base import writable_root
from l2o.data.checksums import OfficialDigest
from l2o.data.download import DownloadError


def _no_partials(directory):
    return not directory.exists() or not [
        p for p in directory.rglob("*") if p.name.endswith(".part")
    ]


@pytest.fixture
def mnist_mirror(tmp_path, gen, monkeypatch):
    """A file:// 'mirror' with tiny MNIST train files, registered as official."""
    mirror = tmp_path / "mirror"
    images, labels, ip, lp = gen.write_idx(mirror, n=7, dirname=".")
    table = dict(checksums.OFFICIAL["mnist"])
    for p in (ip, lp):
        raw = p.read_bytes()
        table[p.name] = OfficialDigest(gen.md5(raw), 7, gen.md5(gzip.decompress(raw)))
    monkeypatch.setitem(checksums.OFFICIAL, "mnist", table)
    missing = (tmp_path / "no-such-mirror").as_uri() + "/"
    monkeypatch.setitem(dl.MIRRORS, "mnist", [missing, mirror.as_uri() + "/"])
    return images, labels


@pytest.mark.parametrize("progress", [False, True])
def test_download_mnist_with_fallback_mirror(tmp_path, mnist_mirror, progress):
    images, labels = mnist_mirror
    dest = tmp_path / "dest"
    ds = load_dataset("mnist", data_dir=dest, download=True, progress=progress)
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert "MD5-verified" in ds.description
    assert (dest / "mnist" / "train-images-idx3-ubyte.gz").is_file()
    assert _no_partials(dest)
    # Now present: a second call loads without downloading.
    assert len(load_dataset("mnist", data_dir=dest)) == 7


def test_download_goes_to_cache_by_default(mnist_mirror, hermetic):
    load_dataset("mnist", download=True, progress=False)
    assert (hermetic.cache / "mnist" / "train-labels-idx1-ubyte.gz").is_file()


def test_download_bad_checksum_discarded(tmp_path, mnist_mirror, monkeypatch):
    table = dict(checksums.OFFICIAL["mnist"])
    table["train-images-idx3-ubyte.gz"] = OfficialDigest("0" * 32, 7, "1" * 32)
    monkeypatch.setitem(checksums.OFFICIAL, "mnist", table)
    dest = tmp_path / "dest"
    with pytest.raises(ChecksumError, match="train-images-idx3-ubyte.gz.*expected MD5 0{32}"):
        load_dataset("mnist", data_dir=dest, download=True, progress=False)
    assert not (dest / "mnist" / "train-images-idx3-ubyte.gz").exists()
    assert _no_partials(dest)


def test_download_all_mirrors_fail(tmp_path, monkeypatch):
    monkeypatch.setitem(dl.MIRRORS, "mnist", [(tmp_path / "nowhere").as_uri() + "/"])
    with pytest.raises(DownloadError) as err:
        load_dataset("mnist", data_dir=tmp_path / "dest", download=True, progress=False)
    assert isinstance(err.value, DataNotFoundError) and "nowhere" in str(err.value)
    assert _no_partials(tmp_path / "dest")


def test_network_is_blocked_in_tests(tmp_path):
    """Guard: no test can reach a real server (the hermetic fixture fails every connect)."""
    with pytest.raises(RuntimeError, match="network access is disabled"):
        dl.fetch(["http://127.0.0.1:9/x.gz"], tmp_path / "x.gz", "0" * 32, progress=False)


# ------------------------------------------------------------------------------- CIFAR archive


def _tar_gz(members: dict[str, bytes], extra=None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        if extra:
            extra(tar)
    return buf.getvalue()


def _serve_archive(tmp_path, gen, monkeypatch, archive_bytes, name="cifar-10-python.tar.gz"):
    mirror = tmp_path / "kriz"
    mirror.mkdir(exist_ok=True)
    (mirror / name).write_bytes(archive_bytes)
    monkeypatch.setitem(dl.MIRRORS, "cifar10", [mirror.as_uri()])
    monkeypatch.setitem(checksums.ARCHIVE_MD5, name, gen.md5(archive_bytes))


def test_download_cifar10_archive(tmp_path, gen, monkeypatch):
    members, expected = {}, []
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        images, labels = gen.cifar_arrays(3, seed=i)
        members[f"cifar-10-batches-py/{name}"] = gen.cifar10_pickle(images, labels)
        expected.append((images, labels))
    members["cifar-10-batches-py/batches.meta"] = b"meta"
    _serve_archive(tmp_path, gen, monkeypatch, _tar_gz(members))
    dest = tmp_path / "dest"
    ds = load_dataset("cifar10", data_dir=dest, download=True, progress=False)
    np.testing.assert_array_equal(ds.images, np.concatenate([e[0] for e in expected[:5]]))
    test = load_dataset("cifar10", "test", data_dir=dest)
    np.testing.assert_array_equal(test.labels, expected[5][1])
    assert (dest / "cifar-10-python.tar.gz").is_file()
    assert not [p for p in dest.iterdir() if p.name.startswith(".extract-")]


def test_download_cifar_bad_archive_checksum(tmp_path, gen, monkeypatch):
    _serve_archive(tmp_path, gen, monkeypatch, _tar_gz({"cifar-10-batches-py/data_batch_1": b"x"}))
    monkeypatch.setitem(checksums.ARCHIVE_MD5, "cifar-10-python.tar.gz", "f" * 32)
    dest = tmp_path / "dest"
    with pytest.raises(ChecksumError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", data_dir=dest, download=True, progress=False)
    assert not (dest / "cifar-10-python.tar.gz").exists() and _no_partials(dest)
    assert not (dest / "cifar-10-batches-py").exists()


def _symlink(tar):
    info = tarfile.TarInfo("cifar-10-batches-py/data_batch_2")
    info.type = tarfile.SYMTYPE
    info.linkname = "/etc/passwd"
    tar.addfile(info)


@pytest.mark.parametrize(
    "members, extra, bad",
    [
        ({"cifar-10-batches-py/../../evil.txt": b"x"}, None, "evil.txt"),
        ({"/tmp/l2o-evil-abs.txt": b"x"}, None, "l2o-evil-abs.txt"),
        ({"other-dir/data_batch_1": b"x"}, None, "other-dir"),
        ({"cifar-10-batches-py/data_batch_1": b"x"}, _symlink, "data_batch_2"),
    ],
    ids=["dotdot", "absolute", "outside-top", "symlink"],
)
def test_unsafe_archive_members_refused(tmp_path, gen, monkeypatch, members, extra, bad):
    _serve_archive(tmp_path, gen, monkeypatch, _tar_gz(members, extra))
    dest = tmp_path / "dest"
    with pytest.raises(CorruptDataError, match=bad):
        load_dataset("cifar10", data_dir=dest, download=True, progress=False)
    assert not (tmp_path / "evil.txt").exists() and not (dest.parent / "evil.txt").exists()
    assert not (dest / "cifar-10-batches-py" / "data_batch_1").exists()


def test_writable_root_skips_unusable(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert writable_root([a_file, tmp_path / "new" / "dir"]) == tmp_path / "new" / "dir"
    assert writable_root([tmp_path]) == tmp_path
