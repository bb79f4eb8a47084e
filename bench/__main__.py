"""``python -m bench``: every benchmark, side by side in one run, into ``bench/RESULTS.md``.

Each benchmark is its own script (``bench/bench_*.py``) that measures its variants against each other in
one process and prints ratios; this runs them one after another on one device, with the machine and
versions, and rewrites ``bench/RESULTS.md`` with what they printed. ``--tiny`` runs every script on a toy
workload that only checks that it still runs (what CI does: never a timed assertion); it writes no file
unless ``--out`` is given.

    python -m bench [--device auto|cpu|cuda] [--only NAME ...] [--tiny] [--out bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
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
    "train_many": ("bench_train_many.py", ["--device", "{device}"],
                   ["--device", "{device}", "--n", "64", "--width", "8", "--epochs", "1", "--repeats", "1",
                    "--k", "2"]),
    "weight_matching": ("bench_weight_matching.py", [], ["--widths", "8", "--depth", "1", "--epochs", "1"]),
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


def write(path: Path, rows, device: str, tiny: bool) -> None:
    lines = ["# Benchmark results", "",
             "Written by `python -m bench`" + (" --tiny (toy workloads: the numbers mean nothing)" if tiny else "")
             + "; each benchmark measures its variants side by side in one process, so compare the ratios, not "
             "the seconds (these machines are noisy).", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- machine: {_machine()}", f"- device option: {device}", f"- commit: {_commit()}", ""]
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
    rows, ok = run(args.only or list(BENCHES), args.device, args.tiny)
    if out is not None:
        write(out, rows, args.device, args.tiny)
        print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
