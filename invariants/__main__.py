"""``python -m invariants check-model pkg.module:factory --input-shape 3,32,32 [...]`` (see ``check_model``).

The property suites themselves run under pytest (``python -m pytest invariants``); this entry point
applies the two invariants to a model outside the zoo.
"""

from __future__ import annotations

import argparse
import sys

from invariants import check_model


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m invariants", description="Permutation invariants of the mode-connectivity suite."
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    check_model.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the command; returns the exit status
    (argparse's usage errors are returned as 2, ``--help`` as 0)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
