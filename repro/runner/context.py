"""What a job needs besides its arguments: data by content, trained endpoints, a device.

- :class:`DataRef` names a dataset *and* the fingerprint of its content (a SHA-256 of the loaded arrays);
  a worker that loads it checks that it finds the same content, so a job never runs on other data than the
  data its key names.
- :class:`Endpoint` is a declared dependency: a model config, a training config, a seed and the data. The
  runner finds every ``Endpoint`` in a job's arguments, trains the missing ones (K at once) before the job
  runs, and caches them under a key that covers all four and the code version.
- :class:`JobContext` is what a job function receives next to its arguments: the device, the caches, and
  memoised loaders. It is small and picklable, so every executor can send it.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reference.data import Dataset, load_dataset
from reference.models import build_model
from reference.params import Params
from reference.train import TrainConfig

from .util import config_hash, jsonable

__all__ = ["DataRef", "Endpoint", "JobContext", "LoadedData", "ModelsArgs", "code_version", "data_fingerprint",
           "find_endpoints"]

_REFERENCE = Path(__file__).resolve().parents[2] / "reference"
# the runner's modules that jobs compute through: data, models and endpoints (this file), endpoint training, and
# the settings groups several targets share (``settings.py``: the STE as the targets run it)
_RUNNER_COMPUTE = tuple(Path(__file__).resolve().with_name(n) for n in ("context.py", "endpoints.py", "settings.py"))


def _source_hash(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


_CODE: dict[str, str] = {}


def code_version(module_file: str | Path | None = None) -> str:
    """The version of the code behind a result: a hash of every ``reference/*.py`` file and of the runner's
    modules jobs compute through (``repro/runner/context.py``: data, models, endpoints; ``endpoints.py``:
    their training; ``settings.py``: the settings groups targets share), plus the target's own module when
    given. Any edit to these changes it, and so every key built from it (see README, "How results are
    keyed")."""
    k = str(module_file)
    if k not in _CODE:
        files = [*_REFERENCE.glob("*.py"), *_RUNNER_COMPUTE]
        if module_file is not None:
            files.append(Path(module_file))
        _CODE[k] = _source_hash(files)
    return _CODE[k]


def data_fingerprint(data: Dataset) -> str:
    """SHA-256 (16 hex digits) of the four arrays' bytes, shapes and dtypes, and the class count."""
    h = hashlib.sha256()
    for t in (data.x_train, data.y_train, data.x_test, data.y_test):
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    h.update(str(data.num_classes).encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class DataRef:
    """A dataset by name, where to read it, and the fingerprint of what was read."""

    dataset: str
    fingerprint: str
    data_dir: str | None = None

    def key(self) -> dict[str, Any]:
        # the folder is where the data was found, not what it is: two folders with equal files share results
        return {"dataset": self.dataset, "fingerprint": self.fingerprint}


@dataclass(frozen=True)
class Endpoint:
    """A trained model, declared by what determines it. ``view`` reshapes each input example before
    training (e.g. ``(1, 40)`` to feed MNIST-1D to a 1-D conv net); ``None`` keeps the dataset's shape."""

    model: Mapping[str, Any]
    train: TrainConfig
    seed: int
    data: DataRef
    view: tuple[int, ...] | None = None

    def key(self) -> dict[str, Any]:
        return {"model": jsonable(dict(self.model)), "train": jsonable(asdict(self.train)), "seed": int(self.seed),
                "data": self.data.key(), "view": list(self.view) if self.view else None,
                "code": code_version()}

    def group(self) -> str:
        """Endpoints of one group differ only in their seed: they are trained together."""
        k = self.key()
        del k["seed"]
        return config_hash(k)


@dataclass(frozen=True)
class ModelsArgs:
    """What a job over a set of trained models reads first: the model config (``build_model``), the trained
    endpoints (``ctx.endpoints(args.models)``) and the data (``ctx.setup(args)``). A target's job arguments
    subclass it and add their own fields after these."""

    model: dict
    models: tuple[Endpoint, ...]
    data: DataRef


def find(obj: Any, kind: type) -> Iterator[Any]:
    """Every instance of ``kind`` inside a job's arguments (dataclass fields, mappings, sequences)."""
    if isinstance(obj, kind):
        yield obj
    elif is_dataclass(obj) and not isinstance(obj, type):
        for f in fields(obj):
            yield from find(getattr(obj, f.name), kind)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from find(v, kind)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from find(v, kind)


def find_endpoints(obj: Any) -> Iterator[Endpoint]:
    """Every :class:`Endpoint` a job declares in its arguments."""
    return find(obj, Endpoint)


# per-process memos: the loaded dataset by (name, folder, fingerprint), and its view on a device
_DATA: dict[tuple, Dataset] = {}
_VIEWS: dict[tuple, Dataset] = {}
_MEMO_SIZE = 4  # a target may alternate between a few datasets (anokhin2020) or views (ainsworth2023-width)


def _remember(memo: dict, key: tuple, value: Dataset) -> None:
    while len(memo) >= _MEMO_SIZE:
        memo.pop(next(iter(memo)))  # the oldest entry
    memo[key] = value


def remember_data(ref: DataRef, data: Dataset) -> None:
    """Give this process's ``JobContext.data`` the dataset a run loaded and fingerprinted as ``ref``, so that
    the jobs and the training plan of that run in this process do not load it a second time."""
    _remember(_DATA, (ref.dataset, ref.data_dir, ref.fingerprint), data)


@functools.cache
def cpu_identity() -> str:
    """The CPU as far as its floats depend on it: the architecture, the model (``/proc/cpuinfo``'s model
    name, family and model number, where there is one) and the instruction set torch's kernels dispatch to
    (``torch.backends.cpu.get_cpu_capability``). MKL and oneDNN pick their code paths by CPU: on two machines
    of one kind that differed here, the same code, seeds and thread count trained endpoints whose cpu-size
    results differed in a third of the cells (README, "How results are keyed")."""
    name, family, model = "", "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and not name:
                name = value
            elif key == "cpu family" and not family:
                family = value
            elif key == "model" and not model:
                model = value
    except OSError:
        pass
    name = name or platform.processor()
    parts = [platform.machine(), name, f"family {family} model {model}" if family and model else ""]
    return " ".join(p for p in parts if p) + f", {torch.backends.cpu.get_cpu_capability()}"


def device_description(device: torch.device, threads: int | None = None) -> str:
    """Where the floats are computed, as far as they depend on it: the GPU's name, or the CPU (``cpu_identity``)
    and the torch threads the jobs run with (default: this process's). Cache keys include it: the evaluator's
    and ``train_many``'s choices and the kernels' code paths and summation order follow it, so floats made
    under another description would not be the ones this run computes."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    n = torch.get_num_threads() if threads is None else threads
    return f"cpu ({cpu_identity()}, {n} threads)"


@dataclass(frozen=True)
class JobContext:
    """Handed to every job with its arguments; picklable (strings and flags only)."""

    device: str = "cpu"
    cache_dir: str = ""
    progress: bool = False
    log_prefix: str = ""
    code: str = ""  # ``code_version()`` when the run began ("": unchecked); see ``check_code``
    # where the floats are computed (``device_description`` with the jobs' threads): part of every cache key;
    # "" (default): this process's ``device_description(device)``
    numerics: str = ""

    def __post_init__(self) -> None:
        if not self.numerics:
            object.__setattr__(self, "numerics", device_description(torch.device(self.device)))

    def check_code(self) -> None:
        """``RuntimeError`` if the versioned code (``code_version``) changed on disk since the run began: a
        worker started after an edit imports the new code, and its results would be filed under keys of the
        old one (a mixed run)."""
        if self.code and code_version() != self.code:
            runner = ", ".join(f"repro/runner/{p.name}" for p in _RUNNER_COMPUTE)
            raise RuntimeError(
                f"reference/ or {runner} changed while the run was going (code version {code_version()}, the run "
                f"started with {self.code}); its results would mix two versions of the code: re-run once the edit "
                "is done"
            )

    @property
    def dev(self) -> torch.device:
        return torch.device(self.device)

    def log(self, msg: str) -> None:
        print(f"{self.log_prefix}{msg}", flush=True)

    def data(self, ref: DataRef, view: tuple[int, ...] | None = None) -> Dataset:
        """The dataset ``ref`` names, on this job's device; raises if its content changed since the run began."""
        k = (ref.dataset, ref.data_dir, ref.fingerprint)
        if k not in _DATA:
            d = load_dataset(ref.dataset, data_dir=ref.data_dir)
            fp = data_fingerprint(d)
            if fp != ref.fingerprint:
                raise ValueError(
                    f"dataset {ref.dataset!r} (data dir {ref.data_dir}) changed while the run was going: content "
                    f"fingerprint {fp}, the run started with {ref.fingerprint}; re-run to start over on the new data"
                )
            _remember(_DATA, k, d)
        d = _DATA[k]
        dk = (k, view, self.device)
        if dk not in _VIEWS:
            _remember(_VIEWS, dk, with_view(d, view).to(self.dev))
        return _VIEWS[dk]

    def setup(self, args: Any) -> tuple[Dataset, nn.Module]:
        """The data and a fresh model of a job's arguments: ``args.data`` (seen through ``args.view`` when the
        job has one) on this device, and ``build_model(args.model)`` there (built after the data is loaded)."""
        data = self.data(args.data, getattr(args, "view", None))
        return data, build_model(args.model).to(self.dev)

    def endpoint(self, e: Endpoint) -> Params:
        """The trained parameters of ``e`` from the endpoint cache, on this job's device."""
        from .endpoints import load_endpoint

        return {k: v.to(self.dev) for k, v in load_endpoint(Path(self.cache_dir), e, self.numerics).items()}

    def endpoints(self, es: Sequence[Endpoint]) -> list[Params]:
        return [self.endpoint(e) for e in es]


def with_view(d: Dataset, view: tuple[int, ...] | None) -> Dataset:
    import dataclasses

    if not view:
        return d
    return dataclasses.replace(d, x_train=d.x_train.reshape(d.num_train, *view),
                               x_test=d.x_test.reshape(d.num_test, *view), input_shape=tuple(view))



@dataclass(frozen=True)
class LoadedData:
    """What ``jobs(cfg, data)`` sees: the reference jobs load it by, and the loaded dataset (shapes, sizes)."""

    ref: DataRef
    dataset: Dataset

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.dataset.input_shape

    @property
    def in_features(self) -> int:
        n = 1
        for d in self.dataset.input_shape:
            n *= int(d)
        return n
