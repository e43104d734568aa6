"""FER2013 CSV and TFD .mat: round trips, rejection of bad files, and the "faces" resolution."""

from __future__ import annotations

import numpy as np
import pytest

import l2o.data.checksums as checksums
from l2o.data import ChecksumError, CorruptDataError, DataNotFoundError, load_dataset
from l2o.data.checksums import OfficialDigest


def _expected(rows, usages):
    sel = [(e, img) for e, img, u in rows if u in usages]
    return np.stack([img for _, img in sel]), np.array([e for e, _ in sel], dtype=np.int64)


def test_fer_round_trip(tmp_path, gen):
    rows = gen.fer_rows(n_train=6, n_public=3, n_private=2)
    path = gen.write_fer(tmp_path, rows)
    train = load_dataset("fer2013", "train", data_dir=tmp_path)
    images, labels = _expected(rows, {"Training"})
    assert train.name == "fer2013" and train.num_classes == 7 and train.images.shape == (6, 48, 48)
    np.testing.assert_array_equal(train.images, images)
    np.testing.assert_array_equal(train.labels, labels)
    assert train.is_subset and str(path) in train.description
    assert train.files == ((str(path), gen.sha256_file(path)),)
    test = load_dataset("fer2013", "test", data_dir=tmp_path)
    images, labels = _expected(rows, {"PublicTest", "PrivateTest"})
    np.testing.assert_array_equal(test.images, images)
    np.testing.assert_array_equal(test.labels, labels)


def test_fer_crlf_quoted_and_bom(tmp_path, gen):
    rows = gen.fer_rows(n_train=3, n_public=0, n_private=0)
    text = gen.fer_csv(rows).decode().replace("\n", "\r\n")
    lines = text.split("\r\n")
    lines[1:] = [
        ",".join([ln.split(",")[0], '"' + ln.split(",")[1] + '"', ln.split(",")[2]]) if ln else ln
        for ln in lines[1:]
    ]
    gen.write_fer(tmp_path, raw=b"\xef\xbb\xbf" + "\r\n".join(lines).encode())
    ds = load_dataset("fer2013", data_dir=tmp_path)
    np.testing.assert_array_equal(ds.images, _expected(rows, {"Training"})[0])


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda t: t.replace("emotion,pixels,Usage", "label,pixels,Usage"), "bad header"),
        (lambda t: t.replace(",Training", ",Validation", 1), "unknown Usage"),
        (
            lambda t: "\n".join([t.split("\n")[0], "7" + t.split("\n")[1][1:], *t.split("\n")[2:]]),
            "emotion",
        ),
        (
            lambda t: t.replace(" ", "  ", 3).replace(",Training", " 17,Training", 1),
            "2305 pixel values",
        ),
        (lambda t: t.replace(",Training", ",x,Training", 1), "columns"),
        (lambda t: t.replace("255", "256", 1), "above 255"),
        (lambda t: t.replace(" 255", " 2a5", 1), "other than digits"),
    ],
    ids=["header", "usage", "emotion", "pixel-count", "columns", "range", "chars"],
)
def test_fer_corrupt(tmp_path, gen, mutate, match):
    text = gen.fer_csv(gen.fer_rows(n_train=4, n_public=0, n_private=0)).decode()
    path = gen.write_fer(tmp_path, raw=mutate(text).encode())
    with pytest.raises(CorruptDataError, match=match) as err:
        load_dataset("fer2013", data_dir=tmp_path)
    assert str(path) in str(err.value)


def test_fer_short_row_detected_even_when_total_matches(tmp_path, gen):
    rows = gen.fer_rows(n_train=2, n_public=0, n_private=0)
    lines = gen.fer_csv(rows).decode().strip().split("\n")
    # move one value from row 1 to row 2: the total count is right, the rows are not
    e1, p1, u1 = lines[1].split(",")
    e2, p2, u2 = lines[2].split(",")
    vals = p1.split()
    lines[1] = f"{e1},{' '.join(vals[:-1])},{u1}"
    lines[2] = f"{e2},{vals[-1]} {p2},{u2}"
    gen.write_fer(tmp_path, raw=("\n".join(lines) + "\n").encode())
    with pytest.raises(CorruptDataError, match="line 2 has 2303 pixel values"):
        load_dataset("fer2013", data_dir=tmp_path)


def test_fer_split_absent_is_not_found(tmp_path, gen):
    gen.write_fer(tmp_path, gen.fer_rows(n_train=3, n_public=0, n_private=0))
    with pytest.raises(DataNotFoundError, match="no rows with Usage PublicTest"):
        load_dataset("fer2013", "test", data_dir=tmp_path)


def test_fer_md5_rule(tmp_path, gen, monkeypatch):
    raw = gen.fer_csv(gen.fer_rows(n_train=3, n_public=1, n_private=1))
    path = gen.write_fer(tmp_path, raw=raw)
    monkeypatch.setitem(
        checksums.OFFICIAL, "fer2013", {"fer2013.csv": OfficialDigest(gen.md5(raw), 5)}
    )
    assert "MD5-verified" in load_dataset("fer2013", data_dir=tmp_path).description
    tampered = raw.replace(b" 255", b" 254", 1)
    path.write_bytes(tampered)
    with pytest.raises(ChecksumError) as err:
        load_dataset("fer2013", data_dir=tmp_path)
    assert str(path) in str(err.value) and gen.md5(tampered) in str(err.value)


def test_fer_cannot_download(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("fer2013", data_dir=tmp_path, download=True)
    msg = str(err.value)
    assert "challenges-in-representation-learning-facial-expression-recognition-challenge" in msg
    assert str(tmp_path / "fer2013" / "fer2013.csv") in msg


# ------------------------------------------------------------------------------------ TFD


def test_tfd_round_trip(tmp_path, gen):
    path, f = gen.write_tfd(tmp_path, n=30)
    labs, fold0 = f["labs_ex"].ravel(), f["folds"][:, 0]
    for split, mask in (
        ("train", (labs > 0) & np.isin(fold0, [1, 2])),
        ("test", (labs > 0) & (fold0 == 3)),
    ):
        ds = load_dataset("tfd", split, data_dir=tmp_path)
        assert ds.name == "tfd" and ds.num_classes == 7 and not ds.is_subset
        np.testing.assert_array_equal(ds.images, f["images"][mask])
        np.testing.assert_array_equal(ds.labels, labs[mask] - 1)
        assert ds.files == ((str(path), gen.sha256_file(path)),)


@pytest.mark.parametrize(
    "override, match",
    [
        ({"labs_ex": np.full((10, 1), 8)}, "labs_ex"),
        ({"folds": np.full((10, 5), 4)}, "folds"),
        ({"images": np.zeros((10, 32, 32), np.uint8)}, "shape"),
        ({"folds": np.ones((9, 5))}, "folds"),
    ],
)
def test_tfd_corrupt(tmp_path, gen, override, match):
    path, _ = gen.write_tfd(tmp_path, n=10, **override)
    with pytest.raises(CorruptDataError, match=match) as err:
        load_dataset("tfd", data_dir=tmp_path)
    assert str(path) in str(err.value)


def test_tfd_not_a_mat_file(tmp_path):
    path = tmp_path / "tfd" / "TFD_48x48.mat"
    path.parent.mkdir()
    path.write_bytes(b"not matlab")
    with pytest.raises(CorruptDataError, match="TFD_48x48.mat"):
        load_dataset("tfd", data_dir=tmp_path)


def test_faces_prefers_tfd_anywhere(tmp_path, gen, monkeypatch):
    fer_root, tfd_root = tmp_path / "a", tmp_path / "b"
    gen.write_fer(fer_root)
    gen.write_tfd(tfd_root, n=30)
    monkeypatch.setenv("L2O_DATA_DIR", str(tfd_root))
    ds = load_dataset("faces", data_dir=fer_root)  # FER in an earlier root, TFD in a later one
    assert ds.name == "tfd"


def test_faces_falls_back_to_fer(tmp_path, gen):
    gen.write_fer(tmp_path, gen.fer_rows(n_train=5))
    ds = load_dataset("faces", data_dir=tmp_path)
    assert ds.name == "fer2013" and "FER2013 (5-image TFD stand-in)" in ds.description


def test_faces_not_found_names_both(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("faces", data_dir=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "tfd" / "TFD_48x48.mat") in msg
    assert str(tmp_path / "fer2013" / "fer2013.csv") in msg and "licence" in msg
