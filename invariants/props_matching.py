"""Property 4: weight matching and activation matching (Ainsworth et al. 2023, Git Re-Basin §3).

Weight matching maximises J(R) = Σ_k ⟨θ_a[k], R(θ_b)[k]⟩ by coordinate ascent over the groups (one
exact linear assignment per group, groups in a seeded random order). For θ_b = P(θ_a) with θ_a in
general position (every entry N(0, 1): no ties), J(R) = ⟨θ_a, (R ∘ P)(θ_a)⟩ ≤ ‖θ_a‖² by
Cauchy–Schwarz, with equality iff (R ∘ P)(θ_a) = θ_a iff R = P⁻¹: the global maximiser is unique.

What is a theorem and what is measured:

- one group (MLP of depth 1, VGG / CNN1D with one conv, any norm): one assignment is solved exactly,
  so weight matching returns P⁻¹ (theorem);
- P⁻¹ is a fixed point: started there (``init=P⁻¹``) it stays (theorem);
- any number of groups: J(R) ≤ ‖θ‖², and J(R) = ‖θ‖² only for R = P⁻¹ (theorem);
- several groups, started at the identity: coordinate ascent has no global guarantee. On the
  default (narrow) strategies it stopped at a local optimum in 29 of 300 draws (MLPs with 2–8 units
  and 3–6 inputs: 24 of 108), typically a transposition shared by two adjacent layers; on MLPs
  with 16–20 inputs and 6–10 units still 12 of 670 with 3 restarts. On the conv families at the
  sizes of ``archs(wide=True)`` (3–4 input channels, 6–10 channels or ResNet base 4–6, kernels
  ≥ 3) we measured 5 misses in 6,000 draws with one group order and none in 8,200 with 3
  restarts: the multi-group recovery property runs there, with ``restarts=3``. It is a measured
  property, not a theorem: a failure under the ``thorough`` profile would be such a local optimum
  (the message lists the misaligned units per group).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from invariants import strategies as S
from invariants.support import assert_same_function, forward
from reference.matching import activation_matching, weight_matching, weight_matching_objective
from reference.permutation import Permutation


@st.composite
def _one_group_archs(draw: st.DrawFn) -> S.Arch:
    """Architectures with exactly one permutation group (depth-1 MLP, one-conv VGG / CNN1D)."""
    fam = draw(st.sampled_from(["mlp", "vgg", "cnn1d"]))
    if fam == "mlp":
        return draw(S.mlp_archs(max_depth=1))
    if fam == "vgg":
        return draw(S.vgg_archs(max_convs=1))
    return draw(S.cnn1d_archs(max_convs=1))


@st.composite
def _permuted_copy(draw: st.DrawFn, arch_strategy: st.SearchStrategy[S.Arch]):
    """(case, P): θ_a in general position (N(0, 1) entries) and a random permutation P."""
    case = S.build_case(draw(arch_strategy), "normal", draw(S.seeds))
    return case, Permutation.random(case.spec, draw(S.perm_seeds))


def _norm2(params) -> float:
    return float(sum((v.double() ** 2).sum() for v in params.values() if v.is_floating_point()))


def _describe(r, P: Permutation) -> str:
    return f"units left misaligned per group: {(r.perm @ P).num_moved()}, history {r.history}"


@given(args=_permuted_copy(_one_group_archs()), order_seed=st.integers(0, 100))
def test_weight_matching_recovers_inverse_one_group(args, order_seed: int) -> None:
    """Ainsworth et al. 2023, Algorithm 1 / Eq. (3) (a linear assignment problem, solved exactly):
    for one permutation group, weight_matching(θ, P(θ)) = P⁻¹."""
    case, P = args
    r = weight_matching(case.spec, case.params, P.apply(case.spec, case.params), seed=order_seed)
    assert r.perm == P.inverse(), _describe(r, P)


@given(args=_permuted_copy(S.archs(["vgg", "resnet", "cnn1d"], wide=True)))
def test_weight_matching_recovers_inverse(args) -> None:
    """Ainsworth et al. 2023, §3.2 (Algorithm 1, best of 3 group orders): weight_matching(θ, P(θ))
    = P⁻¹ for conv nets with several groups, residual streams and every norm (measured, not a
    theorem: see the module docstring)."""
    case, P = args
    r = weight_matching(case.spec, case.params, P.apply(case.spec, case.params), restarts=3)
    assert r.perm == P.inverse(), _describe(r, P)


@given(args=_permuted_copy(S.archs()))
def test_weight_matching_global_optimum_is_only_the_inverse(args) -> None:
    """Cauchy–Schwarz on Ainsworth et al. 2023, Eq. (3): J(R) ≤ J(P⁻¹) = ‖θ‖² for the R weight
    matching returns, with equality only if R = P⁻¹; and P⁻¹ is a fixed point of Algorithm 1."""
    case, P = args
    pb = P.apply(case.spec, case.params)
    best = _norm2(case.params)
    r = weight_matching(case.spec, case.params, pb)
    tol = 1e-9 * best
    assert r.objective <= best + tol
    if r.objective >= best - tol:
        assert r.perm == P.inverse(), f"objective {r.objective} = ‖θ‖² but R ≠ P⁻¹"
    fixed = weight_matching(case.spec, case.params, pb, init=P.inverse())
    assert fixed.perm == P.inverse(), _describe(fixed, P)
    assert fixed.objective == pytest.approx(best, rel=1e-12)


@given(ps=S.point_sets(n=2, kinds=["normal"]), seed=st.integers(0, 100), restarts=st.integers(1, 2))
def test_weight_matching_objective_never_decreases(ps: S.PointSet, seed: int, restarts: int) -> None:
    """Coordinate ascent (Ainsworth et al. 2023, Algorithm 1): the objective history is
    non-decreasing, starts at the identity's J(I) and ends at the returned objective ≥ J(I)."""
    a, b = ps.points
    r = weight_matching(ps.spec, a, b, seed=seed, restarts=restarts)
    h = r.history
    j_id = weight_matching_objective(ps.spec, a, b, Permutation.identity(ps.spec))
    assert h[0] == pytest.approx(j_id, rel=1e-12, abs=1e-12)
    for i in range(1, len(h)):
        assert h[i] >= h[i - 1] - 1e-9 * max(1.0, abs(h[i - 1])), f"history decreases at pass {i}: {h}"
    assert r.objective == pytest.approx(h[-1], rel=1e-12)
    assert r.objective >= h[0] - 1e-9 * max(1.0, abs(h[0]))
    assert r.objective == pytest.approx(weight_matching_objective(ps.spec, a, b, r.perm), rel=1e-9, abs=1e-9)


@given(ps=S.point_sets(n=2, kinds=["normal"]), q_seed=S.perm_seeds, seed=st.integers(0, 100))
def test_weight_matching_equivariance(ps: S.PointSet, q_seed: int, seed: int) -> None:
    """Equivariance of Algorithm 1 (Ainsworth et al. 2023) under relabelling θ_b's units:
    with the same order seed and the start transported (``init = Q⁻¹``, i.e. the same starting
    point θ_b), weight_matching(θ_a, Q(θ_b)) = weight_matching(θ_a, θ_b) ∘ Q⁻¹.

    Compared: the permutations (R' = R ∘ Q⁻¹), the aligned parameters R'(Q(θ_b)) = R(θ_b) (exact
    reindexing of the same tensors) and the objective histories (rel 1e-12). Weights are N(0, 1),
    so there are no ties for the assignment solver to break differently."""
    a, b = ps.points
    Q = Permutation.random(ps.spec, q_seed)
    r = weight_matching(ps.spec, a, b, seed=seed)
    rq = weight_matching(ps.spec, a, Q.apply(ps.spec, b), seed=seed, init=Q.inverse())
    assert rq.perm == r.perm @ Q.inverse(), f"R' ∘ Q vs R moved {(rq.perm @ Q).num_moved()} vs {r.perm.num_moved()}"
    aligned = r.perm.apply(ps.spec, b)
    aligned_q = rq.perm.apply(ps.spec, Q.apply(ps.spec, b))
    for k in aligned:
        assert torch.equal(aligned[k], aligned_q[k]), f"aligned {k!r} differs"
    assert rq.history == pytest.approx(r.history, rel=1e-12)


@given(ps=S.point_sets(n=2, kinds=["normal", "default", "sgd"]), train=st.booleans())
def test_aligned_model_computes_the_same_function(ps: S.PointSet, train: bool) -> None:
    """Ainsworth et al. 2023, Eq. (1) for the matched R: f(R(θ_b), x) = f(θ_b, x) (train and eval
    mode): alignment only chooses a representative of θ_b's permutation class."""
    a, b = ps.points
    r = weight_matching(ps.spec, a, b)
    ref = forward(ps.model, b, ps.x, train)
    assert_same_function(forward(ps.model, r.perm.apply(ps.spec, b), ps.x, train), ref, "f(R(θ_b)) vs f(θ_b)")


@given(args=_permuted_copy(S.archs(["mlp"], wide=True)), data_seed=S.seeds)
def test_activation_matching_recovers_inverse_mlp(args, data_seed: int) -> None:
    """Ainsworth et al. 2023, §3.1 (activation matching, Eq. (2)): for θ_b = P(θ_a) the units of
    θ_b are θ_a's reordered, so unit i of a correlates perfectly with unit P⁻¹(i) of b and the
    per-layer assignment returns P⁻¹ (MLPs, N(0, 1) weights, 64 Gaussian inputs)."""
    case, P = args
    x = torch.randn(64, *case.x.shape[1:], generator=torch.Generator().manual_seed(data_seed), dtype=case.x.dtype)
    r = activation_matching(case.model, case.spec, case.params, P.apply(case.spec, case.params), x)
    assert r.perm == P.inverse(), _describe(r, P)
