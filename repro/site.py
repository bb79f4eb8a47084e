"""``python -m repro report``: the results as a static site, and a comparison of two runs.

``build_site([RESULTS_DIR], out)`` writes ``out/index.html`` (one row per result set: paper, arXiv, size,
dataset, device, wall time, date, commit, how many claims held, and every claim under it) and one page per
result set (``out/<set>.html``: its claims, every CSV table with its caption, every figure, the rendered
``provenance.json`` and the set's README or its README.md section). ``build_site([A, B], out, rtol)`` is
compare mode: the two runs side by side, claims whose verdict differs marked, and every number that differs by
more than ``rtol`` (relative) highlighted.

A result set is a folder holding ``summary.json`` (what ``python -m repro run`` writes). Pages are plain HTML
with the stylesheet inlined and no script; figures and CSVs are copied next to them, so the folder can be
opened from disk or served anywhere. Markdown is rendered with markdown-it-py; a link of a README that points
outside the site (a source file of the repository, say) keeps its text and loses its target, so every link and
image of the site resolves.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markdown_it import MarkdownIt
from markupsafe import Markup

__all__ = ["ResultSet", "SiteError", "build_site", "load_results"]

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


class SiteError(ValueError):
    """A results folder the site cannot be built from (missing, empty, or a corrupt ``summary.json``)."""


@dataclass
class Table:
    name: str
    caption: str
    header: list[str]
    rows: list[list[str]]


@dataclass
class ResultSet:
    name: str
    path: Path
    summary: dict[str, Any]
    provenance: dict[str, Any]
    tables: list[Table] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    readme: str = ""  # Markdown: the set's own README.md, else the repository README's section of its target
    readme_source: Path = README  # where ``readme`` was read (its relative links start there)

    @property
    def claims(self) -> list[dict[str, Any]]:
        return list(self.summary.get("claims", []))

    @property
    def held(self) -> int:
        return sum(bool(c.get("held")) for c in self.claims)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SiteError(f"{path}: cannot read the {what} ({e})") from e
    if not isinstance(obj, dict):
        raise SiteError(f"{path}: the {what} is not a JSON object")
    return obj


def _caption(md: Path) -> str:
    """The ``### …`` heading the runner writes on the first line of a table's Markdown twin."""
    if md.is_file():
        first = md.read_text().split("\n", 1)[0]
        if first.startswith("#"):
            return first.lstrip("#").strip()
    return ""


def _readme_section(target: str) -> str:
    """The repository README's ``### `target` …`` section (up to the next heading of that level or above)."""
    if not README.is_file():
        return ""
    lines = README.read_text().split("\n")
    for i, line in enumerate(lines):
        if line.startswith(f"### `{target}`"):
            end = next((j for j in range(i + 1, len(lines)) if re.match(r"#{1,3} ", lines[j])), len(lines))
            return "\n".join(lines[i + 1 : end]).strip()
    return ""


def load_results(root: Path) -> dict[str, ResultSet]:
    """Every result set below ``root`` (``root`` itself when it holds a ``summary.json``), by folder name."""
    root = Path(root)
    if not root.is_dir():
        raise SiteError(f"results folder {root} does not exist")
    dirs = [root] if (root / "summary.json").is_file() else sorted(p.parent for p in root.glob("*/summary.json"))
    if not dirs:
        raise SiteError(f"{root} holds no result set (no summary.json in it or in its subfolders)")
    out: dict[str, ResultSet] = {}
    for d in dirs:
        summary = _read_json(d / "summary.json", "summary")
        prov = _read_json(d / "provenance.json", "provenance") if (d / "provenance.json").is_file() else {}
        rs = ResultSet(d.name, d, summary, prov)
        for f in sorted(d.glob("*.csv")):
            with f.open(newline="") as fh:
                rows = list(csv.reader(fh))
            if rows:
                rs.tables.append(Table(f.stem, _caption(f.with_suffix(".md")) or f.stem, rows[0], rows[1:]))
        rs.figures = [p.name for p in sorted(d.glob("*.png"))]
        own = d / "README.md"
        if own.is_file():
            rs.readme, rs.readme_source = own.read_text(), own
        else:
            rs.readme = _readme_section(str(summary.get("target", d.name)))
        out[d.name] = rs
    return out


# ---------------------------------------------------------------------------------------------
# numbers: formatting and comparison


def _number(s: str) -> float | None:
    """The number a cell holds (the mean of a ``mean ± std`` cell), or ``None`` for text."""
    s = s.split(" ± ")[0]
    try:
        x = float(s)
    except ValueError:
        return None
    return x if s.strip().lower() not in ("true", "false") else None


def fmt(s: str) -> str:
    """A CSV cell for reading: floats to 4 significant digits, everything else as written."""
    if " ± " in s:
        return " ± ".join(fmt(part) for part in s.split(" ± "))
    x = _number(s)
    if x is None or re.fullmatch(r"[-+]?\d+", s.strip()):
        return s
    if math.isnan(x) or math.isinf(x):
        return s
    return f"{x:.4g}"


def differs(a: str, b: str, rtol: float) -> bool:
    """Two cells differ: numbers (the means of ``mean ± std`` cells) by more than ``rtol`` relative to the
    larger magnitude, text at all."""
    x, y = _number(a), _number(b)
    if x is None or y is None:
        return a != b
    if math.isnan(x) or math.isnan(y):
        return math.isnan(x) != math.isnan(y)
    return abs(x - y) > rtol * max(abs(x), abs(y), 1e-12)


_TIME_COLUMNS = re.compile(r"(^|_)(s|sec|secs|seconds|time|wall)($|_)")


@dataclass
class Cell:
    text: str
    other: str | None = None  # compare mode: the second run's value when it differs

    @property
    def num(self) -> bool:
        """Right-aligned: a number (``mean ± std`` included)."""
        return _number(self.text) is not None


class Row(list):
    """A table row of :class:`Cell`; ``only`` is ``"A"`` or ``"B"`` for a row that one run lacks."""

    only: str | None = None


def _is_key(values: list[str]) -> bool:
    """A column that names a row rather than measures it: text, or whole numbers (n, width, a seed)."""
    return all(_number(v) is None or re.fullmatch(r"[-+]?\d+", v.strip()) for v in values)


def _compare_row(header: list[str], ra: list[str], rb: list[str], rtol: float) -> tuple[Row, int]:
    row, n = Row(), 0
    for h, x, y in zip(header, ra, rb, strict=False):
        if not _TIME_COLUMNS.search(h.lower()) and differs(x, y, rtol):
            row.append(Cell(fmt(x), fmt(y)))
            n += 1
        else:
            row.append(Cell(fmt(x)))
    return row, n


def compare_table(a: Table, b: Table, rtol: float) -> tuple[list[Row], int] | None:
    """The two runs' table cell by cell, and how many numbers differ; ``None`` when the headers differ.

    Rows are paired by their key columns (text and whole-number columns: method, n, width, …) when those
    name every row once in both tables, so a quick run with fewer cells lines up with a full one; rows one
    run lacks are kept and marked. Otherwise rows pair by position, which needs equal row counts. Time
    columns (``*_s``, ``seconds``, …) are shown but never counted as differences."""
    if a.header != b.header:
        return None
    cols = range(len(a.header))
    keys = [j for j in cols if not _TIME_COLUMNS.search(a.header[j].lower())
            and _is_key([r[j] for r in a.rows if j < len(r)] + [r[j] for r in b.rows if j < len(r)])]
    ka = [tuple(r[j] for j in keys) for r in a.rows]
    kb = [tuple(r[j] for j in keys) for r in b.rows]
    keyed = bool(keys) and len(set(ka)) == len(ka) and len(set(kb)) == len(kb)
    if not keyed:
        if len(a.rows) != len(b.rows):
            return None
        kb = ka  # by position
    rows, n = [], 0
    b_by = dict(zip(kb, b.rows, strict=True))
    for k, ra in zip(ka, a.rows, strict=True):
        if k in b_by:
            row, d = _compare_row(a.header, ra, b_by.pop(k), rtol)
            n += d
        else:
            row = Row(Cell(fmt(c)) for c in ra)
            row.only = "A"
        rows.append(row)
    for rb in b_by.values():
        row = Row(Cell(fmt(c)) for c in rb)
        row.only = "B"
        rows.append(row)
    return rows, n


# ---------------------------------------------------------------------------------------------
# Markdown with site-relative links


def _markdown(text: str, source: Path, pages: dict[Path, str], copied: dict[Path, str]) -> Markup:
    """``text`` (found at ``source``) as HTML: links to a result set's folder or README go to its page, links
    and images of a copied file to the copy, other relative links lose their target (not in the site)."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")

    def resolve(url: str) -> str | None:
        if re.match(r"[a-z]+:", url) or url.startswith("#"):
            return url
        p = (source.parent / url.split("#")[0]).resolve()
        if p in copied:
            return copied[p]
        if p in pages:
            return pages[p]
        if p.name == "README.md" and p.parent in pages:
            return pages[p.parent]
        return None

    def walk(tokens):
        for t in tokens:
            if t.children:
                walk(t.children)
            if t.type == "link_open":
                url = resolve(t.attrGet("href") or "")
                if url is None:
                    t.attrs.pop("href", None)
                    t.attrSet("title", "not part of the site: see the repository")
                else:
                    t.attrSet("href", url)
            elif t.type == "image":
                url = resolve(t.attrGet("src") or "")
                t.attrSet("src", url or "")

    tokens = md.parse(text)
    walk(tokens)
    return Markup(md.renderer.render(tokens, md.options, {}))


# ---------------------------------------------------------------------------------------------
# the site

_ENV = Environment(loader=PackageLoader("repro", "site_templates"), autoescape=select_autoescape(["html"]),
                   undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def _row(rs: ResultSet) -> dict[str, Any]:
    p, s = rs.provenance, rs.summary
    git = p.get("git") or {}
    commit = git.get("commit") or ""
    data = p.get("data") or {}
    return {"name": rs.name, "paper": p.get("paper", ""), "arxiv": p.get("arxiv", ""), "size": s.get("size", ""),
            "dataset": s.get("dataset") or data.get("dataset", ""), "device": p.get("device") or s.get("device", ""),
            "wall": p.get("wall_time_s"), "date": str(p.get("finished_utc", ""))[:10],
            "commit": (str(commit)[:10] + (" (dirty)" if git.get("dirty") else "")) if commit else "",
            "held": rs.held, "claims": len(rs.claims)}


def _provenance_items(p: dict[str, Any]) -> list[tuple[str, str]]:
    keys = ("target", "size", "seed", "data", "device", "executor", "command", "overrides", "versions", "git",
            "code_version", "wall_time_s", "cumulative_wall_time_s", "invocations", "finished_utc")
    items = []
    for k in keys:
        if k in p:
            v = p[k]
            items.append((k, v if isinstance(v, str) else json.dumps(v, indent=1, sort_keys=True)))
    return items


def build_site(results_dirs: Sequence[Path], out: Path, rtol: float = 0.05) -> Path:
    """The site of one results folder, or the comparison of two (``rtol``: the relative tolerance under which
    two numbers count as equal); returns ``out/index.html``. ``out`` is replaced as a whole."""
    if not 1 <= len(results_dirs) <= 2:
        raise SiteError(f"give one results folder (a site) or two (a comparison), got {len(results_dirs)}")
    if not (isinstance(rtol, (int, float)) and math.isfinite(rtol) and rtol >= 0):
        raise SiteError(f"rtol must be a finite number >= 0, got {rtol!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SiteError(f"--out {out} is a file, not a folder")
    if any(out.resolve() == Path(d).resolve() or out.resolve() in Path(d).resolve().parents for d in results_dirs):
        raise SiteError(f"--out {out} is or holds a results folder: the site replaces its folder as a whole")
    runs = [load_results(Path(d)) for d in results_dirs]
    tmp = out.with_name(out.name + ".building")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    names = sorted(set().union(*runs))
    pages = {rs.path.resolve(): f"{n}.html" for run in runs for n, rs in run.items()}
    copied: dict[Path, str] = {}
    for k, run in enumerate(runs):
        for n, rs in run.items():
            sub = tmp / (n if k == 0 else f"{n}.b")
            sub.mkdir(exist_ok=True)
            for f in [*rs.figures, *(t.name + ".csv" for t in rs.tables)]:
                shutil.copy2(rs.path / f, sub / f)
                copied[(rs.path / f).resolve()] = f"{sub.name}/{f}"
    compare = len(runs) == 2
    labels = [str(Path(d)) for d in results_dirs]
    index_rows = []
    for n in names:
        sets = [run.get(n) for run in runs]
        claim_rows = _claim_rows(sets)
        index_rows.append({"name": n, "runs": [_row(s) if s else None for s in sets], "claims": claim_rows,
                           "verdict_differs": any(c["differs"] for c in claim_rows)})
        page = _ENV.get_template("target.html").render(
            name=n, sets=sets, labels=labels, compare=compare, claims=claim_rows, rtol=rtol,
            row=[_row(s) if s else None for s in sets],
            tables=_tables(sets, rtol, n), figures=_figures(sets, n),
            provenance=[_provenance_items(s.provenance) if s else [] for s in sets],
            readme=[_markdown(s.readme, s.readme_source, pages, copied) if s and s.readme else "" for s in sets])
        (tmp / f"{n}.html").write_text(page)
    index = _ENV.get_template("index.html").render(rows=index_rows, labels=labels, compare=compare, rtol=rtol,
                                                   total=sum(len(r["claims"]) for r in index_rows))
    (tmp / "index.html").write_text(index)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out / "index.html"


def _claim_rows(sets: list[ResultSet | None]) -> list[dict[str, Any]]:
    ids: list[str] = []
    for s in sets:
        for c in s.claims if s else []:
            if c["id"] not in ids:
                ids.append(c["id"])
    rows = []
    for cid in ids:
        per = [next((c for c in s.claims if c["id"] == cid), None) if s else None for s in sets]
        first = next(c for c in per if c)
        held = [None if c is None else bool(c.get("held")) for c in per]
        rows.append({"id": cid, "statement": first.get("statement", ""), "paper": first.get("paper", ""),
                     "ours": [c.get("ours", "") if c else "" for c in per], "held": held,
                     "differs": len(sets) == 2 and None not in held and held[0] != held[1]})
    return rows


def _tables(sets: list[ResultSet | None], rtol: float, name: str) -> list[dict[str, Any]]:
    a = sets[0]
    b = sets[1] if len(sets) == 2 else None
    by_b = {t.name: t for t in b.tables} if b else {}
    out = []
    names = [t.name for t in a.tables] if a else []
    names += [t for t in by_b if t not in names]
    for tn in names:
        ta = next((t for t in a.tables if t.name == tn), None) if a else None
        tb = by_b.get(tn)
        t = ta or tb
        entry: dict[str, Any] = {"name": tn, "caption": t.caption, "header": t.header, "rows": None, "diffs": 0,
                                 "only": None, "only_rows": 0, "csv": [f"{name}/{tn}.csv" if ta else None,
                                                       f"{name}.b/{tn}.csv" if tb else None]}
        if ta and tb:
            cmp = compare_table(ta, tb, rtol)
            if cmp is None:
                entry["separate"] = [[Row(Cell(fmt(c)) for c in r) for r in x.rows] for x in (ta, tb)]
                entry["headers"] = [ta.header, tb.header]
            else:
                entry["rows"], entry["diffs"] = cmp
                entry["only_rows"] = sum(r.only is not None for r in entry["rows"])
        else:
            entry["rows"] = [Row(Cell(fmt(c)) for c in r) for r in t.rows]
            entry["only_rows"] = 0
            entry["only"] = None if len(sets) == 1 else (0 if ta else 1)
        out.append(entry)
    return out


def _figures(sets: list[ResultSet | None], name: str) -> list[dict[str, Any]]:
    figs: list[str] = []
    for s in sets:
        figs += [f for f in (s.figures if s else []) if f not in figs]
    out = []
    for f in figs:
        srcs = [(f"{name}/{f}" if k == 0 else f"{name}.b/{f}") if s and f in s.figures else None
                for k, s in enumerate(sets)]
        caption = next((_figure_caption(s, f) for s in sets if s and f in s.figures), f)
        out.append({"file": f, "srcs": srcs, "caption": caption})
    return out


def _figure_caption(rs: ResultSet, fig: str) -> str:
    """The heading or sentence of the set's README that names the figure, else its file name in words."""
    for line in rs.readme.split("\n"):
        if fig in line:
            text = re.sub(r"[`*#]", "", line).strip(" -")
            if text:
                return text if len(text) < 300 else text[:297] + "…"
    return fig.removesuffix(".png").replace("_", " ")
