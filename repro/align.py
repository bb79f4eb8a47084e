"""``python -m repro align``: the suite on two checkpoints of one's own model (issue #15, item 5).

Given a model (a zoo name, or any ``pkg.module:factory`` returning an ``nn.Module``) and two of its
checkpoints θ_A and θ_B, find a permutation P of θ_B's hidden units aligned to θ_A by Git Re-Basin's
weight matching, activation matching or straight-through estimator (Ainsworth, Hayase & Srinivasa 2023,
§3.1–3.3; ``reference.matching``), and measure the loss and error along θ_A → P(θ_B) against the naive
θ_A → θ_B, with both barrier definitions of ``reference.barrier`` (``max_chord``: Frankle et al. 2020,
Entezari et al. 2022 Eq. 1; ``mid``: Ainsworth et al. 2023, Definition 2.2).

Steps, each refused with a one-line message (exit 2) where the input does not fit:

1. the model is built; the checkpoints are read (``torch.load(weights_only=True)``: a dict of tensors, one
   under ``"state_dict"`` / ``"params"``, or a ``reference.checkpoint`` file; or ``.safetensors``) and
   compared key by key and shape by shape with the model's ``state_dict`` and with each other; NaN / inf
   weights are refused;
2. the data (``digits``, ``mnist1d``, a folder of MNIST IDX files or CIFAR-10 batches, or an ``.npz`` with
   ``x_train, y_train, x_test, y_test``) are loaded and one batch is run through the model;
3. the spec: ``reference.specs.spec_for`` for a zoo class, else the ``torch.fx`` trace
   (``reference.trace.trace_report`` where it exists, else ``trace_spec``), strict unless ``--no-strict``;
4. matching, the function check ``max |f(P(θ_B), x) − f(θ_B, x)|`` on a test batch (Eq. (1) of Git
   Re-Basin: it is 0 up to rounding for a correct spec; a violation is reported and the command exits 1
   after writing its outputs), then both linear paths on ``--grid`` points, with every point's BatchNorm
   statistics recomputed on training data first when the model has BatchNorm (``reference.bn``; REPAIR's
   "reset", Jordan et al. 2023).

Outputs are written into a staging folder and swapped in as one set (``repro.runner.output.Staging``, the
runner's contract): ``b_aligned.pt`` (a plain state_dict; also ``b_aligned.safetensors`` when B was one),
``permutation.json``, ``path.csv`` / ``path.md`` / ``path.png``, ``summary.json``, ``coverage.txt`` and
``provenance.json``. The inputs are only read: an ``--out`` equal to or containing an input is refused, and
so is an existing non-empty ``--out`` that is not an earlier ``align`` output.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reference import validate

__all__ = [
    "AlignInputError",
    "METHODS",
    "add_parser",
    "architecture_mismatch",
    "build_user_model",
    "check_out",
    "load_align_data",
    "load_state",
    "main",
    "run",
    "spec_coverage_text",
]

METHODS = ("weight", "activation", "ste")
#: the output set; ``b_aligned.safetensors`` is added when B was a ``.safetensors`` file
OUTPUTS = (
    "b_aligned.pt",
    "permutation.json",
    "path.csv",
    "path.md",
    "path.png",
    "summary.json",
    "coverage.txt",
    "provenance.json",
)
#: the function check's tolerance, relative to max(1, max |f(θ_B)|): fp32 reassociation is ~1e-6, TF32
#: convolutions on a GPU ~1e-3
FUNCTION_RTOL = 1e-3
FUNCTION_CHECK_EXAMPLES = 256
BN_RESET_EXAMPLES = 2000
BN_RESET_BATCH = 256


class AlignInputError(ValueError):
    """A usage or input error: reported as one line on stderr, exit status 2."""


# ---------------------------------------------------------------------------------------------
# the command line


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``align`` subcommand to ``python -m repro``'s subparsers; returns its parser."""
    p = sub.add_parser(
        "align",
        help="align two checkpoints of your own model and measure the path between them",
        description="Permutation-align checkpoint B to checkpoint A (Git Re-Basin) and write the loss/error "
        "along A -> P(B) and A -> B, both barrier definitions, the aligned B and the coverage report.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="pkg.module:factory (imported with the current folder on sys.path; called with "
        "--model-kwargs; must return an nn.Module) or zoo:NAME (reference.models.build_model)",
    )
    p.add_argument("--model-kwargs", default="{}", metavar="JSON", help="keyword arguments of the factory")
    p.add_argument("--a", required=True, type=Path, help="checkpoint A (.pt state_dict or .safetensors)")
    p.add_argument("--b", required=True, type=Path, help="checkpoint B, aligned to A")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument(
        "--data",
        required=True,
        help="digits | mnist1d | a folder with MNIST IDX files or CIFAR-10 python batches | a .npz "
        "with x_train, y_train, x_test, y_test",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (written as one set)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0, help="weight-matching order / STE data-order seed")
    p.add_argument("--grid", type=int, default=25, help="points on each path, endpoints included")
    p.add_argument(
        "--no-strict",
        action="store_true",
        help="trace: hold operations the tracer does not know fixed instead of refusing the model",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--input-shape",
        default=None,
        metavar="D1,D2,...",
        help="reshape every example to this shape (e.g. 1,8,8 for digits as images)",
    )
    p.add_argument(
        "--max-examples", type=int, default=None, help="use at most this many examples of each split (default: all)"
    )
    p.add_argument("--restarts", type=int, default=1, help="weight matching: random group orders, best kept")
    p.add_argument(
        "--match-examples",
        type=int,
        default=5000,
        help="activation matching: training examples whose activations are correlated",
    )
    p.add_argument("--ste-steps", type=int, default=200, help="STE: optimiser steps")
    p.add_argument("--ste-lr", type=float, default=1e-2, help="STE: learning rate (SGD, momentum 0.9)")
    p.add_argument("--ste-batch", type=int, default=256, help="STE: batch size")
    p.add_argument("--batch-size", type=int, default=1024, help="evaluation batch size")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m repro.align ARGS`` (the same as ``python -m repro align ARGS``)."""
    parser = argparse.ArgumentParser(prog="python -m repro")
    add_parser(parser.add_subparsers(dest="cmd", required=True))
    full = ["align", *(sys.argv[1:] if argv is None else argv)]
    return run(parser.parse_args(full), full)


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Run the command for parsed ``args``; returns the exit status (0 ok, 1 failed, 2 bad input).

    ``argv``: the arguments of ``python -m repro`` (``align`` first), recorded in ``provenance.json``
    (default ``sys.argv[1:]``).

    Errors are printed as one line on stderr: ``AlignInputError`` (and the ``ValueError`` / ``TypeError`` /
    ``OSError`` raised while reading and checking the inputs) exit 2; a failure while matching or evaluating
    exits 1; a function check beyond ``FUNCTION_RTOL`` exits 1 after the outputs are written.
    """
    command = "python -m repro " + shlex.join(list(sys.argv[1:] if argv is None else argv))
    try:
        job = _prepare(args, command)
    except (ValueError, TypeError, OSError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    try:
        ok = _execute(job)
    except (ValueError, TypeError, RuntimeError, OSError) as e:
        print(f"error: align failed: {_one_line(e)}", file=sys.stderr)
        return 1
    return 0 if ok else 1


def _one_line(e: BaseException) -> str:
    text = str(e.args[0]) if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
    return " ".join(text.split()) or type(e).__name__


# ---------------------------------------------------------------------------------------------
# inputs: the model, the checkpoints, the data, the output folder


def build_user_model(target: str, kwargs: Mapping[str, Any]) -> tuple[nn.Module, str]:
    """The model ``--model`` names, called with ``kwargs``; returns it and a description.

    ``zoo:NAME``: ``reference.models.build_model({"name": NAME, **kwargs})``; ``pkg.module:factory``:
    imported with the current folder first on ``sys.path``. Raises ``AlignInputError`` for a target that
    cannot be imported or called, or that returns something other than an ``nn.Module``.
    """
    if target.startswith("zoo:"):
        from reference.models import MODELS, build_model

        name = target[4:]
        if name not in MODELS:
            raise AlignInputError(f"--model {target}: unknown zoo model {name!r}; known: {', '.join(sorted(MODELS))}")
        try:
            return build_model({"name": name, **kwargs}), f"reference.models.build_model(name={name!r})"
        except (TypeError, ValueError) as e:
            raise AlignInputError(f"--model {target} with --model-kwargs {json.dumps(kwargs)}: {_one_line(e)}") from e
    mod_name, sep, attr = target.partition(":")
    if not sep or not mod_name or not attr:
        raise AlignInputError(f"--model must be pkg.module:factory or zoo:NAME, got {target!r}")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:  # for the import and the factory call only: the caller's sys.path is restored afterwards
        sys.path.insert(0, cwd)
    try:
        importlib.invalidate_caches()
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise AlignInputError(
                f"--model {target}: cannot import {mod_name!r} ({_one_line(e)}); the current "
                f"folder {cwd} is on sys.path"
            ) from e
        except Exception as e:  # noqa: BLE001 - the user's module failed while importing
            raise AlignInputError(
                f"--model {target}: importing {mod_name!r} raised {type(e).__name__}: {_one_line(e)}"
            ) from e
        factory = module
        for part in attr.split("."):
            factory = getattr(factory, part, None)
            if factory is None:
                raise AlignInputError(f"--model {target}: module {mod_name!r} has no attribute {attr!r}")
        if not callable(factory):
            raise AlignInputError(f"--model {target}: {attr!r} is not callable")
        try:
            model = factory(**kwargs)
        except Exception as e:  # noqa: BLE001 - the user's factory failed
            raise AlignInputError(
                f"--model {target}: calling it with --model-kwargs {json.dumps(kwargs)} raised "
                f"{type(e).__name__}: {_one_line(e)}"
            ) from e
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    if not isinstance(model, nn.Module):
        raise AlignInputError(f"--model {target} returned a {type(model).__name__}, not an nn.Module")
    return model, f"{mod_name}:{attr}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_state(path: Path, what: str = "checkpoint") -> tuple[dict[str, Tensor], str]:
    """The state_dict in ``path`` (CPU tensors) and its format (``"safetensors"``, ``"modeconn"`` or
    ``"torch"``).

    ``.safetensors``: ``safetensors.torch.load_file``; anything else: ``torch.load(weights_only=True)``
    (``reference.checkpoint.safe_torch_load``) of a dict of tensors, a dict holding one under
    ``"state_dict"`` or ``"params"``, or a ``reference.checkpoint`` file (read by ``load_checkpoint``).
    Raises ``AlignInputError`` naming ``path`` for a missing, corrupt or unsafe file, a file holding no
    state_dict, or NaN / inf weights.
    """
    from reference.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, safe_torch_load

    path = Path(path)
    if not path.is_file():
        raise AlignInputError(f"{what} {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    if path.suffix == ".safetensors":
        import safetensors.torch

        try:
            state, fmt = dict(safetensors.torch.load_file(str(path), device="cpu")), "safetensors"
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...: re-raised with the path named
            raise AlignInputError(f"{what} {path} is corrupt or not a safetensors file: {_one_line(e)}") from e
    else:
        try:
            obj = safe_torch_load(path)
        except (ValueError, FileNotFoundError) as e:
            raise AlignInputError(f"{what}: {_one_line(e)}") from e
        fmt = "torch"
        if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
            try:
                obj, fmt = load_checkpoint(path).params, "modeconn"
            except ValueError as e:
                raise AlignInputError(f"{what}: {_one_line(e)}") from e
        elif isinstance(obj, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
            for k in ("state_dict", "params", "model_state_dict", "model"):
                if isinstance(obj.get(k), Mapping):
                    obj = obj[k]
                    break
        if not isinstance(obj, Mapping):
            raise AlignInputError(f"{what} {path} holds a {type(obj).__name__}, not a state_dict (a dict of tensors)")
        bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
        if bad or not obj:
            found = f"entries that are not tensors: {bad[:5]}" if bad else "no entries"
            raise AlignInputError(
                f"{what} {path} is not a state_dict (a dict of str -> tensor, or one under "
                f"'state_dict' / 'params'): {found}"
            )
        state = dict(obj)
    for k, v in state.items():
        if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all()):
            n_bad = int((~torch.isfinite(v)).sum())
            raise AlignInputError(f"{what} {path}: key {k!r} holds {n_bad} non-finite value(s) (NaN or inf)")
    return state, fmt


def _more(items: list, n: int = 5) -> str:
    return f"{items[:n]}" + (f" (+{len(items) - n} more)" if len(items) > n else "")


def architecture_mismatch(
    got: Mapping[str, Tensor], want: Mapping[str, Tensor], got_name: str, want_name: str
) -> str | None:
    """``None`` if ``got`` has exactly ``want``'s keys, shapes and kinds (float / integer) of dtype; else a
    text naming the first few missing and unexpected keys and differing shapes."""
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    shapes = [
        f"{k!r} {got_name} {tuple(got[k].shape)} vs {want_name} {tuple(want[k].shape)}"
        for k in want
        if k in got and tuple(got[k].shape) != tuple(want[k].shape)
    ]
    kinds = [
        f"{k!r} {got_name} {got[k].dtype} vs {want_name} {want[k].dtype}"
        for k in want
        if k in got and got[k].is_floating_point() != want[k].is_floating_point()
    ]
    parts = []
    if missing:
        parts.append(f"missing keys {_more(missing)}")
    if extra:
        parts.append(f"unexpected keys {_more(extra)}")
    if shapes:
        parts.append(
            f"shapes differ: {'; '.join(shapes[:5])}" + (f" (+{len(shapes) - 5} more)" if len(shapes) > 5 else "")
        )
    if kinds:
        parts.append(f"dtypes differ: {'; '.join(kinds[:5])}")
    return ", ".join(parts) or None


def _check_architectures(
    model_state: Mapping[str, Tensor], a: Mapping[str, Tensor], b: Mapping[str, Tensor], pa: Path, pb: Path
) -> None:
    ab = architecture_mismatch(b, a, "B", "A")
    am = architecture_mismatch(a, model_state, "A", "model")
    bm = architecture_mismatch(b, model_state, "B", "model")
    if ab:
        fit = " (A fits the model)" if not am else (" (B fits the model)" if not bm else "")
        raise AlignInputError(f"checkpoints {pa} (A) and {pb} (B) are of different architectures{fit}: {ab}")
    if am:
        raise AlignInputError(
            f"checkpoints {pa} and {pb} do not fit the model that --model/--model-kwargs "
            f"builds (A and B agree with each other): {am}"
        )


def load_align_data(spec: str, max_examples: int | None = None, input_shape: tuple[int, ...] | None = None):
    """The ``Dataset`` ``--data`` names (``reference.data``), optionally cut to ``max_examples`` per split and
    reshaped to ``input_shape`` per example; returns it and a JSON-friendly description.

    ``digits`` / ``mnist1d``: the embedded datasets with their loaders' own train/test split; a folder: MNIST
    IDX files if present, else CIFAR-10 python batches (``load_mnist`` / ``load_cifar10``, as the runner's
    ``--data-dir``); ``*.npz``: float inputs and integer labels used as they are (not standardised), 1 +
    the largest label classes. Raises ``AlignInputError`` naming the path for anything else.
    """
    from reference import data as D

    from .runner.context import data_fingerprint, with_view

    info: dict[str, Any] = {"data": spec}
    key = spec.strip().lower()
    path = Path(spec).expanduser()
    try:
        if key in ("digits", "mnist1d"):
            ds = D.load_dataset(key)
        elif path.is_dir():
            has_mnist = any(
                (folder / f).is_file()
                for folder in (path, path / "MNIST" / "raw")
                for stem in D.MNIST_FILES.values()
                for f in (stem, f"{stem}.gz")
            )
            has_cifar = any((folder / D.CIFAR10_FILES[0]).is_file() for folder in (path, path / "cifar-10-batches-py"))
            if not (has_mnist or has_cifar):
                raise AlignInputError(
                    f"--data {spec}: the folder holds neither the MNIST IDX files ({', '.join(D.MNIST_FILES.values())}"
                    f", optionally .gz, in it or in MNIST/raw) nor the CIFAR-10 python batches ("
                    f"{', '.join(D.CIFAR10_FILES)}, in it or in cifar-10-batches-py)"
                )
            ds = D.load_mnist(path) if has_mnist else D.load_cifar10(path)
        elif not path.exists():
            raise AlignInputError(
                f"--data {spec}: no such dataset, folder or file; give digits, mnist1d, a folder "
                "(MNIST IDX / CIFAR-10 batches) or an .npz with x_train, y_train, x_test, y_test"
            )
        elif path.suffix == ".npz":
            ds = _load_npz(path)
            info["sha256"] = _sha256(path)
        else:
            raise AlignInputError(
                f"--data {spec}: a file that is not an .npz; give digits, mnist1d, a folder "
                "(MNIST IDX / CIFAR-10 batches) or an .npz with x_train, y_train, x_test, y_test"
            )
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        if isinstance(e, AlignInputError):
            raise
        raise AlignInputError(f"--data {spec}: {_one_line(e)}") from e
    if max_examples is not None:
        ds = ds.subset(max_examples, max_examples)
    if input_shape is not None:
        n = math.prod(ds.input_shape)
        if math.prod(input_shape) != n:
            raise AlignInputError(
                f"--input-shape {','.join(map(str, input_shape))} has {math.prod(input_shape)} "
                f"values, the examples of {ds.name} have {n} (shape {list(ds.input_shape)})"
            )
        ds = with_view(ds, tuple(input_shape))
    info.update({**ds.describe(), "fingerprint": data_fingerprint(ds)})
    return ds, info


def _load_npz(path: Path):
    import numpy as np

    from reference.data import Dataset

    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
            if missing:
                raise AlignInputError(f"--data {path}: the .npz lacks arrays {missing} (it holds {sorted(f.files)})")
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except AlignInputError:
        raise
    except Exception as e:  # noqa: BLE001 - zipfile / pickle / OS errors: re-raised with the path named
        raise AlignInputError(f"--data {path} is corrupt or not an .npz: {_one_line(e)}") from e
    for k in ("x_train", "x_test"):
        if not (np.issubdtype(arrays[k].dtype, np.floating) or np.issubdtype(arrays[k].dtype, np.integer)):
            raise AlignInputError(f"--data {path}: {k} must be numeric, got dtype {arrays[k].dtype}")
    for k in ("y_train", "y_test"):
        y = arrays[k]
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise AlignInputError(
                f"--data {path}: {k} must be a 1-D integer array of labels, got {y.dtype} {list(y.shape)}"
            )
        if y.size and y.min() < 0:
            raise AlignInputError(f"--data {path}: {k} holds a negative label {int(y.min())}")
    if arrays["y_train"].size == 0 or arrays["y_test"].size == 0:
        raise AlignInputError(f"--data {path}: a split is empty")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise AlignInputError(
            f"--data {path}: x_train examples have shape {list(arrays['x_train'].shape[1:])}, "
            f"x_test examples {list(arrays['x_test'].shape[1:])}"
        )
    x_tr, x_te = (torch.from_numpy(np.ascontiguousarray(arrays[k], dtype=np.float32)) for k in ("x_train", "x_test"))
    y_tr, y_te = (torch.from_numpy(np.ascontiguousarray(arrays[k], dtype=np.int64)) for k in ("y_train", "y_test"))
    for k, x in (("x_train", x_tr), ("x_test", x_te)):
        if not bool(torch.isfinite(x).all()):
            raise AlignInputError(f"--data {path}: {k} holds NaN or inf")
    n_cls = int(max(int(y_tr.max()), int(y_te.max()))) + 1
    try:
        return Dataset(
            name=path.stem,
            x_train=x_tr,
            y_train=y_tr,
            x_test=x_te,
            y_test=y_te,
            num_classes=n_cls,
            input_shape=tuple(x_tr.shape[1:]),
            info={"source": str(path), "normalisation": "none"},
        )
    except (TypeError, ValueError) as e:
        raise AlignInputError(f"--data {path}: {_one_line(e)}") from e


def check_out(out: Path, inputs: Sequence[Path]) -> Path:
    """The resolved ``--out`` folder, refused (``AlignInputError``) if it is a file, is or contains an input
    file (the set is swapped in whole: what it held is removed), or is a non-empty folder that is not an
    earlier ``align`` output (it would be replaced)."""
    out = Path(out).expanduser().resolve()
    for p in inputs:
        rp = Path(p).expanduser().resolve()
        if rp == out:
            raise AlignInputError(
                f"--out {out} is an input (--a, --b or --data); choose a new folder (inputs are never overwritten)"
            )
        if out in rp.parents:
            raise AlignInputError(
                f"--out {out} contains the input {rp}; choose a folder that holds no input (the "
                "output set replaces the folder as a whole)"
            )
    if out.exists() and not out.is_dir():
        raise AlignInputError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        summary = out / "summary.json"
        try:
            earlier = json.loads(summary.read_text()).get("command") == "align"
        except (OSError, ValueError, AttributeError):
            earlier = False
        if not earlier:
            raise AlignInputError(
                f"--out {out} is a non-empty folder that is not an earlier align output; it "
                "would be replaced as a whole: choose a new or empty folder"
            )
    return out


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        dims = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise AlignInputError(f"--input-shape must be positive integers separated by commas (e.g. 1,8,8), got {text!r}")
    return dims


# ---------------------------------------------------------------------------------------------
# the spec and its coverage report


def spec_coverage_text(spec, source: str, held: Sequence[tuple[str, str]] = ()) -> str:
    """The coverage report of ``spec`` (``reference.trace.spec_coverage``) under a header saying where the
    spec came from (``source``)."""
    from reference.trace import spec_coverage

    return f"# permutation spec coverage ({source})\n\n{spec_coverage(spec, held)}\n"


def _spec(model: nn.Module, x: Tensor, strict: bool) -> tuple[Any, str, str]:
    """The spec, its source, and the coverage text."""
    from reference import trace
    from reference.specs import spec_for

    try:
        spec = spec_for(model)
    except ValueError:
        spec = None
    if spec is not None:
        src = f"hand-written: reference.specs.spec_for({type(model).__name__})"
        return spec, src, spec_coverage_text(spec, src)
    try:
        rep = trace.trace_report(model, x, strict=strict)
    except (ValueError, TypeError) as e:
        hint = "" if not strict else "; --no-strict holds operations the tracer does not know fixed"
        raise AlignInputError(
            f"cannot derive the permutation spec of {type(model).__name__}: {_one_line(e)}{hint}"
        ) from e
    src = f"traced: reference.trace.trace_report(strict={strict})"
    return rep.spec, src, spec_coverage_text(rep.spec, src, rep.held)


# ---------------------------------------------------------------------------------------------
# the job


@dataclass
class _Job:
    args: argparse.Namespace
    command: str
    model: nn.Module
    model_desc: str
    kwargs: dict
    a: dict[str, Tensor]
    b: dict[str, Tensor]
    b_orig: dict[str, Tensor]
    b_format: str
    inputs: dict
    data: Any
    data_info: dict
    spec: Any
    spec_source: str
    coverage: str
    device: torch.device
    out: Path
    t0: float


def _prepare(args: argparse.Namespace, command: str) -> _Job:
    """Every check that comes before any work (module docstring, steps 1-3)."""
    from reference.train import pick_device

    from .runner.output import OutputError, check_writable

    t0 = time.perf_counter()
    for name, lo in (
        ("grid", 2),
        ("restarts", 1),
        ("match_examples", 2),
        ("ste_steps", 1),
        ("ste_batch", 1),
        ("batch_size", 1),
    ):
        if getattr(args, name) < lo:
            raise AlignInputError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(args, name)}")
    if args.max_examples is not None and args.max_examples < 2:
        raise AlignInputError(f"--max-examples must be >= 2, got {args.max_examples}")
    if not (math.isfinite(args.ste_lr) and args.ste_lr > 0):
        raise AlignInputError(f"--ste-lr must be a positive number, got {args.ste_lr}")
    try:
        kwargs = validate.json_object("--model-kwargs", args.model_kwargs)
    except ValueError as e:
        raise AlignInputError(str(e)) from e
    input_shape = _parse_shape(args.input_shape)
    inputs = [Path(args.a), Path(args.b)]
    data_path = Path(args.data).expanduser()
    if args.data.strip().lower() not in ("digits", "mnist1d") and data_path.exists():
        inputs.append(data_path)
    out = check_out(args.out, inputs)
    try:
        check_writable(out.parent, "--out's parent folder")
    except OutputError as e:
        raise AlignInputError(str(e)) from e
    try:
        device = pick_device(args.device)
    except ValueError as e:
        raise AlignInputError(f"--device {args.device}: {_one_line(e)}") from e

    a, a_fmt = load_state(args.a, "checkpoint A")
    b, b_fmt = load_state(args.b, "checkpoint B")
    model, desc = build_user_model(args.model, kwargs)
    model_state = model.state_dict()
    _check_architectures(model_state, a, b, Path(args.a), Path(args.b))
    b_orig = b

    def cast(p: Mapping[str, Tensor]) -> dict[str, Tensor]:  # work in the model's floating dtypes
        return {k: v.to(model_state[k].dtype) if v.is_floating_point() else v for k, v in p.items()}

    a, b = cast(a), cast(b)
    data, data_info = load_align_data(args.data, args.max_examples, input_shape)
    _check_runs(model, a, data)
    spec, src, coverage = _spec(model, data.x_train[:8], strict=not args.no_strict)
    try:
        spec.check_params(a)
    except ValueError as e:
        raise AlignInputError(f"the permutation spec ({src}) does not fit the checkpoints: {_one_line(e)}") from e
    file_info = {
        name: {
            "path": str(Path(p).resolve()),
            "sha256": _sha256(Path(p)),
            "bytes": Path(p).stat().st_size,
            "format": fmt,
        }
        for name, p, fmt in (("a", args.a, a_fmt), ("b", args.b, b_fmt))
    }
    return _Job(
        args,
        command,
        model,
        desc,
        kwargs,
        a,
        b,
        b_orig,
        b_fmt,
        file_info,
        data,
        data_info,
        spec,
        src,
        coverage,
        device,
        out,
        t0,
    )


def _check_runs(model: nn.Module, a: Mapping[str, Tensor], data) -> None:
    """One batch of the data through the model at θ_A: a shape error becomes a clear message."""
    from torch.func import functional_call

    x = data.x_train[:2]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = functional_call(model, dict(a), (x,))
    except Exception as e:  # noqa: BLE001 - any failure of the user's forward on this input
        raise AlignInputError(
            f"the model does not accept the data: examples of {data.name} have shape {list(data.input_shape)} "
            f"(a batch is {list(x.shape)}) and its forward raised {type(e).__name__}: {_one_line(e)}; "
            "--input-shape reshapes the examples"
        ) from e
    finally:
        model.train(was)
    if not isinstance(out, Tensor) or out.ndim != 2:
        got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise AlignInputError(
            f"the model's output on a batch of {list(x.shape)} is {got}; align needs logits [batch, classes]"
        )
    if out.shape[1] < data.num_classes:
        raise AlignInputError(
            f"the model has {out.shape[1]} outputs, the data {data.name} has {data.num_classes} classes"
        )


def _execute(job: _Job) -> bool:
    """Matching, the function check, both paths and the output set; returns the function check's verdict."""
    from reference.barrier import evaluate_linear_path, evaluate_path, linear_path
    from reference.bn import has_batchnorm
    from reference.checkpoint import atomic_write_bytes
    from reference.evaluate import predict_logits
    from reference.params import stack

    from .runner.output import Staging
    from .runner.run import device_description, git_commit, versions
    from .runner.util import jsonable

    args, dev, spec, model, data = job.args, job.device, job.spec, job.model.to(job.device), job.data.to(job.device)
    a = {k: v.to(dev) for k, v in job.a.items()}
    b = {k: v.to(dev) for k, v in job.b.items()}
    print(
        f"align: {job.model_desc} ({type(job.model).__name__}), {len(spec.sizes)} permutation group(s) "
        f"[{job.spec_source}], method {args.method}, data {data.name} ({data.num_train} train / {data.num_test} "
        f"test), device {dev}",
        flush=True,
    )
    if not spec.sizes:
        print(
            f"warning: the spec ({job.spec_source}) has no permutation group: nothing to align, P is empty and "
            f"P(θ_B) = θ_B (see coverage.txt for what was held fixed)",
            file=sys.stderr,
        )
    t_match = time.perf_counter()
    match, objective = _match(job, model, a, b, data)
    t_match = time.perf_counter() - t_match
    perm = match.perm
    pb = perm.apply(spec, b)

    # Eq. (1) of Git Re-Basin: f(P(θ_B), x) = f(θ_B, x)
    xc = data.x_test[:FUNCTION_CHECK_EXAMPLES]
    logits = predict_logits(model, stack([b, pb]), xc, batch_size=args.batch_size, device=dev)
    diff = float((logits[1].double() - logits[0].double()).abs().max())
    scale = float(logits[0].double().abs().max())
    fcheck = {
        "max_abs_diff": diff,
        "max_abs_logit": scale,
        "relative": diff / max(1.0, scale),
        "examples": int(xc.shape[0]),
        "split": "test",
        "mode": "eval",
        "rtol": FUNCTION_RTOL,
        "ok": bool(diff <= FUNCTION_RTOL * max(1.0, scale)),
    }

    bn = has_batchnorm(model)
    splits = {"train": (data.x_train, data.y_train), "test": (data.x_test, data.y_test)}
    bn_x = data.x_train[:BN_RESET_EXAMPLES]
    paths = {}
    for name, end in (("aligned", pb), ("naive", b)):
        if not bn:  # the first layer's outputs combined from the endpoints' where that pays
            paths[name] = evaluate_linear_path(model, a, end, args.grid, splits, batch_size=args.batch_size, device=dev)
            continue
        t, pts = linear_path(a, end, args.grid)
        paths[name] = evaluate_path(model, t, pts, splits, recompute_bn=True, bn_x=bn_x, bn_batch_size=BN_RESET_BATCH,
                                    batch_size=args.batch_size, device=dev)
    barriers = {
        n: {f"{x.split}_{x.metric}_{x.kind}": {"value": x.value, "t_max": x.t_max} for x in pe.barriers()}
        for n, pe in paths.items()
    }
    rows = []
    for name, pe in paths.items():
        for i, tv in enumerate(pe.t.tolist()):
            rows.append(
                {
                    "path": name,
                    "t": round(tv, 6),
                    **{f"{s}_{m}": float(v[i]) for s, per in pe.curves.items() for m, v in per.items()},
                }
            )
    ends = {
        "a": {f"{s}_{m}": float(v[0]) for s, per in paths["naive"].curves.items() for m, v in per.items()},
        "b": {f"{s}_{m}": float(v[-1]) for s, per in paths["naive"].curves.items() for m, v in per.items()},
        "b_aligned": {f"{s}_{m}": float(v[-1]) for s, per in paths["aligned"].curves.items() for m, v in per.items()},
    }

    summary = {
        "command": "align",
        "method": args.method,
        "model": job.model_desc,
        "model_class": type(job.model).__name__,
        "model_kwargs": job.kwargs,
        "spec_source": job.spec_source,
        "groups": len(spec.sizes),
        "permutable_units": sum(spec.sizes.values()),
        "moved_units": sum(perm.num_moved().values()),
        "objective": objective,
        "function_check": fcheck,
        "bn_reset": {
            "applied": bn,
            **({"examples": int(bn_x.shape[0]), "batch_size": BN_RESET_BATCH, "method": "pooled"} if bn else {}),
        },
        "grid": args.grid,
        "barrier_definitions": {
            "max_chord": "max_t v(t) - [(1 - t) v(0) + t v(1)] (Frankle et al. 2020; Entezari et al. 2022, Eq. 1)",
            "mid": "max_t v(t) - (v(0) + v(1)) / 2 (Ainsworth et al. 2023, Definition 2.2)",
        },
        "barriers": barriers,
        "endpoints": ends,
        "seed": args.seed,
        "data": {
            k: job.data_info[k] for k in ("name", "num_train", "num_test", "num_classes", "input_shape", "fingerprint")
        },
        "device": device_description(dev),
        "matching_seconds": round(t_match, 3),
    }
    vs = versions()
    try:
        import importlib.metadata as md

        vs["safetensors"] = md.version("safetensors")
    except Exception:  # noqa: BLE001 - not installed: recorded as such
        vs["safetensors"] = "not installed"
    prov = {
        "command": job.command,
        "argv": [*sys.argv],
        "cwd": os.getcwd(),
        "model": job.model_desc,
        "model_kwargs": job.kwargs,
        "inputs": job.inputs,
        "data": job.data_info,
        "device": device_description(dev),
        "versions": vs,
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "git": git_commit(),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "wall_time_s": None,
        "finished_utc": None,
    }

    b_al = perm.apply(spec, job.b_orig)  # in B's own dtypes, on the CPU
    staging = Staging(job.out.parent, job.out.name)
    try:
        import io

        buf = io.BytesIO()
        torch.save({k: v.contiguous() for k, v in b_al.items()}, buf)
        atomic_write_bytes(buf.getvalue(), staging.dir / "b_aligned.pt")
        if job.b_format == "safetensors":
            import safetensors.torch

            atomic_write_bytes(
                safetensors.torch.save({k: v.contiguous() for k, v in b_al.items()}, metadata={"format": "pt"}),
                staging.dir / "b_aligned.safetensors",
            )
        staging.write_text("permutation.json", perm.to_json() + "\n")
        staging.write_table(
            "path", rows, title=f"Loss and error along θ_A → P(θ_B) ({args.method} matching) and θ_A → θ_B (naive)"
        )
        staging.save_figure("path", _figure(rows, args.method, bn))
        staging.write_text("coverage.txt", job.coverage)
        staging.write_text("summary.json", json.dumps(jsonable(summary), indent=2, ensure_ascii=False) + "\n")
        prov["wall_time_s"] = round(time.perf_counter() - job.t0, 2)
        prov["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        staging.write_text("provenance.json", json.dumps(jsonable(prov), indent=2, ensure_ascii=False) + "\n")
        final = staging.commit()
    except BaseException:
        staging.discard()
        raise
    finally:
        for d in (job.out.parent / ".staging", job.out.parent / ".old"):
            try:
                d.rmdir()  # only when empty: another run may be using it
            except OSError:
                pass
    al, nv = barriers["aligned"], barriers["naive"]
    print(
        f"align: train loss barrier (mid) naive {nv['train_loss_mid']['value']:.4f} -> aligned "
        f"{al['train_loss_mid']['value']:.4f}; test error barrier (mid) naive {nv['test_error_mid']['value']:.4f} "
        f"-> aligned {al['test_error_mid']['value']:.4f}; BN reset: {'yes' if bn else 'no (no BatchNorm)'}",
        flush=True,
    )
    print(f"wrote {final}", flush=True)
    if not fcheck["ok"]:
        print(
            f"error: the permutation changed B's function: max |f(P(θ_B)) - f(θ_B)| = {diff:.3g} on "
            f"{fcheck['examples']} test examples (max |logit| {scale:.3g}); the spec ({job.spec_source}) is wrong "
            f"for this model, see {final / 'coverage.txt'}",
            file=sys.stderr,
        )
    return fcheck["ok"]


def _match(job: _Job, model: nn.Module, a: dict, b: dict, data) -> tuple[Any, dict]:
    """The method's ``MatchResult`` and a description of its objective."""
    from reference.matching import activation_matching, weight_matching

    args, spec = job.args, job.spec
    if args.method == "weight":
        r = weight_matching(spec, a, b, seed=args.seed, restarts=args.restarts)
        return r, {
            "name": "weight matching: sum_k <θ_A[k], P(θ_B)[k]> (Git Re-Basin §3.2; higher is better)",
            "value": r.objective,
            "identity": r.history[0],
            "passes": len(r.history) - 1,
            "restarts": r.restart_objectives,
        }
    if args.method == "activation":
        x = data.x_train[: args.match_examples]
        r = activation_matching(model, spec, a, b, x, batch_size=args.batch_size)
        return r, {
            "name": "activation matching: sum over groups and units of the Pearson correlation of matched "
            "units (Git Re-Basin §3.1; higher is better)",
            "value": r.objective,
            "identity": r.history[0],
            "examples": int(x.shape[0]),
        }
    from reference.ste import ste_matching

    r = ste_matching(
        model,
        spec,
        a,
        b,
        data.x_train,
        data.y_train,
        steps=args.ste_steps,
        lr=args.ste_lr,
        batch_size=args.ste_batch,
        seed=args.seed,
        device=job.device,
        progress=not args.no_progress,
    )
    return r, {
        "name": "straight-through estimator: training loss at the midpoint (θ_A + P(θ_B)) / 2 "
        "(Git Re-Basin §3.3; lower is better; starts at weight matching)",
        "value": r.objective,
        "initial": r.history[0],
        "steps": args.ste_steps,
        "best_step": r.best_step,
        "lr": args.ste_lr,
        "batch_size": args.ste_batch,
    }


def _figure(rows: list[dict], method: str, bn: bool):
    from .runner.util import seaborn

    plt, pd, sns = seaborn()
    df = pd.DataFrame(rows)
    long = df.melt(id_vars=["path", "t"], var_name="what", value_name="value")
    long["split"] = long["what"].str.split("_").str[0]
    long["metric"] = long["what"].str.split("_").str[1]
    long["path"] = long["path"].map({"aligned": f"θ_A → P(θ_B) ({method})", "naive": "θ_A → θ_B (naive)"})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("loss", "error"), strict=True):
        sns.lineplot(data=long[long["metric"] == metric], x="t", y="value", hue="path", style="split", ax=ax)
        ax.set_title(f"{'cross-entropy' if metric == 'loss' else 'error'}" + (" (BN reset)" if bn else ""))
        ax.set_xlabel("t")
        ax.set_ylabel(metric)
    axes[0].get_legend().remove()
    sns.move_legend(axes[1], "upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(main())
