"""Reproduction targets register themselves here with their source paper and claims."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Target", "target", "TARGETS", "get_target", "load_all"]

# modules holding targets; importing one registers its targets
_MODULES = (
    "repro.ainsworth2023",
    "repro.garipov2018",
    "repro.curve_ensemble",
    "repro.benton2021",
    "repro.rebasin_sweeps",
    "repro.cycle_consistency",
    "repro.permuted_simplex",
    "repro.anokhin2020",
    "repro.rashomon_hessian",
)


@dataclass(frozen=True)
class Target:
    name: str
    paper: str
    arxiv: str
    claims: tuple[str, ...]
    description: str
    run: Callable = field(repr=False)


TARGETS: dict[str, Target] = {}


def target(name: str, *, paper: str, arxiv: str = "", claims: tuple[str, ...] = (), description: str = ""):
    """Register ``fn(ctx: RunContext) -> None`` as reproduction target ``name``."""

    def deco(fn: Callable) -> Callable:
        if name in TARGETS:
            raise ValueError(f"target {name!r} registered twice")
        TARGETS[name] = Target(name, paper, arxiv, tuple(claims), description or (fn.__doc__ or "").strip(), fn)
        return fn

    return deco


def load_all() -> dict[str, Target]:
    for m in _MODULES:
        importlib.import_module(m)
    return TARGETS


def get_target(name: str) -> Target:
    load_all()
    if name not in TARGETS:
        known = ", ".join(sorted(TARGETS))
        raise KeyError(f"unknown target {name!r}; known targets: {known}")
    return TARGETS[name]
