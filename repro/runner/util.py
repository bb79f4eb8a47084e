"""Small helpers shared by the runner and the targets' reports: JSON encoding, hashing, tables."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["config_hash", "fmt_pm", "jsonable", "markdown_table", "mean_std", "restore_floats", "seaborn"]


def jsonable(obj: Any) -> Any:
    """A JSON value for ``obj``: dataclasses as dicts (or their ``key()`` where they define one), tensors as
    lists, non-finite floats as the strings "nan" / "inf" / "-inf" (undone by :func:`restore_floats`)."""
    key = getattr(obj, "key", None)
    if is_dataclass(obj) and not isinstance(obj, type):
        if callable(key):
            return jsonable(key())
        return {f.name: jsonable(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return jsonable(obj.item())
    raise TypeError(f"cannot store a {type(obj).__name__} in a job key or result: {obj!r:.80}")


def restore_floats(obj: Any) -> Any:
    """Undo :func:`jsonable`'s spelling of non-finite floats in a stored result."""
    if isinstance(obj, dict):
        return {k: restore_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [restore_floats(v) for v in obj]
    if isinstance(obj, str) and obj in ("nan", "inf", "-inf"):
        return float(obj)
    return obj


def canonical(obj: Any) -> str:
    return json.dumps(jsonable(obj), sort_keys=True, separators=(",", ":"))


def config_hash(obj: Any) -> str:
    """A stable 16-hex-digit hash of a JSON-able description."""
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:16]


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
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def seaborn(style: str = "whitegrid", **kw: Any):
    """matplotlib (Agg), pyplot, pandas and seaborn with the suite's theme: ``plt, pd, sns = seaborn()``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    sns.set_theme(style=style, **kw)
    return plt, pd, sns
