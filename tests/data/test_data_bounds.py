"""Hostile data files are refused with bounded memory: gzip bombs (honest or lying trailer) and
CIFAR python pickles built from nested shared references or absurd memo indices."""

from __future__ import annotations

import gzip
import pickle
import tracemalloc

import numpy as np
import pytest

from l2o.data import idx
from l2o.data.base import CorruptDataError
from l2o.data.cifar import parse_python

MiB = 2**20


def _peak(fn) -> int:
    """Peak bytes traced (Python and NumPy allocations) while ``fn`` runs."""
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def _refused(fn, match: str) -> int:
    def run() -> None:
        with pytest.raises(CorruptDataError, match=match):
            fn()
    return _peak(run)


def test_gzip_round_trip_and_multi_member(tmp_path):
    a, b = b"x" * 1000, b"y" * 500
    assert idx.gunzip_bounded(gzip.compress(a), tmp_path / "f.gz") == a
    assert idx.gunzip_bounded(gzip.compress(a) + gzip.compress(b), tmp_path / "f.gz") == a + b
    with pytest.raises(CorruptDataError, match="truncated"):
        idx.gunzip_bounded(gzip.compress(a)[:-10], tmp_path / "f.gz")
    with pytest.raises(CorruptDataError, match="not a gzip file"):
        idx.gunzip_bounded(b"plain text, long enough", tmp_path / "f.gz")


def test_gzip_bomb_is_refused_from_its_trailer_without_decompressing(tmp_path, monkeypatch):
    monkeypatch.setattr(idx, "MAX_DECOMPRESSED", 4 * MiB)
    bomb = tmp_path / "train-images-idx3-ubyte.gz"
    bomb.write_bytes(gzip.compress(bytes(64 * MiB), compresslevel=9))  # ~64 KB on disk
    peak = _refused(lambda: idx.read_idx_file(bomb), "trailer says it decompresses to 67108864 bytes")
    assert peak < 2 * MiB


def test_gzip_bomb_with_a_lying_trailer_is_cut_at_the_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(idx, "MAX_DECOMPRESSED", 4 * MiB)
    raw = bytearray(gzip.compress(bytes(64 * MiB), compresslevel=9))
    raw[-4:] = (1000).to_bytes(4, "little")  # claims 1000 bytes
    bomb = tmp_path / "train-images-idx3-ubyte.gz"
    bomb.write_bytes(bytes(raw))
    peak = _refused(lambda: idx.read_idx_file(bomb), "more than the 4194304 bytes allowed")
    assert peak < 3 * 4 * MiB  # the cap (plus copies of it), not the 64 MiB


def _cifar(labels, n: int = 10) -> bytes:
    return pickle.dumps({b"data": np.zeros((n, 3072), np.uint8), b"labels": labels}, protocol=2)


def test_shared_reference_bomb_in_labels_is_refused_with_bounded_memory(tmp_path):
    nested: list = [0] * 10
    for _ in range(6):  # 10**7 ints once expanded (80 MB as int64), a few hundred bytes pickled
        nested = [nested] * 10
    data = _cifar(nested[:10])
    assert len(data) < 40_000
    peak = _refused(lambda: parse_python(data, tmp_path / "data_batch_1", (("labels", 10),), 0),
                    "'labels' must be a list of integers")
    assert peak < 4 * MiB


def test_legitimate_labels_still_load(tmp_path):
    images, labels = parse_python(_cifar(list(range(10))), tmp_path / "b", (("labels", 10),), 0)
    assert images.shape == (10, 3, 32, 32) and labels.tolist() == list(range(10))
    with pytest.raises(CorruptDataError, match="10 images but 9 entries"):
        parse_python(_cifar(list(range(9))), tmp_path / "b", (("labels", 10),), 0)
    with pytest.raises(CorruptDataError, match="must be a list of integers"):
        parse_python(_cifar([0] * 9 + [True]), tmp_path / "b", (("labels", 10),), 0)


def test_huge_memo_index_is_refused_before_unpickling(tmp_path):
    # PROTO 2, EMPTY_DICT, LONG_BINPUT 0xFFFFFFF0, STOP: the C unpickler would size its memo by it.
    data = b"\x80\x02}r\xf0\xff\xff\xff."
    peak = _refused(lambda: parse_python(data, tmp_path / "b", (("labels", 10),), 0), "memo slot 4294967280")
    assert peak < MiB
