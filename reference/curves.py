"""Parametric curves between two parameter points and their training (Garipov et al. 2018).

Garipov, Izmailov, Podoprikhin, Vetrov & Wilson, "Loss Surfaces, Mode Connectivity, and Fast
Ensembling of DNNs", NeurIPS 2018 (arXiv:1802.10026). Equation and section numbers below are those of
the arXiv version.

**Curves.** A curve φ: [0, 1] → Θ from θ_start to θ_end is a combination of n + 1 control points
θ₀ = θ_start, θ₁ … θ_{n−1} (free, trained), θ_n = θ_end with coefficients c(t) ∈ ℝⁿ⁺¹:

    φ(t) = Σᵢ cᵢ(t) θᵢ,        c₀(0) = 1, c_n(1) = 1, Σᵢ cᵢ(t) = 1 on [0, 1]        (★)

so φ(0) = θ_start and φ(1) = θ_end, and φ is ``params.combine_batch(kind.coeffs(t), points)``.

- ``Bezier(order)``: Bernstein coefficients cᵢ(t) = C(n, i) tⁱ (1 − t)ⁿ⁻ⁱ, n = ``order``. Order 2 is
  the quadratic Bezier curve of §3.2, φ(t) = (1 − t)² ŵ₁ + 2t(1 − t) θ + t² ŵ₂; higher orders are
  the ``Bezier(num_bends)`` of the authors' code (``dnn-mode-connectivity/curves.py``).
- ``PolyChain(bends)``: a piecewise-linear path through ``bends`` free points at equally spaced
  knots tᵢ = i / n, n = bends + 1: cᵢ(t) = max(0, 1 − |n t − i|) (hat functions). One bend is the
  polygonal chain of §3.2, φ(t) = 2(tθ + (½ − t) ŵ₁) on [0, ½] and 2((t − ½) ŵ₂ + (1 − t) θ) on
  [½, 1].

``dcoeffs(t)`` is dc/dt, so ``Curve.tangents_at(t)`` = φ'(t) = Σᵢ cᵢ'(t) θᵢ. Integer buffers
(``num_batches_tracked``) are not coordinates: a curve point takes them from θ_start.

**Training** (§3.1). The free points minimise the loss averaged uniformly over t, Eq. (2):

    ℓ(θ) = ∫₀¹ L(φ_θ(t)) dt = E_{t∼U(0,1)} L(φ_θ(t))

(the arc-length-weighted Eq. (1) has intractable stochastic gradients; the paper trains Eq. (2)).
Each step draws a minibatch and ``points_per_step`` = T values t₁ … t_T ∼ U(0, 1) and takes a step
on (1/T) Σⱼ L_batch(φ(tⱼ)), an unbiased estimate of Eq. (2) (the paper draws T = 1 per step). The T
points come from one ``combine_batch`` and are evaluated in **one** ``vmap(functional_call)`` call
(``vectorized=True``), or one after another with a backward pass each (``vectorized=False``: the same
objective and gradient, T forward/backward passes; the benchmark's baseline). Gradients reach the
free points only; the endpoints are constants.

BatchNorm: curve training runs the model in train mode, each point normalising by its batch
statistics, as the authors do; the running statistics it produces are discarded (the free points
keep the buffers they were initialised with). ``evaluate_curve`` recomputes the statistics at every
evaluated t (``reference/bn.py``, the authors' ``update_bn``) before evaluating in eval mode.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from .barrier import PathEval, evaluate_path
from .bn import override_momentum
from .fit import Batch, fit, logits_at, mean_cross_entropy, module_mode, prepare, seeded_rng
from .optim import TrainConfig
from .params import Params, check_compatible, check_finite, combine_batch, float_keys, is_float
from .validate import choice, counts, integer, number

__all__ = [
    "CURVE_KINDS",
    "L2_TARGETS",
    "Bezier",
    "Curve",
    "CurveKind",
    "PolyChain",
    "curve_loss",
    "evaluate_curve",
    "make_kind",
    "train_curve",
]

CURVE_KINDS = ("bezier", "polychain")
L2_TARGETS = ("free", "curve")


# ---------------------------------------------------------------------------------------------
# curve kinds: t → coefficients over the control points


def _as_t(t: Tensor | float | Sequence[float]) -> Tensor:
    """``t`` as a 1-D float64 tensor of values in [0, 1] (a scalar becomes ``[1]``).

    Always float64 (a Python float would otherwise become float32, torch's default dtype): the
    coefficients are computed in float64 and cast to each parameter's dtype by ``combine_batch``.
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    if t.ndim == 0:
        t = t.reshape(1)
    if t.ndim != 1:
        raise ValueError(f"t must be a scalar or a 1-D tensor, got shape {tuple(t.shape)}")
    if t.numel() and not bool(((t >= 0) & (t <= 1)).all()):
        bad = t[~((t >= 0) & (t <= 1))][0]
        raise ValueError(f"t must lie in [0, 1] (curves are defined there), got {float(bad)!r}")
    return t


def _bernstein(n: int, t: Tensor) -> Tensor:
    """Bernstein basis [K, n + 1]: C(n, i) tⁱ (1 − t)ⁿ⁻ⁱ (with 0⁰ = 1, so exact at t = 0 and 1)."""
    i = torch.arange(n + 1, dtype=t.dtype, device=t.device)
    binom = torch.tensor([math.comb(n, k) for k in range(n + 1)], dtype=t.dtype, device=t.device)
    tt = t.unsqueeze(1)
    return binom * tt.pow(i) * (1 - tt).pow(n - i)


class _Basis:
    """What every curve basis shares: its fields are sizes (integers >= 1, checked on construction), and its
    first and last control points are the endpoints."""

    n_points: int

    def __post_init__(self) -> None:
        counts(**{f.name: getattr(self, f.name) for f in fields(self)})

    @property
    def n_free(self) -> int:
        """The control points between the endpoints (the ones a curve trains)."""
        return self.n_points - 2


@dataclass(frozen=True)
class Bezier(_Basis):
    """Bezier curve of ``order`` n ≥ 1 over n + 1 control points (n − 1 free).

    cᵢ(t) = C(n, i) tⁱ (1 − t)ⁿ⁻ⁱ (Bernstein polynomials; Garipov et al. 2018, §3.2 for n = 2).
    Properties: non-negative on [0, 1], Σᵢ cᵢ = 1, c(0) = e₀, c(1) = e_n; control points equally
    spaced on a line give that line with φ(t) = (1 − t) θ₀ + t θ_n (linear precision).
    """

    order: int
    name = "bezier"

    @property
    def n_points(self) -> int:
        return self.order + 1

    def coeffs(self, t: Tensor | float | Sequence[float]) -> Tensor:
        """[K, order + 1] Bernstein coefficients at the K values of ``t``."""
        return _bernstein(self.order, _as_t(t))

    def dcoeffs(self, t: Tensor | float | Sequence[float]) -> Tensor:
        """[K, order + 1] derivatives: cᵢ'(t) = n (B_{i−1, n−1}(t) − B_{i, n−1}(t)), B_{−1} = B_n = 0."""
        t = _as_t(t)
        low = _bernstein(self.order - 1, t)  # [K, n]
        zero = torch.zeros_like(low[:, :1])
        return self.order * (torch.cat([zero, low], 1) - torch.cat([low, zero], 1))


@dataclass(frozen=True)
class PolyChain(_Basis):
    """Polygonal chain through ``bends`` ≥ 1 free points at equally spaced knots tᵢ = i / (bends + 1).

    cᵢ(t) = max(0, 1 − |n t − i|) with n = bends + 1 (hat functions; Garipov et al. 2018, §3.2 for one
    bend). Properties: non-negative, Σᵢ cᵢ = 1 on [0, 1], c(tᵢ) = eᵢ (the chain passes through its
    bends), at most two non-zero coefficients at any t.
    """

    bends: int
    name = "polychain"

    @property
    def n_points(self) -> int:
        return self.bends + 2

    @property
    def knots(self) -> Tensor:
        """The n + 1 knots tᵢ = i / n (float64), the first and last being the endpoints."""
        return torch.linspace(0, 1, self.n_points, dtype=torch.float64)

    def coeffs(self, t: Tensor | float | Sequence[float]) -> Tensor:
        """[K, bends + 2] hat-function coefficients at the K values of ``t``."""
        t = _as_t(t)
        n = self.n_points - 1
        i = torch.arange(n + 1, dtype=t.dtype, device=t.device)
        return (1 - (t.unsqueeze(1) * n - i).abs()).clamp_min(0)

    def dcoeffs(self, t: Tensor | float | Sequence[float]) -> Tensor:
        """[K, bends + 2] derivatives: −n on the segment's left knot, +n on its right one.

        At an interior knot (a kink) this is the derivative of the segment to its right; at t = 1,
        of the last segment.
        """
        t = _as_t(t)
        n = self.n_points - 1
        seg = torch.floor(t * n).clamp(0, n - 1).long()
        out = torch.zeros(t.shape[0], n + 1, dtype=t.dtype, device=t.device)
        rows = torch.arange(t.shape[0], device=t.device)
        out[rows, seg] = -float(n)
        out[rows, seg + 1] = float(n)
        return out


CurveKind = Bezier | PolyChain


def make_kind(kind: str | CurveKind, order: int = 2, bends: int = 1) -> CurveKind:
    """``"bezier"`` → ``Bezier(order)``, ``"polychain"`` → ``PolyChain(bends)``; an instance is returned as is."""
    if isinstance(kind, (Bezier, PolyChain)):
        return kind
    if kind == "bezier":
        return Bezier(order)
    if kind == "polychain":
        return PolyChain(bends)
    raise ValueError(f"unknown curve kind {kind!r}; use one of {CURVE_KINDS} (or a Bezier / PolyChain)")


# ---------------------------------------------------------------------------------------------
# a curve: kind + fixed endpoints + free control points


@dataclass(frozen=True, eq=False)
class Curve:
    """A curve φ(t) = Σᵢ cᵢ(t) θᵢ (Eq. ★ of the module docstring) with fixed endpoints.

    ``points`` = [start, *free, end]. Validated on construction: ``len(free) == kind.n_free`` and every
    point has the keys, shapes and dtype kinds of ``start`` (``ValueError`` naming the first key that
    differs). The dicts are held, not copied; no method modifies them.
    """

    kind: CurveKind
    start: Params
    end: Params
    free: tuple[Params, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.kind, (Bezier, PolyChain)):
            raise TypeError(f"kind must be a Bezier or PolyChain, got {type(self.kind).__name__}")
        object.__setattr__(self, "free", tuple(self.free))
        if len(self.free) != self.kind.n_free:
            raise ValueError(f"{self.kind} has {self.kind.n_free} free control point(s), got {len(self.free)}")
        check_compatible(self.start, self.end, *self.free)

    @property
    def points(self) -> list[Params]:
        """All n + 1 control points, endpoints included: [θ_start, θ₁, …, θ_{n−1}, θ_end]."""
        return [self.start, *self.free, self.end]

    def points_at(self, t: Tensor | float | Sequence[float]) -> Params:
        """The K points φ(t) stacked along a leading dimension (``combine_batch(coeffs(t), points)``)."""
        return combine_batch(self.kind.coeffs(t), self.points)

    def tangents_at(self, t: Tensor | float | Sequence[float]) -> Params:
        """φ'(t) = Σᵢ cᵢ'(t) θᵢ, stacked, over the floating entries only."""
        keys = float_keys(self.start)
        return combine_batch(self.kind.dcoeffs(t), [{k: p[k] for k in keys} for p in self.points])

    @classmethod
    def init_linear(
        cls,
        start: Mapping[str, Tensor],
        end: Mapping[str, Tensor],
        kind: str | CurveKind = "bezier",
        n: int | None = None,
    ) -> Curve:
        """Free points equally spaced on the segment: θᵢ = (1 − i/n) θ_start + (i/n) θ_end.

        The authors' ``init_linear``. For both kinds the resulting curve *is* the segment,
        φ(t) = (1 − t) θ_start + t θ_end. ``kind``: a ``Bezier`` / ``PolyChain``, or ``"bezier"`` /
        ``"polychain"`` with ``n`` its order / number of bends (default 2 / 1). Endpoints are copied.
        Integer buffers of the free points come from ``start``.
        """
        if not isinstance(kind, str) and n is not None:
            raise ValueError(f"n={n!r} given with a curve kind instance {kind}: give one or the other")
        if isinstance(kind, str) and n is not None:
            ck = make_kind(kind, order=n) if kind == "bezier" else make_kind(kind, bends=n)
        else:
            ck = make_kind(kind)
        check_compatible(start, end)
        m = ck.n_points - 1
        free = []
        for i in range(1, m):
            a = i / m
            free.append(
                {
                    k: ((1 - a) * v + a * end[k]).detach() if is_float(v) else v.detach().clone()
                    for k, v in start.items()
                }
            )
        return cls(
            ck,
            {k: v.detach().clone() for k, v in start.items()},
            {k: v.detach().clone() for k, v in end.items()},
            tuple(free),
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Curve:
        """A copy on ``device`` with floating entries cast to ``dtype``."""

        def mv(p: Params) -> Params:
            return {
                k: v.to(device=device, dtype=dtype if (dtype is not None and is_float(v)) else None, copy=True)
                for k, v in p.items()
            }

        return Curve(self.kind, mv(self.start), mv(self.end), tuple(mv(p) for p in self.free))


# ---------------------------------------------------------------------------------------------
# the objective of Eq. (2)


def curve_loss(
    model: nn.Module,
    curve: Curve,
    x: Tensor,
    y: Tensor,
    t: Tensor | float | Sequence[float],
    *,
    vectorized: bool = True,
    train_mode: bool = True,
    label_smoothing: float = 0.0,
) -> Tensor:
    """(1/T) Σⱼ L(φ(tⱼ); x, y): the Monte-Carlo estimate of Eq. (2) at the T given ``t``.

    Differentiable in the curve's tensors (set ``requires_grad`` on the free points to get their
    gradient). ``vectorized=True``: the T points in one ``vmap`` call; ``False``: T calls (the same
    value up to reassociation). ``train_mode=True`` normalises BatchNorm by batch statistics (as in
    training); the running statistics this updates are those of throw-away combined buffers.
    """
    dev = next(iter(curve.start.values())).device
    extra = {n: b for n, b in model.named_buffers() if n not in curve.start}
    stacked = curve.points_at(t)
    stacked = {k: v.to(dev) for k, v in stacked.items()}
    with module_mode(model, train_mode), override_momentum(model, 0.1):
        logits = logits_at(model, stacked, extra, x.to(dev), vectorized)
    return mean_cross_entropy(logits, y.to(dev, dtype=torch.long), label_smoothing)


# ---------------------------------------------------------------------------------------------
# training


def train_curve(
    model: nn.Module,
    start: Mapping[str, Tensor],
    end: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    cfg: TrainConfig,
    kind: str | CurveKind = "bezier",
    order: int = 2,
    bends: int = 1,
    seed: int = 0,
    points_per_step: int = 4,
    l2: float = 0.0,
    l2_on: str = "free",
    vectorized: bool = True,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> Curve:
    """Train the free control points of a curve from ``start`` to ``end`` on Eq. (2); return the
    ``Curve`` (new tensors, on CPU).

    The free points start on the segment (``Curve.init_linear``). Every step (``cfg.epochs`` epochs of
    ``cfg.steps_per_epoch(n)`` minibatches):

    1. minibatch indices from ``torch.randperm(n, generator=g)`` per epoch and T = ``points_per_step``
       values ``t = torch.rand(T, generator=g)``, with ``g`` a CPU generator seeded with ``seed`` (the
       same draws on every device and for both ``vectorized`` settings);
    2. loss = (1/T) Σⱼ CE(f(φ(tⱼ), x_b), y_b) + R, with R = ½ ``l2`` Σ_free ‖θᵢ‖² (``l2_on="free"``)
       or ½ ``l2`` (1/T) Σⱼ ‖φ(tⱼ)‖² (``"curve"``: the regulariser of the authors' code, which
       weighs the free points by cᵢ(t)²). ``cfg.weight_decay`` also acts on the free points through
       the optimizer (as in ``reference.train``); use one or the other;
    3. gradients with respect to the free points' trainable entries only (buffers and endpoints are
       constants), optional clipping (``cfg.grad_clip``, over all free points together), and the
       ``cfg.optimizer`` step of ``reference.train`` (SGD with momentum, Adam, AdamW) at
       ``lr_schedule(cfg, step, total)``.

    ``vectorized=True`` evaluates the T points in one ``vmap`` call (memory: T forward graphs);
    ``False`` runs T forward/backward passes and sums their gradients (the same gradient up to
    reassociation; dropout masks differ). BatchNorm runs in train mode (batch statistics), with every
    module's momentum set to 0.1 for the duration (the running statistics are discarded), so
    ``momentum=None`` layers work under ``vmap`` too. Raises ``ValueError`` for a curve without free
    points (``order=1``), for a loss that becomes NaN or infinite, and for bad arguments.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    ck = make_kind(kind, order=order, bends=bends)
    if ck.n_free < 1:
        raise ValueError(f"{ck} has no free control points to train (it is the straight line)")
    T = integer("points_per_step", points_per_step)
    l2 = number("l2", l2, minimum=0.0)
    choice("l2_on", l2_on, L2_TARGETS)
    check_compatible(start, end)
    prep = prepare(model, start, x, y, cfg, device)
    p_keys, b_keys, dev, extra, x, y = prep.p_keys, prep.b_keys, prep.device, prep.constants, prep.x, prep.y

    init = Curve.init_linear({k: v.to(dev) for k, v in start.items()}, {k: v.to(dev) for k, v in end.items()}, ck)
    leaves = [[p[k].clone().requires_grad_(True) for k in p_keys] for p in init.free]
    flat_leaves = [t for pt in leaves for t in pt]
    const_start = {k: init.start[k] for k in p_keys}
    const_end = {k: init.end[k] for k in p_keys}
    buf_points = [{k: p[k] for k in b_keys} for p in init.points]
    g = torch.Generator().manual_seed(int(seed))
    ls = cfg.label_smoothing

    def points_of(free: list[list[Tensor]]) -> list[Params]:
        return [const_start, *[dict(zip(p_keys, pt, strict=True)) for pt in free], const_end]

    def step_loss(ts: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
        """The data loss (+ the ``"curve"`` L2) at the given t, differentiable in the leaves; one
        vmapped call for all of ``ts`` (vectorized), a plain call for a single t (the loop)."""
        coeffs = ck.coeffs(ts)
        stacked = combine_batch(coeffs, points_of(leaves))
        if b_keys:
            stacked.update(combine_batch(coeffs, buf_points))  # no grad; BatchNorm writes into these
        loss = mean_cross_entropy(logits_at(model, stacked, extra, xb, vectorized), yb, ls)
        if l2 and l2_on == "curve":
            sq = sum(stacked[k].pow(2).reshape(stacked[k].shape[0], -1).sum(1) for k in p_keys)
            loss = loss + 0.5 * l2 * sq.mean()
        return loss

    def free_l2() -> Tensor:
        return 0.5 * l2 * sum(t.pow(2).sum() for t in flat_leaves)

    def objective(batch: Batch) -> Tensor | Iterator[Tensor]:
        ts = torch.rand(T, generator=g, dtype=torch.float64)
        if vectorized:
            loss = step_loss(ts, batch.x, batch.y)
            return loss + free_l2() if l2 and l2_on == "free" else loss

        def parts() -> Iterator[Tensor]:  # the loop: T parts, one forward graph alive at a time
            for j in range(T):
                part = step_loss(ts[j : j + 1], batch.x, batch.y) / T
                yield part + free_l2() if j == 0 and l2 and l2_on == "free" else part

        return parts()

    with module_mode(model, True), override_momentum(model, 0.1), seeded_rng(int(seed), dev):
        fit(flat_leaves, objective, x, y, cfg, g, what="curve training",
            context=f"(seed {seed}) with {cfg.optimizer} lr={cfg.lr:g}", progress=progress, desc=f"curve {ck}")

    free_out: list[Params] = []
    for pt, init_pt in zip(leaves, init.free, strict=True):
        got = dict(zip(p_keys, (t.detach() for t in pt), strict=True))
        got.update({k: init_pt[k] for k in b_keys})
        point = {k: got[k].cpu().clone() for k in start}
        check_finite(point, what=f"trained control point (seed {seed}); try a lower learning rate")
        free_out.append(point)
    return Curve(
        ck,
        {k: v.detach().cpu().clone() for k, v in start.items()},
        {k: v.detach().cpu().clone() for k, v in end.items()},
        tuple(free_out),
    )


# ---------------------------------------------------------------------------------------------
# evaluation along the curve


def evaluate_curve(
    model: nn.Module,
    curve: Curve,
    splits: Mapping[str, tuple[Tensor, Tensor]],
    t_grid: Tensor | int = 21,
    *,
    recompute_bn: bool = True,
    bn_x: Tensor | None = None,
    bn_batch_size: int | None = None,
    bn_method: str = "pooled",
    **eval_kwargs: Any,
) -> PathEval:
    """Loss and error of φ(t) on every split along ``t_grid`` (an int G: ``linspace(0, 1, G)``).

    Returns a ``reference.barrier.PathEval`` (``.barriers()`` / ``.barrier_table()`` apply when the
    grid runs from 0 to 1). With ``recompute_bn`` and a BatchNorm model, the running statistics of
    every φ(t) are first recomputed (``reference.bn.recompute_bn_stats_batched``, ``bn_method``,
    ``bn_batch_size``) on ``bn_x`` (default: the inputs of the split named ``"train"``, else of the
    first split), as Garipov et al. do before evaluating each point; the points are then evaluated in
    eval mode by ``reference.evaluate.evaluate_points`` (``eval_kwargs``: ``chunk_size``,
    ``batch_size``, ``device``).
    """
    if not isinstance(curve, Curve):
        raise TypeError(f"curve must be a Curve, got {type(curve).__name__}")
    if not splits:
        raise ValueError("splits is empty: give at least one (x, y) split to evaluate on")
    if isinstance(t_grid, int) and not isinstance(t_grid, bool):
        if t_grid < 2:
            raise ValueError(f"t_grid needs at least 2 points, got {t_grid}")
        t = torch.linspace(0, 1, t_grid, dtype=torch.float64)
    else:
        t = _as_t(t_grid).to(torch.float64)
    stacked = curve.points_at(t)
    return evaluate_path(model, t, stacked, splits, recompute_bn=recompute_bn, bn_x=bn_x, bn_batch_size=bn_batch_size,
                         bn_method=bn_method, **eval_kwargs)
