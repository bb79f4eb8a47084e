"""Properties of reference/universe.py: C2M3's Frank–Wolfe, synchronisation by ascent, the all-pairs objective.

Conventions (``reference/universe.py``): ``Uᵢ`` maps model i into the universe, ``P_ij = Uᵢ⁻¹ ∘ Uⱼ``
(θⱼ into θᵢ's labels), ``M(u)[c, u[c]] = 1`` is the matrix of a permutation index, and

    J(U) = Σ_{i<j} ⟨Uᵢ(θᵢ), Uⱼ(θⱼ)⟩ = Σ_{i<j} ⟨θᵢ, P_ij(θⱼ)⟩       (permutations are isometries)

is the all-pairs weight-matching objective that C2M3 (Crisostomi et al. 2024, arXiv:2405.17897) and
MergeMany (Ainsworth et al. 2023, Algorithm 3) both ascend.

- Cycle consistency ``P_ij ∘ P_jk = P_ik`` holds exactly (``Permutation.__eq__``) for every joint
  method, on the zoo point sets (MLP, VGG, ResNet, CNN1D; GroupNorm blocks) and on generated
  transformers with head-coupled attention (``strategies_arch``, traced spec).
- Every joint method keeps each model's function, ``f(Uᵢ(θᵢ), x) = f(θᵢ, x)``, train and eval mode.
- Frank–Wolfe never decreases the relaxed objective ``J(X)``; its gaps are ≥ 0 and steps in [0, 1];
  its ``objective`` is ``J`` of its maps; ``J(X)`` at 0/1 matrices is ``J(U)``.
- ``J(U)`` is the sum of the pairwise weight-matching objectives of ``P_ij``; ``to_anchor`` changes no
  ``P_ij`` and no ``J``.
- With two models, C2M3 started at weight matching's solution is at least as good as it.
- ``sync_ascent`` never decreases its agreement count and reproduces consistent inputs exactly.
- A converged MergeMany is a coordinate-wise fixed point of ``J``: weight matching of θᵢ against
  ``Σ_{j≠i} Uⱼ(θⱼ)`` from ``Uᵢ`` changes nothing, and ``J`` as a function of ``Uᵢ`` alone is that
  weight-matching objective plus a constant.

Tolerances. Identities between objectives hold in real arithmetic; in float64 they are compared at
``atol = 1e-12 · N · Σᵢ ‖θᵢ‖²`` (``_atol``): ``|J| ≤ (N−1)/2 · Σᵢ ‖θᵢ‖²`` by Cauchy–Schwarz, and the two
sides sum the same ≤ 10⁴ products in different orders (``½(‖Σ aᵢ‖² − Σ ‖aᵢ‖²)`` against ``Σ ⟨aᵢ, aⱼ⟩``),
so their difference is a few hundred ulps of that bound at most. Permutations are compared exactly.
"""

from __future__ import annotations

import itertools

import torch
from hypothesis import assume, event, given
from hypothesis import strategies as st

import reference.merge as merge  # looked up at call time (tests/test_mutation.py patches pairwise_from_universe)
import reference.specs as specs_module  # looked up at call time, as the strategies do
import reference.trace as trace
import reference.universe as universe  # looked up at call time (tests/test_mutation.py patches to_anchor)
from invariants import strategies as S
from invariants import strategies_arch as A
from invariants.support import assert_same_function, forward
from reference.matching import weight_matching, weight_matching_objective
from reference.params import float_keys
from reference.permutation import Permutation, PermutationSpec

RTOL = 1e-12
"""Relative rounding tolerance of float64 objective identities (module docstring)."""

JOINT_METHODS = ("c2m3", "sync-ascent", "star")
"""The methods added with ``reference/universe.py`` (``sync`` and ``mergemany``: ``props_merge.py``)."""

OPTIONS = {"c2m3": {"max_iter": 10}}
"""Small examples: C2M3 stops after 10 Frank–Wolfe iterations here."""


# ---------------------------------------------------------------------------------------------
# strategies and helpers
# ---------------------------------------------------------------------------------------------
zoo_sets = S.point_sets(n=st.integers(2, 4), kinds=["normal", "default", "sgd"])


@st.composite
def attention_sets(draw: st.DrawFn) -> S.PointSet:
    """2–3 points of one generated transformer with ≥ 2 heads of ≥ 2 units (a head class of Q/K and
    V/O groups, blocks = head_dim), the spec traced (``trace_spec``, looked up at draw time)."""
    case = draw(A.transformers(heads=(2, 3), head_dims=(2, 3), dims=(2, 6), tokens=(2, 4)))
    k = draw(st.integers(2, 3))
    seeds = draw(st.lists(S.seeds, min_size=k - 1, max_size=k - 1))
    points = [case.params] + [A.random_point(case.model, s) for s in seeds]
    spec = trace.trace_spec(case.model, case.x)
    labels = ("state_dict", *(f"random_point({s})" for s in seeds))
    return S.PointSet(case.model, points, spec, case.x, labels)


@st.composite
def specs(draw: st.DrawFn) -> PermutationSpec:
    """The spec of a zoo architecture (GroupNorm blocks) or of a generated transformer (head classes)."""
    if draw(st.booleans()):
        return specs_module.spec_for(draw(S.archs()).build())
    case = draw(A.transformers(heads=(1, 3), head_dims=(1, 3), dims=(2, 6)))
    return trace.trace_spec(case.model, case.x)


def _universe(spec: PermutationSpec, n: int, seed: int) -> list[Permutation]:
    """n independent uniformly random maps ``Uᵢ`` (blocks and heads respected)."""
    return [Permutation.random(spec, seed + i) for i in range(n)]


def _atol(points) -> float:
    """``1e-12 · N · Σᵢ ‖θᵢ‖²`` over the floating entries (module docstring)."""
    scale = sum(float(p[k].double().square().sum()) for p in points for k in float_keys(p))
    return RTOL * len(points) * max(1.0, scale)


def _onehot(spec: PermutationSpec, u: Permutation) -> dict[str, torch.Tensor]:
    """``M(u)[c, u[c]] = 1`` for every group (float64)."""
    out = {}
    for g, n in spec.sizes.items():
        m = torch.zeros(n, n, dtype=torch.float64)
        m[torch.arange(n), u[g]] = 1.0
        out[g] = m
    return out


def _assert_cycle_consistent(us, spec: PermutationSpec) -> None:
    """Every ``Uᵢ`` a valid permutation of ``spec``; ``P_ij ∘ P_jk = P_ik`` exactly for all i, j, k."""
    n = len(us)
    for u in us:
        Permutation(u.to_dict(), spec)
    P = {(i, j): merge.pairwise_from_universe(us, i, j) for i in range(n) for j in range(n)}
    for i, j, k in itertools.product(range(n), repeat=3):
        assert P[i, j].compose(P[j, k]) == P[i, k], f"P_{i}{j} ∘ P_{j}{k} ≠ P_{i}{k}"


def _align(ps: S.PointSet, method: str, seed: int) -> merge.UniverseResult:
    return merge.universe_alignment(ps.spec, ps.points, method=method, seed=seed, **OPTIONS.get(method, {}))


# ---------------------------------------------------------------------------------------------
# cycle consistency and function preservation
# ---------------------------------------------------------------------------------------------
@given(ps=zoo_sets, method=st.sampled_from(JOINT_METHODS), seed=st.integers(0, 100))
def test_joint_universe_is_cycle_consistent(ps: S.PointSet, method: str, seed: int) -> None:
    """C2M3 (Crisostomi et al. 2024), synchronisation by ascent and the star all return one universe:
    with P_ij = Uᵢ⁻¹ ∘ Uⱼ, P_ij ∘ P_jk = P_ik exactly for all i, j, k (by construction), every Uᵢ
    respects the spec's GroupNorm blocks, and U₀ = id (the universe carries model 0's labels)."""
    u = _align(ps, method, seed)
    assert len(u.to_universe) == len(ps.points)
    assert u.to_universe[0].is_identity()
    _assert_cycle_consistent(u.to_universe, ps.spec)


@given(ps=attention_sets(), method=st.sampled_from(JOINT_METHODS), seed=st.integers(0, 100))
def test_joint_universe_is_cycle_consistent_on_attention(ps: S.PointSet, method: str, seed: int) -> None:
    """As ``test_joint_universe_is_cycle_consistent`` on transformers with the traced spec: P_ij ∘ P_jk =
    P_ik exactly, and every Uᵢ moves the heads of a head class as wholes, one head permutation for Q/K
    and V/O (``Permutation(u, spec)`` validates heads and blocks)."""
    u = _align(ps, method, seed)
    assert u.to_universe[0].is_identity()
    _assert_cycle_consistent(u.to_universe, ps.spec)


def _assert_keeps_functions(ps: S.PointSet, us) -> None:
    for i, (U, theta) in enumerate(zip(us, ps.points, strict=True)):
        moved = U.apply(ps.spec, theta)
        for train in (False, True):
            ref = forward(ps.model, theta, ps.x, train)
            assert_same_function(forward(ps.model, moved, ps.x, train), ref, f"model {i}, train={train}")


@given(ps=zoo_sets, method=st.sampled_from(merge.UNIVERSE_METHODS), seed=st.integers(0, 100))
def test_every_joint_method_keeps_each_function(ps: S.PointSet, method: str, seed: int) -> None:
    """Ainsworth et al. 2023, Eq. (1), for every universe method: f(Uᵢ(θᵢ), x) = f(θᵢ, x) in eval mode
    (BatchNorm running statistics moved) and train mode, float64 tolerance (``support.py``)."""
    _assert_keeps_functions(ps, _align(ps, method, seed).to_universe)


@given(ps=attention_sets(), method=st.sampled_from(merge.UNIVERSE_METHODS), seed=st.integers(0, 100))
def test_every_joint_method_keeps_each_function_on_attention(ps: S.PointSet, method: str, seed: int) -> None:
    """Eq. (1) on generated transformers (traced spec, head classes): f(Uᵢ(θᵢ), x) = f(θᵢ, x), train and
    eval mode, for every universe method."""
    _assert_keeps_functions(ps, _align(ps, method, seed).to_universe)


# ---------------------------------------------------------------------------------------------
# the all-pairs objective and its relaxation
# ---------------------------------------------------------------------------------------------
@given(ps=zoo_sets | attention_sets(), u_seed=S.perm_seeds)
def test_all_pairs_objective_is_the_sum_of_pairwise_objectives(ps: S.PointSet, u_seed: int) -> None:
    """J(U) = Σ_{i<j} ⟨Uᵢ(θᵢ), Uⱼ(θⱼ)⟩ = Σ_{i<j} WM_obj(θᵢ, θⱼ; P_ij), P_ij = Uᵢ⁻¹ ∘ Uⱼ
    (``pairwise_from_universe``), for random universes: permutations are isometries,
    ⟨Uᵢ a, Uⱼ b⟩ = ⟨a, Uᵢ⁻¹ Uⱼ b⟩ (universe.py docstring)."""
    us = _universe(ps.spec, len(ps.points), u_seed)
    n = len(ps.points)
    pairwise = sum(
        weight_matching_objective(ps.spec, ps.points[i], ps.points[j], merge.pairwise_from_universe(us, i, j))
        for i in range(n)
        for j in range(i + 1, n)
    )
    got = universe.all_pairs_objective(ps.spec, ps.points, us)
    assert abs(got - pairwise) <= _atol(ps.points), (got, pairwise)


@given(ps=zoo_sets | attention_sets(), u_seed=S.perm_seeds, anchor=st.integers(0, 3))
def test_to_anchor_changes_no_pairwise_map(ps: S.PointSet, u_seed: int, anchor: int) -> None:
    """``to_anchor(U, a)ᵢ = Uₐ⁻¹ ∘ Uᵢ`` is a common relabelling of the universe: its a-th map is the
    identity, and every P_ij = Uᵢ⁻¹ ∘ Uⱼ = (Uₐ⁻¹ Uᵢ)⁻¹ (Uₐ⁻¹ Uⱼ) is unchanged (exactly), hence so is J."""
    n = len(ps.points)
    a = anchor % n
    us = _universe(ps.spec, n, u_seed)
    vs = universe.to_anchor(us, a)
    assert vs[a].is_identity()
    for i in range(n):
        for j in range(n):
            assert vs[i].inverse().compose(vs[j]) == us[i].inverse().compose(us[j]), f"P_{i}{j} changed"
    j0, j1 = universe.all_pairs_objective(ps.spec, ps.points, us), universe.all_pairs_objective(ps.spec, ps.points, vs)
    assert abs(j0 - j1) <= _atol(ps.points)


@given(ps=zoo_sets | attention_sets(), u_seed=S.perm_seeds)
def test_relaxed_objective_at_permutation_matrices_is_the_discrete_one(ps: S.PointSet, u_seed: int) -> None:
    """C2M3's relaxation (§3): J(X) with every Xᵢᵍ = M(uᵢᵍ), the 0/1 matrix of a permutation, equals
    J(U) (``M(u) θ`` along an axis is ``Permutation.apply``; a segmented axis applies it per segment)."""
    us = _universe(ps.spec, len(ps.points), u_seed)
    soft = [_onehot(ps.spec, u) for u in us]
    got = universe.relaxed_objective(ps.spec, ps.points, soft)
    want = universe.all_pairs_objective(ps.spec, ps.points, us)
    assert abs(got - want) <= _atol(ps.points), (got, want)


# ---------------------------------------------------------------------------------------------
# Frank–Wolfe
# ---------------------------------------------------------------------------------------------
def _check_frank_wolfe(ps: S.PointSet, max_iter: int) -> universe.C2M3Result:
    r = universe.frank_wolfe_universe(ps.spec, ps.points, max_iter=max_iter)
    atol = _atol(ps.points)
    h = r.history
    assert len(h) == r.iterations + 1 == len(r.projected) and len(r.gaps) == r.iterations <= max_iter
    for k in range(len(h) - 1):
        assert h[k + 1] >= h[k] - RTOL * abs(h[k]), f"relaxed J decreased at iteration {k + 1}: {h[k]} → {h[k + 1]}"
    assert all(gap >= -atol for gap in r.gaps), r.gaps
    assert all(0.0 <= t <= 1.0 for t in r.steps), r.steps
    assert 0 <= r.best_iter <= r.iterations and r.objective == r.projected[r.best_iter] == max(r.projected)
    assert r.to_universe[0].is_identity()
    assert abs(r.objective - universe.all_pairs_objective(ps.spec, ps.points, r.to_universe)) <= atol
    # the last iterate is in the hull of the allowed permutations (doubly stochastic) and J(X) is history[-1]
    for i, x in enumerate(r.soft):
        for g, m in x.items():
            assert bool((m >= -1e-12).all()), f"model {i}, group {g}: negative entries"
            for dim in (0, 1):
                torch.testing.assert_close(m.sum(dim), torch.ones(m.shape[0], dtype=m.dtype), rtol=0, atol=1e-12)
    assert abs(universe.relaxed_objective(ps.spec, ps.points, r.soft) - h[-1]) <= atol
    return r


@given(ps=zoo_sets, max_iter=st.integers(0, 15))
def test_frank_wolfe_never_decreases_the_relaxed_objective(ps: S.PointSet, max_iter: int) -> None:
    """C2M3, Algorithm 1 (Frank–Wolfe with an exact line search over t ∈ [0, 1], t = 0 a candidate):
    J(X_{k+1}) ≥ J(X_k) (``history``, relative 1e-12); the duality gap Σ ⟨G, S − X⟩ ≥ 0 (S maximises
    ⟨G, ·⟩ over the allowed permutations, X lies in their hull); steps t ∈ [0, 1]; the returned
    objective is J of the returned maps and the best projection (``projected``); the last iterate X is
    doubly stochastic, with J(X) = history[-1]."""
    _check_frank_wolfe(ps, max_iter)


@given(ps=attention_sets(), max_iter=st.integers(1, 10))
def test_frank_wolfe_never_decreases_the_relaxed_objective_on_attention(ps: S.PointSet, max_iter: int) -> None:
    """As above on transformers: the LMO solves a head class jointly, so iterates stay in the hull of
    head-coupled permutations; J(X) non-decreasing, gaps ≥ 0, t ∈ [0, 1], objective = J(U)."""
    _check_frank_wolfe(ps, max_iter)


@given(ps=S.point_sets(n=2, kinds=["normal", "default", "sgd"]), max_iter=st.integers(0, 15), seed=st.integers(0, 100))
def test_c2m3_from_weight_matching_is_at_least_weight_matching(ps: S.PointSet, max_iter: int, seed: int) -> None:
    """With two models J(U₀, U₁) = WM_obj(θ₀, θ₁; U₀⁻¹ ∘ U₁), so C2M3 started at (id, WM(θ₀, θ₁)) has
    that objective at its start's projection, and it returns the best projection it saw (the start's
    included): J(C2M3) ≥ J(WM) (float64 tolerance). The default identity start is only *measured*
    (``event``: hypothesis statistics), not asserted."""
    a, b = ps.points
    wm = weight_matching(ps.spec, a, b, seed=seed)
    r = universe.frank_wolfe_universe(ps.spec, ps.points, init=[Permutation.identity(ps.spec), wm.perm],
                                      max_iter=max_iter)
    atol = _atol(ps.points)
    assert r.init == "given"
    assert abs(r.projected[0] - wm.objective) <= atol, (r.projected[0], wm.objective)
    assert r.objective >= wm.objective - atol, (r.objective, wm.objective)
    plain = universe.frank_wolfe_universe(ps.spec, ps.points, max_iter=max_iter)
    event("identity start: below weight matching" if plain.objective < wm.objective - atol
          else "identity start: at least weight matching")


# ---------------------------------------------------------------------------------------------
# synchronisation by ascent
# ---------------------------------------------------------------------------------------------
@given(spec=specs(), n=st.integers(2, 5), seed=S.perm_seeds, sweep_seed=st.integers(0, 100))
def test_sync_ascent_never_decreases_the_agreement(spec: PermutationSpec, n: int, seed: int, sweep_seed: int) -> None:
    """Synchronisation by ascent on independent random P_ij (far from consistent): the agreement count
    A(U) = Σ_{i<j} #{c : P_ij[uᵢ[c]] = uⱼ[c]} never decreases over sweeps (exact integers), starts at
    the spectral solution's, and the returned maps have A = history[-1] (``pairwise_agreement`` ×
    pairs × units), U₀ = id and are cycle-consistent."""
    pairwise = {(i, j): Permutation.random(spec, seed + n * i + j) for i in range(n) for j in range(i + 1, n)}
    us, history = universe.sync_ascent(pairwise, n, spec, seed=sweep_seed)
    assert all(b >= a for a, b in itertools.pairwise(history)), history
    total = len(pairwise) * sum(spec.sizes.values())
    spectral = merge.permutation_sync(pairwise, n, spec)
    assert history[0] == round(universe.pairwise_agreement(spectral, pairwise) * total)
    assert history[-1] == round(universe.pairwise_agreement(us, pairwise) * total)
    assert us[0].is_identity()
    _assert_cycle_consistent(us, spec)


@given(spec=specs(), n=st.integers(2, 5), seed=S.perm_seeds, both=st.booleans(), sweep_seed=st.integers(0, 100))
def test_sync_ascent_reproduces_consistent_inputs(spec: PermutationSpec, n: int, seed: int, both: bool,
                                                  sweep_seed: int) -> None:
    """Consistent inputs P_ij = Vᵢ⁻¹ ∘ Vⱼ of a random universe V (optionally each pair also given as
    P_ji = P_ij⁻¹): from the spectral start, ascent returns U with Uᵢ⁻¹ ∘ Uⱼ = P_ij exactly for every
    pair (agreement 1.0, A = N(N−1)/2 · units, its maximum)."""
    vs = _universe(spec, n, seed)
    pairwise = {(i, j): vs[i].inverse().compose(vs[j]) for i in range(n) for j in range(i + 1, n)}
    if both:
        pairwise.update({(j, i): P.inverse() for (i, j), P in list(pairwise.items())})
    us, history = universe.sync_ascent(pairwise, n, spec, seed=sweep_seed)
    assert universe.pairwise_agreement(us, pairwise) == 1.0
    assert history[-1] == n * (n - 1) // 2 * sum(spec.sizes.values())
    for i in range(n):
        for j in range(n):
            assert us[i].inverse().compose(us[j]) == vs[i].inverse().compose(vs[j]), f"P_{i}{j} not reproduced"


@given(ps=zoo_sets, seed=st.integers(0, 100))
def test_sync_ascent_agrees_at_least_as_well_as_the_spectral_method(ps: S.PointSet, seed: int) -> None:
    """``universe_alignment(method="sync-ascent")`` starts at ``"sync"``'s spectral solution of the same
    weight-matching P_ij and never decreases A(U): its agreement is ≥ sync's, and ``ascent[0]`` is
    sync's agreement count."""
    s = merge.universe_alignment(ps.spec, ps.points, method="sync", seed=seed)
    a = merge.universe_alignment(ps.spec, ps.points, method="sync-ascent", seed=seed)
    total = len(a.pairwise) * sum(ps.spec.sizes.values())
    assert all(s.pairwise[key] == P for key, P in a.pairwise.items())
    assert a.ascent[0] == round(s.agreement * total)
    assert a.agreement >= s.agreement


# ---------------------------------------------------------------------------------------------
# MergeMany and C2M3 ascend the same objective
# ---------------------------------------------------------------------------------------------
@given(ps=S.point_sets(n=st.integers(2, 4), kinds=["normal", "default", "sgd"]), seed=st.integers(0, 100),
       q_seed=S.perm_seeds)
def test_mergemany_fixed_point_is_coordinatewise_optimal_for_the_all_pairs_objective(
    ps: S.PointSet, seed: int, q_seed: int
) -> None:
    """universe.py docstring: as a function of one map, J(U) = WM_obj(Σ_{j≠i} Uⱼ(θⱼ), θᵢ; Uᵢ) + const,
    so for any Q, J(U with Uᵢ := Q) − J(U) = WM_obj(σᵢ, θᵢ; Q) − WM_obj(σᵢ, θᵢ; Uᵢ), σᵢ = Σ_{j≠i} Uⱼ(θⱼ)
    (float64 tolerance); and MergeMany (Ainsworth et al. 2023, Alg. 3; tol = 0) stops only when a sweep
    changes no model, so at its result weight matching of θᵢ against σᵢ started at Uᵢ (the sum rather
    than the mean: the same maximiser) returns Uᵢ with its starting objective, for every i."""
    r = merge.merge_many(ps.spec, ps.points, seed=seed, tol=0.0)
    assume(r.converged and r.changed[-1] == 0)  # not max_iter sweeps without settling
    us = list(r.perms)
    n = len(ps.points)
    atol = _atol(ps.points)
    base = universe.all_pairs_objective(ps.spec, ps.points, us)
    for i in range(n):
        theta = ps.points[i]
        keys = float_keys(theta)
        aligned = [us[j].apply(ps.spec, ps.points[j]) for j in range(n) if j != i]
        sigma = {**theta, **{k: sum(a[k] for a in aligned) for k in keys}}  # integer buffers: model i's
        wm = weight_matching(ps.spec, sigma, theta, init=us[i], seed=seed)
        assert wm.perm == us[i], f"model {i}: weight matching against the others' sum moved MergeMany's map"
        assert wm.objective == wm.history[0]
        Q = Permutation.random(ps.spec, q_seed + i)
        moved = us[:i] + [Q] + us[i + 1:]
        lhs = universe.all_pairs_objective(ps.spec, ps.points, moved) - base
        rhs = weight_matching_objective(ps.spec, sigma, theta, Q) - weight_matching_objective(ps.spec, sigma, theta,
                                                                                               us[i])
        assert abs(lhs - rhs) <= atol, (i, lhs, rhs)
