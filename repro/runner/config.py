"""Sizes and ``--set field=value`` overrides of a target's frozen config dataclass."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from reference import validate

from .declare import SIZES, Target

__all__ = ["apply_overrides", "config_for", "parse_override"]


def _field_names(cfg: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(cfg)]


def _coerce(text: str, current: Any, where: str) -> Any:
    """Parse ``text`` as a value of the same kind as ``current``."""
    low = text.strip().lower()
    if current is None or low in ("none", "null"):
        if low in ("none", "null"):
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    if isinstance(current, bool):
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"--set {where}: expected true or false, got {text!r}")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"--set {where}: expected an integer, got {text!r}") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"--set {where}: expected a number, got {text!r}") from None
    if isinstance(current, str):
        return text
    if isinstance(current, tuple):
        try:
            val = json.loads(text)
        except json.JSONDecodeError:
            val = [v for v in text.split(",") if v.strip()]
        if not isinstance(val, list):
            val = [val]
        proto = current[0] if current else None

        def conv(v: Any) -> Any:
            if isinstance(v, list):
                return tuple(conv(u) for u in v)
            if proto is not None and not isinstance(proto, tuple) and isinstance(v, str):
                return _coerce(v, proto, where)
            if isinstance(proto, float) and isinstance(v, int) and not isinstance(v, bool):
                return float(v)
            return v

        return tuple(conv(v) for v in val)
    if dataclasses.is_dataclass(current):
        raise ValueError(f"--set {where}: {where} is a group of settings; set one of its fields "
                         f"({', '.join(where + '.' + n for n in _field_names(current))})")
    raise ValueError(f"--set {where}: cannot set a field of type {type(current).__name__}")


def _set(cfg: Any, path: Sequence[str], text: str, full: str) -> Any:
    names = _field_names(cfg)
    head = path[0]
    if head not in names:
        raise ValueError(f"--set {full}: {type(cfg).__name__} has no field {head!r}; its fields: {', '.join(names)}")
    current = getattr(cfg, head)
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"--set {full}: {head!r} is not a group of settings")
        value = _set(current, path[1:], text, full)
    else:
        value = _coerce(text, current, full)
    try:
        return dataclasses.replace(cfg, **{head: value})
    except (TypeError, ValueError) as e:
        raise ValueError(f"--set {full}: {e}") from None


def parse_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ValueError(f"--set takes field=value, got {item!r}")
    k, v = item.split("=", 1)
    k = k.strip()
    if not k:
        raise ValueError(f"--set takes field=value, got {item!r}")
    return k, v


def apply_overrides(cfg: Any, overrides: Sequence[tuple[str, str]]) -> Any:
    for k, v in overrides:
        cfg = _set(cfg, k.split("."), v, k)
    return cfg


def config_for(t: Target, size: str, dataset: str | None, seed: int | None,
               overrides: Sequence[tuple[str, str]]) -> Any:
    """The config a run uses: the size's, with ``--dataset``, ``--seed`` and ``--set`` applied and validated."""
    validate.choice("size", size, SIZES)
    cfg = t.sizes[size]
    if dataset is not None:
        ds = dataset.strip().lower()
        if ds not in t.datasets:
            raise ValueError(f"target {t.name!r} does not take --dataset {dataset!r}; it supports: "
                             f"{', '.join(t.datasets)}")
        cfg = dataclasses.replace(cfg, dataset=ds)
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=validate.integer("seed", seed, minimum=None))
    cfg = apply_overrides(cfg, overrides)
    if cfg.dataset not in t.datasets:
        raise ValueError(f"target {t.name!r} does not support dataset {cfg.dataset!r}; it supports: "
                         f"{', '.join(t.datasets)}")
    return cfg
