"""Spec discovery: a model's permutation spec derived from a ``torch.fx`` trace.

``trace_spec(model, x)`` runs the traced graph on ``x`` and keeps a union-find over *channel
spaces* (Eq. (1) of Ainsworth et al. 2023, "Git Re-Basin": a unit may be renamed wherever every
tensor reading or writing it is reindexed the same way). Every Linear / conv / embedding output
opens a space; residual additions and elementwise products merge the spaces of their operands;
the input's and output's spaces, and the positional axes a conv or pool reads, are fixed (never
permuted). Each group of the spec is one unfixed space, named ``P_<module>`` after the first layer
that opens it (e.g. ``P_layers.0``, ``P_conv``, ``P_layer1.0.conv1``). ``reference.specs.spec_for``
holds the hand-written specs of the zoo; a test checks ``spec_for(m).same_symmetry(trace_spec(m, x))``
for every zoo model.

Beyond one space per axis (``ChannelSpaces``):

- **Concatenation.** ``torch.cat`` along a permuted axis gives a *segmented* axis: the next layer's
  input axis is permuted by the direct sum of the operands' groups (DenseNet, U-Net skips). A
  ``split`` / ``chunk`` of a permuted axis refines its space into one space per piece (GPT's fused
  Q/K/V projection: its rows become three segments).
- **Attention.** A reshape of a space of ``H·d`` units into ``(H, d)`` splits it into heads: from then
  on it is permuted in blocks of ``d``. The matrix product ``q @ kᵀ`` merges the contracted axes
  (Q and K move alike within every head) and broadcasts the head axes; ``att @ v`` makes V's heads
  follow Q/K's: the two spaces form one *head class* (``PermutationSpec.heads``). The same holds for
  ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention`` (whose ``in_proj_weight`` rows are the
  three segments ``[q; k; v]``). Heads permute as blocks, Q/K share one within-head permutation, V and
  the output projection's input another, both following one head permutation.
- **Parameters read in forward** (class tokens, position embeddings): each axis opens a space,
  merged with what it meets (added to the stream: the stream's group).
- **Reductions** (mean, sum, amax, logsumexp, norms) drop the reduced axes: a sum over a permuted
  axis is invariant. **Softmax** keeps every space.
- **Depthwise convolutions** keep their input's space; other grouped convolutions, and anything
  a spec cannot express, are held fixed (fewer symmetries, never a wrong one).

An operation on a permuted tensor with no rule raises ``UnsupportedOperation`` (a ``ValueError``
naming the node), unless ``strict=False``: then its inputs are held fixed. ``trace_report`` returns
the spec with a coverage report (which tensors each group permutes, which are fixed and why).

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
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import validate
from .permutation import PermutationSpec

__all__ = [
    "FIXED",
    "RULES",
    "TraceReport",
    "UnsupportedOperation",
    "spec_coverage",
    "trace_report",
    "attention",
    "cat",
    "conv_transpose",
    "embedding",
    "expand",
    "getitem",
    "masked_fill",
    "matmul",
    "multihead_attention",
    "reduction",
    "reshape",
    "softmax",
    "split",
    "stack",
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
    a space). The older space (smaller id) names a merged one.

    Besides plain spaces there are three *derived* kinds of id, for axes that are a structured piece
    of spaces:

    - ``head(s)`` and ``within(s)``: the two axes a reshape splits a space ``s`` of ``H·d`` units into
      (attention heads): ``s`` is then permuted in blocks of ``d`` (``head`` carries the block map,
      ``within`` the units inside each block);
    - ``cat(...)``: an axis made by concatenating axes of several spaces (consecutive segments).

    ``union`` of two derived ids of the same kind does the matching thing (two ``head`` axes: the two
    spaces move heads alike, they are *coupled*; two ``within`` axes: the spaces are one; two ``cat``
    axes with the same boundaries: segment by segment; a ``cat`` and a plain space: the plain space is
    *refined* into segments first). Anything else fixes both sides, which is always sound (the
    identity keeps every function) and only gives up symmetry.
    """

    def __init__(self) -> None:
        self.parent: list[int] = [FIXED]
        self.names: list[str] = ["<fixed>"]
        self.kind: list[tuple | None] = [None]
        self.alias: dict[int, int] = {}  # a plain root refined into segments → its cat id
        self.couples: list[tuple[int, int]] = []  # plain spaces that move heads alike

    def new(self, name: str) -> int:
        """Open a new space named ``name``; returns its id."""
        self.parent.append(len(self.parent))
        self.names.append(name)
        self.kind.append(None)
        return len(self.parent) - 1

    def _derived(self, kind: tuple, name: str) -> int:
        i = self.new(name)
        self.kind[i] = kind
        return i

    def split(self, s: int, heads: int, size: int) -> tuple[int, int]:
        """The ``(head, within)`` ids of plain space ``s`` split into ``heads`` blocks of ``size``."""
        s = self.resolve(s)
        return (
            self._derived(("head", s, heads, size), f"{self.names[s]}.head"),
            self._derived(("within", s, heads, size), f"{self.names[s]}.within"),
        )

    def cat(self, segments: Sequence[tuple[int, int]]) -> int:
        """The id of an axis concatenating ``segments`` (``(space id, length)``, in order)."""
        flat = [seg for a, n in segments for seg in self.segments(a, n)]
        return self._derived(("cat", tuple(flat)), "cat")

    def segments(self, a: int, n: int) -> list[tuple[int, int]]:
        """``a`` (of length ``n``) as flat ``(id, length)`` segments (one segment unless ``a`` is a cat)."""
        a = self.resolve(a)
        k = self.kind[a]
        if k is not None and k[0] == "cat":
            return [seg for b, m in k[1] for seg in self.segments(b, m)]
        return [(a, n)]

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:  # path compression
            self.parent[a], a = root, self.parent[a]
        return root

    def resolve(self, a: int) -> int:
        """The representative of ``a``: its root, or the cat id its root was refined into."""
        r = self.find(a)
        while r in self.alias:
            r = self.find(self.alias[r])
        return r

    def kind_of(self, a: int) -> str:
        """``"plain"``, ``"head"``, ``"within"`` or ``"cat"``."""
        k = self.kind[self.resolve(a)]
        return "plain" if k is None else k[0]

    def derived(self, a: int) -> tuple:
        """The kind tuple of a derived id (``("head", s, H, d)``, ``("within", s, H, d)``, ``("cat", segs)``)."""
        k = self.kind[self.resolve(a)]
        if k is None:
            raise ValueError(f"internal: space {a} is plain")  # pragma: no cover
        return k

    def refine(self, a: int, lengths: Sequence[int]) -> int:
        """Refine plain space ``a`` into consecutive segments of ``lengths`` (each its own new space);
        returns the cat id that ``a`` (and every space merged with it) now resolves to."""
        r = self.resolve(a)
        if self.kind[r] is not None or r == FIXED:
            raise ValueError(f"internal: refining a non-plain space {r}")  # pragma: no cover
        parts = [(self.new(f"{self.names[r]}.{i}"), n) for i, n in enumerate(lengths)]
        c = self._derived(("cat", tuple(parts)), "cat")
        self.alias[r] = c
        return c

    def couple(self, a: int, b: int) -> None:
        """Spaces ``a`` and ``b`` (split into heads) must move heads alike."""
        self.couples.append((a, b))

    def union(self, a: int, b: int, sizes: tuple[int, int] | None = None) -> None:
        """Merge spaces ``a`` and ``b`` (one permutation acts on both)."""
        ra, rb = self.resolve(a), self.resolve(b)
        if ra == rb:
            return
        ka, kb = self.kind[ra], self.kind[rb]
        if ka is None and kb is None:  # plain: the older space (smaller id, fixed = 0) names the merged one
            lo, hi = min(ra, rb), max(ra, rb)
            self.parent[hi] = lo
        elif ra == FIXED or rb == FIXED:
            self.fix(rb if ra == FIXED else ra)
        elif ka is not None and kb is not None and ka[0] == kb[0] == "head" and ka[2] == kb[2]:
            self.couple(ka[1], kb[1])
        elif ka is not None and kb is not None and ka[0] == kb[0] == "within" and ka[2:] == kb[2:]:
            self.union(ka[1], kb[1])
        elif ka is not None and kb is not None and ka[0] == kb[0] == "cat":
            sa, sb = self.segments(ra, -1), self.segments(rb, -1)
            if [n for _, n in sa] == [n for _, n in sb]:
                for (x, _), (y, _) in zip(sa, sb, strict=True):
                    self.union(x, y)
            else:
                self.fix(ra)
                self.fix(rb)
        elif (ka is None) != (kb is None) and (ka or kb)[0] == "cat":
            plain, c = (ra, rb) if ka is None else (rb, ra)
            self.union(self.refine(plain, [n for _, n in self.segments(c, -1)]), c)
        else:  # different structures on one axis: hold both fixed
            self.fix(ra)
            self.fix(rb)

    def fix(self, a: int) -> None:
        """Declare space ``a`` never permuted (a derived id: every space it is made of)."""
        r = self.resolve(a)
        k = self.kind[r]
        if k is None:
            if r != FIXED:
                self.parent[r] = FIXED
        elif k[0] in ("head", "within"):
            self.fix(k[1])
        else:
            for b, _ in k[1]:
                self.fix(b)

    def permuted(self, a: int) -> bool:
        r = self.resolve(a)
        k = self.kind[r]
        if k is None:
            return r != FIXED
        if k[0] in ("head", "within"):
            return self.permuted(k[1])
        return any(self.permuted(b) for b, _ in k[1])

    def coupled(self, a: int, b: int) -> bool:
        """Do plain spaces ``a`` and ``b`` move heads alike (the same space, or coupled)?"""
        ra, rb = self.resolve(a), self.resolve(b)
        if ra == rb:
            return True
        return any(cls >= {ra, rb} for cls in self.head_classes())

    def head_classes(self) -> list[set[int]]:
        """The coupled spaces, as sets of resolved ids (classes of one space left out)."""
        classes: list[set[int]] = []
        for a, b in self.couples:
            ra, rb = self.resolve(a), self.resolve(b)
            hit = [c for c in classes if ra in c or rb in c]
            merged = {ra, rb}.union(*hit)
            classes = [c for c in classes if c not in hit] + [merged]
        return [c for c in classes if len(c) > 1]


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
        raise ValueError(f"trace_spec: node {n.name!r}: movedim source {src} and destination {dst} differ in length")
    src_l = [_norm_dim(d, nd, n) for d in src_l]
    dst_l = [_norm_dim(d, nd, n) for d in dst_l]
    order: list[int | None] = [None] * nd
    for s, d in zip(src_l, dst_l, strict=True):
        order[d] = s
    rest = iter(i for i in range(nd) if i not in src_l)
    return [next(rest) if o is None else o for o in order]


class UnsupportedOperation(ValueError):
    """An operation on a permuted tensor that no rule covers (``trace_spec(..., strict=False)`` holds
    its inputs fixed instead of raising)."""


class SpecInterpreter(fx.Interpreter):
    """Runs the traced graph on the example input and propagates channel spaces node by node.

    For every tensor-valued node it keeps one space id per axis (``axes[node]``, with the shape in
    ``shapes[node]``); for a node returning a tuple of tensors, one such list per element
    (``items[node]``); for every ``state_dict`` key the space ids of its axes (``key_axes``). The rule
    of each node is looked up in ``RULES`` (see the module docstring). Unknown operations on permuted
    tensors raise ``UnsupportedOperation`` (``strict=False``: their inputs are held fixed and the
    event is recorded in ``held``); operations whose tensor inputs are all unpermuted give unpermuted
    results (they cannot see a permutation).
    """

    def __init__(self, gm: fx.GraphModule, state: Mapping[str, Tensor], strict: bool = True):
        super().__init__(gm)
        self.extra_traceback = False  # our errors name the node themselves
        self.state = state
        self.strict = strict
        self.spaces = ChannelSpaces()
        self.axes: dict[fx.Node, list[int]] = {}
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}
        self.items: dict[fx.Node, list[tuple[list[int], tuple[int, ...]] | None]] = {}
        self.key_axes: dict[str, list[int]] = {}
        self.blocks: list[tuple[int, int, str]] = []
        self.held: list[tuple[str, str]] = []
        self._opened: dict[str, int] = {}
        self._state_ids = {id(t): k for k, t in gm.state_dict(keep_vars=True).items()}

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
        """Space ``space`` may only be permuted in blocks of ``size`` channels (GroupNorm or heads at ``where``)."""
        self.blocks.append((space, size, where))

    def hold(self, n: fx.Node, why: str, spaces: Sequence[int]) -> None:
        """Hold ``spaces`` fixed because of node ``n`` (recorded for the coverage report)."""
        if any(self.spaces.permuted(a) for a in spaces):
            self.held.append((f"{n.name} ({n.op} {_target_name(n)})", why))
        for a in spaces:
            self.spaces.fix(a)

    def permuted(self, node: fx.Node) -> bool:
        """Does any axis of the tensor node ``node`` (or of any tensor of a tuple node) live in a permuted space?"""
        if node in self.items:
            return any(e is not None and any(self.spaces.permuted(a) for a in e[0]) for e in self.items[node])
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

    def unsupported(self, n: fx.Node, why: str = "") -> UnsupportedOperation:
        """The error for an operation on a permuted tensor that no rule covers."""
        return UnsupportedOperation(
            f"trace_spec: unsupported operation at node {n.name!r} ({n.op} {_target_name(n)}) on a "
            f"permuted tensor{': ' + why if why else ''}; spec discovery does not guess how it "
            "transforms channels (trace_spec(..., strict=False) holds its inputs fixed instead)"
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
                for s in self._all_axes(a):
                    self.spaces.fix(s)
            return result
        try:
            axes = self._propagate(n, result)
        except UnsupportedOperation as e:
            if self.strict:
                raise
            self.hold(n, str(e).split(": ", 2)[-1].split("; spec discovery")[0], self._input_axes(n))
            axes = self._fixed_like(n, result)
        self._store(n, result, axes)
        return result

    def _all_axes(self, node: fx.Node) -> list[int]:
        if node in self.items:
            return [a for e in self.items[node] if e is not None for a in e[0]]
        return list(self.axes.get(node, ()))

    def _input_axes(self, n: fx.Node) -> list[int]:
        return [a for x in _tensor_nodes((n.args, n.kwargs)) for a in self._all_axes(x)]

    def _fixed_like(self, n: fx.Node, result: Any) -> Any:
        if isinstance(result, Tensor):
            return [FIXED] * result.ndim
        if isinstance(result, (tuple, list)):
            return [[FIXED] * r.ndim if isinstance(r, Tensor) else None for r in result]
        return None

    def _store(self, n: fx.Node, result: Any, axes: Any) -> None:
        if isinstance(result, Tensor):
            if axes is None:
                raise AssertionError(f"internal: no axes for tensor node {n.name}")  # pragma: no cover
            if len(axes) != result.ndim:
                raise AssertionError(f"internal: {n.name}: {axes} for shape {tuple(result.shape)}")
            self.axes[n] = list(axes)
            self.shapes[n] = tuple(result.shape)
        elif isinstance(result, (tuple, list)) and any(isinstance(r, Tensor) for r in result):
            if axes is None:
                axes = self._fixed_like(n, result)
            self.items[n] = [
                (list(a), tuple(r.shape)) if isinstance(r, Tensor) else None for a, r in zip(axes, result, strict=True)
            ]

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

    def _propagate(self, n: fx.Node, result: Any) -> Any:
        nd = result.ndim if isinstance(result, Tensor) else 0
        if n.op == "placeholder":
            return [FIXED] * nd
        if n.op == "get_attr":
            key = self._state_ids.get(id(result)) if isinstance(result, Tensor) else None
            if key is None or key not in self.state:
                return [FIXED] * nd  # a constant (or a non-persistent buffer): nothing to permute
            # a parameter / buffer read directly in forward (class token, position embedding, ...):
            # each axis of size > 1 opens a space, merged with whatever it meets
            if not result.is_floating_point():  # an integer / boolean buffer (a mask): never permuted
                self.attach(key, [FIXED] * nd)
                return list(self.key_axes[key])
            axes = [self.open_space(key) if size > 1 else FIXED for size in result.shape]
            self.attach(key, axes)
            return list(self.key_axes[key])
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
        return self._fixed_like(n, result)

    # --- result -----------------------------------------------------------------------------
    def _settle(self) -> None:
        """Fix what a spec cannot express: a key axis that is only a head / within-head piece of a
        space, a block constraint on a concatenated axis, a head class with a fixed member."""
        sp = self.spaces
        changed = True
        while changed:
            changed = False
            for k, axes in self.key_axes.items():
                for a in axes:
                    for b, _ in sp.segments(a, -1):
                        if sp.kind_of(b) != "plain" and sp.permuted(b):
                            self.held.append((k, "a parameter axis that is one piece of a space split into heads"))
                            sp.fix(b)
                            changed = True
            for s, _, where in self.blocks:
                if sp.kind_of(s) != "plain" and sp.permuted(s):
                    self.held.append((where, "blocks on a concatenated axis"))
                    sp.fix(s)
                    changed = True
            for cls in sp.head_classes():
                if any(not sp.permuted(c) for c in cls) and any(sp.permuted(c) for c in cls):
                    self.held.append((sp.names[min(cls)], "a space moving heads with a fixed space"))
                    for c in cls:
                        sp.fix(c)
                    changed = True

    def spec(self) -> PermutationSpec:
        """The spec: one group per unfixed space reached by a ``state_dict`` key."""
        unreached = sorted(set(self.state) - set(self.key_axes))
        if unreached:
            raise ValueError(
                f"trace_spec: state_dict keys {unreached} were not reached through a known layer of the "
                "traced forward pass"
            )
        self._settle()
        sp = self.spaces
        roots = sorted({sp.resolve(b) for axes in self.key_axes.values() for a in axes for b, _ in sp.segments(a, -1)})
        name = {r: f"P_{sp.names[r]}" for r in roots if r != FIXED}
        shapes = {k: tuple(v.shape) for k, v in self.state.items()}

        def entry(a: int, size: int) -> Any:
            segs = sp.segments(a, size)
            if len(segs) == 1:
                return name.get(sp.resolve(segs[0][0]))
            return tuple((name.get(sp.resolve(b)), m) for b, m in segs)

        axes = {k: tuple(entry(a, shapes[k][i]) for i, a in enumerate(self.key_axes[k])) for k in self.state}
        blocks: dict[str, int] = {}
        origin: dict[str, str] = {}
        for s, b, where in self.blocks:
            root = sp.resolve(s)
            if root == FIXED or root not in name:
                continue
            g = name[root]
            if blocks.get(g, b) != b:
                raise ValueError(
                    f"trace_spec: group {g!r} is permuted in blocks of {blocks[g]} ({origin[g]!r}) and of {b} "
                    f"({where!r}); a spec holds one block size per group"
                )
            blocks[g], origin[g] = b, where
        heads: dict[str, str] = {}
        for cls in sp.head_classes():
            members = sorted(name[c] for c in cls if c in name)
            if len(members) > 1:
                for g in members:
                    heads[g] = f"H_{members[0][2:]}"
        return PermutationSpec(axes, shapes, {g: b for g, b in blocks.items() if b != 1}, heads)


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
    """``nn.Conv{1,2,3}d``: opens a space for its output channels; weight ``(out, in, None...)``; the
    positional axes it reads are fixed.

    A depthwise conv (``groups == in == out channels``) keeps its input's space (weight
    ``(C, None, ...)``: channel c reads only channel c). Any other grouped conv is held fixed, input
    and output channels alike (a group-preserving permutation with equal within-group maps would be
    a symmetry too, but a spec cannot say "equal within-group maps"); the coverage report says so.
    """
    name = str(n.target)
    m = tracer.fetch_attr(n.target)
    x = tracer.axes[tracer.one_tensor(n)]
    k = m.weight.ndim - 2
    c = len(x) - k - 1  # channel axis: 1 batched, 0 unbatched
    for a in x[c + 1 :]:
        tracer.spaces.fix(a)  # a convolution does not commute with permuting positions
    if m.groups != 1:
        if m.groups == m.in_channels == m.out_channels:
            tracer.attach_module(name, m, {"weight": [x[c], *([FIXED] * (k + 1))], "bias": [x[c]]})
            return [*x[:c], x[c], *([FIXED] * k)]
        tracer.hold(n, f"grouped convolution (groups={m.groups}) held fixed", [x[c]])
        tracer.attach_module(name, m, {"weight": [FIXED] * (k + 2), "bias": [FIXED]})
        return [*x[:c], FIXED, *([FIXED] * k)]
    s = tracer.open_space(name)
    tracer.attach_module(name, m, {"weight": [s, x[c], *([FIXED] * k)], "bias": [s]})
    return [*x[:c], s, *([FIXED] * k)]


def conv_transpose(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int]:
    """``nn.ConvTranspose{1,2,3}d`` (``groups=1``): opens a space for its output channels; its weight is
    ``(in, out, None...)``; the positional axes it reads are fixed."""
    name = str(n.target)
    m = tracer.fetch_attr(n.target)
    x = tracer.axes[tracer.one_tensor(n)]
    k = m.weight.ndim - 2
    c = len(x) - k - 1
    for a in x[c + 1 :]:
        tracer.spaces.fix(a)
    if m.groups != 1:
        tracer.hold(n, f"grouped transposed convolution (groups={m.groups}) held fixed", [x[c]])
        tracer.attach_module(name, m, {"weight": [FIXED] * (k + 2), "bias": [FIXED]})
        return [*x[:c], FIXED, *([FIXED] * k)]
    s = tracer.open_space(name)
    tracer.attach_module(name, m, {"weight": [x[c], s, *([FIXED] * k)], "bias": [s]})
    return [*x[:c], s, *([FIXED] * k)]


def embedding(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int]:
    """``nn.Embedding``: opens a space for the embedding dimension; weight ``(None, out)``; the index
    tensor must not be permuted."""
    name = str(n.target)
    x = tracer.one_tensor(n)
    if tracer.permuted(x):
        raise tracer.unsupported(n, "an embedding looked up with permuted indices")
    s = tracer.open_space(name)
    tracer.attach_module(name, tracer.fetch_attr(n.target), {"weight": [FIXED, s]})
    return [*tracer.axes[x], s]


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
    """LayerNorm / RMSNorm: weight (and bias) on the normalised (trailing) axes; keeps every space."""
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


def _reshape_groups(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Pair the axes of shape ``a`` with those of shape ``b`` (same numel) into groups of equal product:
    each group's input axes are exactly the ones its output axes are made of. Size-1 axes form
    groups of their own (with no partner)."""
    out: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) or j < len(b):
        if i < len(a) and a[i] == 1:
            out.append(([i], []))
            i += 1
            continue
        if j < len(b) and b[j] == 1:
            out.append(([], [j]))
            j += 1
            continue
        gi, gj = [i], [j]
        pa, pb = a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                gi.append(i)
                pa *= a[i]
                i += 1
            else:
                gj.append(j)
                pb *= b[j]
                j += 1
        out.append((gi, gj))
    return out


def _reshape(tracer: SpecInterpreter, n: fx.Node, x: fx.Node, out_shape: Sequence[int]) -> list[int]:
    """How a reshape of ``x`` to ``out_shape`` moves spaces (view, reshape, flatten, unflatten,
    squeeze, unsqueeze are all this).

    Axes pair up into groups of equal product. A group whose axes are all unpermuted gives fixed
    axes; one permuted axis that stays one axis keeps its space; one permuted space of ``H·d`` units
    split into ``(H, d)`` becomes a (head, within) pair and is permuted in blocks of ``d`` from then
    on (attention heads); a (head, within) pair of coupled spaces merged back gives the within
    space. Any other mix of a permuted axis with other positions has no spec (``UnsupportedOperation``).
    """
    sp = tracer.spaces
    axes, shape = tracer.axes[x], tracer.shapes[x]
    out = [FIXED] * len(out_shape)
    for gi, gj in _reshape_groups(shape, list(out_shape)):
        for i in gi:
            if shape[i] == 1 and sp.permuted(axes[i]):
                sp.fix(axes[i])  # a size-1 axis has only the identity anyway
        live = [i for i in gi if shape[i] > 1 and sp.permuted(axes[i])]
        if not live or not gj:
            continue
        if len(gi) == 1 and len(gj) == 1:
            out[gj[0]] = axes[gi[0]]
        elif len(gi) == 1 and len(gj) == 2 and sp.kind_of(axes[gi[0]]) == "plain":
            h, d = out_shape[gj[0]], out_shape[gj[1]]
            head, within = sp.split(axes[gi[0]], h, d)
            tracer.add_block(axes[gi[0]], d, f"{n.name} (split into {h} heads of {d})")
            out[gj[0]], out[gj[1]] = head, within
        elif (
            len(gi) == 2
            and len(gj) == 1
            and sp.kind_of(axes[gi[0]]) == "head"
            and sp.kind_of(axes[gi[1]]) == "within"
            and sp.derived(axes[gi[0]])[2] == sp.derived(axes[gi[1]])[2]  # as many heads (head sizes may differ)
            and sp.coupled(sp.derived(axes[gi[0]])[1], sp.derived(axes[gi[1]])[1])
        ):
            out[gj[0]] = sp.derived(axes[gi[1]])[1]
        else:
            raise tracer.unsupported(
                n,
                f"reshaping axes {gi} of shape {shape} into axes {gj} of {tuple(out_shape)} would mix a "
                "permuted axis with other positions (a spec cannot express the induced permutation)",
            )
    return out


def reshape(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int]:
    """``view`` / ``reshape`` / ``flatten`` / ``unflatten`` / ``squeeze`` / ``unsqueeze`` / ``nn.Flatten`` /
    ``nn.Unflatten`` (read off the actual shapes): see ``_reshape``."""
    tensors = tracer.tensor_inputs(n)
    if not tensors or not isinstance(result, Tensor):
        return None  # type: ignore[return-value]
    return _reshape(tracer, n, tensors[0], tuple(result.shape))


flatten = reshape
"""``nn.Flatten`` / ``torch.flatten`` / ``.flatten``: a reshape (see ``_reshape``)."""


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
        if not tracer.tensor_inputs(n):
            return []  # arithmetic on sizes
        raise tracer.unsupported(n, "addition that does not produce a tensor")
    parts = [(tracer.axes[a], tracer.shapes[a]) for a in tracer.tensor_inputs(n)]
    return _broadcast(tracer, tuple(result.shape), parts)


def scale(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int] | None:
    """A tensor times / over constants keeps its spaces; an elementwise product or quotient of
    tensors merges their spaces axis by axis like an addition (``P(x) ⊙ P(y) = P(x ⊙ y)``)."""
    tensors = tracer.tensor_inputs(n)
    if len(tensors) == 1:  # a tensor times / over a constant keeps its channels
        return list(tracer.axes[tensors[0]])
    return residual_add(tracer, n, result)


def _broadcast(
    tracer: SpecInterpreter, ndim_shape: tuple[int, ...], parts: Sequence[tuple[list[int], tuple[int, ...]]]
) -> list[int]:
    """Merge the axes of broadcast operands (aligned from the right); size-1 broadcast axes are fixed (a
    size-1 space has only the identity anyway; fixing a space that is not permuted changes nothing)."""
    out = [FIXED] * len(ndim_shape)
    first = [True] * len(ndim_shape)
    for axes, shape in parts:
        for j in range(1, len(axes) + 1):
            if shape[-j] == 1 and ndim_shape[-j] != 1:
                tracer.spaces.fix(axes[-j])
                continue
            if first[-j]:
                out[-j], first[-j] = axes[-j], False
            else:
                tracer.spaces.union(out[-j], axes[-j])
    return out


def _part(tracer: SpecInterpreter, x: Any) -> tuple[list[int], tuple[int, ...]] | None:
    return (tracer.axes[x], tracer.shapes[x]) if isinstance(x, fx.Node) and x in tracer.axes else None


def matmul(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int]:
    """``a @ b`` of two tensors (``matmul`` / ``bmm``): the contracted axes ``a[-1]`` and ``b[-2]`` are
    merged (``P(a) Pᵀ`` cancels only if both move alike), the batch axes broadcast like an addition,
    the result's axes are ``(*batch, a[-2], b[-1])``. Attention logits ``q @ kᵀ`` couple Q and K this
    way; ``att @ v`` makes V's heads follow the heads of Q/K."""
    a, b = (_arg(n, 0, "input", None), _arg(n, 1, "other", None))
    pa, pb = _part(tracer, a), _part(tracer, b)
    if pa is None or pb is None:
        return None  # type: ignore[return-value]
    (xa, sa), (xb, sb) = pa, pb
    if len(xa) < 2 or len(xb) < 2:
        if tracer.permuted(a) or tracer.permuted(b):
            raise tracer.unsupported(n, "a matrix product of a vector")
        return [FIXED] * result.ndim
    tracer.spaces.union(xa[-1], xb[-2])
    batch = _broadcast(tracer, tuple(result.shape[:-2]), [(xa[:-2], sa[:-2]), (xb[:-2], sb[:-2])])
    return [*batch, xa[-2], xb[-1]]


def masked_fill(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int]:
    """``masked_fill`` / ``torch.where``: elementwise in every tensor operand (merged like an addition)."""
    parts = [p for p in (_part(tracer, t) for t in tracer.tensor_inputs(n)) if p is not None]
    return _broadcast(tracer, tuple(result.shape), parts)


def reduction(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int] | None:
    """``mean`` / ``sum`` / ``amax`` / ``amin`` / ``logsumexp`` / ``norm`` / ``var`` / ``std`` over some axes:
    permuting a reduced axis cannot change the result (it is invariant), so the reduced axes drop out
    (``keepdim``: fixed size-1 axes) and the rest keep their spaces."""
    if not isinstance(result, Tensor):
        return None
    x = tracer.one_tensor(n)
    axes = tracer.axes[x]
    nd = len(axes)
    dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 and not isinstance(n.args[1], (bool, str)) else None)
    if _target_name(n) == "norm":  # norm(x, p, dim, keepdim)
        dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else None)
    if dim is None or dim == ():
        dims = set(range(nd))
    else:
        dims = {_norm_dim(d, nd, n) for d in ([dim] if isinstance(dim, int) else dim)}
    kept = [a for i, a in enumerate(axes) if i not in dims]
    if len(kept) == result.ndim:
        return kept
    if result.ndim == nd:  # keepdim
        return [FIXED if i in dims else a for i, a in enumerate(axes)]
    raise tracer.unsupported(n, f"a reduction whose result shape {tuple(result.shape)} is not understood")


def softmax(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int]:
    """``softmax`` / ``log_softmax`` along any axis: equivariant under permuting every axis (also the
    normalised one), so every space is kept."""
    return list(tracer.axes[tracer.one_tensor(n)])


def getitem(tracer: SpecInterpreter, n: fx.Node, result: Any) -> Any:
    """``x[i]`` of a tuple node (``split``, ``chunk``, ``nn.MultiheadAttention``'s outputs): that element's
    axes. ``x[...]`` of a tensor: an integer drops an axis, ``None`` adds a fixed one, a full slice
    keeps an axis, any other slice or index keeps or drops a FIXED axis only."""
    src, idx = n.args[0], n.args[1]
    if isinstance(src, fx.Node) and src in tracer.items:
        if not isinstance(idx, int):
            return None
        item = tracer.items[src][idx]
        return None if item is None else list(item[0])
    if not (isinstance(src, fx.Node) and src in tracer.axes):
        return None
    axes, shape = tracer.axes[src], tracer.shapes[src]
    index = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, fx.Node) or isinstance(i, Tensor) for i in index):
        if tracer.permuted(src):
            raise tracer.unsupported(n, "indexing a permuted tensor with a tensor")
        return [FIXED] * result.ndim
    if Ellipsis in index:
        e = index.index(Ellipsis)
        fill = len(axes) - (len(index) - 1 - sum(i is None for i in index))
        index = (*index[:e], *([slice(None)] * fill), *index[e + 1 :])
    out: list[int] = []
    ax = 0
    for i in index:
        if i is None:
            out.append(FIXED)
            continue
        a = axes[ax]
        if isinstance(i, slice) and i == slice(None):
            out.append(a)
        elif tracer.spaces.permuted(a):
            raise tracer.unsupported(n, f"indexing a permuted axis (axis {ax}) with {i!r}")
        elif isinstance(i, slice):
            out.append(FIXED)
        elif not isinstance(i, int):
            raise tracer.unsupported(n, f"index {i!r}")
        ax += 1
    out.extend(axes[ax:])
    if len(out) != result.ndim:
        raise tracer.unsupported(n, f"index {idx!r} on shape {shape}")
    return out


def split(tracer: SpecInterpreter, n: fx.Node, result: Any) -> Any:
    """``split`` / ``chunk`` / ``tensor_split`` / ``unbind`` along one axis: the pieces of a fixed axis are
    fixed; a permuted space is refined into one space per piece (the fused Q/K/V projection of a
    GPT block: its rows become three segments)."""
    x = tracer.one_tensor(n)
    axes = tracer.axes[x]
    name = _target_name(n)
    if name == "unbind":
        d = _norm_dim(_arg(n, 1, "dim", 0), len(axes), n)
        if tracer.spaces.permuted(axes[d]):
            raise tracer.unsupported(n, "unbinding a permuted axis")
        return [[a for i, a in enumerate(axes) if i != d] for _ in result]
    d = _norm_dim(_arg(n, 2, "dim", 0), len(axes), n)
    lengths = [int(r.shape[d]) for r in result]
    a = axes[d]
    if not tracer.spaces.permuted(a):
        pieces = [FIXED] * len(lengths)
    elif tracer.spaces.kind_of(a) == "plain":
        c = tracer.spaces.refine(a, lengths)
        pieces = [b for b, _ in tracer.spaces.derived(c)[1]]
    elif tracer.spaces.kind_of(a) == "cat" and [m for _, m in tracer.spaces.segments(a, -1)] == lengths:
        pieces = [b for b, _ in tracer.spaces.segments(a, -1)]
    else:
        raise tracer.unsupported(n, "splitting a structured (split or concatenated) axis")
    return [[*axes[:d], p, *axes[d + 1 :]] for p in pieces]


def cat(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int]:
    """``torch.cat`` along one axis: the other axes are merged across the operands; the joined axis is
    fixed if every operand's is, else a concatenation of segments (DenseNet, U-Net skips: the next
    layer's input axis is permuted by the direct sum of the operands' groups)."""
    xs = _arg(n, 0, "tensors", None)
    parts = [_part(tracer, x) for x in xs]
    if any(p is None for p in parts):
        return None  # type: ignore[return-value]
    nd = result.ndim
    d = _norm_dim(_arg(n, 1, "dim", 0), nd, n)
    out = list(parts[0][0])
    for axes, _ in parts[1:]:
        for i in range(nd):
            if i != d:
                tracer.spaces.union(out[i], axes[i])
    joined = [(axes[d], shape[d]) for axes, shape in parts]
    if any(tracer.spaces.permuted(a) for a, _ in joined):
        out[d] = tracer.spaces.cat(joined)
    else:
        out[d] = FIXED
    return out


def stack(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int]:
    """``torch.stack``: operands' axes merged; the new axis is fixed."""
    xs = _arg(n, 0, "tensors", None)
    parts = [_part(tracer, x) for x in xs]
    if any(p is None for p in parts):
        return None  # type: ignore[return-value]
    d = _norm_dim(_arg(n, 1, "dim", 0), result.ndim, n)
    out = list(parts[0][0])
    for axes, _ in parts[1:]:
        for i, a in enumerate(axes):
            tracer.spaces.union(out[i], a)
    return [*out[:d], FIXED, *out[d:]]


def expand(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int]:
    """``expand`` / ``expand_as`` / ``broadcast_to``: new leading axes and expanded size-1 axes are fixed."""
    x = tracer.tensor_inputs(n)[0]
    axes, shape = tracer.axes[x], tracer.shapes[x]
    out = [FIXED] * (result.ndim - len(axes))
    for a, s0, s1 in zip(axes, shape, result.shape[result.ndim - len(axes) :], strict=True):
        if s0 == 1 and s1 != 1:
            tracer.spaces.fix(a)
            out.append(FIXED)
        else:
            out.append(a)
    return out


def first_operand(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int] | None:
    """``type_as`` / ``to`` / ``float``...: the first tensor's spaces (the others give only a dtype)."""
    tensors = tracer.tensor_inputs(n)
    if not isinstance(result, Tensor) or not tensors:
        return None
    return list(tracer.axes[tensors[0]])


def attention(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int]:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask)``: ``q[-1]`` and ``k[-1]`` merged (their
    product is summed), ``k[-2]`` and ``v[-2]`` merged (the softmax weights sum over the keys), batch
    (and head) axes broadcast across q, k, v and the mask; the result is ``(*batch, q[-2], v[-1])``.
    With heads split off by a reshape this couples Q with K within each head and makes V's heads
    follow theirs."""
    q, k, v = (_part(tracer, _arg(n, i, key, None)) for i, key in enumerate(("query", "key", "value")))
    if q is None or k is None or v is None:
        return None  # type: ignore[return-value]
    sp = tracer.spaces
    sp.union(q[0][-1], k[0][-1])
    sp.union(k[0][-2], v[0][-2])
    parts = [(q[0][:-2], q[1][:-2]), (k[0][:-2], k[1][:-2]), (v[0][:-2], v[1][:-2])]
    mask = _part(tracer, n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None))
    batch = _broadcast(tracer, tuple(result.shape[:-2]), parts)
    if mask is not None:
        full = _broadcast(
            tracer,
            (*result.shape[:-1], k[1][-2]),
            [([*batch, q[0][-2], k[0][-2]], (*result.shape[:-1], k[1][-2])), mask],
        )
        batch = full[:-2]
    return [*batch, q[0][-2], v[0][-1]]


def multihead_attention(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[list[int] | None]:
    """``nn.MultiheadAttention`` (one projection ``in_proj_weight`` for q, k, v; no ``bias_k``): the rows
    of ``in_proj_weight`` are three segments ``[q; k; v]``: q and k share one group (blocks of
    ``head_dim``), v another, coupled to it by heads; the output projection's input axis is v's
    group and its output opens a new space. The query, key and value inputs share the columns.
    Returns the spaces of ``(output, attention weights)``."""
    name = str(n.target)
    m = tracer.fetch_attr(n.target)
    if not m._qkv_same_embed_dim or m.bias_k is not None:
        raise tracer.unsupported(n, "MultiheadAttention with separate kdim/vdim or bias_k/bias_v")
    nodes = [_arg(n, i, key, None) for i, key in enumerate(("query", "key", "value"))]
    q, k, v = (tracer.axes[x] for x in nodes)
    kp = n.kwargs.get("key_padding_mask", n.args[3] if len(n.args) > 3 else None)
    am = n.kwargs.get("attn_mask", n.args[5] if len(n.args) > 5 else None)
    for extra in (kp, am):  # masks index positions, which are never permuted: hold their axes fixed
        if isinstance(extra, fx.Node) and extra in tracer.axes:
            for a in tracer.axes[extra]:
                tracer.spaces.fix(a)
    sp = tracer.spaces
    e, h = m.embed_dim, m.num_heads
    d = e // h
    sp.union(q[-1], k[-1])
    sp.union(q[-1], v[-1])
    qk, vo = tracer.open_space(f"{name}.qk"), tracer.open_space(f"{name}.vo")
    tracer.add_block(qk, d, f"{name} (heads)")
    tracer.add_block(vo, d, f"{name} (heads)")
    sp.couple(qk, vo)
    rows = sp.cat([(qk, e), (qk, e), (vo, e)])
    tracer.attach_module(name, m, {"in_proj_weight": [rows, q[-1]], "in_proj_bias": [rows]})
    out = tracer.open_space(f"{name}.out_proj")
    tracer.attach_module(f"{name}.out_proj", m.out_proj, {"weight": [out, vo], "bias": [out]})
    # batch and token axes: key and value tokens merge (the weights sum over them); query tokens pass
    if len(q) == 2:  # unbatched: (L, E)
        lq, sk, sv = q[0], k[0], v[0]
        batch: list[int] = []
    elif m.batch_first:  # (N, L, E)
        lq, sk, sv = q[1], k[1], v[1]
        batch = [q[0]]
        sp.union(q[0], k[0])
        sp.union(q[0], v[0])
    else:  # (L, N, E)
        lq, sk, sv = q[0], k[0], v[0]
        batch = [q[1]]
        sp.union(q[1], k[1])
        sp.union(q[1], v[1])
    sp.union(sk, sv)
    y = [*batch, lq, out] if m.batch_first or not batch else [lq, *batch, out]
    w = result[1]
    if w is None:
        return [y, None]
    if w.ndim == len(q):  # averaged over heads: ([N,] L, S)
        return [y, [*batch, lq, sk]]
    head, _ = sp.split(qk, h, d)
    return [y, [*batch, head, lq, sk]]


def functional_linear(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int] | None:
    """``F.linear(x, w, b)`` with ``w`` / ``b`` read in forward: ``w[1]`` merged with ``x[-1]``; the
    result's last axis is ``w[0]``'s space (merged with ``b``'s)."""
    x, w = _part(tracer, _arg(n, 0, "input", None)), _part(tracer, _arg(n, 1, "weight", None))
    if x is None or w is None:
        return None
    tracer.spaces.union(x[0][-1], w[0][1])
    b = _part(tracer, n.kwargs.get("bias", n.args[2] if len(n.args) > 2 else None))
    if b is not None:
        tracer.spaces.union(b[0][0], w[0][0])
    return [*x[0][:-1], w[0][0]]


def functional_norm(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int] | None:
    """``F.layer_norm(x, shape, w, b)`` / ``F.rms_norm(x, shape, w)``: the affine tensors' axes are merged
    with ``x``'s normalised (trailing) axes."""
    x = _part(tracer, _arg(n, 0, "input", None))
    if x is None:
        return None
    for t in tracer.tensor_inputs(n)[1:]:
        axes = tracer.axes[t]
        for a, b in zip(axes, x[0][len(x[0]) - len(axes) :], strict=True):
            tracer.spaces.union(a, b)
    return list(x[0])


def functional_embedding(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int] | None:
    """``F.embedding(idx, w)``: ``w``'s row axis fixed (indices are not permuted), its column axis is
    the result's last."""
    idx, w = _part(tracer, _arg(n, 0, "input", None)), _part(tracer, _arg(n, 1, "weight", None))
    if idx is None or w is None:
        return None
    if any(tracer.spaces.permuted(a) for a in idx[0]):
        raise tracer.unsupported(n, "an embedding looked up with permuted indices")
    tracer.spaces.fix(w[0][0])
    return [*idx[0], w[0][1]]


def shape_query(tracer: SpecInterpreter, n: fx.Node, result: Any) -> list[int] | None:
    """``size()`` / ``dim()``: not a tensor (or an unpermuted one)."""
    return [] if not isinstance(result, Tensor) else [FIXED] * result.ndim  # a size is no tensor: nothing to carry


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
_POINTWISE: tuple[Any, ...] = (
    operator.pow,
    torch.pow,
    torch.exp,
    torch.log,
    torch.sqrt,
    torch.rsqrt,
    torch.abs,
    torch.erf,
    torch.square,
    torch.clamp,
    torch.maximum,
    torch.minimum,
    "pow",
    "exp",
    "log",
    "sqrt",
    "rsqrt",
    "abs",
    "erf",
    "square",
    "clamp",
    "clamp_min",
    "clamp_max",
)
"""Pointwise maps of one or more tensors: one tensor keeps its spaces, several merge like ``+``."""
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

_RESHAPES: tuple[Any, ...] = (
    torch.reshape,
    torch.squeeze,
    torch.unsqueeze,
    torch.unflatten,
    "reshape",
    "view",
    "unflatten",
    "squeeze",
    "unsqueeze",
)
_REDUCTIONS: tuple[Any, ...] = (
    torch.mean,
    torch.sum,
    torch.amax,
    torch.amin,
    torch.logsumexp,
    torch.norm,
    torch.var,
    torch.std,
    "mean",
    "sum",
    "amax",
    "amin",
    "logsumexp",
    "norm",
    "var",
    "std",
)
_SOFTMAX: tuple[Any, ...] = (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax")
_MATMUL: tuple[Any, ...] = (operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm")
_SPLITS: tuple[Any, ...] = (
    torch.split,
    torch.chunk,
    torch.tensor_split,
    torch.unbind,
    "split",
    "chunk",
    "tensor_split",
    "unbind",
)

RULES: dict[Any, Rule] = {
    nn.Linear: linear,
    nn.Conv1d: conv,
    nn.Conv2d: conv,
    nn.Conv3d: conv,
    nn.ConvTranspose1d: conv_transpose,
    nn.ConvTranspose2d: conv_transpose,
    nn.ConvTranspose3d: conv_transpose,
    nn.Embedding: embedding,
    nn.MultiheadAttention: multihead_attention,
    _BatchNorm: batch_norm,
    nn.GroupNorm: group_norm,
    nn.LayerNorm: layer_norm,
    nn.RMSNorm: layer_norm,
    nn.Flatten: flatten,
    nn.Unflatten: reshape,
    nn.Softmax: softmax,
    nn.LogSoftmax: softmax,
    **dict.fromkeys(_ELEMENTWISE_MODULES, elementwise),
    **{cls: pooling(k) for cls, k in _POOL_MODULES.items()},
    **dict.fromkeys(_ELEMENTWISE_FUNCTIONS, elementwise),
    **dict.fromkeys(_ELEMENTWISE_METHODS, elementwise),
    **{f: pooling(k) for f, k in _POOL_FUNCTIONS.items()},
    torch.flatten: flatten,
    "flatten": flatten,
    **dict.fromkeys(_RESHAPES, reshape),
    **dict.fromkeys(_REDUCTIONS, reduction),
    **dict.fromkeys(_SOFTMAX, softmax),
    **dict.fromkeys(_MATMUL, matmul),
    **dict.fromkeys(_SPLITS, split),
    torch.cat: cat,
    torch.concat: cat,
    torch.concatenate: cat,
    torch.stack: stack,
    operator.getitem: getitem,
    "masked_fill": masked_fill,
    torch.masked_fill: masked_fill,
    torch.where: masked_fill,
    "expand": expand,
    "expand_as": expand,
    torch.broadcast_to: expand,
    **dict.fromkeys(("type_as", "to", "float", "double"), first_operand),
    F.scaled_dot_product_attention: attention,
    F.linear: functional_linear,
    F.layer_norm: functional_norm,
    F.rms_norm: functional_norm,
    F.embedding: functional_embedding,
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
    **dict.fromkeys(_POINTWISE, scale),
    "size": shape_query,
    "dim": shape_query,
    getattr: _getattr,
}
"""How each fx target transforms channel spaces: a module class (matched along the module's MRO),
a function (``call_function`` target) or a method name (``call_method`` target) → ``Rule``.
Read at every node: add or replace entries to teach ``trace_spec`` a new operation."""


@dataclass(frozen=True)
class TraceReport:
    """What ``trace_spec`` found: the spec, and which tensors it permutes and which it holds fixed, and why.

    ``held``: ``(where, why)`` for every place a permutable space was held fixed (an operation with
    no rule under ``strict=False``, a grouped convolution, a structure a spec cannot express).
    """

    spec: PermutationSpec
    held: tuple[tuple[str, str], ...]

    def text(self) -> str:
        """A plain-text coverage report: ``spec_coverage(spec, held)``."""
        return spec_coverage(self.spec, self.held)


def spec_coverage(spec: PermutationSpec, held: Sequence[tuple[str, str]] = ()) -> str:
    """A plain-text coverage report of ``spec``: every group (size, blocks, head class) with the tensors
    and axes it permutes (``[a:b]``: its segment of a concatenated axis), the tensors no group permutes,
    and ``held``, the places a trace held a symmetry fixed and why (``TraceReport.held``)."""
    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    sizes = spec.sizes
    lines = [f"{len(sizes)} permutation group(s), {sum(sizes.values())} units"]
    for g, members in spec.members.items():
        extra = []
        if spec.block(g) > 1:
            extra.append(f"blocks of {spec.block(g)}")
        if g in spec.heads:
            extra.append(f"head class {spec.heads[g]!r} with {spec.head_classes[spec.heads[g]]}")
        lines.append(f"  {g}: {sizes[g]} units" + (f" ({'; '.join(extra)})" if extra else ""))
        for k, ax, off in members:
            where = "" if off is None else f"[{off}:{off + sizes[g]}]"
            lines.append(f"    {k} axis {ax}{where}")
    fixed = [k for k, e in spec.axes.items() if all(a is None for a in e)]
    lines.append(f"{len(fixed)} tensor(s) not permuted: " + (", ".join(fixed) if fixed else "none"))
    if held:
        lines.append("held fixed (a symmetry left unused):")
        lines += [f"  {where}: {why}" for where, why in held]
    return "\n".join(lines)


class _Tracer(fx.Tracer):
    """``torch.fx``'s tracer, with a subclass of a pooling module kept whole as the class it extends is
    (the zoo's ``ReshapeMaxPool1d`` branches on grad mode and device, which a trace cannot follow); its
    rule is its base class's (``RULES`` is looked up along the class's MRO)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, tuple(_POOL_MODULES)) or super().is_leaf_module(m, module_qualified_name)


def trace_report(model: nn.Module, example_input: Tensor | tuple, *, strict: bool = True) -> TraceReport:
    """``trace_spec``'s spec together with its coverage report (see ``TraceReport``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    if not inputs or not all(isinstance(x, Tensor) for x in inputs):
        raise TypeError(f"example_input must be a Tensor (or a tuple of them), got {type(example_input).__name__}")
    strict = validate.flag("strict", strict)
    state = model.state_dict()
    copied = copy.deepcopy(model)
    try:
        gm = fx.GraphModule(copied, _Tracer().trace(copied), type(copied).__name__)
    except Exception as e:  # fx raises TraceError / TypeError / NotImplementedError
        raise ValueError(f"trace_spec: torch.fx cannot trace {type(model).__name__}: {e}") from e
    gm.eval()
    interp = SpecInterpreter(gm, state, strict=strict)
    device = next(iter(state.values())).device if state else None
    with torch.no_grad():
        interp.run(*(x.to(device) if device is not None else x for x in inputs))
    spec = interp.spec()
    return TraceReport(spec, tuple(interp.held))


def trace_spec(model: nn.Module, example_input: Tensor | tuple, *, strict: bool = True) -> PermutationSpec:
    """Derive ``model``'s permutation spec from a ``torch.fx`` trace run on ``example_input``.

    Union-find over channel spaces: every Linear / conv / embedding output opens a space; weights,
    biases, norm parameters and float buffers attach to spaces; elementwise maps, softmax, dropout,
    pooling, reductions, reorderings and reshapes carry spaces through (a reshape into heads makes
    a space blocked; see ``_reshape``); ``+`` / ``-`` / elementwise products merge the spaces of
    their operands; matrix products and attention merge the contracted axes (Q with K, V's heads
    with Q/K's); ``torch.cat`` makes a segmented axis; parameters read in forward open one space per
    axis. The input's space and the output's are fixed (never permuted), as are positional axes a
    conv or pool reads. Each operation's rule is the entry of ``RULES`` for it (module docstring).

    Raises ``ValueError`` (``UnsupportedOperation``) naming the node for an operation on a permuted
    tensor that no rule covers, unless ``strict=False``: then its inputs are held fixed (the spec
    uses less symmetry, never a wrong one; ``trace_report`` says where). Also raises for a model
    ``fx`` cannot trace and for state_dict keys the trace never reaches. ``model`` is not modified
    (a copy is traced and run in eval mode). ``example_input``: a tensor, or a tuple of tensors for
    a forward taking several.
    """
    return trace_report(model, example_input, strict=strict).spec
