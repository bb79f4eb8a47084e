"""Run a sweep's independent jobs in-process, in worker processes, or on Ray, through the job cache.

A sweep (seeds × widths × weight decays × …) is a list of jobs ``(key, kwargs)``: ``key`` names the
job in the cache (everything that determines its result), ``kwargs`` are what ``fn(**kwargs)`` is
called with. ``fn`` must be a module-level function (picklable by reference) whose result depends
on its ``kwargs`` only, and is JSON-able (``_jsonable`` turns tensors into lists and non-finite
floats into strings, as ``RunContext.job`` does). Keep ``kwargs`` small (configs, seeds, paths):
they are pickled to the workers; a job loads its own data.

``run_jobs(ctx, fn, jobs, executor)`` is ``RunContext.job`` for many jobs at once: it reads and
writes the same files, ``<out>/<target>/.jobs/<config_hash(key)>.json`` =
``{"key": ..., "result": ...}``, written atomically, one per job as soon as the job finishes. Jobs
with a cached result are not submitted; a torn (unparseable) file is recomputed. So an interrupted
sweep resumes from its cached jobs, and a key cached by ``ctx.job`` is found by ``run_jobs`` and
the other way round.

Executors (``make_executor(ctx.options)``, ``--executor`` on the command line):

- ``LocalExecutor``: sequential, in this process (the default; what ``ctx.job`` does);
- ``ProcessExecutor(workers)``: a ``concurrent.futures.ProcessPoolExecutor`` with the ``spawn``
  context (safe with CUDA and with torch's thread pools), one torch thread per worker;
- ``RayExecutor(address, num_cpus, num_gpus_per_job)``: one Ray task per job (``ray.remote``),
  on the cluster at ``address`` or on a local instance started for the purpose. Ray is optional:
  ``pip install .[ray]``. On a cluster every node needs this package installed (or a
  ``runtime_env``) so that ``fn`` can be imported there.

Jobs are pure functions of their ``kwargs``, so every executor gives the same results for the same
jobs (tests/test_executor.py compares them bit for bit on CPU).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
import pickle
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from reference.checkpoint import atomic_write_text

from .common import RunContext, _jsonable, _restore_floats, config_hash

__all__ = [
    "EXECUTORS",
    "Executor",
    "Job",
    "LocalExecutor",
    "ProcessExecutor",
    "RayExecutor",
    "job_path",
    "make_executor",
    "run_jobs",
]

#: One unit of a sweep: ``(key, kwargs)``; the result is ``fn(**kwargs)``, cached under ``key``.
Job = tuple[Any, Mapping[str, Any]]

EXECUTORS = ("local", "process", "ray")

RAY_MISSING = "the ray executor needs Ray, which is not installed: pip install .[ray]  (or: pip install 'ray>=2.9')"


@runtime_checkable
class Executor(Protocol):
    """Runs ``fn(**kwargs)`` for every job; ``map`` returns the JSON-able results in job order.

    An executor may also offer ``imap(fn, jobs)``, an iterator of ``(index, result)`` pairs in
    completion order: ``run_jobs`` then caches every result as soon as it arrives (with ``map``
    only, the results of a sweep are cached when the whole ``map`` returns).
    """

    def map(self, fn: Callable[..., Any], jobs: Sequence[Job]) -> list[Any]: ...


def _call(fn: Callable[..., Any], kwargs: Mapping[str, Any], threads: int | None = None) -> Any:
    """Run one job (in a worker); the result is made JSON-able there, so no tensor travels back."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return _jsonable(fn(**dict(kwargs)))


def _note(exc: BaseException, key: Any) -> None:
    if hasattr(exc, "add_note"):  # Python >= 3.11
        exc.add_note(f"in sweep job {_jsonable(key)!r}")


class LocalExecutor:
    """Sequential, in this process, in job order."""

    def imap(self, fn: Callable[..., Any], jobs: Sequence[Job]) -> Iterator[tuple[int, Any]]:
        for i, (key, kwargs) in enumerate(jobs):
            try:
                result = _call(fn, kwargs)
            except Exception as e:
                _note(e, key)
                raise
            yield i, result

    def map(self, fn: Callable[..., Any], jobs: Sequence[Job]) -> list[Any]:
        return _ordered(self.imap(fn, jobs), len(jobs))

    def __repr__(self) -> str:
        return "LocalExecutor()"


def _init_worker(threads: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    torch.set_num_threads(threads)


def _check_picklable(fn: Callable[..., Any]) -> None:
    try:
        pickle.dumps(fn)
    except (pickle.PicklingError, AttributeError, TypeError) as e:
        raise TypeError(
            f"{getattr(fn, '__qualname__', fn)!r} cannot be sent to worker processes: a sweep's job function "
            f"must be a module-level function (not a lambda, closure or local function); {e}"
        ) from e


class ProcessExecutor:
    """``workers`` processes (``spawn``), one torch thread each; a fresh pool per ``map``.

    The workers import ``fn``'s module by name, so ``fn`` must be module-level. Results come back in
    job order from ``map`` and in completion order from ``imap``. On the first failing job the
    jobs not yet started are cancelled and its exception is raised (with the job's key in a note).
    """

    def __init__(self, workers: int | None = None, threads_per_worker: int = 1):
        workers = (os.cpu_count() or 1) if workers is None else workers
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
        if not isinstance(threads_per_worker, int) or threads_per_worker < 1:
            raise ValueError(f"threads_per_worker must be an integer >= 1, got {threads_per_worker!r}")
        self.workers = workers
        self.threads_per_worker = threads_per_worker

    def imap(self, fn: Callable[..., Any], jobs: Sequence[Job]) -> Iterator[tuple[int, Any]]:
        jobs = list(jobs)
        if not jobs:
            return
        _check_picklable(fn)
        pool = cf.ProcessPoolExecutor(
            max_workers=min(self.workers, len(jobs)),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.threads_per_worker,),
        )
        futures: dict[cf.Future, int] = {}
        try:
            futures = {pool.submit(_call, fn, dict(kw)): i for i, (_, kw) in enumerate(jobs)}
            for fut in cf.as_completed(futures):
                i = futures[fut]
                try:
                    result = fut.result()
                except Exception as e:
                    _note(e, jobs[i][0])
                    raise
                yield i, result
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def map(self, fn: Callable[..., Any], jobs: Sequence[Job]) -> list[Any]:
        return _ordered(self.imap(fn, jobs), len(jobs))

    def __repr__(self) -> str:
        return f"ProcessExecutor(workers={self.workers})"


def _import_ray():
    try:
        import ray
    except ImportError as e:
        raise ImportError(RAY_MISSING) from e
    return ray


class RayExecutor:
    """One Ray task per job, ``num_cpus_per_job`` CPUs and ``num_gpus_per_job`` GPUs each.

    ``address``: an existing cluster (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``); ``None``
    joins the Ray instance this process already initialised, or starts a local one with
    ``num_cpus`` CPUs (default: all) and no dashboard; its tasks get this process's ``sys.path`` as
    their ``PYTHONPATH``, so that ``fn`` imports there as it does here (on a cluster, install this
    package on every node).
    ``shutdown()`` stops a Ray instance that this executor started (Ray also stops it at exit).
    Each task runs ``torch.set_num_threads(num_cpus_per_job)``.
    """

    def __init__(self, address: str | None = None, num_cpus: int | None = None, num_gpus_per_job: float = 0,
                 num_cpus_per_job: int = 1):
        self._ray = _import_ray()  # fail before the sweep starts, not at its first job
        if num_cpus is not None and (not isinstance(num_cpus, int) or num_cpus < 1):
            raise ValueError(f"num_cpus must be an integer >= 1, got {num_cpus!r}")
        if not num_gpus_per_job >= 0:
            raise ValueError(f"num_gpus_per_job must be >= 0, got {num_gpus_per_job!r}")
        if not isinstance(num_cpus_per_job, int) or num_cpus_per_job < 1:
            raise ValueError(f"num_cpus_per_job must be an integer >= 1, got {num_cpus_per_job!r}")
        self.address = address
        self.num_cpus = num_cpus
        self.num_gpus_per_job = num_gpus_per_job
        self.num_cpus_per_job = num_cpus_per_job
        self._started = False

    def _init(self):
        ray = self._ray
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address)
            else:
                ray.init(num_cpus=self.num_cpus, include_dashboard=False)
            self._started = True
        return ray

    def _submit(self, fn: Callable[..., Any], jobs: Sequence[Job]) -> list:
        ray = self._init()
        opts: dict[str, Any] = {"num_cpus": self.num_cpus_per_job, "num_gpus": self.num_gpus_per_job, "max_retries": 0}
        if not self.address:  # this machine: the workers import fn from where this process does
            path = os.pathsep.join(p for p in [os.getcwd(), *sys.path] if p)
            opts["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
        remote = ray.remote(**opts)(_call)
        fn_ref = ray.put(fn)
        return [remote.remote(fn_ref, dict(kw), self.num_cpus_per_job) for _, kw in jobs]

    def _get(self, ref, key: Any) -> Any:
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = e.as_instanceof_cause()  # the job's own exception type, with the remote traceback
            _note(cause, key)
            raise cause from None

    def imap(self, fn: Callable[..., Any], jobs: Sequence[Job]) -> Iterator[tuple[int, Any]]:
        jobs = list(jobs)
        if not jobs:
            return
        ray = self._ray
        refs = self._submit(fn, jobs)
        index = {ref: i for i, ref in enumerate(refs)}
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    i = index[ref]
                    yield i, self._get(ref, jobs[i][0])
        finally:
            for ref in pending:
                ray.cancel(ref)

    def map(self, fn: Callable[..., Any], jobs: Sequence[Job]) -> list[Any]:
        jobs = list(jobs)
        if not jobs:
            return []
        refs = self._submit(fn, jobs)
        return [self._get(ref, key) for ref, (key, _) in zip(refs, jobs, strict=True)]

    def shutdown(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False

    def __repr__(self) -> str:
        where = self.address or f"local, num_cpus={self.num_cpus}"
        return f"RayExecutor({where}, num_gpus_per_job={self.num_gpus_per_job})"


def _ordered(pairs: Iterator[tuple[int, Any]], n: int) -> list[Any]:
    out: list[Any] = [None] * n
    for i, r in pairs:
        out[i] = r
    return out


def make_executor(options: Mapping[str, Any] | None = None) -> Executor:
    """The executor that ``ctx.options`` asks for: ``"executor"`` (local | process | ray, default
    local), ``"workers"`` (process: the number of worker processes, default all cores; ray: the
    CPUs of a local instance), ``"address"`` (ray: the cluster to join), ``"gpus_per_job"`` (ray)."""
    options = dict(options or {})
    kind = options.get("executor") or "local"
    workers = options.get("workers")
    address = options.get("address")
    if kind not in EXECUTORS:
        raise ValueError(f"unknown executor {kind!r}; use one of {EXECUTORS}")
    if address and kind != "ray":
        raise ValueError(f"an address ({address!r}) is for the ray executor, not {kind!r}")
    if kind == "local":
        return LocalExecutor()
    if kind == "process":
        return ProcessExecutor(workers)
    return RayExecutor(address=address, num_cpus=None if address else workers,
                       num_gpus_per_job=options.get("gpus_per_job") or 0)


def job_path(ctx: RunContext, key: Any) -> Path:
    """Where ``ctx.job`` and ``run_jobs`` cache the result of the job ``key``."""
    return ctx.out / ".jobs" / f"{config_hash(key)}.json"


def _cached(path: Path) -> tuple[bool, Any]:
    if not path.is_file():
        return False, None
    try:
        return True, _restore_floats(json.loads(path.read_text())["result"])
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        path.unlink(missing_ok=True)  # torn or foreign: recompute
        return False, None


def run_jobs(ctx: RunContext, fn: Callable[..., Any], jobs: Sequence[Job],
             executor: Executor | None = None) -> list[Any]:
    """``[ctx.job(key, lambda: fn(**kwargs)) for key, kwargs in jobs]``, with the missing jobs run by
    ``executor`` (default ``make_executor(ctx.options)``).

    Cached jobs are not submitted; jobs with equal keys run once. Every result is written to its
    job file (atomically) as soon as the executor hands it back, so if the sweep is interrupted or a
    job fails, the finished jobs stay cached. Returns the results in job order, as JSON values with
    non-finite floats as floats, like ``ctx.job`` (a fresh result equals what the cache gives back).
    """
    jobs = [(key, kwargs) for key, kwargs in jobs]
    results: list[Any] = [None] * len(jobs)
    groups: dict[str, list[int]] = {}  # key hash -> the indices of the jobs with that key
    for i, (key, _) in enumerate(jobs):
        groups.setdefault(config_hash(key), []).append(i)
    todo: dict[str, list[int]] = {}
    for h, idx in groups.items():
        hit, value = _cached(ctx.out / ".jobs" / f"{h}.json")
        if hit:
            for j in idx:
                results[j] = value
        else:
            todo[h] = idx
    if not todo:
        return results
    hashes = list(todo)
    sub = [jobs[todo[h][0]] for h in hashes]
    if executor is None:
        executor = make_executor(ctx.options)
    ctx.log(f"  {len(sub)} of {len(jobs)} jobs to run on {executor!r}, {len(jobs) - len(sub)} cached or repeated")
    imap = getattr(executor, "imap", None)
    pairs = imap(fn, sub) if callable(imap) else enumerate(executor.map(fn, sub))
    done = set()
    for k, value in pairs:
        h, key = hashes[k], sub[k][0]
        value = _jsonable(value)
        atomic_write_text(json.dumps({"key": _jsonable(key), "result": value}), ctx.out / ".jobs" / f"{h}.json")
        for j in todo[h]:
            results[j] = _restore_floats(value)
        done.add(k)
    if len(done) != len(sub):
        raise RuntimeError(f"{executor!r} returned results for {len(done)} of {len(sub)} jobs")
    return results
