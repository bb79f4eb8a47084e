"""Dataset loaders: offline datasets, the MNIST IDX and CIFAR-10 pickle readers, and their error paths.

The MNIST and CIFAR-10 readers are exercised on tiny files written here in the real formats.
"""

from __future__ import annotations

import os
import pickle
import random
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_data import make_cifar, make_mnist, write_idx

from reference.data import (
    CIFAR10_FILES,
    DIGITS_STD_FLOOR,
    Dataset,
    batches,
    load_cifar10,
    load_dataset,
    load_digits,
    load_mnist,
    load_mnist1d,
    read_idx,
)

# ----------------------------------------------------------------------------------------------------------
# writers for the real formats
# ----------------------------------------------------------------------------------------------------------


class Evil:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ----------------------------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------------------------


def test_digits_shapes_dtypes_and_stratified_split():
    ds = load_digits()
    assert ds.name == "digits" and ds.num_classes == 10 and ds.input_shape == (64,)
    assert ds.num_train + ds.num_test == 1797
    assert ds.num_test == pytest.approx(0.2 * 1797, abs=1)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.x_test.shape == (ds.num_test, 64)
    # stratified: each class's share of the test split matches the whole data set within one example
    all_counts = torch.bincount(torch.cat([ds.y_train, ds.y_test]), minlength=10).double()
    test_counts = torch.bincount(ds.y_test, minlength=10).double()
    assert torch.all((test_counts - all_counts * ds.num_test / 1797).abs() <= 1.0)


def test_digits_standardised_with_train_statistics_and_floored_std():
    from sklearn.datasets import load_digits as sk
    from sklearn.model_selection import train_test_split

    ds = load_digits()
    x, y = sk(return_X_y=True)
    raw_train, _, raw_y, _ = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    assert torch.equal(ds.y_train, torch.from_numpy(raw_y))
    raw_std = torch.from_numpy(raw_train.std(0))
    mean = ds.x_train.double().mean(0)
    std = ds.x_train.double().std(0, unbiased=False)
    torch.testing.assert_close(mean, torch.zeros(64, dtype=torch.float64), atol=1e-5, rtol=0)
    # std 1 where the pixel varies enough, raw_std / floor below the floor (0 for constant pixels)
    expected = raw_std / raw_std.clamp(min=DIGITS_STD_FLOOR)
    torch.testing.assert_close(std, expected, atol=1e-5, rtol=0)
    assert (raw_std == 0).sum() >= 3, "digits has constant border pixels"
    assert ds.info["std_floor"] == DIGITS_STD_FLOOR
    assert ds.info["num_floored_features"] == int((raw_std < DIGITS_STD_FLOOR).sum())
    # the floor keeps every standardised value bounded (an unfloored rare pixel gives |z| ~ 100)
    assert float(ds.x_test.abs().max()) < 30.0
    assert torch.isfinite(ds.x_train).all() and torch.isfinite(ds.x_test).all()


def test_digits_deterministic_per_seed():
    a, b, c = load_digits(seed=3), load_digits(seed=3), load_digits(seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_test, c.y_test)


def test_digits_rejects_bad_fraction():
    with pytest.raises(ValueError, match="test_fraction must be in"):
        load_digits(test_fraction=1.5)
    with pytest.raises(TypeError, match="test_fraction must be a number"):
        load_digits(test_fraction="0.2")
    with pytest.raises(ValueError, match="test_fraction must be a finite number"):
        load_digits(test_fraction=float("nan"))
    with pytest.raises(TypeError, match="seed must be an integer"):
        load_digits(seed=1.5)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        load_digits(seed=-1)


# ----------------------------------------------------------------------------------------------------------
# MNIST-1D
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Every way out of the machine raises."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            refuse()

    monkeypatch.setattr(socket, "socket", NoSocket)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    try:
        import requests

        monkeypatch.setattr(requests, "get", refuse)
        monkeypatch.setattr(requests.Session, "request", refuse)
    except ImportError:  # pragma: no cover
        pass


def test_mnist1d_default_shapes_offline(no_network, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # mnist1d's get_dataset would cache a pickle here; we never call it
    ds = load_mnist1d()
    assert ds.name == "mnist1d" and ds.input_shape == (40,) and ds.num_classes == 10
    assert (ds.num_train, ds.num_test) == (4000, 1000)
    assert ds.x_train.dtype == torch.float32 and ds.y_test.dtype == torch.int64
    assert set(ds.y_train.tolist()) == set(range(10))
    torch.testing.assert_close(ds.x_train.mean(0), torch.zeros(40), atol=1e-5, rtol=0)
    torch.testing.assert_close(ds.x_train.std(0, unbiased=False), torch.ones(40), atol=1e-4, rtol=0)
    assert list(tmp_path.iterdir()) == [], "nothing may be written to disk"


def test_mnist1d_deterministic_and_leaves_global_rng_alone():
    np.random.seed(123)
    random.seed(123)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    a = load_mnist1d(num_samples=300, seed=7)
    assert np.array_equal(np.random.get_state()[1], np_before) and random.getstate() == py_before
    b = load_mnist1d(num_samples=300, seed=7)
    c = load_mnist1d(num_samples=300, seed=8)
    assert (a.num_train, a.num_test) == (240, 60)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_train, c.x_train)
    assert a.describe()["seed"] == 7 and a.describe()["num_samples"] == 300


def test_mnist1d_rejects_bad_arguments():
    with pytest.raises(ValueError, match="train_split must be in"):
        load_mnist1d(num_samples=100, train_split=1.0)
    with pytest.raises(ValueError, match="num_samples must be >= 10"):
        load_mnist1d(num_samples=5)
    with pytest.raises(TypeError, match="num_samples must be an integer, got 300.0"):
        load_mnist1d(num_samples=300.0)
    with pytest.raises(TypeError, match="seed must be an integer, got True"):
        load_mnist1d(num_samples=300, seed=True)
    with pytest.raises(TypeError, match="train_split must be a number"):
        load_mnist1d(num_samples=300, train_split=None)


# ----------------------------------------------------------------------------------------------------------
# MNIST IDX
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_mnist_reads_idx_files(tmp_path, gz, layout):
    root = tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw"
    arrays, _ = make_mnist(root, gz=gz)
    ds = load_dataset("mnist", data_dir=tmp_path)
    assert ds.name == "mnist" and ds.input_shape == (1, 28, 28)
    assert (ds.num_train, ds.num_test) == (12, 6)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert torch.equal(ds.y_train, torch.from_numpy(arrays["train_labels"]).long())
    assert torch.equal(ds.y_test, torch.from_numpy(arrays["test_labels"]).long())
    # undo the normalisation: back to pixels / 255, in the right order
    (m,), (s,) = ds.info["mean"], ds.info["std"]
    torch.testing.assert_close(
        ds.x_test[:, 0] * s + m, torch.from_numpy(arrays["test_images"]).float() / 255, atol=1e-4, rtol=0
    )
    assert abs(float(ds.x_train.mean())) < 1e-4 and float(ds.x_train.std(unbiased=False)) == pytest.approx(
        1.0, abs=1e-3
    )


def test_read_idx_other_dtypes_big_endian(tmp_path):
    a = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    assert np.array_equal(read_idx(write_idx(tmp_path / "a", a, type_code=0x0C)), a)
    f = np.linspace(-1, 1, 7)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "f", f, gz=True, type_code=0x0E)), f)


def test_mnist_missing_data_dir_argument():
    with pytest.raises(ValueError, match=r"--data-dir is required.*train-images-idx3-ubyte"):
        load_dataset("mnist")


def test_mnist_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data directory .*nope does not exist"):
        load_mnist(tmp_path / "nope")


def test_mnist_missing_file(tmp_path):
    _, paths = make_mnist(tmp_path)
    paths["test_labels"].unlink()
    with pytest.raises(
        FileNotFoundError, match=r"t10k-labels-idx1-ubyte \(or t10k-labels-idx1-ubyte.gz\) not found"
    ):
        load_mnist(tmp_path)


def test_mnist_bad_magic(tmp_path):
    _, paths = make_mnist(tmp_path)
    raw = bytearray(paths["train_images"].read_bytes())
    raw[0:4] = b"\x12\x34\x08\x03"
    paths["train_images"].write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: bad IDX magic number 0x12340803"):
        load_mnist(tmp_path)


def test_mnist_wrong_kind_of_file(tmp_path):
    """A label file where the images belong: valid IDX, wrong magic for the role."""
    _, paths = make_mnist(tmp_path)
    paths["train_images"].write_bytes(paths["train_labels"].read_bytes())
    with pytest.raises(ValueError, match=r"expected an IDX ubyte 3-d image file \(magic 0x00000803\)"):
        load_mnist(tmp_path)


def test_mnist_truncated_data(tmp_path):
    _, paths = make_mnist(tmp_path)
    raw = paths["train_images"].read_bytes()
    paths["train_images"].write_bytes(raw[: len(raw) - 100])
    with pytest.raises(
        ValueError, match=r"train-images-idx3-ubyte: truncated IDX data: header says shape \[12, 28, 28\]"
    ):
        load_mnist(tmp_path)


def test_mnist_truncated_header(tmp_path):
    _, paths = make_mnist(tmp_path)
    paths["test_images"].write_bytes(paths["test_images"].read_bytes()[:9])
    with pytest.raises(
        ValueError, match=r"t10k-images-idx3-ubyte: truncated IDX header \(9 bytes, expected 16"
    ):
        load_mnist(tmp_path)


def test_mnist_truncated_gzip(tmp_path):
    _, paths = make_mnist(tmp_path, gz=True)
    raw = paths["train_labels"].read_bytes()
    paths["train_labels"].write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.gz: corrupt or truncated gzip file"):
        load_mnist(tmp_path)


def test_mnist_trailing_bytes(tmp_path):
    _, paths = make_mnist(tmp_path)
    paths["test_labels"].write_bytes(paths["test_labels"].read_bytes() + b"\x00\x01")
    with pytest.raises(ValueError, match=r"longer than its header says.*2 trailing bytes"):
        load_mnist(tmp_path)


def test_mnist_label_image_count_mismatch(tmp_path):
    arrays, paths = make_mnist(tmp_path)
    write_idx(paths["train_labels"], arrays["train_labels"][:9])
    with pytest.raises(ValueError, match=r"holds 12 images but .*train-labels-idx1-ubyte holds 9 labels"):
        load_mnist(tmp_path)


def test_mnist_label_out_of_range(tmp_path):
    arrays, paths = make_mnist(tmp_path)
    bad = arrays["test_labels"].copy()
    bad[0] = 11
    write_idx(paths["test_labels"], bad)
    with pytest.raises(ValueError, match=r"labels must be digits 0..9, found 11"):
        load_mnist(tmp_path)


def test_mnist_train_test_size_disagree(tmp_path):
    arrays, paths = make_mnist(tmp_path)
    write_idx(paths["test_images"], np.zeros((6, 20, 20), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"train images are 28x28 .* test images are 20x20"):
        load_mnist(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10 pickles
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("subdir", [True, False])
def test_cifar10_reads_batches(tmp_path, protocol, subdir):
    folder = tmp_path / "cifar-10-batches-py" if subdir else tmp_path
    raw = make_cifar(folder, n=3, protocol=protocol)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert ds.name == "cifar10" and ds.input_shape == (3, 32, 32) and ds.num_classes == 10
    assert (ds.num_train, ds.num_test) == (15, 3)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.y_train.tolist() == sum((raw[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    # layout: data[i, c*1024 + h*32 + w] is pixel (c, h, w); undo the per-channel normalisation
    m = torch.tensor(ds.info["mean"]).view(1, 3, 1, 1)
    s = torch.tensor(ds.info["std"]).view(1, 3, 1, 1)
    pixels = torch.from_numpy(raw["test_batch"][b"data"]).float().view(3, 3, 32, 32) / 255
    torch.testing.assert_close(ds.x_test * s + m, pixels, atol=1e-4, rtol=0)
    per_channel = ds.x_train.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.std(1, unbiased=False), torch.ones(3), atol=1e-3, rtol=0)


def test_cifar10_missing_data_dir_argument():
    with pytest.raises(ValueError, match=r"--data-dir is required.*data_batch_1.*test_batch"):
        load_dataset("cifar10")


def test_cifar10_missing_file(tmp_path):
    make_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match=r"cifar10: missing test_batch in .*cifar-10-batches-py"):
        load_cifar10(tmp_path)


def test_cifar10_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="data directory .* does not exist"):
        load_dataset("cifar10", data_dir=tmp_path / "absent")


def test_cifar10_refuses_malicious_pickle(tmp_path):
    make_cifar(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil(marker), b"labels": []}, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_3: refusing to unpickle global (posix|nt)\.system"):
        load_cifar10(tmp_path)
    assert not marker.exists()


def test_cifar10_refuses_arbitrary_class(tmp_path):
    make_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Path("x"), b"labels": []}))
    with pytest.raises(ValueError, match=r"refusing to unpickle global pathlib\.\w*Path"):
        load_cifar10(tmp_path)


def test_cifar10_truncated_and_garbage(tmp_path):
    make_cifar(tmp_path)
    f = tmp_path / "data_batch_2"
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"data_batch_2: corrupt or truncated CIFAR-10 pickle"):
        load_cifar10(tmp_path)
    f.write_bytes(b"this is not a pickle at all")
    with pytest.raises(ValueError, match=r"data_batch_2: corrupt or truncated CIFAR-10 pickle"):
        load_cifar10(tmp_path)


def test_cifar10_count_mismatch(tmp_path):
    raw = make_cifar(tmp_path, n=3)
    d = dict(raw["data_batch_1"])
    d[b"labels"] = d[b"labels"][:2]
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(d, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_1: 3 images but 2 labels"):
        load_cifar10(tmp_path)


def test_cifar10_wrong_data_shape_and_keys(tmp_path):
    make_cifar(tmp_path, n=3)
    f = tmp_path / "test_batch"
    f.write_bytes(pickle.dumps({b"data": np.zeros((3, 1000), np.uint8), b"labels": [0, 1, 2]}))
    with pytest.raises(
        ValueError,
        match=r"test_batch: 'data' must be a uint8 array of shape \[N, 3072\], got uint8 \(3, 1000\)",
    ):
        load_cifar10(tmp_path)
    f.write_bytes(pickle.dumps({b"pixels": np.zeros((3, 3072), np.uint8)}))
    with pytest.raises(ValueError, match=r"test_batch: CIFAR-10 batch has no 'data' entry"):
        load_cifar10(tmp_path)
    f.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(
        ValueError, match=r"test_batch: expected a dict with keys b'data' and b'labels', got list"
    ):
        load_cifar10(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# dispatch, Dataset, batches
# ----------------------------------------------------------------------------------------------------------


def test_unknown_dataset():
    with pytest.raises(
        ValueError, match=r"unknown dataset 'imagenet'; known datasets: digits, mnist1d, mnist, cifar10"
    ):
        load_dataset("imagenet")


def test_load_dataset_passes_kwargs_and_ignores_data_dir_for_offline(tmp_path):
    ds = load_dataset("Digits", data_dir=tmp_path / "unused", seed=5)
    assert ds.info["seed"] == 5


def _tiny(**over) -> dict:
    kw = dict(
        name="t",
        x_train=torch.zeros(4, 3),
        y_train=torch.tensor([0, 1, 2, 1]),
        x_test=torch.zeros(2, 3),
        y_test=torch.tensor([0, 2]),
        num_classes=3,
        input_shape=(3,),
    )
    kw.update(over)
    return kw


def test_dataset_validates_itself():
    Dataset(**_tiny())
    with pytest.raises(ValueError, match="x_train must be float32, got torch.float64"):
        Dataset(**_tiny(x_train=torch.zeros(4, 3, dtype=torch.float64)))
    with pytest.raises(ValueError, match="y_test must be int64"):
        Dataset(**_tiny(y_test=torch.tensor([0, 2], dtype=torch.int32)))
    with pytest.raises(ValueError, match=r"x_test has shape \(2, 4\), expected \[N, 3\]"):
        Dataset(**_tiny(x_test=torch.zeros(2, 4)))
    with pytest.raises(ValueError, match=r"y_train has shape \(3,\), expected \[4\]"):
        Dataset(**_tiny(y_train=torch.tensor([0, 1, 2])))
    with pytest.raises(ValueError, match=r"y_train holds labels in \[0, 3\], expected \[0, 2\]"):
        Dataset(**_tiny(y_train=torch.tensor([0, 1, 3, 1])))
    with pytest.raises(ValueError, match="dataset 't': num_classes must be an integer >= 1, got 0"):
        zeros = torch.zeros(4, dtype=torch.long)
        Dataset(**_tiny(num_classes=0, y_train=zeros, y_test=zeros[:2]))
    with pytest.raises(TypeError, match="dataset 't': num_classes must be an integer, got 3.0"):
        Dataset(**_tiny(num_classes=3.0))


def test_dataset_describe_to_subset():
    ds = Dataset(**_tiny(info={"source": "unit"}))
    assert ds.describe() == {
        "name": "t",
        "num_train": 4,
        "num_test": 2,
        "num_classes": 3,
        "input_shape": [3],
        "source": "unit",
    }
    moved = ds.to("cpu")
    assert moved is not ds and torch.equal(moved.y_train, ds.y_train)
    sub = ds.subset(num_train=2)
    assert (sub.num_train, sub.num_test) == (2, 2) and torch.equal(sub.y_train, ds.y_train[:2])
    assert sub.describe()["subset_of"] == {"num_train": 4, "num_test": 2}
    assert ds.num_train == 4, "subset does not modify the original"
    assert ds.subset(num_train=0).num_train == 0 and ds.subset(num_test=10).num_test == 2
    with pytest.raises(ValueError, match="num_test must be an integer >= 0, got -1"):
        ds.subset(num_test=-1)
    with pytest.raises(TypeError, match="num_train must be an integer, got 1.5"):
        ds.subset(num_train=1.5)


def test_batches_cover_each_index_once_and_are_reproducible():
    out = list(batches(10, 3, torch.Generator().manual_seed(0)))
    assert [len(b) for b in out] == [3, 3, 3, 1]
    assert sorted(torch.cat(out).tolist()) == list(range(10))
    again = list(batches(10, 3, torch.Generator().manual_seed(0)))
    assert all(torch.equal(a, b) for a, b in zip(out, again, strict=True))
    assert not torch.equal(torch.cat(out), torch.arange(10))
    g = torch.Generator().manual_seed(0)
    e1, e2 = torch.cat(list(batches(10, 3, g))), torch.cat(list(batches(10, 3, g)))
    assert not torch.equal(e1, e2), "consecutive epochs get different orders"
    assert [len(b) for b in batches(10, 3, g, drop_last=True)] == [3, 3, 3]
    assert torch.equal(torch.cat(list(batches(5, 2, None))), torch.arange(5))
    assert list(batches(0, 4, None)) == []
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        next(batches(5, 0, None))
    with pytest.raises(TypeError, match="batch_size must be an integer, got 2.5"):  # never truncated to 2
        next(batches(5, 2.5, None))
    with pytest.raises(ValueError, match="n must be an integer >= 0"):
        next(batches(-1, 2, None))
    with pytest.raises(TypeError, match="drop_last must be True or False"):
        next(batches(5, 2, None, drop_last=1))


def test_cifar10_reads_legacy_numpy_module_names(tmp_path):
    """The real batches were pickled by Python 2 / numpy 1: globals live in ``numpy.core.multiarray``."""
    raw = make_cifar(tmp_path, n=2, protocol=2)
    for name in CIFAR10_FILES:
        blob = pickle.dumps(raw[name], protocol=2)
        legacy = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        assert b"numpy.core.multiarray\n_reconstruct" in legacy
        (tmp_path / name).write_bytes(legacy)
    ds = load_cifar10(tmp_path)
    assert ds.y_test.tolist() == raw["test_batch"][b"labels"]
