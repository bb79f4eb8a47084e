"""Run one target: size, overrides, data, endpoints, jobs on an executor, report, the output set."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from reference.checkpoint import atomic_write_text
from reference.data import load_dataset

from .cache import JobCache, job_key
from .config import config_for
from .context import (
    DataRef,
    JobContext,
    LoadedData,
    code_version,
    data_fingerprint,
    device_description,
    find_endpoints,
    remember_data,
)
from .declare import Job, Report, Results, Target
from .endpoints import missing_endpoints, plan_training, train_group
from .executors import make_executor
from .output import Staging, check_writable, clean_stale, lock
from .util import config_hash, jsonable

__all__ = ["RESULTS", "RunOptions", "default_cache_dir", "default_out", "record_wall_time", "recorded_wall_time",
           "run_target", "TrainGroup"]

RESULTS = Path(__file__).resolve().parents[1] / "results"


def default_cache_dir() -> Path:
    return Path(os.environ.get("MODECONN_CACHE", Path.home() / ".cache" / "modeconn"))


def default_out(size: str) -> Path:
    """``cpu``-size runs regenerate the committed results; ``quick`` and ``paper`` runs go to ``./runs``."""
    return RESULTS if size == "cpu" else Path("runs")


@dataclass
class RunOptions:
    size: str = "cpu"
    dataset: str | None = None
    seed: int | None = None
    overrides: Sequence[tuple[str, str]] = ()
    device: str = "auto"
    data_dir: Path | None = None
    out: Path | None = None
    cache_dir: Path | None = None
    executor: str = "local"
    workers: int | None = None
    address: str | None = None
    progress: bool = True
    command: str = field(default_factory=lambda: " ".join(sys.argv))


@dataclass(frozen=True)
class TrainGroup:
    """A job's dependency made a job: train these endpoints (equal but for their seeds) with ``train_many``'s
    ``strategy`` (``endpoints.plan_training``: K at once under vmap, or one endpoint)."""

    endpoints: tuple
    strategy: str = "auto"


def _train_group(args: TrainGroup, ctx: JobContext) -> dict:
    return train_group(args.endpoints, ctx, args.strategy)


def git_commit() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10,
                             check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10, check=True).stdout.strip())
        return {"commit": sha, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "numpy", "scipy", "scikit-learn", "mnist1d", "seaborn", "matplotlib", "modeconn"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def output_name(t: Target, cfg: Any) -> str:
    default = t.sizes["cpu"].dataset
    return t.name if cfg.dataset == default else f"{t.name}-{cfg.dataset}"


class _Log:
    def __init__(self, prefix: str = ""):
        self.lines: list[str] = []
        self.prefix = prefix

    def __call__(self, msg: str) -> None:
        self.lines.append(msg)
        print(f"{self.prefix}{msg}", flush=True)


def _wall_time_path(cache_dir: Path, name: str, size: str) -> Path:
    return Path(cache_dir) / "wall-times" / f"{name}.{size}.json"


def record_wall_time(cache_dir: Path, name: str, size: str, seconds: float) -> None:
    """Remember how long output set ``name`` took at ``size`` the last time it computed anything (its
    cumulative wall time over resumed invocations), for ``--targets-at-once`` to start the longest first even
    when ``--out`` is new. Written atomically; an estimate for scheduling only, never a result."""
    path = _wall_time_path(cache_dir, name, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps({"wall_time_s": round(float(seconds), 2)}), path)


def recorded_wall_time(cache_dir: Path, name: str, size: str) -> float | None:
    """The wall time ``record_wall_time`` last stored for (``name``, ``size``), or None."""
    try:
        return float(json.loads(_wall_time_path(cache_dir, name, size).read_text())["wall_time_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class _Clock:
    """Wall time of this run, added up over the invocations that resumed it (stored in the cache)."""

    def __init__(self, path: Path):
        self.path = path
        self.t0 = time.time()
        self.before, self.invocations = 0.0, 1
        try:
            rec = json.loads(path.read_text())
            self.before, self.invocations = float(rec["elapsed_s"]), int(rec["invocations"]) + 1
        except (OSError, ValueError, KeyError, TypeError):
            pass

    @property
    def now(self) -> float:
        return time.time() - self.t0

    def save(self) -> None:
        atomic_write_text(json.dumps({"elapsed_s": self.before + self.now, "invocations": self.invocations}),
                          self.path)

    def done(self) -> None:
        self.path.unlink(missing_ok=True)


def run_target(t: Target, opts: RunOptions) -> dict[str, Any]:
    """Run ``t`` as ``opts`` says and write its output set; returns the summary. Raises ``ValueError`` /
    ``OutputError`` / ``FileNotFoundError`` with a message for bad input, before any training."""
    from reference.train import pick_device

    from .output import OutputError

    cfg = config_for(t, opts.size, opts.dataset, opts.seed, opts.overrides)
    device = pick_device(opts.device)
    name = output_name(t, cfg)
    out_root = check_writable(opts.out if opts.out is not None else default_out(opts.size), "--out")
    cache_dir = check_writable(opts.cache_dir or default_cache_dir(), "--cache-dir")
    if opts.data_dir is not None and not Path(opts.data_dir).is_dir():
        raise OutputError(f"--data-dir {opts.data_dir} is not a directory")
    log = _Log()
    clean_stale(out_root, log)
    clean_stale(cache_dir, log)
    executor = make_executor(opts.executor, opts.workers, opts.address)
    with lock(out_root, name):
        data = load_dataset(cfg.dataset, data_dir=opts.data_dir)
        ref = DataRef(cfg.dataset, data_fingerprint(data), str(opts.data_dir) if opts.data_dir else None)
        remember_data(ref, data)
        log(f"{name}: size {opts.size}, dataset {cfg.dataset} (fingerprint {ref.fingerprint}), seed {cfg.seed}, "
            f"device {device}, executor {executor!r}")
        for k, v in opts.overrides:
            log(f"  --set {k}={v}")
        jobs: list[Job] = list(t.jobs(cfg, LoadedData(ref, data)))
        code = code_version(t.module_file or None)
        numerics = device_description(device, executor.threads)
        ctx = JobContext(device=str(device), cache_dir=str(cache_dir), progress=opts.progress, code=code_version(),
                         numerics=numerics)
        clock = _Clock(cache_dir / "runs" / f"{config_hash([t.name, opts.size, cfg, ref, numerics, code])}.json")
        try:
            stats = _run_jobs(t, jobs, ctx, executor, cache_dir, code, device, log, clock)
        finally:
            clock.save()
            executor.close()
        results = Results([(j.args, r) for j, r in zip(jobs, stats.pop("results"), strict=True)])
        rep = t.report(cfg, results)
        if not isinstance(rep, Report):
            raise TypeError(f"{t.name}: report() returned {type(rep).__name__}, expected Report")
        got, want = set(rep.verdicts), set(t.claim_ids)
        if got != want:
            raise ValueError(f"{t.name}: the report judged claims {sorted(got)}, the target declares "
                             f"{sorted(want)} (missing {sorted(want - got)}, undeclared {sorted(got - want)})")
        staging = Staging(out_root, name)
        try:
            staging.write_report(rep)
            claims = [{"id": c.id, "statement": c.statement, "paper": c.paper, "ours": rep.verdicts[c.id].ours,
                       "held": rep.verdicts[c.id].held} for c in t.claims]
            summary = {"target": name, "size": opts.size, "quick": opts.size == "quick", "dataset": cfg.dataset,
                       "seed": cfg.seed, "overrides": [f"{k}={v}" for k, v in opts.overrides],
                       "data_fingerprint": ref.fingerprint, "device": numerics, "claims": claims}
            for note in rep.notes:
                log(note)
            log(f"\n== {name}: claims ==")
            for c in claims:
                log(f"[{'held' if c['held'] else 'DID NOT HOLD'}] {c['id']}: {c['statement']}\n"
                    f"    paper: {c['paper']}\n    ours:  {c['ours']}")
            prov = {"target": name, "paper": t.paper, "arxiv": t.arxiv, "size": opts.size, "config": jsonable(cfg),
                    "overrides": [f"{k}={v}" for k, v in opts.overrides], "seed": cfg.seed,
                    "data": {**jsonable(data.describe()), "fingerprint": ref.fingerprint,
                             "data_dir": ref.data_dir},
                    "device": numerics, "executor": repr(executor), "versions": versions(),
                    "git": git_commit(), "code_version": code, "command": opts.command, "jobs": stats,
                    "wall_time_s": round(clock.now, 2), "cumulative_wall_time_s": round(clock.before + clock.now, 2),
                    "invocations": clock.invocations,
                    "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            staging.write_text("summary.json", json.dumps(summary, indent=2, ensure_ascii=False))
            staging.write_text("provenance.json", json.dumps(prov, indent=2, ensure_ascii=False))
            staging.write_text("run.log", "\n".join(log.lines) + "\n")
            final = staging.commit()
        except BaseException:
            staging.discard()
            raise
        clock.done()
        if stats["run"] or stats["endpoints_trained"]:  # a run served whole from the cache says nothing of the cost
            record_wall_time(cache_dir, name, opts.size, prov["cumulative_wall_time_s"])
        print(f"\nwrote {final} ({prov['wall_time_s']} s; {prov['cumulative_wall_time_s']} s over "
              f"{clock.invocations} invocation(s))", flush=True)
        return summary


def _run_jobs(t: Target, jobs: list[Job], ctx: JobContext, executor, cache_dir: Path, code: str,
              device: torch.device, log, clock: _Clock) -> dict[str, Any]:
    # 1. endpoints every job declares, trained before the jobs (endpoints.plan_training: a job per group or endpoint)
    eps: dict[str, Any] = {}
    for j in jobs:
        for e in find_endpoints(j.args):
            eps.setdefault(config_hash(e.key()), e)
    missing = missing_endpoints(cache_dir, list(eps.values()), ctx.numerics, log)
    t0 = time.perf_counter()
    if missing:
        plan = plan_training(missing, ctx, executor.threads)
        at_once = sum(s == "vmap" for _, s in plan)
        log(f"  training {len(missing)} of {len(eps)} endpoints in {len(plan)} job(s) ({at_once} of groups trained "
            f"at once, {len(plan) - at_once} of one endpoint); {len(eps) - len(missing)} cached")
        items = [(_train_group, TrainGroup(es, s)) for es, s in plan]
        for _ in executor.imap(items, ctx):
            clock.save()
        print(f"  trained {len(missing)} endpoints in {time.perf_counter() - t0:.1f} s", flush=True)  # not in run.log
    elif eps:
        log(f"  all {len(eps)} endpoints cached")
    training_s = time.perf_counter() - t0
    # 2. the jobs, each cached under its full key
    cache = JobCache(cache_dir / "jobs" / t.name, log)
    keys = [job_key(j, code, ctx.numerics) for j in jobs]
    results: list[Any] = [None] * len(jobs)
    groups: dict[str, list[int]] = {}  # key hash -> the jobs with that key (repeats run once)
    for i, k in enumerate(keys):
        groups.setdefault(config_hash(k), []).append(i)
    todo: dict[str, list[int]] = {}
    for h, idx in groups.items():
        hit, value = cache.get(keys[idx[0]], jobs[idx[0]].result_type)
        if hit:
            for i in idx:
                results[i] = value
        else:
            todo[h] = idx
    first = [idx[0] for idx in todo.values()]
    log(f"  {len(first)} of {len(jobs)} jobs to run on {executor!r}; {len(jobs) - len(first)} cached or repeated")

    def on_result(n: int, value: Any) -> None:
        i = first[n]
        if not isinstance(value, jobs[i].result_type):
            raise TypeError(f"job {jobs[i].name} returned a {type(value).__name__}, expected "
                            f"{jobs[i].result_type.__name__}")
        stored = cache.put(keys[i], value)
        for j in todo[config_hash(keys[i])]:
            results[j] = stored
        clock.save()

    t1 = time.perf_counter()
    for n, value in executor.imap([(jobs[i].fn, jobs[i].args) for i in first], ctx):
        on_result(n, value)
    if any(results[i] is None for i in first):
        raise RuntimeError(f"{executor!r} returned results for fewer than {len(first)} jobs")
    if first:
        print(f"  ran {len(first)} jobs in {time.perf_counter() - t1:.1f} s", flush=True)  # (wall times: provenance)
    # wall times of this invocation's two phases (endpoint training, then the jobs), for the provenance
    return {"total": len(jobs), "run": len(first), "cached": len(jobs) - len(first),
            "endpoints": len(eps), "endpoints_trained": len(missing), "endpoint_training_s": round(training_s, 2),
            "jobs_s": round(time.perf_counter() - t1, 2), "results": results}
