"""IDX reader: real MNIST subset, round trips, and a clear DataError for every kind of malformed file."""
from __future__ import annotations

import gzip
import hashlib
import re
import struct

import numpy as np
import pytest
import torch

from freezepack import DataError
from freezepack.experiments.data import MNIST_FILES, SHIPPED_MNIST, load_mnist, parse_idx, read_idx, split_train_val


def idx_bytes(arr: np.ndarray, type_code: int = 0x08) -> bytes:
    return bytes([0, 0, type_code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes()


def test_shipped_subset_is_real_mnist_with_documented_hashes():
    assert SHIPPED_MNIST is not None
    notice = (SHIPPED_MNIST / "NOTICE.md").read_text("utf-8")
    assert "CC BY-SA 3.0" in notice and "LeCun" in notice
    for fname in MNIST_FILES.values():
        digest = hashlib.sha256((SHIPPED_MNIST / fname).read_bytes()).hexdigest()
        assert re.search(rf"{re.escape(fname)}\s*\|\s*{digest}", notice), fname
    train, test = load_mnist()
    assert train.images.shape == (8000, 1, 28, 28) and test.images.shape == (2000, 1, 28, 28)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert sorted(train.labels.unique().tolist()) == list(range(10))
    assert abs(float(train.images.mean())) < 0.05  # normalised with MNIST mean/std


def test_roundtrip_plain_and_gzip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(idx_bytes(arr))
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(idx_bytes(arr)))
    assert np.array_equal(read_idx(tmp_path / "a.idx"), arr)
    assert np.array_equal(read_idx(tmp_path / "a.idx.gz"), arr)
    big = np.array([[1, -2], [300000, 7]], dtype=">i4")
    assert parse_idx(idx_bytes(big, 0x0C)).tolist() == [[1, -2], [300000, 7]]


@pytest.mark.parametrize("raw,fact", [
    (b"\x00\x00", "too short"),
    (b"\x01\x02\x08\x01" + struct.pack(">I", 1) + b"\x00", "not an IDX file"),
    (b"\x00\x00\x42\x01" + struct.pack(">I", 1) + b"\x00", "unknown IDX data type 0x42"),
    (b"\x00\x00\x08\x00", "0 dimensions"),
    (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "truncated IDX header"),
    (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x00\x00", "truncated"),
    (b"\x00\x00\x08\x01" + struct.pack(">I", 1) + b"\x00\x00", "trailing bytes"),
    (b"\x00\x00\x0e\x03" + struct.pack(">III", 2**31, 2**31, 2), "more than the limit"),
])
def test_malformed_idx_names_file_and_fact(tmp_path, raw, fact):
    path = tmp_path / "bad.idx"
    path.write_bytes(raw)
    with pytest.raises(DataError, match=re.escape(fact)) as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_corrupt_gzip_and_missing_files(tmp_path):
    good = gzip.compress(idx_bytes(np.zeros((3, 2, 2), np.uint8)))
    (tmp_path / "cut.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="gzip"):
        read_idx(tmp_path / "cut.gz")
    with pytest.raises(DataError, match="file not found"):
        read_idx(tmp_path / "nope.gz")
    with pytest.raises(DataError, match="missing MNIST file"):
        load_mnist(tmp_path)
    with pytest.raises(DataError, match="data directory not found"):
        load_mnist(tmp_path / "nodir")


def _write_mnist(d, n_img, n_lab, label=1):
    d.mkdir()
    imgs = gzip.compress(idx_bytes(np.zeros((n_img, 28, 28), np.uint8)))
    labs = gzip.compress(idx_bytes(np.full((n_lab,), label, np.uint8)))
    for split in ("train", "t10k"):
        (d / f"{split}-images-idx3-ubyte.gz").write_bytes(imgs)
        (d / f"{split}-labels-idx1-ubyte.gz").write_bytes(labs)


def test_inconsistent_mnist_sets_are_refused(tmp_path):
    _write_mnist(tmp_path / "count", 4, 3)
    with pytest.raises(DataError, match="4 images but 3 labels"):
        load_mnist(tmp_path / "count")
    _write_mnist(tmp_path / "label", 2, 2, label=12)
    with pytest.raises(DataError, match="label 12 out of range"):
        load_mnist(tmp_path / "label")


def test_split_is_nine_to_one_disjoint_and_seeded():
    train, _ = load_mnist()
    tr, va = split_train_val(train, seed=3)
    assert (len(tr), len(va)) == (7200, 800)
    tr2, va2 = split_train_val(train, seed=3)
    assert torch.equal(va.images, va2.images)
    _, va3 = split_train_val(train, seed=4)
    assert not torch.equal(va.labels, va3.labels)
    # disjoint: every training image appears exactly once across the two parts
    flat = lambda ds: {hash(x.numpy().tobytes()) for x in ds.images}
    assert len(flat(tr) | flat(va)) == len(flat(train))
