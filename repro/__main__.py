"""``python -m repro list | run TARGET [--quick] [--device auto|cpu|cuda] [--data-dir DIR] [--out DIR] [--seed N]
[--executor local|process|ray] [--workers N] [--address ADDR]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import RunContext, default_cache_dir
from .registry import get_target, load_all

RESULTS = Path(__file__).resolve().parent / "results"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m repro",
                                description="Reproduction targets of the mode-connectivity suite.")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list the targets with their papers and claims")
    r = sub.add_parser("run", help="run one target")
    r.add_argument("target")
    r.add_argument("--quick", action="store_true", help="CPU-sized version (minutes on 2 cores)")
    r.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    r.add_argument("--data-dir", type=Path, default=None, help="folder with MNIST IDX / CIFAR-10 python batches")
    r.add_argument("--out", type=Path, default=None,
                   help="output root; the target writes <out>/<target>/ (default: repro/results, the committed "
                        "full-size results; with --quick: ./runs)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--cache-dir", type=Path, default=None,
                   help=f"trained-endpoint cache (default: $MODECONN_CACHE or {default_cache_dir()})")
    r.add_argument("--dataset", default=None,
                   help="dataset for targets that take one (digits, mnist1d, mnist, cifar10)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--executor", default="local", choices=("local", "process", "ray"),
                   help="where a target's sweep jobs run: in this process (default), in worker processes, "
                        "or on Ray (pip install .[ray]); results are the same")
    r.add_argument("--workers", type=int, default=None,
                   help="process: worker processes (default: all cores); ray: CPUs of a local Ray instance")
    r.add_argument("--address", default=None, help="ray: address of the Ray cluster to join (e.g. auto)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "list":
        for t in load_all().values():
            print(f"{t.name}\n    {t.paper}" + (f" (arXiv:{t.arxiv})" if t.arxiv else ""))
            for c in t.claims:
                print(f"    claim: {c}")
        return 0
    try:
        tgt = get_target(args.target)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    from reference.train import pick_device

    try:
        device = pick_device(args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.workers is not None and args.workers < 1:
        print(f"error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    if args.address is not None and args.executor != "ray":
        print("error: --address is for --executor ray", file=sys.stderr)
        return 2
    if args.executor == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            print("error: --executor ray needs Ray, which is not installed: pip install .[ray]", file=sys.stderr)
            return 2
    if args.data_dir is not None and not args.data_dir.is_dir():
        print(f"error: --data-dir {args.data_dir} is not a directory", file=sys.stderr)
        return 2
    ctx = RunContext(
        target=tgt.name,
        out_root=args.out if args.out is not None else (Path("runs") if args.quick else RESULTS),
        quick=args.quick,
        device=device,
        seed=args.seed,
        data_dir=args.data_dir,
        cache_dir=args.cache_dir or default_cache_dir(),
        options={"dataset": args.dataset, "executor": args.executor, "workers": args.workers,
                 "address": args.address},
        progress=not args.no_progress,
    )
    try:
        tgt.run(ctx)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    ctx.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
