"""Several targets at once: ``python -m repro run … --targets-at-once N``.

Each target runs in its own ``python -m repro run TARGET`` child process with the options the command was given,
so it computes exactly what it computes when run alone (the same executor, threads, cache keys and output set;
the cache and the output folders already allow concurrent runs: atomic writes, one lock per output set, stale
files removed only when their process is gone). At most ``N`` children run at a time; the longest targets start
first (by the wall time each took the last time it computed anything, recorded in the cache, else the one in the
output set it last wrote; a target with neither counts as the longest). A child's output is kept in a
temporary file and printed whole when it finishes, so the log reads as if the targets had run one after
another, in the order they finished. Children die with this process (on Linux the
kernel kills them when it does; on Ctrl-C they are terminated), and a killed child leaves its previous complete
output set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .executors import die_with_parent

__all__ = ["longest_first", "run_concurrently"]


def last_wall_time(folder: Path) -> float | None:
    """The wall time recorded in ``folder/provenance.json`` (an output set), or None."""
    try:
        return float(json.loads((Path(folder) / "provenance.json").read_text())["wall_time_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def longest_first(names: Sequence[str], folders: Sequence[Path],
                  recorded: Sequence[float | None] | None = None) -> list[str]:
    """``names`` ordered longest first by an estimate of their wall time: ``recorded[i]`` (the time the
    target took the last time it computed anything, kept in the cache: ``repro.runner.run.recorded_wall_time``)
    where given and known, else the wall time in the output set it last wrote (``folders[i]``); unknown
    first; ties keep the given order."""
    rec = list(recorded) if recorded is not None else [None] * len(names)
    if len(rec) != len(names) or len(folders) != len(names):
        raise ValueError(f"{len(names)} names, {len(folders)} folders and {len(rec)} recorded times")
    times = [r if r is not None else last_wall_time(f) for r, f in zip(rec, folders, strict=True)]
    order = sorted(range(len(names)), key=lambda i: (times[i] is not None, -(times[i] or 0.0), i))
    return [names[i] for i in order]


def run_concurrently(names: Sequence[str], child_args: Sequence[str], at_once: int, out=sys.stdout) -> list[str]:
    """Run ``python -m repro run NAME *child_args`` for every name, ``at_once`` at a time, in the given order;
    print each child's output when it finishes. Returns the names whose run failed."""
    if at_once < 1:
        raise ValueError(f"targets at once must be >= 1, got {at_once}")
    root = str(Path(__file__).resolve().parents[2])  # the children import this checkout's repro and reference
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    queue, running, failed = list(names), [], []
    total, done, t0 = len(queue), 0, time.perf_counter()
    print(f"running {total} targets, {min(at_once, total)} at a time, each in its own process "
          f"(longest first: {', '.join(queue)})", file=out, flush=True)
    try:
        while queue or running:
            while queue and len(running) < at_once:
                name = queue.pop(0)
                log = tempfile.TemporaryFile(mode="w+", prefix=f"repro-{name}-", suffix=".log")
                cmd = [sys.executable, "-m", "repro", "run", name, *child_args]
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env, preexec_fn=die_with_parent)
                running.append((name, proc, log, time.perf_counter()))
            time.sleep(0.2)
            for item in [r for r in running if r[1].poll() is not None]:
                running.remove(item)
                name, proc, log, started = item
                done += 1
                log.seek(0)
                text = log.read()
                log.close()
                state = "finished" if proc.returncode == 0 else f"FAILED (exit status {proc.returncode})"
                print(f"\n===== [{done}/{total}] {name}: {state} in {time.perf_counter() - started:.1f} s "
                      f"({time.perf_counter() - t0:.1f} s since the start) =====", file=out)
                print(text.rstrip("\n"), file=out, flush=True)
                if proc.returncode != 0:
                    failed.append(name)
    finally:
        for _, proc, _, _ in running:  # interrupted: nothing of this command may run on
            proc.terminate()
        for _, proc, log, _ in running:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    print(f"\n{total} targets in {time.perf_counter() - t0:.1f} s, {min(at_once, total)} at a time", file=out,
          flush=True)
    return failed
