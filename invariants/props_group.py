"""Property 3: permutations of a spec form a group acting on parameter points.

``Permutation`` composes in function notation, ``(P ∘ Q)(θ) = P(Q(θ))`` (reference/permutation.py).
The laws are exact (index tensors and reindexed parameters compared with ``torch.equal``); they are
checked on specs of generated architectures, GroupNorm block constraints included.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from hypothesis import given
from hypothesis import strategies as st

from invariants import strategies as S
from invariants.support import assert_params_equal
from reference.params import stack, unstack
from reference.permutation import Permutation

_cases = S.model_cases(kinds=["default", "heavy"])


@st.composite
def _case_and_perms(draw: st.DrawFn, k: int):
    case = draw(_cases)
    return case, [Permutation.random(case.spec, draw(S.perm_seeds)) for _ in range(k)]


def _assert_perm_equal(a: Permutation, b: Permutation, what: str) -> None:
    assert set(a) == set(b), f"{what}: groups differ"
    for g in a:
        assert torch.equal(a[g], b[g]), f"{what}: group {g!r}: {a[g].tolist()} vs {b[g].tolist()}"


@given(args=_case_and_perms(1))
def test_identity_law(args) -> None:
    """Group identity: I(θ) = θ and P ∘ I = I ∘ P = P."""
    case, (P,) = args
    I = Permutation.identity(case.spec)
    assert I.is_identity(), f"Permutation.identity moves {I.num_moved()}"
    assert_params_equal(I.apply(case.spec, case.params), case.params, "I(θ) vs θ")
    _assert_perm_equal(P @ I, P, "P ∘ I vs P")
    _assert_perm_equal(I @ P, P, "I ∘ P vs P")


@given(args=_case_and_perms(1))
def test_inverse_law(args) -> None:
    """Group inverse: P ∘ P⁻¹ = P⁻¹ ∘ P = I, and P⁻¹(P(θ)) = θ."""
    case, (P,) = args
    Pinv = P.inverse()
    assert (P @ Pinv).is_identity(), f"P ∘ P⁻¹ moves {(P @ Pinv).num_moved()}"
    assert (Pinv @ P).is_identity(), f"P⁻¹ ∘ P moves {(Pinv @ P).num_moved()}"
    assert_params_equal(Pinv.apply(case.spec, P.apply(case.spec, case.params)), case.params, "P⁻¹(P(θ)) vs θ")
    Permutation(Pinv.to_dict(), case.spec)  # the inverse respects the spec (GroupNorm blocks)


@given(args=_case_and_perms(3))
def test_associativity(args) -> None:
    """Group associativity: (P ∘ Q) ∘ R = P ∘ (Q ∘ R)."""
    _, (P, Q, R) = args
    _assert_perm_equal((P @ Q) @ R, P @ (Q @ R), "(P ∘ Q) ∘ R vs P ∘ (Q ∘ R)")


@given(args=_case_and_perms(2))
def test_action_of_composition(args) -> None:
    """Group action (function notation of reference/permutation.py): (P ∘ Q)(θ) = P(Q(θ)); the
    composition of block-respecting permutations respects the blocks."""
    case, (P, Q) = args
    left = (P @ Q).apply(case.spec, case.params)
    right = P.apply(case.spec, Q.apply(case.spec, case.params))
    assert_params_equal(left, right, "(P ∘ Q)(θ) vs P(Q(θ))")
    Permutation((P @ Q).to_dict(), case.spec)


@given(args=_case_and_perms(1), k=st.integers(1, 3))
def test_apply_batched_points(args, k: int) -> None:
    """The action on K stacked points (``batch_dims=1``) is the action on each: P([θ₁..θ_K]) =
    [P(θ₁)..P(θ_K)] (what vmapped curve and simplex evaluation relies on)."""
    case, (P,) = args
    points = [case.params] + [{n: v * (i + 2) for n, v in case.params.items()} for i in range(k - 1)]
    batched = unstack(P.apply(case.spec, stack(points), batch_dims=1))
    for i, (b, p) in enumerate(zip(batched, points, strict=True)):
        assert_params_equal(b, P.apply(case.spec, p), f"point {i} of the batched action")


@given(args=_case_and_perms(1))
def test_save_load_round_trip(args) -> None:
    """Serialisation: Permutation.load(P.save(path)) = P (and it still fits the spec)."""
    case, (P,) = args
    with tempfile.TemporaryDirectory() as d:  # not tmp_path: function-scoped fixtures and @given
        path = Path(d) / "perm.pt"
        P.save(path)
        _assert_perm_equal(Permutation.load(path, case.spec), P, "load(save(P)) vs P")


@given(args=_case_and_perms(1))
def test_json_round_trip(args) -> None:
    """Serialisation: Permutation.from_json(P.to_json()) = P, and P(θ) is unchanged by it."""
    case, (P,) = args
    Q = Permutation.from_json(P.to_json(), case.spec)
    _assert_perm_equal(Q, P, "from_json(to_json(P)) vs P")
    assert_params_equal(Q.apply(case.spec, case.params), P.apply(case.spec, case.params), "Q(θ) vs P(θ)")
