"""Barriers along a path, each definition named explicitly.

For a path φ with φ(0) = θ₁, φ(1) = θ₂ evaluated on a grid t₀ = 0 < … < t_{G−1} = 1 of a metric v
(loss or error, on a named split):

- ``max_chord``: maxₜ v(φ(t)) − [(1 − t) v(θ₁) + t v(θ₂)]
  (Frankle et al. 2020; Entezari et al. 2022, Eq. 1). Lower bound: 0, attained at the endpoints.
- ``mid``: maxₜ v(φ(t)) − ½ (v(θ₁) + v(θ₂))  (Ainsworth et al. 2023, Definition 2.2 for loss).
  Lower bound: ½ |v(θ₁) − v(θ₂)|, the gap of the worse endpoint itself.

Every result records its definition, metric, split and grid size.

A path with a NaN value (a point with NaN weights: ``evaluate_points`` reports NaN loss *and* NaN
error for it) has barrier NaN, with ``t_max`` the first such t: never a finite number (an error
barrier of 0.0 along a broken path would read as "connected").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from . import validate
from .bn import has_batchnorm, recompute_bn_stats_batched
from .combinations import evaluate_combinations
from .evaluate import evaluate_points
from .params import combine_batch

__all__ = [
    "BARRIER_KINDS",
    "Barrier",
    "barrier",
    "barrier_lower_bound",
    "evaluate_linear_path",
    "PathEval",
    "linear_path",
    "evaluate_path",
]

BARRIER_KINDS = ("max_chord", "mid")


@dataclass(frozen=True)
class Barrier:
    value: float
    t_max: float
    kind: str
    metric: str
    split: str
    grid_size: int

    def as_dict(self) -> dict:
        return asdict(self)


def _check_grid(t: Tensor, v: Tensor) -> None:
    if t.ndim != 1 or v.shape != t.shape:
        raise ValueError(f"t and values must be 1-D of one length, got {tuple(t.shape)} and {tuple(v.shape)}")
    if t.numel() < 2:
        raise ValueError("a barrier needs at least the two endpoints")
    if float(t[0]) != 0.0 or float(t[-1]) != 1.0:
        raise ValueError(f"the grid must start at t=0 and end at t=1, got {float(t[0])} … {float(t[-1])}")
    if bool((t[1:] <= t[:-1]).any()):
        raise ValueError("the grid must be strictly increasing")


def barrier(
    values: Tensor, t: Tensor, kind: str = "max_chord", *, metric: str = "loss", split: str = "train"
) -> Barrier:
    """Barrier of ``values`` [G] on grid ``t`` [G] by definition ``kind`` (see module docstring);
    NaN if a value is NaN, with ``t_max`` the first such t."""
    values = torch.as_tensor(values, dtype=torch.float64)
    t = torch.as_tensor(t, dtype=torch.float64)
    _check_grid(t, values)
    validate.choice("barrier kind", kind, BARRIER_KINDS)
    bad = torch.isnan(values)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        return Barrier(float("nan"), float(t[i]), kind, metric, split, int(t.numel()))
    v0, v1 = values[0], values[-1]
    if kind == "max_chord":
        gap = values - ((1 - t) * v0 + t * v1)
    else:
        gap = values - 0.5 * (v0 + v1)
    i = int(torch.argmax(gap))
    return Barrier(float(gap[i]), float(t[i]), kind, metric, split, int(t.numel()))


def barrier_lower_bound(values: Tensor, kind: str) -> float:
    """The least value ``barrier`` can return for these values (documented above; NaN if one is NaN,
    as the barrier itself)."""
    values = torch.as_tensor(values, dtype=torch.float64)
    validate.choice("barrier kind", kind, BARRIER_KINDS)
    if bool(torch.isnan(values).any()):
        return float("nan")
    if kind == "max_chord":
        return 0.0
    return float(0.5 * (values[0] - values[-1]).abs())


@dataclass(frozen=True)
class PathEval:
    """Loss and error along a path on each split: ``curves[split] = {"loss": [G], "error": [G]}``."""

    t: Tensor
    curves: dict[str, dict[str, Tensor]]

    def barriers(self, kinds: tuple[str, ...] = BARRIER_KINDS) -> list[Barrier]:
        return [
            barrier(vals, self.t, kind, metric=metric, split=split)
            for split, per in self.curves.items()
            for metric, vals in per.items()
            for kind in kinds
        ]

    def barrier_table(self, kinds: tuple[str, ...] = BARRIER_KINDS) -> dict[str, float]:
        """``{"<split>_<metric>_<kind>": value}``, e.g. ``train_loss_max_chord``."""
        return {f"{b.split}_{b.metric}_{b.kind}": b.value for b in self.barriers(kinds)}


def linear_path(a: Mapping[str, Tensor], b: Mapping[str, Tensor], num_points: int) -> tuple[Tensor, dict]:
    """The grid t = linspace(0, 1, G) and the stacked points (1 − t) a + t b."""
    num_points = validate.integer("num_points", num_points, minimum=2)
    t = torch.linspace(0, 1, num_points, dtype=torch.float64)
    coeffs = torch.stack([1 - t, t], dim=1)
    return t, combine_batch(coeffs, [a, b])


def mid_loss_barriers(
    model: nn.Module, pairs: list[tuple[Mapping[str, Tensor], Mapping[str, Tensor]]], x: Tensor, y: Tensor, grid: int
) -> list[float]:
    """The ``mid`` loss barrier on (x, y) of the straight path a → b of every pair, all ``len(pairs) × grid``
    points in one ``evaluate_points`` call (a BatchNorm net's statistics recomputed on ``x`` at every point
    first, ``recompute_bn_stats_batched``): ``barrier(L, t, "mid").value`` per pair (NaN for a path with a NaN
    loss). No pairs: ``[]``."""
    if not pairs:
        return []
    paths = [linear_path(a, b, grid) for a, b in pairs]
    st = {k: torch.cat([p[k] for _, p in paths]) for k in paths[0][1]}
    if has_batchnorm(model):
        st = recompute_bn_stats_batched(model, st, x)
    loss = evaluate_points(model, st, x, y).loss.view(len(pairs), grid)
    return [barrier(row, paths[0][0], "mid").value for row in loss]


def evaluate_path(
    model: nn.Module,
    t: Tensor,
    stacked: Mapping[str, Tensor],
    splits: Mapping[str, tuple[Tensor, Tensor]],
    *,
    recompute_bn: bool = False,
    bn_x: Tensor | None = None,
    bn_batch_size: int | None = None,
    bn_method: str = "pooled",
    **eval_kwargs,
) -> PathEval:
    """Evaluate the G stacked path points on every split in one vmapped pass per split.

    With ``recompute_bn`` and a BatchNorm model, every point's running statistics are first
    recomputed (``reference.bn.recompute_bn_stats_batched``, ``bn_method``, ``bn_batch_size``) on
    ``bn_x`` (default: the inputs of the split named ``"train"``, else of the first split), as
    Garipov et al. do before evaluating a point of a curve; points are then evaluated in eval mode.
    ``eval_kwargs``: ``chunk_size``, ``batch_size``, ``device`` of ``evaluate_points``.
    """
    if not splits:
        raise ValueError("splits is empty: give at least one (x, y) split to evaluate on")
    recompute_bn = validate.flag("recompute_bn", recompute_bn)
    dev = eval_kwargs.get("device")
    if dev is not None:
        stacked = {k: v.to(dev) for k, v in stacked.items()}
    if recompute_bn and has_batchnorm(model):
        if bn_x is None:
            bn_x = splits["train"][0] if "train" in splits else next(iter(splits.values()))[0]
        stacked = recompute_bn_stats_batched(
            model, stacked, bn_x, batch_size=bn_batch_size, method=bn_method, chunk_size=eval_kwargs.get("chunk_size")
        )
    curves = {}
    for name, (x, y) in splits.items():
        m = evaluate_points(model, stacked, x, y, **eval_kwargs)
        curves[name] = {"loss": m.loss, "error": m.error}
    return PathEval(t=torch.as_tensor(t, dtype=torch.float64), curves=curves)


def evaluate_linear_path(
    model: nn.Module,
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    num_points: int,
    splits: Mapping[str, tuple[Tensor, Tensor]],
    *,
    first_layer_shortcut: bool | str = "auto",
    **eval_kwargs,
) -> PathEval:
    """``evaluate_path`` of ``linear_path(a, b, num_points)`` on every split, without BatchNorm
    recomputation, each split by ``reference.combinations.evaluate_combinations``: where the first layer
    is linear in θ and ``first_layer_shortcut`` says so (default ``"auto"``: where it pays), the points'
    first-layer outputs are combined from the two endpoints' (equal up to float rounding).
    ``eval_kwargs``: ``chunk_size``, ``batch_size``, ``device``."""
    if not splits:
        raise ValueError("splits is empty: give at least one (x, y) split to evaluate on")
    num_points = validate.integer("num_points", num_points, minimum=2)
    t = torch.linspace(0, 1, num_points, dtype=torch.float64)  # as linear_path
    coeffs = torch.stack([1 - t, t], dim=1)
    curves = {}
    for name, (x, y) in splits.items():
        m = evaluate_combinations(model, coeffs, [a, b], x, y, first_layer_shortcut=first_layer_shortcut,
                                  **eval_kwargs)
        curves[name] = {"loss": m.loss, "error": m.error}
    return PathEval(t=t, curves=curves)
