"""Measuring a simplex: its loss over the whole simplex, and the simplex barrier.

**Simplex barrier** (``simplex_barrier``). With vertex losses ℓᵢ = L(vᵢ),

    B = max_{λ ∈ Δⁿ⁻¹}  L(Σᵢ λᵢ vᵢ) − Σᵢ λᵢ ℓᵢ                                         (SB)

(the convex-combination generalisation of the "max chord" path barrier; B ≥ 0 since the vertices
are candidates). The max is estimated on an exact barycentric grid (``method="grid"``, all λ with
entries in {0, 1/r, …, 1}; n ≤ 4), on Dirichlet(1) samples (``"dirichlet"``, any n), or by an
adversarial search (``"adversarial"``): gradient ascent on (SB) over λ = softmax(z) from the best
grid/sample points and the centroid, several starts at once (one vmapped forward per step on a
fixed data subset), the final λ re-evaluated exactly — so it is never below its starting points.
Reported beside B: the mean loss over the simplex (Dirichlet(1) samples: the uniform measure), the
centroid loss L(Σ vᵢ / n), and every edge's max-chord barrier. All points go through the batched
evaluator (``evaluate_points``) in one stacked call. ``correction="bn_reset"`` recomputes BatchNorm
statistics at every point (required for BatchNorm nets; a no-op otherwise); ``"repair"`` applies
REPAIR (Jordan et al. 2023) at every point (``reference.merge.repair``, one point at a time).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from .bn import has_batchnorm, recompute_bn_stats_batched
from .evaluate import evaluate_points
from .fit import module_mode
from .merge import repair
from .params import Params, check_compatible, check_finite, combine_batch, is_float, stack
from .simplex import check_barycentric, sample_dirichlet
from .validate import generator as as_generator
from .validate import integer

__all__ = [
    "BARRIER_METHODS",
    "CORRECTIONS",
    "SimplexBarrier",
    "SimplexEval",
    "barycentric_grid",
    "check_vertices",
    "dirichlet",
    "evaluate_simplex",
    "simplex_barrier",
    "simplex_points",
]

BARRIER_METHODS = ("grid", "dirichlet", "adversarial")
CORRECTIONS = (None, "bn_reset", "repair")
MAX_GRID_VERTICES = 4


# ---------------------------------------------------------------------------------------------
# helpers


def check_vertices(vertices: Sequence[Mapping[str, Tensor]], least: int = 2) -> list[Mapping[str, Tensor]]:
    vs = list(vertices)
    if len(vs) < least:
        raise ValueError(f"a simplex needs at least {least} vertices, got {len(vs)}")
    check_compatible(*vs)
    for i, v in enumerate(vs):
        check_finite(v, f"vertex {i}")
    return vs


def dirichlet(T: int, n: int, alpha: float, g: torch.Generator) -> Tensor:
    """T draws of Dir(α, …, α) [T, n] float64 from the generator ``g`` (deterministic for a seed)."""
    if alpha == 1.0:
        return sample_dirichlet(T, n, g)
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=g)))
    return torch.from_numpy(rng.dirichlet([alpha] * n, size=T))


def barycentric_grid(n: int, resolution: int) -> Tensor:
    """Every λ ∈ Δⁿ⁻¹ whose entries are multiples of 1/``resolution``: ``[C(r+n−1, n−1), n]`` float64,
    the vertices first (rows eᵢ), then lexicographic. Symmetric under permuting coordinates."""
    n = integer("n", n, 1)
    r = integer("resolution", resolution, 1)
    rows = [c for c in itertools.product(range(r + 1), repeat=n - 1) if sum(c) <= r]
    grid = torch.tensor([[*c, r - sum(c)] for c in rows], dtype=torch.float64) / r
    is_vertex = (grid == 1).any(1)
    return torch.cat([torch.eye(n, dtype=torch.float64), grid[~is_vertex]])


# ---------------------------------------------------------------------------------------------
# evaluation of a simplex


@dataclass(frozen=True)
class SimplexEval:
    """Loss and error at barycentric points ``lams`` [P, n] of a simplex and at its n vertices."""

    lams: Tensor
    loss: Tensor
    error: Tensor
    vertex_loss: Tensor
    vertex_error: Tensor

    @property
    def gap(self) -> Tensor:
        """L(Σ λᵢ vᵢ) − Σ λᵢ ℓᵢ at every point (Eq. SB before the max), float64."""
        return self.loss.double() - self.lams @ self.vertex_loss.double()

    def barrier(self) -> tuple[float, Tensor]:
        """The largest gap (≥ 0 whenever the vertices are among the points) and its λ."""
        i = int(torch.argmax(self.gap))
        return float(self.gap[i]), self.lams[i]


def simplex_points(vertices: Sequence[Mapping[str, Tensor]], lams: Tensor) -> Params:
    """Σᵢ λᵢ vᵢ for every row of ``lams``, stacked; integer buffers from vertex 0."""
    return combine_batch(lams.to(torch.float64), vertices)


def _correct(
    model: nn.Module,
    vertices: Sequence[Mapping[str, Tensor]],
    lams: Tensor,
    pts: Params,
    correction: str | None,
    x_stats: Tensor | None,
) -> Params:
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}; known: {CORRECTIONS}")
    if correction is None:
        if has_batchnorm(model):
            raise ValueError(
                "a BatchNorm model's interpolated points carry interpolated running statistics, not their "
                "own: pass correction='bn_reset' (or 'repair') with x_stats, the training inputs"
            )
        return pts
    if x_stats is None:
        raise ValueError(f"correction={correction!r} needs x_stats, the inputs to measure statistics on")
    if correction == "bn_reset":
        return recompute_bn_stats_batched(model, pts, x_stats) if has_batchnorm(model) else pts
    fixed = [repair(model, vertices, [float(c) for c in row], x_stats) for row in lams]
    return stack(fixed)


def evaluate_simplex(
    model: nn.Module,
    vertices: Sequence[Mapping[str, Tensor]],
    x: Tensor,
    y: Tensor,
    lams: Tensor | Sequence[Sequence[float]],
    *,
    correction: str | None = None,
    x_stats: Tensor | None = None,
    **eval_kwargs,
) -> SimplexEval:
    """Loss and error of the points Σ λᵢ vᵢ (rows of ``lams``) and of the vertices, in one stacked
    vmapped evaluation (``evaluate_points``; ``eval_kwargs``: ``chunk_size``, ``batch_size``,
    ``device``). ``correction``: module docstring; the vertices are corrected like the points (a
    BatchNorm reset changes a vertex's loss too; REPAIR at a vertex is the identity for nets without
    BatchNorm)."""
    vs = check_vertices(vertices, least=1)
    n = len(vs)
    lams = check_barycentric(lams, n)
    # the vertices go through the same correction as the points (a BN reset changes a vertex's loss),
    # so the chord of Eq. (SB) is measured like the points and the gap is 0 at every vertex
    both_l = torch.cat([torch.eye(n, dtype=torch.float64), lams])
    both = _correct(model, vs, both_l, simplex_points(vs, both_l), correction, x_stats)
    m = evaluate_points(model, both, x, y, **eval_kwargs)
    return SimplexEval(lams, m.loss[n:], m.error[n:], m.loss[:n], m.error[:n])


@dataclass(frozen=True)
class SimplexBarrier:
    """``value``: Eq. (SB) estimated by ``method`` over ``n_points`` points, reached at ``lam``.

    ``mean_loss``: mean loss at Dirichlet(1) samples (the uniform measure on the simplex);
    ``centroid_loss``: L(Σ vᵢ / n); ``vertex_loss``: ℓᵢ; ``edge_barriers[(i, j)]``: max-chord barrier
    of the edge vᵢ–vⱼ on an ``edge_grid``-point grid; ``max_edge``: the largest of them."""

    value: float
    lam: tuple[float, ...]
    method: str
    n_points: int
    mean_loss: float
    centroid_loss: float
    vertex_loss: tuple[float, ...]
    edge_barriers: dict[tuple[int, int], float] = field(default_factory=dict)

    @property
    def max_edge(self) -> float:
        return max(self.edge_barriers.values(), default=0.0)

    @property
    def mean_vertex_loss(self) -> float:
        return math.fsum(self.vertex_loss) / len(self.vertex_loss)

    def as_dict(self) -> dict:
        return {
            "barrier": self.value, "lam": list(self.lam), "method": self.method, "n_points": self.n_points,
            "mean_loss": self.mean_loss, "centroid_loss": self.centroid_loss, "vertex_loss": list(self.vertex_loss),
            "max_edge_barrier": self.max_edge,
            "edge_barriers": {f"{i}-{j}": v for (i, j), v in self.edge_barriers.items()},
        }


def _adversarial(
    model: nn.Module,
    vertices: Sequence[Mapping[str, Tensor]],
    vertex_loss: Tensor,
    starts: Tensor,
    x: Tensor,
    y: Tensor,
    steps: int,
    lr: float,
    train_mode: bool,
) -> Tensor:
    """Gradient ascent on Eq. (SB) over λ = softmax(z) from every row of ``starts`` at once; returns the
    final λ [S, n] (float64). One vmapped forward of the S points per step on (x, y)."""
    dev = x.device
    keys = [k for k in vertices[0] if is_float(vertices[0][k])]
    dt = vertices[0][keys[0]].dtype
    V = {k: torch.stack([v[k].to(dev) for v in vertices]) for k in keys}  # [n, ...]
    ints = {k: vertices[0][k].to(dev) for k in vertices[0] if k not in V}
    ell = vertex_loss.to(dev, dt)
    z = starts.clamp_min(1e-6).log().to(dev, dt).clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)

    def f(lam: Tensor) -> Tensor:
        p = {k: torch.tensordot(lam, v, dims=1) for k, v in V.items()}
        return F.cross_entropy(functional_call(model, {**p, **ints}, (x,)), y)

    with module_mode(model, train_mode):
        for _ in range(steps):
            lam = torch.softmax(z, dim=1)
            losses = vmap(f)(lam)
            obj = (losses - lam @ ell).sum()
            opt.zero_grad()
            (-obj).backward()
            opt.step()
    return torch.softmax(z.detach(), dim=1).double().cpu()


def simplex_barrier(
    model: nn.Module,
    vertices: Sequence[Mapping[str, Tensor]],
    x: Tensor,
    y: Tensor,
    *,
    method: str = "grid",
    resolution: int = 10,
    samples: int = 256,
    mean_samples: int = 256,
    edge_grid: int = 11,
    adversarial_starts: int = 8,
    adversarial_steps: int = 40,
    adversarial_lr: float = 0.1,
    adversarial_subset: int = 2048,
    seed: int = 0,
    correction: str | None = None,
    x_stats: Tensor | None = None,
    **eval_kwargs,
) -> SimplexBarrier:
    """Eq. (SB) of the simplex with these vertices (module docstring), with its mean, centroid and
    edge losses, all points in one stacked evaluation.

    ``method="grid"``: ``barycentric_grid(n, resolution)`` (n ≤ 4); ``"dirichlet"``: ``samples``
    Dirichlet(1) points plus the vertices and edge midpoints; ``"adversarial"``: the grid (n ≤ 4) or
    the samples, then ``adversarial_starts`` ascents (the best points so far and the centroid) of
    ``adversarial_steps`` Adam steps (``adversarial_lr``) on a fixed random subset of
    ``adversarial_subset`` examples, re-evaluated on all of (x, y). Randomness from ``seed``.
    """
    if method not in BARRIER_METHODS:
        raise ValueError(f"unknown barrier method {method!r}; known: {BARRIER_METHODS}")
    vs = check_vertices(vertices)
    n = len(vs)
    g = as_generator(seed, default_seed=0)
    if method == "grid" and n > MAX_GRID_VERTICES:
        raise ValueError(f"an exact grid is for n <= {MAX_GRID_VERTICES} vertices (got {n}); use 'dirichlet' "
                         f"or 'adversarial'")
    if method == "grid" or (method == "adversarial" and n <= MAX_GRID_VERTICES):
        search = barycentric_grid(n, resolution)
    else:
        eye = torch.eye(n, dtype=torch.float64)
        mids = torch.stack([(eye[i] + eye[j]) / 2 for i, j in itertools.combinations(range(n), 2)])
        search = torch.cat([eye, mids, sample_dirichlet(integer("samples", samples, 1), n, g)])
    mean_l = sample_dirichlet(integer("mean_samples", mean_samples, 1), n, g)
    centroid = torch.full((1, n), 1.0 / n, dtype=torch.float64)
    tt = torch.linspace(0, 1, integer("edge_grid", edge_grid, 3), dtype=torch.float64)[1:-1]
    pairs = list(itertools.combinations(range(n), 2))
    edges = []
    for i, j in pairs:
        e = torch.zeros(len(tt), n, dtype=torch.float64)
        e[:, i], e[:, j] = 1 - tt, tt
        edges.append(e)
    parts = [search, mean_l, centroid, *edges]
    ev = evaluate_simplex(model, vs, x, y, torch.cat(parts), correction=correction, x_stats=x_stats, **eval_kwargs)
    sizes = [len(p) for p in parts]
    gaps = ev.gap.split(sizes)
    losses = ev.loss.double().split(sizes)
    value, lam = float(gaps[0].max()), search[int(gaps[0].argmax())]
    n_points = len(search)
    if method == "adversarial":
        cand = torch.cat([search, mean_l])
        cgap = torch.cat([gaps[0], gaps[1]])
        top = cand[torch.argsort(cgap, descending=True)[: max(adversarial_starts - 1, 0)]]
        starts = torch.cat([top, centroid])
        dev = next(iter(vs[0].values())).device if eval_kwargs.get("device") is None else eval_kwargs["device"]
        sub = torch.randperm(x.shape[0], generator=g)[: integer("adversarial_subset", adversarial_subset, 1)]
        if correction == "repair" or (correction == "bn_reset" and has_batchnorm(model)):
            train_mode = has_batchnorm(model)  # ascent with batch statistics; exact re-evaluation below
        else:
            train_mode = False
        lam_adv = _adversarial(model, vs, ev.vertex_loss, starts, x[sub].to(dev), y[sub].to(dev),
                               integer("adversarial_steps", adversarial_steps, 1), adversarial_lr, train_mode)
        ev2 = evaluate_simplex(model, vs, x, y, lam_adv, correction=correction, x_stats=x_stats, **eval_kwargs)
        gap2 = ev2.gap
        n_points += len(lam_adv) * adversarial_steps
        if float(gap2.max()) > value:
            value, lam = float(gap2.max()), lam_adv[int(gap2.argmax())]
    edge_b = {}
    for (i, j), le in zip(pairs, losses[3:], strict=True):
        li, lj = float(ev.vertex_loss[i]), float(ev.vertex_loss[j])
        chord = (1 - tt) * li + tt * lj
        edge_b[i, j] = max(0.0, float((le - chord).max()))
    return SimplexBarrier(
        value=value, lam=tuple(float(v) for v in lam), method=method, n_points=n_points,
        mean_loss=float(losses[1].mean()), centroid_loss=float(losses[2][0]),
        vertex_loss=tuple(float(v) for v in ev.vertex_loss), edge_barriers=edge_b,
    )


