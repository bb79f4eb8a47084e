"""The model zoo and its permutation specs: hand-written == fx-derived, and both are symmetries.

Eq. (1) of Ainsworth et al. 2023 (Git Re-Basin): f(P(θ), x) = f(θ, x) for every permutation P of
hidden units, with BatchNorm running statistics permuted along with their channels.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tiny_nets import nontrivial
from torch import Tensor, nn
from torch.func import functional_call

from reference.fit import module_mode
from reference.models import CNN1D, MLP, VGG, ChannelLayerNorm, ReshapeMaxPool1d, ResNet, build_model, init_params
from reference.optim import TrainConfig
from reference.params import Params, clone
from reference.permutation import Permutation, PermutationSpec
from reference.specs import spec_for, trace_spec
from reference.trace import trace_report
from reference.train import train as train_endpoint

ATOL = RTOL = 1e-5  # float32: permuted sums run in another order

NORMS = [None, "batch", "layer", "group"]


def _cases() -> list[tuple[str, dict[str, Any], tuple[int, ...]]]:
    cases: list[tuple[str, dict[str, Any], tuple[int, ...]]] = [
        ("mlp", {"name": "mlp", "in_features": 12, "widths": [7, 5, 6], "num_classes": 3}, (5, 12)),
        (
            "mlp-image-nobias",
            {"name": "mlp", "in_features": 12, "widths": [4], "num_classes": 3, "bias": False},
            (5, 3, 2, 2),
        ),
        ("mlp-linear", {"name": "mlp", "in_features": 6, "widths": [], "num_classes": 2}, (5, 6)),
        ("mlp-layernorm", {"name": "mlp", "in_features": 12, "widths": [7, 5], "num_classes": 3, "norm": "layer"},
         (5, 12)),
        (
            "resnet20",
            {"name": "resnet", "in_channels": 3, "num_classes": 4, "depth": 20, "norm": "batch"},
            (2, 3, 8, 8),
        ),
    ]
    for norm in NORMS:
        for dims, shape in ((1, (5, 3, 16)), (2, (5, 3, 8, 8))):
            cases.append(
                (
                    f"vgg-{norm}-{dims}d",
                    {
                        "name": "vgg",
                        "in_channels": 3,
                        "channels": [8, "M", 6, 12],
                        "num_classes": 5,
                        "norm": norm,
                        "dims": dims,
                    },
                    shape,
                )
            )
            cases.append(
                (
                    f"resnet8-{norm}-{dims}d",
                    {
                        "name": "resnet",
                        "in_channels": 3,
                        "num_classes": 5,
                        "depth": 8,
                        "base": 4,
                        "norm": norm,
                        "dims": dims,
                    },
                    shape,
                )
            )
        cases.append(
            (
                f"resnet14x2-{norm}",
                {
                    "name": "resnet",
                    "in_channels": 2,
                    "num_classes": 3,
                    "depth": 14,
                    "width": 2,
                    "base": 2,
                    "norm": norm,
                    "groups": 4,
                },
                (3, 2, 8, 8),
            )
        )
        cases.append((f"cnn1d-{norm}", {"name": "cnn1d", "channels": [8, 6, 8], "norm": norm}, (5, 40)))
    cases.append(
        (
            "cnn1d-3ch-nobias",
            {"name": "cnn1d", "in_channels": 3, "channels": [4, 4], "bias": False, "kernel_size": 3},
            (5, 3, 20),
        )
    )
    return cases


CASES = _cases()
IDS = [c[0] for c in CASES]


def _input(shape: tuple[int, ...], seed: int = 0) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _moving_perm(spec: PermutationSpec, seed: int = 0) -> Permutation:
    """A random permutation that moves some unit of every group of size > 1."""
    for s in range(seed, seed + 100):
        p = Permutation.random(spec, s)
        moved = p.num_moved()
        if all(moved[g] > 0 for g, n in spec.sizes.items() if n > 1):
            return p
    raise RuntimeError("no moving permutation found")  # pragma: no cover


def _forward(model: nn.Module, params: Params, x: Tensor, train: bool) -> Tensor:
    """f(θ, x) in train or eval mode; ``params`` is copied (train-mode BatchNorm updates its buffers)."""
    with module_mode(model, train), torch.no_grad():
        return functional_call(model, clone(params), (x,))


def _setup(config: dict[str, Any], shape: tuple[int, ...]) -> tuple[nn.Module, Params, Tensor]:
    model = build_model(config)
    return model, nontrivial(init_params(model, 0), 1), _input(shape)


# --------------------------------------------------------------------------------------------
# models: configs, rebuilding, initialisation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "config", "shape"), CASES, ids=IDS)
def test_build_model_round_trip(name: str, config: dict[str, Any], shape: tuple[int, ...]) -> None:
    """``build_model(m.config)`` (also through JSON) rebuilds the same architecture and function."""
    model = build_model(config)
    again = build_model(json.loads(json.dumps(model.config)))
    assert again.config == model.config
    assert type(again) is type(model)
    sd, sd2 = model.state_dict(), again.state_dict()
    assert list(sd) == list(sd2)
    assert all(sd[k].shape == sd2[k].shape and sd[k].dtype == sd2[k].dtype for k in sd)
    params, x = init_params(model, 3), _input(shape)
    for train in (True, False):
        torch.testing.assert_close(_forward(model, params, x, train), _forward(again, params, x, train))
    out = _forward(model, params, x, False)
    assert out.shape == (shape[0], config.get("num_classes", 10))


def test_build_model_errors() -> None:
    with pytest.raises(ValueError, match="'transformer'"):
        build_model({"name": "transformer"})
    with pytest.raises(ValueError, match="name"):
        build_model({"in_features": 3})
    with pytest.raises(ValueError, match="depthh"):
        build_model({"name": "resnet", "in_channels": 3, "num_classes": 2, "depthh": 8})
    with pytest.raises(ValueError, match="num_classes"):
        build_model({"name": "mlp", "in_features": 3, "widths": [2]})
    with pytest.raises(TypeError):
        build_model([("name", "mlp")])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="6n"):
        ResNet(3, 10, depth=10)
    with pytest.raises(ValueError, match="norm"):
        VGG(3, [8], 10, norm="instance")
    with pytest.raises(ValueError, match="groups=3"):
        VGG(3, [8], 10, norm="group", groups=3)
    with pytest.raises(ValueError, match="dims"):
        VGG(3, [8], 10, dims=3)
    with pytest.raises(TypeError, match=r"widths\[1\]"):
        MLP(3, [4, 2.5], 10)  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"channels\[0\]"):
        CNN1D(channels=[0, 4])


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: MLP(True, [4], 3), TypeError, r"in_features must be an integer, got True"),
        (lambda: MLP(3, [4], 0), ValueError, r"num_classes must be an integer >= 1, got 0"),
        (lambda: MLP(3, "44", 3), TypeError, r"widths must be a sequence of integers"),
        (lambda: MLP(3, [4, 2.5], 3), ValueError, r"widths\[1\] must be an integer, got 2.5"),
        (lambda: MLP(3, [4], 3, bias=1), TypeError, r"bias must be True or False, got 1"),
        (lambda: MLP(3, [4], 3, norm="batch"), ValueError, r"unknown MLP norm 'batch'"),
        (lambda: VGG(3, [8, "M"], 10, dims=2.0), TypeError, r"dims must be an integer, got 2.0"),
        (lambda: VGG(3, [8], 10, dims=0), ValueError, r"dims must be an integer >= 1"),
        (lambda: VGG(3, [8], 10, dims=True), TypeError, r"dims must be an integer, got True"),
        (lambda: VGG(3, [8, "N"], 10), TypeError, r"channels\[1\] must be an integer, got 'N'"),
        (lambda: VGG(3, "8M", 10), TypeError, r"channels must be a sequence"),
        (lambda: VGG(3, [8], 10, norm="group", groups=0), ValueError, r"groups must be an integer >= 1"),
        (lambda: CNN1D(kernel_size=3.0), TypeError, r"kernel_size must be an integer"),
        (lambda: CNN1D(bias="yes"), TypeError, r"bias must be True or False"),
        (lambda: ResNet(3, 10, depth=8, width=0), ValueError, r"width must be an integer >= 1"),
        (lambda: ResNet(3, 10, depth=8, norm="instance"), ValueError, r"unknown norm 'instance'; use one of"),
        (lambda: ChannelLayerNorm(False), TypeError, r"num_channels must be an integer"),
        (lambda: init_params(MLP(3, [4], 3), 1.0), TypeError, r"seed must be an integer"),
    ],
)
def test_model_argument_checks(make, error, match) -> None:
    """Every wrong type is both a TypeError and a ValueError (``validate.ArgumentTypeError``)."""
    with pytest.raises(error, match=match):
        make()
    with pytest.raises((TypeError, ValueError)):
        make()
    if error is TypeError:
        with pytest.raises(ValueError, match=match):
            make()


def test_init_params_deterministic() -> None:
    """Same seed → same point; another seed → another; the model and the global RNG are untouched."""
    model = build_model({"name": "resnet", "in_channels": 3, "num_classes": 4, "depth": 8, "base": 4})
    before = clone(model.state_dict())
    rng = torch.get_rng_state()
    a, b, c = init_params(model, 7), init_params(model, 7), init_params(model, 8)
    assert torch.equal(torch.get_rng_state(), rng)
    assert list(a) == list(model.state_dict())
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
        torch.testing.assert_close(model.state_dict()[k], before[k], rtol=0, atol=0)
    weights = [k for k in a if k.endswith("conv1.weight") or k == "head.weight"]
    assert weights and all(not torch.equal(a[k], c[k]) for k in weights)
    assert float(a["norm.running_var"].min()) == 1.0  # BatchNorm statistics are reset too


def test_init_params_rejects_unresettable_parameters() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.scale = nn.Parameter(torch.ones(2))

        def forward(self, x: Tensor) -> Tensor:
            return self.lin(x) * self.scale

    with pytest.raises(ValueError, match="scale"):
        init_params(Scaled(), 0)


def test_cnn1d_accepts_flat_and_channel_inputs() -> None:
    model, params, _ = _setup({"name": "cnn1d", "channels": [4, 4], "norm": "batch"}, (1,))
    x = _input((6, 40))
    torch.testing.assert_close(_forward(model, params, x, False), _forward(model, params, x[:, None], False))


@pytest.mark.parametrize("length", [40, 41, 2, 7])
def test_reshape_max_pool_equals_max_pool_in_values_and_gradient(length: int) -> None:
    # ReLU outputs: ties at zero in most windows, and windows of two equal positive values
    g = torch.Generator().manual_seed(length)
    x = torch.relu(torch.randn(5, 3, length, generator=g)).double()
    x[0, 0, : length // 2 * 2] = 0.5
    up = torch.randn(5, 3, length // 2, generator=g).double()
    grads = []
    for pool in (nn.MaxPool1d(2), ReshapeMaxPool1d(2)):
        xi = x.clone().requires_grad_()
        out = pool(xi)
        grads.append((out, torch.autograd.grad(out, xi, up)[0]))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    # inside vmap (curve training evaluates several points in one call) and under no_grad
    xs = x.unsqueeze(0).expand(2, -1, -1, -1).clone().requires_grad_()
    vm = torch.func.vmap(ReshapeMaxPool1d(2))(xs)
    (gv,) = torch.autograd.grad(vm, xs, up.expand(2, -1, -1, -1))
    assert torch.equal(vm[1], grads[0][0]) and torch.equal(gv[1], grads[0][1])
    with torch.no_grad():
        assert torch.equal(ReshapeMaxPool1d(2)(x), grads[0][0])
    # windows it does not reshape (overlapping, padded) are nn.MaxPool1d's
    for args in ((3, 1), (2, 2, 1)) if length >= 3 else ():
        assert torch.equal(ReshapeMaxPool1d(*args)(x.clone().requires_grad_()), nn.MaxPool1d(*args)(x))


def test_cnn1d_trains_to_the_same_weights_with_either_pool() -> None:
    data = torch.Generator().manual_seed(3)
    x, y = torch.randn(96, 40, generator=data), torch.randint(0, 10, (96,), generator=data)
    model = CNN1D(channels=(6, 6, 6), norm="batch")
    start = init_params(model, 0)
    cfg = TrainConfig.adam(2, batch_size=32)
    ours = train_endpoint(model, start, x, y, cfg, seed=1, progress=False)
    model.pools = nn.ModuleList(nn.MaxPool1d(2) for _ in model.pools)
    plain = train_endpoint(model, start, x, y, cfg, seed=1, progress=False)
    assert all(torch.equal(ours[k], plain[k]) for k in plain)


def test_channel_layer_norm_normalises_channels() -> None:
    ln = ChannelLayerNorm(5)
    x = _input((2, 5, 3, 4))
    y = ln(x)
    torch.testing.assert_close(y.mean(1), torch.zeros(2, 3, 4), atol=1e-5, rtol=0)
    assert [k for k in ln.state_dict()] == ["ln.weight", "ln.bias"]


# --------------------------------------------------------------------------------------------
# specs: hand-written == traced; both are symmetries of the function
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "config", "shape"), CASES, ids=IDS)
def test_trace_spec_matches_hand_spec(name: str, config: dict[str, Any], shape: tuple[int, ...]) -> None:
    """The fx-derived spec and the hand-written spec describe the same symmetry group."""
    model = build_model(config)
    hand, traced = spec_for(model), trace_spec(model, _input(shape))
    assert hand.same_symmetry(traced), (hand.axes, traced.axes, hand.blocks, traced.blocks)
    hidden = config.get("widths", config.get("channels", []))
    if config["name"] in ("mlp", "vgg", "cnn1d"):
        assert len(hand.sizes) == sum(1 for c in hidden if c != "M")  # one group per hidden layer
    if config.get("norm") == "group":
        assert hand.blocks and all(b > 1 for b in hand.blocks.values())  # blocks of 1 are no constraint


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("name", "config", "shape"), CASES, ids=IDS)
def test_permutation_preserves_function(
    name: str, config: dict[str, Any], shape: tuple[int, ...], train: bool
) -> None:
    """Eq. (1) of Ainsworth et al. 2023: f(P(θ), x) = f(θ, x), train and eval mode (fp32, 1e-5)."""
    model, params, x = _setup(config, shape)
    spec = spec_for(model)
    perm = _moving_perm(spec)
    permuted = perm.apply(spec, params)
    if spec.sizes:
        assert any(not torch.equal(params[k], permuted[k]) for k in params)  # P really moved weights
    torch.testing.assert_close(
        _forward(model, permuted, x, train), _forward(model, params, x, train), atol=ATOL, rtol=RTOL
    )


def _forget_running_stats(spec: PermutationSpec) -> PermutationSpec:
    """The bug of a popular PyTorch port: BatchNorm running statistics left unpermuted."""
    axes = {k: ((None,) if k.endswith(("running_mean", "running_var")) else a) for k, a in spec.axes.items()}
    return PermutationSpec(axes, spec.shapes, spec.blocks)


@pytest.mark.parametrize(
    "config",
    [
        {"name": "vgg", "in_channels": 3, "channels": [8, "M", 6], "num_classes": 5, "norm": "batch"},
        {"name": "resnet", "in_channels": 3, "num_classes": 5, "depth": 8, "base": 4, "norm": "batch"},
        {"name": "cnn1d", "channels": [8, 6], "norm": "batch"},
    ],
    ids=["vgg", "resnet", "cnn1d"],
)
def test_unpermuted_running_stats_break_eval_invariance(config: dict[str, Any]) -> None:
    """The invariance test has teeth: forgetting BN running stats passes in train mode, fails in eval."""
    shape = (5, 40) if config["name"] == "cnn1d" else (5, 3, 8, 8)
    model, params, x = _setup(config, shape)
    spec = spec_for(model)
    buggy = _forget_running_stats(spec)
    assert buggy.same_symmetry(spec) is False
    permuted = _moving_perm(spec).apply(buggy, params)
    torch.testing.assert_close(
        _forward(model, permuted, x, True), _forward(model, params, x, True), atol=ATOL, rtol=RTOL
    )
    with pytest.raises(AssertionError):
        torch.testing.assert_close(
            _forward(model, permuted, x, False), _forward(model, params, x, False), atol=ATOL, rtol=RTOL
        )


@pytest.mark.parametrize(
    "config",
    [
        {
            "name": "vgg",
            "in_channels": 3,
            "channels": [8, "M", 12],
            "num_classes": 5,
            "norm": "group",
            "groups": 2,
        },
        {"name": "resnet", "in_channels": 3, "num_classes": 5, "depth": 8, "base": 4, "norm": "group"},
        {"name": "cnn1d", "channels": [8, 6], "norm": "group", "groups": 2},
    ],
    ids=["vgg", "resnet", "cnn1d"],
)
def test_groupnorm_blocks(config: dict[str, Any]) -> None:
    """GroupNorm(g, C): a permutation moving channels across the C/g blocks is rejected by the spec
    (and does change the function); a random block-respecting one preserves it."""
    shape = (5, 40) if config["name"] == "cnn1d" else (5, 3, 8, 8)
    model, params, x = _setup(config, shape)
    spec = spec_for(model)
    group, block = next(iter(spec.blocks.items()))
    assert block == spec.sizes[group] // model.config["groups"] and block > 1
    ident = Permutation.identity(spec).to_dict()
    broken = torch.arange(spec.sizes[group])
    broken[0], broken[block] = block, 0  # swap one channel of block 0 with one of block 1
    with pytest.raises(ValueError, match="blocks"):
        Permutation(ident | {group: broken}, spec)
    unblocked = PermutationSpec(spec.axes, spec.shapes, {})
    wrong = Permutation(ident | {group: broken}, unblocked).apply(unblocked, params)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(
            _forward(model, wrong, x, False), _forward(model, params, x, False), atol=ATOL, rtol=RTOL
        )
    perm = _moving_perm(spec, seed=5)
    p = perm[group].view(-1, block) // block
    assert bool((p == p[:, :1]).all())
    torch.testing.assert_close(
        _forward(model, perm.apply(spec, params), x, False),
        _forward(model, params, x, False),
        atol=ATOL,
        rtol=RTOL,
    )


@pytest.mark.parametrize("depth", [8, 14, 20])
def test_resnet_residual_stream_is_one_group(depth: int) -> None:
    """ResNet: one group per stage's residual stream plus one per block's inner conv (3 + 3n)."""
    model = ResNet(3, 4, depth=depth, base=4, norm="batch")
    n = (depth - 2) // 6
    for spec in (spec_for(model), trace_spec(model, _input((2, 3, 8, 8)))):
        assert len(spec.sizes) == 3 + 3 * n
        stem = spec.axes["conv.weight"][0]
        stream1 = {spec.axes[f"layer1.{b}.conv2.weight"][0] for b in range(n)}
        assert stream1 == {stem} and spec.axes["norm.running_mean"] == (stem,)
        for s in (2, 3):
            stream = {spec.axes[f"layer{s}.{b}.conv2.weight"][0] for b in range(n)}
            stream |= {
                spec.axes[f"layer{s}.0.shortcut.0.weight"][0],
                spec.axes[f"layer{s}.0.shortcut.1.weight"][0],
            }
            assert len(stream) == 1 and stem not in stream
            assert (
                spec.axes[f"layer{s}.0.shortcut.0.weight"][1] == spec.axes[f"layer{s - 1}.0.conv2.weight"][0]
            )
        inner = {spec.axes[f"layer{s}.{b}.conv1.weight"][0] for s in (1, 2, 3) for b in range(n)}
        assert len(inner) == 3 * n
        assert spec.axes["head.weight"][1] == spec.axes["layer3.0.conv2.weight"][0]
    hand = spec_for(model)
    assert {"P_stage1", "P_stage2", "P_stage3", "P_layer2.0.inner"} <= set(hand.sizes)


def test_hand_spec_group_names() -> None:
    assert set(spec_for(MLP(4, [3, 3], 2)).sizes) == {"P_0", "P_1"}
    assert set(spec_for(VGG(3, [4, "M", 4], 2)).sizes) == {"P_conv0", "P_conv1"}
    assert set(spec_for(CNN1D(channels=[4, 4])).sizes) == {"P_conv0", "P_conv1"}


def test_spec_for_rejects_models_outside_the_zoo() -> None:
    class Wider(MLP):
        pass

    with pytest.raises(ValueError, match="Sequential"):
        spec_for(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="Wider"):
        spec_for(Wider(2, [2], 2))


# --------------------------------------------------------------------------------------------
# trace_spec on models outside the zoo
# --------------------------------------------------------------------------------------------
class _TwoLayer(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(12 if mode == "cat" else 3 if mode == "slice" else 6, 3)
        if mode in ("raw_param", "unused"):
            self.bias = nn.Parameter(torch.zeros(6))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc1(x))
        if self.mode == "mul_sum":
            h = h * h.sum()
        elif self.mode == "cat":
            h = torch.cat([h, h], dim=1)
        elif self.mode == "raw_param":
            h = h + self.bias
        elif self.mode == "ok":
            h = h * 2.0 + self.fc1(x)
        elif self.mode == "cumsum":
            h = torch.cumsum(h, 1)
        elif self.mode == "slice":
            h = h[:, :3]
        return self.fc2(h)


@pytest.mark.parametrize(
    ("mode", "match"),
    [("cumsum", "node 'cumsum"), ("slice", "node 'getitem"), ("unused", "'bias'")],
)
def test_trace_spec_rejects_unsupported_ops(mode: str, match: str) -> None:
    """Unknown operations on permuted tensors raise, naming the node; so do parameters never reached:
    no silent guess."""
    model = _TwoLayer(mode)
    with pytest.raises(ValueError, match=match):
        trace_spec(model, _input((2, 4)))


@pytest.mark.parametrize("mode", ["cumsum", "slice"])
def test_trace_spec_not_strict_holds_unsupported_ops_fixed(mode: str) -> None:
    """``strict=False``: the inputs of an operation without a rule are held fixed, the report names it,
    and the spec still keeps the function."""
    model = _TwoLayer(mode).double()
    report = trace_report(model, _input((2, 4)).double(), strict=False)
    assert report.held and {"cumsum": "cumsum", "slice": "getitem"}[mode] in report.held[0][0]
    assert "held fixed" in report.text()
    assert all(all(a is None for a in e) for k, e in report.spec.axes.items() if k.startswith("fc"))


@pytest.mark.parametrize(("mode", "units"), [("mul_sum", 6), ("cat", 6), ("raw_param", 6), ("ok", 6)])
def test_trace_spec_sums_cats_and_raw_parameters(mode: str, units: int) -> None:
    """A product with a sum over channels, a concatenation (segments), and a parameter read in forward
    are traced: the spec permutes the hidden units and keeps the function."""
    torch.manual_seed(0)
    model = _TwoLayer(mode).double()
    if mode == "raw_param":
        with torch.no_grad():
            model.bias.normal_()
    x = _input((5, 4)).double()
    spec = trace_spec(model, x)
    assert sum(spec.sizes.values()) == units
    if mode == "cat":
        assert spec.axes["fc2.weight"][1] == ((spec.axes["fc1.weight"][0], 6),) * 2
    if mode == "raw_param":
        assert spec.axes["bias"] == spec.axes["fc1.bias"]
    theta = model.state_dict()
    for seed in range(3):
        moved = Permutation.random(spec, seed).apply(spec, theta)
        torch.testing.assert_close(
            torch.func.functional_call(model, moved, (x,)), model(x), rtol=1e-12, atol=1e-12
        )


def test_trace_spec_rejects_flatten_of_feature_maps_and_untraceable_models() -> None:
    class FlatHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3, padding=1)
            self.head = nn.Linear(3 * 4 * 4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(torch.flatten(self.conv(x), 1))

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="flatten"):
        trace_spec(FlatHead(), _input((2, 1, 4, 4)))
    with pytest.raises(ValueError, match="cannot trace"):
        trace_spec(Branchy(), _input((2, 3)))
    with pytest.raises(ValueError, match="example input"):
        trace_spec(MLP(4, [3], 2), _input((2, 5)))
    with pytest.raises(TypeError):
        trace_spec(MLP(4, [3], 2), [[1.0] * 4])  # type: ignore[arg-type]


def test_trace_spec_supported_ops_and_weight_sharing() -> None:
    """Scaling and residual addition keep / merge spaces; the traced model is not modified."""
    model = _TwoLayer("ok")
    before = clone(model.state_dict())
    spec = trace_spec(model, _input((2, 4)))
    assert spec.axes["fc1.weight"] == ("P_fc1", None)
    assert spec.axes["fc2.weight"] == (None, "P_fc1")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(3, 5)
            self.mid = nn.Linear(5, 5)
            self.out = nn.Linear(5, 2)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.relu(self.inp(x))
            return self.out(self.mid(torch.relu(self.mid(h))))  # mid's input and output share a space

    spec = trace_spec(Tied(), _input((2, 3)))
    assert spec.axes["mid.weight"][0] == spec.axes["mid.weight"][1] == spec.axes["inp.weight"][0]
    assert len(spec.sizes) == 1


def test_trace_spec_bn_in_train_mode_does_not_touch_buffers() -> None:
    model = build_model({"name": "vgg", "in_channels": 3, "channels": [4], "num_classes": 2, "norm": "batch"})
    model.train()
    trace_spec(model, _input((1, 3, 4, 4)))  # batch of one: would fail in train mode
    assert int(model.state_dict()["features.0.norm.num_batches_tracked"]) == 0
    assert model.training


def test_trace_spec_is_reexported_by_specs() -> None:
    import reference.specs
    import reference.trace

    assert reference.specs.trace_spec is reference.trace.trace_spec is trace_spec


class _PReLUNet(nn.Module):
    """Linear → PReLU (one slope per unit: a parameter on the hidden axis) → Hardswish → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.act = nn.PReLU(6)
        self.swish = nn.Hardswish()
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.swish(self.act(self.fc1(x))))


def test_trace_rules_registry_teaches_new_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """``RULES`` is read at every node: an entry for a layer without a rule (a parameterised one and
    an elementwise one) makes the traced spec cover it, and the spec is a symmetry of the model."""
    import reference.trace as trace

    model = _PReLUNet()
    x = _input((5, 4))
    with pytest.raises(ValueError, match="PReLU.*no rule"):
        trace_spec(model, x)

    def prelu(tracer: trace.SpecInterpreter, n: Any, result: Any) -> list[int]:
        axes = tracer.axes[tracer.one_tensor(n)]
        tracer.attach_module(str(n.target), tracer.fetch_attr(n.target), {"weight": [axes[1]]})
        return list(axes)

    monkeypatch.setitem(trace.RULES, nn.PReLU, prelu)
    with pytest.raises(ValueError, match="unsupported operation at node 'swish'"):
        trace_spec(model, x)
    monkeypatch.setitem(trace.RULES, nn.Hardswish, trace.elementwise)
    spec = trace_spec(model, x)
    assert spec.axes["act.weight"] == ("P_fc1",) and spec.axes["fc2.weight"] == (None, "P_fc1")
    with torch.no_grad():
        model.act.weight.copy_(torch.linspace(-1, 1, 6))
    params = model.state_dict()
    P = Permutation.random(spec, 0)
    torch.testing.assert_close(
        functional_call(model, P.apply(spec, params), (x,)), functional_call(model, params, (x,))
    )


def test_trace_rule_of_addition_is_what_merges_residual_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    """The residual stream of a ResNet is one group because ``residual_add`` merges the operands of
    ``+``; with that rule gone, tracing refuses the addition rather than guessing."""
    import operator

    import reference.trace as trace

    model = ResNet(3, 2, depth=8, base=4, norm=None)
    x = _input((2, 3, 8, 8))
    assert trace.RULES[operator.add] is trace.residual_add
    assert trace_spec(model, x).same_symmetry(spec_for(model))
    monkeypatch.delitem(trace.RULES, operator.add)
    with pytest.raises(ValueError, match="unsupported operation at node 'add'"):
        trace_spec(model, x)


@given(
    widths=st.lists(st.integers(1, 6), min_size=0, max_size=4),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_mlp_spec_property(widths: list[int], bias: bool, seed: int) -> None:
    """For random uneven MLPs: traced spec == hand spec, and f(P(θ), x) = f(θ, x)."""
    model = MLP(5, widths, 3, bias=bias)
    x = _input((4, 5), seed)
    spec = spec_for(model)
    assert spec.same_symmetry(trace_spec(model, x))
    params = nontrivial(init_params(model, seed), seed + 1)
    permuted = Permutation.random(spec, seed).apply(spec, params)
    torch.testing.assert_close(
        _forward(model, permuted, x, False), _forward(model, params, x, False), atol=ATOL, rtol=RTOL
    )


@pytest.mark.parametrize(("batch_first", "shape"), [(True, (4, 5, 3)), (False, (5, 4, 3)), (True, (5, 3))])
def test_trace_spec_multihead_attention_layouts(batch_first: bool, shape: tuple[int, ...]) -> None:
    """``nn.MultiheadAttention`` batched (both layouts) and unbatched, with per-head weights returned: the
    traced spec couples Q/K with V/O by heads and keeps the function."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Linear(3, 8)
            self.att = nn.MultiheadAttention(8, 2, batch_first=batch_first)
            self.head = nn.Linear(8, 2)

        def forward(self, x: Tensor) -> Tensor:
            h = self.emb(x)
            y, w = self.att(h, h, h, average_attn_weights=False)
            return self.head(h + y).sum(-2) + w.sum()

    torch.manual_seed(0)
    model = Net().double()
    x = torch.randn(*shape, dtype=torch.float64)
    spec = trace_spec(model, x)
    assert spec.blocks == {"P_att.qk": 4, "P_att.vo": 4} and len(spec.head_classes) == 1
    for seed in range(3):
        moved = Permutation.random(spec, seed).apply(spec, model.state_dict())
        torch.testing.assert_close(functional_call(model, moved, (x,)), model(x), rtol=1e-12, atol=1e-12)
