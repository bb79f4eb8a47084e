"""Fake dataset files in the real formats (MNIST IDX, CIFAR-10 python batches), written by tests."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

from reference.data import CIFAR10_FILES, MNIST_FILES

__all__ = ["idx_bytes", "make_cifar", "make_mnist", "write_idx"]


def idx_bytes(arr: np.ndarray, type_code: int = 0x08) -> bytes:
    """IDX: 0x00 0x00, type code, ndim, big-endian uint32 dims, big-endian data."""
    dt = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[type_code]
    header = bytes([0, 0, type_code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + np.ascontiguousarray(arr, dtype=dt).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool = False, type_code: int = 0x08) -> Path:
    data = idx_bytes(arr, type_code)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_mnist(root: Path, n_train: int = 12, n_test: int = 6, gz: bool = False, seed: int = 0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, size=n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }
    paths = {k: write_idx(root / MNIST_FILES[k], a, gz=gz) for k, a in arrays.items()}
    return arrays, paths


def make_cifar(folder: Path, n: int = 3, protocol: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    batches_ = {}
    for name in CIFAR10_FILES:
        d = {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, size=n)],
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(d, protocol=protocol))
        batches_[name] = d
    return batches_
