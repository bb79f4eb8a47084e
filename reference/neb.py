"""Nudged elastic band (NEB) and AutoNEB paths between two minima (Draxler et al. 2018).

Draxler, Veschgini, Salmhofer & Hamprecht, "Essentially No Barriers in Neural Network Energy
Landscape", ICML 2018 (arXiv:1803.00885), §2–3; the method is the nudged elastic band of
Jónsson, Mills & Jacobsen (1998) with the improved tangent of Henkelman & Jónsson (2000, J. Chem.
Phys. 113, 9978) and the automatic pivot insertion of AutoNEB (Kolsbjerg, Groves & Hammer 2016).

**The chain.** A path is a piecewise-linear chain of M pivots p₀ = θ_start, p₁ … p_{M−2} (free),
p_{M−1} = θ_end. Only the model's trainable parameters are coordinates of a pivot (the ``coords``
keys); distances ‖p_{i+1} − p_i‖ are Euclidean over them.

**Forces** (Draxler et al., Eq. 4–6; Henkelman & Jónsson 2000, Eq. 8–12). With L_i the minibatch
loss and g_i = ∇L(p_i) at the interior pivot i, the tangent τ̂_i is the improved (upwind) tangent

    τ⁺ = p_{i+1} − p_i,  τ⁻ = p_i − p_{i−1}
    τ_i = τ⁺                                   if L_{i+1} > L_i > L_{i−1}
          τ⁻                                   if L_{i+1} < L_i < L_{i−1}
          τ⁺ ΔL_max + τ⁻ ΔL_min                 otherwise, if L_{i+1} > L_{i−1}
          τ⁺ ΔL_min + τ⁻ ΔL_max                 otherwise
    ΔL_max = max(|L_{i+1} − L_i|, |L_{i−1} − L_i|), ΔL_min = min(…),  τ̂_i = τ_i / ‖τ_i‖

(falling back to τ⁺ + τ⁻ where that combination vanishes), and the nudged force is

    F_i = −(g_i − (g_i·τ̂_i) τ̂_i)  +  k (‖τ⁺‖ − ‖τ⁻‖) τ̂_i                       (NEB)

the loss gradient perpendicular to the path plus a spring force along it. ``spring_k = inf`` is
the setting of the authors' AutoNEB configurations (``spring-constant: inf``): no spring force, and
after every step the interior pivots are moved along the chain to equal arc-length spacing
(``redistribute``), the limit of infinitely stiff springs.

All interior pivots are relaxed at once: their coordinates are one leaf tensor [M − 2, D]; every
step the M pivots (endpoints included: their minibatch losses enter the tangent) are evaluated on
one minibatch in **one** ``vmap(functional_call)`` call, the gradients of all interior pivots come
from one backward pass, and the optimizer of ``reference.train`` (SGD with momentum, Adam) steps on
−F. The optimizer state and the learning-rate schedule restart every cycle, as in the authors' code.

**AutoNEB cycles.** ``cycles`` relaxations of ``cfg.train.epochs`` epochs each. The first starts
from ``init_pivots`` interior pivots equally spaced on the segment (the authors' ``equal`` fill).
Before every later cycle the chain is refined (the authors' ``highest`` fill): the loss on the
evaluation data is computed at the pivots and at ``sub_points`` equally spaced points α_j inside
every segment; the residual of a point is r = L(α) − [(1 − α) L_a + α L_b] (the loss above the
segment's pivots' interpolation), divided by the range max L − min L of the pivots' losses. In the
``insert_per_cycle`` segments of highest residual, where it exceeds ``insert_threshold``, a new
pivot is inserted at the point of highest residual (at most ``max_pivots`` interior pivots).
Insertion never moves or removes a pivot.

**BatchNorm.** During relaxation the model runs in train mode (batch statistics; every module's
momentum set to 0.1 and the running statistics produced discarded), as curve training does. The
insertion check evaluates in train mode with the whole evaluation set as one batch: that is
exactly evaluation with statistics recomputed on it (up to BatchNorm's biased vs unbiased
variance). The floating buffers stored in the returned pivots are *placeholders* (the endpoints'
buffers interpolated at the pivot's arc-length position): a BatchNorm model must have its
statistics recomputed at every evaluated point, which ``evaluate_neb`` does
(``reference.bn.recompute_bn_stats_batched``), as ``reference.curves.evaluate_curve`` does.

**Parametrisation.** ``NEBPath.points_at(t)`` is the piecewise-linear chain at t ∈ [0, 1], by
default with t the **normalised arc length** (pivot i at t_i = Σ_{j<i} ‖p_{j+1} − p_j‖ / total);
``param="uniform"`` puts pivot i at i / (M − 1) instead. ``grid(sub)`` gives every pivot plus ``sub``
equally spaced points inside every segment, in a form ``reference.barrier.evaluate_path`` accepts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .barrier import PathEval, evaluate_path
from .bn import has_batchnorm, override_momentum
from .evaluate import evaluate_points
from .fit import Batch, fit, logits_at, module_mode, prepare, seeded_rng, split_trainable
from .optim import TrainConfig
from .params import Params, check_compatible, check_finite, combine_batch

__all__ = [
    "PARAMS",
    "NEBConfig",
    "NEBPath",
    "evaluate_neb",
    "improved_tangents",
    "insert_pivots",
    "insertion_points",
    "interp_coeffs",
    "neb",
    "nudged_forces",
    "redistribute",
]

PARAMS = ("arc", "uniform")


# ---------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class NEBConfig:
    """Hyper-parameters of an AutoNEB run (module docstring); saved verbatim with results.

    ``train`` is the optimizer of *one* cycle (epochs per cycle, batch size, lr, optimizer, schedule;
    restarted every cycle). ``eval_examples`` training examples (the first ones; ``None``: all) are
    used for the insertion check.
    """

    init_pivots: int = 3
    cycles: int = 4
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=10, batch_size=128, lr=1e-3, optimizer="adam", schedule="cosine"))
    spring_k: float = math.inf
    insert_per_cycle: int = 2
    insert_threshold: float = 0.1
    max_pivots: int = 15
    sub_points: int = 9
    eval_examples: int | None = 2048

    def __post_init__(self) -> None:
        for name in ("init_pivots", "cycles", "insert_per_cycle", "max_pivots", "sub_points"):
            v = getattr(self, name)
            lo = 0 if name == "insert_per_cycle" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"NEBConfig.{name} must be an integer >= {lo}, got {v!r}")
        if self.init_pivots > self.max_pivots:
            raise ValueError(f"NEBConfig.init_pivots={self.init_pivots} exceeds max_pivots={self.max_pivots}")
        if not isinstance(self.train, TrainConfig):
            raise TypeError(f"NEBConfig.train must be a TrainConfig, got {type(self.train).__name__}")
        if self.train.weight_decay:
            raise ValueError("NEBConfig.train.weight_decay must be 0: a decay term would not be nudged "
                             "(it would pull pivots along the path); add it to the loss instead")
        if not (isinstance(self.spring_k, (int, float)) and self.spring_k > 0 and not math.isnan(self.spring_k)):
            raise ValueError(f"NEBConfig.spring_k must be > 0 (or inf), got {self.spring_k!r}")
        if not (isinstance(self.insert_threshold, (int, float)) and self.insert_threshold >= 0):
            raise ValueError(f"NEBConfig.insert_threshold must be >= 0, got {self.insert_threshold!r}")
        if self.eval_examples is not None and (
            isinstance(self.eval_examples, bool) or not isinstance(self.eval_examples, int) or self.eval_examples < 2
        ):
            raise ValueError(f"NEBConfig.eval_examples must be None or an integer >= 2, got {self.eval_examples!r}")


# ---------------------------------------------------------------------------------------------
# the chain as flat coordinates [M, D]: tangents, forces, redistribution, insertion


def _check_chain(chain: Tensor, what: str = "chain") -> None:
    if not isinstance(chain, Tensor) or chain.ndim != 2 or chain.shape[0] < 2:
        shape = tuple(chain.shape) if isinstance(chain, Tensor) else type(chain).__name__
        raise ValueError(f"{what} must be a [M >= 2, D] tensor of pivot coordinates, got {shape}")


def improved_tangents(chain: Tensor, losses: Tensor) -> Tensor:
    """Unit tangents τ̂_i [M − 2, D] at the interior pivots of ``chain`` [M, D] with ``losses`` [M]
    (Henkelman & Jónsson 2000, Eq. 8–11; module docstring). A zero row where both neighbours
    coincide with the pivot."""
    _check_chain(chain)
    if losses.shape != (chain.shape[0],):
        raise ValueError(f"losses must be [{chain.shape[0]}] (one per pivot), got {tuple(losses.shape)}")
    lp, li, ln = losses[:-2], losses[1:-1], losses[2:]
    t_next = chain[2:] - chain[1:-1]
    t_prev = chain[1:-1] - chain[:-2]
    up = (ln > li) & (li > lp)
    down = (ln < li) & (li < lp)
    d1, d2 = (ln - li).abs(), (lp - li).abs()
    dmax, dmin = torch.maximum(d1, d2), torch.minimum(d1, d2)
    w_next = torch.where(ln > lp, dmax, dmin)
    w_prev = torch.where(ln > lp, dmin, dmax)
    w_next = torch.where(up, 1.0, torch.where(down, 0.0, w_next)).to(chain.dtype)
    w_prev = torch.where(up, 0.0, torch.where(down, 1.0, w_prev)).to(chain.dtype)
    tau = w_next[:, None] * t_next + w_prev[:, None] * t_prev
    norm = tau.norm(dim=1, keepdim=True)
    fallback = t_next + t_prev
    tau = torch.where(norm > 0, tau, fallback)
    norm = tau.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, tau / norm.clamp_min(torch.finfo(chain.dtype).tiny), torch.zeros_like(tau))


def nudged_forces(grads: Tensor, chain: Tensor, tangents: Tensor, spring_k: float) -> Tensor:
    """NEB forces [M − 2, D]: −(g − (g·τ̂)τ̂) + k(‖p_{i+1} − p_i‖ − ‖p_i − p_{i−1}‖)τ̂ (Eq. NEB of the
    module docstring; Draxler et al. 2018, Eq. 4–6). ``spring_k = inf`` gives the perpendicular
    term only (the springs are then replaced by ``redistribute``)."""
    _check_chain(chain)
    n = chain.shape[0] - 2
    if grads.shape != (n, chain.shape[1]) or tangents.shape != grads.shape:
        raise ValueError(
            f"grads and tangents must be [{n}, {chain.shape[1]}], got {tuple(grads.shape)} and {tuple(tangents.shape)}"
        )
    along = (grads * tangents).sum(1, keepdim=True)
    force = -(grads - along * tangents)
    if math.isfinite(spring_k):
        d = (chain[1:] - chain[:-1]).norm(dim=1)
        force = force + spring_k * (d[1:] - d[:-1])[:, None] * tangents
    return force


def _arc_knots(chain: Tensor) -> Tensor:
    """Normalised cumulative arc length [M] (float64) of the pivots; uniform for a zero-length chain."""
    d = (chain[1:] - chain[:-1]).double().norm(dim=1)
    total = d.sum()
    if float(total) == 0.0:
        return torch.linspace(0, 1, chain.shape[0], dtype=torch.float64, device=chain.device)
    k = torch.cat([d.new_zeros(1), d.cumsum(0) / total])
    k[-1] = 1.0
    return k


def interp_coeffs(knots: Tensor, t: Tensor) -> Tensor:
    """Coefficients [K, M] of the piecewise-linear chain through pivots at ``knots`` [M] (0 = k₀ ≤ … ≤
    k_{M−1} = 1), at the K values ``t``: hat functions, two non-zero entries, exact at the knots."""
    knots = torch.as_tensor(knots, dtype=torch.float64)
    t = torch.as_tensor(t, dtype=torch.float64, device=knots.device).reshape(-1)
    M = knots.shape[0]
    if knots.ndim != 1 or M < 2 or float(knots[0]) != 0.0 or float(knots[-1]) != 1.0:
        raise ValueError(f"knots must be 1-D from 0 to 1 with >= 2 entries, got {knots.tolist()}")
    if bool((knots[1:] < knots[:-1]).any()):
        raise ValueError("knots must be non-decreasing")
    if t.numel() and not bool(((t >= 0) & (t <= 1)).all()):
        raise ValueError(f"t must lie in [0, 1], got {float(t[~((t >= 0) & (t <= 1))][0])!r}")
    seg = (torch.searchsorted(knots, t, right=True) - 1).clamp(0, M - 2)
    a, b = knots[seg], knots[seg + 1]
    width = b - a
    alpha = torch.where(width > 0, (t - a) / torch.where(width > 0, width, 1.0), torch.zeros_like(t))
    out = torch.zeros(t.shape[0], M, dtype=torch.float64, device=knots.device)
    rows = torch.arange(t.shape[0], device=knots.device)
    out[rows, seg] = 1 - alpha
    out[rows, seg + 1] += alpha
    return out


def redistribute(chain: Tensor, n_points: int | None = None) -> Tensor:
    """``n_points`` (default M) points equally spaced in arc length along the piecewise-linear
    ``chain`` [M, D]; the first and last are the chain's endpoints, exactly (the ``spring_k = inf``
    step of the authors' AutoNEB: ``distribute_by_weights`` with equal weights)."""
    _check_chain(chain)
    n = chain.shape[0] if n_points is None else n_points
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n_points must be an integer >= 2, got {n_points!r}")
    knots = _arc_knots(chain)
    t = torch.linspace(0, 1, n, dtype=torch.float64, device=chain.device)
    out = interp_coeffs(knots, t).to(chain.dtype) @ chain
    out[0], out[-1] = chain[0], chain[-1]
    return out


def insertion_points(
    pivot_losses: Tensor, sub_losses: Tensor, alphas: Tensor, threshold: float, max_insert: int
) -> list[tuple[int, float, float]]:
    """AutoNEB's ``highest`` fill: ``(segment, α, score)`` of the new pivots, by segment.

    ``pivot_losses`` [M], ``sub_losses`` [M − 1, S] at the fractions ``alphas`` [S] inside each
    segment. score = (L(α) − [(1 − α) L_a + α L_b]) / (max L − min L over the pivots); in the
    ``max_insert`` segments of highest score, one pivot at the α of highest score where it exceeds
    ``threshold``.
    """
    M = pivot_losses.shape[0]
    if pivot_losses.ndim != 1 or sub_losses.shape != (M - 1, alphas.shape[0]):
        raise ValueError(
            f"sub_losses must be [{M - 1}, {alphas.shape[0]}] for {M} pivots, got {tuple(sub_losses.shape)}"
        )
    pl, sl, al = pivot_losses.double(), sub_losses.double(), alphas.double().to(sub_losses.device)
    chord = (1 - al)[None, :] * pl[:-1, None] + al[None, :] * pl[1:, None]
    scale = float(pl.max() - pl.min()) + 1e-12
    scores = (sl - chord) / scale
    best, where = scores.max(1)
    order = torch.argsort(best, descending=True)[:max_insert]
    picked = [(int(s), float(al[where[s]]), float(best[s])) for s in order if float(best[s]) > threshold]
    return sorted(picked)


def insert_pivots(chain: Tensor, where: Sequence[tuple[int, float]]) -> Tensor:
    """A new chain with a pivot (1 − α) p_s + α p_{s+1} inserted in segment s for each ``(s, α)``;
    every existing pivot, endpoints included, is kept, in order (one insertion per segment)."""
    _check_chain(chain)
    segs = [int(s) for s, _ in where]
    if len(set(segs)) != len(segs):
        raise ValueError(f"at most one insertion per segment, got segments {segs}")
    for s, a in where:
        if not 0 <= s < chain.shape[0] - 1:
            raise ValueError(f"segment {s} out of range for a chain of {chain.shape[0]} pivots")
        if not 0.0 < float(a) < 1.0:
            raise ValueError(f"insertion fraction must lie in (0, 1), got {a!r} in segment {s}")
    alpha = dict((int(s), float(a)) for s, a in where)
    rows = []
    for i in range(chain.shape[0]):
        rows.append(chain[i])
        if i in alpha:
            a = alpha[i]
            rows.append((1 - a) * chain[i] + a * chain[i + 1])
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------
# the result


@dataclass(frozen=True, eq=False)
class NEBPath:
    """A relaxed chain: ``pivots`` (stacked ``Params`` [M, ...], endpoints included), the keys that are
    coordinates (``coords``: the trainable parameters) and one record per cycle (``history``).

    The floating buffers of the interior pivots are placeholders (module docstring): recompute
    BatchNorm statistics before evaluating (``evaluate_neb`` does).
    """

    pivots: Params
    coords: tuple[str, ...]
    history: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        sizes = {v.shape[0] if v.ndim else None for v in self.pivots.values()}
        if len(sizes) != 1 or None in sizes or next(iter(sizes)) < 2:
            raise ValueError(f"pivots must be stacked Params with one leading size >= 2, got {sorted(map(str, sizes))}")
        missing = [k for k in self.coords if k not in self.pivots]
        if missing or not self.coords:
            raise ValueError(f"coords must be non-empty keys of pivots; missing {missing}")

    @property
    def n_pivots(self) -> int:
        """M, endpoints included."""
        return next(iter(self.pivots.values())).shape[0]

    @property
    def start(self) -> Params:
        return {k: v[0] for k, v in self.pivots.items()}

    @property
    def end(self) -> Params:
        return {k: v[-1] for k, v in self.pivots.items()}

    def flat(self) -> Tensor:
        """The coordinates as one [M, D] tensor (``coords`` order)."""
        M = self.n_pivots
        return torch.cat([self.pivots[k].reshape(M, -1) for k in self.coords], dim=1)

    def distances(self) -> Tensor:
        """‖p_{i+1} − p_i‖ [M − 1] over ``coords`` (float64)."""
        c = self.flat().double()
        return (c[1:] - c[:-1]).norm(dim=1)

    def knots(self, param: str = "arc") -> Tensor:
        """t of every pivot [M] (float64): normalised arc length (``"arc"``) or i / (M − 1)."""
        if param == "arc":
            return _arc_knots(self.flat())
        if param == "uniform":
            return torch.linspace(0, 1, self.n_pivots, dtype=torch.float64)
        raise ValueError(f"unknown param {param!r}; use one of {PARAMS}")

    def _combine(self, coeffs: Tensor) -> Params:
        M = self.n_pivots
        return combine_batch(coeffs, [{k: v[i] for k, v in self.pivots.items()} for i in range(M)])

    def points_at(self, t: Tensor | float | Sequence[float], param: str = "arc") -> Params:
        """The chain at the K values of ``t`` ∈ [0, 1], stacked [K, ...]; exact at every pivot."""
        return self._combine(interp_coeffs(self.knots(param), torch.as_tensor(t, dtype=torch.float64)))

    def grid(self, sub: int = 4, param: str = "arc") -> tuple[Tensor, Params]:
        """(t [G], stacked points [G, ...]): every pivot and ``sub`` equally spaced points inside every
        segment, G = (M − 1)(sub + 1) + 1; ``t`` strictly increasing from 0 to 1 unless two pivots
        coincide (``param="arc"``), ready for ``reference.barrier.evaluate_path``."""
        if isinstance(sub, bool) or not isinstance(sub, int) or sub < 0:
            raise ValueError(f"sub must be an integer >= 0, got {sub!r}")
        knots = self.knots(param)
        M = self.n_pivots
        alphas = torch.arange(sub + 1, dtype=torch.float64) / (sub + 1)
        seg = torch.arange(M - 1).repeat_interleave(sub + 1)
        al = alphas.repeat(M - 1)
        coeffs = torch.zeros(seg.shape[0] + 1, M, dtype=torch.float64)
        rows = torch.arange(seg.shape[0])
        coeffs[rows, seg] = 1 - al
        coeffs[rows, seg + 1] += al
        coeffs[-1, -1] = 1.0
        t = torch.cat([knots[seg] + al * (knots[seg + 1] - knots[seg]), torch.ones(1, dtype=torch.float64)])
        return t, self._combine(coeffs)

    def budget(self) -> dict[str, int]:
        """``steps`` (optimizer steps) and ``pivot_gradients`` (Σ steps × interior pivots) over all cycles."""
        return {"steps": sum(h["steps"] for h in self.history),
                "pivot_gradients": sum(h["steps"] * h["interior_pivots"] for h in self.history)}


# ---------------------------------------------------------------------------------------------
# relaxation


def _views(flat: Tensor, keys: Sequence[str], like: Mapping[str, Tensor]) -> Params:
    """Stacked views of ``flat`` [M, D] as ``{key: [M, *shape]}``."""
    out, i = {}, 0
    M = flat.shape[0]
    for k in keys:
        n = like[k].numel()
        out[k] = flat[:, i : i + n].reshape(M, *like[k].shape)
        i += n
    return out


def _chain_losses(
    model: nn.Module, flat: Tensor, keys: Sequence[str], like: Params, bufs: Params, extra: Mapping[str, Tensor],
    xb: Tensor, yb: Tensor,
) -> Tensor:
    """Mean cross-entropy of each of the M pivots on (xb, yb): one vmapped call; [M]."""
    params = {**_views(flat, keys, like), **{k: v.clone() for k, v in bufs.items()}}
    logits = logits_at(model, params, extra, xb)
    M, B = logits.shape[:2]
    ce = F.cross_entropy(logits.reshape(M * B, -1), yb.repeat(M), reduction="none")
    return ce.view(M, B).mean(1)


def _buffers_at(start: Params, end: Params, b_keys: Sequence[str], knots: Tensor) -> Params:
    """Placeholder buffers of the pivots: floating ones interpolated at ``knots``, integer ones from start."""
    coeffs = torch.stack([1 - knots, knots], dim=1)
    return combine_batch(coeffs, [{k: start[k] for k in b_keys}, {k: end[k] for k in b_keys}]) if b_keys else {}


def _segment_losses(
    model: nn.Module, chain: Tensor, keys: Sequence[str], like: Params, bufs_of, x: Tensor, y: Tensor,
    sub: int, bn: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Loss at the M pivots [M] and at ``sub`` points inside each segment [M − 1, sub] (+ the α [sub]);
    train mode with one batch for BatchNorm models (statistics of these inputs), eval mode otherwise."""
    M = chain.shape[0]
    alphas = torch.arange(1, sub + 1, dtype=torch.float64) / (sub + 1)
    al = alphas.to(chain.dtype).to(chain.device)
    inner = (1 - al)[None, :, None] * chain[:-1, None, :] + al[None, :, None] * chain[1:, None, :]
    inner = inner.reshape(-1, chain.shape[1])
    pts = torch.cat([chain, inner])
    knots = _arc_knots(chain)
    t_inner = (knots[:-1, None] + alphas.to(knots.device)[None, :] * (knots[1:] - knots[:-1])[:, None]).reshape(-1)
    stacked = {**_views(pts, keys, like), **bufs_of(torch.cat([knots, t_inner]))}
    with override_momentum(model, 0.1):
        m = evaluate_points(model, stacked, x, y, train_mode=bn, batch_size=x.shape[0] if bn else 4096)
    return m.loss[:M], m.loss[M:].view(M - 1, sub), alphas


def neb(
    model: nn.Module,
    start: Mapping[str, Tensor],
    end: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    cfg: NEBConfig,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> NEBPath:
    """Relax an AutoNEB chain from ``start`` to ``end`` on the data (x, y); return the ``NEBPath`` (CPU).

    Algorithm in the module docstring. Every minibatch comes from ``torch.randperm(n, generator=g)``
    per epoch, ``g`` a CPU generator seeded with ``seed`` (the same draws on every device). The
    insertion check uses the first ``cfg.eval_examples`` examples of (x, y). ``start`` and ``end``
    are not modified and appear exactly as the first and last pivot. Raises ``ValueError`` for
    mismatched points, bad data, coordinates of mixed dtypes, or a loss that becomes NaN / infinite.
    """
    if not isinstance(cfg, NEBConfig):
        raise TypeError(f"cfg must be a NEBConfig, got {type(cfg).__name__}")
    tc = cfg.train
    check_compatible(start, end)
    prep = prepare(model, start, x, y, tc, device)
    p_keys, b_keys, dev, extra, x, y = prep.p_keys, prep.b_keys, prep.device, prep.constants, prep.x, prep.y
    split_trainable(model, end, "end")
    if not p_keys:
        raise ValueError("the model has no trainable parameters: nothing to relax")
    dtypes = {start[k].dtype for k in p_keys}
    if len(dtypes) != 1:
        raise ValueError(
            f"all trainable parameters must share one dtype to form a chain, got {sorted(map(str, dtypes))}"
        )
    check_finite(start, "start")
    check_finite(end, "end")
    like = {k: start[k] for k in p_keys}
    s_flat = torch.cat([start[k].detach().to(dev).reshape(-1) for k in p_keys])
    e_flat = torch.cat([end[k].detach().to(dev).reshape(-1) for k in p_keys])
    start_d = {k: v.detach().to(dev) for k, v in start.items()}
    end_d = {k: v.detach().to(dev) for k, v in end.items()}

    def bufs_of(knots: Tensor) -> Params:
        return _buffers_at(start_d, end_d, b_keys, knots.to(dev))

    n = x.shape[0]
    n_eval = n if cfg.eval_examples is None else min(n, cfg.eval_examples)
    x_eval, y_eval = x[:n_eval], y[:n_eval]
    bn = has_batchnorm(model)
    steps = tc.steps_per_epoch(n)
    g = torch.Generator().manual_seed(int(seed))

    a = torch.linspace(0, 1, cfg.init_pivots + 2, dtype=s_flat.dtype, device=dev)
    chain = (1 - a)[:, None] * s_flat[None] + a[:, None] * e_flat[None]
    chain[0], chain[-1] = s_flat, e_flat
    history: list[dict[str, Any]] = []
    with module_mode(model, True), override_momentum(model, 0.1), seeded_rng(int(seed), dev):
        for cycle in range(cfg.cycles):
            inserted: list[tuple[int, float, float]] = []
            if cycle > 0 and cfg.insert_per_cycle > 0 and chain.shape[0] - 2 < cfg.max_pivots:
                with torch.no_grad(), module_mode(model, False):
                    pl, sl, al = _segment_losses(model, chain, p_keys, like, bufs_of, x_eval, y_eval,
                                                 cfg.sub_points, bn)
                room = cfg.max_pivots - (chain.shape[0] - 2)
                inserted = insertion_points(pl, sl, al, cfg.insert_threshold, min(cfg.insert_per_cycle, room))
                if inserted:
                    chain = insert_pivots(chain, [(s, a_) for s, a_, _ in inserted])
            M = chain.shape[0]
            leaf = chain[1:-1].clone().requires_grad_(True)
            bufs = bufs_of(_arc_knots(chain.detach()))
            now: dict[str, Tensor] = {}  # the chain and its losses at the current step

            def objective(batch: Batch, leaf: Tensor = leaf, bufs: Params = bufs, now: dict = now
                          ) -> tuple[Tensor, Tensor]:
                full = torch.cat([s_flat[None], leaf, e_flat[None]])
                losses = _chain_losses(model, full, p_keys, like, bufs, extra, batch.x, batch.y)
                now["chain"], now["losses"] = full.detach(), losses.detach()
                return losses[1:-1].sum(), losses[1:-1].detach().mean().float()

            def force(grads: list[Tensor], now: dict = now) -> list[Tensor]:
                tau = improved_tangents(now["chain"], now["losses"])
                return [-nudged_forces(grads[0], now["chain"], tau, cfg.spring_k)]

            def relax(batch: Batch, leaf: Tensor = leaf) -> None:
                if not math.isfinite(cfg.spring_k):  # the string method: pivots back to equal spacing
                    with torch.no_grad():
                        leaf.copy_(redistribute(torch.cat([s_flat[None], leaf, e_flat[None]]))[1:-1])

            res = fit([leaf], objective, x, y, tc, g, grad_transform=force, after_step=relax,
                      what="NEB relaxation", at=lambda e, c=cycle: f"cycle {c + 1}, epoch {e + 1}",
                      context=f"(seed {seed}) with {tc.optimizer} lr={tc.lr:g}", hint="try a lower learning rate",
                      progress=progress, desc=f"AutoNEB cycle {cycle + 1}/{cfg.cycles} ({M - 2} pivots)")
            chain = torch.cat([s_flat[None], leaf.detach(), e_flat[None]])
            last_epoch = res.losses[-steps:, 0]
            history.append({"cycle": cycle, "interior_pivots": M - 2, "steps": res.steps,
                            "inserted": [{"segment": s_, "alpha": a_, "score": sc} for s_, a_, sc in inserted],
                            "mean_pivot_loss_last_epoch": float(last_epoch.mean())})
    knots = _arc_knots(chain)
    pivots = {**_views(chain, p_keys, like), **bufs_of(knots)}
    out = {k: pivots[k].detach().cpu().clone() for k in start}
    check_finite(out, what=f"relaxed pivots (seed {seed}); try a lower learning rate")
    # the endpoints are the given points, bit for bit (buffers included)
    for k in start:
        out[k][0] = start[k].detach().cpu()
        out[k][-1] = end[k].detach().cpu()
    return NEBPath(out, tuple(p_keys), tuple(history))


# ---------------------------------------------------------------------------------------------
# evaluation


def evaluate_neb(
    model: nn.Module,
    path: NEBPath,
    splits: Mapping[str, tuple[Tensor, Tensor]],
    sub: int = 4,
    *,
    param: str = "arc",
    recompute_bn: bool = True,
    bn_x: Tensor | None = None,
    bn_batch_size: int | None = None,
    bn_method: str = "pooled",
    **eval_kwargs: Any,
) -> PathEval:
    """Loss and error along ``path.grid(sub, param)`` on every split (a ``PathEval``).

    With ``recompute_bn`` and a BatchNorm model, every point's statistics are first recomputed on
    ``bn_x`` (default: the ``"train"`` split's inputs) by ``recompute_bn_stats_batched``, as in
    ``reference.curves.evaluate_curve``; then ``evaluate_path`` in eval mode.
    """
    if not isinstance(path, NEBPath):
        raise TypeError(f"path must be a NEBPath, got {type(path).__name__}")
    if not splits:
        raise ValueError("splits is empty: give at least one (x, y) split to evaluate on")
    t, stacked = path.grid(sub, param)
    return evaluate_path(model, t, stacked, splits, recompute_bn=recompute_bn, bn_x=bn_x, bn_batch_size=bn_batch_size,
                         bn_method=bn_method, **eval_kwargs)
