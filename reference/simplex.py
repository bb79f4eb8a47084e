"""Simplexes and simplicial complexes of low loss: SPRO and ESPRO (Benton et al. 2021).

Benton, Maddox, Lotfi & Wilson, "Loss Surface Simplexes for Mode Connecting Volumes and Fast
Ensembling", ICML 2021 (arXiv:2102.13042); the authors' code is ``g-benton/loss-surface-simplexes``
(``simplex/models/simplex_models.py``, ``simplex/simplex_helpers.py``, ``simplex/utils.py``), cited
below by function name.

**Simplexes.** A k-vertex simplex (dimension k − 1) with vertices θ₀ … θ_{k−1} is the set of convex
combinations φ(λ) = Σᵢ λᵢ θᵢ, λ in the probability simplex Δ^{k−1} = {λ ≥ 0, Σλᵢ = 1}; it is
``params.combine_batch(λ, vertices)`` (integer buffers come from θ₀). Uniform sampling of the simplex
is λ ∼ Dirichlet(1, …, 1), drawn as normalised exponentials λᵢ = Eᵢ / Σⱼ Eⱼ, Eᵢ = −log(1 − Uᵢ),
Uᵢ ∼ U[0, 1) (the authors' ``Simplex.forward`` / ``vertex_weights`` draw −log U the same way); the
uniforms come from a seeded CPU ``torch.Generator``, so the draws are reproducible on every device.

**Volume.** With edge vectors eᵢ = θᵢ − θ₀ (i = 1 … k − 1, flattened floating entries, float64) and
their Gram matrix Gᵢⱼ = ⟨eᵢ, eⱼ⟩,

    Vol(θ₀ … θ_{k−1}) = √det G / (k − 1)!                                             (V)

which equals the Cayley–Menger form the authors use (``simplex_helpers.complex_volume``):
Vol² = (−1)ᵏ det CM / (2^{k−1} ((k − 1)!)²), CM the (k + 1)×(k + 1) bordered matrix of squared
distances (``cayley_menger_volume``; the two agree, and (V) needs no D-dimensional distance matrix and
loses no digits to the cancellation in det CM when distances are large). The authors' function returns
Vol² (no square root). ``log_volume(eps)`` is ½ log(Vol² + ε): with ε = 0 it is log Vol exactly (via
``slogdet``), with ε > 0 it is the authors' smoothing, finite (with a finite gradient) at a degenerate
simplex, e.g. a new vertex placed on the centroid of the others.

**Simplicial complexes.** A set of vertices and of simplices (tuples of vertex indices) that share
them. ``sample_coefficients`` draws a simplex, then a point uniformly inside it; by default
(``weighting="uniform"``) the simplex is drawn uniformly, as the authors' ``SimplexNet.vertex_weights``
does (``np.random.randint(n_simplex)``; its volume-weighted variant is commented out there). This is
*not* uniform on the complex when the simplices' volumes differ; ``weighting="volume"`` draws a simplex
with probability ∝ its volume (the authors' unused ``SimplicialComplex.forward``), which is uniform on
the complex when all simplices have the same dimension.

**SPRO** (simplicial pointwise random optimisation; ``train_simplex``). Starting from fixed vertices
(trained modes), ``n_free`` free vertices are added **one at a time**, as in the authors'
``SimplexNet.add_vert`` and ``experiments/*/simplex_trainer.py`` / ``complex_iterative.py``:

1. the new vertex starts at the centroid of all current vertices (fixed and previously trained),
   its floating buffers (BatchNorm statistics) too, integer buffers from the first vertex;
2. it is added to every simplex of the complex;
3. it alone is trained (earlier free vertices are frozen, as the authors fix them) for ``cfg.epochs``
   epochs with a fresh optimizer state and learning-rate schedule, on

       ℓ(v) = (1/T) Σⱼ L_batch(Σᵢ λ⁽ʲ⁾ᵢ θᵢ) − λ_vol · (1/S) Σₛ ½ log(Vol(σₛ)² + ε)       (SPRO)

   with T = ``samples_per_step`` coefficient vectors λ⁽ʲ⁾ drawn from the complex per minibatch
   (the unbiased estimate of E_{λ} L(φ(λ))), σ₁ … σ_S the complex's simplices, Vol of (V) over the
   trainable parameters (not buffers, as the authors' ``model.parameters()``). The T points come from
   one ``combine_batch`` and run through **one** ``vmap(functional_call)``; gradients reach the new
   vertex's trainable entries only.

Complexes built (``fixed_vertices`` = [θ₁ … θ_m], free vertices v₁ … v_n):

- m = 1: the single simplex {θ₁, v₁, …, v_n} around one mode (an n-simplex; the authors' SPRO);
- m ≥ 2: the mode-connecting complex of the authors' ``complex_iterative.py``: m simplices
  {θ_j, v₁, …, v_n}, one per mode, sharing the free (connecting) vertices. With n = 1 this is a
  polygonal chain through v₁ (whose initial position is the modes' mean: the midpoint for m = 2).

Differences from the authors' code, stated so numbers can be compared:
(a) the data term is the *mean* over the T samples; their ``train_epoch_volume`` sums the T losses
(its ``acc_loss.div(nsample)`` is discarded) and regularises with −λ_B log(Vol² + ε), so their λ_B
corresponds to ``vol_reg`` = 2 λ_B / T here; they further divide their command-line λ by the
log-volume of a randomly initialised simplex (``reg_pars``), which is not done here;
(b) the regulariser averages over all simplices of the complex (their ``total_volume`` uses simplex 0
only); (c) ``complex_iterative.py`` trains its first connecting point without the regulariser; here
``vol_reg`` applies to every stage (pass 0 for none).

**ESPRO** (``espro_ensemble``): one SPRO simplex around each of several independently trained modes;
the ensemble's members are points sampled from every simplex (``sample_members``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .bn import override_momentum
from .fit import Batch, Prepared, fit, logits_at, mean_cross_entropy, module_mode, prepare, seeded_rng
from .optim import TrainConfig
from .params import (
    Params,
    check_compatible,
    check_finite,
    chosen_float_keys,
    combine,
    combine_batch,
)
from .validate import generator as as_generator
from .validate import integer, number

__all__ = [
    "WEIGHTINGS",
    "Simplex",
    "SimplicialComplex",
    "cayley_menger_volume",
    "check_barycentric",
    "espro_ensemble",
    "mode_connecting_simplices",
    "sample_dirichlet",
    "sample_members",
    "simplex_log_volume",
    "simplex_volume",
    "train_simplex",
]

WEIGHTINGS = ("uniform", "volume")

Generatorish = torch.Generator | int | None
Simplices = Sequence[tuple[int, ...]]


# ---------------------------------------------------------------------------------------------
# sampling


def _exponentials(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Standard exponentials −log(1 − U), U ∼ U[0, 1) (finite: 1 − U ∈ (0, 1]), float64, CPU."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    return -torch.log1p(-u)


def sample_dirichlet(n_samples: int, k: int, generator: Generatorish = None) -> Tensor:
    """``n_samples`` points λ ∼ Dirichlet(1, …, 1) on Δ^{k−1}, float64 ``[n_samples, k]``.

    Normalised exponentials λᵢ = Eᵢ / Σⱼ Eⱼ (the uniform distribution on the simplex); ``generator``:
    a CPU ``torch.Generator``, an int seed, or ``None`` (unseeded). Entries are ≥ 0 and every row sums
    to 1 up to rounding.
    """
    n_samples = integer("n_samples", n_samples, 0)
    k = integer("k (number of vertices)", k)
    e = _exponentials((n_samples, k), as_generator(generator))
    s = e.sum(1, keepdim=True)
    # all k exponentials 0 needs every U = 0 exactly (probability 2^-53k): put the point on vertex 0
    e[s.squeeze(1) == 0, 0] = 1.0
    return e / e.sum(1, keepdim=True)


# ---------------------------------------------------------------------------------------------
# volume


def _check_vertices(vertices: Sequence[Mapping[str, Tensor]], what: str = "simplex") -> list[Mapping[str, Tensor]]:
    vs = list(vertices)
    if not vs:
        raise ValueError(f"{what}: needs at least one vertex, got none")
    for i, v in enumerate(vs):
        if not isinstance(v, Mapping):
            raise TypeError(f"{what}: vertex {i} must be a dict of tensors (Params), got {type(v).__name__}")
    check_compatible(*vs)
    return vs


def _flat64(p: Mapping[str, Tensor], keys: Sequence[str], device: torch.device | None = None) -> Tensor:
    return torch.cat([p[k].reshape(-1).to(device=device, dtype=torch.float64) for k in keys])


def _gram(flat: Sequence[Tensor]) -> Tensor:
    """Gram matrix of the edge vectors θᵢ − θ₀, i ≥ 1 (float64, differentiable)."""
    e = torch.stack([f - flat[0] for f in flat[1:]])
    return e @ e.T


def _vol_sq_from_flat(flat: Sequence[Tensor]) -> Tensor:
    k1 = len(flat) - 1
    return torch.linalg.det(_gram(flat)).clamp_min(0.0) / float(math.factorial(k1)) ** 2


def _log_vol_from_flat(flat: Sequence[Tensor], eps: float) -> Tensor:
    """½ log(Vol² + eps) (``eps=0``: log Vol via ``slogdet``; −inf for a degenerate simplex)."""
    k1 = len(flat) - 1
    if eps == 0.0:
        sign, logabs = torch.linalg.slogdet(_gram(flat))
        if float(sign.detach()) <= 0:
            return torch.full((), -math.inf, dtype=torch.float64, device=logabs.device)
        return 0.5 * logabs - math.lgamma(k1 + 1)
    return 0.5 * torch.log(_vol_sq_from_flat(flat) + eps)


def _need_two(n: int) -> None:
    if n < 2:
        raise ValueError(
            f"the volume of a simplex needs at least 2 vertices (a 1-simplex, a segment), got {n}: "
            "a single point has no volume"
        )


def simplex_volume(vertices: Sequence[Mapping[str, Tensor]], keys: Sequence[str] | None = None) -> Tensor:
    """Vol = √det G / (k − 1)! of Eq. (V) (module docstring) for k ≥ 2 vertices; float64 scalar.

    ``keys``: the entries measured (default: every floating entry, buffers included). Differentiable
    in the vertices' tensors (away from degenerate simplexes, where √ has an infinite slope: use
    ``simplex_log_volume`` with ``eps > 0`` for gradients). Raises ``ValueError`` for fewer than two
    vertices or vertices with different keys / shapes.
    """
    vs = _check_vertices(vertices)
    _need_two(len(vs))
    ks = chosen_float_keys(vs[0], keys, "volume")
    dev = next(iter(vs[0].values())).device
    return _vol_sq_from_flat([_flat64(v, ks, dev) for v in vs]).sqrt()


def simplex_log_volume(
    vertices: Sequence[Mapping[str, Tensor]], keys: Sequence[str] | None = None, eps: float = 0.0
) -> Tensor:
    """½ log(Vol² + ``eps``): log Vol for ``eps = 0`` (−inf when degenerate), the smoothed log-volume
    of the SPRO regulariser (Benton et al. 2021; ``utils.train_epoch_volume``) for ``eps > 0``.

    Differentiable; with ``eps > 0`` finite with a finite gradient everywhere, also at a degenerate
    simplex (where the gradient is 0).
    """
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    vs = _check_vertices(vertices)
    _need_two(len(vs))
    ks = chosen_float_keys(vs[0], keys, "volume")
    dev = next(iter(vs[0].values())).device
    return _log_vol_from_flat([_flat64(v, ks, dev) for v in vs], float(eps))


def cayley_menger_volume(sq_dists: Tensor) -> Tensor:
    """Volume of the simplex whose k vertices have pairwise squared distances ``sq_dists`` [k, k].

    Vol² = (−1)ᵏ det CM / (2^{k−1} ((k − 1)!)²) with CM = [[0, 1ᵀ], [1, D]] (Cayley–Menger; the form
    of the authors' ``complex_volume``, which returns Vol²). Computed in float64; a slightly negative
    Vol² from rounding is clamped to 0.
    """
    d = torch.as_tensor(sq_dists, dtype=torch.float64)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"sq_dists must be a square [k, k] matrix, got shape {tuple(d.shape)}")
    k = d.shape[0]
    _need_two(k)
    cm = torch.ones(k + 1, k + 1, dtype=torch.float64, device=d.device)
    cm[0, 0] = 0.0
    cm[1:, 1:] = d
    vol_sq = (-1.0) ** k * torch.linalg.det(cm) / (2.0 ** (k - 1) * float(math.factorial(k - 1)) ** 2)
    return vol_sq.clamp_min(0.0).sqrt()


# ---------------------------------------------------------------------------------------------
# a simplex


@dataclass(frozen=True, eq=False)
class Simplex:
    """The simplex {Σᵢ λᵢ θᵢ : λ ∈ Δ^{k−1}} of k vertices (Benton et al. 2021).

    Validated on construction (at least one vertex; every vertex has the keys, shapes and dtype
    kinds of the first, else ``ValueError`` naming the key). The dicts are held, not copied.
    """

    vertices: tuple[Params, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "vertices", tuple(_check_vertices(self.vertices)))

    @property
    def k(self) -> int:
        """Number of vertices (the simplex has dimension k − 1)."""
        return len(self.vertices)

    def sample_barycentric(self, n_samples: int, generator: Generatorish = None) -> Tensor:
        """λ ∼ Dirichlet(1, …, 1): ``[n_samples, k]`` float64, uniform on the simplex."""
        return sample_dirichlet(n_samples, self.k, generator)

    def points(self, lams: Tensor | Sequence[Sequence[float]]) -> Params:
        """The points Σᵢ λᵢ θᵢ for the rows of ``lams`` [n, k] (barycentric: ``check_barycentric``), stacked."""
        return combine_batch(check_barycentric(lams, self.k), self.vertices)

    def sample(self, n_samples: int, generator: Generatorish = None) -> Params:
        """``n_samples`` points drawn uniformly from the simplex, stacked."""
        return self.points(self.sample_barycentric(n_samples, generator))

    def volume(self, keys: Sequence[str] | None = None) -> Tensor:
        """Eq. (V): √det G / (k − 1)!, float64 (``simplex_volume``)."""
        return simplex_volume(self.vertices, keys)

    def log_volume(self, keys: Sequence[str] | None = None, eps: float = 0.0) -> Tensor:
        """½ log(Vol² + eps) (``simplex_log_volume``): the SPRO regulariser's log-volume."""
        return simplex_log_volume(self.vertices, keys, eps)


def check_barycentric(lams: Tensor | Sequence[Sequence[float]], k: int) -> Tensor:
    """``lams`` as float64 ``[n, k]`` if every row is a point of the simplex (entries ≥ 0 up to 1e-12,
    rows summing to 1 within ``torch.allclose``'s tolerance); ``ValueError`` otherwise (e.g. [2, 2],
    which would extrapolate far outside the simplex)."""
    lams = torch.as_tensor(lams, dtype=torch.float64)
    if lams.ndim != 2 or lams.shape[1] != k:
        raise ValueError(f"lams must be [n, {k}] (barycentric coordinates, one per vertex), got {tuple(lams.shape)}")
    if bool((lams < -1e-12).any()) or not torch.allclose(lams.sum(1), torch.ones(len(lams), dtype=lams.dtype)):
        raise ValueError("lams must be barycentric coordinates: non-negative and summing to 1 in every row")
    return lams


def _draw_coefficients(
    simplices: Sequence[tuple[int, ...]], n_vertices: int, n: int, g: torch.Generator, probs: Tensor | None
) -> Tensor:
    """``[n, n_vertices]``: per row a simplex (uniformly, or by ``probs``), then Dirichlet(1) on its
    vertices (normalised exponentials restricted to them), 0 on the other vertices."""
    S = len(simplices)
    if probs is None:
        idx = torch.randint(S, (n,), generator=g)
    else:
        idx = torch.multinomial(probs, n, replacement=True, generator=g) if n else torch.zeros(0, dtype=torch.long)
    member = torch.zeros(S, n_vertices, dtype=torch.float64)
    for j, s in enumerate(simplices):
        member[j, list(s)] = 1.0
    e = _exponentials((n, n_vertices), g) * member[idx]
    zero = (e.sum(1) == 0).nonzero().squeeze(1)
    for r in zero.tolist():  # all exponentials 0 (probability ~0): the simplex's first vertex
        e[r, simplices[int(idx[r])][0]] = 1.0
    return e / e.sum(1, keepdim=True)


# ---------------------------------------------------------------------------------------------
# a simplicial complex


@dataclass(frozen=True, eq=False)
class SimplicialComplex:
    """Vertices and the simplices (tuples of vertex indices) built on them: Benton et al. 2021's
    mode-connecting simplicial complexes.

    ``fixed``: indices of the vertices that were given (trained modes) rather than trained by SPRO;
    informational. Validated on construction: indices in range, distinct within a simplex, at least
    one simplex, compatible vertices (``ValueError`` naming the problem).
    """

    vertices: tuple[Params, ...]
    simplices: tuple[tuple[int, ...], ...]
    fixed: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        vs = tuple(_check_vertices(self.vertices, "simplicial complex"))
        object.__setattr__(self, "vertices", vs)
        simplices = tuple(tuple(s) for s in self.simplices)
        if not simplices:
            raise ValueError("simplicial complex: needs at least one simplex")
        n = len(vs)
        for j, s in enumerate(simplices):
            if not s:
                raise ValueError(f"simplicial complex: simplex {j} is empty")
            for i in s:
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
                    raise ValueError(f"simplicial complex: simplex {j} = {s} names vertex {i!r}, not in 0..{n - 1}")
            if len(set(s)) != len(s):
                raise ValueError(f"simplicial complex: simplex {j} = {s} repeats a vertex")
        object.__setattr__(self, "simplices", simplices)
        fixed = tuple(self.fixed)
        for i in fixed:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
                raise ValueError(f"simplicial complex: fixed vertex {i!r} not in 0..{n - 1}")
        object.__setattr__(self, "fixed", fixed)

    @property
    def n_vertices(self) -> int:
        return len(self.vertices)

    @property
    def free(self) -> tuple[int, ...]:
        """Indices of the vertices not in ``fixed`` (those SPRO trained)."""
        return tuple(i for i in range(self.n_vertices) if i not in set(self.fixed))

    def simplex(self, j: int) -> Simplex:
        """Simplex ``j`` as a ``Simplex`` of its vertices (in the order its tuple lists them)."""
        return Simplex(tuple(self.vertices[i] for i in self.simplices[j]))

    def volumes(self, keys: Sequence[str] | None = None) -> Tensor:
        """Eq. (V) for every simplex, float64 ``[S]`` on CPU (a 1-vertex simplex has volume 0)."""
        zero = torch.zeros((), dtype=torch.float64)
        vols = [self.simplex(j).volume(keys).cpu() if len(s) > 1 else zero for j, s in enumerate(self.simplices)]
        return torch.stack(vols)

    def sample_coefficients(
        self, n_samples: int, generator: Generatorish = None, weighting: str = "uniform"
    ) -> Tensor:
        """``[n_samples, n_vertices]`` float64 coefficients: for each sample a simplex σ (uniformly, or
        ∝ its volume with ``weighting="volume"``), then λ ∼ Dirichlet(1) on σ's vertices, 0 elsewhere.

        ``weighting="volume"`` needs simplices of one dimension (volumes of different dimensions are
        not comparable) and a positive total volume; ``ValueError`` otherwise.
        """
        n_samples = integer("n_samples", n_samples, 0)
        g = as_generator(generator)
        if weighting == "uniform":
            probs = None
        elif weighting == "volume":
            sizes = {len(s) for s in self.simplices}
            if len(sizes) != 1:
                raise ValueError(
                    f"weighting='volume' needs simplices of one dimension, got sizes {sorted(sizes)}; "
                    "use weighting='uniform'"
                )
            vols = self.volumes()
            if not float(vols.sum()) > 0:
                raise ValueError("weighting='volume': every simplex has volume 0; use weighting='uniform'")
            probs = vols / vols.sum()
        else:
            raise ValueError(f"unknown weighting {weighting!r}; use one of {WEIGHTINGS}")
        return _draw_coefficients(self.simplices, self.n_vertices, n_samples, g, probs)

    def points(self, coeffs: Tensor) -> Params:
        """Σᵢ cᵢ θᵢ over all vertices for the rows of ``coeffs`` [n, n_vertices], stacked."""
        coeffs = torch.as_tensor(coeffs, dtype=torch.float64)
        if coeffs.ndim != 2 or coeffs.shape[1] != self.n_vertices:
            raise ValueError(f"coeffs must be [n, {self.n_vertices}], got {tuple(coeffs.shape)}")
        return combine_batch(coeffs, self.vertices)

    def sample(self, n_samples: int, generator: Generatorish = None, weighting: str = "uniform") -> Params:
        """``n_samples`` points of the complex (``sample_coefficients``), stacked."""
        return self.points(self.sample_coefficients(n_samples, generator, weighting))


def mode_connecting_simplices(n_fixed: int, n_free: int) -> tuple[tuple[int, ...], ...]:
    """The simplices SPRO builds on vertices [θ₁ … θ_m, v₁ … v_n] (m = ``n_fixed``, n = ``n_free``):
    one simplex {θ₁, v₁ … v_n} for m = 1; m simplices {θ_j, v₁ … v_n} sharing the v's for m ≥ 2."""
    m = integer("n_fixed", n_fixed)
    n = integer("n_free", n_free, 0)
    free = tuple(range(m, m + n))
    return tuple((j, *free) for j in range(m))


# ---------------------------------------------------------------------------------------------
# SPRO


def train_simplex(
    model: nn.Module,
    fixed_vertices: Sequence[Mapping[str, Tensor]],
    n_free: int,
    x: Tensor,
    y: Tensor,
    cfg: TrainConfig,
    seed: int = 0,
    *,
    samples_per_step: int = 4,
    vol_reg: float = 0.0,
    vol_eps: float = 1e-4,
    weighting: str = "uniform",
    device: torch.device | str | None = None,
    progress: bool = True,
) -> SimplicialComplex:
    """SPRO (module docstring): add ``n_free`` vertices one at a time to the complex on
    ``fixed_vertices`` and train each on Eq. (SPRO); return the ``SimplicialComplex`` (CPU tensors).

    ``fixed_vertices``: one mode (a simplex around it) or several (the mode-connecting complex
    {θ_j, v₁ … v_n}, ``mode_connecting_simplices``). Each vertex is trained for ``cfg.epochs`` epochs
    of ``cfg.steps_per_epoch(n)`` minibatches, so SPRO costs ``n_free · cfg.epochs`` epochs; the
    optimizer (``cfg.optimizer``, momentum, weight decay on the new vertex, clipping) and the
    learning-rate schedule (``lr_schedule``) restart for every vertex, as the authors create a new
    optimizer and scheduler per vertex. Per step: minibatch indices from ``torch.randperm(n, g)`` per
    epoch and T = ``samples_per_step`` coefficient vectors drawn as ``SimplicialComplex.sample_coefficients``
    does, all from one CPU generator ``g`` seeded with ``seed``. With ``weighting="volume"`` the
    simplex of each sample is drawn ∝ the current volumes (uniformly while they are all 0).

    ``vol_reg`` = λ_vol and ``vol_eps`` = ε of Eq. (SPRO) (ε > 0 is required when λ_vol > 0: the new
    vertex starts on the centroid, a degenerate simplex). BatchNorm runs in train mode (batch
    statistics) with momentum 0.1 on throw-away combined buffers, as ``reference.curves`` does;
    recompute the statistics (``reference.bn``) before evaluating sampled points. Raises ``ValueError``
    on bad arguments and when the loss becomes NaN or infinite.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    fixed = _check_vertices(fixed_vertices, "fixed_vertices")
    n_free = integer("n_free", n_free)
    T = integer("samples_per_step", samples_per_step)
    lam = number("vol_reg", vol_reg, minimum=0.0)
    eps = number("vol_eps", vol_eps, minimum=0.0)
    if lam > 0 and eps == 0:
        raise ValueError(
            "vol_eps must be > 0 when vol_reg > 0: each new vertex starts on the centroid of the others, "
            "where the simplex is degenerate and log Vol = -inf"
        )
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; use one of {WEIGHTINGS}")
    prep = prepare(model, fixed[0], x, y, cfg, device)
    dev = prep.device
    m = len(fixed)
    g = torch.Generator().manual_seed(int(seed))
    job = _SproJob(model, prep, cfg, T, lam, eps, weighting, g, int(seed), progress)
    verts: list[Params] = [{k: v.detach().to(dev).clone() for k, v in p.items()} for p in fixed]
    with module_mode(model, True), override_momentum(model, 0.1), seeded_rng(int(seed), dev):
        for stage in range(1, n_free + 1):
            new = job.train_vertex(verts, mode_connecting_simplices(m, stage), stage, n_free)
            verts.append({k: new[k] for k in fixed[0]})
    out = []
    for i, v in enumerate(verts):
        point = {k: t.detach().cpu().clone() for k, t in v.items()}
        if i >= m:
            check_finite(point, what=f"SPRO vertex {i - m + 1} (seed {seed}); try a lower learning rate")
        out.append(point)
    return SimplicialComplex(tuple(out), mode_connecting_simplices(m, n_free), tuple(range(m)))


@dataclass
class _SproJob:
    """The fixed ingredients of one ``train_simplex`` call; ``train_vertex`` runs one SPRO stage."""

    model: nn.Module
    prep: Prepared  # the layout (trainable and buffer keys), the module's constants and the data, on the device
    cfg: TrainConfig
    T: int
    lam: float
    eps: float
    weighting: str
    g: torch.Generator
    seed: int
    progress: bool

    def _flat_all(self, const_flat: list[Tensor], leaves: list[Tensor]) -> list[Tensor]:
        return [*const_flat, torch.cat([t.reshape(-1).to(torch.float64) for t in leaves])]

    def _probs(self, simplices: Simplices, const_flat: list[Tensor], leaves: list[Tensor]) -> Tensor | None:
        """None (uniform) or the simplex probabilities ∝ current volumes (uniform while all are 0)."""
        if self.weighting == "uniform":
            return None
        with torch.no_grad():
            flat = self._flat_all(const_flat, [t.detach() for t in leaves])
            vols = torch.stack([_vol_sq_from_flat([flat[i] for i in s]).sqrt() for s in simplices]).cpu()
        return vols / vols.sum() if float(vols.sum()) > 0 else None

    def _log_volume(self, simplices: Simplices, const_flat: list[Tensor], leaves: list[Tensor]) -> Tensor:
        """(1/S) Σₛ ½ log(Vol(σₛ)² + ε), differentiable in the new vertex."""
        flat = self._flat_all(const_flat, leaves)
        return torch.stack([_log_vol_from_flat([flat[i] for i in s], self.eps) for s in simplices]).mean()

    def train_vertex(
        self, verts: list[Params], simplices: tuple[tuple[int, ...], ...], stage: int, n_free: int
    ) -> Params:
        """Add a vertex on the centroid of ``verts``, train it on Eq. (SPRO); return it (on ``verts``' device)."""
        cfg, T = self.cfg, self.T
        V = len(verts)
        centre = combine([1.0 / V] * V, verts)
        leaves = [centre[k].detach().clone().requires_grad_(True) for k in self.prep.p_keys]
        new_bufs = {k: centre[k] for k in self.prep.b_keys}
        const_flat = [_flat64(v, self.prep.p_keys) for v in verts]

        def objective(batch: Batch) -> Tensor:
            coeffs = _draw_coefficients(simplices, V + 1, T, self.g, self._probs(simplices, const_flat, leaves))
            new_point = {**dict(zip(self.prep.p_keys, leaves, strict=True)), **new_bufs}
            stacked = combine_batch(coeffs, [*verts, new_point])
            logits = logits_at(self.model, stacked, self.prep.constants, batch.x)  # [T, B, C]
            loss = mean_cross_entropy(logits, batch.y, cfg.label_smoothing)
            if self.lam:
                loss = loss - self.lam * self._log_volume(simplices, const_flat, leaves).to(loss.dtype)
            return loss

        fit(leaves, objective, self.prep.x, self.prep.y, cfg, self.g, what="SPRO",
            at=lambda e: f"vertex {stage}/{n_free}, epoch {e + 1}/{cfg.epochs}",
            context=f"(seed {self.seed}) with {cfg.optimizer} lr={cfg.lr:g}",
            hint="try a lower learning rate, a smaller vol_reg or grad_clip",
            progress=self.progress, desc=f"SPRO vertex {stage}/{n_free}")
        return {**{k: t.detach() for k, t in zip(self.prep.p_keys, leaves, strict=True)}, **new_bufs}


# ---------------------------------------------------------------------------------------------
# ESPRO


def espro_ensemble(
    model: nn.Module,
    modes: Sequence[Mapping[str, Tensor]],
    n_free: int,
    x: Tensor,
    y: Tensor,
    cfg: TrainConfig,
    seed: int = 0,
    **spro: Any,
) -> list[SimplicialComplex]:
    """ESPRO (Benton et al. 2021): an independent SPRO simplex {θ_j, v₁ … v_n} around each of the
    independently trained ``modes``; simplex j trains with seed ``seed + j``.

    The simplexes are trained one after the other, each as ``train_simplex(model, [mode], n_free,
    x, y, cfg, seed + j, **spro)`` (``spro``: its keyword arguments ``samples_per_step``,
    ``vol_reg``, ``vol_eps``, ``device``, ``progress``; ``weighting`` has no effect on a single
    simplex and is refused). Draw the ensemble's members with ``sample_members``.
    """
    ms = _check_vertices(modes, "modes")
    if "weighting" in spro:
        raise ValueError("weighting chooses between simplices of a complex; an ESPRO member has one simplex")
    return [train_simplex(model, [mode], n_free, x, y, cfg, seed + j, **spro) for j, mode in enumerate(ms)]


def sample_members(
    complexes: Sequence[SimplicialComplex],
    n_per_complex: int,
    generator: Generatorish = None,
    weighting: str = "uniform",
) -> Params:
    """ESPRO's ensemble members: ``n_per_complex`` points drawn from each complex, stacked
    ``[len(complexes) · n_per_complex, ...]`` (complex 0's points first)."""
    cxs = list(complexes)
    if not cxs:
        raise ValueError("complexes is empty: need at least one simplicial complex")
    for i, c in enumerate(cxs):
        if not isinstance(c, SimplicialComplex):
            raise TypeError(f"complexes[{i}] must be a SimplicialComplex, got {type(c).__name__}")
    check_compatible(*(c.vertices[0] for c in cxs))
    g = as_generator(generator)
    parts = [c.sample(n_per_complex, g, weighting) for c in cxs]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
