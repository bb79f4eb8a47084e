"""reference/distribution.py: Anokhin & Yarotsky 2020 connectors, WA ensembling, error paths."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import reference.distribution as RD
from reference.evaluate import evaluate_points
from reference.models import build_model, init_params
from reference.params import clone
from reference.permutation import Permutation, PermutationSpec
from reference.specs import spec_for, trace_spec


def _mlp(widths, bias=True, in_features=5, classes=3):
    return build_model({"name": "mlp", "in_features": in_features, "widths": widths, "num_classes": classes,
                        "bias": bias})


def _pair(widths, bias=True, seed=0):
    m = _mlp(widths, bias)
    return m, init_params(m, seed + 1), init_params(m, seed + 2)


def _logits(model, params, x):
    with torch.no_grad():
        return functional_call(model, params, (x,))


def test_lin_and_arc_formulas():
    """Eq. (5) and Eq. (6) written out: arc about the pooled mean of the samples (rows)."""
    g = torch.Generator().manual_seed(0)
    s1, s2 = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.25, 0.5])
    torch.testing.assert_close(RD.lin_connect(s1, s2, t)[0], 0.75 * s1 + 0.25 * s2)
    m = torch.cat([s1, s2]).mean(0, keepdim=True)
    want = m + math.cos(math.pi / 4) * (s1 - m) + math.sin(math.pi / 4) * (s2 - m)
    torch.testing.assert_close(RD.arc_connect(s1, s2, t)[1], want)
    mid = 0.5 * (s1 + s2)
    torch.testing.assert_close(RD.arc_connect(s1, s2, 0.5, sample_dim=None)[0],
                               mid + math.sqrt(0.5) * (s1 - mid) + math.sqrt(0.5) * (s2 - mid))
    assert RD.connect(s1, s2, [0.0, 0.5, 1.0], "arc").shape == (3, 4, 3)


def test_arc_keeps_second_moment_of_independent_samples():
    """The distributional motivation of Eq. (6): for independent zero-mean samples the arc keeps the
    variance (cos² + sin² = 1) where the line halves it at t = ½."""
    g = torch.Generator().manual_seed(1)
    s1, s2 = torch.randn(20000, 2, generator=g), torch.randn(20000, 2, generator=g)
    assert RD.arc_connect(s1, s2, 0.5)[0].var().item() == pytest.approx(1.0, abs=0.03)
    assert RD.lin_connect(s1, s2, 0.5)[0].var().item() == pytest.approx(0.5, abs=0.03)


def test_one_layer_arc_is_table1_unit_sample_arc():
    """For one hidden layer, Arc = Eq. (6) on the unit samples [a_n, b_n, c_n] (m pooled over the 2n
    units) and the output bias about its midpoint (the authors' PointFinderWithBias)."""
    m, a, b = _pair([7])
    t = torch.tensor([0.3])
    pt = RD.connection_path("Arc", a, b).points(t)

    def samples(p):
        return torch.cat([p["layers.0.weight"], p["layers.0.bias"][:, None], p["head.weight"].T], 1).double()

    s = RD.arc_connect(samples(a), samples(b), t)[0]
    torch.testing.assert_close(pt["layers.0.weight"][0], s[:, :5].float())
    torch.testing.assert_close(pt["layers.0.bias"][0], s[:, 5].float())
    torch.testing.assert_close(pt["head.weight"][0], s[:, 6:].T.float())
    hb = RD.arc_connect(a["head.bias"].double(), b["head.bias"].double(), t, None)[0]
    torch.testing.assert_close(pt["head.bias"][0], hb.float())


def test_ot_pairing_is_optimal_against_brute_force():
    g = torch.Generator().manual_seed(3)
    s1, s2 = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    perm = RD.ot_pairing(s1, s2)
    cost = float(((s1 - s2[perm]) ** 2).sum())
    best = min(float(((s1 - s2[list(p)]) ** 2).sum()) for p in itertools.permutations(range(6)))
    assert cost == pytest.approx(best, rel=1e-6)


def test_one_layer_ot_pairs_full_unit_samples_and_keeps_function():
    """Table 1's OT: θ² relabelled by the OT pairing of [a, b, c]; the path ends at π(θ²), which
    computes θ²'s function, and its straight line pairs each unit with its OT partner."""
    m, a, b = _pair([9])
    spec = spec_for(m)
    sigma = Permutation({"P_0": torch.randperm(9, generator=torch.Generator().manual_seed(5))}, spec)
    path = RD.connection_path("OT", a, sigma.apply(spec, a), torch.randn(12, 5))
    assert path.permutation == sigma.inverse()  # the planted relabelling is found and undone
    for k in a:  # a relabelled copy of θ¹ is transported back onto θ¹: the path is constant
        torch.testing.assert_close(path.end[k], a[k], rtol=0, atol=0)
    x = torch.randn(30, 5)
    path = RD.connection_path("OT", a, b, x)
    assert not path.permutation.is_identity()
    torch.testing.assert_close(_logits(m, path.end, x), _logits(m, b, x), rtol=1e-5, atol=1e-5)


def test_unit_samples_are_table1_samples():
    """The units of group P_0 of a one-hidden-layer MLP: rows of [a_n, b_n, c_n] (all tensors the group
    touches) and [a_n, b_n] (incoming only), read through the spec."""
    m, a, _ = _pair([7])
    spec = spec_for(m)
    full = torch.cat([a["layers.0.weight"], a["layers.0.bias"][:, None], a["head.weight"].T], 1)
    assert torch.equal(RD.unit_samples(spec, "P_0", a), full)
    assert torch.equal(RD.unit_samples(spec, "P_0", a, incoming=True), full[:, :6])
    with pytest.raises(ValueError, match="unknown group 'P_9'"):
        RD.unit_samples(spec, "P_9", a)


def test_dense_chain_reads_the_mlp_spec():
    m = _mlp([6, 4], bias=False)
    chain = RD.dense_chain(spec_for(m))
    assert chain.weights == ("layers.0.weight", "layers.1.weight", "head.weight")
    assert chain.biases == (None, None, None)
    assert chain.groups == ("P_0", "P_1") and chain.depth == 3
    m = _mlp([6, 4])
    chain = RD.dense_chain(spec_for(m))
    assert chain.biases == ("layers.0.bias", "layers.1.bias", "head.bias")
    assert chain.layer_keys(2) == ("head.weight", "head.bias")
    p = init_params(m, 0)
    assert chain.to_params(chain.layers(p), p).keys() == p.keys()
    step = chain.permutation(1, torch.tensor([3, 2, 1, 0]))
    assert step.num_moved() == {"P_0": 0, "P_1": 4}
    q = step.apply(chain.spec, p)
    assert torch.equal(q["layers.1.weight"], p["layers.1.weight"].flip(0))
    assert torch.equal(q["head.weight"], p["head.weight"].flip(1))
    assert torch.equal(q["layers.0.weight"], p["layers.0.weight"])


def test_a_traced_spec_gives_the_same_paths():
    """The connectors read whatever spec describes the chain: ``trace_spec``'s group names
    (``P_layers.0``, …) give the same points as ``spec_for``'s (``P_0``, …)."""
    m, a, b = _pair([6, 5])
    x = torch.randn(8, 5)
    traced = trace_spec(m, x)
    for method in ("Arc", "OT + B-fly", "OT + WA"):
        p, q = RD.connection_path(method, a, b, x), RD.connection_path(method, a, b, x, spec=traced)
        assert q.chain.groups == ("P_layers.0", "P_layers.1")
        tp, tq = p.grid(3)[1], q.grid(3)[1]
        for k in a:
            assert torch.equal(tp[k], tq[k])
        assert [p.permutation[g].tolist() for g in p.chain.groups] == \
            [q.permutation[g].tolist() for g in q.chain.groups]
    members = RD.wa_ensemble(a, [b], x, 1, spec=traced)
    assert all(torch.equal(u, v) for u, v in zip(members[1].values(), RD.wa_ensemble(a, [b], x, 1)[1].values(),
                                                 strict=True))


class _ResidualMLP(nn.Module):
    """x → l0 → relu → (+ relu(l1(·))) → head: the residual adds l1's outputs to l0's."""

    def __init__(self):
        super().__init__()
        self.l0, self.l1, self.head = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.l0(x))
        return self.head(h + torch.relu(self.l1(h)))


def test_unsupported_specs_are_refused():
    """A residual stream, normalisation layers, convolutions: refused with the key or group named,
    never connected as if they were a plain dense chain."""
    res = _ResidualMLP()
    spec = trace_spec(res, torch.randn(2, 5))
    p = {k: v.detach() for k, v in res.state_dict().items()}
    with pytest.raises(ValueError, match="written by several layers.*residual stream"):
        RD.connection_path("Linear", p, p, spec=spec)
    with pytest.raises(ValueError, match="residual stream"):
        RD.wa_ensemble(p, [p], torch.randn(4, 5), 1, spec=spec)
    with pytest.raises(ValueError, match="not a point of a zoo MLP"):
        RD.connection_path("Linear", p, p)  # no spec: the keys are not an MLP's
    hand = PermutationSpec({"a.weight": ("P", None), "b.weight": ("P", "P"), "head.weight": (None, "P")},
                           {"a.weight": (4, 5), "b.weight": (4, 4), "head.weight": (3, 4)})
    with pytest.raises(ValueError, match="group 'P' is written by several layers"):
        RD.dense_chain(hand)
    resnet = build_model({"name": "resnet", "in_channels": 1, "num_classes": 3, "depth": 8, "base": 2,
                          "dims": 1})
    with pytest.raises(ValueError, match="residual stream"):
        RD.dense_chain(spec_for(resnet))
    vgg = build_model({"name": "cnn1d", "in_channels": 1, "channels": [4], "num_classes": 3})
    with pytest.raises(ValueError, match="convolution"):
        RD.dense_chain(spec_for(vgg))
    ln = build_model({"name": "mlp", "in_features": 5, "widths": [6], "num_classes": 3, "norm": "layer"})
    q = init_params(ln, 0)
    with pytest.raises(ValueError, match="'norms.0.weight'.*not the bias of a dense layer"):
        RD.connection_path("OT", q, q, torch.randn(4, 5))
    with pytest.raises(ValueError, match="'norms.0.weight'"):
        RD.wa_ensemble(q, [q], torch.randn(4, 5), 1)
    with pytest.raises(TypeError, match="spec must be a PermutationSpec"):
        RD.dense_chain({"layers.0.weight": ("P_0", None)})


@pytest.mark.parametrize("widths", [[8], [6, 7], [5, 6, 4]])
@pytest.mark.parametrize("bias", [True, False])
def test_every_method_builds_a_continuous_path(widths, bias):
    m, a, b = _pair(widths, bias)
    x, y = torch.randn(25, 5), torch.randint(0, 3, (25,))
    a0, b0 = clone(a), clone(b)
    D = len(widths) + 1
    expected = {"straight": 1, "simultaneous": 1, "butterfly": D - 1, "ot_butterfly": D - 1, "wa": D, "ot_wa": D}
    for method, (proc, _) in RD.METHODS.items():
        path = RD.connection_path(method, a, b, x)
        assert path.segments == expected[proc], method
        tau, pts = path.grid(4)
        assert tau.numel() == 3 * path.segments + 1
        assert all(v.shape[0] == tau.numel() and v.dtype == a[k].dtype for k, v in pts.items())
        for k in a:
            torch.testing.assert_close(pts[k][0], a[k], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(pts[k][-1], path.end[k], rtol=1e-6, atol=1e-6)
        for s in range(path.segments - 1):
            e, st = path.segment_points(s, [1.0]), path.segment_points(s + 1, [0.0])
            for k in e:
                torch.testing.assert_close(e[k], st[k], rtol=1e-5, atol=1e-5)
        metrics = evaluate_points(m, pts, x, y)
        assert torch.isfinite(metrics.loss).all()
        assert isinstance(path.permutation, Permutation)
        q = path.permutation.apply(path.spec, b)  # the path ends at P(θ²): the same function as θ²
        for k in a:
            assert torch.equal(q[k], path.end[k])
        if not proc.startswith("ot_"):
            assert path.permutation.is_identity()
        for s in range(path.segments):  # a piece moves the layers it says, the others stay put
            seg = path.segment_points(s, [0.0, 0.4, 1.0])
            still = set(a) - set(path.moved_keys(s))
            assert all(torch.equal(seg[k][i], seg[k][0]) for k in still for i in range(3))
            assert any(not torch.equal(seg[k][2], seg[k][0]) for k in path.moved_keys(s))
    for k in a:  # inputs untouched
        assert torch.equal(a[k], a0[k]) and torch.equal(b[k], b0[k])


def test_wa_path_fits_network_one_on_x_when_overparameterised():
    """Linear + WA: with fewer fitting inputs than hidden units every point of the first segment
    computes θ¹'s logits on x (the re-solved head reproduces them), in float32 endpoints too."""
    m, a, b = _pair([40])
    x = torch.randn(10, 5)
    path = RD.connection_path("Linear + WA", a, b, x)
    pts = path.segment_points(0, torch.linspace(0, 1, 5))
    want = _logits(m, a, x)
    for i in range(5):
        got = _logits(m, {k: v[i] for k, v in pts.items()}, x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_adjust_layer_without_bias_and_least_squares_optimality():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(3, 4, generator=g, dtype=torch.float64)
    f_from, f_to = torch.randn(50, 4, generator=g, dtype=torch.float64), torch.randn(50, 4, generator=g,
                                                                                      dtype=torch.float64)
    Wt, bt = RD.adjust_layer((W, None), f_from, f_to)
    assert bt is None
    want = torch.linalg.lstsq(f_to, f_from @ W.T).solution.T
    torch.testing.assert_close(Wt, want)


def test_wa_ensemble_structure_and_metrics():
    m = _mlp([12, 10])
    nets = [init_params(m, s) for s in range(3)]
    x = torch.randn(40, 5)
    for n in (1, 2):
        members = RD.wa_ensemble(nets[0], nets[1:], x, n)
        assert len(members) == 3
        for mem in members[1:]:
            for i in range(3 - n):
                assert torch.equal(mem[f"layers.{i}.weight"], nets[0][f"layers.{i}.weight"])
            assert set(mem) == set(nets[0])
    members = RD.wa_ensemble(nets[0], nets[1:], x, 1)
    assert torch.equal(members[1]["layers.1.weight"], nets[0]["layers.1.weight"])
    assert torch.equal(members[1]["layers.0.weight"], nets[0]["layers.0.weight"])
    assert not torch.equal(members[1]["head.weight"], nets[1]["head.weight"])


def test_errors_name_the_problem():
    m, a, b = _pair([6])
    with pytest.raises(ValueError, match="unknown method"):
        RD.connection_path("Bezier", a, b)
    with pytest.raises(ValueError, match="needs the fitting inputs"):
        RD.connection_path("Linear + WA", a, b)
    with pytest.raises(TypeError, match="x must be a Tensor"):
        RD.connection_path("OT", a, b, [[1.0]])
    _, c, _ = _pair([7])
    with pytest.raises(ValueError, match="theta2 do not fit the spec.*'layers.0.weight'"):
        RD.connection_path("Linear", a, c)
    _, d, _ = _pair([6, 6])
    with pytest.raises(ValueError, match="theta2 do not fit the spec.*unexpected keys"):
        RD.connection_path("Linear", a, d)
    with pytest.raises(ValueError, match="at least one hidden layer"):
        e = init_params(_mlp([]), 0)
        RD.connection_path("Linear", e, e)
    with pytest.raises(TypeError, match=r"theta1\['head.bias'\] must be a Tensor"):
        RD.connection_path("Linear", {**a, "head.bias": [0.0]}, b)
    with pytest.raises(ValueError, match="no 'head.weight'"):
        RD.connection_path("Linear", {"layers.0.weight": torch.zeros(2, 2)}, b)
    with pytest.raises(ValueError, match="must lie in"):
        RD.lin_connect(torch.zeros(2), torch.ones(2), [1.5])
    with pytest.raises(ValueError, match="different shapes"):
        RD.arc_connect(torch.zeros(2, 3), torch.zeros(3, 2), 0.5)
    with pytest.raises(ValueError, match="unknown connection"):
        RD.connect(torch.zeros(2), torch.ones(2), 0.5, "slerp")
    chain = RD.dense_chain(spec_for(m))
    with pytest.raises(ValueError, match="not a bijection"):
        chain.permutation(0, torch.tensor([0, 0, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="hidden group index 1 out of range"):
        chain.permutation(1, torch.arange(6))
    with pytest.raises(ValueError, match="n_top must be an integer <= 1"):
        RD.wa_ensemble(a, [b], torch.randn(4, 5), 2)
    with pytest.raises(TypeError, match="n_top must be an integer"):
        RD.wa_ensemble(a, [b], torch.randn(4, 5), True)
    with pytest.raises(ValueError, match=r"others\[0\] do not fit the spec"):
        RD.wa_ensemble(a, [c], torch.randn(4, 5), 1)
    with pytest.raises(ValueError, match="inputs have 4 features"):
        RD.hidden_features(chain.layers(a), torch.randn(3, 4))
    with pytest.raises(ValueError, match="mode"):
        RD.ot_permutation(a, b, torch.randn(4, 5), "sinkhorn")
    with pytest.raises(ValueError, match="path times must lie"):
        RD.connection_path("Linear", a, b).points([2.0])
    with pytest.raises(ValueError, match="points_per_segment"):
        RD.connection_path("Linear", a, b).grid(1)
    with pytest.raises(ValueError, match="segment 1 out of range"):
        RD.connection_path("Linear", a, b).moved_keys(1)


def test_dense_chain_refuses_concatenations_and_attention_heads() -> None:
    """A segmented (concatenated) axis or a head class is no dense chain: a clear refusal, never a
    connector built on the wrong units."""
    from reference.permutation import PermutationSpec

    shapes = {"a.weight": (4, 3), "h.weight": (2, 6)}
    segs = PermutationSpec({"a.weight": ("A", None), "h.weight": (None, (("A", 4), (None, 2)))}, shapes)
    with pytest.raises(ValueError, match="concatenated"):
        RD.dense_chain(segs)
    heads = PermutationSpec(
        {"a.weight": ("A", None), "b.weight": ("B", None), "h.weight": (None, "A")},
        {"a.weight": (4, 3), "b.weight": (4, 3), "h.weight": (2, 4)},
        {"A": 2, "B": 2},
        {"A": "H", "B": "H"},
    )
    with pytest.raises(ValueError, match="head classes"):
        RD.dense_chain(heads)
