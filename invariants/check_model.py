"""``python -m invariants check-model``: the suite's two invariants on a model of your own.

::

    python -m invariants check-model pkg.module:factory --input-shape 3,32,32
    python -m invariants check-model mymodels:gpt --input-shape 16 --input-dtype long --vocab 50 --kwargs '{"dim": 64}'
    python -m invariants check-model mymodels:net --input-shape 784 --spec mymodels:net_spec

``pkg.module:factory`` is imported (the current directory first on ``sys.path``) and called with the
``--kwargs`` JSON object; it must return an ``nn.Module``. ``--input-shape`` is the shape of one
example; a batch of ``--batch`` (4) random examples is the example input (floats ~ N(0, 1), or with an
integer ``--input-dtype`` token ids uniform in ``[0, --vocab)``). The spec is ``fn(model)`` for
``--spec pkg.module:fn``, else the one ``reference.trace.trace_report`` derives (strictly: an operation
no rule covers is an error; ``--no-strict`` holds it fixed instead, and the coverage report says so).

The command prints the coverage report (the trace's, or ``spec_coverage`` for a given spec) and the
report of ``reference.verify.verify_spec``: (i) f(P(θ), x) = f(θ, x) in eval and train mode with
randomised BatchNorm statistics, in float32 and float64 (Eq. (1) of Ainsworth et al. 2023), and
(ii) Σ kᵢ P(θᵢ) = P(Σ kᵢ θᵢ) bit-exactly, as hypothesis properties. Exit status: 0 when both hold,
1 on a violation (the report names the group and the first divergence), 2 on a usage error, a model
or spec that cannot be built, a tracing error, or a spec with nothing to check.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

import torch
from torch import nn

from reference import validate

__all__ = ["CommandError", "add_parser", "load_object", "parse_shape", "run"]

INPUT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "long": torch.int64,
    "int64": torch.int64,
    "int32": torch.int32,
}


class CommandError(Exception):
    """A usage or setup error: printed as ``error: ...``, exit status 2."""


def parse_shape(text: str) -> tuple[int, ...]:
    """``"3,32,32"`` → ``(3, 32, 32)``; raises ``argparse.ArgumentTypeError`` for anything but
    comma-separated positive integers."""
    bad = argparse.ArgumentTypeError(f"expected comma-separated positive integers (e.g. 3,32,32), got {text!r}")
    try:
        shape = tuple(int(p.strip()) for p in text.split(","))
    except ValueError:
        raise bad from None
    if not shape or any(s < 1 for s in shape):
        raise bad
    return shape


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``check-model`` subcommand to ``sub`` (an ``add_subparsers`` result)."""
    p = sub.add_parser(
        "check-model",
        help="check the permutation invariants on your own model (exit 0: hold, 1: violation, 2: error)",
        description="Run the two permutation invariants (reference.verify.verify_spec) on a model of your own.",
    )
    p.add_argument("factory", help="pkg.module:factory returning an nn.Module (the current directory is importable)")
    p.add_argument(
        "--input-shape",
        required=True,
        type=parse_shape,
        metavar="D1,D2,...",
        help="shape of ONE example, e.g. 3,32,32; a batch of --batch examples is used",
    )
    p.add_argument(
        "--input-dtype",
        default="float32",
        choices=sorted(INPUT_DTYPES),
        help="dtype of the input (long/int64/int32: token ids, needs --vocab)",
    )
    p.add_argument("--vocab", type=int, default=None, help="integer inputs are drawn in [0, VOCAB)")
    p.add_argument("--batch", type=int, default=4, help="examples per batch (default 4)")
    p.add_argument("--kwargs", default="{}", metavar="JSON", help="keyword arguments of the factory, a JSON object")
    p.add_argument(
        "--spec",
        default=None,
        metavar="pkg.module:fn",
        help="fn(model) -> PermutationSpec; default: the spec reference.trace.trace_report derives",
    )
    p.add_argument("--examples", type=int, default=25, help="hypothesis examples (default 25)")
    p.add_argument("--seed", type=int, default=0, help="seed of the examples and of the input (default 0)")
    p.add_argument(
        "--no-strict", action="store_true", help="tracing: hold operations without a rule fixed instead of failing"
    )
    p.set_defaults(func=run)
    return p


def load_object(target: str, what: str) -> Any:
    """The object named by ``"pkg.module:attr"`` (``attr`` may be dotted); raises ``CommandError``."""
    if not isinstance(target, str) or target.count(":") != 1:
        raise CommandError(f"{what} must be 'pkg.module:name', got {target!r}")
    module_name, attr = target.split(":")
    if not module_name or not attr:
        raise CommandError(f"{what} must be 'pkg.module:name', got {target!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # ModuleNotFoundError, or the module's own import-time error
        raise CommandError(f"{what}: cannot import module {module_name!r}: {type(e).__name__}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CommandError(f"{what}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CommandError(f"{what}: {target!r} is a {type(obj).__name__}, not a callable")
    return obj


def _build_model(args: argparse.Namespace) -> nn.Module:
    try:
        kwargs = validate.json_object("--kwargs", args.kwargs)
    except ValueError as e:
        raise CommandError(str(e)) from e
    factory = load_object(args.factory, "factory")
    try:
        model = factory(**kwargs)
    except Exception as e:
        raise CommandError(f"{args.factory}(**{kwargs}) raised {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise CommandError(f"{args.factory} returned a {type(model).__name__}, expected an nn.Module")
    return model


def _example_input(args: argparse.Namespace, model: nn.Module) -> torch.Tensor:
    if args.batch < 1:
        raise CommandError(f"--batch must be >= 1, got {args.batch}")
    dtype = INPUT_DTYPES[args.input_dtype]
    shape = (args.batch, *args.input_shape)
    gen = torch.Generator().manual_seed(args.seed)
    if dtype.is_floating_point:
        if args.vocab is not None:
            raise CommandError("--vocab applies to an integer --input-dtype only")
        x = torch.randn(shape, generator=gen, dtype=dtype)
    else:
        if args.vocab is None or args.vocab < 1:
            raise CommandError(f"--input-dtype {args.input_dtype} needs --vocab V >= 1 (token ids in [0, V))")
        x = torch.randint(0, args.vocab, shape, generator=gen, dtype=dtype)
        x.view(-1)[0] = args.vocab - 1  # verify_spec draws ids in [0, max + 1): the whole vocabulary
    tensors = [*model.parameters(), *model.buffers()]
    return x.to(tensors[0].device) if tensors else x


def run(args: argparse.Namespace) -> int:
    """Run ``check-model`` on parsed arguments; returns the exit status (0, 1 or 2)."""
    from reference.permutation import PermutationSpec
    from reference.verify import spec_coverage, verify_spec

    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        model = _build_model(args)
        x = _example_input(args, model)
        if args.spec is not None:
            spec_fn = load_object(args.spec, "--spec")
            try:
                spec = spec_fn(model)
            except Exception as e:
                raise CommandError(f"--spec {args.spec}(model) raised {type(e).__name__}: {e}") from e
            if not isinstance(spec, PermutationSpec):
                raise CommandError(f"--spec {args.spec} returned a {type(spec).__name__}, expected a PermutationSpec")
            coverage = spec_coverage(spec)
        else:
            try:
                from reference.trace import trace_report
            except ImportError as e:
                raise CommandError(f"spec discovery is unavailable ({e}); pass --spec pkg.module:fn") from e
            try:
                traced = trace_report(model, x, strict=not args.no_strict)
            except Exception as e:  # every tracing failure is a setup error, never a violation
                hint = "" if args.no_strict else " (--no-strict holds unsupported operations fixed instead)"
                raise CommandError(f"tracing {type(model).__name__} failed: {e}{hint}") from e
            spec, coverage = traced.spec, traced.text()
        print(f"check-model {args.factory}: {type(model).__name__}, input {list(x.shape)} {args.input_dtype}")
        print("coverage" + (f" (spec from {args.spec}):" if args.spec else " (traced spec):"))
        print("\n".join("  " + ln for ln in coverage.splitlines()))
        try:
            report = verify_spec(model, spec, x, examples=args.examples, seed=args.seed)
        except (TypeError, ValueError) as e:
            raise CommandError(str(e)) from e
    except CommandError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    print(report.text(coverage=False))
    if report.examples == 0:
        print("error: the spec has no permutation group of two or more units: nothing was checked", file=sys.stderr)
        return 2
    return 0 if report.ok else 1
