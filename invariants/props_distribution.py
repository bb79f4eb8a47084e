"""Properties of the Anokhin–Yarotsky distribution-based connectors (reference/distribution.py).

Source: Anokhin & Yarotsky 2020 (arXiv 2008.00741): Eq. (5) lin, Eq. (6) arc, weight adjustment (WA),
optimal-transport (OT) pairing of hidden units, stepwise (B-fly / WA) paths, WA ensembling.

Generated: dense ReLU MLPs with 1–3 hidden layers of uneven widths, bias on or off, N(0, 1) weights
(general position), float64 everywhere, so the exact properties hold to round-off. WA's output
preservation is exact when the least-squares system is solvable; the generated fitting sets have at
most half as many inputs as the narrowest hidden layer, so ``[h, 1]`` has full row rank.
Functions are looked up as ``reference.distribution.<name>`` at call time.
"""

from __future__ import annotations

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import reference.distribution as RD
from reference.models import build_model

_TOL = {"rtol": 1e-9, "atol": 1e-9}


@st.composite
def mlps(draw: st.DrawFn, min_depth: int = 1, max_depth: int = 3, min_width: int = 4):
    """(model, θ¹, θ², x): two N(0, 1)-weight points of one MLP, and fitting inputs x with
    N ≤ min(widths) / 2 rows."""
    depth = draw(st.integers(min_depth, max_depth))
    widths = [draw(st.integers(min_width, 10)) for _ in range(depth)]
    cfg = {"name": "mlp", "in_features": draw(st.integers(2, 5)), "widths": widths,
           "num_classes": draw(st.integers(2, 4)), "bias": draw(st.booleans())}
    model = build_model(cfg).double()
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    pts = [{k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in model.state_dict().items()}
           for _ in range(2)]
    n = draw(st.integers(1, max(1, min(widths) // 2)))
    x = torch.randn(n, cfg["in_features"], generator=g, dtype=torch.float64)
    return model, pts[0], pts[1], x


def _solvable(case) -> bool:
    """Every hidden feature matrix of both endpoints (``[h, 1]`` with a bias) has full row rank:
    WA's least-squares systems are then solvable (a dead input row would otherwise block a fit)."""
    _, a, b, x = case
    for p in (a, b):
        layers = RD.mlp_layers(p)
        for k, h in enumerate(RD.hidden_features(layers, x)[1:], start=1):
            F = h if layers[k][1] is None else torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype)], 1)
            if int(torch.linalg.matrix_rank(F)) < h.shape[0]:
                return False
    return True


def _logits(p, x):
    return RD.forward_layers(RD.mlp_layers(p), x)


def _point(stacked, i):
    return {k: v[i] for k, v in stacked.items()}


@given(shape=st.tuples(st.integers(1, 6), st.integers(1, 5)), seed=st.integers(0, 2**31 - 1),
       t=st.floats(0.0, 1.0))
def test_connect_endpoints_and_reversal(shape: tuple[int, int], seed: int, t: float) -> None:
    """Eq. (5) and Eq. (6): s(0) = s¹, s(1) = s², and reversing the endpoints reverses time,
    s_{1,2}(t) = s_{2,1}(1 − t) (cos(π(1 − t)/2) = sin(πt/2); m is symmetric in s¹, s²)."""
    g = torch.Generator().manual_seed(seed)
    s1, s2 = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    for method in RD.CONNECT:
        for dim in (0, 1, None):
            ends = RD.connect(s1, s2, [0.0, 1.0], method, dim)
            torch.testing.assert_close(ends[0], s1, **_TOL)
            torch.testing.assert_close(ends[1], s2, **_TOL)
            torch.testing.assert_close(RD.connect(s1, s2, t, method, dim)[0],
                                       RD.connect(s2, s1, 1.0 - t, method, dim)[0], rtol=1e-9, atol=1e-9)


@given(case=mlps(min_depth=1), method=st.sampled_from(["Linear", "Arc"]))
def test_linear_and_arc_paths_start_and_end_at_endpoints(case, method: str) -> None:
    """The paper's Linear (Eq. 5) and Arc (Eq. 6) paths: φ(0) = θ¹ and φ(1) = θ² exactly (every key)."""
    _, a, b, _ = case
    path = RD.connection_path(method, a, b)
    _, pts = path.grid(3)
    for k in a:
        torch.testing.assert_close(pts[k][0], a[k], **_TOL)
        torch.testing.assert_close(pts[k][-1], b[k], **_TOL)


@given(case=mlps(min_depth=1), data=st.data())
def test_weight_adjustment_preserves_outputs(case, data: st.DataObject) -> None:
    """WA: (W̃, b̃) = argmin ‖W̃ f_to + b̃ − (W f_from + b)‖²; with ``[f_to, 1]`` of full row rank the
    layer's outputs on the fitting inputs are reproduced exactly, and f_to = f_from returns the layer."""
    assume(_solvable(case))
    _, a, b, x = case
    la, lb = RD.mlp_layers(a), RD.mlp_layers(b)
    k = data.draw(st.integers(1, len(la) - 1))
    fa, fb = RD.hidden_features(la, x)[k], RD.hidden_features(lb, x)[k]
    adj = RD.adjust_layer(la[k], fa, fb)
    torch.testing.assert_close(RD.forward_layers([adj], fb), RD.forward_layers([la[k]], fa), **_TOL)
    same = RD.adjust_layer(la[k], fa, fa)
    torch.testing.assert_close(same[0], la[k][0], **_TOL)
    if la[k][1] is not None:
        torch.testing.assert_close(same[1], la[k][1], **_TOL)


@given(case=mlps(min_depth=1), method=st.sampled_from(["Linear + WA", "Arc + WA", "OT + WA"]))
def test_wa_path_keeps_network_one_output(case, method: str) -> None:
    """Stepwise WA: along every segment but the last (which moves the head), the re-solved layer keeps
    the network's output on the fitting inputs equal to θ¹'s (exact fits, so no drift between
    segments); the path is continuous at segment ends and ends at θ² (OT: at π(θ²), same function)."""
    assume(_solvable(case))
    _, a, b, x = case
    path = RD.connection_path(method, a, b, x)
    target = _logits(a, x)
    for seg in range(path.segments - 1):
        pts = path.segment_points(seg, [0.0, 0.3, 0.7, 1.0])
        for i in range(4):
            # exactness needs the re-solved layer's (seg + 1) input features to have full row rank at this
            # point too, not only at the endpoints: an interpolated layer can switch every unit off
            # (found by the thorough profile with one fitting input)
            layers = RD.mlp_layers(_point(pts, i))
            h = RD.hidden_features(layers, x)[seg + 1]
            F = h if layers[seg + 1][1] is None else torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype)], 1)
            assume(int(torch.linalg.matrix_rank(F)) == h.shape[0])
            torch.testing.assert_close(_logits(_point(pts, i), x), target, rtol=1e-7, atol=1e-7)
    for seg in range(path.segments - 1):
        end, start = path.segment_points(seg, [1.0]), path.segment_points(seg + 1, [0.0])
        for k in end:
            torch.testing.assert_close(end[k], start[k], rtol=1e-8, atol=1e-8)
    last = _point(path.points([float(path.segments)]), 0)
    for k in a:
        torch.testing.assert_close(last[k], path.end[k], **_TOL)
    torch.testing.assert_close(_logits(path.end, x), _logits(b, x), **_TOL)


@given(case=mlps(min_depth=1), method=st.sampled_from(["OT", "OT + B-fly", "Linear + B-fly", "Arc + B-fly"]))
def test_stepwise_paths_start_at_theta1_and_end_at_theta2_function(case, method: str) -> None:
    """B-fly / OT paths: φ(0) = θ¹, φ(end) = π(θ²) with f(π(θ²), x) = f(θ², x) (the permutation
    symmetry of hidden units), and consecutive pieces meet."""
    _, a, b, x = case
    path = RD.connection_path(method, a, b, x)
    tau = torch.tensor([0.0, float(path.segments)])
    pts = path.points(tau)
    for k in a:
        torch.testing.assert_close(pts[k][0], a[k], **_TOL)
        torch.testing.assert_close(pts[k][1], path.end[k], **_TOL)
    torch.testing.assert_close(_logits(path.end, x), _logits(b, x), **_TOL)
    for seg in range(path.segments - 1):
        end, start = path.segment_points(seg, [1.0]), path.segment_points(seg + 1, [0.0])
        for k in end:
            torch.testing.assert_close(end[k], start[k], **_TOL)


@given(n=st.integers(1, 9), d=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_ot_pairing_recovers_a_relabelling(n: int, d: int, seed: int) -> None:
    """OT between an empirical distribution and a relabelling of it: the optimal coupling (cost 0,
    unique for distinct samples) pairs each sample with its copy, s2[perm] = s1."""
    g = torch.Generator().manual_seed(seed)
    s1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    sigma = torch.randperm(n, generator=g)
    perm = RD.ot_pairing(s1, s1[sigma])
    torch.testing.assert_close(s1[sigma][perm], s1, rtol=0, atol=0)


@given(case=mlps(min_depth=1), data=st.data())
def test_permute_hidden_preserves_function(case, data: st.DataObject) -> None:
    """Permutation symmetry of dense ReLU nets: relabelling hidden layer k's units (rows of W_k, b_k,
    columns of W_{k+1}) leaves the outputs unchanged."""
    _, a, _, x = case
    layers = RD.mlp_layers(a)
    k = data.draw(st.integers(0, len(layers) - 2))
    perm = torch.randperm(layers[k][0].shape[0], generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    torch.testing.assert_close(RD.forward_layers(RD.permute_hidden(layers, k, perm), x),
                               RD.forward_layers(layers, x), **_TOL)


@given(case=mlps(min_depth=2), data=st.data())
def test_wa_ensemble_members_share_trunk_and_keep_outputs(case, data: st.DataObject) -> None:
    """WA(n) ensembling (§6): member j = base's first D − n layers, then network j's layers with the
    first re-solved; on the fitting inputs (exact fit) each member reproduces network j's output."""
    assume(_solvable(case))
    _, a, b, x = case
    D = len(RD.mlp_layers(a))
    n = data.draw(st.integers(1, D - 1))
    members = RD.wa_ensemble(a, [b], x, n)
    assert len(members) == 2
    for k in a:
        torch.testing.assert_close(members[0][k], a[k], rtol=0, atol=0)
    lm, la = RD.mlp_layers(members[1]), RD.mlp_layers(a)
    for i in range(D - n):
        torch.testing.assert_close(lm[i][0], la[i][0], rtol=0, atol=0)
    torch.testing.assert_close(_logits(members[1], x), _logits(b, x), rtol=1e-7, atol=1e-7)
