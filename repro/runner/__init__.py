"""The runner: everything a reproduction target does not own, written once.

A target (``repro/targets/<source>.py``) is a declaration (:class:`Target`) plus two pure functions:
``jobs(cfg, data) -> list[Job]`` and ``report(cfg, results) -> Report``. The runner
(:func:`repro.runner.run.run_target`) chooses the size, applies ``--set`` overrides, honours or refuses
``--dataset``, loads the data and fingerprints its content, trains the declared endpoints, keys and caches
every job, runs the jobs on the chosen executor, checks that the report returns exactly the declared
claim ids, and writes the outputs as one set.
"""

from .context import DataRef, Endpoint, JobContext, ModelsArgs
from .declare import TARGETS, Claim, Figure, Job, Report, Results, Table, Target, Verdict, get_target, load_all
from .settings import CycleSettings, SteSettings
from .util import fmt_pm, markdown_table, mean_std, seaborn

__all__ = [
    "TARGETS",
    "Claim",
    "CycleSettings",
    "DataRef",
    "Endpoint",
    "Figure",
    "Job",
    "JobContext",
    "ModelsArgs",
    "Report",
    "Results",
    "SteSettings",
    "Table",
    "Target",
    "Verdict",
    "fmt_pm",
    "get_target",
    "load_all",
    "markdown_table",
    "mean_std",
    "seaborn",
]
