"""Joint alignment of many models into one universe: C2M3's Frank–Wolfe and synchronisation by ascent.

Conventions (``reference/permutation.py``, ``reference/merge.py``): ``Uᵢ`` maps model i into the
universe, ``Uᵢ(θᵢ)`` are the aligned models, and the pairwise maps ``P_ij = Uᵢ⁻¹ ∘ Uⱼ`` (θⱼ into θᵢ's
labels, as ``weight_matching(θᵢ, θⱼ).perm``) are cycle-consistent by construction. As an index,
``Uᵢ(θᵢ)[c] = θᵢ[uᵢ[c]]``: universe unit c is unit ``uᵢ[c]`` of model i, and ``M(u)[c, uᵢ[c]] = 1``
is its matrix (``Permutation.apply`` along an axis is ``M(u) θ``).

**The all-pairs objective.** Weight matching of one pair maximises ``⟨θᵢ, P_ij(θⱼ)⟩``; summed over
all pairs in the universe,

    J(U) = Σ_{i<j} ⟨Uᵢ(θᵢ), Uⱼ(θⱼ)⟩ = ½ (‖Σᵢ Uᵢ(θᵢ)‖² − Σᵢ ‖Uᵢ(θᵢ)‖²)

over every floating entry (BatchNorm statistics included, as ``weight_matching``). ``J`` as a
function of one model's ``Uᵢ`` is weight matching of θᵢ against ``Σ_{j≠i} Uⱼ(θⱼ)``, the sum of the
others; that is exactly MergeMany's step (Ainsworth et al. 2023, Algorithm 3: align θᵢ to the mean of
the others), so MergeMany is block coordinate ascent of this same ``J``, one model at a time, while
C2M3 moves all models at once in a relaxation.

**C2M3** (Crisostomi et al., NeurIPS 2024, "C2M3: Cycle-Consistent Multi-Model Merging",
arXiv:2405.17897, §3 and Algorithm 1; ``frank_wolfe_universe``). Relax every ``M(Uᵢ)`` of a group g to
a matrix ``Xᵢᵍ`` in the convex hull of the permutations the spec allows (doubly stochastic; for a
GroupNorm group the hull of block permutations, for a head class that of head-coupled ones). The soft
map ``Xᵢ(θᵢ)`` applies ``Xᵢᵍ`` along every axis of g (a segmented axis: the block-diagonal matrix of
its segments), so the relaxed ``J(X)`` is a polynomial in the entries. Frank–Wolfe, for maximisation:

1. the gradient ``Gᵢᵍ = ∂J/∂Xᵢᵍ`` (autograd, float64);
2. the linear maximisation oracle ``Sᵢ = argmax_S Σ_g ⟨Gᵢᵍ, Sᵍ⟩`` over allowed permutations: one
   linear assignment per group (``reference.matching.solve_coupled``: GroupNorm blocks and head
   classes exactly), so the iterates stay in the hull of allowed permutations;
3. the duality gap ``Σ ⟨G, S − X⟩ ≥ 0`` (0 at a stationary point of the relaxation);
4. an exact line search: along ``X + t (S − X)``, ``J`` is a polynomial in t of degree at most
   ``2 d`` (d: the most permuted axes of one tensor), recovered exactly from ``2d + 1`` evaluations;
   t maximises it on [0, 1] (the paper uses a bounded scalar search). Because t = 0 is a candidate,
   the relaxed objective never decreases.

Iterations stop when the gap falls to ``tol · max(1, |J|)`` or after ``max_iter``. Every iterate is
projected to permutations (``solve_coupled(Xᵢ)``: the allowed permutation nearest in Frobenius norm,
i.e. of largest ``⟨Xᵢ, P⟩``), and the result is the projected iterate of highest discrete ``J`` (the
start's projection included). It is expressed in model 0's labels (``U₀`` = identity), a common
relabelling that changes no ``P_ij``. ``init="identity"`` starts every ``Xᵢ`` at the identity (the
paper's default); a list of permutations (e.g. MergeMany's, or the star's) starts there.

*Gauge.* ``J`` is unchanged when every ``Uᵢ`` is relabelled by one common Q, so one map can be held
fixed. The default holds model 0's map at its start (``fix=0``; its LMO step is skipped), which the
paper's Algorithm 1 does not: moving every map from the identity start is symmetric, and for two
models the first step often lands on ``½ (I + S)``, a stationary point whose projection ties back to
the identity. Measured on random two-model MLP pairs (``fix=None`` vs ``fix=0``): C2M3 ended below
weight matching's objective in 12 vs 3 of 20 pairs at 12-16-16-5 and 8 vs 1 of 20 at 12-48-48-48-5
(``fix=None`` keeps the paper's variant).

**Synchronisation by ascent** (``sync_ascent``). Given pairwise maps ``P_ij`` (not consistent in
general), find consistent ``Uᵢ`` that reproduce as many of them as possible: maximise the agreement

    A(U) = Σ_{pairs (i, j)} #{c : P_ij[uᵢ[c]] = uⱼ[c]}

(the count of universe units whose images in models i and j the input map pairs up; ``A = N (N−1)/2 ·
units`` iff the inputs were consistent and are reproduced). As a function of one ``uᵢ`` it is a linear
assignment, ``Cᵢ[c, a] = #{j : pair (i, j) maps unit a of model i to uⱼ[c]}``, solved exactly (heads
and blocks by ``solve_coupled``); sweeps over the models never decrease ``A`` and stop when no model
changes. It is the discrete counterpart of the spectral method (Pachauri et al. 2013), whose rounding
against model 0 returns the star's maps when the inputs are far from consistent
(``reference.merge.permutation_sync``); started from the spectral solution (default) or from any
universe, ascent measures and fixes that (``universe_alignment(method="sync-ascent")``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .matching import _soft_apply_except, matching_units, solve_coupled
from .merge import check_models, permutation_sync
from .params import Params, combine, float_keys
from .permutation import Permutation, PermutationSpec
from .validate import ArgumentTypeError, integer, number

__all__ = [
    "C2M3Result",
    "all_pairs_objective",
    "frank_wolfe_universe",
    "merged_in_universe",
    "pairwise_agreement",
    "relaxed_objective",
    "star_agreement",
    "sync_ascent",
    "to_anchor",
]


def _universe(spec: PermutationSpec, us: Sequence[Permutation], n: int, what: str = "to_universe") -> list[Permutation]:
    if isinstance(us, Permutation) or not isinstance(us, Sequence) or len(us) != n:
        raise ValueError(f"{what} must be a list of {n} permutations (one per model)")
    out = []
    for i, u in enumerate(us):
        if not isinstance(u, Permutation):
            raise ArgumentTypeError(f"{what}[{i}] must be a Permutation, got {type(u).__name__}")
        try:
            out.append(Permutation(u.to_dict(), spec))
        except ValueError as e:
            raise ValueError(f"{what}[{i}]: {e}") from None
    return out


def to_anchor(us: Sequence[Permutation], anchor: int = 0) -> list[Permutation]:
    """The same universe relabelled so that ``us[anchor]`` is the identity (``Uₐ⁻¹ ∘ Uᵢ``): every
    pairwise map ``Uᵢ⁻¹ ∘ Uⱼ`` is unchanged."""
    anchor = integer("anchor", anchor, 0, len(us) - 1)
    g = us[anchor].inverse()
    return [g.compose(u) for u in us]


def _pair_sum(aligned: Sequence[Mapping[str, Tensor]], keys: Sequence[str]) -> Tensor:
    """``Σ_{i<j} ⟨aᵢ, aⱼ⟩ = ½ (‖Σ aᵢ‖² − Σ ‖aᵢ‖²)`` (a float64 tensor, differentiable)."""
    total = None
    for k in keys:
        vs = [a[k] for a in aligned]
        s = sum(vs)
        term = 0.5 * (s.square().sum() - sum(v.square().sum() for v in vs))
        total = term if total is None else total + term
    return total if total is not None else torch.zeros((), dtype=torch.float64)


def all_pairs_objective(
    spec: PermutationSpec, params_list: Sequence[Mapping[str, Tensor]], to_universe: Sequence[Permutation]
) -> float:
    """``J(U) = Σ_{i<j} ⟨Uᵢ(θᵢ), Uⱼ(θⱼ)⟩`` over the floating entries: the sum over all pairs of the
    weight-matching objective of ``P_ij = Uᵢ⁻¹ ∘ Uⱼ`` (module docstring)."""
    pts = check_models(spec, params_list, 2)
    us = _universe(spec, to_universe, len(pts))
    keys = float_keys(pts[0])
    aligned = [{k: v.double() for k, v in u.apply(spec, p).items() if k in keys} for u, p in zip(us, pts, strict=True)]
    return float(_pair_sum(aligned, keys))


def _soft(spec: PermutationSpec, mats: Mapping[str, Tensor], p: Mapping[str, Tensor], keys: Sequence[str]) -> Params:
    return {k: _soft_apply_except(spec, mats, k, p[k], -1) for k in keys}


def relaxed_objective(
    spec: PermutationSpec, params_list: Sequence[Mapping[str, Tensor]], soft: Sequence[Mapping[str, Tensor]]
) -> float:
    """``J(X)`` of soft matrices ``soft[i][g]`` (``Xᵢᵍ``, applied along every axis of g); equal to
    ``all_pairs_objective`` when every ``Xᵢᵍ`` is the 0/1 matrix ``M(uᵢ)`` of a permutation."""
    pts = check_models(spec, params_list, 2)
    keys = float_keys(pts[0])
    ds = [{k: p[k].double() for k in keys} for p in pts]
    with torch.no_grad():
        return float(_pair_sum([_soft(spec, x, d, keys) for x, d in zip(soft, ds, strict=True)], keys))


def _degree(spec: PermutationSpec, keys: Sequence[str]) -> int:
    """Twice the most permuted axes of one tensor: the degree of J(X + t D) in t."""
    return 2 * max((sum(e is not None for e in spec.axes[k]) for k in keys), default=0)


def _onehot(idx: Tensor, like: Tensor) -> Tensor:
    n = idx.numel()
    m = torch.zeros(n, n, dtype=like.dtype, device=like.device)
    m[torch.arange(n, device=like.device), idx.to(like.device)] = 1.0
    return m


def _project(spec: PermutationSpec, mats: Mapping[str, Tensor], solver) -> dict[str, Tensor]:
    """The allowed permutation of largest ``Σ_g ⟨mats[g], M(P_g)⟩`` (heads and blocks respected)."""
    out: dict[str, Tensor] = {}
    for gs in matching_units(spec).values():
        out.update(solve_coupled({g: mats[g].detach().cpu() for g in gs}, spec, solver))
    return out


def _line_search(phi, degree: int) -> tuple[float, float]:
    """Maximise the polynomial ``phi`` of degree ``degree`` on [0, 1]: ``(t, phi(t))`` with the value
    predicted by the exact interpolant (the caller evaluates the true value at t)."""
    m = degree + 1
    ts = 0.5 - 0.5 * np.cos(np.pi * (np.arange(m) + 0.5) / m)  # Chebyshev nodes in (0, 1)
    vals = np.array([phi(float(t)) for t in ts])
    poly = np.polynomial.Polynomial.fit(ts, vals, degree, domain=[0.0, 1.0])
    cands = [0.0, 1.0]
    for r in poly.deriv().roots():
        if abs(r.imag) < 1e-9 and 0.0 < r.real < 1.0:
            cands.append(float(r.real))
    best = max(cands, key=lambda t: float(poly(t)))
    return best, float(poly(best))


@dataclass(frozen=True)
class C2M3Result:
    """``frank_wolfe_universe``'s output (module docstring).

    ``to_universe[i]`` maps model i into the universe (``to_universe[0]`` is the identity);
    ``objective``: the discrete all-pairs objective ``J(U)`` of the result; ``history``: the relaxed
    objective ``J(X)`` at the start and after every iteration (never decreasing); ``gaps`` and
    ``steps``: each iteration's Frank–Wolfe duality gap and line-search step; ``projected``: the
    discrete ``J`` of each iterate's projection to permutations (the start's first); ``best_iter``:
    the iterate whose projection was returned (0: the start's); ``seconds``: wall time.
    """

    to_universe: list[Permutation]
    objective: float
    history: tuple[float, ...]
    gaps: tuple[float, ...]
    steps: tuple[float, ...]
    projected: tuple[float, ...]
    best_iter: int
    converged: bool
    init: str
    seconds: float
    fix: int | None = 0
    soft: list[dict[str, Tensor]] = field(default_factory=list, repr=False)

    @property
    def iterations(self) -> int:
        return len(self.steps)


def frank_wolfe_universe(
    spec: PermutationSpec,
    params_list: Sequence[Mapping[str, Tensor]],
    *,
    init: str | Sequence[Permutation] = "identity",
    max_iter: int = 100,
    tol: float = 1e-6,
    solver: str = "scipy",
    fix: int | None = 0,
) -> C2M3Result:
    """C2M3 (Crisostomi et al. 2024): Frank–Wolfe over the relaxed universe maps (module docstring).

    ``init``: ``"identity"`` (every model's map starts at the identity) or a list of N permutations
    (``Uᵢ`` to start from, e.g. MergeMany's ``perms``). ``max_iter``: at most this many iterations
    (0: the start's projection). ``tol``: stop when the duality gap is at most ``tol · max(1, |J|)``.
    ``solver``: the assignment solver (``reference.matching.SOLVERS``). ``fix``: the model whose map
    is held at its start (default 0; module docstring, "Gauge"), or ``None`` to move every model's
    map as the paper's Algorithm 1 does. Works in float64 on the
    models' device. Raises ``ValueError`` for mismatched or non-finite models, a bad ``init``, or a
    spec with one tensor bilinear in two groups of a head class (the LMO solves a head class as one
    linear assignment; see ``weight_matching``).
    """
    from .matching import _check_separable

    pts = check_models(spec, params_list, 2)
    n = len(pts)
    max_iter = integer("max_iter", max_iter, 0)
    tol = number("tol", tol, minimum=0)
    if fix is not None:
        fix = integer("fix", fix, 0, n - 1)
    _check_separable(spec)
    t0 = time.perf_counter()
    keys = float_keys(pts[0])
    dev = pts[0][keys[0]].device if keys else torch.device("cpu")
    ds = [{k: p[k].double() for k in keys} for p in pts]
    sizes = spec.sizes
    if isinstance(init, str):
        if init != "identity":
            raise ValueError(f"init must be 'identity' or a list of {n} permutations, got {init!r}")
        start = [Permutation.identity(spec) for _ in pts]
        init_name = "identity"
    else:
        start = _universe(spec, init, n, "init")
        init_name = "given"
    eye = {g: torch.eye(s, dtype=torch.float64, device=dev) for g, s in sizes.items()}
    X = [{g: _onehot(u[g], eye[g]) for g in sizes} for u in start]
    degree = _degree(spec, keys)

    def relaxed(mats: Sequence[Mapping[str, Tensor]]) -> Tensor:
        return _pair_sum([_soft(spec, x, d, keys) for x, d in zip(mats, ds, strict=True)], keys)

    def discrete(us: Sequence[Permutation]) -> float:
        aligned = [u.apply(spec, {**p, **d}) for u, p, d in zip(us, pts, ds, strict=True)]
        return float(_pair_sum(aligned, keys))

    with torch.no_grad():
        J = float(relaxed(X))
    best_us, best_obj, best_iter = list(start), discrete(start), 0
    history, gaps, steps, projected = [J], [], [], [best_obj]
    converged = False
    for it in range(1, max_iter + 1):
        leaves = [{g: m.clone().requires_grad_(True) for g, m in x.items()} for x in X]
        obj = relaxed(leaves)
        if not obj.requires_grad:  # no tensor carries a group: nothing to align
            converged = True
            break
        gi = iter(torch.autograd.grad(obj, [m for x in leaves for m in x.values()]))
        G = [{g: next(gi) for g in x} for x in leaves]
        S = [X[i] if i == fix else {g: _onehot(idx, eye[g]) for g, idx in _project(spec, G[i], solver).items()}
             for i in range(n)]
        D = [{g: S[i][g] - X[i][g] for g in sizes} for i in range(n)]
        gap = float(sum((G[i][g] * D[i][g]).sum() for i in range(n) for g in sizes))
        gaps.append(gap)
        if gap <= tol * max(1.0, abs(J)):
            gaps.pop()
            converged = True
            break

        def phi(t: float, X=X, D=D) -> float:
            with torch.no_grad():
                return float(relaxed([{g: X[i][g] + t * D[i][g] for g in sizes} for i in range(n)]))

        t, _ = _line_search(phi, degree)
        new_X = [{g: X[i][g] + t * D[i][g] for g in sizes} for i in range(n)]
        new_J = phi(t)
        if new_J < J:  # the interpolant misled (rounding): keep the iterate, as t = 0 would
            t, new_X, new_J = 0.0, X, J
        X, J = new_X, new_J
        steps.append(t)
        history.append(J)
        us = [Permutation(_project(spec, x, solver), spec) for x in X]
        val = discrete(us)
        projected.append(val)
        if val > best_obj:
            best_us, best_obj, best_iter = us, val, it
        if t == 0.0:
            converged = True
            break
    out = to_anchor(best_us, 0)
    soft = [{g: m.detach() for g, m in x.items()} for x in X]
    return C2M3Result(out, best_obj, tuple(history), tuple(gaps), tuple(steps), tuple(projected), best_iter,
                      converged, init_name, time.perf_counter() - t0, fix, soft)


# ---------------------------------------------------------------------------------------------
# synchronisation of pairwise maps by coordinate ascent


def _pairs(pairwise: Mapping[tuple[int, int], Permutation], n: int, spec: PermutationSpec) -> dict:
    """Every pair i < j once, as the index of ``P_ij`` (θⱼ into θᵢ's labels), per group; a pair given
    in both directions must agree (``P_ji = P_ij⁻¹``)."""
    out: dict[tuple[int, int], dict[str, Tensor]] = {}
    for key, P in pairwise.items():
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                 for v in key)):
            raise ValueError(f"pairwise keys must be (i, j) model index pairs, got {key!r}")
        i, j = key
        if not (0 <= i < n and 0 <= j < n) or i == j:
            raise ValueError(f"pairwise key {key!r}: need two different model indices in [0, {n})")
        if not isinstance(P, Permutation):
            raise ArgumentTypeError(f"pairwise[{key!r}] must be a Permutation, got {type(P).__name__}")
        P = Permutation(P.to_dict(), spec)
        a, b, Q = (i, j, P) if i < j else (j, i, P.inverse())
        if (a, b) in out and any(not torch.equal(out[a, b][g], Q[g]) for g in spec.sizes):
            raise ValueError(f"pairwise maps for models {a} and {b} are given in both directions and disagree")
        out[a, b] = {g: Q[g].cpu() for g in spec.sizes}
    missing = [(i, j) for i in range(n) for j in range(i + 1, n) if (i, j) not in out]
    if missing:
        raise ValueError(f"pairwise permutations missing for model pairs {missing[:5]}")
    return out


def pairwise_agreement(to_universe: Sequence[Permutation], pairwise: Mapping[tuple[int, int], Permutation]) -> float:
    """The fraction of units, over the given pairs and every group, where ``Uᵢ⁻¹ ∘ Uⱼ`` equals the
    input ``P_ij`` (1.0: all inputs reproduced)."""
    same = total = 0
    for (i, j), P in pairwise.items():
        Q = to_universe[i].inverse().compose(to_universe[j])
        for g in P:
            same += int((P[g].cpu() == Q[g].cpu()).sum())
            total += P[g].numel()
    return same / total if total else 1.0


def star_agreement(to_universe: Sequence[Permutation], star: Sequence[Permutation]) -> float:
    """The fraction of units (models 1 … N−1, every group) where ``U₀⁻¹ ∘ Uᵢ`` equals the star's map
    ``star[i - 1]`` (weight matching of model i to model 0): 1.0 means the joint method returned
    the star."""
    same = total = 0
    for i, s in enumerate(star, start=1):
        Q = to_universe[0].inverse().compose(to_universe[i])
        for g in s:
            same += int((s[g].cpu() == Q[g].cpu()).sum())
            total += s[g].numel()
    return same / total if total else 1.0


def _agreement_count(us: Sequence[Mapping[str, Tensor]], pairs: Mapping, groups: Sequence[str]) -> int:
    c = 0
    for (i, j), P in pairs.items():
        for g in groups:
            c += int((P[g][us[i][g]] == us[j][g]).sum())
    return c


def sync_ascent(
    pairwise: Mapping[tuple[int, int], Permutation],
    num_models: int,
    spec: PermutationSpec,
    *,
    init: Sequence[Permutation] | None = None,
    max_sweeps: int = 100,
    seed: int = 0,
    solver: str = "scipy",
) -> tuple[list[Permutation], tuple[int, ...]]:
    """Cycle-consistent ``Uᵢ`` maximising the agreement with the pairwise maps (module docstring).

    ``pairwise[(i, j)]`` maps θⱼ into θᵢ's labels (every pair once, or in both directions, consistently).
    ``init``: the universe to start from (default: ``reference.merge.permutation_sync``'s spectral
    solution). Sweeps visit the models in an order drawn from ``numpy.random.default_rng(seed)``;
    at most ``max_sweeps``. Returns ``(us, history)``: ``us[0]`` the identity, ``history`` the
    agreement count ``A(U)`` at the start and after each sweep (never decreasing).
    """
    n = integer("num_models", num_models, 2)
    max_sweeps = integer("max_sweeps", max_sweeps, 0)
    seed = integer("seed", seed, None)
    pairs = _pairs(pairwise, n, spec)
    if init is None:
        init = permutation_sync(pairwise, n, spec)
    us = [u.to_dict() for u in _universe(spec, init, n, "init")]
    us = [{g: v.cpu() for g, v in u.items()} for u in us]
    sizes = spec.sizes
    groups = list(sizes)
    units = list(matching_units(spec).values())
    inv = {key: {g: torch.argsort(P[g]) for g in groups} for key, P in pairs.items()}
    history = [_agreement_count(us, pairs, groups)]
    rng = np.random.default_rng(seed)
    for _ in range(max_sweeps):
        changed = False
        for i in rng.permutation(n):
            i = int(i)
            C = {g: torch.zeros(sizes[g], sizes[g], dtype=torch.float64) for g in groups}
            rows = {g: torch.arange(sizes[g]) for g in groups}
            for j in range(n):
                if j == i:
                    continue
                for g in groups:
                    # pair (i, j), i < j: universe unit c agrees when uᵢ[c] = P_ij⁻¹[uⱼ[c]];
                    # pair (j, i): when uᵢ[c] = P_ji[uⱼ[c]]
                    a = inv[i, j][g][us[j][g]] if i < j else pairs[j, i][g][us[j][g]]
                    C[g][rows[g], a] += 1.0
            new = {}
            for gs in units:
                new.update(solve_coupled({g: C[g] for g in gs}, spec, solver))
            old_val = sum(float(C[g][rows[g], us[i][g]].sum()) for g in groups)
            new_val = sum(float(C[g][rows[g], new[g]].sum()) for g in groups)
            if new_val > old_val + 0.5:  # counts are integers
                us[i] = new
                changed = True
        history.append(_agreement_count(us, pairs, groups))
        if not changed:
            break
    return to_anchor([Permutation(u, spec) for u in us], 0), tuple(history)


# ---------------------------------------------------------------------------------------------
# merging in the universe


def merged_in_universe(
    spec: PermutationSpec,
    params_list: Sequence[Mapping[str, Tensor]],
    to_universe: Sequence[Permutation],
    *,
    anchor: int | None = 0,
) -> tuple[Params, list[Params]]:
    """``(merged, aligned)``: the aligned models ``Uᵢ(θᵢ)`` and their mean, mapped back into model
    ``anchor``'s labels (``Uₐ⁻¹ ∘ Uᵢ``; ``None``: the universe's labels, the same function). Integer
    buffers come from model 0. Repair the mean with ``reference.merge.repair(model, aligned,
    [1/N] * N, x)`` (BatchNorm nets: a BN reset)."""
    pts = check_models(spec, params_list, 1)
    us = _universe(spec, to_universe, len(pts))
    if anchor is not None:
        us = to_anchor(us, anchor)
    aligned = [u.apply(spec, p) for u, p in zip(us, pts, strict=True)]
    return combine([1.0 / len(pts)] * len(pts), aligned), aligned
