"""Permuted simplexes: low-loss simplexes θ₁, P₂(θ₂), …, Pₙ(θₙ) of independently trained modes.

The research note "Extensive Linear Connectivity and Application in Model Ensemble" (``sources/000``)
asks, for modes θ₁ … θₙ, for permutations P₂ … Pₙ such that *every* point Σᵢ λᵢ Pᵢ(θᵢ) of the
simplex (λ on the probability simplex Δⁿ⁻¹, P₁ = id) has low loss. Its two properties:

- **Property 1**: for any permutation P, Σ kᵢ θᵢ and Σ kᵢ P(θᵢ) compute the same function — so a
  simplex is only defined up to a *common* relabelling, and its loss landscape does not depend on it;
- **Property 2**: Git Re-Basin's pairwise alignments P₂ = WM(θ₁, θ₂), P₃ = WM(θ₁, θ₃) give low-loss
  edges θ₁–P₂(θ₂) and θ₁–P₃(θ₃), but nothing about the edge P₂(θ₂)–P₃(θ₃), let alone the interior.

This module measures a simplex and builds one four ways behind one interface (``align_simplex``):

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

**Algorithms** (``align_simplex(method=...)``; every one returns a ``PermutedSimplex`` with P₁ = id):

- ``"identity"``: no alignment (the naive simplex);
- ``"star"``: Pᵢ = weight_matching(θ₁, θᵢ) for each i (Git Re-Basin, Algorithm 1) — Property 2's
  construction;
- ``"mergemany"``: MergeMany (Ainsworth et al. 2023, Algorithm 3) maps every θᵢ to a common
  labelling by Uᵢ; re-expressed in θ₁'s labels, Pᵢ = U₁⁻¹ ∘ Uᵢ (a common relabelling: Property 1);
- ``"universe"``: weight matching of every pair, then permutation synchronisation (Pachauri et al.
  2013) to one cycle-consistent universe, Pᵢ = U₁⁻¹ ∘ Uᵢ;
- ``"interior"``: **direct optimisation of the interior loss** (``interior_alignment``):
  the expected loss E_{λ∼Dir(α)} L(Σᵢ λᵢ Pᵢ(θᵢ)) minimised over P₂ … Pₙ by a straight-through
  estimator — Git Re-Basin's Algorithm 2 generalised from the midpoint of two models to the whole
  simplex. A free point θ̃ᵢ per vertex (i ≥ 2) starts at the initial aligned vertex Pᵢ⁰(θᵢ)
  (default P⁰: ``"universe"``); each step projects θ̃ᵢ onto θᵢ's orbit, Pᵢ = WM(θ̃ᵢ, θᵢ) (warm
  started), draws T barycentric points λ⁽ᵗ⁾ ∼ Dir(α) and takes an optimizer step on

      (1/T) Σₜ CE(f(λ₁⁽ᵗ⁾ θ₁ + Σ_{i≥2} λᵢ⁽ᵗ⁾ (Pᵢ(θᵢ) + θ̃ᵢ − sg(θ̃ᵢ)), x_b), y_b),

  whose value is the loss at the permuted simplex's points and whose gradient reaches θ̃ᵢ as
  λᵢ ∇L (straight-through, Bengio et al. 2013). Candidates (the initial permutations and the
  projections every ``eval_every`` steps) are scored by the mean loss on all of (x, y) at a fixed
  set of ``eval_lams`` Dirichlet points; the best is returned, so the result is never worse than
  its initialisation on that score *by construction* (``best_step == 0`` says nothing better was
  found). BatchNorm nets: ``train_mode=True`` takes the steps with batch statistics; the score can
  be taken with a BN reset or REPAIR at every evaluation point (``correction``).

**Gluing** (``glue``): low-loss simplexes built from overlapping sets of modes, each in its own
labelling, are glued into a simplicial complex by identifying vertices of one permutation
equivalence class θ̄ = {P(θ)} (the note's Figure 2). Two vertices are identified iff one is a
permutation of the other (``permutation_equivalent``: the canonical forms of
``reference.merge.canonical_permutation`` give the candidate map, weight matching is the fallback
for ties, and P(b) = a is then checked entry-wise). ``PermutedComplex`` samples uniformly from the
union of its simplexes (a simplex with probability ∝ its volume, or uniformly per simplex, then
λ ∼ Dir(1) on it) and checks that identified vertices compute the same function.
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
from tqdm import tqdm

from .bn import has_batchnorm, recompute_bn_stats_batched
from .evaluate import evaluate_points, predict_logits
from .matching import weight_matching
from .merge import canonical_permutation, check_models, merge_many, pairwise_from_universe, repair, universe_alignment
from .params import Params, check_compatible, check_finite, combine_batch, is_float, stack
from .permutation import Permutation, PermutationSpec
from .simplex import sample_dirichlet, simplex_volume
from .train import module_mode

__all__ = [
    "ALIGN_METHODS",
    "BARRIER_METHODS",
    "InteriorResult",
    "PermutedComplex",
    "PermutedSimplex",
    "SimplexBarrier",
    "SimplexEval",
    "align_simplex",
    "barycentric_grid",
    "evaluate_simplex",
    "glue",
    "interior_alignment",
    "permutation_equivalent",
    "permuted_vertices",
    "simplex_barrier",
]

BARRIER_METHODS = ("grid", "dirichlet", "adversarial")
ALIGN_METHODS = ("identity", "star", "mergemany", "universe", "interior")
CORRECTIONS = (None, "bn_reset", "repair")
MAX_GRID_VERTICES = 4


# ---------------------------------------------------------------------------------------------
# helpers


def _int(name: str, v: object, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return v


def _vertices(vertices: Sequence[Mapping[str, Tensor]], least: int = 2) -> list[Mapping[str, Tensor]]:
    vs = list(vertices)
    if len(vs) < least:
        raise ValueError(f"a simplex needs at least {least} vertices, got {len(vs)}")
    check_compatible(*vs)
    for i, v in enumerate(vs):
        check_finite(v, f"vertex {i}")
    return vs


def _lams(lams: Tensor | Sequence[Sequence[float]], n: int) -> Tensor:
    lams = torch.as_tensor(lams, dtype=torch.float64)
    if lams.ndim != 2 or lams.shape[1] != n:
        raise ValueError(f"barycentric coordinates must be [P, {n}], got {tuple(lams.shape)}")
    if bool((lams < -1e-12).any()) or not torch.allclose(lams.sum(1), torch.ones(len(lams), dtype=lams.dtype)):
        raise ValueError("barycentric coordinates must be non-negative and sum to 1 in every row")
    return lams


def _dirichlet(T: int, n: int, alpha: float, g: torch.Generator) -> Tensor:
    """T draws of Dir(α, …, α) [T, n] float64 from the generator ``g`` (deterministic for a seed)."""
    if alpha == 1.0:
        return sample_dirichlet(T, n, g)
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=g)))
    return torch.from_numpy(rng.dirichlet([alpha] * n, size=T))


def barycentric_grid(n: int, resolution: int) -> Tensor:
    """Every λ ∈ Δⁿ⁻¹ whose entries are multiples of 1/``resolution``: ``[C(r+n−1, n−1), n]`` float64,
    the vertices first (rows eᵢ), then lexicographic. Symmetric under permuting coordinates."""
    n = _int("n", n, 1)
    r = _int("resolution", resolution, 1)
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


def _points(vertices: Sequence[Mapping[str, Tensor]], lams: Tensor) -> Params:
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
    vs = _vertices(vertices, least=1)
    n = len(vs)
    lams = _lams(lams, n)
    # the vertices go through the same correction as the points (a BN reset changes a vertex's loss),
    # so the chord of Eq. (SB) is measured like the points and the gap is 0 at every vertex
    both_l = torch.cat([torch.eye(n, dtype=torch.float64), lams])
    both = _correct(model, vs, both_l, _points(vs, both_l), correction, x_stats)
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


def _generator(seed: int | torch.Generator | None) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(0 if seed is None else int(seed))


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
    vs = _vertices(vertices)
    n = len(vs)
    g = _generator(seed)
    if method == "grid" and n > MAX_GRID_VERTICES:
        raise ValueError(f"an exact grid is for n <= {MAX_GRID_VERTICES} vertices (got {n}); use 'dirichlet' "
                         f"or 'adversarial'")
    if method == "grid" or (method == "adversarial" and n <= MAX_GRID_VERTICES):
        search = barycentric_grid(n, resolution)
    else:
        eye = torch.eye(n, dtype=torch.float64)
        mids = torch.stack([(eye[i] + eye[j]) / 2 for i, j in itertools.combinations(range(n), 2)])
        search = torch.cat([eye, mids, sample_dirichlet(_int("samples", samples, 1), n, g)])
    mean_l = sample_dirichlet(_int("mean_samples", mean_samples, 1), n, g)
    centroid = torch.full((1, n), 1.0 / n, dtype=torch.float64)
    tt = torch.linspace(0, 1, _int("edge_grid", edge_grid, 3), dtype=torch.float64)[1:-1]
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
        sub = torch.randperm(x.shape[0], generator=g)[: _int("adversarial_subset", adversarial_subset, 1)]
        if correction == "repair" or (correction == "bn_reset" and has_batchnorm(model)):
            train_mode = has_batchnorm(model)  # ascent with batch statistics; exact re-evaluation below
        else:
            train_mode = False
        lam_adv = _adversarial(model, vs, ev.vertex_loss, starts, x[sub].to(dev), y[sub].to(dev),
                               _int("adversarial_steps", adversarial_steps, 1), adversarial_lr, train_mode)
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


# ---------------------------------------------------------------------------------------------
# algorithms


@dataclass(frozen=True)
class PermutedSimplex:
    """``vertices[i] = perms[i](θᵢ)``, all in θ₁'s labelling (``perms[0]`` the identity)."""

    perms: tuple[Permutation, ...]
    vertices: tuple[Params, ...]
    method: str
    info: dict = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return len(self.vertices)

    def points(self, lams: Tensor | Sequence[Sequence[float]]) -> Params:
        """The points Σ λᵢ vᵢ for the rows of ``lams``, stacked."""
        return _points(self.vertices, _lams(lams, self.n))


def permuted_vertices(
    spec: PermutationSpec, models: Sequence[Mapping[str, Tensor]], perms: Sequence[Permutation]
) -> list[Params]:
    """``[perms[i](models[i])]``; ``ValueError`` unless there is one permutation per model."""
    if len(perms) != len(models):
        raise ValueError(f"{len(perms)} permutations for {len(models)} models")
    return [p.apply(spec, m) for p, m in zip(perms, models, strict=True)]


def _anchor(us: Sequence[Permutation]) -> list[Permutation]:
    """Universe maps Uᵢ re-expressed in model 0's labels: Pᵢ = U₀⁻¹ ∘ Uᵢ (P₀ = id)."""
    return [pairwise_from_universe(list(us), 0, i) for i in range(len(us))]


@dataclass(frozen=True)
class InteriorResult:
    """``interior_alignment``'s output (module docstring).

    ``history[c]``: the score (mean loss on all of (x, y) at the fixed evaluation λ) of candidate c,
    measured after ``eval_steps[c]`` steps (c = 0: the initial permutations); ``best_step`` the step of
    the returned candidate; ``step_losses[s]``: the minibatch loss of step s before its update;
    ``changed[c]``: units moved relative to the initial permutations, summed over groups and vertices.
    """

    perms: tuple[Permutation, ...]
    score: float
    history: tuple[float, ...]
    eval_steps: tuple[int, ...]
    best_step: int
    step_losses: tuple[float, ...]
    changed: tuple[int, ...]


def _moved(a: Sequence[Permutation], b: Sequence[Permutation]) -> int:
    return sum(int((p[g] != q[g]).sum()) for p, q in zip(a, b, strict=True) for g in p.keys())


def interior_alignment(
    model: nn.Module,
    spec: PermutationSpec,
    models: Sequence[Mapping[str, Tensor]],
    x: Tensor,
    y: Tensor,
    *,
    init: Sequence[Permutation] | None = None,
    steps: int = 300,
    lr: float = 1e-3,
    batch_size: int = 128,
    lams_per_step: int = 4,
    concentration: float = 1.0,
    rematch_every: int = 1,
    eval_every: int | None = None,
    eval_lams: int = 32,
    optimizer: str = "adam",
    train_mode: bool = False,
    correction: str | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> InteriorResult:
    """Permutations P₂ … Pₙ minimising the expected loss over the simplex (module docstring, "interior").

    ``init``: one permutation per model (``init[0]`` must be the identity; default: ``"universe"``
    alignment). Data order: ``torch.randperm`` per epoch and λ ∼ Dir(``concentration``) from
    ``torch.Generator().manual_seed(seed)``; projection at step s uses weight-matching order seed
    ``seed + 1 + s``. ``optimizer``: ``"adam"`` or ``"sgd"`` (momentum 0.9) on the free points, constant
    ``lr``. ``eval_every`` defaults to one epoch of ``x``. ``train_mode=True`` evaluates the points with
    batch statistics (BatchNorm nets, in place of a BN reset at every sampled point). ``correction``
    (``"bn_reset"`` or ``"repair"``) scores the candidates with that correction applied at every
    evaluation point (``evaluate_simplex``): the search then selects permutations for the corrected
    simplex; the steps themselves are unchanged.
    """
    ms = check_models(spec, models, 2)
    n = len(ms)
    steps = _int("steps", steps, 1)
    batch_size = _int("batch_size", batch_size, 1)
    T = _int("lams_per_step", lams_per_step, 1)
    rematch_every = _int("rematch_every", rematch_every, 1)
    eval_lams = _int("eval_lams", eval_lams, 1)
    if not (isinstance(concentration, int | float) and math.isfinite(concentration) and concentration > 0):
        raise ValueError(f"concentration must be a positive number, got {concentration!r}")
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}; known: {CORRECTIONS}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"x and y must hold the same positive number of examples, got {x.shape[0]} and {y.shape[0]}")
    if init is None:
        init = align_simplex(spec, ms, "universe", seed=seed).perms
    init = [Permutation(p.to_dict(), spec) for p in init]
    if len(init) != n:
        raise ValueError(f"init holds {len(init)} permutations for {n} models")
    if not init[0].is_identity():
        raise ValueError("init[0] must be the identity: the first model is the simplex's fixed vertex")
    dev = torch.device(device) if device is not None else next(iter(ms[0].values())).device
    ms = [{k: v.detach().to(dev) for k, v in m.items()} for m in ms]
    x, y = x.to(dev), y.to(dev, torch.long)
    trainable = {name for name, _ in model.named_parameters()}
    p_keys = [k for k in ms[0] if k in trainable and is_float(ms[0][k])]
    if not p_keys:
        raise ValueError("the model has no trainable parameters: nothing for the straight-through estimator to move")
    f_keys = [k for k in ms[0] if is_float(ms[0][k])]
    ints = {k: ms[0][k] for k in ms[0] if k not in f_keys}
    extra = {nm: t.detach().to(dev) for nm, t in model.named_buffers() if nm not in ms[0]}
    model = model.to(dev)

    perms = list(init)
    verts = permuted_vertices(spec, ms, perms)
    leaves = [{k: verts[i][k].clone().requires_grad_(True) for k in p_keys} for i in range(1, n)]
    params = [t for lv in leaves for t in lv.values()]
    opt = (torch.optim.Adam(params, lr=lr) if optimizer == "adam"
           else torch.optim.SGD(params, lr=lr, momentum=0.9))
    g = torch.Generator().manual_seed(seed)
    eval_lam = sample_dirichlet(eval_lams, n, torch.Generator().manual_seed(seed + 7919))

    def score(vs: Sequence[Mapping[str, Tensor]]) -> float:
        if correction is not None:  # BN reset / REPAIR at every evaluation point, then eval mode
            ev = evaluate_simplex(model, vs, x, y, eval_lam, correction=correction, x_stats=x)
            return float(ev.loss.double().mean())
        # train mode: batch statistics of all of x at once (one input batch), as the steps use them
        m = evaluate_points(model, _points(vs, eval_lam), x, y, train_mode=train_mode,
                            batch_size=x.shape[0] if train_mode else 4096)
        return float(m.loss.double().mean())

    def fwd(p: Mapping[str, Tensor], xb: Tensor) -> Tensor:
        return functional_call(model, {**p, **ints, **extra}, (xb,))

    def project(s: int) -> None:
        """Pᵢ ← WM(θ̃ᵢ, θᵢ), warm-started from the current Pᵢ (order seed ``seed + 1 + s``), i ≥ 2."""
        for i in range(1, n):
            tilde = {**verts[i], **{k: t.detach() for k, t in leaves[i - 1].items()}}
            new = weight_matching(spec, tilde, ms[i], seed=seed + 1 + s, init=perms[i]).perm
            if new != perms[i]:
                perms[i], verts[i] = new, new.apply(spec, ms[i])

    N = x.shape[0]
    per_epoch = max(1, math.ceil(N / batch_size))
    every = eval_every or per_epoch
    history = [score(verts)]
    eval_steps, candidates, changed = [0], [list(perms)], [0]
    step_losses: list[float] = []
    order = torch.empty(0, dtype=torch.long)
    projected = True
    bar = tqdm(range(steps), desc=f"interior n={n}", unit="step", disable=not progress, dynamic_ncols=True)
    with module_mode(model, train_mode):
        for s in bar:
            if s % per_epoch == 0:
                order = torch.randperm(N, generator=g).to(dev)
            if s % rematch_every == 0 and not projected:
                project(s)
            idx = order[(s % per_epoch) * batch_size : (s % per_epoch + 1) * batch_size]
            lam = _dirichlet(T, n, float(concentration), g).to(dev, ms[0][f_keys[0]].dtype)
            V = {}
            for k in f_keys:
                rows = [ms[0][k]] + [
                    verts[i][k] + (leaves[i - 1][k] - leaves[i - 1][k].detach()) if k in leaves[i - 1] else verts[i][k]
                    for i in range(1, n)
                ]
                V[k] = torch.tensordot(lam, torch.stack(rows), dims=1)
            logits = vmap(fwd, in_dims=(0, None), randomness="different")(V, x[idx])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[idx].repeat(T))
            if not bool(torch.isfinite(loss)):
                raise ValueError(f"interior_alignment diverged: loss {float(loss)} at step {s + 1}/{steps} "
                                 f"({optimizer}, lr={lr:g}); try a lower learning rate")
            opt.zero_grad()
            loss.backward()
            opt.step()
            projected = False
            step_losses.append(float(loss.detach()))
            if (s + 1) % every == 0 or s + 1 == steps:
                project(s + 1)
                projected = True
                history.append(score(verts))
                eval_steps.append(s + 1)
                candidates.append(list(perms))
                changed.append(_moved(perms, init))
                bar.set_postfix(score=f"{history[-1]:.4f}", moved=changed[-1])
    best = min(range(len(history)), key=lambda c: (history[c], c))
    return InteriorResult(
        perms=tuple(candidates[best]), score=history[best], history=tuple(history), eval_steps=tuple(eval_steps),
        best_step=eval_steps[best], step_losses=tuple(step_losses), changed=tuple(changed),
    )


def align_simplex(
    spec: PermutationSpec,
    models: Sequence[Mapping[str, Tensor]],
    method: str,
    *,
    model: nn.Module | None = None,
    x: Tensor | None = None,
    y: Tensor | None = None,
    seed: int = 0,
    restarts: int = 1,
    init: str = "universe",
    **interior_kwargs,
) -> PermutedSimplex:
    """P₂ … Pₙ for the simplex θ₁, P₂(θ₂), …, Pₙ(θₙ) by ``method`` (``ALIGN_METHODS``, module
    docstring). ``"interior"`` needs ``model``, ``x``, ``y`` (the training data) and starts from the
    permutations of method ``init``; ``interior_kwargs`` go to ``interior_alignment``."""
    if method not in ALIGN_METHODS:
        raise ValueError(f"unknown alignment method {method!r}; known: {ALIGN_METHODS}")
    ms = check_models(spec, models, 2)
    n = len(ms)
    info: dict = {}
    if method == "identity":
        perms = [Permutation.identity(spec) for _ in ms]
    elif method == "star":
        res = [weight_matching(spec, ms[0], ms[i], seed=seed, restarts=restarts) for i in range(1, n)]
        perms = [Permutation.identity(spec)] + [r.perm for r in res]
    elif method == "mergemany":
        r = merge_many(spec, ms, seed=seed)
        perms = _anchor(r.perms)
        info = {"sweeps": r.sweeps, "converged": r.converged}
    elif method == "universe":
        u = universe_alignment(spec, ms, method="sync", seed=seed, restarts=restarts)
        perms = _anchor(u.to_universe)
        info = {"agreement": u.agreement}
    else:
        if model is None or x is None or y is None:
            raise ValueError("method 'interior' needs model, x and y (the loss it minimises is measured on them)")
        if init == "interior" or init not in ALIGN_METHODS:
            raise ValueError(f"init must be one of {[m for m in ALIGN_METHODS if m != 'interior']}, got {init!r}")
        start = align_simplex(spec, ms, init, seed=seed, restarts=restarts).perms
        r = interior_alignment(model, spec, ms, x, y, init=start, seed=seed, **interior_kwargs)
        perms = list(r.perms)
        info = {"init": init, "score": r.score, "history": list(r.history), "eval_steps": list(r.eval_steps),
                "best_step": r.best_step, "changed": list(r.changed)}
    return PermutedSimplex(tuple(perms), tuple(permuted_vertices(spec, ms, perms)), method, info)


# ---------------------------------------------------------------------------------------------
# gluing into a simplicial complex


def _allclose(a: Mapping[str, Tensor], b: Mapping[str, Tensor], rtol: float, atol: float) -> bool:
    return all(torch.allclose(a[k].double(), b[k].double().to(a[k].device), rtol=rtol, atol=atol)
               if is_float(a[k]) else torch.equal(a[k], b[k].to(a[k].device)) for k in a)


def permutation_equivalent(
    spec: PermutationSpec,
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    *,
    rtol: float = 1e-5,
    atol: float = 1e-7,
) -> Permutation | None:
    """A permutation P with P(b) = a (entry-wise within ``rtol``/``atol``), or ``None`` if there is none.

    Candidate maps: the canonical forms (``canonical_permutation``: P = c_a⁻¹ ∘ c_b, exact when the
    units' weight norms have no ties), then weight matching of b to a (ties, e.g. dead units); a
    candidate counts only if P(b) matches a entry-wise, so a returned P is always a witness. ``None``
    for a pair that is not equivalent; for an equivalent pair with tied norms *and* a weight-matching
    local optimum that misses P, also ``None`` (not observed on trained or generic weights).
    """
    if set(a) != set(b):
        raise ValueError(f"the two points have different keys: {sorted(set(a) ^ set(b))}")
    spec.check_params(a)
    spec.check_params(b)
    if any(a[k].shape != b[k].shape for k in a):
        bad = [k for k in a if a[k].shape != b[k].shape]
        raise ValueError(f"shapes differ at {bad}")
    p = canonical_permutation(spec, a).inverse().compose(canonical_permutation(spec, b))
    if _allclose(a, p.apply(spec, b), rtol, atol):
        return p
    p = weight_matching(spec, a, b, init=p).perm
    return p if _allclose(a, p.apply(spec, b), rtol, atol) else None


@dataclass(frozen=True)
class PermutedComplex:
    """Permuted simplexes glued along permutation-equivalent vertices (module docstring).

    ``simplices[j]``: the vertex dicts of simplex j, in that simplex's own labelling;
    ``classes[j][v]``: the equivalence class of its vertex v (0 … ``n_classes`` − 1, numbered in order
    of first appearance); ``maps[j][v]``: the permutation P with P(representative) = vertex, the
    representative being the class's first occurrence.
    """

    simplices: tuple[tuple[Params, ...], ...]
    classes: tuple[tuple[int, ...], ...]
    maps: tuple[tuple[Permutation, ...], ...]

    @property
    def n_classes(self) -> int:
        return 1 + max(c for cl in self.classes for c in cl)

    def occurrences(self) -> dict[int, list[tuple[int, int]]]:
        """Class → every (simplex, vertex) it occurs at."""
        out: dict[int, list[tuple[int, int]]] = {}
        for j, cl in enumerate(self.classes):
            for v, c in enumerate(cl):
                out.setdefault(c, []).append((j, v))
        return out

    def shared(self) -> dict[int, list[tuple[int, int]]]:
        """The glued vertices: classes occurring in more than one simplex."""
        return {c: occ for c, occ in self.occurrences().items() if len({j for j, _ in occ}) > 1}

    def volumes(self) -> Tensor:
        return torch.stack([simplex_volume(list(s)) for s in self.simplices])

    def sample(
        self, n_samples: int, generator: torch.Generator | int | None = None, weighting: str = "volume"
    ) -> tuple[Tensor, Tensor, Params]:
        """``n_samples`` points uniform on the complex: a simplex j with probability ∝ its volume
        (``weighting="volume"``, simplexes of one dimension) or uniform (``"uniform"``), then λ ∼
        Dir(1) on it. Returns (simplex index [S], λ [S, k] (zero-padded to the largest k), stacked points)."""
        _int("n_samples", n_samples, 1)
        g = _generator(generator)
        ks = [len(s) for s in self.simplices]
        if weighting == "volume":
            if len(set(ks)) != 1:
                raise ValueError("volume weighting needs simplexes of one dimension; use weighting='uniform'")
            w = self.volumes()
            if not bool((w > 0).all()) or not bool(torch.isfinite(w).all()):
                raise ValueError(f"degenerate simplex volumes {w.tolist()}; use weighting='uniform'")
        elif weighting == "uniform":
            w = torch.ones(len(ks), dtype=torch.float64)
        else:
            raise ValueError(f"weighting must be 'volume' or 'uniform', got {weighting!r}")
        js = torch.multinomial(w / w.sum(), n_samples, replacement=True, generator=g)
        K = max(ks)
        lams = torch.zeros(n_samples, K, dtype=torch.float64)
        pts = []
        for r, j in enumerate(js.tolist()):
            lam = sample_dirichlet(1, ks[j], g)
            lams[r, : ks[j]] = lam[0]
            pts.append(_points(self.simplices[j], lam))
        return js, lams, {k: torch.cat([p[k] for p in pts]) for k in pts[0]}

    @torch.no_grad()
    def function_gap(self, model: nn.Module, x: Tensor) -> dict[int, float]:
        """Per glued class, the largest |logit difference| between any occurrence and the class's
        representative on inputs ``x`` (0 up to rounding: identified vertices are one function)."""
        out = {}
        for c, occ in self.occurrences().items():
            pts = stack([self.simplices[j][v] for j, v in occ])
            lg = predict_logits(model, pts, x)
            out[c] = float((lg - lg[:1]).abs().max())
        return out


def glue(
    spec: PermutationSpec,
    simplices: Sequence[Sequence[Mapping[str, Tensor]]],
    *,
    rtol: float = 1e-5,
    atol: float = 1e-7,
) -> PermutedComplex:
    """Glue simplexes (each a sequence of vertex dicts in its own labelling) into a ``PermutedComplex``
    by identifying permutation-equivalent vertices (``permutation_equivalent``). Raises ``ValueError``
    for fewer than one simplex, a simplex with fewer than 2 vertices, mismatched architectures, or a
    simplex with two equivalent vertices (a degenerate simplex: its points collapse modulo P)."""
    sims = [list(s) for s in simplices]
    if not sims:
        raise ValueError("nothing to glue: no simplexes")
    for j, s in enumerate(sims):
        if len(s) < 2:
            raise ValueError(f"simplex {j} has {len(s)} vertex; a simplex here needs at least 2")
    check_compatible(*[v for s in sims for v in s])
    reps: list[Mapping[str, Tensor]] = []
    classes, maps = [], []
    for j, s in enumerate(sims):
        cl, mp = [], []
        for v in s:
            spec.check_params(v)
            check_finite(v, f"a vertex of simplex {j}")
            found = None
            for c, r in enumerate(reps):
                p = permutation_equivalent(spec, v, r, rtol=rtol, atol=atol)
                if p is not None:
                    found = (c, p)
                    break
            if found is None:
                reps.append(v)
                found = (len(reps) - 1, Permutation.identity(spec))
            if found[0] in cl:
                raise ValueError(f"simplex {j} holds two permutation-equivalent vertices (class {found[0]}): "
                                 f"a degenerate simplex")
            cl.append(found[0])
            mp.append(found[1])
        classes.append(tuple(cl))
        maps.append(tuple(mp))
    return PermutedComplex(tuple(tuple(dict(v) for v in s) for s in sims), tuple(classes), tuple(maps))
