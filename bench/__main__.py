"""``python -m bench``: every benchmark, side by side in one run, into ``bench/RESULTS.md``.

Each benchmark is its own script (``bench/bench_*.py``) that measures its variants against each other in
one process and prints ratios; this runs them one after another on one device, with the machine and
versions, and rewrites ``bench/RESULTS.md`` with what they printed. ``--tiny`` runs every script on a toy
workload that only checks that it still runs (what CI does: never a timed assertion); it writes no file
unless ``--out`` is given.

    python -m bench [--device auto|cpu|cuda] [--only NAME ...] [--tiny] [--out bench/RESULTS.md]

``--only`` re-runs some benchmarks and keeps the other sections of the results file as they were (its
header says which were kept).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# name: (script, arguments at full size, arguments of the tiny run); "{device}" / "{devices}" are filled in
BENCHES: dict[str, tuple[str, list[str], list[str]]] = {
    "evaluate": ("bench_evaluate.py", ["--device", "{device}"], ["--device", "{device}", "--repeats", "1", "--tiny"]),
    "hvp": ("bench_hvp.py", ["--device", "{device}"], ["--device", "{device}", "--repeats", "1", "--k", "2", "--tiny"]),
    "curves": ("bench_curves.py", ["--devices", "{devices}"],
               ["--devices", "{devices}", "--n", "64", "--width", "8", "--epochs", "1", "--repeats", "1"]),
    "train_many": ("bench_train_many.py",
                   ["--device", "{device}", "--widths", "32", "128", "256", "512", "--repeats", "9", "--epochs", "5"],
                   ["--device", "{device}", "--n", "64", "--width", "8", "--epochs", "1", "--repeats", "1",
                    "--k", "2"]),
    "weight_matching": ("bench_weight_matching.py", ["--device", "{device}"],
                        ["--device", "{device}", "--tiny", "--repeats", "1"]),
    "optimizer": ("bench_optimizer.py", ["--device", "{device}"], ["--device", "{device}", "--tiny", "--repeats", "1"]),
    "pooling": ("bench_pooling.py", ["--device", "{device}"], ["--device", "{device}", "--tiny", "--repeats", "1"]),
}


def _machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"{gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + (" (dirty)" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run(names: list[str], device: str, tiny: bool) -> tuple[list[tuple[str, list[str], str, float, int]], bool]:
    """Run the named benchmarks; returns (name, command, output, seconds, exit code) each, and whether all passed."""
    devices = {"auto": "cpu,cuda", "cpu": "cpu", "cuda": "cuda"}[device]
    rows, ok = [], True
    for name in names:
        script, full, small = BENCHES[name]
        args = [a.format(device=device, devices=devices) for a in (small if tiny else full)]
        cmd = [sys.executable, str(HERE / script), *args]
        print(f"== {name}: {' '.join(['python', f'bench/{script}', *args])}", flush=True)
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        out = r.stdout + (f"\n[stderr]\n{r.stderr.strip()}" if r.returncode else "")
        print(out.rstrip(), flush=True)
        if r.returncode:
            print(f"!! {name} failed with exit code {r.returncode}", file=sys.stderr)
            ok = False
        rows.append((name, ["python", f"bench/{script}", *args], out.rstrip(), dt, r.returncode))
    return rows, ok


NOT_MEASURED = (
    "the suite's time by phase (`python -m repro.timing`, tables in `repro/results/TIMING.md`); anything on CUDA "
    "(no GPU was lent to the sessions that wrote this file), including the TF32 option "
    "(`evaluate_points(..., tf32=True)`)."
)


def _matches(out: str, pattern: str) -> list[tuple[str, ...]]:
    """The groups of ``pattern`` in every line of ``out`` it matches (stripped), in order."""
    return [m.groups() for line in out.splitlines() if (m := re.match(pattern, line.strip()))]


def parse_goals(out: str) -> list[tuple[str, str, str, str]]:
    """``(goal, case, measured, verdict)`` of every line ``goal: GOAL [CASE]: MEASURED: VERDICT`` in ``out``."""
    return [(g, case, measured, verdict if verdict == "met" else "**missed**")
            for g, case, measured, verdict in _matches(out, r"goal: (.*?) \[(.*?)\]: (.*): (met|MISSED)$")]


def parse_whys(out: str) -> list[tuple[str, str, str]]:
    """``(goal, case, text)`` of every line ``why: GOAL [CASE]: TEXT`` in ``out``: what a benchmark measured
    about why a goal it printed as missed is missed."""
    return _matches(out, r"why: (.*?) \[(.*?)\]: (.*)$")


TIMING = ROOT / "repro" / "results" / "TIMING.md"
"""The suite's timing tables (``python -m repro.timing``): its ``goal:`` and ``why:`` lines (the whole suite's
goal of issue #18) join the goals table after the benchmarks' own."""


def goals_table(rows, timing: Path | None = None) -> list[str]:
    """The Markdown table of every goal line the benchmarks printed and then ``timing``'s (default ``TIMING``;
    none: an empty list), then the ``why:`` lines of the missed ones, one bullet each."""
    timing = TIMING if timing is None else timing
    if timing.exists():
        rows = [*rows, ("timing", [], timing.read_text(), 0.0, 0)]
    goals = [g for _, _, out, _, _ in rows for g in parse_goals(out)]
    if not goals:
        return []
    whys = [w for _, _, out, _, _ in rows for w in parse_whys(out)]
    lines = ["| goal | case | measured | |", "|---|---|---|---|",
             *(f"| {g} | {case} | {measured} | {verdict} |" for g, case, measured, verdict in goals)]
    if whys:
        lines += ["", "Where a goal is missed, what its benchmark measured about why (its `why:` lines):", "",
                  *(f"- {g} [{case}]: {text}" for g, case, text in whys)]
    return lines


def parse_peaks(out: str) -> list[tuple[str, str, str]]:
    """``(case, device, measured)`` of every line ``peak: [CASE, DEVICE]: MEASURED`` in ``out``
    (``harness.peak_line``)."""
    return _matches(out, r"peak: \[(.*), ([^,\]]*(?:\([^)]*\))?)\]: (.*)$")


def peaks_table(rows) -> list[str]:
    """The Markdown table of every ``peak:`` line the benchmarks printed (none: an empty list)."""
    peaks = [(name, *p) for name, _, out, _, _ in rows for p in parse_peaks(out)]
    if not peaks:
        return []
    return ["| benchmark | case | device | reached |", "|---|---|---|---|",
            *(f"| {name} | {case} | {dev} | {measured} |" for name, case, dev, measured in peaks)]


README_START, README_END = "<!-- bench:goals:start -->", "<!-- bench:goals:end -->"


def update_readme(path: Path, rows, stamp: str) -> bool:
    """Replace the README's text between ``README_START`` and ``README_END`` by the goals table (with
    ``stamp``: where and when it was measured); ``False`` (and nothing written) if the markers are missing."""
    text = path.read_text()
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    body = "\n".join([README_START, f"Written by `python -m bench` from `bench/RESULTS.md` ({stamp}).", "",
                      *goals_table(rows), README_END])
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(head + body + tail)
    tmp.replace(path)
    return True


def previous_rows(path: Path, device: str, tiny: bool) -> list[tuple[str, list[str], str, float, int]]:
    """The benchmarks' sections of an earlier ``RESULTS.md`` as ``run`` returns them, so that ``--only`` can
    rewrite some sections and keep the others; none if the file is missing or was written for another
    ``--device`` or another ``--tiny`` (its sections would be mixed with this run's under one header)."""
    if not path.exists():
        return []
    text = path.read_text()
    if f"\n- device option: {device}\n" not in text or ("--tiny (toy workloads" in text) != tiny:
        print(f"{path} was written for another --device or --tiny: its other sections are not kept", file=sys.stderr)
        return []
    found = []
    pattern = r"^## (\w+)\n\n`([^`]*)` — (\d+) s(?:, \*\*failed \(exit (-?\d+)\)\*\*)?\n\n```\n(.*?)\n```$"
    for m in re.finditer(pattern, text, flags=re.M | re.S):
        if m[1] in BENCHES:
            found.append((m[1], m[2].split(" "), m[5], float(m[3]), int(m[4] or 0)))
    return found


def write(path: Path, rows, device: str, tiny: bool, kept: tuple[str, ...] = (), commit: str | None = None) -> None:
    """Write the results file; ``commit``: the code the benchmarks ran (default: now, ``_commit()``)."""
    lines = ["# Benchmark results", "",
             "Written by `python -m bench`" + (" --tiny (toy workloads: the numbers mean nothing)" if tiny else "")
             + "; each benchmark measures its variants side by side in one process, so compare the ratios, not "
             "the seconds (these machines are noisy).", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- machine: {_machine()}", f"- device option: {device}", f"- commit: {commit or _commit()}"]
    if kept:
        lines += [f"- kept from the previous run of this file (not re-run by `--only`): {', '.join(kept)}"]
    lines += [""]
    goals = goals_table(rows)
    if goals:
        lines += ["## Goals", "", "Each line a benchmark printed as `goal: ...` (the ratio it measured and whether it "
                  "meets the goal of issue #18); the whole suite's goal comes from the `goal:` line of "
                  "`repro/results/TIMING.md`, where its measurements are (`python -m repro.timing`, not run by "
                  "`python -m bench`):", "", *goals, ""]
    peaks = peaks_table(rows)
    if peaks:
        lines += ["## Fraction of the device's peak", "",
                  "Each line a benchmark printed as `peak: ...`: the matrix-product and convolution FLOPs of the "
                  "timed call (`torch.utils.flop_counter`, forward and backward; element-wise work is not counted) "
                  "over its time, against the device's measured peak (the best of five square GEMMs of that dtype "
                  "in the same process, `harness.matmul_peak`). The optimizer and pooling benchmarks time "
                  "element-wise work and print none.", "", *peaks, ""]
    lines += ["Not measured by these scripts: " + NOT_MEASURED, ""]
    for name, cmd, out, dt, rc in rows:
        status = "" if rc == 0 else f", **failed (exit {rc})**"
        lines += [f"## {name}", "", f"`{' '.join(cmd)}` — {dt:.0f} s{status}", "", "```", out, "```", ""]
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--only", nargs="+", choices=sorted(BENCHES), default=None, help="these benchmarks only")
    p.add_argument("--tiny", action="store_true", help="toy workloads: check that every benchmark runs")
    p.add_argument("--out", type=Path, default=None,
                   help="the results file (default: bench/RESULTS.md; with --tiny: none unless given)")
    args = p.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
            return 2
    out = args.out if args.out is not None else (None if args.tiny else HERE / "RESULTS.md")
    commit = _commit()  # before anything is written: the files this run rewrites would read as uncommitted changes
    rows, ok = run(args.only or list(BENCHES), args.device, args.tiny)
    kept: tuple[str, ...] = ()
    if args.only and out is not None:  # keep the other benchmarks' sections, in the usual order
        fresh = {r[0]: r for r in rows}
        old = {r[0]: r for r in previous_rows(out, args.device, args.tiny) if r[0] not in fresh}
        kept = tuple(old)
        rows = [fresh.get(name) or old[name] for name in BENCHES if name in fresh or name in old]
    if out is not None:
        write(out, rows, args.device, args.tiny, kept, commit)
        print(f"wrote {out}" + (f" (kept {', '.join(kept)} from its previous version)" if kept else ""))
    if args.out is None and not args.tiny:
        import torch

        stamp = (f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, "
                 f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}, commit {commit}")
        if update_readme(ROOT / "README.md", rows, stamp):
            print("updated the goals table in README.md")
        else:
            print(f"README.md has no {README_START} ... {README_END} markers: not updated", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
