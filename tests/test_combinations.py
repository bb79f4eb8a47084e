"""The first-layer shortcut (reference.combinations): equal to evaluating the combined points, on the zoo;
refused, with the reason, where the first layer is not linear in θ or does not see the raw input."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from reference.barrier import evaluate_linear_path, evaluate_path, linear_path
from reference.combinations import FirstLayer, evaluate_combinations, first_layer, pays
from reference.evaluate import evaluate_points
from reference.models import CNN1D, MLP, VGG, ResNet, init_params
from reference.params import combine_batch
from tests.tiny_nets import LinearTwice, bn_mlp, bn_point

ZOO = {
    "mlp": (lambda: MLP(30, [16, 12], 5), (30,)),
    "mlp-layernorm": (lambda: MLP(30, [16, 12], 5, norm="layer"), (30,)),
    "mlp-batchnorm": (lambda: bn_mlp(30, [16, 12], 5), (30,)),
    "cnn1d-batchnorm": (lambda: CNN1D(1, (6, 6), 5, norm="batch"), (24,)),
    "vgg2d-groupnorm": (lambda: VGG(2, [4, "M", 6], 5, norm="group", dims=2), (2, 8, 8)),
    "resnet1d-batchnorm": (lambda: ResNet(1, 5, depth=8, width=1, norm="batch", dims=1, base=4), (1, 16)),
}


def _case(name: str, n_basis: int, seed: int = 0):
    make, shape = ZOO[name]
    model = make().eval()
    basis = [bn_point(make, seed + m) for m in range(n_basis)]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(50, *shape, generator=g)
    y = torch.randint(0, 5, (50,), generator=g)
    coeffs = torch.rand(7, n_basis, generator=g, dtype=torch.float64)
    return model, basis, x, y, coeffs / coeffs.sum(1, keepdim=True)


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("n_basis", [2, 3])
@pytest.mark.parametrize("chunk_size", [1, 3])
@pytest.mark.parametrize("train_mode", [False, True])
def test_shortcut_equals_evaluating_the_combined_points(name, n_basis, chunk_size, train_mode):
    """Σₘ cₘ ℓ(θₘ; x) for the first layer, the rest per point: the same losses and errors as the points
    Σₘ cₘ θₘ evaluated plainly (up to float rounding), in eval and train mode, looped and vmapped, over
    input batches smaller than the data."""
    model, basis, x, y, coeffs = _case(name, n_basis)
    layer = first_layer(model, basis[0], x)
    assert isinstance(layer, FirstLayer), layer
    kw = {"chunk_size": chunk_size, "batch_size": 20, "train_mode": train_mode}
    ref = evaluate_points(model, combine_batch(coeffs, basis), x, y, **kw)
    got = evaluate_combinations(model, coeffs, basis, x, y, first_layer_shortcut=True, **kw)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.error, ref.error)
    plain = evaluate_combinations(model, coeffs, basis, x, y, first_layer_shortcut=False, **kw)
    assert torch.equal(plain.loss, ref.loss) and torch.equal(plain.error, ref.error)
    assert all(torch.equal(b[k], bn_point(ZOO[name][0], m)[k]) for m, b in enumerate(basis) for k in b)  # untouched


def test_first_layer_names_the_layer_its_input_and_its_share():
    model, basis, x, _, _ = _case("cnn1d-batchnorm", 2)
    layer = first_layer(model, basis[0], x)
    assert layer.name == "blocks.0.conv" and layer.keys == ("blocks.0.conv.weight", "blocks.0.conv.bias")
    assert layer.input_shape == (1, 24)  # CNN1D reads [B, L] as one channel
    assert layer.flops == 2 * 6 * 1 * 5 * 24 and 0 < layer.share < 1
    mlp = MLP(784, [512] * 3, 10)
    big = first_layer(mlp, init_params(mlp, 0), torch.zeros(2, 784))
    assert big.share == pytest.approx(784 / (784 + 512 + 512 + 10), rel=1e-3)
    assert pays(big, 25, 2, 10_000) and not pays(big, 3, 2, 10_000) and not pays(big, 25, 2, 10)
    digits = MLP(64, [512] * 4, 10)
    assert not pays(first_layer(digits, init_params(digits, 0), torch.zeros(2, 64)), 25, 2, 1437)  # 4% of the FLOPs


class _Normalised(nn.Module):
    """Standardises its input before the first Linear: the layer does not see the raw input."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc((x - x.mean()) / x.std())


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6, bias=False)
        self.b = nn.Linear(6, 6, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class _NormFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.norm(x))


@pytest.mark.parametrize("make, reason", [
    (_Normalised, "does not see the raw input"),
    (partial(LinearTwice, 6), "runs more than once"),
    (_Tied, "ties weights"),
    (_NormFirst, "is a LayerNorm"),
])
def test_no_shortcut_where_the_first_layer_is_not_linear_in_theta(make, reason):
    model = make()
    point = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    got = first_layer(model, point, x)
    assert isinstance(got, str) and reason in got
    if make is _Tied:  # stacked points of a tied model are not evaluable at all (functional_call refuses them)
        return
    coeffs = torch.tensor([[0.5, 0.5]] * 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="no first layer linear in θ"):
        evaluate_combinations(model, coeffs, [point, point], x, y, first_layer_shortcut=True)
    auto = evaluate_combinations(model, coeffs, [point, point], x, y)  # "auto": evaluated plainly
    ref = evaluate_points(model, combine_batch(coeffs, [point, point]), x, y)
    assert torch.equal(auto.loss, ref.loss)


def test_bad_option_is_refused():
    model, basis, x, y, coeffs = _case("mlp", 2)
    with pytest.raises(ValueError, match="first_layer_shortcut must be True, False or 'auto'"):
        evaluate_combinations(model, coeffs, basis, x, y, first_layer_shortcut="yes")
    with pytest.raises(ValueError, match="first_layer_shortcut must be"):
        evaluate_combinations(model, coeffs, basis, x, y, first_layer_shortcut=1)


@pytest.mark.parametrize("shortcut", [True, False, "auto"])
def test_evaluate_linear_path_equals_evaluate_path_of_linear_path(shortcut):
    model, (a, b), x, y, _ = _case("mlp", 2)
    splits = {"train": (x, y), "test": (x[:20], y[:20])}
    got = evaluate_linear_path(model, a, b, 9, splits, first_layer_shortcut=shortcut, batch_size=16)
    t, pts = linear_path(a, b, 9)
    ref = evaluate_path(model, t, pts, splits, batch_size=16)
    assert torch.equal(got.t, ref.t)
    for split in splits:
        same = torch.equal if shortcut is not True else (lambda u, v: torch.allclose(u, v, rtol=1e-5, atol=1e-6))
        assert same(got.curves[split]["loss"], ref.curves[split]["loss"])
        assert torch.equal(got.curves[split]["error"], ref.curves[split]["error"])
    assert got.barrier_table().keys() == ref.barrier_table().keys()


def test_train_mode_dropout_before_the_first_layer_and_a_bare_layer_are_refused():
    """A dropout in front of the first layer is the identity in eval mode (the shortcut is exact there) but
    changes the layer's input in train mode (refused there); a model that is one layer has nothing to split."""
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    point = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(10, 6)
    assert isinstance(first_layer(model, point, x), FirstLayer)
    assert "does not see the raw input" in first_layer(model, point, x, train_mode=True)
    bare = nn.Linear(6, 3)
    assert "no first layer to split off" in first_layer(bare, dict(bare.state_dict()), x)
