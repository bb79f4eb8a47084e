"""Where jobs run: in this process, in worker processes, or on Ray. Every target can use every executor.

An executor calls ``fn(args, ctx)`` for each ``(fn, args)`` item and yields ``(index, result)`` pairs as the
jobs finish; the runner caches each result as it arrives, so an interrupted run keeps the finished jobs.
Results are made JSON-able where the job ran, so no tensor travels back.

- ``local`` (the default): sequential, in this process, in job order, with this process's torch threads.
- ``process``: a ``spawn`` pool of ``--workers`` processes (default: one per usable core), one torch thread each,
  started at the first map and kept until ``close`` (a run's endpoint training and its jobs share it; a map that
  fails or is abandoned shuts it down).
  Workers end with the main process however it ends: on Linux the kernel sends them SIGKILL when it dies
  (``PR_SET_PDEATHSIG``), and on every platform a watchdog thread in each worker exits when its parent's
  pid changes.
- ``ray``: one Ray task per job on a local instance or the cluster at ``--address`` (``pip install .[ray]``).
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from reference import validate

from .context import JobContext
from .util import jsonable

__all__ = ["EXECUTORS", "LocalExecutor", "ProcessExecutor", "RayExecutor", "make_executor", "usable_cores"]

EXECUTORS = ("local", "process", "ray")
RAY_MISSING = "the ray executor needs Ray, which is not installed: pip install .[ray]  (or: pip install 'ray>=2.9')"

Item = tuple[Callable[..., Any], Any]  # (fn, args)


def _call(fn: Callable[..., Any], args: Any, ctx: JobContext, threads: int | None = None) -> Any:
    ctx.check_code()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return jsonable(fn(args, ctx))


def _note(exc: BaseException, what: str) -> None:
    if hasattr(exc, "add_note"):
        exc.add_note(f"in job {what}")


def _describe(item: Item) -> str:
    fn, args = item
    return f"{fn.__qualname__}({type(args).__name__})"


class LocalExecutor:
    @property
    def threads(self) -> int:
        """The torch threads a job runs with: this process's."""
        import torch

        return torch.get_num_threads()

    def imap(self, items: Sequence[Item], ctx: JobContext) -> Iterator[tuple[int, Any]]:
        for i, item in enumerate(items):
            try:
                result = _call(item[0], item[1], ctx)
            except Exception as e:
                _note(e, _describe(item))
                raise
            yield i, result

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return "LocalExecutor()"


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(0.5)


def die_with_parent() -> None:
    """On Linux, ask the kernel to kill this process when the process that forked it dies."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
        except OSError:
            pass


def _init_worker(threads: int, parent: int) -> None:
    die_with_parent()
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    torch.set_num_threads(threads)


def check_picklable(fn: Callable[..., Any], args: Any) -> None:
    try:
        pickle.dumps((fn, args))
    except (pickle.PicklingError, AttributeError, TypeError) as e:
        raise TypeError(f"{getattr(fn, '__qualname__', fn)!r} with {type(args).__name__} cannot be sent to "
                        f"worker processes (a job must be a module-level function with picklable arguments): {e}") \
            from e


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity; ``os.cpu_count()`` where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class ProcessExecutor:
    def __init__(self, workers: int | None = None, threads_per_worker: int = 1):
        workers = usable_cores() if workers is None else workers
        self.workers = validate.integer("workers", workers)
        self.threads_per_worker = validate.integer("threads_per_worker", threads_per_worker)
        self._pool: cf.ProcessPoolExecutor | None = None

    @property
    def threads(self) -> int:
        """The torch threads a job runs with: each worker's."""
        return self.threads_per_worker

    def imap(self, items: Sequence[Item], ctx: JobContext) -> Iterator[tuple[int, Any]]:
        items = list(items)
        if not items:
            return
        for fn, args in items:
            check_picklable(fn, args)
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(
                max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                initargs=(self.threads_per_worker, os.getpid()))
        futures: dict[cf.Future, int] = {}
        finished = False
        try:
            for i, (fn, args) in enumerate(items):
                futures[self._pool.submit(_call, fn, args, ctx)] = i
            for fut in cf.as_completed(futures):
                i = futures[fut]
                try:
                    result = fut.result()
                except Exception as e:
                    _note(e, _describe(items[i]))
                    raise
                yield i, result
            finished = True
        finally:
            if not finished:  # a job failed, or the caller stopped reading: nothing of this map may run on
                for fut in futures:
                    fut.cancel()
                self.close()

    def close(self) -> None:
        """Shut the pool down (waiting for running jobs, cancelling queued ones); the next map starts a new one."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.shutdown(wait=True, cancel_futures=True)

    def __repr__(self) -> str:
        return f"ProcessExecutor(workers={self.workers})"


def _import_ray():
    try:
        import ray
    except ImportError as e:
        raise ImportError(RAY_MISSING) from e
    return ray


class RayExecutor:
    """One Ray task per job. ``address=None`` starts a local instance (stopped by :meth:`close`; Ray's own
    processes share the driver's fate when it dies)."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None, num_gpus_per_job: float = 0):
        self._ray = _import_ray()
        self.address, self.num_cpus, self.num_gpus_per_job = address, num_cpus, num_gpus_per_job
        self._started = False

    threads = 1  # each task runs with one torch thread (``_call(..., 1)``)

    def _init(self):
        ray = self._ray
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address)
            else:
                ray.init(num_cpus=self.num_cpus, include_dashboard=False)
            self._started = True
        return ray

    def imap(self, items: Sequence[Item], ctx: JobContext) -> Iterator[tuple[int, Any]]:
        items = list(items)
        if not items:
            return
        ray = self._init()
        opts: dict[str, Any] = {"num_cpus": 1, "num_gpus": self.num_gpus_per_job, "max_retries": 0}
        if not self.address:
            path = os.pathsep.join(p for p in [os.getcwd(), *sys.path] if p)
            opts["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
        remote = ray.remote(**opts)(_call)
        refs = [remote.remote(fn, args, ctx, 1) for fn, args in items]
        index = {ref: i for i, ref in enumerate(refs)}
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    i = index[ref]
                    try:
                        value = ray.get(ref)
                    except ray.exceptions.RayTaskError as e:
                        cause = e.as_instanceof_cause()
                        _note(cause, _describe(items[i]))
                        raise cause from None
                    yield i, value
        finally:
            for ref in pending:
                ray.cancel(ref)

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False

    def __repr__(self) -> str:
        return f"RayExecutor({self.address or f'local, num_cpus={self.num_cpus}'})"


def make_executor(kind: str = "local", workers: int | None = None, address: str | None = None):
    validate.choice("executor", kind, EXECUTORS)
    if address and kind != "ray":
        raise ValueError(f"an address ({address!r}) is for the ray executor, not {kind!r}")
    if workers is not None and kind == "local":
        raise ValueError(f"workers ({workers}) are for the process and ray executors; the local executor runs the "
                         "jobs in this process")
    if kind == "local":
        return LocalExecutor()
    if kind == "process":
        return ProcessExecutor(workers)
    return RayExecutor(address=address, num_cpus=None if address else workers)
