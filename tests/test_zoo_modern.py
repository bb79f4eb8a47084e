"""The modern zoo (ViT, CausalTransformer, MobileNet, DenseNet, UNet) and its hand-written specs.

Eq. (1) of Ainsworth et al. 2023 (Git Re-Basin): f(P(θ), x) = f(θ, x) for every permutation P the spec
allows, checked in float64 (relative error ≤ 1e-10) in train and eval mode. Attention heads permute as
blocks, Q/K and V/O following one head permutation per layer (Verma & Elbayad 2024; Imfeld et al. 2024):
a permutation that breaks that coupling changes the function, so the coupling is not decoration.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tiny_nets import nontrivial
from torch import Tensor, nn
from torch.func import functional_call

from reference.convnets import DenseNet, MobileNet, UNet
from reference.fit import module_mode
from reference.models import build_model, init_params
from reference.params import Params, clone
from reference.permutation import Permutation, PermutationSpec
from reference.specs import spec_for, trace_spec
from reference.transformers import CausalTransformer, ViT, make_sequence_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RTOL = 1e-10  # float64: a permuted sum runs in another order, nothing more

# (id, config, input shape; "tokens:B,T" for token ids in [0, vocab))
CASES: list[tuple[str, dict[str, Any], Any]] = [
    ("vit-digits", {"name": "vit"}, (6, 64)),
    (
        "vit-postnorm-relu-image",
        {"name": "vit", "dim": 16, "depth": 1, "heads": 2, "norm_first": False, "activation": "relu"},
        (6, 1, 8, 8),
    ),
    ("vit-mnist1d", {"name": "vit", "dims": 1, "image_size": 40, "patch": 4, "dim": 16, "heads": 2}, (6, 40)),
    ("vit-2ch-1head", {"name": "vit", "image_size": 4, "channels": 2, "dim": 8, "heads": 1}, (6, 2, 4, 4)),
    ("gpt-layernorm", {"name": "causal_transformer"}, (4, 16)),
    (
        "gpt-rms-tied",
        {"name": "causal_transformer", "norm": "rms", "tie_weights": True, "dim": 16, "heads": 2, "depth": 1},
        (4, 10),
    ),
    ("gpt-headdim1", {"name": "causal_transformer", "dim": 8, "heads": 8, "depth": 1, "vocab": 5}, (4, 12)),
    ("mobilenet-batch", {"name": "mobilenet"}, (6, 64)),
    (
        "mobilenet-group-exp1",
        {"name": "mobilenet", "norm": "group", "expansion": 1, "widths": [8, 16], "strides": [2, 1], "repeats": [2, 1]},
        (6, 1, 8, 8),
    ),
    (
        "mobilenet-nonorm",
        {"name": "mobilenet", "norm": None, "widths": [4, 8], "strides": [1, 2], "repeats": [2, 2]},
        (6, 64),
    ),
    ("densenet-batch", {"name": "densenet"}, (6, 64)),
    ("densenet-nonorm-3blocks", {"name": "densenet", "norm": None, "block_layers": [2, 1, 2], "growth": 4}, (6, 64)),
    ("unet-group", {"name": "unet"}, (6, 64)),
    ("unet-batch-1level", {"name": "unet", "norm": "batch", "levels": 1, "base": 4}, (6, 1, 8, 8)),
    ("unet-nonorm-3levels", {"name": "unet", "norm": None, "levels": 3, "base": 2}, (6, 64)),
]
IDS = [c[0] for c in CASES]


def _input(config: dict[str, Any], shape: tuple[int, ...], seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    if config["name"] == "causal_transformer":
        return torch.randint(0, config.get("vocab", 16), shape, generator=g)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _setup(config: dict[str, Any], shape: tuple[int, ...]) -> tuple[nn.Module, Params, Tensor]:
    model = build_model(config).double()
    return model, nontrivial(init_params(model, 0), 1), _input(config, shape)


def _forward(model: nn.Module, params: Params, x: Tensor, train: bool = False) -> Tensor:
    """f(θ, x) in train or eval mode; ``params`` is copied (train-mode BatchNorm updates its buffers)."""
    with module_mode(model, train), torch.no_grad():
        return functional_call(model, clone(params), (x,))


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _apply_unchecked(spec: PermutationSpec, perms: Mapping[str, Tensor], params: Params) -> Params:
    """P(θ) by per-axis ``index_select``, bypassing ``Permutation``'s block and head checks."""
    out: Params = {}
    for k, v in params.items():
        for ax in range(len(spec.axes[k])):
            idx = spec.index(perms, k, ax)
            if idx is not None:
                v = v.index_select(ax, idx)
        out[k] = v
    return out


def _output_shape(config: dict[str, Any], shape: tuple[int, ...]) -> tuple[int, ...]:
    if config["name"] == "causal_transformer":
        return (*shape, config.get("vocab", 16))
    return (shape[0], config.get("num_classes", 10))


# --------------------------------------------------------------------------------------------
# models: rebuilding, shapes, initialisation, arguments
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "config", "shape"), CASES, ids=IDS)
def test_build_model_round_trip(name: str, config: dict[str, Any], shape: tuple[int, ...]) -> None:
    """``build_model(m.config)`` (also through JSON) rebuilds the architecture: same keys, shapes, function."""
    model, params, x = _setup(config, shape)
    again = build_model(json.loads(json.dumps(model.config))).double()
    assert again.config == model.config and type(again) is type(model)
    sd, sd2 = model.state_dict(), again.state_dict()
    assert list(sd) == list(sd2)
    assert all(sd[k].shape == sd2[k].shape for k in sd)
    out = _forward(model, params, x)
    assert out.shape == _output_shape(config, shape)
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(_forward(again, params, x), out, rtol=0, atol=0)


IMAGE_CASES = [c for c in CASES if len(c[2]) == 4]
ATTENTION_CASES = [c for c in CASES if c[1]["name"] in ("vit", "causal_transformer")]


@pytest.mark.parametrize(("name", "config", "shape"), IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
def test_flat_and_image_inputs_agree(name: str, config: dict[str, Any], shape: tuple[int, ...]) -> None:
    """Image models read ``[B, C, S, S]`` and the same pixels flat, ``[B, C·S·S]`` (digits are ``[B, 64]``)."""
    model, params, x = _setup(config, shape)
    torch.testing.assert_close(_forward(model, params, x.flatten(1)), _forward(model, params, x), rtol=0, atol=0)


def test_vit_patches_match_unfold() -> None:
    """The reshape / permute patching equals ``F.unfold``'s (channel-major within a patch, row-major grid);
    1-D patches are consecutive runs of ``patch`` values."""
    model = ViT(image_size=6, patch=3, channels=2, dim=8, heads=2)
    x = torch.randn(3, 2, 6, 6)
    torch.testing.assert_close(model.patches(x), F.unfold(x, 3, stride=3).transpose(1, 2), rtol=0, atol=0)
    seq = ViT(image_size=12, patch=4, channels=1, dim=8, heads=2, dims=1)
    s = torch.randn(3, 12)
    torch.testing.assert_close(seq.patches(s), s.view(3, 3, 4), rtol=0, atol=0)


@pytest.mark.parametrize("cls", [ViT, CausalTransformer, MobileNet, DenseNet, UNet], ids=lambda c: c.__name__)
def test_init_params_redraws_everything(cls: type[nn.Module]) -> None:
    """``init_params`` re-initialises every parameter (ViT's class token and position embedding through
    ``ViT.reset_parameters``): a function of the seed only."""
    model = cls()
    a, b, c = init_params(model, 3), init_params(model, 3), init_params(model, 4)
    assert list(a) == list(model.state_dict())
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], rtol=0, atol=0)
    drawn = [k for k, v in a.items() if v.ndim >= 2]  # Linear / conv / Embedding weights, tokens
    assert drawn and all(not torch.equal(a[k], c[k]) for k in drawn)
    if cls is ViT:
        assert {"cls_token", "pos_embed"} <= set(drawn)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: ViT(patch=3), ValueError, r"patch=3 does not divide image_size=8"),
        (lambda: ViT(dim=30, heads=4), ValueError, r"heads=4 does not divide dim=30"),
        (lambda: ViT(dims=3), ValueError, r"dims must be an integer <= 2"),
        (lambda: ViT(activation="tanh"), ValueError, r"unknown activation 'tanh'"),
        (lambda: ViT(norm_first=1), TypeError, r"norm_first must be True or False"),
        (lambda: ViT(depth=0), ValueError, r"depth must be an integer >= 1"),
        (lambda: ViT(image_size=8.0), TypeError, r"image_size must be an integer"),
        (lambda: ViT(mlp_ratio=1.5), TypeError, r"mlp_ratio must be an integer"),
        (lambda: CausalTransformer(norm="batch"), ValueError, r"unknown norm 'batch'"),
        (lambda: CausalTransformer(tie_weights="yes"), TypeError, r"tie_weights must be True or False"),
        (lambda: CausalTransformer(vocab=0), ValueError, r"vocab must be an integer >= 1"),
        (lambda: CausalTransformer(dim=32, heads=5), ValueError, r"heads=5 does not divide dim=32"),
        (lambda: CausalTransformer(block_size=None), TypeError, r"block_size must be an integer"),
        (lambda: MobileNet(strides=(1, 3, 2)), ValueError, r"strides\[1\] must be an integer <= 2"),
        (lambda: MobileNet(widths=(8, 16)), ValueError, r"one entry per stage, got 2, 3 and 3"),
        (lambda: MobileNet(widths=(), strides=(), repeats=()), ValueError, r"at least one stage"),
        (lambda: MobileNet(image_size=6), ValueError, r"image_size=6 is not divisible by 2\*\*2"),
        (lambda: MobileNet(norm="layer"), ValueError, r"unknown norm 'layer'"),
        (lambda: MobileNet(norm="group", groups=3), ValueError, r"groups=3 does not divide 8 channels"),
        (lambda: MobileNet(expansion=0), ValueError, r"expansion must be an integer >= 1"),
        (lambda: MobileNet(repeats=(1, 0, 1)), ValueError, r"repeats\[1\] must be an integer >= 1"),
        (lambda: DenseNet(norm="group"), ValueError, r"unknown DenseNet norm 'group'"),
        (lambda: DenseNet(block_layers=()), ValueError, r"at least one dense block"),
        (lambda: DenseNet(block_layers=(2, 2, 2, 2), image_size=4), ValueError, r"not divisible by 2\*\*3"),
        (lambda: DenseNet(growth=True), TypeError, r"growth must be an integer, got True"),
        (lambda: UNet(levels=4), ValueError, r"image_size=8 is not divisible by 2\*\*4"),
        (lambda: UNet(base=6, groups=4), ValueError, r"groups=4 does not divide base=6"),
        (lambda: UNet(norm="instance"), ValueError, r"unknown norm 'instance'"),
        (lambda: UNet(in_channels=0), ValueError, r"in_channels must be an integer >= 1"),
        (lambda: make_sequence_task(8, block_size=16, lag=16), ValueError, r"lag must be an integer <= 15"),
        (lambda: make_sequence_task(8, block_size=1), ValueError, r"block_size must be an integer >= 2"),
        (lambda: make_sequence_task(0.5), TypeError, r"n must be an integer"),
        (lambda: CausalTransformer()(torch.zeros(2, 4)), TypeError, r"token ids must be an int64"),
        (
            lambda: CausalTransformer()(torch.zeros(2, 4, 1, dtype=torch.long)),
            ValueError,
            r"shape \[B, T\], got \(2, 4, 1\)",
        ),
        (
            lambda: CausalTransformer(block_size=8)(torch.zeros(2, 9, dtype=torch.long)),
            ValueError,
            r"sequence length 9 exceeds block_size=8",
        ),
        (lambda: build_model({"name": "vit", "patches": 2}), ValueError, r"unknown config keys \['patches'\]"),
    ],
)
def test_argument_checks(make: Callable[[], Any], error: type[Exception], match: str) -> None:
    """Every bad argument raises with a message naming it; a wrong type is a TypeError and a ValueError."""
    with pytest.raises(error, match=match):
        make()
    with pytest.raises(ValueError, match=match):
        make()


def test_causal_transformer_is_causal_and_tied() -> None:
    """Logits at position t depend on tokens 0..t only; ``tie_weights`` reads ``wte.weight`` as the head."""
    model, params, x = _setup({"name": "causal_transformer", "tie_weights": True, "depth": 1}, (3, 12))
    assert "lm_head.weight" not in params
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % 16
    a, b = _forward(model, params, x), _forward(model, params, y)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])
    params2 = params | {"wte.weight": params["wte.weight"] * 2}
    assert not torch.allclose(_forward(model, params2, x), a)


def test_make_sequence_task() -> None:
    """``y[:, t] = x[:, t - lag]`` for ``t >= lag``, ``x[:, t]`` before; int64; a function of the seed."""
    x, y = make_sequence_task(50, block_size=12, vocab=7, seed=3, lag=4)
    assert x.shape == y.shape == (50, 12) and x.dtype == y.dtype == torch.int64
    assert int(x.min()) >= 0 and int(x.max()) < 7
    torch.testing.assert_close(y[:, 4:], x[:, :-4], rtol=0, atol=0)
    torch.testing.assert_close(y[:, :4], x[:, :4], rtol=0, atol=0)
    x2, y2 = make_sequence_task(50, block_size=12, vocab=7, seed=3, lag=4)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(make_sequence_task(50, block_size=12, vocab=7, seed=4, lag=4)[0], x)
    # the lagged target is not the current token: a model that ignores context is near chance there
    assert float((y[:, 4:] == x[:, 4:]).double().mean()) < 0.3


@pytest.mark.parametrize(
    ("config", "shape"),
    [
        ({"name": "vit"}, (32, 64)),
        ({"name": "causal_transformer"}, (16, 16)),
        ({"name": "mobilenet"}, (32, 64)),
        ({"name": "densenet"}, (32, 64)),
        ({"name": "unet"}, (32, 64)),
    ],
    ids=["vit", "gpt", "mobilenet", "densenet", "unet"],
)
def test_trainable(config: dict[str, Any], shape: tuple[int, ...]) -> None:
    """A few Adam steps on one batch lower the cross-entropy (the model is wired to learn)."""
    torch.manual_seed(0)
    model = build_model(config)
    if config["name"] == "causal_transformer":
        x, y = make_sequence_task(shape[0], block_size=shape[1], seed=0)
    else:
        x, y = torch.randn(shape), torch.randint(0, 10, (shape[0],))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss() -> Tensor:
        out = model(x)
        return F.cross_entropy(out.flatten(0, -2), y.flatten())

    first = float(loss().detach())
    for _ in range(15):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert float(loss().detach()) < 0.9 * first


# --------------------------------------------------------------------------------------------
# specs: symmetries of the function, equal to the traced ones, with coupled heads
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("name", "config", "shape"), CASES, ids=IDS)
def test_permutation_preserves_function(name: str, config: dict[str, Any], shape: tuple[int, ...], train: bool) -> None:
    """Eq. (1) of Ainsworth et al. 2023: f(P(θ), x) = f(θ, x) for random P of ``spec_for(m)`` (several
    seeds), float64, relative error ≤ 1e-10, train and eval mode (BatchNorm: the same batch)."""
    model, params, x = _setup(config, shape)
    spec = spec_for(model)
    ref = _forward(model, params, x, train)
    for seed in range(3):
        permuted = Permutation.random(spec, seed).apply(spec, params)
        assert any(not torch.equal(params[k], permuted[k]) for k in params)  # P really moved weights
        assert _rel(_forward(model, permuted, x, train), ref) <= RTOL


@pytest.mark.parametrize(("name", "config", "shape"), CASES, ids=IDS)
def test_trace_spec_matches_hand_spec(name: str, config: dict[str, Any], shape: tuple[int, ...]) -> None:
    """The fx-derived spec and the hand-written spec describe the same symmetry (groups, segments, head
    blocks and head classes, up to renaming)."""
    model = build_model(config)
    hand = spec_for(model)
    x = _input(config, shape)
    traced = trace_spec(model, x.float() if x.is_floating_point() else x)
    assert hand.same_symmetry(traced), (hand.canonical().axes, traced.canonical().axes)


@pytest.mark.parametrize(("name", "config", "shape"), ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES])
def test_attention_spec_structure(name: str, config: dict[str, Any], shape: tuple[int, ...]) -> None:
    """Per attention layer: a Q/K and a V/O group of one head class with ``blocks = head_dim``; one stream.
    One head: two free groups, no class. Heads of one unit: Q/K and V/O are one group."""
    model = build_model(config)
    spec = spec_for(model)
    depth, dim, h = model.config["depth"], model.config["dim"], model.config["heads"]
    d = dim // h
    assert len(spec.head_classes) == (depth if 1 < d < dim else 0)
    for i in range(depth):
        qk, vo = f"P_block{i}.qk", f"P_block{i}.vo"
        if d == 1:
            assert spec.sizes[f"P_block{i}.heads"] == dim and qk not in spec.sizes and vo not in spec.sizes
            continue
        assert spec.sizes[qk] == spec.sizes[vo] == dim
        if h > 1:
            assert spec.head_classes[f"H_block{i}"] == [qk, vo]
            assert spec.block(qk) == spec.block(vo) == d
        else:
            assert qk not in spec.heads and spec.block(qk) == spec.block(vo) == 1
    assert len(spec.sizes) == 1 + (2 if d == 1 else 3) * depth


def _head_index(order: list[int], d: int) -> Tensor:
    """The unit index moving whole heads of ``d`` units: new head h is old head ``order[h]``."""
    return (torch.tensor(order)[:, None] * d + torch.arange(d)).reshape(-1)


@pytest.mark.parametrize(
    ("config", "shape"),
    [({"name": "vit"}, (6, 64)), ({"name": "causal_transformer"}, (4, 16))],
    ids=["vit", "gpt-fused-qkv"],
)
def test_breaking_head_coupling_changes_function(config: dict[str, Any], shape: tuple[int, ...]) -> None:
    """Q/K moving heads one way and V/O another is rejected by ``Permutation`` and, applied anyway, changes
    the output; so does a unit moved across heads, or Q permuted without K. The coupled version keeps it."""
    model, params, x = _setup(config, shape)
    spec = spec_for(model)
    ref = _forward(model, params, x)
    d = spec.block("P_block0.qk")
    ident = Permutation.identity(spec).to_dict()
    rotate = _head_index([1, 2, 3, 0], d)

    coupled = ident | {"P_block0.qk": rotate, "P_block0.vo": rotate}
    assert _rel(_forward(model, Permutation(coupled, spec).apply(spec, params), x), ref) <= RTOL

    decoupled = ident | {"P_block0.qk": rotate}
    with pytest.raises(ValueError, match="move heads differently"):
        Permutation(decoupled, spec)
    assert _rel(_forward(model, _apply_unchecked(spec, decoupled, params), x), ref) > 1e-3

    across = torch.arange(spec.sizes["P_block0.qk"])
    across[0], across[d] = d, 0  # swap unit 0 of head 0 with unit 0 of head 1, in both Q and K
    with pytest.raises(ValueError, match="blocks"):
        Permutation(ident | {"P_block0.qk": across}, spec)
    assert _rel(_forward(model, _apply_unchecked(spec, ident | {"P_block0.qk": across}, params), x), ref) > 1e-3

    # reverse head 0's units: allowed for Q and K together, not for Q alone
    idx = torch.cat([torch.arange(d).flip(0), torch.arange(d, spec.sizes["P_block0.qk"])])
    q_only = dict(params)
    if config["name"] == "vit":
        for k in ("blocks.0.attn.q.weight", "blocks.0.attn.q.bias"):
            q_only[k] = params[k].index_select(0, idx)
    else:  # the first segment of the fused rows [q; k; v]
        D = spec.sizes["P_block0.qk"]
        rows = torch.cat([idx, torch.arange(D, 3 * D)])
        for k in ("blocks.0.attn.c_attn.weight", "blocks.0.attn.c_attn.bias"):
            q_only[k] = params[k].index_select(0, rows)
    assert _rel(_forward(model, q_only, x), ref) > 1e-3
    both = ident | {"P_block0.qk": idx}
    assert _rel(_forward(model, Permutation(both, spec).apply(spec, params), x), ref) <= RTOL


def test_concatenated_axis_needs_segments() -> None:
    """DenseNet: permuting a layer's output group moves its segment in every later reader; leaving one
    reader (the final norm's segment) unpermuted changes the function, the full spec keeps it."""
    model, params, x = _setup({"name": "densenet", "block_layers": [2]}, (6, 64))
    spec = spec_for(model)
    assert spec.axes["norm.weight"] == ((("P_stem", 8), ("P_dense0.0", 8), ("P_dense0.1", 8)),)
    ref = _forward(model, params, x)
    perm = Permutation.random(spec, 0)
    assert _rel(_forward(model, perm.apply(spec, params), x), ref) <= RTOL
    forgetful = dict(spec.axes)
    forgetful["norm.weight"] = (None,)
    broken = PermutationSpec(forgetful, spec.shapes)
    assert _rel(_forward(model, perm.apply(broken, params), x), ref) > 1e-3
