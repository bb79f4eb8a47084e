"""Properties of the curves of ``reference/curves.py`` (Garipov et al. 2018, "Loss Surfaces, Mode
Connectivity, and Fast Ensembling of DNNs", arXiv:1802.10026).

A curve is φ(t) = Σᵢ cᵢ(t) θᵢ over control points θ₀ = θ₁ (start), …, θ_n = θ₂ (end); its kind is
a function t → c(t). Checked for Bezier curves of order 1–6 (Bernstein coefficients; §3.2 for order
2) and polygonal chains with 1–5 bends (hat functions; §3.2 for one bend), on random parameter
points of random shapes (float64, with an integer counter like ``num_batches_tracked``):

- endpoints: φ(0) = θ₁ and φ(1) = θ₂, exactly;
- partition of unity: cᵢ(t) ≥ 0 and Σᵢ cᵢ(t) = 1 on [0, 1] (φ(t) is a convex combination: it
  commutes with permutations, props_combination.py);
- linear precision: control points equally spaced on the segment give the segment; the quadratic
  Bezier with the midpoint as control point is the straight line at every t;
- the polygonal chain passes through its bends: φ(i / n) = θᵢ.

Local strategies (the points need no architecture): ``kinds``, ``param_points(n)``, ``ts``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from reference.curves import Bezier, Curve, PolyChain
from reference.params import Params, combine, lerp, unstack

# ---------------------------------------------------------------------------------------------
# strategies

kinds = st.one_of(st.integers(1, 6).map(Bezier), st.integers(1, 5).map(PolyChain))
ts = st.floats(0.0, 1.0, allow_nan=False)
t_lists = st.lists(ts, min_size=1, max_size=8)


class Points(NamedTuple):
    """n parameter points with the same keys and shapes (float64 entries + one integer counter)."""

    points: list[Params]
    scale: float


@st.composite
def param_points(draw: st.DrawFn, n: int) -> Points:
    n_keys = draw(st.integers(1, 3))
    shapes = [tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=3))) for _ in range(n_keys)]
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    pts = []
    for _ in range(n):
        p: Params = {f"w{i}": scale * torch.randn(s, generator=g, dtype=torch.float64) for i, s in enumerate(shapes)}
        p["count"] = torch.randint(0, 100, (), generator=g)
        pts.append(p)
    return Points(pts, scale)


@st.composite
def curves(draw: st.DrawFn) -> Curve:
    kind = draw(kinds)
    pts = draw(param_points(kind.n_points)).points
    return Curve(kind, pts[0], pts[-1], tuple(pts[1:-1]))


def _close(a: Tensor, b: Tensor, scale: float, rtol: float = 1e-12) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale)


# ---------------------------------------------------------------------------------------------
# properties


@given(curves())
def test_endpoints(curve: Curve) -> None:
    """φ(0) = θ₁ and φ(1) = θ₂ (Garipov et al. 2018, §3.1: φ_θ(0) = ŵ₁, φ_θ(1) = ŵ₂), exactly:
    c(0) = e₀ and c(1) = e_n for Bernstein and hat coefficients; counters come from θ₁."""
    at0, at1 = unstack(curve.points_at(torch.tensor([0.0, 1.0], dtype=torch.float64)))
    for k, v in curve.start.items():
        assert torch.equal(at0[k], v), k
        assert torch.equal(at1[k], curve.end[k] if v.is_floating_point() else v), k


@given(kinds, t_lists)
def test_partition_of_unity(kind, t: list[float]) -> None:
    """cᵢ(t) ≥ 0 and Σᵢ cᵢ(t) = 1 for t ∈ [0, 1]: Σᵢ C(n,i) tⁱ(1−t)ⁿ⁻ⁱ = (t + 1 − t)ⁿ = 1 (Bezier,
    Garipov et al. 2018 §3.2) and Σᵢ max(0, 1 − |nt − i|) = 1 (polygonal chain, §3.2); hence
    Σᵢ cᵢ'(t) = 0."""
    tt = torch.tensor(t, dtype=torch.float64)
    c = kind.coeffs(tt)
    assert c.shape == (len(t), kind.n_points)
    assert bool((c >= 0).all()), c
    _close(c.sum(1), torch.ones(len(t), dtype=torch.float64), 1.0, rtol=1e-14)
    _close(kind.dcoeffs(tt).sum(1), torch.zeros(len(t), dtype=torch.float64), float(kind.n_points), rtol=1e-12)


@given(param_points(2), ts)
def test_quadratic_bezier_with_midpoint_control_is_the_line(pts: Points, t: float) -> None:
    """(1 − t)² θ₁ + 2t(1 − t) · ½(θ₁ + θ₂) + t² θ₂ = (1 − t) θ₁ + t θ₂ (Garipov et al. 2018, §3.2,
    quadratic Bezier curve with θ the midpoint)."""
    a, b = pts.points
    mid = combine([0.5, 0.5], [a, b])
    got = unstack(Curve(Bezier(2), a, b, (mid,)).points_at(t))[0]
    want = lerp(a, b, t)
    for k in a:
        if a[k].is_floating_point():
            _close(got[k], want[k], pts.scale)


@given(kinds, param_points(2), t_lists)
def test_equally_spaced_controls_give_the_line(kind, pts: Points, t: list[float]) -> None:
    """Linear precision: θᵢ = (1 − i/n) θ₁ + (i/n) θ₂ ⇒ φ(t) = (1 − t) θ₁ + t θ₂, since
    Σᵢ cᵢ(t) · i/n = t for Bernstein (Garipov et al. 2018, §3.2) and hat coefficients alike
    (``Curve.init_linear``, the authors' initialisation)."""
    a, b = pts.points
    curve = Curve.init_linear(a, b, kind)
    tt = torch.tensor(t, dtype=torch.float64)
    got = curve.points_at(tt)
    for j, tj in enumerate(t):
        want = lerp(a, b, tj)
        for k in a:
            if a[k].is_floating_point():
                _close(got[k][j], want[k], pts.scale)


@given(st.integers(1, 5).flatmap(lambda bends: st.tuples(st.just(PolyChain(bends)), param_points(bends + 2))))
def test_polychain_passes_through_its_bends(args) -> None:
    """φ(i / n) = θᵢ for the polygonal chain through θ₁ … θ_{n−1} (Garipov et al. 2018, §3.2: one bend,
    φ(½) = θ; several bends as in their code's ``PolyChain``): c(i / n) = eᵢ."""
    kind, pts = args
    p = pts.points
    curve = Curve(kind, p[0], p[-1], tuple(p[1:-1]))
    at = unstack(curve.points_at(kind.knots))
    for got, want in zip(at, curve.points, strict=True):
        for k in want:
            if want[k].is_floating_point():
                _close(got[k], want[k], pts.scale, rtol=1e-13)


@given(curves(), t_lists)
def test_batch_points_are_single_combinations(curve: Curve, t: list[float]) -> None:
    """φ(t) = Σᵢ cᵢ(t) θᵢ (Garipov et al. 2018, §3.1): the stacked ``points_at`` equals one
    ``combine`` per t (the batched path evaluation and the definition agree)."""
    tt = torch.tensor(t, dtype=torch.float64)
    got = curve.points_at(tt)
    c = curve.kind.coeffs(tt)
    scale = max(float(v.abs().max()) for p in curve.points for v in p.values() if v.is_floating_point() and v.numel())
    for j in range(len(t)):
        want = combine(c[j], curve.points)
        for k in want:
            if want[k].is_floating_point():
                _close(got[k][j], want[k], scale)
