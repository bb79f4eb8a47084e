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

``spec_for(model)`` is written by hand per zoo class. ``trace_spec(model, x)`` derives the same
symmetry from a ``torch.fx`` trace: a union-find over *channel spaces* (each Linear / conv output
opens one; residual additions merge them; the input's and output's spaces are fixed). A test checks
``spec_for(m).same_symmetry(trace_spec(m, x))`` for every zoo model.

Group names of ``spec_for``: MLP ``P_{i}`` (output of ``layers.{i}``); VGG and CNN1D ``P_conv{i}``
(output of the i-th conv); ResNet ``P_stage{s}`` (the residual stream of stage s: stem, every
block's ``conv2``, the 1×1 shortcut conv and their norms) and ``P_layer{s}.{b}.inner`` (the inner
conv of block b of stage s). ``trace_spec`` names a group ``P_<module>`` after the first layer
that opens it (e.g. ``P_layers.0``, ``P_conv``, ``P_layer1.0.conv1``).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from .models import CNN1D, MLP, VGG, ResNet
from .permutation import PermutationSpec

__all__ = ["spec_for", "trace_spec"]

Axes = dict[str, tuple[str | None, ...]]


# ============================================================================================
# hand-written specs
# ============================================================================================
def _norm_axes(prefix: str, kind: str | None, group: str) -> Axes:
    """Keys of the norm layer ``make_norm(kind, ...)`` at ``prefix``, all acting on ``group``."""
    if kind is None:
        return {}
    if kind == "batch":
        return {
            f"{prefix}.weight": (group,),
            f"{prefix}.bias": (group,),
            f"{prefix}.running_mean": (group,),
            f"{prefix}.running_var": (group,),
            f"{prefix}.num_batches_tracked": (),
        }
    if kind == "layer":
        return {f"{prefix}.ln.weight": (group,), f"{prefix}.ln.bias": (group,)}
    if kind == "group":
        return {f"{prefix}.weight": (group,), f"{prefix}.bias": (group,)}
    raise ValueError(f"unknown norm {kind!r} at {prefix!r}")


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


# ============================================================================================
# spec discovery with torch.fx
# ============================================================================================
_FIXED = 0  # the space of everything that is never permuted: inputs, outputs, spatial axes

_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Hardtanh,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)
_POOL_MODULES: dict[type[nn.Module], int] = {
    nn.MaxPool1d: 1,
    nn.MaxPool2d: 2,
    nn.MaxPool3d: 3,
    nn.AvgPool1d: 1,
    nn.AvgPool2d: 2,
    nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2,
    nn.AdaptiveMaxPool3d: 3,
}
_ELEMENTWISE_FUNCTIONS: set[Any] = {
    F.relu,
    F.relu_,
    torch.relu,
    torch.relu_,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardtanh,
    F.softplus,
    F.dropout,
    torch.tanh,
    torch.sigmoid,
    operator.neg,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "tanh", "sigmoid", "neg", "contiguous", "clone", "detach"}
_POOL_FUNCTIONS: dict[Any, int] = {
    F.max_pool1d: 1,
    F.max_pool2d: 2,
    F.max_pool3d: 3,
    F.avg_pool1d: 1,
    F.avg_pool2d: 2,
    F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1,
    F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2,
    F.adaptive_max_pool3d: 3,
}
_ADD_FUNCTIONS: set[Any] = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
_ADD_METHODS = {"add", "add_", "sub", "sub_"}
_SCALE_FUNCTIONS: set[Any] = {
    operator.mul,
    operator.imul,
    operator.truediv,
    operator.itruediv,
    torch.mul,
    torch.div,
}
_SCALE_METHODS = {"mul", "mul_", "div", "div_"}
_SHAPE_METHODS = {"size", "dim"}
_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device"}


class _Spaces:
    """Union-find over channel spaces; space 0 is the fixed space (merging with it fixes a space)."""

    def __init__(self) -> None:
        self.parent: list[int] = [_FIXED]
        self.names: list[str] = ["<fixed>"]

    def new(self, name: str) -> int:
        self.parent.append(len(self.parent))
        self.names.append(name)
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:  # path compression
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the older space (smaller id, fixed = 0) names the merged one
            lo, hi = min(ra, rb), max(ra, rb)
            self.parent[hi] = lo

    def fix(self, a: int) -> None:
        self.union(a, _FIXED)

    def permuted(self, a: int) -> bool:
        return self.find(a) != _FIXED


def _tensor_nodes(args: Any) -> Iterator[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(args, found.append)
    return iter(found)


def _norm_dim(d: int, ndim: int, node: fx.Node) -> int:
    if not -ndim <= d < max(ndim, 1):
        raise ValueError(f"trace_spec: node {node.name!r}: dim {d} out of range for {ndim} dims")
    return d % ndim if ndim else 0


class _SpecInterpreter(fx.Interpreter):
    """Runs the traced graph on the example input and propagates channel spaces node by node.

    For every tensor-valued node it keeps one space id per axis; for every ``state_dict`` key the
    space ids of its axes. Unknown operations on permuted tensors raise ``ValueError``; operations
    whose tensor inputs are all unpermuted give unpermuted results (they cannot see a permutation).
    """

    def __init__(self, gm: fx.GraphModule, state: Mapping[str, Tensor]):
        super().__init__(gm)
        self.extra_traceback = False  # our errors name the node themselves
        self.state = state
        self.spaces = _Spaces()
        self.axes: dict[fx.Node, list[int]] = {}
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}
        self.key_axes: dict[str, list[int]] = {}
        self.blocks: list[tuple[int, int, str]] = []
        self._opened: dict[str, int] = {}

    # --- bookkeeping ------------------------------------------------------------------------
    def _open(self, module_name: str) -> int:
        k = self._opened.get(module_name, 0)
        self._opened[module_name] = k + 1
        return self.spaces.new(module_name if k == 0 else f"{module_name}:{k + 1}")

    def _attach(self, key: str, axes: Sequence[int]) -> None:
        if key in self.key_axes:  # a layer used twice: both uses permute the same tensor
            for a, b in zip(self.key_axes[key], axes, strict=True):
                self.spaces.union(a, b)
        else:
            self.key_axes[key] = list(axes)

    def _attach_module(self, name: str, module: nn.Module, local: Mapping[str, Sequence[int]]) -> None:
        """Attach ``module``'s own parameters and persistent buffers; any the rule misses is an error."""
        own = [n for n, _ in module.named_parameters(recurse=False)]
        own += [n for n, _ in module.named_buffers(recurse=False)]
        for attr in own:
            key = f"{name}.{attr}" if name else attr
            if key not in self.state:
                continue  # non-persistent buffer
            if attr not in local:
                raise ValueError(
                    f"trace_spec: {type(module).__name__} {name!r} holds {key!r}, which its rule does not "
                    "know how to permute"
                )
            self._attach(key, local[attr])

    def _permuted(self, node: fx.Node) -> bool:
        return any(self.spaces.permuted(a) for a in self.axes.get(node, ()))

    def _one_tensor(self, n: fx.Node) -> fx.Node:
        tensors = [a for a in _tensor_nodes((n.args, n.kwargs)) if a in self.axes]
        if len(tensors) != 1:
            raise ValueError(
                f"trace_spec: node {n.name!r} ({n.format_node()}) takes {len(tensors)} tensors; expected one"
            )
        return tensors[0]

    def _unsupported(self, n: fx.Node, why: str = "") -> ValueError:
        return ValueError(
            f"trace_spec: unsupported operation at node {n.name!r} ({n.op} {_target_name(n)}) on a "
            f"permuted tensor{': ' + why if why else ''}; spec discovery does not guess how it "
            "transforms channels"
        )

    # --- the interpreter hook ---------------------------------------------------------------
    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as e:  # the model cannot run on the example input
            raise ValueError(
                f"trace_spec: running node {n.name!r} ({n.format_node()}) on the example input failed: {e}"
            ) from e
        if n.op == "output":
            for a in _tensor_nodes(n.args):
                for s in self.axes.get(a, ()):
                    self.spaces.fix(s)
            return result
        axes = self._propagate(n, result)
        if isinstance(result, Tensor):
            if axes is None:
                raise AssertionError(f"internal: no axes for tensor node {n.name}")  # pragma: no cover
            if len(axes) != result.ndim:
                raise AssertionError(f"internal: {n.name}: {axes} for shape {tuple(result.shape)}")
            self.axes[n] = list(axes)
            self.shapes[n] = tuple(result.shape)
        return result

    def _propagate(self, n: fx.Node, result: Any) -> list[int] | None:
        nd = result.ndim if isinstance(result, Tensor) else 0
        if n.op == "placeholder":
            return [_FIXED] * nd
        if n.op == "get_attr":
            if isinstance(result, Tensor) and any(
                result is t for t in list(self.module.parameters()) + list(self.module.buffers())
            ):
                raise ValueError(
                    f"trace_spec: node {n.name!r} reads parameter/buffer {n.target!r} directly; spec "
                    "discovery only sees parameters through known layers"
                )
            return [_FIXED] * nd
        if n.op == "call_module":
            module = self.fetch_attr(n.target)
            rule = self._module_rule(n, module, result)
            if rule is not None:
                return rule
        else:
            rule = self._function_rule(n, result)
            if rule is not None:
                return rule
        # anything else: allowed only when it cannot see a permutation
        if n.op == "call_module" and any(True for _ in self.fetch_attr(n.target).parameters()):
            raise ValueError(
                f"trace_spec: module {n.target!r} of type {type(self.fetch_attr(n.target)).__name__} "
                f"(node {n.name!r}) has parameters and no rule saying how to permute them"
            )
        if any(self._permuted(a) for a in _tensor_nodes((n.args, n.kwargs))):
            raise self._unsupported(n)
        return [_FIXED] * nd if isinstance(result, Tensor) else None

    # --- rules for modules ------------------------------------------------------------------
    def _module_rule(self, n: fx.Node, m: nn.Module, result: Any) -> list[int] | None:
        name = str(n.target)
        if isinstance(m, nn.Linear):
            x = self.axes[self._one_tensor(n)]
            s = self._open(name)
            self._attach_module(name, m, {"weight": [s, x[-1]], "bias": [s]})
            return [*x[:-1], s]
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if m.groups != 1:
                raise self._unsupported(n, f"grouped convolution (groups={m.groups})")
            x = self.axes[self._one_tensor(n)]
            k = m.weight.ndim - 2
            c = len(x) - k - 1  # channel axis: 1 batched, 0 unbatched
            for a in x[c + 1 :]:
                self.spaces.fix(a)  # a convolution does not commute with permuting positions
            s = self._open(name)
            self._attach_module(name, m, {"weight": [s, x[c], *([_FIXED] * k)], "bias": [s]})
            return [*x[:c], s, *([_FIXED] * k)]
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            x = self.axes[self._one_tensor(n)]
            c = x[1]
            rule = {"weight": [c], "bias": [c], "running_mean": [c], "running_var": [c]}
            self._attach_module(name, m, rule | {"num_batches_tracked": []})
            return list(x)
        if isinstance(m, nn.GroupNorm):
            x = self.axes[self._one_tensor(n)]
            c = x[1]
            self._attach_module(name, m, {"weight": [c], "bias": [c]})
            self.blocks.append((c, m.num_channels // m.num_groups, name))
            return list(x)
        if isinstance(m, nn.LayerNorm):
            x = self.axes[self._one_tensor(n)]
            tail = x[len(x) - len(m.normalized_shape) :]
            self._attach_module(name, m, {"weight": tail, "bias": tail})
            return list(x)
        if isinstance(m, _ELEMENTWISE_MODULES):
            return list(self.axes[self._one_tensor(n)])
        for cls, k in _POOL_MODULES.items():
            if isinstance(m, cls):
                return self._pool(n, k)
        if isinstance(m, nn.Flatten):
            return self._flatten(n, self._one_tensor(n), m.start_dim, m.end_dim)
        return None

    # --- rules for functions and methods ----------------------------------------------------
    def _function_rule(self, n: fx.Node, result: Any) -> list[int] | None:
        t = n.target
        method = n.op == "call_method"
        if (method and t in _SHAPE_METHODS) or (t is getattr and n.args[1] in _SHAPE_ATTRS):
            return None if not isinstance(result, Tensor) else [_FIXED] * result.ndim
        if (method and t in _ELEMENTWISE_METHODS) or (not method and t in _ELEMENTWISE_FUNCTIONS):
            return list(self.axes[self._one_tensor(n)])
        if not method and t in _POOL_FUNCTIONS:
            return self._pool(n, _POOL_FUNCTIONS[t])
        if (method and t == "flatten") or t is torch.flatten:
            x = self._one_tensor(n)
            start = _arg(n, 1, "start_dim", 0)
            end = _arg(n, 2, "end_dim", -1)
            return self._flatten(n, x, start, end)
        if (method and t in ("movedim", "moveaxis")) or t in (torch.movedim, torch.moveaxis):
            x = self._one_tensor(n)
            src = _arg(n, 1, "source", None)
            dst = _arg(n, 2, "destination", None)
            return self._reorder(n, x, _movedim_order(len(self.axes[x]), src, dst, n))
        if (method and t == "permute") or t is torch.permute:
            x = self._one_tensor(n)
            dims = n.args[1:] if method else (n.args[1] if len(n.args) > 1 else n.kwargs["dims"])
            if method and len(dims) == 1 and isinstance(dims[0], (list, tuple)):
                dims = dims[0]
            nd = len(self.axes[x])
            return self._reorder(n, x, [_norm_dim(d, nd, n) for d in dims])
        if (method and t == "transpose") or t is torch.transpose:
            x = self._one_tensor(n)
            nd = len(self.axes[x])
            d0 = _norm_dim(_arg(n, 1, "dim0", None), nd, n)
            d1 = _norm_dim(_arg(n, 2, "dim1", None), nd, n)
            order = list(range(nd))
            order[d0], order[d1] = order[d1], order[d0]
            return self._reorder(n, x, order)
        if (method and t in _ADD_METHODS) or (not method and t in _ADD_FUNCTIONS):
            return self._add(n, result)
        if (method and t in _SCALE_METHODS) or (not method and t in _SCALE_FUNCTIONS):
            tensors = [a for a in _tensor_nodes((n.args, n.kwargs)) if a in self.axes]
            if len(tensors) == 1:  # a tensor times / over a constant keeps its channels
                return list(self.axes[tensors[0]])
            return None  # product of tensors: only if none is permuted (generic rule)
        return None

    # --- shape rules ------------------------------------------------------------------------
    def _pool(self, n: fx.Node, k: int) -> list[int]:
        x = self.axes[self._one_tensor(n)]
        for a in x[len(x) - k :]:
            self.spaces.fix(a)  # pooling windows are positional
        return [*x[: len(x) - k], *([_FIXED] * k)]

    def _flatten(self, n: fx.Node, x: fx.Node, start: int, end: int) -> list[int]:
        """Merged axes keep a space only if it is the one axis among them of size > 1."""
        axes, shape = self.axes[x], self.shapes[x]
        nd = len(axes)
        if nd == 0:
            return [_FIXED]
        start, end = _norm_dim(start, nd, n), _norm_dim(end, nd, n)
        merged = list(range(start, end + 1))
        live = [i for i in merged if self.spaces.permuted(axes[i])]
        if not live:
            space = _FIXED
        elif len(live) == 1 and all(shape[i] == 1 for i in merged if i != live[0]):
            space = axes[live[0]]
        else:
            raise self._unsupported(
                n,
                f"flattening axes {merged} of shape {shape} would mix a permuted axis with other "
                "positions (a spec cannot express the induced permutation)",
            )
        return [*axes[:start], space, *axes[end + 1 :]]

    def _reorder(self, n: fx.Node, x: fx.Node, order: Sequence[int]) -> list[int]:
        axes = self.axes[x]
        if sorted(order) != list(range(len(axes))):
            raise ValueError(
                f"trace_spec: node {n.name!r}: {list(order)} is not a reordering of {len(axes)} axes"
            )
        return [axes[i] for i in order]

    def _add(self, n: fx.Node, result: Any) -> list[int]:
        """Residual addition: operands' spaces are merged axis by axis (broadcast axes excepted)."""
        if not isinstance(result, Tensor):
            raise self._unsupported(n, "addition that does not produce a tensor")
        out = [_FIXED] * result.ndim
        first = [True] * result.ndim
        for a in _tensor_nodes((n.args, n.kwargs)):
            if a not in self.axes:
                continue
            axes, shape = self.axes[a], self.shapes[a]
            for j in range(1, len(axes) + 1):  # align from the right (broadcasting)
                if shape[-j] == 1 and result.shape[-j] != 1:
                    if self.spaces.permuted(axes[-j]):
                        self.spaces.fix(axes[-j])  # a size-1 space has only the identity anyway
                    continue
                if first[-j]:
                    out[-j], first[-j] = axes[-j], False
                else:
                    self.spaces.union(out[-j], axes[-j])
        return out

    # --- result -----------------------------------------------------------------------------
    def spec(self) -> PermutationSpec:
        unreached = sorted(set(self.state) - set(self.key_axes))
        if unreached:
            raise ValueError(
                f"trace_spec: state_dict keys {unreached} were not reached through a known layer of the "
                "traced forward pass"
            )
        name = {}
        for root in sorted({self.spaces.find(s) for axes in self.key_axes.values() for s in axes}):
            if root != _FIXED:
                name[root] = f"P_{self.spaces.names[root]}"
        axes = {k: tuple(name.get(self.spaces.find(s)) for s in self.key_axes[k]) for k in self.state}
        blocks: dict[str, int] = {}
        origin: dict[str, str] = {}
        for s, b, where in self.blocks:
            root = self.spaces.find(s)
            if root == _FIXED or root not in name:
                continue
            g = name[root]
            if blocks.get(g, b) != b:
                raise ValueError(
                    f"trace_spec: group {g!r} is normalised by GroupNorms with block sizes {blocks[g]} "
                    f"({origin[g]!r}) and {b} ({where!r}); a spec holds one block size per group"
                )
            blocks[g], origin[g] = b, where
        shapes = {k: tuple(v.shape) for k, v in self.state.items()}
        return PermutationSpec(axes, shapes, {g: b for g, b in blocks.items() if b != 1})


def _target_name(n: fx.Node) -> str:
    t = n.target
    return t if isinstance(t, str) else getattr(t, "__name__", repr(t))


def _arg(n: fx.Node, pos: int, key: str, default: Any) -> Any:
    if len(n.args) > pos:
        return n.args[pos]
    if key in n.kwargs:
        return n.kwargs[key]
    if default is None:
        raise ValueError(f"trace_spec: node {n.name!r} lacks argument {key!r}")
    return default


def _movedim_order(nd: int, src: int | Sequence[int], dst: int | Sequence[int], n: fx.Node) -> list[int]:
    """``torch.movedim``'s output axis → input axis map."""
    src_l = [src] if isinstance(src, int) else list(src)
    dst_l = [dst] if isinstance(dst, int) else list(dst)
    if len(src_l) != len(dst_l):
        raise ValueError(
            f"trace_spec: node {n.name!r}: movedim source {src} and destination {dst} differ in length"
        )
    src_l = [_norm_dim(d, nd, n) for d in src_l]
    dst_l = [_norm_dim(d, nd, n) for d in dst_l]
    order: list[int | None] = [None] * nd
    for s, d in zip(src_l, dst_l, strict=True):
        order[d] = s
    rest = iter(i for i in range(nd) if i not in src_l)
    return [next(rest) if o is None else o for o in order]


def trace_spec(model: nn.Module, example_input: Tensor) -> PermutationSpec:
    """Derive ``model``'s permutation spec from a ``torch.fx`` trace run on ``example_input``.

    Union-find over channel spaces: every Linear / conv output opens a space; its weight's in-axis
    and out-axis, its bias, and the parameters and float buffers of the norm layers
    (BatchNorm / LayerNorm / GroupNorm; GroupNorm adds ``blocks = C / groups``) attach to spaces;
    elementwise activations, dropout, pooling, ``movedim`` / ``permute`` / ``transpose`` and a
    ``flatten`` whose other merged axes have size 1 carry spaces through; ``+`` / ``-`` (residual
    connections) merge the spaces of their operands. The input's space and the output's are fixed
    (never permuted), as are positional (spatial) axes a conv or pool reads.

    Raises ``ValueError`` naming the node for an operation that reads a permuted tensor and is not
    one of these (e.g. ``torch.cat``, a reduction, a product of two tensors), for a model ``fx``
    cannot trace, and for state_dict keys the trace never reaches. ``model`` is not modified (a copy
    is traced and run in eval mode).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, Tensor):
        raise TypeError(f"example_input must be a Tensor, got {type(example_input).__name__}")
    state = model.state_dict()
    copied = copy.deepcopy(model)
    try:
        gm = fx.symbolic_trace(copied)
    except Exception as e:  # fx raises TraceError / TypeError / NotImplementedError
        raise ValueError(f"trace_spec: torch.fx cannot trace {type(model).__name__}: {e}") from e
    gm.eval()
    interp = _SpecInterpreter(gm, state)
    with torch.no_grad():
        interp.run(example_input.to(next(iter(state.values())).device) if state else example_input)
    return interp.spec()
