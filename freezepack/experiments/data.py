"""IDX (gz) data sets: the MNIST file format, read with a clear ``DataError`` for every malformed file.

IDX layout (LeCun): two zero bytes, a type byte, a dimension count byte, one big-endian uint32 per dimension,
then the row-major data in big-endian order. Files may be gzip-compressed (detected by magic, not by name).
"""
from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError

# type byte -> big-endian numpy dtype
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MAX_IDX_BYTES = 1 << 31  # refuse headers that announce absurd sizes before allocating anything

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

# The subset shipped in the repository (data/mnist-10k); None when freezepack is installed without it.
_SHIPPED = Path(__file__).resolve().parents[2] / "data" / "mnist-10k"
SHIPPED_MNIST = _SHIPPED if _SHIPPED.is_dir() else None


def parse_idx(raw: bytes, path: object = "<bytes>") -> np.ndarray:
    """Decode IDX bytes (already decompressed) into a numpy array in native byte order."""
    if len(raw) < 4:
        raise DataError(f"file is {len(raw)} bytes, too short for an IDX header", path=path)
    if raw[0] != 0 or raw[1] != 0:
        raise DataError(f"not an IDX file: magic starts with {raw[:2].hex()}, expected 0000", path=path)
    type_code, ndim = raw[2], raw[3]
    if type_code not in IDX_TYPES:
        raise DataError(f"unknown IDX data type 0x{type_code:02x} (known: "
                        + ", ".join(f"0x{k:02x}" for k in IDX_TYPES) + ")", path=path)
    if ndim == 0:
        raise DataError("IDX header declares 0 dimensions", path=path)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"truncated IDX header: {ndim} dimensions need {header} bytes, file has {len(raw)}",
                        path=path)
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_TYPES[type_code])
    expected = dtype.itemsize
    for d in dims:
        expected *= d
    if expected > MAX_IDX_BYTES:
        raise DataError(f"IDX header declares shape {dims}: {expected} bytes is more than the limit", path=path)
    have = len(raw) - header
    if have != expected:
        what = "truncated" if have < expected else "has trailing bytes"
        raise DataError(f"IDX data {what}: shape {dims} of {dtype.name} needs {expected} bytes, found {have}",
                        path=path)
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path) -> np.ndarray:
    """Read an IDX file, gzip-compressed or not."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError("file not found", path=path) from None
    except IsADirectoryError:
        raise DataError("is a directory, expected an IDX file", path=path) from None
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror}", path=path) from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"corrupt gzip stream: {e}", path=path) from None
    return parse_idx(raw, path)


@dataclass
class Dataset:
    """Images as normalised float32 (N, 1, 28, 28), labels as int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def _images_labels(images_path: Path, labels_path: Path, num_classes: int) -> Dataset:
    x = read_idx(images_path)
    y = read_idx(labels_path)
    if x.ndim != 3 or x.dtype != np.uint8:
        raise DataError(f"expected uint8 images of shape (N, rows, cols), got {x.dtype} {x.shape}",
                        path=images_path)
    if y.ndim != 1 or y.dtype != np.uint8:
        raise DataError(f"expected uint8 labels of shape (N,), got {y.dtype} {y.shape}", path=labels_path)
    if len(x) != len(y):
        raise DataError(f"{len(x)} images but {len(y)} labels in {labels_path.name}", path=images_path)
    if len(y) and int(y.max()) >= num_classes:
        raise DataError(f"label {int(y.max())} out of range 0..{num_classes - 1}", path=labels_path)
    images = torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)
    images = (images - MNIST_MEAN) / MNIST_STD
    return Dataset(images.contiguous(), torch.from_numpy(y.astype(np.int64)))


def load_mnist(directory=None) -> tuple[Dataset, Dataset]:
    """(train, test) from a directory holding the four MNIST IDX gz files (default: the shipped subset)."""
    if directory is None:
        if SHIPPED_MNIST is None:
            raise DataError("no data directory given and the shipped MNIST subset is not installed")
        directory = SHIPPED_MNIST
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError("data directory not found", path=directory)
    missing = [f for f in MNIST_FILES.values() if not (directory / f).is_file()]
    if missing:
        raise DataError(f"missing MNIST file(s): {', '.join(missing)}", path=directory)
    f = {k: directory / v for k, v in MNIST_FILES.items()}
    return (_images_labels(f["train_images"], f["train_labels"], 10),
            _images_labels(f["test_images"], f["test_labels"], 10))


def split_train_val(train: Dataset, seed: int, val_fraction: float = 0.1) -> tuple[Dataset, Dataset]:
    """The paper's 9/1 train/validation split, a deterministic permutation per seed."""
    n = len(train)
    n_val = int(round(n * val_fraction))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    va, tr = perm[:n_val], perm[n_val:]
    return Dataset(train.images[tr], train.labels[tr]), Dataset(train.images[va], train.labels[va])
