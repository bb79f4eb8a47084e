"""A tiny target for the runner's tests: trains two 1-epoch digits MLPs, seconds on one core.

Registered as ``toy`` (and ``toy-mono``, which takes one dataset only) when imported; the CLI imports it
through ``MODECONN_TARGETS=toy_target`` with this folder on ``PYTHONPATH``. Environment switches used by
the tests (they are not part of any key, on purpose: they simulate crashes, not other inputs):
``TOY_FAIL=<index>`` makes that job raise; ``TOY_PIDFILE=<path>`` makes each job append its pid to the file;
``TOY_BAD_REPORT=1`` makes the report skip a declared claim.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from reference.evaluate import evaluate_points
from reference.models import build_model
from reference.params import stack
from reference.train import TrainConfig
from repro.runner import DataRef, Endpoint, Job, JobContext, Report, Results
from repro.runner.declare import declare


@dataclass(frozen=True)
class ToyConfig:
    dataset: str = "digits"
    seed: int = 0
    jobs: int = 2
    scale: float = 1.0  # read by the jobs
    sleep: float = 0.0  # seconds each job sleeps (kill tests)
    label: str = "toy"  # read by the report only
    width: int = 4
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1, batch_size=256, lr=1e-2,
                                                                    optimizer="adam"))


@dataclass(frozen=True)
class ToyArgs:
    model: dict
    a: Endpoint
    data: DataRef
    scale: float
    sleep: float
    index: int


def toy_job(args: ToyArgs, ctx: JobContext) -> dict:
    if pidfile := os.environ.get("TOY_PIDFILE"):
        with open(pidfile, "a") as f:
            f.write(f"{os.getpid()}\n")
    if args.sleep:
        time.sleep(args.sleep)
    if os.environ.get("TOY_FAIL") == str(args.index):
        raise RuntimeError(f"toy job {args.index} fails on purpose")
    data = ctx.data(args.data)
    model = build_model(args.model).to(ctx.dev)
    ev = evaluate_points(model, stack([ctx.endpoint(args.a)]), data.x_test, data.y_test)
    return {"index": args.index, "loss": float(ev.loss[0]) * args.scale, "error": float(ev.error[0]),
            "x_sum": float(data.x_train.double().sum())}


def pid_job(args: str, ctx: JobContext) -> dict:
    """The worker's pid; ``args == "fail"`` raises (the process executor's pool tests)."""
    if args == "fail":
        raise RuntimeError("pid_job fails on purpose")
    return {"pid": os.getpid()}


def toy_jobs(cfg: ToyConfig, data) -> list[Job]:
    mcfg = {"name": "mlp", "in_features": data.in_features, "widths": [cfg.width], "num_classes": data.num_classes,
            "bias": True}
    return [Job(toy_job, ToyArgs(mcfg, Endpoint(mcfg, cfg.train, cfg.seed * 10 + i, data.ref), data.ref, cfg.scale,
                                 cfg.sleep, i)) for i in range(cfg.jobs)]


def toy_report(cfg: ToyConfig, results: Results) -> Report:
    rep = Report()
    rows = [{"label": cfg.label, **r} for _, r in results.of(ToyArgs)]
    rep.table("toy", rows, title=f"toy target ({cfg.label})")
    loss = sum(r["loss"] for r in rows) / len(rows)
    rep.verdict("finite", f"mean loss {loss:.4f}", bool(torch.isfinite(torch.tensor(loss))))
    if not os.environ.get("TOY_BAD_REPORT"):
        rep.verdict("small", f"mean loss {loss:.4f}", loss < 100)
    return rep


CLAIM_IDS = ("finite", "small")
SIZES = {"quick": ToyConfig(), "cpu": ToyConfig(), "paper": ToyConfig(dataset="mnist")}

# declared as a researcher's own target would be: papers and claims in toy_target.toml beside this file
TOY = declare("toy", __file__, config=ToyConfig, sizes=SIZES, jobs=toy_jobs, report=toy_report,
              datasets=("digits", "mnist1d", "mnist"), claim_ids=CLAIM_IDS)
TOY_MONO = declare("toy-mono", __file__, config=ToyConfig, sizes={k: ToyConfig() for k in SIZES}, jobs=toy_jobs,
                   report=toy_report, datasets=("digits",), claim_ids=CLAIM_IDS)
