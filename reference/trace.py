"""Spec discovery: a model's permutation spec derived from a ``torch.fx`` trace.

``trace_spec(model, x)`` runs the traced graph on ``x`` and keeps a union-find over *channel
spaces* (Eq. (1) of Ainsworth et al. 2023, "Git Re-Basin": a unit may be renamed wherever every
tensor reading or writing it is reindexed the same way). Every Linear / conv output opens a space;
residual additions merge the spaces of their operands; the input's and output's spaces, and the
positional axes a conv or pool reads, are fixed (never permuted). Each group of the spec is one
unfixed space, named ``P_<module>`` after the first layer that opens it (e.g. ``P_layers.0``,
``P_conv``, ``P_layer1.0.conv1``). ``reference.specs.spec_for`` holds the hand-written specs of the
zoo; a test checks ``spec_for(m).same_symmetry(trace_spec(m, x))`` for every zoo model.

How each graph node transforms spaces is a **rule** looked up in ``RULES``:

- a ``call_module`` node: the rule of the most specific class of the module's MRO found in
  ``RULES`` (``nn.Linear``, ``nn.Conv2d``, BatchNorm's base class, ``nn.ReLU``, ...);
- a ``call_function`` node: ``RULES[target]`` (``operator.add``, ``torch.add``, ``F.relu``, ...);
- a ``call_method`` node: ``RULES[name]`` (``"add"``, ``"relu"``, ``"flatten"``, ...).

A ``Rule`` is called as ``rule(tracer, node, result)`` (``tracer``: the running ``SpecInterpreter``,
``result``: the node's value on the example input) and returns one space id per axis of a tensor
result, or ``None`` when it does not apply; a node without an applicable rule is accepted only when
none of its tensor inputs is permuted (and, for a module, when it has no parameters). ``RULES`` is
read at every node, so a rule for a new layer is one entry::

    RULES[MyScale] = elementwise  # a module that keeps every axis's space

Rules attach a module's parameters to spaces with ``tracer.attach_module``; parameters a rule
does not name are an error, so nothing is permuted by guess.
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
from torch.nn.modules.batchnorm import _BatchNorm

from .permutation import PermutationSpec

__all__ = [
    "FIXED",
    "RULES",
    "ChannelSpaces",
    "Rule",
    "SpecInterpreter",
    "trace_spec",
    "linear",
    "conv",
    "batch_norm",
    "group_norm",
    "layer_norm",
    "elementwise",
    "pooling",
    "flatten",
    "movedim",
    "permute",
    "transpose",
    "residual_add",
    "scale",
    "shape_query",
]

FIXED = 0
"""The space of everything that is never permuted: inputs, outputs, positional (spatial) axes."""


class ChannelSpaces:
    """Union-find over channel spaces; space ``FIXED`` (0) is the fixed space (merging with it fixes
    a space). The older space (smaller id) names a merged one."""

    def __init__(self) -> None:
        self.parent: list[int] = [FIXED]
        self.names: list[str] = ["<fixed>"]

    def new(self, name: str) -> int:
        """Open a new space named ``name``; returns its id."""
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
        """Merge spaces ``a`` and ``b`` (one permutation acts on both)."""
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the older space (smaller id, fixed = 0) names the merged one
            lo, hi = min(ra, rb), max(ra, rb)
            self.parent[hi] = lo

    def fix(self, a: int) -> None:
        """Declare space ``a`` never permuted."""
        self.union(a, FIXED)

    def permuted(self, a: int) -> bool:
        return self.find(a) != FIXED


Rule = Callable[["SpecInterpreter", fx.Node, Any], "list[int] | None"]
"""``rule(tracer, node, result)`` → one space id per axis of the tensor ``result``, or ``None``."""


def _tensor_nodes(args: Any) -> Iterator[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(args, found.append)
    return iter(found)


def _norm_dim(d: int, ndim: int, node: fx.Node) -> int:
    if not -ndim <= d < max(ndim, 1):
        raise ValueError(f"trace_spec: node {node.name!r}: dim {d} out of range for {ndim} dims")
    return d % ndim if ndim else 0


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


class SpecInterpreter(fx.Interpreter):
    """Runs the traced graph on the example input and propagates channel spaces node by node.

    For every tensor-valued node it keeps one space id per axis (``axes[node]``, with the shape in
    ``shapes[node]``); for every ``state_dict`` key the space ids of its axes (``key_axes``). The
    rule of each node is looked up in ``RULES`` (see the module docstring). Unknown operations on
    permuted tensors raise ``ValueError``; operations whose tensor inputs are all unpermuted give
    unpermuted results (they cannot see a permutation).
    """

    def __init__(self, gm: fx.GraphModule, state: Mapping[str, Tensor]):
        super().__init__(gm)
        self.extra_traceback = False  # our errors name the node themselves
        self.state = state
        self.spaces = ChannelSpaces()
        self.axes: dict[fx.Node, list[int]] = {}
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}
        self.key_axes: dict[str, list[int]] = {}
        self.blocks: list[tuple[int, int, str]] = []
        self._opened: dict[str, int] = {}

    # --- for rules ----------------------------------------------------------------------------
    def open_space(self, module_name: str) -> int:
        """A new space for the output of ``module_name`` (``name:2``, ... if it is called again)."""
        k = self._opened.get(module_name, 0)
        self._opened[module_name] = k + 1
        return self.spaces.new(module_name if k == 0 else f"{module_name}:{k + 1}")

    def attach(self, key: str, axes: Sequence[int]) -> None:
        """The ``state_dict`` entry ``key`` has axes in spaces ``axes`` (a layer used twice merges them)."""
        if key in self.key_axes:  # a layer used twice: both uses permute the same tensor
            for a, b in zip(self.key_axes[key], axes, strict=True):
                self.spaces.union(a, b)
        else:
            self.key_axes[key] = list(axes)

    def attach_module(self, name: str, module: nn.Module, local: Mapping[str, Sequence[int]]) -> None:
        """Attach ``module``'s own parameters and persistent buffers (``local``: attribute → spaces);
        any the rule misses is an error."""
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
            self.attach(key, local[attr])

    def add_block(self, space: int, size: int, where: str) -> None:
        """Space ``space`` may only be permuted in blocks of ``size`` channels (GroupNorm at ``where``)."""
        self.blocks.append((space, size, where))

    def permuted(self, node: fx.Node) -> bool:
        """Does any axis of the tensor node ``node`` live in a permuted space?"""
        return any(self.spaces.permuted(a) for a in self.axes.get(node, ()))

    def tensor_inputs(self, n: fx.Node) -> list[fx.Node]:
        """The tensor-valued nodes among ``n``'s arguments, in argument order."""
        return [a for a in _tensor_nodes((n.args, n.kwargs)) if a in self.axes]

    def one_tensor(self, n: fx.Node) -> fx.Node:
        """``n``'s one tensor input (``ValueError`` if it has none or several)."""
        tensors = self.tensor_inputs(n)
        if len(tensors) != 1:
            raise ValueError(
                f"trace_spec: node {n.name!r} ({n.format_node()}) takes {len(tensors)} tensors; expected one"
            )
        return tensors[0]

    def unsupported(self, n: fx.Node, why: str = "") -> ValueError:
        """The error for an operation on a permuted tensor that no rule covers."""
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

    def rule_for(self, n: fx.Node) -> Rule | None:
        """The rule of node ``n`` in ``RULES`` (module nodes: by the module's MRO), or ``None``."""
        if n.op == "call_module":
            for cls in type(self.fetch_attr(n.target)).__mro__:
                if cls in RULES:
                    return RULES[cls]
            return None
        if n.op in ("call_function", "call_method"):
            try:
                return RULES.get(n.target)
            except TypeError:  # an unhashable target has no rule
                return None
        return None

    def _propagate(self, n: fx.Node, result: Any) -> list[int] | None:
        nd = result.ndim if isinstance(result, Tensor) else 0
        if n.op == "placeholder":
            return [FIXED] * nd
        if n.op == "get_attr":
            if isinstance(result, Tensor) and any(
                result is t for t in list(self.module.parameters()) + list(self.module.buffers())
            ):
                raise ValueError(
                    f"trace_spec: node {n.name!r} reads parameter/buffer {n.target!r} directly; spec "
                    "discovery only sees parameters through known layers"
                )
            return [FIXED] * nd
        rule = self.rule_for(n)
        if rule is not None:
            axes = rule(self, n, result)
            if axes is not None:
                return axes
        # anything else: allowed only when it cannot see a permutation
        if n.op == "call_module" and any(True for _ in self.fetch_attr(n.target).parameters()):
            raise ValueError(
                f"trace_spec: module {n.target!r} of type {type(self.fetch_attr(n.target)).__name__} "
                f"(node {n.name!r}) has parameters and no rule saying how to permute them"
            )
        if any(self.permuted(a) for a in _tensor_nodes((n.args, n.kwargs))):
            raise self.unsupported(n)
        return [FIXED] * nd if isinstance(result, Tensor) else None

    # --- result -----------------------------------------------------------------------------
    def spec(self) -> PermutationSpec:
        """The spec: one group per unfixed space reached by a ``state_dict`` key."""
        unreached = sorted(set(self.state) - set(self.key_axes))
        if unreached:
            raise ValueError(
                f"trace_spec: state_dict keys {unreached} were not reached through a known layer of the "
                "traced forward pass"
            )
        name = {}
        for root in sorted({self.spaces.find(s) for axes in self.key_axes.values() for s in axes}):
            if root != FIXED:
                name[root] = f"P_{self.spaces.names[root]}"
        axes = {k: tuple(name.get(self.spaces.find(s)) for s in self.key_axes[k]) for k in self.state}
        blocks: dict[str, int] = {}
        origin: dict[str, str] = {}
        for s, b, where in self.blocks:
            root = self.spaces.find(s)
            if root == FIXED or root not in name:
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


# ============================================================================================
# rules
# ============================================================================================
def linear(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int]:
    """``nn.Linear``: opens a space for its outputs; weight ``(out, in)``, bias ``(out,)``."""
    name = str(n.target)
    x = tracer.axes[tracer.one_tensor(n)]
    s = tracer.open_space(name)
    tracer.attach_module(name, tracer.fetch_attr(n.target), {"weight": [s, x[-1]], "bias": [s]})
    return [*x[:-1], s]


def conv(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int]:
    """``nn.Conv{1,2,3}d`` (``groups=1``): opens a space for its output channels; weight
    ``(out, in, None...)``; the positional axes it reads are fixed."""
    name = str(n.target)
    m = tracer.fetch_attr(n.target)
    if m.groups != 1:
        raise tracer.unsupported(n, f"grouped convolution (groups={m.groups})")
    x = tracer.axes[tracer.one_tensor(n)]
    k = m.weight.ndim - 2
    c = len(x) - k - 1  # channel axis: 1 batched, 0 unbatched
    for a in x[c + 1 :]:
        tracer.spaces.fix(a)  # a convolution does not commute with permuting positions
    s = tracer.open_space(name)
    tracer.attach_module(name, m, {"weight": [s, x[c], *([FIXED] * k)], "bias": [s]})
    return [*x[:c], s, *([FIXED] * k)]


def batch_norm(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int]:
    """BatchNorm: weight, bias and running statistics on the channel axis; keeps every space."""
    x = tracer.axes[tracer.one_tensor(n)]
    c = x[1]
    rule = {"weight": [c], "bias": [c], "running_mean": [c], "running_var": [c]}
    tracer.attach_module(str(n.target), tracer.fetch_attr(n.target), rule | {"num_batches_tracked": []})
    return list(x)


def group_norm(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int]:
    """GroupNorm: weight and bias on the channel axis, which is permuted only in blocks of C / groups."""
    name = str(n.target)
    m = tracer.fetch_attr(n.target)
    x = tracer.axes[tracer.one_tensor(n)]
    c = x[1]
    tracer.attach_module(name, m, {"weight": [c], "bias": [c]})
    tracer.add_block(c, m.num_channels // m.num_groups, name)
    return list(x)


def layer_norm(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int]:
    """LayerNorm: weight and bias on the normalised (trailing) axes; keeps every space."""
    m = tracer.fetch_attr(n.target)
    x = tracer.axes[tracer.one_tensor(n)]
    tail = x[len(x) - len(m.normalized_shape) :]
    tracer.attach_module(str(n.target), m, {"weight": tail, "bias": tail})
    return list(x)


def elementwise(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int]:
    """An elementwise map of one tensor (activation, dropout, ``clone``, ...): keeps every space."""
    return list(tracer.axes[tracer.one_tensor(n)])


def pooling(k: int) -> Rule:
    """The rule of a ``k``-dimensional pooling: the last ``k`` (positional) axes are fixed."""

    def pool(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int]:
        x = tracer.axes[tracer.one_tensor(n)]
        for a in x[len(x) - k :]:
            tracer.spaces.fix(a)  # pooling windows are positional
        return [*x[: len(x) - k], *([FIXED] * k)]

    pool.__name__ = pool.__qualname__ = f"pooling_{k}d"
    return pool


def _flatten(tracer: SpecInterpreter, n: fx.Node, x: fx.Node, start: int, end: int) -> list[int]:
    """Merged axes keep a space only if it is the one axis among them of size > 1."""
    axes, shape = tracer.axes[x], tracer.shapes[x]
    nd = len(axes)
    if nd == 0:
        return [FIXED]
    start, end = _norm_dim(start, nd, n), _norm_dim(end, nd, n)
    merged = list(range(start, end + 1))
    live = [i for i in merged if tracer.spaces.permuted(axes[i])]
    if not live:
        space = FIXED
    elif len(live) == 1 and all(shape[i] == 1 for i in merged if i != live[0]):
        space = axes[live[0]]
    else:
        raise tracer.unsupported(
            n,
            f"flattening axes {merged} of shape {shape} would mix a permuted axis with other "
            "positions (a spec cannot express the induced permutation)",
        )
    return [*axes[:start], space, *axes[end + 1 :]]


def flatten(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int]:
    """``nn.Flatten`` / ``torch.flatten`` / ``.flatten``: merged axes keep a space only if it is the
    one axis among them of size > 1 (otherwise ``ValueError``: the induced permutation is no spec's)."""
    x = tracer.one_tensor(n)
    if n.op == "call_module":
        m = tracer.fetch_attr(n.target)
        return _flatten(tracer, n, x, m.start_dim, m.end_dim)
    return _flatten(tracer, n, x, _arg(n, 1, "start_dim", 0), _arg(n, 2, "end_dim", -1))


def _reorder(tracer: SpecInterpreter, n: fx.Node, x: fx.Node, order: Sequence[int]) -> list[int]:
    axes = tracer.axes[x]
    if sorted(order) != list(range(len(axes))):
        raise ValueError(f"trace_spec: node {n.name!r}: {list(order)} is not a reordering of {len(axes)} axes")
    return [axes[i] for i in order]


def movedim(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int]:
    """``movedim`` / ``moveaxis``: spaces move with their axes."""
    x = tracer.one_tensor(n)
    src = _arg(n, 1, "source", None)
    dst = _arg(n, 2, "destination", None)
    return _reorder(tracer, n, x, _movedim_order(len(tracer.axes[x]), src, dst, n))


def permute(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int]:
    """``permute``: spaces move with their axes."""
    method = n.op == "call_method"
    x = tracer.one_tensor(n)
    dims = n.args[1:] if method else (n.args[1] if len(n.args) > 1 else n.kwargs["dims"])
    if method and len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    nd = len(tracer.axes[x])
    return _reorder(tracer, n, x, [_norm_dim(d, nd, n) for d in dims])


def transpose(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int]:
    """``transpose``: the two axes swap spaces."""
    x = tracer.one_tensor(n)
    nd = len(tracer.axes[x])
    d0 = _norm_dim(_arg(n, 1, "dim0", None), nd, n)
    d1 = _norm_dim(_arg(n, 2, "dim1", None), nd, n)
    order = list(range(nd))
    order[d0], order[d1] = order[d1], order[d0]
    return _reorder(tracer, n, x, order)


def residual_add(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int]:
    """Addition / subtraction (residual connections): operands' spaces are merged axis by axis,
    aligned from the right; an operand's broadcast (size-1) axis is fixed instead."""
    if not isinstance(result, Tensor):
        raise tracer.unsupported(n, "addition that does not produce a tensor")
    out = [FIXED] * result.ndim
    first = [True] * result.ndim
    for a in tracer.tensor_inputs(n):
        axes, shape = tracer.axes[a], tracer.shapes[a]
        for j in range(1, len(axes) + 1):  # align from the right (broadcasting)
            if shape[-j] == 1 and result.shape[-j] != 1:
                if tracer.spaces.permuted(axes[-j]):
                    tracer.spaces.fix(axes[-j])  # a size-1 space has only the identity anyway
                continue
            if first[-j]:
                out[-j], first[-j] = axes[-j], False
            else:
                tracer.spaces.union(out[-j], axes[-j])
    return out


def scale(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int] | None:
    """A tensor times / over constants keeps its spaces; a product of tensors has no rule (``None``)."""
    tensors = tracer.tensor_inputs(n)
    if len(tensors) == 1:  # a tensor times / over a constant keeps its channels
        return list(tracer.axes[tensors[0]])
    return None  # product of tensors: only if none is permuted (generic rule)


def shape_query(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int] | None:
    """``size()`` / ``dim()``: not a tensor (or an unpermuted one)."""
    return None if not isinstance(result, Tensor) else [FIXED] * result.ndim


_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device"}


def _getattr(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int] | None:
    """``x.shape`` and the like (a ``getattr`` node): as ``shape_query``; other attributes: no rule."""
    return shape_query(tracer, n, result) if n.args[1] in _SHAPE_ATTRS else None


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
_ELEMENTWISE_FUNCTIONS: tuple[Any, ...] = (
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
)
_ELEMENTWISE_METHODS = ("relu", "relu_", "tanh", "sigmoid", "neg", "contiguous", "clone", "detach")
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
_ADD_TARGETS: tuple[Any, ...] = (
    operator.add,
    operator.iadd,
    operator.sub,
    operator.isub,
    torch.add,
    torch.sub,
    "add",
    "add_",
    "sub",
    "sub_",
)
_SCALE_TARGETS: tuple[Any, ...] = (
    operator.mul,
    operator.imul,
    operator.truediv,
    operator.itruediv,
    torch.mul,
    torch.div,
    "mul",
    "mul_",
    "div",
    "div_",
)

RULES: dict[Any, Rule] = {
    nn.Linear: linear,
    nn.Conv1d: conv,
    nn.Conv2d: conv,
    nn.Conv3d: conv,
    _BatchNorm: batch_norm,
    nn.GroupNorm: group_norm,
    nn.LayerNorm: layer_norm,
    nn.Flatten: flatten,
    **dict.fromkeys(_ELEMENTWISE_MODULES, elementwise),
    **{cls: pooling(k) for cls, k in _POOL_MODULES.items()},
    **dict.fromkeys(_ELEMENTWISE_FUNCTIONS, elementwise),
    **dict.fromkeys(_ELEMENTWISE_METHODS, elementwise),
    **{f: pooling(k) for f, k in _POOL_FUNCTIONS.items()},
    torch.flatten: flatten,
    "flatten": flatten,
    torch.movedim: movedim,
    torch.moveaxis: movedim,
    "movedim": movedim,
    "moveaxis": movedim,
    torch.permute: permute,
    "permute": permute,
    torch.transpose: transpose,
    "transpose": transpose,
    **dict.fromkeys(_ADD_TARGETS, residual_add),
    **dict.fromkeys(_SCALE_TARGETS, scale),
    "size": shape_query,
    "dim": shape_query,
    getattr: _getattr,
}
"""How each fx target transforms channel spaces: a module class (matched along the module's MRO),
a function (``call_function`` target) or a method name (``call_method`` target) → ``Rule``.
Read at every node: add or replace entries to teach ``trace_spec`` a new operation."""


def trace_spec(model: nn.Module, example_input: Tensor) -> PermutationSpec:
    """Derive ``model``'s permutation spec from a ``torch.fx`` trace run on ``example_input``.

    Union-find over channel spaces: every Linear / conv output opens a space; its weight's in-axis
    and out-axis, its bias, and the parameters and float buffers of the norm layers
    (BatchNorm / LayerNorm / GroupNorm; GroupNorm adds ``blocks = C / groups``) attach to spaces;
    elementwise activations, dropout, pooling, ``movedim`` / ``permute`` / ``transpose`` and a
    ``flatten`` whose other merged axes have size 1 carry spaces through; ``+`` / ``-`` (residual
    connections) merge the spaces of their operands. The input's space and the output's are fixed
    (never permuted), as are positional (spatial) axes a conv or pool reads. Each operation's rule
    is the entry of ``RULES`` for it (see the module docstring).

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
    interp = SpecInterpreter(gm, state)
    with torch.no_grad():
        interp.run(example_input.to(next(iter(state.values())).device) if state else example_input)
    return interp.spec()
