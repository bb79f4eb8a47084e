"""Trained endpoints, cached by the hash of what determines them; missing ones trained K at once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from reference.checkpoint import load_checkpoint, save_checkpoint
from reference.data import Dataset
from reference.models import build_model, init_params
from reference.params import Params
from reference.train import TrainConfig, train_many

from .common import RunContext, config_hash

__all__ = ["trained_endpoints"]


def trained_endpoints(
    ctx: RunContext,
    model_config: Mapping[str, Any],
    data: Dataset,
    data_key: Mapping[str, Any],
    train_cfg: TrainConfig,
    seeds: Sequence[int],
) -> list[Params]:
    """One trained ``Params`` per seed; loaded from the cache when present, else trained together."""
    model = build_model(dict(model_config))
    keys = [
        {"model": dict(model_config), "train": asdict(train_cfg), "data": dict(data_key), "seed": int(s)}
        for s in seeds
    ]
    paths = [ctx.cache_dir / "endpoints" / f"{config_hash(k)}.pt" for k in keys]
    missing = []
    for i, p in enumerate(paths):
        if not p.is_file():
            missing.append(i)
            continue
        try:
            load_checkpoint(p, expected_model_config=dict(model_config))
        except ValueError as e:  # corrupt cache entry: say so, retrain it
            ctx.log(f"cache entry {p.name} unusable ({e}); retraining")
            missing.append(i)
    if missing:
        ctx.log(
            f"training {len(missing)} endpoint(s) of {model_config.get('name')} at once on {ctx.device} "
            f"({len(seeds) - len(missing)} cached)"
        )
        inits = [init_params(model, int(seeds[i])) for i in missing]
        trained = train_many(
            model, inits, data.x_train, data.y_train, train_cfg, [int(seeds[i]) for i in missing],
            device=ctx.device, progress=ctx.progress,
        )
        for i, params in zip(missing, trained, strict=True):
            save_checkpoint(paths[i], params, model_config=dict(model_config), train_config=asdict(train_cfg),
                            extra={"data": dict(data_key), "seed": int(seeds[i])})
    return [load_checkpoint(p, expected_model_config=dict(model_config)).params for p in paths]
