"""``python -m repro list`` · ``python -m repro run TARGET… | --all [--size quick|cpu|paper] [--set k=v]…`` ·
``python -m repro align --model pkg.module:factory --a A.pt --b B.pt --method weight|activation|ste --data D
--out DIR`` (``repro/align.py``) · ``python -m repro report [RESULTS_DIR [RESULTS_DIR_B]] [--out SITE] [--rtol R]``
(``repro/site.py``)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from . import align
from .runner.config import parse_override
from .runner.declare import SIZES, get_target, load_all
from .runner.executors import EXECUTORS, RAY_MISSING
from .runner.output import OutputError
from .runner.run import RunOptions, default_cache_dir, run_target


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m repro",
                                description="Reproduction targets of the mode-connectivity suite.")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="each target's paper, sizes, datasets and claim ids")
    r = sub.add_parser("run", help="run one or more targets")
    r.add_argument("targets", nargs="*", help="target names (see `list`)")
    r.add_argument("--all", action="store_true", help="run every target")
    r.add_argument("--size", choices=SIZES, default=None,
                   help="quick: CI-sized, minutes on CPU; cpu (default): the committed results; paper: the paper's "
                        "models, data and budget")
    r.add_argument("--quick", action="store_true", help="the same as --size quick")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field (dotted for nested ones, e.g. train.epochs=3); repeatable")
    r.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    r.add_argument("--data-dir", type=Path, default=None, help="folder with MNIST IDX / CIFAR-10 python batches")
    r.add_argument("--out", type=Path, default=None,
                   help="output root; a target writes <out>/<target>/ (default: repro/results for --size cpu, "
                        "./runs otherwise)")
    r.add_argument("--seed", type=int, default=None, help="the config's seed (the same as --set seed=N)")
    r.add_argument("--cache-dir", type=Path, default=None,
                   help=f"endpoint and job cache (default: $MODECONN_CACHE or {default_cache_dir()})")
    r.add_argument("--dataset", default=None, help="a dataset the target supports (see `list`)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--executor", default="local", choices=EXECUTORS,
                   help="where jobs run: this process with its torch threads (default), worker processes of one torch "
                        "thread each, or Ray tasks; the thread count is part of every cache key")
    r.add_argument("--workers", type=int, default=None,
                   help="process: worker processes (default: one per usable core); ray: CPUs of a local instance")
    r.add_argument("--address", default=None, help="ray: the cluster to join (e.g. auto)")
    r.add_argument("--targets-at-once", type=int, default=1, metavar="N",
                   help="several targets: run up to N at a time, each in its own process with the other options "
                        "(the same results as one after another; --workers is then per target; the targets' own "
                        "progress bars are off, a line reports each finished target; default 1)")
    align.add_parser(sub)
    rep = sub.add_parser("report", help="build the results site (one folder) or compare two runs (two folders)")
    rep.add_argument("results", nargs="*", type=Path, default=None,
                     help="results folder(s): one builds the site, two compare runs (default: repro/results)")
    rep.add_argument("--out", type=Path, default=Path("site"), help="the site's folder (default: ./site)")
    rep.add_argument("--rtol", type=float, default=0.05,
                     help="compare mode: numbers differ when |a - b| > rtol * max(|a|, |b|) (default 0.05)")
    return p


def _report(args: argparse.Namespace) -> int:
    import time

    from .site import SiteError, build_site

    dirs = args.results or [Path(__file__).resolve().parent / "results"]
    t0 = time.perf_counter()
    try:
        index = build_site(dirs, args.out, rtol=args.rtol)
    except SiteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mode = "comparison of 2 runs" if len(dirs) == 2 else "site"
    print(f"wrote the {mode} to {index} ({time.perf_counter() - t0:.1f} s); open it in a browser")
    return 0


def _list() -> int:
    for t in load_all().values():
        print(f"{t.name}\n    {t.paper}" + (f" (arXiv:{t.arxiv})" if t.arxiv else ""))
        print(f"    sizes: {', '.join(t.sizes)}; datasets: {', '.join(t.datasets)} (default {t.sizes['cpu'].dataset})")
        for c in t.claims:
            print(f"    claim {c.id}: {c.statement}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "list":
        return _list()
    if args.cmd == "align":
        return align.run(args, argv)
    if args.cmd == "report":
        return _report(args)
    if args.quick and args.size not in (None, "quick"):
        print(f"error: --quick contradicts --size {args.size}", file=sys.stderr)
        return 2
    size = "quick" if args.quick else (args.size or "cpu")
    if args.all and args.targets:
        print("error: give target names or --all, not both", file=sys.stderr)
        return 2
    try:
        targets = list(load_all().values()) if args.all else [get_target(n) for n in args.targets]
        overrides = [parse_override(s) for s in args.overrides]
    except (KeyError, ValueError) as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    if not targets:
        print("error: name at least one target, or --all (see `python -m repro list`)", file=sys.stderr)
        return 2
    if args.workers is not None and args.workers < 1:
        print(f"error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    if args.workers is not None and args.executor == "local":
        print("error: --workers is for --executor process or ray (local runs the jobs in this process)",
              file=sys.stderr)
        return 2
    if args.targets_at_once < 1:
        print(f"error: --targets-at-once must be >= 1, got {args.targets_at_once}", file=sys.stderr)
        return 2
    if args.targets_at_once > 1 and len(targets) == 1:
        print("error: --targets-at-once is for several targets (name more than one, or --all)", file=sys.stderr)
        return 2
    if args.address is not None and args.executor != "ray":
        print("error: --address is for --executor ray", file=sys.stderr)
        return 2
    if args.executor == "ray" and importlib.util.find_spec("ray") is None:
        print(f"error: {RAY_MISSING}", file=sys.stderr)
        return 2
    if args.data_dir is not None and not args.data_dir.is_dir():
        print(f"error: --data-dir {args.data_dir} is not a directory", file=sys.stderr)
        return 2
    if args.dataset is not None:
        refused = [t.name for t in targets if args.dataset.strip().lower() not in t.datasets]
        if refused:
            t = get_target(refused[0])
            print(f"error: target {t.name!r} does not take --dataset {args.dataset!r}; it supports: "
                  f"{', '.join(t.datasets)}", file=sys.stderr)
            return 2
    from reference.train import pick_device

    try:
        pick_device(args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.targets_at_once > 1:
        return _run_concurrently(targets, args, size, overrides)
    failed = []
    for t in targets:
        opts = RunOptions(size=size, dataset=args.dataset, seed=args.seed, overrides=overrides, device=args.device,
                          data_dir=args.data_dir, out=args.out, cache_dir=args.cache_dir, executor=args.executor,
                          workers=args.workers, address=args.address, progress=not args.no_progress)
        try:
            run_target(t, opts)
        except (ValueError, FileNotFoundError, OutputError, TypeError) as e:
            print(f"error: {t.name}: {e}", file=sys.stderr)
            failed.append(t.name)
            if len(targets) == 1:
                return 1
    if failed:
        print(f"error: {len(failed)} of {len(targets)} targets failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _run_concurrently(targets, args: argparse.Namespace, size: str, overrides) -> int:
    from .runner.concurrent import longest_first, run_concurrently
    from .runner.config import config_for
    from .runner.run import default_out, output_name, recorded_wall_time

    child = ["--size", size, "--device", args.device, "--executor", args.executor]
    for flag, value in (("--data-dir", args.data_dir), ("--out", args.out), ("--seed", args.seed),
                        ("--cache-dir", args.cache_dir), ("--dataset", args.dataset), ("--workers", args.workers),
                        ("--address", args.address)):
        if value is not None:
            child += [flag, str(value)]
    for s in args.overrides:
        child += ["--set", s]
    child.append("--no-progress")  # a child's output is printed when it finishes; the progress is one line per target
    out_root = args.out if args.out is not None else default_out(size)
    folders = []
    for t in targets:
        try:
            folders.append(Path(out_root) / output_name(t, config_for(t, size, args.dataset, args.seed, overrides)))
        except (ValueError, KeyError, TypeError) as e:
            print(f"error: {t.name}: {e}", file=sys.stderr)
            return 2
    cache_dir = args.cache_dir or default_cache_dir()
    recorded = [recorded_wall_time(cache_dir, f.name, size) for f in folders]
    order = longest_first([t.name for t in targets], folders, recorded)
    failed = run_concurrently(order, child, args.targets_at_once)
    if failed:
        print(f"error: {len(failed)} of {len(targets)} targets failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
