"""Properties of reference/merge.py: universe alignment, MergeMany, REPAIR.

- Universe alignment is cycle-consistent *by construction* (``P_ij = Uᵢ⁻¹ ∘ Uⱼ``), for any
  inputs — not only when pairwise matching happens to be transitive: checked exactly
  (``Permutation.__eq__``) on every triple, for permutation synchronisation and MergeMany.
- MergeMany's merged function does not depend on how an input model's units are labelled: its
  canonical start (units sorted by weight norm) forgets labels, so the same sweeps run on the same
  tensors. Exact in real arithmetic *up to ties* of the sort keys and of the assignment problems;
  weights are N(0, 1) (general position), and the merged points are compared at the float64
  functional tolerance (``support.py``) and parameter-wise at 1e-12 relative.
- REPAIR at an endpoint (k = eᵢ) measures the endpoint's own statistics as its target, so every
  correction is the identity (scale 1, shift 0) and the endpoint comes back; for BatchNorm nets
  REPAIR is the BatchNorm reset, so it returns ``bn_reset(θᵢ)``.
- REPAIR hits its target: at any convex k the repaired pre-activation statistics of a biased MLP
  are Σ kᵢ (μᵢ, σᵢ).
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from invariants import strategies as S
from invariants.support import assert_same_function, forward
from reference.bn import recompute_bn_stats
from reference.merge import channel_statistics, merge_many, pairwise_from_universe, repair, universe_alignment
from reference.permutation import Permutation


def _assert_cycle_consistent(us, spec) -> None:
    n = len(us)
    for u in us:
        Permutation(u.to_dict(), spec)  # a valid permutation of the spec (GroupNorm blocks kept)
    for i in range(n):
        for j in range(n):
            p_ij = pairwise_from_universe(us, i, j)
            for k in range(n):
                lhs = p_ij.compose(pairwise_from_universe(us, j, k))
                assert lhs == pairwise_from_universe(us, i, k), f"P_{i}{j} ∘ P_{j}{k} ≠ P_{i}{k}"


@given(ps=S.point_sets(n=st.integers(3, 4), kinds=["normal", "default", "sgd"]), seed=st.integers(0, 100))
def test_sync_universe_is_cycle_consistent(ps: S.PointSet, seed: int) -> None:
    """Pachauri et al. 2013 (permutation synchronisation): with P_ij = Uᵢ⁻¹ ∘ Uⱼ,
    P_ij ∘ P_jk = P_ik exactly for all i, j, k, and U₀ = id (the universe carries model 0's labels)."""
    u = universe_alignment(ps.spec, ps.points, method="sync", seed=seed)
    assert u.to_universe[0].is_identity()
    assert 0.0 <= u.agreement <= 1.0
    _assert_cycle_consistent(u.to_universe, ps.spec)


@given(ps=S.point_sets(n=st.integers(2, 4), kinds=["normal", "default", "sgd"]), seed=st.integers(0, 100))
def test_mergemany_universe_is_cycle_consistent(ps: S.PointSet, seed: int) -> None:
    """Ainsworth et al. 2023, Algorithm 3 as a universe: Uᵢ = perms[i] (into the merged model),
    P_ij ∘ P_jk = P_ik exactly; the merged point is (1/N) Σ Uᵢ(θᵢ)."""
    u = universe_alignment(ps.spec, ps.points, method="mergemany", seed=seed)
    _assert_cycle_consistent(u.to_universe, ps.spec)
    aligned = [U.apply(ps.spec, p) for U, p in zip(u.to_universe, ps.points, strict=True)]
    n = len(aligned)
    for k, v in u.merge.merged.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, sum(a[k] for a in aligned) / n, rtol=1e-12, atol=1e-12)


@given(
    ps=S.point_sets(n=st.integers(2, 4), kinds=["normal"]),
    which=st.integers(0, 3),
    q_seed=S.perm_seeds,
    seed=st.integers(0, 100),
)
def test_merge_many_invariant_to_relabelling_an_input(ps: S.PointSet, which: int, q_seed: int, seed: int) -> None:
    """MergeMany (Ainsworth et al. 2023, Algorithm 3, canonical start): for any permutation Q,
    f(merge(θ₁, …, Q(θ_k), …, θ_N), x) = f(merge(θ₁, …, θ_N), x) (up to ties; N(0, 1) weights).
    In the sweeps' own frame (``anchor=None``) the merged points are equal, and perms'[k] = perms[k] ∘ Q⁻¹."""
    k = which % len(ps.points)
    Q = Permutation.random(ps.spec, q_seed)
    moved = list(ps.points)
    moved[k] = Q.apply(ps.spec, ps.points[k])
    for anchor in (None, 0):
        r = merge_many(ps.spec, ps.points, seed=seed, anchor=anchor)
        rq = merge_many(ps.spec, moved, seed=seed, anchor=anchor)
        for train in (False, True):
            ref = forward(ps.model, r.merged, ps.x, train)
            assert_same_function(forward(ps.model, rq.merged, ps.x, train), ref, f"anchor={anchor} train={train}")
        if anchor is None:
            assert rq.perms[k] == r.perms[k].compose(Q.inverse())
            for key, v in r.merged.items():
                torch.testing.assert_close(rq.merged[key], v, rtol=1e-12, atol=1e-12)


@given(ps=S.point_sets(n=2, kinds=["default", "sgd", "normal"]), end=st.integers(0, 1), seed=S.seeds)
def test_repair_at_an_endpoint_returns_it(ps: S.PointSet, end: int, seed: int) -> None:
    """REPAIR (Jordan et al. 2023, §4) at k = e_end: the targets Σ kᵢ (μᵢ, σᵢ) are θ_end's own
    statistics, so repair(θ₁, θ₂; e_end) = θ_end (the function, float64 tolerance); with BatchNorm,
    REPAIR is the reset: = recompute_bn_stats(θ_end)."""
    x = torch.randn(16, *ps.x.shape[1:], dtype=ps.x.dtype, generator=torch.Generator().manual_seed(seed))
    coeffs = [1.0, 0.0] if end == 0 else [0.0, 1.0]
    r = repair(ps.model, ps.points, coeffs, x, spec=ps.spec)
    target = ps.points[end]
    if any(k.endswith("running_mean") for k in target):
        target = recompute_bn_stats(ps.model, target, x)
    for train in (False, True):
        assert_same_function(forward(ps.model, r, x, train), forward(ps.model, target, x, train), f"train={train}")


@given(
    arch=S.mlp_archs(max_depth=3, widths=(3, 8)),
    kseeds=st.lists(S.seeds, min_size=2, max_size=4),
    lam=st.data(),
    data_seed=S.seeds,
)
def test_repair_hits_interpolated_statistics(arch: S.Arch, kseeds: list[int], lam, data_seed: int) -> None:
    """REPAIR (Jordan et al. 2023, §4, Eq. (3)) at any convex k on an MLP with biases: every
    pre-activation channel of the repaired point has mean Σ kᵢ μᵢ and std Σ kᵢ σᵢ on the repair
    data (float64, 1e-8), layers repaired in forward order."""
    cfg = {**arch.config, "bias": True}
    arch = S.Arch(cfg, arch.input_shape)
    model = arch.build().double()
    pts = [
        {k: v.double() if v.is_floating_point() else v for k, v in S.weights(model, arch, "default", s).items()}
        for s in kseeds
    ]
    coeffs = list(lam.draw(S.barycentric(len(pts))))
    coeffs[-1] = 1.0 - sum(coeffs[:-1])
    if coeffs[-1] < 0:  # rounding of the Dirichlet draw
        coeffs[-1] = 0.0
    x = torch.randn(128, *arch.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(data_seed))
    rep = repair(model, pts, coeffs, x)
    got = channel_statistics(model, rep, x)
    ends = [channel_statistics(model, p, x) for p in pts]
    for n, (mu, sd) in got.items():
        if bool((sd < 1e-6).any()):  # a constant channel at θ can only be shifted (documented)
            continue
        mu_t = sum(c * e[n][0] for c, e in zip(coeffs, ends, strict=True))
        sd_t = sum(c * e[n][1] for c, e in zip(coeffs, ends, strict=True))
        torch.testing.assert_close(mu, mu_t, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(sd, sd_t, rtol=1e-8, atol=1e-8)
