"""Permuted simplexes: low-loss simplexes θ₁, P₂(θ₂), …, Pₙ(θₙ) of independently trained modes.

The research note "Extensive Linear Connectivity and Application in Model Ensemble" (``sources/000``)
asks, for modes θ₁ … θₙ, for permutations P₂ … Pₙ such that *every* point Σᵢ λᵢ Pᵢ(θᵢ) of the
simplex (λ on the probability simplex Δⁿ⁻¹, P₁ = id) has low loss. Its two properties:

- **Property 1**: for any permutation P, Σ kᵢ θᵢ and Σ kᵢ P(θᵢ) compute the same function — so a
  simplex is only defined up to a *common* relabelling, and its loss landscape does not depend on it;
- **Property 2**: Git Re-Basin's pairwise alignments P₂ = WM(θ₁, θ₂), P₃ = WM(θ₁, θ₃) give low-loss
  edges θ₁–P₂(θ₂) and θ₁–P₃(θ₃), but nothing about the edge P₂(θ₂)–P₃(θ₃), let alone the interior.

This module measures a simplex and builds one several ways behind one interface (``align_simplex``):

**Algorithms** (``align_simplex(method=...)``; every one returns a ``PermutedSimplex`` with P₁ = id):

- ``"identity"``: no alignment (the naive simplex);
- ``"star"``: Pᵢ = weight_matching(θ₁, θᵢ) for each i (Git Re-Basin, Algorithm 1) — Property 2's
  construction;
- ``"mergemany"``: MergeMany (Ainsworth et al. 2023, Algorithm 3) maps every θᵢ to a common
  labelling by Uᵢ; re-expressed in θ₁'s labels, Pᵢ = U₁⁻¹ ∘ Uᵢ (a common relabelling: Property 1);
- ``"universe"``: weight matching of every pair, then permutation synchronisation (Pachauri et al.
  2013) to one cycle-consistent universe, Pᵢ = U₁⁻¹ ∘ Uᵢ;
- ``"sync-ascent"``: the same pairwise maps synchronised by coordinate ascent of their agreement
  (``reference.universe.sync_ascent``, started from the spectral solution), Pᵢ = U₁⁻¹ ∘ Uᵢ;
- ``"c2m3"``: C2M3's Frank–Wolfe over all pairs' weight-matching objective in one universe
  (Crisostomi et al. 2024; ``reference.universe.frank_wolfe_universe``), Pᵢ = U₁⁻¹ ∘ Uᵢ;
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

The simplex barrier (``simplex_barrier``, ``evaluate_simplex``) is measured in
``reference.simplex_barrier``, and the gluing into a complex (``glue``) is in ``reference.glue``; both
are re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .evaluate import evaluate_points
from .fit import check_data
from .glue import PermutedComplex, glue, permutation_equivalent  # re-exported
from .matching import weight_matching
from .merge import check_models, merge_many, pairwise_from_universe, universe_alignment
from .optim import TrainConfig
from .params import Params
from .permutation import Permutation, PermutationSpec
from .simplex import check_barycentric, sample_dirichlet
from .simplex_barrier import (  # re-exported
    BARRIER_METHODS,
    CORRECTIONS,
    SimplexBarrier,
    SimplexEval,
    barycentric_grid,
    dirichlet,
    evaluate_simplex,
    simplex_barrier,
    simplex_points,
)
from .ste import SearchResult, straight_through
from .validate import choice, integer, number

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

ALIGN_METHODS = ("identity", "star", "mergemany", "universe", "sync-ascent", "c2m3", "interior")


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
        return simplex_points(self.vertices, check_barycentric(lams, self.n))


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


InteriorResult = SearchResult  # ``interior_alignment``'s output (``reference.ste.SearchResult``)


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
    T = integer("lams_per_step", lams_per_step)
    eval_lams = integer("eval_lams", eval_lams)
    concentration = number("concentration", concentration, positive=True)
    choice("correction", correction, CORRECTIONS)
    choice("optimizer", optimizer, ("adam", "sgd"))
    cfg = TrainConfig(epochs=1, batch_size=integer("batch_size", batch_size), lr=number("lr", lr, positive=True),
                      optimizer=optimizer, momentum=0.9)
    check_data(x, y, cfg)
    if init is None:
        init = align_simplex(spec, ms, "universe", seed=seed).perms
    dev = torch.device(device) if device is not None else next(iter(ms[0].values())).device
    ms = [{k: v.detach().to(dev) for k, v in m.items()} for m in ms]
    x, y = x.to(dev), y.to(dev, torch.long)
    model = model.to(dev)
    eval_lam = sample_dirichlet(eval_lams, n, torch.Generator().manual_seed(seed + 7919))

    def score(vs: Sequence[Mapping[str, Tensor]]) -> float:
        if correction is not None:  # BN reset / REPAIR at every evaluation point, then eval mode
            ev = evaluate_simplex(model, vs, x, y, eval_lam, correction=correction, x_stats=x)
            return float(ev.loss.double().mean())
        # train mode: batch statistics of all of x at once (one input batch), as the steps use them
        m = evaluate_points(model, simplex_points(vs, eval_lam), x, y, train_mode=train_mode,
                            batch_size=x.shape[0] if train_mode else 4096)
        return float(m.loss.double().mean())

    return straight_through(model, spec, ms, x, y, init=init, cfg=cfg, steps=steps,
                            coefficients=lambda g: dirichlet(T, n, concentration, g), score=score, start="vertex",
                            rematch_every=rematch_every, eval_every=eval_every, train_mode=train_mode, seed=seed,
                            what="interior_alignment", progress=progress, desc=f"interior n={n}")


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
    elif method in ("universe", "sync-ascent"):
        um = "sync" if method == "universe" else method
        u = universe_alignment(spec, ms, method=um, seed=seed, restarts=restarts)
        perms = _anchor(u.to_universe)
        info = {"agreement": u.agreement}
    elif method == "c2m3":
        u = universe_alignment(spec, ms, method="c2m3", seed=seed)
        perms = _anchor(u.to_universe)
        r = u.c2m3
        info = {"objective": r.objective, "iterations": r.iterations, "best_iter": r.best_iter,
                "history": list(r.history), "seconds": r.seconds}
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


