"""Datasets: MNIST-1D and scikit-learn's digits (offline), MNIST IDX files and CIFAR-10 python batches.

Every loader returns a :class:`Dataset` of float32 inputs and int64 labels, standardised with statistics
of its **own training split** only (the test split never leaks into them):

- ``digits``: per-feature (per-pixel) mean and std; std floored at ``1.0`` (one of the 16 intensity
  levels). Four border pixels are constant in the training split and some are almost never lit, so an
  unfloored std would divide by 0 or turn a rare stroke into a 100-sigma input.
- ``mnist1d``: per-feature mean and std; std floored at ``1e-2`` (the features are continuous with std
  near 1, the floor only guards the division).
- ``mnist``: pixels scaled to [0, 1], then one scalar mean/std (≈ 0.1307 / 0.3081 on the real data).
- ``cifar10``: pixels scaled to [0, 1], then a mean/std per colour channel
  (≈ (0.491, 0.482, 0.447) / (0.247, 0.243, 0.262) on the real data).

The statistics used are kept in ``Dataset.info`` and reported by :meth:`Dataset.describe`.

Nothing here touches the network: MNIST-1D is *generated* with ``mnist1d.data.make_dataset`` (never its
download), digits ship with scikit-learn, and MNIST / CIFAR-10 are read from files the user provides
(``--data-dir``). The CIFAR-10 pickles are read with a restricted unpickler that can only build plain
containers and numpy arrays.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import pickle
import random
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import validate

__all__ = [
    "CIFAR10_FILES",
    "DATASETS",
    "DIGITS_STD_FLOOR",
    "IMAGE_STD_FLOOR",
    "MNIST1D_STD_FLOOR",
    "MNIST_FILES",
    "Dataset",
    "batches",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "load_mnist1d",
    "read_idx",
]

#: The four standard MNIST files (each may also be gzipped, with a ``.gz`` suffix).
MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

#: The CIFAR-10 python batches, in ``<data_dir>/cifar-10-batches-py/`` or directly in ``<data_dir>``.
CIFAR10_FILES: tuple[str, ...] = (
    "data_batch_1",
    "data_batch_2",
    "data_batch_3",
    "data_batch_4",
    "data_batch_5",
    "test_batch",
)

DIGITS_STD_FLOOR = 1.0
MNIST1D_STD_FLOOR = 1e-2
IMAGE_STD_FLOOR = 1e-2


# ----------------------------------------------------------------------------------------------------------
# The dataset container
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split held in memory.

    ``input_shape`` is the shape of one example (``(64,)`` digits, ``(40,)`` MNIST-1D, ``(1, 28, 28)``
    MNIST, ``(3, 32, 32)`` CIFAR-10). Inputs are float32, labels int64 in ``[0, num_classes)``.
    ``info`` holds provenance (source, split seed, normalisation statistics); it is JSON-friendly.
    The shapes, dtypes and label ranges are checked on construction.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        validate.integer(f"dataset {self.name!r}: num_classes", self.num_classes)
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if not isinstance(x, Tensor) or not isinstance(y, Tensor):
                raise TypeError(f"dataset {self.name!r}: {split} inputs and labels must be torch tensors")
            if x.dtype != torch.float32:
                raise ValueError(f"dataset {self.name!r}: x_{split} must be float32, got {x.dtype}")
            if y.dtype != torch.int64:
                raise ValueError(f"dataset {self.name!r}: y_{split} must be int64, got {y.dtype}")
            if tuple(x.shape[1:]) != self.input_shape:
                raise ValueError(
                    f"dataset {self.name!r}: x_{split} has shape {tuple(x.shape)}, "
                    f"expected [N, {', '.join(map(str, self.input_shape))}]"
                )
            if y.ndim != 1 or y.shape[0] != x.shape[0]:
                raise ValueError(
                    f"dataset {self.name!r}: y_{split} has shape {tuple(y.shape)}, expected [{x.shape[0]}]"
                )
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(
                    f"dataset {self.name!r}: y_{split} holds labels in [{int(y.min())}, {int(y.max())}], "
                    f"expected [0, {self.num_classes - 1}]"
                )

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.x_test.shape[0])

    def describe(self) -> dict[str, Any]:
        """A short JSON-friendly summary for provenance files."""
        return {
            "name": self.name,
            "num_train": self.num_train,
            "num_test": self.num_test,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            **dict(self.info),
        }

    def to(self, device: str | torch.device) -> Dataset:
        """A copy with all four tensors on ``device``."""
        return dataclasses.replace(
            self,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
        )

    def subset(self, num_train: int | None = None, num_test: int | None = None) -> Dataset:
        """The first ``num_train`` / ``num_test`` examples of each split (``None`` keeps a split whole).

        The loaders' splits are already in a shuffled order, so this is a random subset fixed by the
        loader's seed; used for ``--quick`` runs.
        """
        num_train = validate.optional_integer("num_train", num_train, minimum=0)
        num_test = validate.optional_integer("num_test", num_test, minimum=0)
        ntr = self.num_train if num_train is None else min(num_train, self.num_train)
        nte = self.num_test if num_test is None else min(num_test, self.num_test)
        info = dict(self.info)
        if ntr != self.num_train or nte != self.num_test:
            info["subset_of"] = {"num_train": self.num_train, "num_test": self.num_test}
        return dataclasses.replace(
            self,
            x_train=self.x_train[:ntr],
            y_train=self.y_train[:ntr],
            x_test=self.x_test[:nte],
            y_test=self.y_test[:nte],
            info=info,
        )


def batches(
    n: int, batch_size: int, generator: torch.Generator | None, *, drop_last: bool = False
) -> Iterator[Tensor]:
    """Index tensors covering ``range(n)`` once, in a random order drawn from ``generator``.

    One call is one epoch. With ``generator=None`` the order is ``0, 1, ..., n-1`` (evaluation).
    The last batch is smaller when ``batch_size`` does not divide ``n``, unless ``drop_last``.
    """
    n = validate.integer("n", n, minimum=0)
    batch_size = validate.integer("batch_size", batch_size)
    drop_last = validate.flag("drop_last", drop_last)
    order = torch.arange(n) if generator is None else torch.randperm(n, generator=generator)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]


# ----------------------------------------------------------------------------------------------------------
# Standardisation
# ----------------------------------------------------------------------------------------------------------


def _standardise_features(
    x_train: np.ndarray, x_test: np.ndarray, std_floor: float
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Per-feature (x − mean) / max(std, floor) with the training split's statistics (float64 maths)."""
    mean = x_train.mean(axis=0)
    std = np.maximum(x_train.std(axis=0), std_floor)
    n_floored = int((x_train.std(axis=0) < std_floor).sum())
    stats = {
        "normalisation": "per-feature train mean/std",
        "std_floor": std_floor,
        "num_floored_features": n_floored,
    }
    return (x_train - mean) / std, (x_test - mean) / std, stats


def _standardise_channels_(
    x_train: np.ndarray, x_test: np.ndarray, channel_axis: int
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Per-channel (x − mean) / std with the training split's statistics, **in place** (float32 inputs
    already in [0, 1], owned by the caller; CIFAR-10 in float32 is 600 MB, so no copies)."""
    axes = tuple(a for a in range(x_train.ndim) if a != channel_axis)
    mean = x_train.mean(axis=axes, dtype=np.float64)
    # two-pass variance per channel, accumulated in float64 without a float64 copy of the data
    var = np.empty_like(mean)
    for i, channel in enumerate(np.moveaxis(x_train, channel_axis, 0)):
        d = np.ascontiguousarray(channel, dtype=np.float32).reshape(-1) - np.float32(mean[i])
        var[i] = np.einsum("i,i->", d, d, dtype=np.float64) / max(d.size, 1)
    std = np.maximum(np.sqrt(np.maximum(var, 0.0)), IMAGE_STD_FLOOR)
    shape = [1] * x_train.ndim
    shape[channel_axis] = -1
    m = mean.astype(np.float32).reshape(shape)
    s = std.astype(np.float32).reshape(shape)
    stats = {
        "normalisation": "pixels / 255, then per-channel train mean/std",
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
    }
    for x in (x_train, x_test):
        x -= m
        x /= s
    return x_train, x_test, stats


def _unit_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels -> a new float32 array in [0, 1]."""
    x = pixels.astype(np.float32)
    x *= np.float32(1.0 / 255.0)
    return x


def _dataset(name: str, x_tr: np.ndarray, x_te: np.ndarray, y_tr: np.ndarray, y_te: np.ndarray,
             info: dict) -> Dataset:
    """The standardised splits as a ``Dataset`` of float32 inputs and int64 labels (10 classes)."""
    xtr, xte, ytr, yte = _as_tensors(x_tr, x_te, y_tr, y_te)
    return Dataset(name=name, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte, num_classes=10,
                   input_shape=tuple(int(d) for d in x_tr.shape[1:]), info=info)


def _as_tensors(*arrays: np.ndarray) -> list[Tensor]:
    out = []
    for a in arrays:
        if np.issubdtype(a.dtype, np.floating):
            out.append(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)))
        else:
            out.append(torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)))
    return out


# ----------------------------------------------------------------------------------------------------------
# Offline datasets
# ----------------------------------------------------------------------------------------------------------


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 8×8 digits (1797 images, bundled with sklearn) as 64 flat features.

    Stratified split (``sklearn.model_selection.train_test_split``, ``random_state=seed``), then
    per-pixel standardisation with the training split's mean and std, std floored at
    ``DIGITS_STD_FLOOR`` = 1 intensity level (the raw pixels take values 0..16).
    """
    validate.number("test_fraction", test_fraction)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    validate.integer("seed", seed, minimum=0)
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    x, y = _sk_load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed, shuffle=True
    )
    x_tr, x_te, stats = _standardise_features(x_tr, x_te, DIGITS_STD_FLOOR)
    info = {"source": "sklearn.datasets.load_digits", "split": "stratified", "test_fraction": test_fraction,
            "seed": seed, **stats}
    return _dataset("digits", x_tr, x_te, y_tr, y_te, info)


def load_mnist1d(num_samples: int = 5000, seed: int = 42, train_split: float = 0.8) -> Dataset:
    """MNIST-1D (Greydanus 2020), generated locally: 40 features, 10 classes.

    Uses ``mnist1d.data.get_dataset_args()`` + ``make_dataset(args)`` with the given fields; the
    package's download (``get_dataset`` / ``args.url``) is never used. The defaults are the package's
    own (5000 samples, seed 42, 80/20 split), i.e. the standard MNIST-1D. ``make_dataset`` seeds the
    global ``random`` and ``numpy`` generators; their states are restored afterwards so loading does not
    perturb other code. Standardised per feature with the training split's statistics.
    """
    validate.integer("num_samples", num_samples, minimum=None)
    if num_samples < 10:
        raise ValueError(f"num_samples must be >= 10 (one per class), got {num_samples}")
    validate.integer("seed", seed, minimum=0)
    validate.number("train_split", train_split)
    if not 0.0 < train_split < 1.0:
        raise ValueError(f"train_split must be in (0, 1), got {train_split}")
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = int(num_samples)
    args.seed = int(seed)
    args.train_split = float(train_split)
    args.url = None  # make sure nothing can fetch it
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        raw = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    x_tr, x_te = np.asarray(raw["x"], dtype=np.float64), np.asarray(raw["x_test"], dtype=np.float64)
    if x_tr.shape[0] == 0 or x_te.shape[0] == 0:
        raise ValueError(
            f"mnist1d with num_samples={num_samples}, train_split={train_split} gives an empty split "
            f"({x_tr.shape[0]} train, {x_te.shape[0]} test)"
        )
    x_tr, x_te, stats = _standardise_features(x_tr, x_te, MNIST1D_STD_FLOOR)
    info = {"source": "mnist1d.data.make_dataset (generated locally)", "num_samples": int(num_samples),
            "seed": int(seed), "train_split": float(train_split), **stats}
    return _dataset("mnist1d", x_tr, x_te, np.asarray(raw["y"]), np.asarray(raw["y_test"]), info)


# ----------------------------------------------------------------------------------------------------------
# MNIST (IDX files)
# ----------------------------------------------------------------------------------------------------------

# IDX type codes (http://yann.lecun.com/exdb/mnist/): data are big-endian.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip file ({e})") from e
    return raw


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array of its native dtype.

    Header: two zero bytes, a type code (0x08 ubyte, 0x09 byte, 0x0B short, 0x0C int, 0x0D float,
    0x0E double), the number of dimensions, then one big-endian uint32 per dimension. The data that
    follow must hold exactly ``prod(dims)`` items; otherwise ``ValueError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {path} does not exist")
    raw = _read_maybe_gzip(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(raw)} bytes, a header needs at least 4)")
    magic = int.from_bytes(raw[:4], "big")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{magic:08X} (expected 0x0000TTNN: two zero bytes, a type "
            f"code TT in {{{', '.join(f'0x{c:02X}' for c in _IDX_DTYPES)}}}, a dimension count NN >= 1)"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(
            f"{path}: truncated IDX header ({len(raw)} bytes, expected {header_len} for {ndim} dims)"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header_len
    if found < expected:
        raise ValueError(
            f"{path}: truncated IDX data: header says shape {list(dims)} ({expected} bytes), "
            f"file holds {found} bytes"
        )
    if found > expected:
        raise ValueError(
            f"{path}: IDX data longer than its header says: shape {list(dims)} needs {expected} bytes, "
            f"file holds {found} ({found - expected} trailing bytes)"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize, offset=header_len)
    return arr.reshape(dims).astype(dtype.newbyteorder("="), copy=True)


def _check_dir(data_dir: str | Path, name: str, expected: str) -> Path:
    d = Path(data_dir).expanduser()
    if not d.exists():
        raise FileNotFoundError(f"{name}: data directory {d} does not exist (expected {expected})")
    if not d.is_dir():
        raise NotADirectoryError(f"{name}: data directory {d} is not a directory (expected {expected})")
    return d


def _find_mnist_file(root: Path, stem: str) -> Path:
    candidates = [
        folder / fname for folder in (root, root / "MNIST" / "raw") for fname in (stem, f"{stem}.gz")
    ]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"mnist: file {stem} (or {stem}.gz) not found; looked for " + ", ".join(str(c) for c in candidates)
    )


def _read_mnist_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(
            f"{images_path}: expected an IDX ubyte 3-d image file (magic 0x00000803), "
            f"got dtype {images.dtype} with {images.ndim} dims"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(
            f"{labels_path}: expected an IDX ubyte 1-d label file (magic 0x00000801), "
            f"got dtype {labels.dtype} with {labels.ndim} dims"
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"mnist: {images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels"
        )
    if labels.size and labels.max() > 9:
        raise ValueError(f"{labels_path}: labels must be digits 0..9, found {int(labels.max())}")
    return images, labels


def load_mnist(data_dir: str | Path) -> Dataset:
    """MNIST from the 4 standard IDX files in ``data_dir`` or ``data_dir/MNIST/raw`` (torchvision's layout).

    Each file may be gzipped (``.gz``). Pixels are scaled to [0, 1], then standardised with the training
    split's scalar mean/std. Images keep their file's height and width (28×28 for the real data);
    the train and test files must agree. ``input_shape`` is ``(1, H, W)``.
    """
    expected = "the IDX files " + ", ".join(MNIST_FILES.values()) + " (optionally .gz)"
    root = _check_dir(data_dir, "mnist", expected)
    paths = {k: _find_mnist_file(root, stem) for k, stem in MNIST_FILES.items()}
    x_tr, y_tr = _read_mnist_pair(paths["train_images"], paths["train_labels"])
    x_te, y_te = _read_mnist_pair(paths["test_images"], paths["test_labels"])
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise ValueError(
            f"mnist: train images are {x_tr.shape[1]}x{x_tr.shape[2]} ({paths['train_images']}) but test "
            f"images are {x_te.shape[1]}x{x_te.shape[2]} ({paths['test_images']})"
        )
    x_tr = _unit_float(x_tr)[:, None]
    x_te = _unit_float(x_te)[:, None]
    x_tr, x_te, stats = _standardise_channels_(x_tr, x_te, channel_axis=1)
    return _dataset("mnist", x_tr, x_te, y_tr, y_te, {"source": str(paths["train_images"].parent), **stats})


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10 (python pickles, read with a restricted unpickler)
# ----------------------------------------------------------------------------------------------------------


def _numpy_attr(modules: tuple[str, ...], name: str) -> Any:
    import importlib

    for m in modules:
        try:
            return getattr(importlib.import_module(m), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"none of {modules} provides {name}")  # pragma: no cover - numpy layout changed


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only plain containers (dict/list/tuple/bytes/str/numbers) and numpy arrays.

    Any other global (``os.system``, ``builtins.eval``, a user class, ...) is refused with
    ``pickle.UnpicklingError`` before it can be called (re-raised as ``ValueError`` by the loader).
    """

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path

    _ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_attr(
            ("numpy._core.multiarray", "numpy.core.multiarray"), "_reconstruct"
        ),
        ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_attr(
            ("numpy._core.multiarray", "numpy.core.multiarray"), "_reconstruct"
        ),
        ("numpy.core.numeric", "_frombuffer"): lambda: _numpy_attr(
            ("numpy._core.numeric", "numpy.core.numeric"), "_frombuffer"
        ),
        ("numpy._core.numeric", "_frombuffer"): lambda: _numpy_attr(
            ("numpy._core.numeric", "numpy.core.numeric"), "_frombuffer"
        ),
        # protocol-2 pickles written by Python 3 encode ``bytes`` as _codecs.encode(str, "latin1")
        ("_codecs", "encode"): lambda: __import__("_codecs").encode,
        **{
            (mod, n): (lambda n=n: getattr(__import__("builtins"), n))
            for mod in ("builtins", "__builtin__")
            for n in (
                "dict",
                "list",
                "tuple",
                "set",
                "frozenset",
                "bytes",
                "bytearray",
                "str",
                "int",
                "float",
                "complex",
                "bool",
            )
        },
    }

    def find_class(self, module: str, name: str) -> Any:
        factory = self._ALLOWED.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(
                f"{self._path}: refusing to unpickle global {module}.{name}: CIFAR-10 batches may only "
                f"contain plain containers and numpy arrays (this file is not a genuine CIFAR-10 batch, "
                f"or is malicious)"
            )
        return factory()


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch: a dict with ``b"data"`` uint8 [N, 3072] and ``b"labels"`` (N ints in 0..9)."""
    try:
        with path.open("rb") as f:
            obj = _RestrictedUnpickler(f, path).load()
    except pickle.UnpicklingError as e:
        if "refusing to unpickle" in str(e):
            raise ValueError(str(e)) from e
        raise ValueError(f"{path}: corrupt or truncated CIFAR-10 pickle ({e})") from e
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as e:
        raise ValueError(f"{path}: corrupt or truncated CIFAR-10 pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict with keys b'data' and b'labels', got {type(obj).__name__}")

    def get(key: str) -> Any:
        for k in (key.encode(), key):
            if k in obj:
                return obj[k]
        raise ValueError(f"{path}: CIFAR-10 batch has no {key!r} entry (keys: {sorted(map(str, obj))[:8]})")

    data, labels = get("data"), get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape [N, 3072], got {desc}")
    if not isinstance(labels, list | tuple | np.ndarray):
        raise ValueError(f"{path}: 'labels' must be a list of ints, got {type(labels).__name__}")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: 'labels' must be a list of ints ({e})") from e
    if y.ndim != 1 or y.shape[0] != data.shape[0]:
        raise ValueError(f"{path}: {data.shape[0]} images but {y.size} labels")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise ValueError(f"{path}: labels must be in 0..9, found [{int(y.min())}, {int(y.max())}]")
    return data, y


def load_cifar10(data_dir: str | Path) -> Dataset:
    """CIFAR-10 from its python batches in ``data_dir/cifar-10-batches-py/`` or directly in ``data_dir``.

    The pickles are read with a restricted unpickler (plain containers and numpy arrays only). Images
    uint8 [N, 3072] (channel-major) become float [N, 3, 32, 32], scaled to [0, 1] and standardised per
    channel with the training split's statistics.
    """
    expected = "the CIFAR-10 python batches " + ", ".join(CIFAR10_FILES) + " (in cifar-10-batches-py/)"
    root = _check_dir(data_dir, "cifar10", expected)
    folder = root / "cifar-10-batches-py"
    if not (folder / CIFAR10_FILES[0]).is_file():
        folder = root
    missing = [f for f in CIFAR10_FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"cifar10: missing {', '.join(missing)} in {folder} (also looked in "
            f"{root / 'cifar-10-batches-py'}); expected {expected}"
        )
    train = [_load_cifar_batch(folder / f) for f in CIFAR10_FILES[:-1]]
    x_te_u8, y_te = _load_cifar_batch(folder / CIFAR10_FILES[-1])
    x_tr_u8 = np.concatenate([d for d, _ in train])
    y_tr = np.concatenate([y for _, y in train])
    x_tr = _unit_float(x_tr_u8.reshape(-1, 3, 32, 32))
    x_te = _unit_float(x_te_u8.reshape(-1, 3, 32, 32))
    del x_tr_u8, x_te_u8
    x_tr, x_te, stats = _standardise_channels_(x_tr, x_te, channel_axis=1)
    return _dataset("cifar10", x_tr, x_te, y_tr, y_te, {"source": str(folder), **stats})


# ----------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------

#: name -> (loader, needs a data directory)
DATASETS: dict[str, tuple[Callable[..., Dataset], bool]] = {
    "digits": (load_digits, False),
    "mnist1d": (load_mnist1d, False),
    "mnist": (load_mnist, True),
    "cifar10": (load_cifar10, True),
}

_EXPECTED_FILES = {
    "mnist": ", ".join(MNIST_FILES.values()) + " (optionally .gz; in DIR or DIR/MNIST/raw)",
    "cifar10": ", ".join(CIFAR10_FILES) + " (in DIR/cifar-10-batches-py or DIR)",
}


def load_dataset(name: str, data_dir: str | Path | None = None, **kwargs: Any) -> Dataset:
    """Load ``name`` ("digits" | "mnist1d" | "mnist" | "cifar10"); ``kwargs`` go to its loader.

    ``digits`` and ``mnist1d`` need no files (``data_dir`` is ignored); ``mnist`` and ``cifar10`` read
    from ``data_dir`` and raise ``ValueError`` without one.
    """
    key = name.strip().lower()
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    loader, needs_dir = DATASETS[key]
    if not needs_dir:
        return loader(**kwargs)
    if data_dir is None:
        raise ValueError(
            f"dataset {key!r} is read from local files: --data-dir is required "
            f"(a folder holding {_EXPECTED_FILES[key]}); nothing is downloaded"
        )
    return loader(data_dir, **kwargs)
