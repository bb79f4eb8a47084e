"""Where a reproduction target's wall time goes: training, alignment, evaluation, report, other.

``python -m repro.timing [--size quick|cpu] [--targets NAME …] [--out FILE.md] [--cache-dir DIR]
[--device auto|cpu|cuda] [--threads N] [--set FIELD=VALUE]…`` runs each target (default: every registered
one) through the normal runner in this process (:func:`repro.runner.run.run_target`, the ``local`` executor,
no progress bars), with a fresh temporary cache per target unless ``--cache-dir`` is given, and its output set
written to a temporary folder (never to ``repro/results/``). It prints a Markdown table, one row per target
(the total wall time, and seconds and share of each phase) and a total row, under the machine, date, commit
and size; ``--out`` also writes it to a file (atomically). The size defaults to ``quick``: every target at
``cpu`` size takes hours. ``--threads 1`` matches the committed results, and keeps a loaded machine's
thread wake-ups from dominating the numbers.

``python -m repro.timing --from-provenance [RESULTS_DIR] [--targets OUTPUT …] [--out FILE.md]`` tabulates the
``wall_time_s`` of the committed output sets instead (``RESULTS_DIR/*/provenance.json``, default
``repro/results``): the "before" numbers, one total per output, with no phase breakdown (provenance records none).

**Phases.** :data:`PHASES` lists, per phase, the public entry points that are charged to it, as
``"module:qualname"``:

- *training*: ``reference.fit.fit`` and every public trainer that calls it (``train``, ``train_many``, curves,
  SPRO / ESPRO simplexes, FGE, deep ensembles, NEB). The runner's endpoint training is ``train_many``.
- *alignment*: permutation search and the connectors built from it: weight / activation / Sinkhorn / STE
  matching (STE calls ``fit``; the outermost call wins, so its steps count as alignment), MergeMany, the
  universe methods (synchronisation, C2M3's Frank–Wolfe, sync-ascent) and their objectives, permuted-simplex
  alignment and gluing, Anokhin & Yarotsky's distribution connectors and WA ensembles.
- *evaluation*: ``reference.evaluate``, barriers and path / curve / NEB / simplex evaluation, ensemble tables,
  the Hessian (module functions and the heavy ``LossHessian`` methods) and the loss plane. BatchNorm
  statistics recomputation (``reference.bn``), REPAIR and BN reset (``reference.merge.repair`` / ``bn_reset``
  / ``channel_statistics``) are evaluation too: they are forward passes over the training inputs at the very
  points that are about to be evaluated, their cost grows with the number of points evaluated, and they change
  no permutation.
- *report*: the target's ``report(cfg, results)`` and the writing of its tables and figures
  (``Staging.write_report``, where matplotlib renders the PNGs).
- *other*: the rest of the run's wall time: loading and fingerprinting data, the caches (endpoint checkpoints,
  job records), provenance, parameter arithmetic (``reference.params``, ``linear_path``, sampling points), and
  any computation a target does itself without calling a listed function.

**Attribution.** Each listed function is wrapped by :meth:`PhaseTimer.timed`; a depth counter charges the
wall time of the *outermost* wrapped call only, to that call's phase, so a call made inside another (``fit``
inside ``train_many``, ``evaluate_points`` inside ``evaluate_path``, ``fit`` inside ``ste_matching``) is never
counted twice. The phases are therefore disjoint intervals of the run, and ``other`` is the total minus their
sum. On CUDA every outermost call synchronises the device at its start and end, so no queued kernel is
charged to the wrong phase.

**Reaching every caller.** The targets import functions by name (``from reference.evaluate import
evaluate_points``), which binds the function object in the importing module; replacing the attribute of
``reference.evaluate`` alone would not reach them. :func:`instrumented` therefore replaces the function in
*every* module in ``sys.modules`` whose globals hold that very object (an identity check, so an unrelated
function of the same name is left alone), and sets class attributes (``Class.method`` entries) on their
class. Modules imported while the run goes bind the wrapper from the patched module. On exit, normal or not,
every module global that holds a wrapper (including those of modules imported meanwhile) gets its original
back, and so does every class attribute. Calls through references held elsewhere (a dict of methods, a
default argument, a closure made before the patch) are not intercepted; those through a listed public
function are, as they are nested in it.

Numbers include first-call costs of this process (a target timed first pays for warming up torch's kernels),
and in-process memos persist from target to target (the loaded datasets, as in ``python -m repro run --all``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import inspect
import json
import os
import platform
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from reference.checkpoint import atomic_write_text
from reference.fit import pick_device

from .runner.config import parse_override
from .runner.declare import Target, get_target, load_all
from .runner.output import OutputError
from .runner.run import RESULTS, RunOptions, device_description, git_commit, run_target
from .runner.util import markdown_table

__all__ = ["PHASES", "PHASE_NAMES", "PhaseTimer", "TargetTiming", "instrumented", "main", "provenance_table",
           "read_provenance", "resolve_phases", "time_target", "timing_table"]

F = TypeVar("F", bound=Callable[..., Any])

#: the public entry points charged to each phase, as "module:qualname" (see the module docstring)
PHASES: dict[str, tuple[str, ...]] = {
    "training": (
        "reference.fit:fit",
        "reference.train:train",
        "reference.train:train_many",
        "reference.curves:train_curve",
        "reference.simplex:train_simplex",
        "reference.simplex:espro_ensemble",
        "reference.ensembles:fge",
        "reference.ensembles:deep_ensemble",
        "reference.neb:neb",
    ),
    "alignment": (
        "reference.matching:weight_matching",
        "reference.matching:weight_matching_objective",
        "reference.matching:activation_matching",
        "reference.matching:sinkhorn_matching",
        "reference.ste:ste_matching",
        "reference.merge:merge_many",
        "reference.merge:canonical_permutation",
        "reference.merge:permutation_sync",
        "reference.merge:universe_alignment",
        "reference.merge:nontransitivity",
        "reference.universe:frank_wolfe_universe",
        "reference.universe:sync_ascent",
        "reference.universe:all_pairs_objective",
        "reference.universe:relaxed_objective",
        "reference.universe:pairwise_agreement",
        "reference.universe:star_agreement",
        "reference.permuted_simplex:align_simplex",
        "reference.permuted_simplex:interior_alignment",
        "reference.glue:glue",
        "reference.distribution:connection_path",
        "reference.distribution:wa_ensemble",
    ),
    "evaluation": (
        "reference.evaluate:predict_logits",
        "reference.evaluate:evaluate_points",
        "reference.evaluate:accuracy",
        "reference.evaluate:nll",
        "reference.evaluate:ece",
        "reference.evaluate:auroc_ovr",
        "reference.evaluate:all_metrics",
        "reference.evaluate:ensemble_metrics",
        "reference.barrier:barrier",
        "reference.barrier:evaluate_path",
        "reference.curves:evaluate_curve",
        "reference.neb:evaluate_neb",
        "reference.simplex_barrier:evaluate_simplex",
        "reference.simplex_barrier:simplex_barrier",
        "reference.ensembles:ensemble_probs",
        "reference.ensembles:ensemble_table",
        "reference.bn:recompute_bn_stats",
        "reference.bn:recompute_bn_stats_batched",
        "reference.merge:repair",
        "reference.merge:bn_reset",
        "reference.merge:channel_statistics",
        "reference.hessian:hvp",
        "reference.hessian:hvp_reverse_over_reverse",
        "reference.hessian:hvp_double_backward",
        "reference.hessian:loss_hessian",
        "reference.hessian:LossHessian.loss",
        "reference.hessian:LossHessian.grad",
        "reference.hessian:LossHessian.hvp",
        "reference.hessian:LossHessian.hvp_many",
        "reference.hessian:LossHessian.dense",
        "reference.hessian:exact_spectrum",
        "reference.hessian:top_eigenvalues",
        "reference.hessian:hutchinson_trace",
        "reference.hessian:lanczos",
        "reference.hessian:slq",
        "reference.hessian:curve_directions",
        "reference.hessian:directional_curvature",
        "reference.hessian:input_jacobian",
        "reference.landscape:plane_grid",
    ),
    # the target's own report(cfg, results) is charged here too (time_target wraps it)
    "report": ("repro.runner.output:Staging.write_report",),
}

#: the table's phase columns, in order; ``other`` is the run's wall time outside every timed call
PHASE_NAMES: tuple[str, ...] = (*PHASES, "other")


class PhaseTimer:
    """Wall seconds per phase, each outermost timed call charged to its phase (nested ones are not).

    ``sync`` (e.g. ``torch.cuda.synchronize``) is called at the start and the end of every outermost call."""

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.sync = sync
        self._depth = 0

    def _now(self) -> float:
        if self.sync is not None:
            self.sync()
        return time.perf_counter()

    def timed(self, phase: str, fn: F) -> F:
        """``fn`` wrapped: the same result, its wall time charged to ``phase`` unless a timed call encloses it."""

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            outer = self._depth == 0
            t0 = self._now() if outer else 0.0
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if outer:
                    self.seconds[phase] = self.seconds.get(phase, 0.0) + self._now() - t0

        return wrapper  # type: ignore[return-value]


def _resolve(entry: str) -> tuple[Any, str, Callable[..., Any]]:
    """``(owner, attribute, function)`` of a ``"module:qualname"`` entry; the owner is a module or a class
    that defines the function itself (not one that inherits it)."""
    import importlib

    module, sep, qualname = entry.partition(":")
    if not sep or not module or not qualname:
        raise ValueError(f"a phase entry is 'module:qualname', got {entry!r}")
    owner: Any = importlib.import_module(module)
    *path, attr = qualname.split(".")
    for part in path:
        owner = getattr(owner, part, None)
        if not isinstance(owner, type):
            raise ValueError(f"phase entry {entry!r}: {module}.{'.'.join(path)} is not a class")
    fn = vars(owner).get(attr)
    if not inspect.isfunction(fn):
        raise ValueError(f"phase entry {entry!r}: {module} defines no function {qualname} "
                         f"(found {type(fn).__name__}); list the public functions of the phase")
    if inspect.isgeneratorfunction(fn):
        raise ValueError(f"phase entry {entry!r} is a generator function: its work happens after it returns")
    return owner, attr, fn


def resolve_phases(phases: Mapping[str, Sequence[str]] = PHASES) -> list[tuple[str, Any, str, Callable[..., Any]]]:
    """``(phase, owner, attribute, function)`` of every entry of ``phases``, importing their modules.
    ``ValueError`` for an entry that names no function, or for one function listed under two phases."""
    out: list[tuple[str, Any, str, Callable[..., Any]]] = []
    phase_of: dict[int, str] = {}
    for phase, entries in phases.items():
        for entry in entries:
            owner, attr, fn = _resolve(entry)
            if phase_of.setdefault(id(fn), phase) != phase:
                raise ValueError(f"phase entry {entry!r} is listed under {phase_of[id(fn)]!r} and {phase!r}")
            out.append((phase, owner, attr, fn))
    return out


def _swap_globals(swaps: Mapping[int, tuple[object, object]]) -> None:
    """In every module of ``sys.modules``, replace each global that *is* ``old`` by ``new``
    (``swaps``: ``id(old) -> (old, new)``)."""
    for module in list(sys.modules.values()):
        if not isinstance(module, types.ModuleType):
            continue
        namespace = module.__dict__
        for name, value in list(namespace.items()):
            pair = swaps.get(id(value))
            if pair is not None and pair[0] is value:
                namespace[name] = pair[1]


@contextlib.contextmanager
def instrumented(timer: PhaseTimer, phases: Mapping[str, Sequence[str]] = PHASES) -> Iterator[None]:
    """Within the block, every function listed in ``phases`` is timed by ``timer``: wherever a module holds it
    (``from x import f`` aliases included) and on its class for ``Class.method`` entries. Everything is
    restored on exit, also when the block raises. Raises what :func:`resolve_phases` raises, before patching."""
    wrappers: dict[int, tuple[Callable[..., Any], Callable[..., Any]]] = {}  # id(fn) -> (fn, its wrapper)
    on_classes: list[tuple[type, str, Callable[..., Any]]] = []
    for phase, owner, attr, fn in resolve_phases(phases):
        if id(fn) not in wrappers:
            wrappers[id(fn)] = (fn, timer.timed(phase, fn))
        if isinstance(owner, type):
            on_classes.append((owner, attr, fn))
    try:
        for cls, attr, fn in on_classes:
            setattr(cls, attr, wrappers[id(fn)][1])
        _swap_globals(wrappers)
        yield
    finally:
        _swap_globals({id(wrapper): (wrapper, fn) for fn, wrapper in wrappers.values()})
        for cls, attr, fn in on_classes:
            setattr(cls, attr, fn)


@dataclasses.dataclass(frozen=True)
class TargetTiming:
    """One target's run: its output name, total wall seconds, and seconds per phase (:data:`PHASE_NAMES`;
    ``other`` = total minus the timed phases)."""

    target: str
    total_s: float
    seconds: Mapping[str, float]

    @classmethod
    def of(cls, target: str, total_s: float, timed: Mapping[str, float]) -> TargetTiming:
        unknown = set(timed) - set(PHASES)
        if unknown:
            raise ValueError(f"unknown phase(s) {sorted(unknown)}; the phases are {list(PHASES)}")
        seconds = {p: float(timed.get(p, 0.0)) for p in PHASES}
        seconds["other"] = max(0.0, total_s - sum(seconds.values()))
        return cls(target, float(total_s), seconds)


def time_target(t: Target, size: str = "quick", *, cache_dir: Path | None = None, device: str = "auto",
                overrides: Sequence[tuple[str, str]] = (), outputs: Path | None = None) -> TargetTiming:
    """Run ``t`` at ``size`` through the runner in this process (``local`` executor, no progress bars, its
    log on stderr) with every phase timed. Outputs go to ``outputs`` (the runner's ``--out``: the target's
    folders are written under it, to compare with ``python -m repro report A B``) or to a temporary folder
    that is removed; the cache is ``cache_dir``, or a fresh temporary one (so every endpoint is trained).
    Raises what :func:`run_target` raises."""
    dev = pick_device(device)
    timer = PhaseTimer(sync=torch.cuda.synchronize if dev.type == "cuda" else None)
    timed_target = dataclasses.replace(t, report=timer.timed("report", t.report))
    with tempfile.TemporaryDirectory(prefix="modeconn-timing-") as tmp:
        opts = RunOptions(size=size, overrides=overrides, device=device,
                          out=outputs if outputs is not None else Path(tmp) / "out",
                          cache_dir=cache_dir if cache_dir is not None else Path(tmp) / "cache", executor="local",
                          progress=False)
        with instrumented(timer), contextlib.redirect_stdout(sys.stderr):
            t0 = time.perf_counter()
            summary = run_target(timed_target, opts)
            total = time.perf_counter() - t0
    return TargetTiming.of(summary["target"], total, timer.seconds)


def _commit() -> str:
    git = git_commit()
    if not git["commit"]:
        return "unknown"
    return git["commit"][:10] + (" (with uncommitted changes)" if git["dirty"] else "")


def _machine(device: str) -> str:
    cpus = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    return (f"{cpus} CPUs ({usable} usable), {platform.system()} {platform.machine()}, python "
            f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads); "
            f"device {device_description(pick_device(device))}")


def _now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _cell(seconds: float, total: float) -> str:
    share = 100.0 * seconds / total if total > 0 else 0.0
    return f"{seconds:.1f} ({share:.0f}%)"


def timing_table(timings: Sequence[TargetTiming], *, size: str, device: str = "auto", cache_dir: Path | None = None,
                 overrides: Sequence[tuple[str, str]] = (), failed: Sequence[str] = ()) -> str:
    """The Markdown report of a timing run: its header (date, commit, machine, size, overrides, cache) and one
    row per target, ``total s`` then ``seconds (share of the total)`` per phase, and a total row."""
    rows = [{"target": t.target, "total s": f"{t.total_s:.1f}",
             **{p: _cell(t.seconds[p], t.total_s) for p in PHASE_NAMES}} for t in timings]
    grand = sum(t.total_s for t in timings)
    rows.append({"target": "**total**", "total s": f"**{grand:.1f}**",
                 **{p: _cell(sum(t.seconds[p] for t in timings), grand) for p in PHASE_NAMES}})
    cache = f"the cache {cache_dir} (results it already holds are not recomputed)" if cache_dir else \
        "a fresh cache per target (every endpoint and job is computed)"
    lines = [f"# Wall time by phase, size {size}", "",
             f"- date: {_now_utc()}",
             f"- commit: {_commit()}",
             f"- machine: {_machine(device)}",
             f"- size: {size}" + "".join(f"; --set {k}={v}" for k, v in overrides),
             f"- run: `python -m repro.timing`, every target through the runner in one process (local executor), "
             f"{cache}",
             "- phases: the outermost call of the functions listed in `repro.timing.PHASES` (report: the target's "
             "report and the writing of its tables and figures); other = the rest of the run (data, caches, "
             "provenance, parameter arithmetic); seconds (share of the row's total)"]
    if failed:
        lines += ["", f"Failed, not in the table: {', '.join(failed)}."]
    return "\n".join(lines) + "\n\n" + markdown_table(rows, ["target", "total s", *PHASE_NAMES])


def read_provenance(results: Path) -> list[dict[str, Any]]:
    """The ``provenance.json`` of every output set in ``results``, in name order; ``ValueError`` for a file that
    does not parse or lacks ``wall_time_s``, ``FileNotFoundError`` when there is none."""
    records = []
    for path in sorted(Path(results).glob("*/provenance.json")):
        try:
            prov = json.loads(path.read_text())
            float(prov["wall_time_s"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a provenance record with a wall_time_s ({e})") from None
        records.append({**prov, "output": path.parent.name})
    if not records:
        raise FileNotFoundError(f"no */provenance.json in {results}")
    return records


def provenance_table(records: Sequence[Mapping[str, Any]], results: Path) -> str:
    """The committed totals as Markdown: one row per output set and a total row, without a phase breakdown."""
    rows = []
    for p in records:
        jobs = p.get("jobs") or {}
        commit = (p.get("git") or {}).get("commit") or "unknown"
        rows.append({"output": p["output"], "size": p.get("size", "?"), "wall s": f"{float(p['wall_time_s']):.1f}",
                     "jobs run": f"{jobs.get('run', '?')} of {jobs.get('total', '?')}",
                     "endpoints trained": f"{jobs.get('endpoints_trained', '?')} of {jobs.get('endpoints', '?')}",
                     "executor": p.get("executor", "?"), "device": p.get("device", "?"), "commit": commit[:10],
                     "finished": p.get("finished_utc", "?")})
    total = sum(float(p["wall_time_s"]) for p in records)
    rows.append({"output": "**total**", "wall s": f"**{total:.1f}**"})
    lines = [f"# Committed wall time per output set ({results})", "",
             f"- read: {_now_utc()}, from `*/provenance.json` (`wall_time_s`: the last invocation's wall time)",
             "- no phase breakdown: provenance records only each run's total; time the phases with "
             "`python -m repro.timing --size cpu`",
             "- a run that found endpoints or jobs in its cache (`endpoints trained` / `jobs run` below their "
             "totals) did not pay for them; one on a `ProcessExecutor` ran jobs in parallel"]
    columns = ["output", "size", "wall s", "jobs run", "endpoints trained", "executor", "device", "commit", "finished"]
    return "\n".join(lines) + "\n\n" + markdown_table(rows, columns)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m repro.timing", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("quick", "cpu"), default=None, help="the targets' size (default: quick)")
    p.add_argument("--targets", nargs="+", default=None, metavar="NAME",
                   help="targets to time (default: all); with --from-provenance, output set names")
    p.add_argument("--out", type=Path, default=None, help="also write the table to this Markdown file")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="the runner's cache (default: a fresh temporary one per target, so nothing is cached)")
    p.add_argument("--outputs", type=Path, default=None, metavar="DIR",
                   help="keep the targets' outputs under DIR (as `repro run --out`; default: a temporary folder, "
                        "removed), e.g. to compare them with the committed ones: `python -m repro report "
                        "repro/results DIR`")
    p.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"), help="as `repro run` (default: auto)")
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch intra-op threads during the runs (default: torch's, {torch.get_num_threads()} here); "
                        f"the committed cpu results ran with 1")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field of every timed target, as `python -m repro run --set`")
    p.add_argument("--from-provenance", nargs="?", type=Path, const=RESULTS, default=None, metavar="RESULTS_DIR",
                   help=f"tabulate the committed wall times of RESULTS_DIR/*/provenance.json (default {RESULTS}) "
                        f"instead of running anything")
    return p


def _emit(text: str, out: Path | None) -> None:
    print(text, end="")
    if out is not None:
        atomic_write_text(text, out)
        print(f"wrote {out}", file=sys.stderr)


def _from_provenance(args: argparse.Namespace) -> int:
    if any(v is not None for v in (args.size, args.cache_dir, args.outputs, args.device, args.threads)) \
            or args.overrides:
        print("error: --from-provenance runs nothing: --size, --cache-dir, --outputs, --device, --threads and --set "
              "do not apply", file=sys.stderr)
        return 2
    try:
        records = read_provenance(args.from_provenance)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.targets:
        known = {r["output"] for r in records}
        unknown = [n for n in args.targets if n not in known]
        if unknown:
            print(f"error: no provenance for {', '.join(unknown)}; the output sets are {', '.join(sorted(known))}",
                  file=sys.stderr)
            return 2
        records = [r for r in records if r["output"] in args.targets]
    _emit(provenance_table(records, args.from_provenance), args.out)
    return 0


def _time_all(targets: Sequence[Target], size: str, device: str, cache_dir: Path | None,
              overrides: Sequence[tuple[str, str]], outputs: Path | None = None
              ) -> tuple[list[TargetTiming], list[str]]:
    """Time each target in turn, a line per target on stderr; ``(timings, names of the targets that failed)``."""
    timings, failed = [], []
    for t in targets:
        print(f"timing {t.name} (size {size}) ...", file=sys.stderr, flush=True)
        try:
            timing = time_target(t, size, cache_dir=cache_dir, device=device, overrides=overrides, outputs=outputs)
        except (ValueError, FileNotFoundError, OutputError, TypeError) as e:
            print(f"error: {t.name}: {e}", file=sys.stderr)
            failed.append(t.name)
            continue
        timings.append(timing)
        print(f"{timing.target}: {timing.total_s:.1f} s; " +
              ", ".join(f"{p} {timing.seconds[p]:.1f} s" for p in PHASE_NAMES), file=sys.stderr, flush=True)
    return timings, failed


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.from_provenance is not None:
        return _from_provenance(args)
    size, device = args.size or "quick", args.device or "auto"
    try:
        targets = [get_target(n) for n in args.targets] if args.targets else list(load_all().values())
        overrides = [parse_override(s) for s in args.overrides]
        pick_device(device)
        resolve_phases()
    except (KeyError, ValueError) as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        timings, failed = _time_all(targets, size, device, args.cache_dir, overrides, args.outputs)
        _emit(timing_table(timings, size=size, device=device, cache_dir=args.cache_dir, overrides=overrides,
                           failed=failed), args.out)
    finally:
        torch.set_num_threads(threads)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
