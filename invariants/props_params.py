"""Property 7: sanity of the parameter arithmetic of reference/params.py.

Integer buffers (BatchNorm's ``num_batches_tracked``) are counters, not coordinates: a combination
takes them from the first point (``int_policy="first"``) or requires them equal (``"equal"``).
Float64 points; every equality here is exact. The functions under test are looked up as
``reference.params.<name>`` / ``reference.barrier.linear_path`` at call time (mutation tests).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reference.barrier as RB
import reference.params as RP
from invariants import strategies as S
from invariants.support import assert_params_equal
from reference.params import is_float, unstack

_bn_sets = S.point_sets(n=st.integers(2, 4), families=["vgg", "resnet", "cnn1d"])


def _int_keys(p) -> list[str]:
    return [k for k, v in p.items() if not is_float(v)]


@given(ps=S.point_sets(n=1))
def test_combine_one_point_is_identity(ps: S.PointSet) -> None:
    """Σ kᵢ θᵢ with one point and k = 1 is θ itself (keys, dtypes and values)."""
    (p,) = ps.points
    assert_params_equal(RP.combine([1.0], [p]), p, "combine([1], [θ]) vs θ")


@given(ps=_bn_sets, data=st.data())
def test_integer_buffers_are_never_averaged(ps: S.PointSet, data: st.DataObject) -> None:
    """reference/params.py: integer buffers are taken from point 0 (never averaged, dtype kept) by
    ``combine``, ``combine_batch`` and ``lerp``; ``int_policy="equal"`` refuses points that differ."""
    coeffs = data.draw(S.coefficients(len(ps.points)))
    p0 = ps.points[0]
    out = RP.combine(coeffs.values, ps.points)
    rows = unstack(RP.combine_batch(torch.tensor([coeffs.values, coeffs.values[::-1]], dtype=torch.float64), ps.points))
    mid = RP.lerp(ps.points[0], ps.points[-1], 0.5)
    for k in _int_keys(p0):
        for what, q in (("combine", out), ("combine_batch[0]", rows[0]), ("combine_batch[1]", rows[1]), ("lerp", mid)):
            assert q[k].dtype == p0[k].dtype, f"{what}: {k!r} dtype {q[k].dtype}"
            assert torch.equal(q[k], p0[k]), f"{what}: {k!r} = {q[k].tolist()}, point 0 has {p0[k].tolist()}"
    if any(not torch.equal(p[k], p0[k]) for p in ps.points[1:] for k in _int_keys(p0)):
        with pytest.raises(ValueError, match="integer buffer"):
            RP.combine(coeffs.values, ps.points, int_policy="equal")


@given(ps=S.point_sets(n=2))
def test_lerp_endpoints(ps: S.PointSet) -> None:
    """Linear interpolation (Garipov et al. 2018's straight line, Frankle et al. 2020): φ(0) = θ₁ and
    φ(1) = θ₂ exactly (floating coordinates; counters stay θ₁'s), for ``lerp`` and for the
    endpoints of ``linear_path``'s grid."""
    a, b = ps.points
    assert_params_equal(RP.lerp(a, b, 0.0), a, "lerp(a, b, 0) vs a")
    # at t = 1 the coordinates are b's; integer buffers are still point 0's (never averaged)
    b_with_a_counters = {k: (v if is_float(v) else a[k]) for k, v in b.items()}
    assert_params_equal(RP.lerp(a, b, 1.0), b_with_a_counters, "lerp(a, b, 1) vs b")
    t, stacked = RB.linear_path(a, b, 3)
    first, *_, last = unstack(stacked)
    assert float(t[0]) == 0.0 and float(t[-1]) == 1.0
    for k in a:
        if is_float(a[k]):
            assert torch.equal(first[k], a[k]), f"linear_path(t=0)[{k!r}] differs from a"
            assert torch.equal(last[k], b[k]), f"linear_path(t=1)[{k!r}] differs from b"


@given(ps=S.point_sets(n=2), t=S.curve_ts)
def test_lerp_matches_combine_batch(ps: S.PointSet, t: float) -> None:
    """One path point, two code paths: lerp(a, b, t) = combine_batch([[1 − t, t]])[0] (float64,
    up to summation order)."""
    a, b = ps.points
    row = unstack(RP.combine_batch(torch.tensor([[1.0 - t, t]], dtype=torch.float64), [a, b]))[0]
    one = RP.lerp(a, b, t)
    for k in a:
        torch.testing.assert_close(row[k], one[k], rtol=1e-12, atol=1e-12)
