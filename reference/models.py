"""The model zoo: architectures only.

Every model is a plain ``nn.Module`` whose parameters and buffers (``state_dict()``) form the
``Params`` point it is evaluated at with ``torch.func.functional_call``. Each model stores the
keyword arguments that built it in ``self.config`` (JSON-friendly: lists, not tuples, plus a
``"name"``), and ``build_model(config)`` rebuilds the same architecture.

Models (the permutation symmetries of each are written out in ``reference/specs.py``):

- ``MLP``: Linear + ReLU per hidden layer, a Linear head (Git Re-Basin's MLP, Ainsworth et al. 2023).
- ``VGG``: conv(3, pad 1)-norm-ReLU blocks with ``"M"`` max-pools, global average pool, Linear head
  (Simonyan & Zisserman 2015, with a GAP head as in Git Re-Basin's VGG).
- ``ResNet``: the CIFAR ResNet-20 family of He et al. 2016 (§4.2): ``depth = 6n + 2``, three stages of
  ``n`` basic blocks with ``base·width``, ``2·base·width``, ``4·base·width`` channels.
- ``CNN1D``: a small 1-D CNN for MNIST-1D (Greydanus 2020), inputs ``[B, L]`` or ``[B, C, L]``.
- ``ViT``, ``CausalTransformer`` (``reference/transformers.py``): a small Vision Transformer
  (Dosovitskiy et al. 2021) for digits and MNIST-1D patch sequences, and a GPT-style causal language
  model (Radford et al. 2019) for ``make_sequence_task``.
- ``MobileNet``, ``DenseNet``, ``UNet`` (``reference/convnets.py``): inverted residuals with depthwise
  convs (Sandler et al. 2018), dense concatenations (Huang et al. 2017), a U-Net with concatenated
  skips, transposed convs and GroupNorm (Ronneberger et al. 2015). Their specs: ``reference/specs_modern.py``.

Normalisations (``norm``): ``None``; ``"batch"`` (BatchNorm with running statistics); ``"layer"``
(``ChannelLayerNorm``: LayerNorm over the channel dimension at every position); ``"group"``
(``nn.GroupNorm(groups, C)``: invariant only under permutations mapping contiguous blocks of
``C / groups`` channels onto blocks, see ``reference/permutation.py``).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import validate
from .convnets import DenseNet, MobileNet, UNet
from .params import Params
from .transformers import CausalTransformer, ViT

__all__ = [
    "CNN1D",
    "MLP",
    "NORMS",
    "VGG",
    "BasicBlock",
    "ChannelLayerNorm",
    "ConvBlock",
    "ResNet",
    "build_model",
    "init_params",
    "make_norm",
    "MODELS",
]

NORMS: tuple[str | None, ...] = (None, "batch", "layer", "group")


# --------------------------------------------------------------------------------------------
# argument checks (reference/validate.py: ValueError / TypeError, never assert)
# --------------------------------------------------------------------------------------------
def _check_norm(norm: Any, groups: Any, allowed: Sequence[str | None] = NORMS) -> tuple[str | None, int]:
    return validate.choice("norm", norm, allowed), validate.integer("groups", groups)


def _check_dims(dims: Any) -> int:
    """1 (``[B, C, L]`` inputs) or 2 (``[B, C, H, W]``)."""
    return validate.integer("dims", dims, minimum=1, maximum=2)


# --------------------------------------------------------------------------------------------
# normalisation layers
# --------------------------------------------------------------------------------------------
class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dimension (dim 1) at every position of a ``[B, C, *]`` input.

    Holds ``self.ln = nn.LayerNorm(C)``; state_dict keys are ``<prefix>.ln.weight`` and
    ``<prefix>.ln.bias``. For ``[B, C]`` inputs it is an ordinary LayerNorm.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__()
        self.num_channels = validate.integer("num_channels", num_channels)
        self.ln = nn.LayerNorm(num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        # contiguous: vmap over a later adaptive pool of the strided view would fall back to a slow loop
        return self.ln(x.movedim(1, -1)).movedim(-1, 1).contiguous()

    def extra_repr(self) -> str:
        return f"{self.num_channels}"


def make_norm(norm: str | None, channels: int, dims: int = 2, groups: int = 2) -> nn.Module:
    """The normalisation layer for ``channels`` channels of a ``dims``-dimensional feature map.

    ``None`` → ``nn.Identity`` (no parameters); ``"batch"`` → ``BatchNorm{dims}d``; ``"layer"`` →
    ``ChannelLayerNorm``; ``"group"`` → ``nn.GroupNorm(groups, channels)`` (``groups`` must divide
    ``channels``).
    """
    norm, groups = _check_norm(norm, groups)
    dims = _check_dims(dims)
    channels = validate.integer("channels", channels)
    if norm is None:
        return nn.Identity()
    if norm == "batch":
        return nn.BatchNorm1d(channels) if dims == 1 else nn.BatchNorm2d(channels)
    if norm == "layer":
        return ChannelLayerNorm(channels)
    if channels % groups:
        raise ValueError(f"GroupNorm: groups={groups} does not divide {channels} channels")
    return nn.GroupNorm(groups, channels)


def _conv(dims: int) -> type[nn.Conv1d] | type[nn.Conv2d]:
    return nn.Conv1d if dims == 1 else nn.Conv2d


class ReshapeMaxPool1d(nn.MaxPool1d):
    """``nn.MaxPool1d`` that, while autograd records on the CPU, takes each window's maximum as a reshape
    and a ``max`` over the last axis. The values are the same, and so is the gradient: ``max`` sends it to
    the first maximum of each window, as ``max_pool1d``'s indices do. Forward and backward together are
    1.5x faster on the CPU (``bench/bench_pooling.py``: max_pool1d takes the 2-D kernel, with indices,
    when it records); without grad, ``F.max_pool1d`` is 6x faster than the reshape and is used. Only
    non-overlapping windows (``stride == kernel_size``, no padding or dilation, floor mode, no indices)
    take the reshape; on other devices it is plain ``nn.MaxPool1d`` (not measured there).

    Inside ``vmap`` a tensor does not say whether it requires grad, so grad mode alone decides.
    ``torch.fx`` keeps it whole, as it keeps ``nn.MaxPool1d`` (``reference.trace``)."""

    def _reshaped(self) -> int | None:
        k, s = self.kernel_size, self.stride
        k = k[0] if isinstance(k, tuple) else k
        s = s[0] if isinstance(s, tuple) else s
        plain = self.padding in (0, (0,)) and self.dilation in (1, (1,)) and not self.ceil_mode
        return k if s == k and plain and not self.return_indices else None

    def forward(self, x: Tensor) -> Tensor:
        k = self._reshaped() if torch.is_grad_enabled() and x.device.type == "cpu" else None
        if k is None:
            return super().forward(x)
        n = x.shape[-1] // k
        if n == 0:  # shorter than a window: max_pool1d's own error
            return super().forward(x)
        return x[..., : n * k].unflatten(-1, (n, k)).max(-1).values


def _maxpool(dims: int) -> nn.Module:
    return ReshapeMaxPool1d(2) if dims == 1 else nn.MaxPool2d(2)


def _gap(dims: int) -> nn.Module:
    return nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)


# --------------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """``in_features → widths[0] → … → widths[-1] → num_classes``, ReLU after every hidden Linear.

    Inputs ``[B, *]`` are flattened to ``[B, in_features]``. Keys: ``layers.{i}.weight``,
    ``layers.{i}.bias`` (hidden), ``head.weight``, ``head.bias``. ``widths`` may be empty (a linear
    model) and uneven. ``norm="layer"`` puts a LayerNorm (keys ``norms.{i}.weight/bias``) between
    each hidden Linear and its ReLU, as in the rebasin MLP study's model; the config records
    ``norm`` only when it is set, so configs (and cache keys) of plain MLPs are unchanged.
    """

    def __init__(
        self, in_features: int, widths: Sequence[int], num_classes: int, bias: bool = True, norm: str | None = None
    ):
        super().__init__()
        in_features = validate.integer("in_features", in_features)
        widths = validate.integers("widths", widths)
        num_classes = validate.integer("num_classes", num_classes)
        validate.choice("MLP norm", norm, (None, "layer"))
        bias = validate.flag("bias", bias)
        self.config: dict[str, Any] = {"name": "mlp", "in_features": in_features, "widths": list(widths),
                                       "num_classes": num_classes, "bias": bias}
        if norm is not None:
            self.config["norm"] = norm
        dims = [in_features, *widths]
        self.layers = nn.ModuleList(
            nn.Linear(a, b, bias=bias) for a, b in zip(dims[:-1], dims[1:], strict=True)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(w) for w in widths) if norm == "layer" else None
        self.head = nn.Linear(dims[-1], num_classes, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.norms is not None:
                x = self.norms[i](x)
            x = F.relu(x)
        return self.head(x)


# --------------------------------------------------------------------------------------------
# VGG / CNN1D building block
# --------------------------------------------------------------------------------------------
class ConvBlock(nn.Module):
    """conv → norm → ReLU. Keys: ``conv.weight``, ``conv.bias``, ``norm.*`` (see ``make_norm``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        norm: str | None,
        groups: int,
        dims: int,
        bias: bool,
    ):
        super().__init__()
        self.conv = _conv(dims)(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.norm = make_norm(norm, out_channels, dims, groups)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.norm(self.conv(x)))


class VGG(nn.Module):
    """VGG-style CNN: ``channels`` lists conv widths and ``"M"`` (2× max-pool).

    ``features.{i}`` is a ``ConvBlock`` (conv k=3 pad=1 → norm → ReLU) or a max-pool; then a global
    average pool, flatten and ``head`` (Linear). ``dims=1`` takes ``[B, C, L]`` (Conv1d),
    ``dims=2`` takes ``[B, C, H, W]`` (Conv2d).
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int | str],
        num_classes: int,
        norm: str | None = None,
        groups: int = 2,
        dims: int = 2,
        bias: bool = True,
    ):
        super().__init__()
        in_channels, num_classes = validate.counts(in_channels=in_channels, num_classes=num_classes)
        norm, groups = _check_norm(norm, groups)
        dims = _check_dims(dims)
        if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence):
            raise validate.ArgumentTypeError(f"channels must be a sequence of ints and 'M', got {channels!r}")
        entries: list[int | str] = []
        for i, c in enumerate(channels):
            entries.append(c if c == "M" else validate.integer(f"channels[{i}]", c))
        if not any(c != "M" for c in entries):
            raise ValueError(f"channels must contain at least one conv width, got {list(channels)}")
        bias = validate.flag("bias", bias)
        self.config: dict[str, Any] = {"name": "vgg", "in_channels": in_channels, "channels": entries,
                                       "num_classes": num_classes, "norm": norm, "groups": groups, "dims": dims,
                                       "bias": bias}
        layers: list[nn.Module] = []
        c_in = in_channels
        for c in entries:
            if c == "M":
                layers.append(_maxpool(dims))
            else:
                layers.append(ConvBlock(c_in, int(c), 3, norm, groups, dims, bias))
                c_in = int(c)
        self.features = nn.Sequential(*layers)
        self.pool = _gap(dims)
        self.head = nn.Linear(c_in, num_classes, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.features(x))
        return self.head(torch.flatten(x, 1))


class CNN1D(nn.Module):
    """1-D CNN for MNIST-1D: ``conv(k, pad k//2) → norm → ReLU`` blocks, a 2× max-pool between blocks,
    global average pool, Linear ``head``.

    Accepts ``[B, L]`` (read as one channel) and ``[B, C, L]``. Blocks are ``blocks.{i}`` (``ConvBlock``),
    pools ``pools.{i}`` (no parameters).
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 32, 32),
        num_classes: int = 10,
        norm: str | None = None,
        kernel_size: int = 5,
        groups: int = 2,
        bias: bool = True,
    ):
        super().__init__()
        in_channels = validate.integer("in_channels", in_channels)
        channels = validate.integers("channels", channels)
        if not channels:
            raise ValueError("channels must name at least one conv layer")
        num_classes, kernel_size = validate.counts(num_classes=num_classes, kernel_size=kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding), got {kernel_size}")
        norm, groups = _check_norm(norm, groups)
        bias = validate.flag("bias", bias)
        self.config: dict[str, Any] = {"name": "cnn1d", "in_channels": in_channels, "channels": list(channels),
                                       "num_classes": num_classes, "norm": norm, "kernel_size": kernel_size,
                                       "groups": groups, "bias": bias}
        self.in_channels = in_channels
        dims = [in_channels, *channels]
        self.blocks = nn.ModuleList(
            ConvBlock(a, b, kernel_size, norm, groups, 1, bias)
            for a, b in zip(dims[:-1], dims[1:], strict=True)
        )
        self.pools = nn.ModuleList(ReshapeMaxPool1d(2) for _ in channels[1:])
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(channels[-1], num_classes, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        # [B, L] -> [B, 1, L]; [B, C, L] unchanged (no data-dependent control flow: fx-traceable)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        x = self.blocks[0](x)
        for pool, block in zip(self.pools, self.blocks[1:], strict=True):
            x = block(pool(x))
        return self.head(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------------------------
# ResNet
# --------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """He et al. 2016's basic block: ``relu(norm2(conv2(relu(norm1(conv1(x))))) + shortcut(x))``.

    ``shortcut`` is the identity when shapes match, else ``Sequential(conv1x1(stride), norm)``
    (option B of He et al.). Convs have no bias.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str | None, groups: int, dims: int):
        super().__init__()
        conv = _conv(dims)
        self.conv1 = conv(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, c_out, dims, groups)
        self.conv2 = conv(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.norm2 = make_norm(norm, c_out, dims, groups)
        self.shortcut: nn.Module
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                conv(c_in, c_out, 1, stride=stride, bias=False), make_norm(norm, c_out, dims, groups)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016, §4.2): ``depth = 6n + 2`` (20 → n = 3; 8 → n = 1 for tests).

    ``conv`` (stem, 3×3, ``base·width`` channels) → ``norm`` → ReLU → ``layer1..3`` (``n`` basic
    blocks each, ``base·width·{1, 2, 4}`` channels, stride 2 at the first block of stages 2 and 3) →
    global average pool → ``head`` (Linear). ``width`` is the width multiplier of Git Re-Basin's
    ResNet-20 ×w experiments.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        depth: int = 20,
        width: int = 1,
        norm: str | None = "batch",
        groups: int = 2,
        dims: int = 2,
        base: int = 16,
    ):
        super().__init__()
        in_channels, num_classes, depth = validate.counts(in_channels=in_channels, num_classes=num_classes, depth=depth)
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n + 2 with n >= 1 (8, 14, 20, ...), got {depth}")
        width, base = validate.counts(width=width, base=base)
        norm, groups = _check_norm(norm, groups)
        dims = _check_dims(dims)
        self.config: dict[str, Any] = {"name": "resnet", "in_channels": in_channels, "num_classes": num_classes,
                                       "depth": depth, "width": width, "norm": norm, "groups": groups, "dims": dims,
                                       "base": base}
        n = (depth - 2) // 6
        widths = [base * width * m for m in (1, 2, 4)]
        self.blocks_per_stage = n
        self.conv = _conv(dims)(in_channels, widths[0], 3, padding=1, bias=False)
        self.norm = make_norm(norm, widths[0], dims, groups)
        c_in = widths[0]
        stages = []
        for s, c in enumerate(widths):
            blocks = []
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                blocks.append(BasicBlock(c_in, c, stride, norm, groups, dims))
                c_in = c
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = _gap(dims)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.norm(self.conv(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.head(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------------------------
# registry, rebuilding, initialisation
# --------------------------------------------------------------------------------------------
MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "vgg": VGG,
    "resnet": ResNet,
    "cnn1d": CNN1D,
    "vit": ViT,
    "causal_transformer": CausalTransformer,
    "mobilenet": MobileNet,
    "densenet": DenseNet,
    "unet": UNet,
}


def build_model(config: dict[str, Any]) -> nn.Module:
    """Rebuild a zoo model from its ``config``: ``build_model(m.config).config == m.config``.

    Raises ``ValueError`` naming an unknown ``"name"`` or unknown / missing keyword arguments.
    """
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    if "name" not in config:
        raise ValueError(f"config lacks 'name'; one of {sorted(MODELS)}; got keys {sorted(config)}")
    name = config["name"]
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; known: {sorted(MODELS)}")
    cls = MODELS[name]
    kwargs = {k: v for k, v in config.items() if k != "name"}
    sig = inspect.signature(cls)
    unknown = sorted(set(kwargs) - set(sig.parameters))
    if unknown:
        raise ValueError(f"model {name!r}: unknown config keys {unknown}; accepted: {list(sig.parameters)}")
    try:
        sig.bind(**kwargs)
    except TypeError as e:
        raise ValueError(f"model {name!r}: bad config {config!r}: {e}") from e
    return cls(**kwargs)


def init_params(model: nn.Module, seed: int) -> Params:
    """A fresh initial point for ``model``'s architecture, a function of ``seed`` only.

    A copy of ``model`` has ``reset_parameters()`` called on every submodule (default PyTorch
    initialisation, BatchNorm statistics reset) under ``torch.random.fork_rng`` seeded with
    ``seed``: the global RNG state is left as it was and ``model`` is untouched. Raises
    ``ValueError`` if a parameter is owned by a module without ``reset_parameters`` (it could not be
    re-initialised). The numbers are drawn on the CPU (the same on every device) and returned under
    ``state_dict`` keys on ``model``'s devices, in its dtypes.
    """
    seed = validate.integer("seed", seed, minimum=None)
    devices = {k: v.device for k, v in model.state_dict().items()}
    fresh = copy.deepcopy(model).cpu()  # CPU generator: the same numbers on every device
    missed = [
        f"{prefix}.{name}" if prefix else name
        for prefix, mod in fresh.named_modules()
        if not callable(getattr(mod, "reset_parameters", None))
        for name, _ in mod.named_parameters(recurse=False)
    ]
    if missed:
        raise ValueError(f"cannot re-initialise parameters without a reset_parameters() owner: {missed}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.no_grad():
            for mod in fresh.modules():
                reset = getattr(mod, "reset_parameters", None)
                if callable(reset):
                    reset()
    return {k: v.detach().to(devices[k], copy=True) for k, v in fresh.state_dict().items()}
