"""Trained endpoints: declared by jobs, trained before them (K at once per group), cached by content key.

A checkpoint ``<cache>/endpoints/<hash>.pt`` stores the endpoint's full key in its ``extra``; a file whose
stored key differs from the one asked for, or that does not load, is reported by path and retrained.
Endpoints that differ only in their seed form a group. ``plan_training`` makes the training jobs: a group
that ``train_many`` would train K at once (``vmap``) is one job; a group it would train one after another is
one job per endpoint, so ``--executor process|ray`` spreads its endpoints over the workers as it spreads
independent groups. Either way each endpoint's floats are those ``train_many`` computes for it in its group
(one after another, ``train_many`` is ``train`` on each).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

from reference.checkpoint import load_checkpoint, save_checkpoint
from reference.models import build_model, init_params
from reference.params import Params
from reference.train import choose_strategy, train_many

from .context import Endpoint, JobContext
from .util import config_hash, jsonable

__all__ = ["endpoint_key", "endpoint_path", "load_endpoint", "missing_endpoints", "plan_training", "train_group"]


def endpoint_key(e: Endpoint, numerics: str) -> dict:
    """What a trained endpoint depends on: its declaration (``Endpoint.key``) and where it is trained
    (``numerics``: ``repro.runner.context.device_description`` of the training job, threads included)."""
    return {**e.key(), "device": numerics}


def endpoint_path(cache_dir: Path, e: Endpoint, numerics: str) -> Path:
    return Path(cache_dir) / "endpoints" / f"{config_hash(endpoint_key(e, numerics))}.pt"


def _check(cache_dir: Path, e: Endpoint, numerics: str) -> tuple[Params | None, str | None]:
    """``(params, None)`` for a usable cache entry, else ``(None, reason)``."""
    path = endpoint_path(cache_dir, e, numerics)
    if not path.is_file():
        return None, None
    try:
        ck = load_checkpoint(path, expected_model_config=dict(e.model))
    except (ValueError, OSError) as err:
        return None, f"cached endpoint {path} is unusable ({err}); retraining it"
    stored = (ck.extra or {}).get("key")
    if jsonable(stored) != jsonable(endpoint_key(e, numerics)):
        return None, f"cached endpoint {path} was stored under another key; retraining it"
    return ck.params, None


def load_endpoint(cache_dir: Path, e: Endpoint, numerics: str) -> Params:
    params, why = _check(cache_dir, e, numerics)
    if params is None:
        raise FileNotFoundError(why or f"endpoint {endpoint_path(cache_dir, e, numerics)} has not been trained "
                                       f"(the runner trains declared endpoints before the jobs that need them)")
    return params


def missing_endpoints(cache_dir: Path, es: Sequence[Endpoint], numerics: str, log=print) -> list[Endpoint]:
    out = []
    for e in es:
        params, why = _check(cache_dir, e, numerics)
        if params is None:
            if why:
                log(f"  {why}")
            out.append(e)
    return out


def plan_training(es: Sequence[Endpoint], ctx: JobContext, threads: int) -> list[tuple[tuple[Endpoint, ...], str]]:
    """The training jobs for endpoints ``es``, as ``(endpoints, strategy)`` pairs in first-seen order: per group,
    the strategy ``train_many``'s ``"auto"`` picks for it (``reference.train.choose_strategy`` on this job
    context's device with ``threads``, the torch threads of the executor's jobs); a ``"vmap"`` group is one
    job, a ``"sequential"`` one a job per endpoint."""
    groups: dict[str, list[Endpoint]] = {}
    for e in es:
        groups.setdefault(e.group(), []).append(e)
    plan: list[tuple[tuple[Endpoint, ...], str]] = []
    for g in groups.values():
        e0 = g[0]
        model = build_model(dict(e0.model))
        # the data on the CPU: the choice reads its shape and the model's cost, and on another device needs neither
        x = replace(ctx, device="cpu").data(e0.data, e0.view).x_train
        strategy = choose_strategy(model, init_params(model, int(e0.seed)), x, e0.train, ctx.dev, threads)
        if strategy == "sequential":
            plan.extend(((e,), strategy) for e in g)
        else:
            plan.append((tuple(g), strategy))
    return plan


def train_group(es: Sequence[Endpoint], ctx: JobContext, strategy: str = "auto") -> dict:
    """Train endpoints that differ only in their seed with ``train_many(..., strategy=strategy)`` (``"vmap"``:
    K at once) and store each in the cache."""
    es = list(es)
    if len({e.group() for e in es}) != 1:
        raise ValueError("train_group takes endpoints that differ only in their seed")
    e0 = es[0]
    data = ctx.data(e0.data, e0.view)
    model = build_model(dict(e0.model))
    how = f"{len(es)} endpoints of {e0.model.get('name')} at once" if len(es) > 1 else \
        f"endpoint {e0.model.get('name')} seed {e0.seed}"
    ctx.log(f"training {how} on {ctx.device}")
    inits = [init_params(model, int(e.seed)) for e in es]
    trained = train_many(model, inits, data.x_train, data.y_train, e0.train, [int(e.seed) for e in es],
                         device=ctx.dev, progress=ctx.progress, strategy=strategy)
    for e, params in zip(es, trained, strict=True):
        save_checkpoint(endpoint_path(Path(ctx.cache_dir), e, ctx.numerics), params, model_config=dict(e.model),
                        train_config=asdict(e.train), extra={"key": jsonable(endpoint_key(e, ctx.numerics))})
    return {"trained": [config_hash(e.key()) for e in es]}
