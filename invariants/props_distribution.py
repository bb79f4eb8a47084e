"""Properties of the Anokhin–Yarotsky distribution-based connectors (reference/distribution.py).

Source: Anokhin & Yarotsky 2020 (arXiv 2008.00741): Eq. (5) lin, Eq. (6) arc, weight adjustment (WA),
optimal-transport (OT) pairing of hidden units, stepwise (B-fly / WA) paths, WA ensembling.

Generated: dense ReLU MLPs with 1–3 hidden layers of uneven widths, bias on or off, N(0, 1) weights
(general position), float64 everywhere, so the exact properties hold to round-off. WA's output
preservation is exact when the least-squares system is solvable; the generated fitting sets have at
most half as many inputs as the narrowest hidden layer, so ``[h, 1]`` has full row rank.
The network is read through its ``PermutationSpec`` (``spec_for``); network functions are the model's
own forward pass (``functional_call``). Functions are looked up as ``reference.distribution.<name>`` at
call time.
"""

from __future__ import annotations

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import reference.distribution as RD
from reference.models import build_model
from reference.permutation import Permutation
from reference.specs import spec_for

from .support import assert_same_function, forward

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
    model, a, b, x = case
    chain = RD.dense_chain(spec_for(model))
    for p in (a, b):
        layers = chain.layers(p)
        for k, h in enumerate(RD.hidden_features(layers, x)[1:], start=1):
            F = h if layers[k][1] is None else torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype)], 1)
            if int(torch.linalg.matrix_rank(F)) < h.shape[0]:
                return False
    return True


def _logits(model, p, x):
    return forward(model, p, x, train=False)


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
    model, a, b, x = case
    chain = RD.dense_chain(spec_for(model))
    la, lb = chain.layers(a), chain.layers(b)
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
    model, a, b, x = case
    path = RD.connection_path(method, a, b, x)
    target = _logits(model, a, x)
    for seg in range(path.segments - 1):
        pts = path.segment_points(seg, [0.0, 0.3, 0.7, 1.0])
        for i in range(4):
            # exactness needs the re-solved layer's (seg + 1) input features to have full row rank at this
            # point too, not only at the endpoints: an interpolated layer can switch every unit off
            # (found by the thorough profile with one fitting input)
            layers = path.chain.layers(_point(pts, i))
            h = RD.hidden_features(layers, x)[seg + 1]
            F = h if layers[seg + 1][1] is None else torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype)], 1)
            assume(int(torch.linalg.matrix_rank(F)) == h.shape[0])
            torch.testing.assert_close(_logits(model, _point(pts, i), x), target, rtol=1e-7, atol=1e-7)
    for seg in range(path.segments - 1):
        end, start = path.segment_points(seg, [1.0]), path.segment_points(seg + 1, [0.0])
        for k in end:
            torch.testing.assert_close(end[k], start[k], rtol=1e-8, atol=1e-8)
    last = _point(path.points([float(path.segments)]), 0)
    for k in a:
        torch.testing.assert_close(last[k], path.end[k], **_TOL)
    torch.testing.assert_close(_logits(model, path.end, x), _logits(model, b, x), **_TOL)


@given(case=mlps(min_depth=1), method=st.sampled_from(["OT", "OT + B-fly", "Linear + B-fly", "Arc + B-fly"]))
def test_stepwise_paths_start_at_theta1_and_end_at_theta2_function(case, method: str) -> None:
    """B-fly / OT paths: φ(0) = θ¹, φ(end) = π(θ²) with f(π(θ²), x) = f(θ², x) (the permutation
    symmetry of hidden units), and consecutive pieces meet."""
    model, a, b, x = case
    path = RD.connection_path(method, a, b, x)
    tau = torch.tensor([0.0, float(path.segments)])
    pts = path.points(tau)
    for k in a:
        torch.testing.assert_close(pts[k][0], a[k], **_TOL)
        torch.testing.assert_close(pts[k][1], path.end[k], **_TOL)
    torch.testing.assert_close(_logits(model, path.end, x), _logits(model, b, x), **_TOL)
    for seg in range(path.segments - 1):
        end, start = path.segment_points(seg, [1.0]), path.segment_points(seg + 1, [0.0])
        for k in end:
            torch.testing.assert_close(end[k], start[k], **_TOL)
    for seg in range(path.segments):  # piece ℓ moves group ℓ's writer and reader only
        pts = path.segment_points(seg, [0.0, 0.5, 1.0])
        for k in set(a) - set(path.moved_keys(seg)):
            assert all(torch.equal(pts[k][i], pts[k][0]) for i in (1, 2)), (seg, k)


@given(n=st.integers(1, 9), d=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_ot_pairing_recovers_a_relabelling(n: int, d: int, seed: int) -> None:
    """OT between an empirical distribution and a relabelling of it: the optimal coupling (cost 0,
    unique for distinct samples) pairs each sample with its copy, s2[perm] = s1."""
    g = torch.Generator().manual_seed(seed)
    s1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    sigma = torch.randperm(n, generator=g)
    perm = RD.ot_pairing(s1, s1[sigma])
    torch.testing.assert_close(s1[sigma][perm], s1, rtol=0, atol=0)


@given(case=mlps(min_depth=1), method=st.sampled_from(["OT", "OT + WA"]))
def test_ot_step_is_a_permutation_of_the_spec_that_keeps_the_function(case, method: str) -> None:
    """The OT methods' relabelling of θ² is a ``Permutation`` π of the model's spec (Eq. (1) of Ainsworth
    et al. 2023: f(π(θ), x) = f(θ, x)): ``Permutation(π, spec)`` accepts it, ``π.apply(spec, θ²)`` is the
    path's end exactly, ``ot_permutation`` returns the same π, and the end computes θ²'s function."""
    model, a, b, x = case
    spec = spec_for(model)
    path = RD.connection_path(method, a, b, x)
    pi = path.permutation
    assert isinstance(pi, Permutation)
    Permutation(pi.to_dict(), spec)  # a bijection of every group of the spec, of the group's size
    assert set(pi.keys()) == set(spec.sizes) == set(path.chain.groups)
    moved = pi.apply(spec, b)
    for k in a:
        torch.testing.assert_close(moved[k], path.end[k], rtol=0, atol=0)
    mode = "butterfly" if method == "OT" else "wa"
    assert RD.ot_permutation(a, b, x, mode) == pi
    assert_same_function(_logits(model, path.end, x), _logits(model, b, x), f"{method} end vs θ²")


@given(case=mlps(min_depth=1), data=st.data())
def test_one_group_permutation_keeps_function(case, data: st.DataObject) -> None:
    """Permutation symmetry of dense ReLU nets, one hidden group at a time (the OT step's building block,
    ``DenseChain.permutation``): relabelling group ℓ (rows of W_ℓ, b_ℓ, columns of W_{ℓ+1}) reindexes
    exactly the tensors ``spec.groups[P_ℓ]`` names and leaves the outputs unchanged."""
    model, a, _, x = case
    chain = RD.dense_chain(spec_for(model))
    ell = data.draw(st.integers(0, len(chain.groups) - 1))
    group = chain.groups[ell]
    n = chain.spec.sizes[group]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    step = chain.permutation(ell, perm)
    assert all(v == 0 for g, v in step.num_moved().items() if g != group)
    q = step.apply(chain.spec, a)
    touched = {k for k, _ in chain.spec.groups[group]}
    assert touched == {chain.weights[ell], chain.weights[ell + 1]} | ({chain.biases[ell]} - {None})
    for k in set(a) - touched:
        assert torch.equal(q[k], a[k])
    torch.testing.assert_close(q[chain.weights[ell]], a[chain.weights[ell]][perm], rtol=0, atol=0)
    torch.testing.assert_close(q[chain.weights[ell + 1]], a[chain.weights[ell + 1]][:, perm], rtol=0, atol=0)
    assert_same_function(_logits(model, q, x), _logits(model, a, x), f"group {group}")


@given(case=mlps(min_depth=1), seed=st.integers(0, 2**31 - 1))
def test_ot_wa_undoes_a_planted_relabelling(case, seed: int) -> None:
    """OT + WA between θ¹ and a relabelled copy σ(θ¹) (σ a random ``Permutation`` of the spec): group
    after group the incoming samples of σ(θ¹) are a reordering of θ¹'s, so OT finds π = σ⁻¹ and the
    path ends exactly at θ¹."""
    model, a, _, x = case
    spec = spec_for(model)
    sigma = Permutation.random(spec, seed)
    path = RD.connection_path("OT + WA", a, sigma.apply(spec, a), x)
    assert path.permutation == sigma.inverse()
    for k in a:
        torch.testing.assert_close(path.end[k], a[k], rtol=0, atol=0)


@given(case=mlps(min_depth=2), data=st.data())
def test_wa_ensemble_members_share_trunk_and_keep_outputs(case, data: st.DataObject) -> None:
    """WA(n) ensembling (§6): member j = base's first D − n layers, then network j's layers with the
    first re-solved; on the fitting inputs (exact fit) each member reproduces network j's output."""
    assume(_solvable(case))
    model, a, b, x = case
    chain = RD.dense_chain(spec_for(model))
    D = chain.depth
    n = data.draw(st.integers(1, D - 1))
    members = RD.wa_ensemble(a, [b], x, n)
    assert len(members) == 2
    for k in a:
        torch.testing.assert_close(members[0][k], a[k], rtol=0, atol=0)
    lm, la = chain.layers(members[1]), chain.layers(a)
    for i in range(D - n):
        torch.testing.assert_close(lm[i][0], la[i][0], rtol=0, atol=0)
    torch.testing.assert_close(_logits(model, members[1], x), _logits(model, b, x), rtol=1e-7, atol=1e-7)
