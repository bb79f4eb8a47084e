"""Property 5: barrier definitions (reference/barrier.py) on value curves and on evaluated paths.

``max_chord``: B = maxₜ v(t) − [(1 − t) v(0) + t v(1)] (Frankle et al. 2020; Entezari et al. 2022,
Eq. (1)); ``mid``: B = maxₜ v(t) − ½ (v(0) + v(1)) (Ainsworth et al. 2023, Definition 2.2).

Random value curves (``value_curves``: uniform and non-uniform grids) test the definitions; linear
paths between generated networks (``reference.barrier.linear_path`` + ``evaluate_path``, eval mode,
float64 points) test them on real losses. Every barrier is looked up as ``reference.barrier.barrier``
at call time (a mutation test replaces it).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reference.barrier as B
from invariants import strategies as S
from reference.permutation import Permutation

_finite = st.floats(-5.0, 5.0)


def _labels(ps: S.PointSet, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, ps.model.config["num_classes"], (ps.x.shape[0],), generator=g)


def _path(model, a, b, x, y, grid: int) -> B.PathEval:
    t, stacked = B.linear_path(a, b, grid)
    return B.evaluate_path(model, t, stacked, {"train": (x, y)})


def _loss_scale(pe: B.PathEval) -> float:
    return 1.0 + float(pe.curves["train"]["loss"].abs().max())


@given(curve=S.value_curves())
def test_barrier_never_below_lower_bound(curve: S.ValueCurve) -> None:
    """reference/barrier.py's stated lower bounds: B_max_chord ≥ 0 (the gap is 0 at t = 0 and
    t = 1) and B_mid ≥ ½|v(0) − v(1)| (Ainsworth et al. 2023, Def. 2.2 at the worse endpoint)."""
    for kind in B.BARRIER_KINDS:
        b = B.barrier(curve.values, curve.t, kind)
        assert b.value >= B.barrier_lower_bound(curve.values, kind) - 1e-12, kind
        assert float(curve.t[0]) <= b.t_max <= float(curve.t[-1])


@given(curve=S.value_curves(), alpha=_finite, beta=_finite)
def test_max_chord_barrier_invariant_under_affine_trend(curve: S.ValueCurve, alpha: float, beta: float) -> None:
    """Entezari et al. 2022, Eq. (1) is chord-relative: adding an affine function α + βt to v
    changes the chord by the same amount, so B_max_chord(v + α + βt) = B_max_chord(v); B_mid only
    sees the endpoints' mean, so B_mid(v + α) = B_mid(v)."""
    v, t = curve.values, curve.t
    scale = 1e-9 * (1 + float(v.abs().max()) + abs(alpha) + abs(beta))
    b0 = B.barrier(v, t, "max_chord").value
    assert B.barrier(v + alpha + beta * t, t, "max_chord").value == pytest.approx(b0, abs=scale)
    assert B.barrier(v + alpha, t, "mid").value == pytest.approx(B.barrier(v, t, "mid").value, abs=scale)


@given(curve=S.value_curves(), v0=_finite, v1=_finite)
def test_curve_below_its_chord_has_zero_barrier(curve: S.ValueCurve, v0: float, v1: float) -> None:
    """Frankle et al. 2020 / Entezari et al. 2022: a path whose values lie on or below the chord
    (1 − t) v(0) + t v(1) has B_max_chord = 0, attained at an endpoint or on the chord."""
    t = curve.t
    chord = (1 - t) * v0 + t * v1
    dips = -curve.values.abs()
    dips[0] = dips[-1] = 0.0
    b = B.barrier(chord + dips, t, "max_chord")
    assert b.value == pytest.approx(0.0, abs=1e-9 * (1 + abs(v0) + abs(v1)))


@given(curve=S.value_curves())
def test_max_chord_barrier_symmetric_under_reversal(curve: S.ValueCurve) -> None:
    """Swapping the endpoints (path θ₂ → θ₁: values reversed on the grid s = 1 − t, reversed)
    leaves both barriers unchanged: the definitions do not depend on the path's direction."""
    v, t = curve.values, curve.t
    v_rev, t_rev = v.flip(0), (1 - t).flip(0)
    t_rev[0], t_rev[-1] = 0.0, 1.0
    for kind in B.BARRIER_KINDS:
        assert B.barrier(v_rev, t_rev, kind).value == pytest.approx(
            B.barrier(v, t, kind).value, abs=1e-9 * (1 + float(v.abs().max()))
        )


@given(ps=S.point_sets(n=1, families=["mlp", "vgg", "cnn1d", "resnet"]), grid=st.integers(2, 7), seed=S.seeds)
def test_barrier_zero_for_identical_endpoints(ps: S.PointSet, grid: int, seed: int) -> None:
    """Every barrier of the constant path θ → θ is 0 (loss and error; max_chord and mid): the
    linear path (1 − t) θ + t θ equals θ up to one rounding of float64 coordinates."""
    (p,) = ps.points
    pe = _path(ps.model, p, p, ps.x, _labels(ps, seed), grid)
    for name, value in pe.barrier_table().items():
        assert abs(value) <= 1e-6 * _loss_scale(pe), f"{name} = {value} for identical endpoints"


@given(ps=S.point_sets(n=2), grid=st.integers(2, 7), seed=S.seeds)
def test_barrier_invariant_under_common_permutation(ps: S.PointSet, grid: int, seed: int) -> None:
    """Ainsworth et al. 2023, §2: the path between P(θ₁) and P(θ₂) is P applied to the path
    between θ₁ and θ₂ (Property 2), so by Eq. (1) its losses, and every loss barrier, are the same
    (eval mode; cross-entropy in float32 inside ``evaluate_points``: tolerance 1e-5 relative)."""
    a, b = ps.points
    y = _labels(ps, seed)
    P = Permutation.random(ps.spec, seed)
    ref = _path(ps.model, a, b, ps.x, y, grid)
    out = _path(ps.model, P.apply(ps.spec, a), P.apply(ps.spec, b), ps.x, y, grid)
    tol = 1e-5 * _loss_scale(ref)
    torch.testing.assert_close(out.curves["train"]["loss"], ref.curves["train"]["loss"], rtol=1e-5, atol=tol)
    table, table_ref = out.barrier_table(), ref.barrier_table()
    for name, value in table_ref.items():
        if "_loss_" in name:
            assert table[name] == pytest.approx(value, abs=2 * tol), name
