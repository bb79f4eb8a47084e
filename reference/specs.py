"""Permutation specs of the model zoo: written by hand, and derived from a traced model.

A hidden unit of a layer can be renamed without changing the network's function if every tensor
that reads or writes that unit is reindexed the same way (Hecht-Nielsen 1990; Entezari et al. 2022;
Eq. (1) of Ainsworth et al. 2023, "Git Re-Basin": f(P(θ), x) = f(θ, x)). A ``PermutationSpec`` lists,
for every ``state_dict`` key, the group acting on each axis. Conventions (Git Re-Basin's
``permutation_spec_from_axes_to_perm``, in PyTorch's layouts):

- Linear weight ``[out, in]`` → ``(P_out, P_in)``, bias ``(P_out,)``;
- conv weight ``[out, in, k(, k)]`` → ``(P_out, P_in, None(, None))``;
- norm weight / bias / running_mean / running_var → ``(P,)``; ``num_batches_tracked`` → ``()``;
- the network's input and output axes are never permuted (``None``).

BatchNorm running statistics are permuted with their channels: they are coordinates of the
eval-mode function too (leaving them out is a known bug of a popular PyTorch port).
GroupNorm with ``g`` groups over ``C`` channels only allows permutations mapping blocks of
``C / g`` channels onto blocks: its group carries ``blocks[P] = C / g``.

``spec_for(model)`` is written by hand per zoo class. ``trace_spec(model, x)`` (in ``reference.trace``,
re-exported here) derives the same symmetry from a ``torch.fx`` trace: a union-find over *channel
spaces* (each Linear / conv output opens one; residual additions merge them; the input's and
output's spaces are fixed), with one rule per operation in ``reference.trace.RULES``. A test checks
``spec_for(m).same_symmetry(trace_spec(m, x))`` for every zoo model.

Group names of ``spec_for``: MLP ``P_{i}`` (output of ``layers.{i}``); VGG and CNN1D ``P_conv{i}``
(output of the i-th conv); ResNet ``P_stage{s}`` (the residual stream of stage s: stem, every
block's ``conv2``, the 1×1 shortcut conv and their norms) and ``P_layer{s}.{b}.inner`` (the inner
conv of block b of stage s). ``trace_spec`` names a group ``P_<module>`` after the first layer
that opens it (e.g. ``P_layers.0``, ``P_conv``, ``P_layer1.0.conv1``).

The modern zoo's specs (``ViT``, ``CausalTransformer``, ``MobileNet``, ``DenseNet``, ``UNet``: attention
heads, concatenations, depthwise and transposed convs) are written in ``reference/specs_modern.py`` and
registered here, so ``spec_for`` returns them too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from .models import CNN1D, MLP, VGG, ResNet
from .permutation import PermutationSpec
from .specs_modern import norm_axes
from .trace import trace_spec  # re-exported: ``reference.specs.trace_spec`` is the tracer of ``reference.trace``

__all__ = ["spec_for", "trace_spec"]

Axes = dict[str, tuple[str | None, ...]]


# ============================================================================================
# hand-written specs
# ============================================================================================
def _norm_axes(prefix: str, kind: str | None, group: str) -> Axes:
    """Keys of the norm layer ``make_norm(kind, ...)`` at ``prefix``, all acting on ``group`` (the zoo's
    channel LayerNorm keeps its ``nn.LayerNorm`` at ``{prefix}.ln``)."""
    if kind == "rms":
        raise ValueError(f"unknown norm {kind!r} at {prefix!r}")  # not one of the zoo's make_norm kinds
    return norm_axes(f"{prefix}.ln" if kind == "layer" else prefix, kind, group)


def _layer_axes(prefix: str, out: str | None, inp: str | None, spatial: int, bias: bool) -> Axes:
    """A Linear (``spatial=0``) or conv (``spatial`` kernel dims) layer at ``prefix``."""
    axes: Axes = {f"{prefix}.weight": (out, inp, *([None] * spatial))}
    if bias:
        axes[f"{prefix}.bias"] = (out,)
    return axes


def _finish(
    model: nn.Module, axes: Axes, widths: Mapping[str, int], norm: str | None, groups: int
) -> PermutationSpec:
    """The spec over ``model.state_dict()``; GroupNorm adds ``blocks[P] = C / groups`` (if > 1) per group."""
    blocks = {g: c // groups for g, c in widths.items() if c // groups > 1} if norm == "group" else {}
    return PermutationSpec.from_params(axes, model.state_dict(), blocks)


def _mlp_spec(model: MLP) -> PermutationSpec:
    """Git Re-Basin's ``mlp_permutation_spec``: ``layers.{i}`` outputs group ``P_{i}``."""
    cfg = model.config
    axes: Axes = {}
    prev: str | None = None
    for i, _ in enumerate(cfg["widths"]):
        g = f"P_{i}"
        axes |= _layer_axes(f"layers.{i}", g, prev, 0, cfg["bias"])
        if cfg.get("norm") == "layer":
            axes |= {f"norms.{i}.weight": (g,), f"norms.{i}.bias": (g,)}
        prev = g
    axes |= _layer_axes("head", None, prev, 0, cfg["bias"])
    return _finish(model, axes, {}, None, 1)


def _vgg_spec(model: VGG) -> PermutationSpec:
    """Git Re-Basin's ``vgg16_permutation_spec`` with norms: the i-th conv's outputs are ``P_conv{i}``."""
    cfg = model.config
    dims, norm = cfg["dims"], cfg["norm"]
    axes: Axes = {}
    widths: dict[str, int] = {}
    prev: str | None = None
    conv_index = 0
    for j, c in enumerate(cfg["channels"]):
        if c == "M":
            continue
        g = f"P_conv{conv_index}"
        axes |= _layer_axes(f"features.{j}.conv", g, prev, dims, cfg["bias"])
        axes |= _norm_axes(f"features.{j}.norm", norm, g)
        widths[g] = c
        prev, conv_index = g, conv_index + 1
    axes |= _layer_axes("head", None, prev, 0, cfg["bias"])
    return _finish(model, axes, widths, norm, cfg["groups"])


def _cnn1d_spec(model: CNN1D) -> PermutationSpec:
    """The i-th conv block's output channels are ``P_conv{i}`` (max-pools keep channels)."""
    cfg = model.config
    norm = cfg["norm"]
    axes: Axes = {}
    widths: dict[str, int] = {}
    prev: str | None = None
    for i, c in enumerate(cfg["channels"]):
        g = f"P_conv{i}"
        axes |= _layer_axes(f"blocks.{i}.conv", g, prev, 1, cfg["bias"])
        axes |= _norm_axes(f"blocks.{i}.norm", norm, g)
        widths[g] = c
        prev = g
    axes |= _layer_axes("head", None, prev, 0, cfg["bias"])
    return _finish(model, axes, widths, norm, cfg["groups"])


def _resnet_spec(model: ResNet) -> PermutationSpec:
    """Git Re-Basin's ``resnet20_permutation_spec``: one group per residual stream, one per inner conv.

    Everything added together through identity shortcuts (the stem conv, every block's ``conv2``,
    the 1×1 shortcut conv of the stage's first block, and their norms) shares ``P_stage{s}``; the
    inner conv ``conv1`` of block ``layer{s}.{b}`` has its own ``P_layer{s}.{b}.inner``.
    """
    cfg = model.config
    dims, norm = cfg["dims"], cfg["norm"]
    n = (cfg["depth"] - 2) // 6
    stage_widths = [cfg["base"] * cfg["width"] * m for m in (1, 2, 4)]
    axes: Axes = {}
    widths: dict[str, int] = {}
    stream = "P_stage1"
    axes |= _layer_axes("conv", stream, None, dims, False)
    axes |= _norm_axes("norm", norm, stream)
    widths[stream] = stage_widths[0]
    prev = stream
    for s, c in enumerate(stage_widths, start=1):
        stream = f"P_stage{s}"
        widths[stream] = c
        for b in range(n):
            p = f"layer{s}.{b}"
            inner = f"P_{p}.inner"
            widths[inner] = c
            axes |= _layer_axes(f"{p}.conv1", inner, prev, dims, False)
            axes |= _norm_axes(f"{p}.norm1", norm, inner)
            axes |= _layer_axes(f"{p}.conv2", stream, inner, dims, False)
            axes |= _norm_axes(f"{p}.norm2", norm, stream)
            if s > 1 and b == 0:  # stride 2 and twice the channels: 1x1 conv shortcut
                axes |= _layer_axes(f"{p}.shortcut.0", stream, prev, dims, False)
                axes |= _norm_axes(f"{p}.shortcut.1", norm, stream)
            prev = stream
    axes |= _layer_axes("head", None, prev, 0, True)
    return _finish(model, axes, widths, norm, cfg["groups"])


_SPECS: dict[type, Callable[[Any], PermutationSpec]] = {
    MLP: _mlp_spec,
    VGG: _vgg_spec,
    CNN1D: _cnn1d_spec,
    ResNet: _resnet_spec,
}


def spec_for(model: nn.Module) -> PermutationSpec:
    """The hand-written permutation spec of a zoo model (exact class match; see module docstring).

    Raises ``ValueError`` for a model outside the zoo (a subclass may change ``forward``): use
    ``trace_spec`` for those.
    """
    fn = _SPECS.get(type(model))
    if fn is None:
        raise ValueError(
            f"no hand-written spec for {type(model).__name__}; zoo classes: "
            f"{sorted(c.__name__ for c in _SPECS)} (use trace_spec(model, example_input) for others)"
        )
    return fn(model)


# the modern zoo (reference/specs_modern.py does not import this module: no cycle)
from .specs_modern import MODERN_SPECS  # noqa: E402

_SPECS.update(MODERN_SPECS)
