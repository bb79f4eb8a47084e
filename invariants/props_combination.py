"""Property 2: a permutation commutes with linear combinations of parameter points.

P acts linearly (it reindexes coordinates), so for any coefficients kᵢ and points θ₁..θₙ (n = 2–5)
``Σ kᵢ P(θᵢ) = P(Σ kᵢ θᵢ)`` exactly, and hence, by Property 1, ``f(Σ kᵢ P(θᵢ)) = f(Σ kᵢ θᵢ)``.
This is what makes interpolation, curves and simplexes well defined on permutation classes.

Coefficient families per mode (``invariants.strategies.coefficients``):

- parameters (exact, float64): convex, affine (Σkᵢ = 1, any sign) and arbitrary;
- functions, train mode: convex, affine and arbitrary (BatchNorm normalises by batch statistics);
- functions, eval mode: convex only. With affine or arbitrary coefficients the combined
  ``running_var`` of BatchNorm can be negative and both sides are NaN; a NaN is never compared with
  a NaN: outputs are asserted finite first.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from invariants import strategies as S
from invariants.support import DEVICE, assert_params_equal, assert_same_function, forward
from reference.params import combine
from reference.permutation import Permutation

_n_points = st.integers(2, 5)


@st.composite
def combination_args(draw: st.DrawFn, families: tuple[str, ...], device: str = DEVICE):
    ps = draw(S.point_sets(n=_n_points, device=device))
    coeffs = draw(S.coefficients(len(ps.points), families))
    perm = Permutation.random(ps.spec, draw(S.perm_seeds))
    return ps, coeffs, perm


def check_params_commute(ps: S.PointSet, coeffs: S.Coeffs, perm: Permutation) -> None:
    """Σ kᵢ P(θᵢ) = P(Σ kᵢ θᵢ), exactly (same ``combine`` order on both sides)."""
    left = combine(coeffs.values, [perm.apply(ps.spec, p) for p in ps.points])
    right = perm.apply(ps.spec, combine(coeffs.values, ps.points))
    assert_params_equal(left, right, f"Σ kᵢ P(θᵢ) vs P(Σ kᵢ θᵢ), {coeffs.family} k = {coeffs.values}")


def check_function_commutes(ps: S.PointSet, coeffs: S.Coeffs, perm: Permutation, train: bool) -> None:
    """f(Σ kᵢ P(θᵢ), x) = f(Σ kᵢ θᵢ, x) at the dtype/device tolerance."""
    mixed = combine(coeffs.values, ps.points)
    mixed_p = combine(coeffs.values, [perm.apply(ps.spec, p) for p in ps.points])
    ref = forward(ps.model, mixed, ps.x, train)
    out = forward(ps.model, mixed_p, ps.x, train)
    mode = "train" if train else "eval"
    assert_same_function(out, ref, f"f(Σ kᵢ P(θᵢ)) vs f(Σ kᵢ θᵢ) in {mode} mode, {coeffs.family} k = {coeffs.values}")


@given(args=combination_args(("convex", "affine", "arbitrary")))
def test_combination_commutes_with_permutation_params(args) -> None:
    """Linearity of P (Ainsworth et al. 2023, §2; Garipov et al. 2018 and Benton et al. 2021 build
    curves and simplexes from such combinations): Σ kᵢ P(θᵢ) = P(Σ kᵢ θᵢ) exactly, float64, for
    convex, affine and arbitrary k and 2–5 points."""
    check_params_commute(*args)


@given(args=combination_args(("convex", "affine", "arbitrary")))
def test_combination_commutes_with_permutation_train_mode(args) -> None:
    """Ainsworth et al. 2023, Eq. (1) applied to a combination: f(Σ kᵢ P(θᵢ), x) = f(Σ kᵢ θᵢ, x)
    in train mode, for convex, affine and arbitrary k."""
    ps, coeffs, perm = args
    check_function_commutes(ps, coeffs, perm, train=True)


@given(args=combination_args(("convex",)))
def test_combination_commutes_with_permutation_eval_mode(args) -> None:
    """Ainsworth et al. 2023, Eq. (1) applied to a convex combination (a point of the simplex of
    Benton et al. 2021): f(Σ λᵢ P(θᵢ), x) = f(Σ λᵢ θᵢ, x) in eval mode; convex λ only, so the
    combined BatchNorm running_var stays positive."""
    ps, coeffs, perm = args
    assert all(c >= 0 for c in coeffs.values) and abs(sum(coeffs.values) - 1) < 1e-9
    check_function_commutes(ps, coeffs, perm, train=False)


@given(ps=S.point_sets(n=2, device=DEVICE), t=S.curve_ts, seed=S.perm_seeds)
def test_interpolation_commutes_with_permutation(ps: S.PointSet, t: float, seed: int) -> None:
    """Linear mode connectivity on permutation classes (Entezari et al. 2022, Eq. (1) path;
    Ainsworth et al. 2023, §2): (1 − t) P(θ₁) + t P(θ₂) = P((1 − t) θ₁ + t θ₂) for t in [0, 1],
    exactly; the interpolated networks compute the same function in eval mode."""
    perm = Permutation.random(ps.spec, seed)
    coeffs = S.Coeffs("convex", (1.0 - t, t))
    check_params_commute(ps, coeffs, perm)
    check_function_commutes(ps, coeffs, perm, train=False)
