"""What every reproduction target shares: the run context, the output contract, caching.

Output contract, in ``<out>/<target>/``:
- tables as ``<name>.csv`` and ``<name>.md``; figures as ``<name>.png``;
- ``provenance.json``: config, package versions, device, git commit, command, wall time;
- ``summary.json``: ``{"target", "quick", "device", "claims": [{"id", "statement", "paper", "ours", "held"}]}``.

Caching and resumption: trained endpoints are checkpoints under ``<cache>/endpoints/<hash>.pt``, keyed
by the hash of everything that determines them (model, training and data config, seed); a unit of
work (``ctx.job``) stores its JSON result under ``<out>/<target>/.jobs/<hash>.json``. Both are written
atomically, so an interrupted run loses at most the unit in flight and the next run resumes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import torch

from reference.checkpoint import atomic_write_bytes, atomic_write_text

__all__ = ["RunContext", "Claim", "config_hash", "mean_std", "fmt_pm", "default_cache_dir", "markdown_table"]


def default_cache_dir() -> Path:
    return Path(os.environ.get("MODECONN_CACHE", Path.home() / ".cache" / "modeconn"))


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def _restore_floats(obj: Any) -> Any:
    """Undo ``_jsonable``'s spelling of non-finite floats ("nan", "inf", "-inf") in a stored result."""
    if isinstance(obj, dict):
        return {k: _restore_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore_floats(v) for v in obj]
    if isinstance(obj, str) and obj in ("nan", "inf", "-inf"):
        return float(obj)
    return obj


def config_hash(obj: Any) -> str:
    """A stable 16-hex-digit hash of a JSON-able description."""
    text = json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = torch.tensor([float(x) for x in values], dtype=torch.float64)
    if v.numel() == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(unbiased=True)) if v.numel() > 1 else 0.0


def fmt_pm(values: Sequence[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(columns or rows[0].keys())

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


@dataclass
class Claim:
    id: str
    statement: str
    paper: str
    ours: str
    held: bool

    def line(self) -> str:
        verdict = "held" if self.held else "DID NOT HOLD"
        return f"[{verdict}] {self.id}: {self.statement}\n    paper: {self.paper}\n    ours:  {self.ours}"


def _git_commit() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root, capture_output=True, text=True, timeout=10, check=True,
            ).stdout.strip()
        )
        return {"commit": sha, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "numpy", "scipy", "scikit-learn", "mnist1d", "seaborn", "matplotlib", "modeconn"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@dataclass
class RunContext:
    """Where a target writes, with what settings, and its accumulated claims."""

    target: str
    out_root: Path
    quick: bool
    device: torch.device
    seed: int = 0
    data_dir: Path | None = None
    cache_dir: Path = field(default_factory=default_cache_dir)
    options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    claims: list[Claim] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    variant: str | None = None  # e.g. a non-default dataset: outputs go to <out>/<target>-<variant>/
    _t0: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        return f"{self.target}-{self.variant}" if self.variant else self.target

    @property
    def out(self) -> Path:
        p = self.out_root / self.name
        p.mkdir(parents=True, exist_ok=True)
        return p

    def log(self, msg: str) -> None:
        print(msg, flush=True)

    # --- outputs ----------------------------------------------------------------------------
    def write_table(self, name: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                    title: str | None = None) -> Path:
        cols = list(columns or (rows[0].keys() if rows else []))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in cols})
        atomic_write_text(buf.getvalue(), self.out / f"{name}.csv")
        md = (f"### {title}\n\n" if title else "") + markdown_table(rows, cols)
        atomic_write_text(md, self.out / f"{name}.md")
        return self.out / f"{name}.csv"

    def save_figure(self, fig, name: str) -> Path:
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
        plt.close(fig)
        path = self.out / f"{name}.png"
        atomic_write_bytes(buf.getvalue(), path)
        return path

    def claim(self, id: str, statement: str, paper: str, ours: str, held: bool) -> Claim:
        c = Claim(id, statement, paper, ours, bool(held))
        self.claims.append(c)
        return c

    # --- caching ----------------------------------------------------------------------------
    def job(self, key: Any, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` once per ``key``; its JSON-able result is stored and reused on the next run.

        The result comes back the same way both times: JSON types, non-finite floats as floats."""
        path = self.out / ".jobs" / f"{config_hash(key)}.json"
        if path.is_file():
            try:
                return _restore_floats(json.loads(path.read_text())["result"])
            except (json.JSONDecodeError, KeyError):
                path.unlink()  # a torn file from an older, non-atomic writer: recompute
        result = _jsonable(fn())
        atomic_write_text(json.dumps({"key": _jsonable(key), "result": result}), path)
        return _restore_floats(result)

    # --- finish -----------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        summary = {
            "target": self.name,
            "quick": self.quick,
            "device": device_description(self.device),
            "claims": [asdict(c) for c in self.claims],
        }
        atomic_write_text(json.dumps(summary, indent=2), self.out / "summary.json")
        prov = {
            "target": self.name,
            "config": _jsonable(self.config),
            "options": _jsonable(self.options),
            "quick": self.quick,
            "seed": self.seed,
            "device": device_description(self.device),
            "versions": _versions(),
            "git": _git_commit(),
            "command": " ".join(sys.argv),
            "wall_time_s": round(time.time() - self._t0, 2),
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write_text(json.dumps(prov, indent=2), self.out / "provenance.json")
        self.log(f"\n== {self.name}: claims ==")
        for c in self.claims:
            self.log(c.line())
        self.log(f"\nwrote {self.out} ({prov['wall_time_s']} s)")
        return summary
