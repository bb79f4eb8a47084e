"""Estimated time of each target's ``paper`` size, from a measured training step of its endpoints.

    python bench/paper_times.py [TARGET …] [--device auto|cpu|cuda] [--steps 3] [--out bench/PAPER_TIMES.md]

For every endpoint group a target's paper size declares (models that differ only in their seed, trained
K at once), this times ``--steps`` real optimiser steps of one model (``train_many`` with K = 1) on random
inputs of the paper dataset's shape (after one untimed warm-up step) at ``--probe-batch`` examples (the
paper's batch size if smaller), scales the step time linearly to the paper's batch size and to K models
(on a CPU both costs are close to linear; on a GPU this over-estimates, since K models and a large batch
fill the device better), and multiplies by the group's step count (epochs × ⌈N_train / batch⌉, with the
real training-set size). It estimates **endpoint
training only**: what a target's jobs train themselves (curves, simplexes, NEB, the STE) and its
evaluation come on top. Nothing is asserted; the table is printed and written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from reference.checkpoint import atomic_write_text
from reference.data import Dataset
from reference.models import build_model, init_params
from reference.train import pick_device, train_many
from repro.runner.context import DataRef, LoadedData, find_endpoints
from repro.runner.declare import load_all

#: the training-set sizes and input shapes of the datasets paper sizes use
SHAPES = {"mnist": (60000, (1, 28, 28)), "cifar10": (50000, (3, 32, 32)), "digits": (1437, (64,)),
          "mnist1d": (4000, (40,))}


def _fake(name: str, n: int = 64) -> LoadedData:
    _, shape = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    d = Dataset(name, torch.randn(n, *shape, generator=g), torch.arange(n) % 10, torch.randn(n // 4, *shape,
                generator=g), torch.arange(n // 4) % 10, 10, shape)
    return LoadedData(DataRef(name, "fake"), d)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _step_time(e, k: int, dev: torch.device, steps: int, probe: int) -> float:
    """Seconds per optimiser step of ``k`` models at the paper's batch size, measured on one model at
    ``min(probe, batch)`` examples and scaled linearly."""
    model = build_model(dict(e.model))
    bs = min(probe, e.train.batch_size)
    _, shape = SHAPES[e.data.dataset]
    view = e.view or shape

    def run(n_steps: int) -> float:
        x = torch.randn(bs * n_steps, *view).to(dev)
        y = (torch.arange(bs * n_steps) % 10).to(dev)
        cfg = replace(e.train, epochs=1, warmup_frac=0.0)
        cfg = replace(cfg, batch_size=bs)
        _sync(dev)
        t0 = time.perf_counter()
        train_many(model, [init_params(model, 0)], x, y, cfg, [0], device=dev, progress=False)
        _sync(dev)
        return time.perf_counter() - t0

    run(1)  # warm-up
    # the smallest of two repeats of (1 + steps) minus 1 step: robust to other load on the machine
    one = min(run(1) for _ in range(2))
    many = min(run(1 + steps) for _ in range(2))
    return max(many - one, 0.0) / steps * k * e.train.batch_size / bs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("targets", nargs="*")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--probe-batch", type=int, default=64)
    p.add_argument("--out", default="bench/PAPER_TIMES.md")
    args = p.parse_args()
    dev = pick_device(args.device)
    targets = load_all()
    names = args.targets or sorted(targets)
    rows = []
    measured: dict = {}
    for name in names:
        t = targets[name]
        cfg = t.sizes["paper"]
        jobs = t.jobs(cfg, _fake(cfg.dataset))
        groups: dict[str, list] = {}
        for j in jobs:
            for e in find_endpoints(j.args):
                groups.setdefault(e.group(), {})[e.seed] = e
        total, parts = 0.0, {}
        for g in groups.values():
            es = list(g.values())
            e = es[0]
            mk = (json.dumps(dict(e.model), sort_keys=True), e.train.batch_size, e.view)
            if mk not in measured:  # one measurement per model and batch size; scaled to K below
                measured[mk] = _step_time(e, 1, dev, args.steps, args.probe_batch)
            step = measured[mk] * len(es)
            n_train = SHAPES[e.data.dataset][0]
            n_steps = e.train.epochs * e.train.steps_per_epoch(n_train)
            total += step * n_steps
            name_ = e.model.get("name")
            c, ms, st = parts.get(name_, (0, 0.0, 0))
            parts[name_] = (c + len(es), ms + step * 1e3, st + n_steps)
        parts = [f"{n}: {c} models, {ms:.0f} ms per step of all groups, {st} steps summed over groups"
                 for n, (c, ms, st) in parts.items()]
        rows.append((name, cfg.dataset, len(groups), total, "; ".join(parts)))
        print(f"{name}: {total / 3600:.2f} h of endpoint training ({'; '.join(parts)})", flush=True)
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    lines = [f"# Estimated endpoint-training time of each target's paper size on {dev_name}", "",
             f"torch {torch.__version__}; per endpoint group, {args.steps} timed steps of one model at "
             f"{args.probe_batch} examples after a warm-up step, scaled linearly to the paper's batch size and "
             "number of models; endpoint training only (curves, simplexes, NEB, STE and evaluation come on top). "
             "The smallest of two repeats is kept.", "",
             "| target | dataset | endpoint groups | estimated hours | measured steps |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {d} | {g} | {h / 3600:.2f} | {parts} |" for n, d, g, h, parts in rows]
    atomic_write_text("\n".join(lines) + "\n", Path(args.out))  # a killed run leaves the previous table
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
