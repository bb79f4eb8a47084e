"""Convolutional networks of the modern zoo: MobileNet-style, DenseNet-style and a small U-Net.

- ``MobileNet``: the inverted residual blocks of MobileNetV2 (Sandler et al. 2018, Table 1):
  1×1 expansion conv → norm → ReLU6, depthwise 3×3 conv (``groups = hidden``) → norm → ReLU6, 1×1
  linear projection → norm, with a residual addition when the block keeps stride 1 and width.
- ``DenseNet``: densely connected blocks (Huang et al. 2017): every layer is pre-activation
  ``conv3×3(relu(norm(x)))`` and its ``growth`` channels are concatenated to its input; blocks are
  joined by transitions norm → ReLU → conv1×1 (compression θ = 0.5, DenseNet-BC) → 2× average pool.
- ``UNet``: the encoder / decoder of Ronneberger et al. 2015 at toy size: double conv → GroupNorm
  (Wu & He 2018) → ReLU blocks, 2× max-pool down, ``ConvTranspose2d(c, c/2, 2, stride=2)`` up,
  skip connections concatenated (``torch.cat([up, skip], 1)``), then a 1×1 conv to ``num_classes``
  maps and a global average pool, so it is a classifier trained like the rest of the zoo.

All three take ``[B, C, S, S]`` images or flat ``[B, C·S·S]`` rows (sklearn digits: ``[B, 64]``, ``S = 8``),
reshaped with ``image_size = S``; global average pooling is written ``x.mean((2, 3))``. Every model
stores its keyword arguments in ``self.config`` (``reference.models.build_model`` rebuilds it), and
its permutation spec is written out in ``reference/specs_modern.py``. Forwards are ``torch.fx``-traceable.

Normalisations (``norm``): ``None``; ``"batch"`` (``nn.BatchNorm2d``); ``"group"``
(``nn.GroupNorm(groups, C)``, which only allows permutations mapping blocks of ``C / groups`` channels
onto blocks). MobileNet's and UNet's convolutions have a bias only without a norm; DenseNet's
never have one (pre-activation: the next norm or the head follows).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import validate

__all__ = [
    "CONV_NORMS",
    "DenseLayer",
    "DenseNet",
    "DoubleConv",
    "InvertedResidual",
    "MobileNet",
    "Transition",
    "UNet",
    "conv_norm",
]

CONV_NORMS: tuple[str | None, ...] = (None, "batch", "group")


def conv_norm(norm: str | None, channels: int, groups: int = 2) -> nn.Module:
    """The norm layer after a 2-D conv with ``channels`` outputs: ``nn.Identity`` (``None``),
    ``nn.BatchNorm2d`` (``"batch"``) or ``nn.GroupNorm(groups, channels)`` (``"group"``; ``groups``
    must divide ``channels``, else ``ValueError``)."""
    norm = validate.choice("norm", norm, CONV_NORMS)
    if norm is None:
        return nn.Identity()
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if channels % groups:
        raise ValueError(f"GroupNorm: groups={groups} does not divide {channels} channels")
    return nn.GroupNorm(groups, channels)


def _as_image(x: Tensor, channels: int, size: int) -> Tensor:
    """``[B, C·S·S]`` or ``[B, C, S, S]`` → ``[B, C, S, S]`` (no data-dependent branch: fx-traceable)."""
    return x.reshape(x.shape[0], channels, size, size)


def _check_size(image_size: int, halvings: int, what: str) -> None:
    if image_size % 2**halvings:
        raise ValueError(f"image_size={image_size} is not divisible by 2**{halvings} = {2**halvings} ({what})")


# --------------------------------------------------------------------------------------------
# MobileNet
# --------------------------------------------------------------------------------------------
class InvertedResidual(nn.Module):
    """MobileNetV2's block (Sandler et al. 2018, Fig. 3b), ``c_in → c_in·expansion → c_out``.

    ``expand`` (1×1 conv; absent when ``expansion == 1``) → ``norm1`` → ReLU6 → ``dw`` (3×3 depthwise,
    ``groups = hidden``, ``stride``) → ``norm2`` → ReLU6 → ``project`` (1×1 conv) → ``norm3``; plus the
    input when ``stride == 1`` and ``c_in == c_out`` (``self.residual``).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int, norm: str | None, groups: int):
        super().__init__()
        hidden = c_in * expansion
        bias = norm is None
        self.residual = stride == 1 and c_in == c_out
        if expansion > 1:
            self.expand: nn.Module | None = nn.Conv2d(c_in, hidden, 1, bias=bias)
            self.norm1: nn.Module | None = conv_norm(norm, hidden, groups)
        else:
            self.expand = self.norm1 = None
        self.dw = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=bias)
        self.norm2 = conv_norm(norm, hidden, groups)
        self.project = nn.Conv2d(hidden, c_out, 1, bias=bias)
        self.norm3 = conv_norm(norm, c_out, groups)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        if self.expand is not None:
            h = F.relu6(self.norm1(self.expand(h)))
        h = F.relu6(self.norm2(self.dw(h)))
        h = self.norm3(self.project(h))
        return x + h if self.residual else h


class MobileNet(nn.Module):
    """A small MobileNetV2-style classifier (Sandler et al. 2018).

    ``stem`` (3×3 conv, ``in_channels → widths[0]``) → ``stem_norm`` → ReLU6; stage ``s`` has
    ``repeats[s]`` ``InvertedResidual`` blocks of width ``widths[s]``, the first with stride
    ``strides[s]`` (``blocks.{b}`` numbers the blocks of all stages in order); then ``x.mean((2, 3))``
    (global average pool) and ``head`` (Linear ``widths[-1] → num_classes``). Inputs
    ``[B, in_channels, S, S]`` or ``[B, in_channels·S·S]`` with ``S = image_size``; logits ``[B, num_classes]``.

    Raises ``ValueError`` / ``TypeError`` for a bad argument: ``widths``, ``strides`` (each 1 or 2) and
    ``repeats`` have one entry per stage, ``image_size`` is divisible by the product of the strides, and
    ``groups`` divides every width (``norm="group"``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (8, 16, 24),
        expansion: int = 4,
        strides: Sequence[int] = (1, 2, 2),
        repeats: Sequence[int] = (1, 2, 2),
        norm: str | None = "batch",
        groups: int = 2,
        image_size: int = 8,
    ):
        super().__init__()
        in_channels, num_classes = validate.counts(in_channels=in_channels, num_classes=num_classes)
        widths = validate.integers("widths", widths)
        expansion = validate.integer("expansion", expansion)
        strides = validate.integers("strides", strides, maximum=2)
        repeats = validate.integers("repeats", repeats)
        norm = validate.choice("norm", norm, CONV_NORMS)
        groups, image_size = validate.counts(groups=groups, image_size=image_size)
        if not widths:
            raise ValueError("widths must name at least one stage")
        if not len(widths) == len(strides) == len(repeats):
            raise ValueError(
                f"widths, strides and repeats need one entry per stage, got {len(widths)}, {len(strides)} "
                f"and {len(repeats)}"
            )
        _check_size(image_size, sum(s == 2 for s in strides), "one halving per stride-2 stage")
        self.config: dict[str, Any] = {"name": "mobilenet", "in_channels": in_channels, "num_classes": num_classes,
                                       "widths": list(widths), "expansion": expansion, "strides": list(strides),
                                       "repeats": list(repeats), "norm": norm, "groups": groups,
                                       "image_size": image_size}
        self.in_channels, self.image_size = in_channels, image_size
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=norm is None)
        self.stem_norm = conv_norm(norm, widths[0], groups)
        blocks: list[nn.Module] = []
        c_in = widths[0]
        for c, s, r in zip(widths, strides, repeats, strict=True):
            for j in range(r):
                blocks.append(InvertedResidual(c_in, c, s if j == 0 else 1, expansion, norm, groups))
                c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = _as_image(x, self.in_channels, self.image_size)
        x = F.relu6(self.stem_norm(self.stem(x)))
        x = self.blocks(x)
        return self.head(x.mean((2, 3)))


# --------------------------------------------------------------------------------------------
# DenseNet
# --------------------------------------------------------------------------------------------
class DenseLayer(nn.Module):
    """``torch.cat([x, conv(relu(norm(x)))], 1)``: ``growth`` new channels appended to the input
    (Huang et al. 2017, Eq. (2), pre-activation ``H_l`` = norm-ReLU-conv3×3)."""

    def __init__(self, c_in: int, growth: int, norm: str | None):
        super().__init__()
        self.norm = conv_norm(norm, c_in)
        self.conv = nn.Conv2d(c_in, growth, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.conv(F.relu(self.norm(x)))], 1)


class Transition(nn.Module):
    """``avg_pool2(conv1×1(relu(norm(x))))`` between dense blocks (Huang et al. 2017, §3)."""

    def __init__(self, c_in: int, c_out: int, norm: str | None):
        super().__init__()
        self.norm = conv_norm(norm, c_in)
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.norm(x))), 2)


class DenseNet(nn.Module):
    """A small DenseNet-BC (Huang et al. 2017).

    ``stem`` (3×3 conv, ``in_channels → init_channels``, no bias) → dense block ``b`` of
    ``block_layers[b]`` ``DenseLayer``s (keys ``blocks.{b}.{l}.*``; each adds ``growth`` channels) →
    between blocks a ``Transition`` (``transitions.{b}``) to half the channels (``C // 2``) and half
    the resolution → final ``norm`` → ReLU → ``x.mean((2, 3))`` → ``head`` (Linear). Inputs
    ``[B, in_channels, S, S]`` or ``[B, in_channels·S·S]`` with ``S = image_size``; logits ``[B, num_classes]``.
    ``norm``: ``None`` or ``"batch"`` (a GroupNorm would straddle the concatenated segments).

    Raises ``ValueError`` / ``TypeError`` for a bad argument (``image_size`` must be divisible by
    ``2 ** (len(block_layers) - 1)``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        growth: int = 8,
        block_layers: Sequence[int] = (3, 3),
        init_channels: int = 8,
        norm: str | None = "batch",
        image_size: int = 8,
    ):
        super().__init__()
        in_channels, num_classes, growth = validate.counts(
            in_channels=in_channels, num_classes=num_classes, growth=growth)
        block_layers = validate.integers("block_layers", block_layers)
        init_channels = validate.integer("init_channels", init_channels)
        norm = validate.choice("DenseNet norm", norm, (None, "batch"))
        image_size = validate.integer("image_size", image_size)
        if not block_layers:
            raise ValueError("block_layers must name at least one dense block")
        _check_size(image_size, len(block_layers) - 1, "one 2x average pool per transition")
        self.config: dict[str, Any] = {"name": "densenet", "in_channels": in_channels, "num_classes": num_classes,
                                       "growth": growth, "block_layers": list(block_layers),
                                       "init_channels": init_channels, "norm": norm, "image_size": image_size}
        self.in_channels, self.image_size = in_channels, image_size
        self.stem = nn.Conv2d(in_channels, init_channels, 3, padding=1, bias=False)
        blocks, transitions = [], []
        c = init_channels
        for b, n in enumerate(block_layers):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(c, growth, norm))
                c += growth
            blocks.append(nn.Sequential(*layers))
            if b < len(block_layers) - 1:
                transitions.append(Transition(c, c // 2, norm))
                c //= 2
        self.blocks = nn.ModuleList(blocks)
        self.transitions = nn.ModuleList(transitions)
        self.norm = conv_norm(norm, c)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(_as_image(x, self.in_channels, self.image_size))
        for b, block in enumerate(self.blocks):
            x = block(x)
            if b < len(self.transitions):
                x = self.transitions[b](x)
        x = F.relu(self.norm(x))
        return self.head(x.mean((2, 3)))


# --------------------------------------------------------------------------------------------
# U-Net
# --------------------------------------------------------------------------------------------
class DoubleConv(nn.Module):
    """``relu(norm2(conv2(relu(norm1(conv1(x))))))`` with 3×3 convs (Ronneberger et al. 2015, Fig. 1)."""

    def __init__(self, c_in: int, c_out: int, norm: str | None, groups: int):
        super().__init__()
        bias = norm is None
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias)
        self.norm1 = conv_norm(norm, c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias)
        self.norm2 = conv_norm(norm, c_out, groups)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(x)))


class UNet(nn.Module):
    """A small U-Net classifier (Ronneberger et al. 2015) with GroupNorm (Wu & He 2018).

    Level ``i`` (``0 ≤ i < levels``) has width ``c_i = base·2^i``: encoder ``enc.{i}`` (``DoubleConv``;
    its output is the skip), 2× max-pool; bottleneck ``mid`` (``DoubleConv`` to ``base·2^levels``);
    decoder, from the deepest level up: ``up.{i}`` (``ConvTranspose2d(2·c_i, c_i, 2, stride=2)``),
    ``torch.cat([up, skip_i], 1)``, ``dec.{i}`` (``DoubleConv`` ``2·c_i → c_i``); then ``out`` (1×1 conv
    ``base → num_classes``) and ``x.mean((2, 3))``. Norms follow convs only, never a concatenation.
    Inputs ``[B, in_channels, S, S]`` or ``[B, in_channels·S·S]`` with ``S = image_size``; logits
    ``[B, num_classes]``.

    Raises ``ValueError`` / ``TypeError`` for a bad argument (``image_size`` divisible by ``2 ** levels``;
    ``groups`` divides ``base`` for ``norm="group"``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        base: int = 8,
        groups: int = 2,
        levels: int = 2,
        norm: str | None = "group",
        image_size: int = 8,
    ):
        super().__init__()
        in_channels, num_classes, base, groups, levels = validate.counts(
            in_channels=in_channels, num_classes=num_classes, base=base, groups=groups, levels=levels)
        norm = validate.choice("norm", norm, CONV_NORMS)
        image_size = validate.integer("image_size", image_size)
        _check_size(image_size, levels, "one 2x max-pool per level")
        if norm == "group" and base % groups:
            raise ValueError(f"GroupNorm: groups={groups} does not divide base={base} channels")
        self.config: dict[str, Any] = {"name": "unet", "in_channels": in_channels, "num_classes": num_classes,
                                       "base": base, "groups": groups, "levels": levels, "norm": norm,
                                       "image_size": image_size}
        self.in_channels, self.image_size = in_channels, image_size
        widths = [base * 2**i for i in range(levels)]
        self.enc = nn.ModuleList(
            DoubleConv(c_in, c, norm, groups) for c_in, c in zip([in_channels, *widths[:-1]], widths, strict=True)
        )
        self.mid = DoubleConv(widths[-1], 2 * widths[-1], norm, groups)
        self.up = nn.ModuleList(nn.ConvTranspose2d(2 * c, c, 2, stride=2) for c in widths)
        self.dec = nn.ModuleList(DoubleConv(2 * c, c, norm, groups) for c in widths)
        self.out = nn.Conv2d(base, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = _as_image(x, self.in_channels, self.image_size)
        skips = []
        for enc in self.enc:
            x = enc(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.mid(x)
        for i in reversed(range(len(self.dec))):
            x = torch.cat([self.up[i](x), skips[i]], 1)
            x = self.dec[i](x)
        return self.out(x).mean((2, 3))
