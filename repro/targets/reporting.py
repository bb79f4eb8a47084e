"""Report helpers shared by several targets' ``report`` functions.

Only report-side code belongs here: a report is recomputed from the cached job results on every run, but a
job's cache key covers ``reference/`` and the job's own target module, not this file (see
``repro.runner.context.code_version``), so nothing that a job runs may live here.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from ..runner import fmt_pm

__all__ = ["summary_rows"]


def summary_rows(rows: Sequence[Mapping[str, Any]], groups: Mapping[str, Sequence[Any]], cols: Sequence[str],
                 count: str = "pairs") -> list[dict[str, Any]]:
    """One row per combination of the ``groups`` values (in the order of ``itertools.product``): those values,
    the number of ``rows`` that have them (column ``count``), and mean ± std (``fmt_pm``) of each of ``cols``
    over those rows."""
    out = []
    for values in itertools.product(*groups.values()):
        key = dict(zip(groups, values, strict=True))
        sel = [r for r in rows if all(r[k] == v for k, v in key.items())]
        out.append({**key, count: len(sel), **{c: fmt_pm([r[c] for r in sel]) for c in cols}})
    return out
