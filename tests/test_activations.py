"""reference/activations.py: producers and their channel axes, capture, float64 statistics.

The case that failed before this module existed: ``activation_matching`` on ``CNN1D(norm="layer")``
read the output of ``ChannelLayerNorm.ln`` (channels last, ``[B, L, C]``) along dim 1 and raised
"group 'P_conv0': permutation has length 12, the group has size 8".
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_nets import LinearTwice, general_params
from torch import nn
from torch.func import functional_call

from reference.activations import (
    ChannelStats,
    CrossMoments,
    Producer,
    channel_stats,
    cross_correlations,
    forward_order,
    group_producers,
    hooked,
)
from reference.bn import recompute_bn_stats
from reference.matching import activation_matching
from reference.merge import channel_statistics, repair
from reference.models import CNN1D, MLP, VGG, ResNet, init_params
from reference.permutation import Permutation
from reference.specs import spec_for, trace_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


_normal = general_params


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class ConvLayerNormCF(nn.Module):
    """A LayerNorm over (C, L) applied to channels-first ``[B, C, L]`` data: channels at dim −2."""

    def __init__(self, c_in: int = 2, c: int = 6, length: int = 10, n_out: int = 3):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c, 3, padding=1)
        self.ln = nn.LayerNorm((c, length))
        self.conv2 = nn.Conv1d(c, c, 3, padding=1)
        self.head = nn.Linear(c, n_out)

    def forward(self, x):
        h = F.relu(self.ln(self.conv(x)))
        h = F.relu(self.conv2(h))
        return self.head(torch.flatten(F.adaptive_avg_pool1d(h, 1), 1))


class TokenMLP(nn.Module):
    """Linear + LayerNorm on ``[B, T, D]`` tokens: channels last, positions in the middle."""

    def __init__(self, d: int = 5, h: int = 7, n_out: int = 3):
        super().__init__()
        self.fc = nn.Linear(d, h)
        self.ln = nn.LayerNorm(h)
        self.out = nn.Linear(h, n_out)

    def forward(self, x):
        return self.out(F.relu(self.ln(self.fc(x))))


# ---------------------------------------------------------------------------------------------
# the case that failed


def test_activation_matching_on_cnn1d_layer_norm_recovers_inverse():
    model = CNN1D(1, (8, 8, 8), 5, norm="layer").double()
    spec = spec_for(model)
    theta = _normal(model, 0)
    P = Permutation.random(spec, 1)
    pb = P.apply(spec, theta)
    x = _x(24, 12)
    r = activation_matching(model, spec, theta, pb, x)
    assert r.perm == P.inverse(), (r.perm @ P).num_moved()
    aligned = r.perm.apply(spec, pb)
    assert all(torch.equal(aligned[k], theta[k]) for k in theta)
    # each unit correlates perfectly with its copy: 3 groups × 8 units × one producer (up to the
    # eps of corr's denominator)
    assert r.objective == pytest.approx(24.0, rel=1e-5)
    assert r.history[0] < r.objective
    # chunking does not change the result
    r7 = activation_matching(model, spec, theta, pb, x, batch_size=7)
    assert r7.perm == r.perm and r7.objective == pytest.approx(r.objective, rel=1e-12)


@pytest.mark.parametrize(
    "make,xshape",
    [
        (lambda: VGG(3, [6, "M", 8], 4, norm="layer"), (16, 3, 6, 6)),
        (lambda: ResNet(3, 4, depth=8, norm="layer", base=4), (16, 3, 6, 6)),
        (lambda: MLP(10, [7, 6], 3, norm="layer"), (32, 10)),
        (lambda: VGG(2, [6, 8], 4, norm="group", groups=2, dims=1), (16, 2, 9)),
        (lambda: ResNet(3, 4, depth=8, norm="batch", base=4, dims=1), (16, 3, 8)),
    ],
    ids=["vgg-ln", "resnet-ln", "mlp-ln", "vgg1d-gn", "resnet1d-bn"],
)
def test_activation_matching_recovers_inverse_with_norms(make, xshape):
    model = make().double()
    spec = spec_for(model)
    theta = _normal(model, 2)
    P = Permutation.random(spec, 3)
    r = activation_matching(model, spec, theta, P.apply(spec, theta), _x(*xshape, seed=4))
    assert r.perm == P.inverse(), (r.perm @ P).num_moved()


# ---------------------------------------------------------------------------------------------
# producers and channel axes


def test_producers_of_the_zoo():
    mlp = group_producers(MLP(4, [5, 6], 3), spec_for(MLP(4, [5, 6], 3)))
    assert mlp == {
        "P_0": (Producer("layers.0", "P_0", -1, 0, "layer"),),
        "P_1": (Producer("layers.1", "P_1", -1, 0, "layer"),),
    }
    ln = CNN1D(1, (4, 4), 3, norm="layer")
    got = group_producers(ln, spec_for(ln))
    assert got["P_conv0"] == (Producer("blocks.0.norm.ln", "P_conv0", -1, 0, "norm"),)
    plain = CNN1D(1, (4, 4), 3)
    assert group_producers(plain, spec_for(plain))["P_conv1"] == (Producer("blocks.1.conv", "P_conv1", -2, 0, "layer"),)
    vgg = VGG(3, [4, 4], 3, norm="batch")
    assert group_producers(vgg, spec_for(vgg))["P_conv0"] == (Producer("features.0.norm", "P_conv0", 1, 0, "norm"),)
    vgg2 = VGG(3, [4, 4], 3)
    assert group_producers(vgg2, spec_for(vgg2))["P_conv0"][0].dim == -3  # Conv2d: [B, C, H, W]
    res = ResNet(3, 4, depth=8, norm="group", base=4)
    stream = group_producers(res, spec_for(res))["P_stage2"]
    assert [p.name for p in stream] == ["layer2.0.norm2", "layer2.0.shortcut.1"]
    assert all(p.dim == 1 for p in stream)
    res0 = ResNet(3, 4, depth=8, norm=None, base=4)
    assert [p.name for p in group_producers(res0, spec_for(res0))["P_stage1"]] == ["conv", "layer1.0.conv2"]


def test_layer_norm_over_channels_first_data_reads_dim_minus_two():
    model = ConvLayerNormCF().double()
    x = _x(20, 2, 10)
    spec = trace_spec(model, x[:2])
    prods = group_producers(model, spec)
    (p,) = prods[spec.axes["ln.weight"][0]]
    assert (p.name, p.dim, p.weight_axis, p.kind) == ("ln", -2, 0, "norm")
    theta = _normal(model, 5)
    # the statistics are those of the LayerNorm output over examples and positions, per channel
    z = F.layer_norm(
        F.conv1d(x, theta["conv.weight"], theta["conv.bias"], padding=1), (6, 10), theta["ln.weight"], theta["ln.bias"]
    )
    mu, sd = channel_stats(model, theta, x, [p], batch_size=6)["ln"]
    torch.testing.assert_close(mu, z.mean((0, 2)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sd, z.std((0, 2), correction=0), rtol=1e-10, atol=1e-12)
    P = Permutation.random(spec, 6)
    r = activation_matching(model, spec, theta, P.apply(spec, theta), x)
    assert r.perm == P.inverse()


def test_channels_last_tokens():
    model = TokenMLP().double()
    x = _x(6, 4, 5)
    spec = trace_spec(model, x[:2])
    (p,) = group_producers(model, spec)[spec.axes["fc.weight"][0]]
    assert (p.name, p.dim) == ("ln", -1)
    theta = _normal(model, 1)
    z = F.layer_norm(x @ theta["fc.weight"].T + theta["fc.bias"], (7,), theta["ln.weight"], theta["ln.bias"])
    mu, sd = channel_stats(model, theta, x, [p])["ln"]
    torch.testing.assert_close(mu, z.reshape(-1, 7).mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sd, z.reshape(-1, 7).std(0, correction=0), rtol=1e-10, atol=1e-12)


def test_cnn1d_layer_norm_statistics_are_per_channel():
    """Direct computation: conv, then LayerNorm over channels at each position."""
    model = CNN1D(1, (5,), 3, norm="layer", kernel_size=3).double()
    theta = _normal(model, 0)
    x = _x(9, 11)
    h = F.conv1d(x[:, None], theta["blocks.0.conv.weight"], theta["blocks.0.conv.bias"], padding=1)
    z = F.layer_norm(h.movedim(1, -1), (5,), theta["blocks.0.norm.ln.weight"], theta["blocks.0.norm.ln.bias"])
    got = channel_statistics(model, theta, x, batch_size=4)
    assert list(got) == ["blocks.0.norm.ln"]
    mu, sd = got["blocks.0.norm.ln"]
    torch.testing.assert_close(mu, z.reshape(-1, 5).mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sd, z.reshape(-1, 5).std(0, correction=0), rtol=1e-10, atol=1e-12)


def test_repair_rescales_a_two_dimensional_layer_norm_along_its_group_axis():
    """REPAIR with a LayerNorm((C, L)) producer: weight and bias [C, L] scaled per channel (axis 0);
    the repaired channels hit Σ kᵢ (μᵢ, σᵢ) (Jordan et al. 2023, §4)."""
    model = ConvLayerNormCF().double()
    x = _x(30, 2, 10, seed=1)
    spec = trace_spec(model, x[:2])
    pts = [_normal(model, s) for s in (0, 1)]
    rep = repair(model, pts, [0.4, 0.6], x, spec=spec)
    got = channel_statistics(model, rep, x, spec=spec)
    ends = [channel_statistics(model, p, x, spec=spec) for p in pts]
    for n, (mu, sd) in got.items():
        torch.testing.assert_close(mu, 0.4 * ends[0][n][0] + 0.6 * ends[1][n][0], rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(sd, 0.4 * ends[0][n][1] + 0.6 * ends[1][n][1], rtol=1e-8, atol=1e-8)


def test_unsupported_producers_raise():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.weight

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)
            self.scale = Scale()
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.scale(self.fc(x)))

    from reference.permutation import PermutationSpec

    net = Net()
    axes = {
        "fc.weight": ("P", None),
        "fc.bias": ("P",),
        "scale.weight": ("P",),
        "out.weight": (None, "P"),
        "out.bias": (None,),
    }
    spec = PermutationSpec.from_params(axes, net.state_dict())
    with pytest.raises(ValueError, match="cannot tell which axis"):
        group_producers(net, spec)
    # a group carried by no weight's output axis (only a bias and an input axis)
    only_inputs = {**axes, "fc.weight": (None, None), "scale.weight": (None,)}
    spec2 = PermutationSpec.from_params(only_inputs, net.state_dict())
    with pytest.raises(ValueError, match="no module produces the units of group 'P'"):
        group_producers(net, spec2)


# ---------------------------------------------------------------------------------------------
# capture: hooks removed, flags restored, order


def test_hooks_removed_and_flags_restored_after_errors():
    model = VGG(3, [4, 4], 3, norm="batch").double()
    model.train()
    model.features[0].norm.eval()  # mixed flags must come back as they were
    flags = {n: m.training for n, m in model.named_modules()}
    spec = spec_for(model)
    theta = _normal(model, 0)
    prods = [p for ps in group_producers(model, spec).values() for p in ps]
    with pytest.raises(RuntimeError):
        channel_stats(model, theta, _x(4, 5, 6, 6), prods)  # wrong input channels
    with pytest.raises(RuntimeError):
        cross_correlations(model, theta, theta, _x(4, 5, 6, 6), prods, train=True)
    with pytest.raises(ValueError, match="boom"):
        with hooked(model, [p.name for p in prods], lambda *_: None):
            raise ValueError("boom")
    assert _hooks_left(model) == 0
    assert {n: m.training for n, m in model.named_modules()} == flags
    channel_stats(model, theta, _x(4, 3, 6, 6), prods)
    recompute_bn_stats(model, theta, _x(4, 3, 6, 6), batch_size=3)
    activation_matching(model, spec, theta, theta, _x(4, 3, 6, 6), train_mode=True)
    assert _hooks_left(model) == 0
    assert {n: m.training for n, m in model.named_modules()} == flags


def test_train_mode_statistics_leave_running_stats_alone():
    model = VGG(3, [4], 3, norm="batch").double()
    theta = _normal(model, 0)
    before = {k: v.clone() for k, v in theta.items()}
    prods = [p for ps in group_producers(model, spec_for(model)).values() for p in ps]
    ev = channel_stats(model, theta, _x(8, 3, 5, 5), prods)
    tr = channel_stats(model, theta, _x(8, 3, 5, 5), prods, train=True)
    assert all(torch.equal(theta[k], before[k]) for k in theta)
    # train mode normalises by the batch: each BN channel has mean β, std |γ| (up to BN's eps)
    mu, sd = tr["features.0.norm"]
    torch.testing.assert_close(mu, theta["features.0.norm.bias"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sd, theta["features.0.norm.weight"].abs(), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(ev["features.0.norm"][0], mu)


def test_forward_order_and_modules_run_twice():
    model = ResNet(3, 4, depth=8, norm=None, base=4).double()
    theta = _normal(model, 0)
    names = ["layer2.0.conv2", "conv", "layer1.0.conv2"]
    assert forward_order(model, theta, names, _x(2, 3, 6, 6)) == ["conv", "layer1.0.conv2", "layer2.0.conv2"]

    net = LinearTwice(3).double()
    p = {k: v.double() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"twice \['fc'\]"):
        forward_order(net, p, ["fc"], _x(2, 3))
    # statistics count every call: the two outputs of fc together
    prod = Producer("fc", "P", -1, 0, "layer")
    x = _x(5, 3)
    h1 = x @ p["fc.weight"].T + p["fc.bias"]
    h2 = torch.relu(h1) @ p["fc.weight"].T + p["fc.bias"]
    mu, sd = channel_stats(net, p, x, [prod], batch_size=2)["fc"]
    both = torch.cat([h1, h2])
    torch.testing.assert_close(mu, both.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sd, both.std(0, correction=0), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# accumulators


@pytest.mark.parametrize("chunk", [1, 3, 7, 50])
def test_channel_stats_parallel_update_matches_one_pass(chunk):
    """Chan, Golub & LeVeque 1979: merged chunks give the one-pass mean and population std."""
    v = _x(50, 4) * torch.tensor([1.0, 10.0, 1e-3, 1e3], dtype=torch.float64) + 5.0
    st = ChannelStats()
    for s in range(0, 50, chunk):
        st.add(v[s : s + chunk])
    mu, sd = st.result()
    assert st.n == 50
    torch.testing.assert_close(mu, v.mean(0), rtol=1e-13, atol=0)
    torch.testing.assert_close(sd, v.std(0, correction=0), rtol=1e-11, atol=0)


def test_cross_moments_are_pearson_correlations():
    a, b = _x(40, 3, seed=1), _x(40, 5, seed=2)
    b[:, 0] = 2.0 * a[:, 1] - 1.0  # a perfectly correlated pair
    m = CrossMoments()
    for s in range(0, 40, 9):
        m.add(a[s : s + 9], b[s : s + 9])
    want = np.corrcoef(a.numpy().T, b.numpy().T)[:3, 3:]
    torch.testing.assert_close(m.corr(eps=0.0), torch.from_numpy(want), rtol=1e-10, atol=1e-12)
    assert float(m.corr()[1, 0]) == pytest.approx(1.0, abs=1e-7)
    with pytest.raises(ValueError, match="rows"):
        m.add(a[:3], b[:4])


def test_cross_correlations_of_a_model_with_itself_are_its_correlations():
    model = MLP(6, [5], 2).double()
    spec = spec_for(model)
    theta = _normal(model, 0)
    x = _x(30, 6)
    (p,) = group_producers(model, spec)["P_0"]
    c = cross_correlations(model, theta, theta, x, [p], batch_size=8)["layers.0"].corr(eps=0.0)
    h = x @ theta["layers.0.weight"].T + theta["layers.0.bias"]
    torch.testing.assert_close(c, torch.from_numpy(np.corrcoef(h.numpy().T)), rtol=1e-10, atol=1e-12)
    assert functional_call(model, theta, (x,)).shape == (30, 2)  # the model itself is untouched


def test_input_checks():
    model = MLP(6, [5], 2)
    spec = spec_for(model)
    a = init_params(model, 0)
    with pytest.raises(ValueError, match="at least 2 examples"):
        activation_matching(model, spec, a, a, torch.randn(1, 6))
    with pytest.raises(ValueError, match="batch_size"):
        activation_matching(model, spec, a, a, torch.randn(4, 6), batch_size=0)
    with pytest.raises(TypeError, match="floating-point"):
        activation_matching(model, spec, a, a, torch.ones(4, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="no modules named"):
        with hooked(model, ["nope"], lambda *_: None):
            pass
    wrong = Producer("layers.0", "P_0", -1, 0, "layer")
    with pytest.raises(ValueError, match="has 5 channels on axis -1, group 'P_0' has 4 units"):
        channel_stats(model, a, torch.randn(4, 6), [wrong], sizes={"P_0": 4})
