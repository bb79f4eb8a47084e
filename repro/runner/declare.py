"""Declarations: a target, its claims, its jobs and what its report returns; the registry of targets."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

__all__ = ["TARGETS", "Claim", "Figure", "Job", "Report", "Results", "Table", "Target", "Verdict", "get_target",
           "load_all", "register"]

SIZES = ("quick", "cpu", "paper")

# modules holding targets; importing one registers its targets
MODULES = (
    "repro.targets.ainsworth2023",
    "repro.targets.garipov2018",
    "repro.targets.curve_ensemble",
    "repro.targets.benton2021",
    "repro.targets.rebasin_sweeps",
    "repro.targets.cycle_consistency",
    "repro.targets.permuted_simplex",
    "repro.targets.anokhin2020",
    "repro.targets.rashomon_hessian",
)


@dataclass(frozen=True)
class Claim:
    """A claim of the source, stated once: ``id``, what we test (``statement``), what the paper reported."""

    id: str
    statement: str
    paper: str


@dataclass(frozen=True)
class Verdict:
    """The report's finding for one declared claim: what we measured and whether the claim held."""

    ours: str
    held: bool


@dataclass(frozen=True)
class Job:
    """One unit of work: ``fn(args, ctx)`` with ``fn`` a module-level function and ``args`` a small frozen
    dataclass holding everything the result depends on (config fields it reads, seeds, :class:`DataRef`,
    :class:`Endpoint` dependencies). The result must be JSON-able; ``result_type`` is what it parses into."""

    fn: Callable[..., Any]
    args: Any
    result_type: type = dict

    def __post_init__(self) -> None:
        if not callable(self.fn) or "<locals>" in getattr(self.fn, "__qualname__", "<locals>") \
                or getattr(self.fn, "__name__", "") == "<lambda>":
            raise TypeError(f"a job's function must be a module-level function, got {self.fn!r}")
        if not (is_dataclass(self.args) and not isinstance(self.args, type)):
            raise TypeError(f"a job's arguments must be a dataclass instance, got {type(self.args).__name__}")

    @property
    def name(self) -> str:
        return f"{self.fn.__module__}:{self.fn.__qualname__}"


@dataclass(frozen=True)
class Table:
    name: str
    rows: Sequence[Mapping[str, Any]]
    columns: Sequence[str] | None = None
    title: str | None = None


@dataclass(frozen=True)
class Figure:
    name: str
    fig: Any  # a matplotlib Figure; the runner saves it as <name>.png and closes it


@dataclass
class Report:
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def table(self, name: str, rows, columns=None, title: str | None = None) -> None:
        self.tables.append(Table(name, list(rows), list(columns) if columns else None, title))

    def figure(self, name: str, fig) -> None:
        self.figures.append(Figure(name, fig))

    def verdict(self, id: str, ours: str, held: bool) -> None:
        if id in self.verdicts:
            raise ValueError(f"claim {id!r} judged twice")
        self.verdicts[id] = Verdict(str(ours), bool(held))


class Results:
    """The jobs' results, in job order: iterate ``(args, result)`` pairs, or select by argument type."""

    def __init__(self, pairs: Sequence[tuple[Any, Any]]):
        self.pairs = list(pairs)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def of(self, kind: type) -> list[tuple[Any, Any]]:
        return [(a, r) for a, r in self.pairs if isinstance(a, kind)]

    def one(self, kind: type) -> Any:
        sel = self.of(kind)
        if len(sel) != 1:
            raise ValueError(f"expected one result of {kind.__name__}, found {len(sel)}")
        return sel[0][1]


@dataclass(frozen=True)
class Target:
    """A reproduction target, declared.

    ``sizes`` maps ``quick`` (CI, minutes on CPU), ``cpu`` (the committed results) and ``paper`` (the
    paper's own models, data and budget) to instances of ``config``, a frozen dataclass with a ``seed``
    field and, when ``datasets`` has more than one entry, a ``dataset`` field. ``datasets[0]`` is the
    default; an output of another dataset goes to ``<out>/<name>-<dataset>/``.
    """

    name: str
    paper: str
    arxiv: str
    config: type
    sizes: Mapping[str, Any]
    datasets: tuple[str, ...]
    claims: tuple[Claim, ...]
    jobs: Callable[[Any, Any], list[Job]]
    report: Callable[[Any, Results], Report]
    description: str = ""
    module_file: str = ""

    def __post_init__(self) -> None:
        if set(self.sizes) != set(SIZES):
            raise ValueError(f"target {self.name!r}: sizes must be exactly {SIZES}, got {tuple(self.sizes)}")
        names = {f.name for f in fields(self.config)}
        if "seed" not in names:
            raise ValueError(f"target {self.name!r}: its config {self.config.__name__} needs a 'seed' field")
        if "dataset" not in names:
            raise ValueError(f"target {self.name!r}: its config {self.config.__name__} needs a 'dataset' field")
        for s, c in self.sizes.items():
            if not isinstance(c, self.config):
                raise TypeError(f"target {self.name!r}: size {s!r} is not a {self.config.__name__}")
            if c.dataset not in self.datasets:
                raise ValueError(f"target {self.name!r}: size {s!r} uses dataset {c.dataset!r}, which is not among "
                                 f"its datasets {self.datasets}")
        if self.sizes["cpu"].dataset != self.datasets[0]:
            raise ValueError(f"target {self.name!r}: datasets[0] must be the cpu size's dataset")
        ids = [c.id for c in self.claims]
        if len(set(ids)) != len(ids):
            raise ValueError(f"target {self.name!r}: claim ids repeat: {ids}")

    @property
    def claim_ids(self) -> tuple[str, ...]:
        return tuple(c.id for c in self.claims)


TARGETS: dict[str, Target] = {}


def register(t: Target) -> Target:
    if t.name in TARGETS and TARGETS[t.name] is not t:
        raise ValueError(f"target {t.name!r} registered twice")
    TARGETS[t.name] = t
    return t


def load_all() -> dict[str, Target]:
    """Import every target module: the suite's own, and those named in ``$MODECONN_TARGETS`` (comma-separated
    module names: a researcher's own targets, declared like the suite's)."""
    import os

    extra = [m.strip() for m in os.environ.get("MODECONN_TARGETS", "").split(",") if m.strip()]
    for m in [*MODULES, *extra]:
        importlib.import_module(m)
    return TARGETS


def get_target(name: str) -> Target:
    load_all()
    if name not in TARGETS:
        raise KeyError(f"unknown target {name!r}; known targets: {', '.join(sorted(TARGETS))}")
    return TARGETS[name]
