"""Declarations: a target, its claims, its jobs and what its report returns; the registry of targets.

A target module declares each of its targets with :func:`declare`: the code parts (config, sizes, datasets,
jobs, report and the ids of the claims its report judges) as arguments, and what the source says (paper,
arXiv id, description; each claim's statement and the paper's reported value) in a TOML file beside the
module, ``<module>.toml``, one table per target::

    [benton2021-simplexes]
    paper = "Loss Surface Simplexes for Mode Connecting Volumes and Fast Ensembling (Benton et al., ICML 2021)"
    arxiv = "2102.13042"
    description = "SPRO simplexes ...; ESPRO vs deep ensembles."

    [benton2021-simplexes.claims.spro-low-loss]
    statement = "mean test accuracy of points sampled in each SPRO simplex is within 1 point of the mode's"
    paper = "simplexes of 1–3+ free vertices keep the mode's accuracy (Fig. 3, Sec. 5)"

The claims are listed in the file's order; a misspelt field, a missing field or a claim id that the
module does not judge (or one it judges that the file lacks) is an error when the module is imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the package tomli
    import tomli as tomllib

from reference.validate import ArgumentTypeError

__all__ = ["TARGETS", "Claim", "Figure", "Job", "Report", "Results", "Source", "Table", "Target", "Verdict",
           "declare", "get_target", "load_all", "read_source", "register", "source_file"]

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
    "repro.targets.transformer_rebasin",
    "repro.targets.c2m3_merging",
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


@dataclass(frozen=True)
class Source:
    """What a target's TOML file says about its source: title, arXiv id, description and claims."""

    paper: str
    arxiv: str
    description: str
    claims: tuple[Claim, ...]


# the fields of a target's table and of each of its claims: required ones map to None, optional ones to a default
_SOURCE_FIELDS: dict[str, str | None] = {"paper": None, "arxiv": "", "description": "", "claims": None}
_CLAIM_FIELDS: dict[str, str | None] = {"statement": None, "paper": None}


def source_file(module_file: str | Path) -> Path:
    """The TOML file of the targets declared in ``module_file``: beside it, with the suffix ``.toml``."""
    return Path(module_file).with_suffix(".toml")


def _fields(table: Any, known: Mapping[str, str | None], where: str) -> dict[str, Any]:
    """``table`` with its optional fields filled in, checked: no unknown field, none missing, strings only
    (except the target's ``claims``, a table of tables)."""
    if not isinstance(table, dict):
        raise ArgumentTypeError(f"{where} must be a table, got {table!r}")
    unknown = [k for k in table if k not in known]
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; "
                         f"the fields are {', '.join(known)}")
    missing = [k for k, default in known.items() if default is None and k not in table]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(map(repr, missing))}")
    out = {**{k: v for k, v in known.items() if v is not None}, **table}
    for k, v in out.items():
        if k != "claims" and not isinstance(v, str):
            raise ArgumentTypeError(f"{where}: {k} must be a string, got {v!r}")
    return out


def read_source(path: str | Path, name: str, claim_ids: Sequence[str]) -> Source:
    """The table ``[name]`` of the TOML file ``path``, checked against the claim ids the target's report
    judges (``claim_ids``): the file must state exactly those claims; they come back in the file's order."""
    path = Path(path)
    if len(set(claim_ids)) != len(claim_ids):
        raise ValueError(f"target {name!r}: claim ids repeat: {list(claim_ids)}")
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"target {name!r}: {path} is missing (a target's paper, arXiv id and claims "
                                f"are stated in a TOML file beside its module)") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None
    if name not in doc:
        raise ValueError(f"{path}: no table [{name}] (its tables: {', '.join(doc) or 'none'})")
    src = _fields(doc[name], _SOURCE_FIELDS, f"{path} [{name}]")
    claims = src["claims"]
    if not isinstance(claims, dict):
        raise ArgumentTypeError(f"{path} [{name}]: claims must be a table of claims "
                                f"([{name}.claims.<id>]), got {claims!r}")
    missing = [c for c in claim_ids if c not in claims]
    extra = [c for c in claims if c not in claim_ids]
    if missing or extra:
        raise ValueError(f"{path} [{name}]: the file must state exactly the claims the report judges "
                         f"({', '.join(claim_ids)}); missing: {', '.join(missing) or 'none'}; "
                         f"not judged: {', '.join(extra) or 'none'}")
    out = []
    for cid, table in claims.items():
        c = _fields(table, _CLAIM_FIELDS, f"{path} [{name}.claims.{cid}]")
        out.append(Claim(cid, c["statement"], c["paper"]))
    return Source(src["paper"], src["arxiv"], src["description"], tuple(out))


def declare(name: str, module_file: str | Path, *, config: type, sizes: Mapping[str, Any],
            datasets: Sequence[str], claim_ids: Sequence[str], jobs: Callable[[Any, Any], list[Job]],
            report: Callable[[Any, Results], Report]) -> Target:
    """Declare and register the target ``name`` of the module ``module_file`` (pass ``__file__``): the code's
    parts as given, and its paper, arXiv id, description and claims from :func:`source_file` (see
    :func:`read_source`). ``claim_ids`` are the ids the report judges."""
    src = read_source(source_file(module_file), name, tuple(claim_ids))
    return register(Target(name=name, paper=src.paper, arxiv=src.arxiv, config=config, sizes=sizes,
                           datasets=tuple(datasets), claims=src.claims, jobs=jobs, report=report,
                           description=src.description, module_file=str(module_file)))


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
