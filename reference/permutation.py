"""Permutation symmetries as data.

``PermutationSpec`` says which permutation *groups* a network has and, for every parameter or
buffer key, which group acts on each axis (``None`` where none does). ``Permutation`` maps each
group to an index tensor. Applying P reindexes every axis a group acts on:
``P(θ)[k] = θ[k].index_select(axis, p[group])``, i.e. new unit ``i`` is old unit ``p[i]``.

Composition follows function notation: ``(P ∘ Q)(θ) = P(Q(θ))``; its index for a group is
``q[p]``. The identity is ``arange``, the inverse ``argsort``.

Some normalisations restrict the group: GroupNorm with ``g`` groups over ``C`` channels computes the
same function only under permutations that map each contiguous block of ``C/g`` channels onto a
block. Such a group carries ``blocks[group] = C/g``; random permutations and matching respect it.

Two structures beyond "one group per axis" (both produced by ``reference.trace.trace_spec``):

- **Segments.** An axis of a concatenation (``torch.cat`` along channels: DenseNet, U-Net skips, the
  stacked Q/K/V rows of ``nn.MultiheadAttention``'s ``in_proj_weight``) is permuted by the direct sum
  of several groups: its entry is a tuple of ``(group | None, length)`` segments, consecutive along
  the axis (``None``: that segment is never permuted). A group may appear in several segments.
- **Coupled heads.** Attention heads permute as blocks: the Q/K group and the V/output group of one
  attention layer each carry ``blocks[g] = head_dim`` (units may move only within a head, heads
  only as wholes), and ``heads[g]`` names the *head class* they share: every group of one class must
  map heads to heads the same way (one head permutation; the within-head permutations are free).

A ``Permutation`` made without a spec (``Permutation.load`` / ``from_json`` without one, or from a bare
dict) is only checked to be a bijection per group; ``apply`` checks every group's length against the
spec it is given, and its blocks against ``spec.blocks``, whichever way the permutation was made.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from . import validate
from .params import Params

__all__ = ["PermutationSpec", "Permutation", "Segments", "AxisEntry", "entry_groups"]

Segments = tuple[tuple["str | None", int], ...]
"""A concatenated axis: consecutive ``(group | None, length)`` segments."""
AxisEntry = "str | None | Segments"
"""What acts on one axis: one group, none, or consecutive segments of groups."""


def entry_groups(entry) -> list[str]:
    """The groups acting on an axis entry (a segmented axis may name a group more than once)."""
    if entry is None:
        return []
    if isinstance(entry, str):
        return [entry]
    return [g for g, _ in entry if g is not None]


def _normalise_entry(key: str, ax: int, entry, size: int):
    """A str / None entry as it is; a segments tuple checked (lengths sum to ``size``) and collapsed to
    its one group (or ``None``) when a single segment spans the axis."""
    if entry is None or isinstance(entry, str):
        return entry
    if not isinstance(entry, (tuple, list)):
        raise TypeError(f"key {key!r} axis {ax}: an axis entry is a group name, None or segments, got {entry!r}")
    segs = []
    for seg in entry:
        if not (isinstance(seg, (tuple, list)) and len(seg) == 2):
            raise TypeError(f"key {key!r} axis {ax}: a segment is (group | None, length), got {seg!r}")
        g, n = seg
        if g is not None and not isinstance(g, str):
            raise TypeError(f"key {key!r} axis {ax}: group names must be str or None, got {g!r}")
        n = validate.integer(f"segment length of key {key!r} axis {ax}", n)
        if segs and segs[-1][0] is None and g is None:  # adjacent fixed segments merge
            segs[-1] = (None, segs[-1][1] + n)
        else:
            segs.append((g, n))
    if sum(n for _, n in segs) != size:
        raise ValueError(
            f"key {key!r} axis {ax}: segments {tuple(segs)} have total length {sum(n for _, n in segs)}, "
            f"the axis has {size}"
        )
    if len(segs) == 1:
        return segs[0][0]
    return tuple(segs)


@dataclass(frozen=True)
class PermutationSpec:
    """For every key, the group acting on each axis; the shapes it was built for.

    Validated on construction: every key has one entry per axis, every axis (or segment) a group
    touches has the same size, every group's block size divides its size, the groups of one head
    class have the same number of heads.
    """

    axes: Mapping[str, tuple[str | None, ...]]
    shapes: Mapping[str, tuple[int, ...]]
    blocks: Mapping[str, int] = field(default_factory=dict)
    heads: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shapes = {k: tuple(int(s) for s in v) for k, v in self.shapes.items()}
        axes_in = {k: tuple(v) for k, v in self.axes.items()}
        if set(axes_in) != set(shapes):
            missing = sorted(set(shapes) - set(axes_in))
            extra = sorted(set(axes_in) - set(shapes))
            raise ValueError(f"spec keys and shapes differ: no axes for {missing}, no shape for {extra}")
        axes: dict[str, tuple] = {}
        sizes: dict[str, tuple[int, str, int]] = {}
        for k, groups in axes_in.items():
            if len(groups) != len(shapes[k]):
                raise ValueError(
                    f"key {k!r}: {len(groups)} axis entries {groups} for a tensor of shape {shapes[k]}"
                )
            entries = tuple(_normalise_entry(k, ax, e, shapes[k][ax]) for ax, e in enumerate(groups))
            axes[k] = entries
            for ax, e in enumerate(entries):
                if e is None:
                    continue
                parts = [(e, shapes[k][ax])] if isinstance(e, str) else [(g, n) for g, n in e if g is not None]
                for g, n in parts:
                    if g in sizes and sizes[g][0] != n:
                        n0, k0, ax0 = sizes[g]
                        raise ValueError(
                            f"group {g!r} acts on axes of different sizes: {k0!r} axis {ax0} has {n0}, "
                            f"{k!r} axis {ax} has {n}"
                        )
                    sizes.setdefault(g, (n, k, ax))
        object.__setattr__(self, "axes", axes)
        object.__setattr__(self, "shapes", shapes)
        object.__setattr__(self, "blocks", dict(self.blocks))
        object.__setattr__(self, "heads", dict(self.heads))
        for g, b in self.blocks.items():
            if g not in sizes:
                raise ValueError(f"block size given for unknown group {g!r}")
            b = validate.integer(f"block size of group {g!r}", b)
            if sizes[g][0] % b:
                raise ValueError(f"group {g!r}: block size {b} does not divide its size {sizes[g][0]}")
        nblocks: dict[str, tuple[int, str]] = {}
        for g, h in self.heads.items():
            if g not in sizes:
                raise ValueError(f"head class given for unknown group {g!r}")
            if not isinstance(h, str):
                raise TypeError(f"group {g!r}: a head class is named by a str, got {h!r}")
            m = sizes[g][0] // self.blocks.get(g, 1)
            if h in nblocks and nblocks[h][0] != m:
                raise ValueError(
                    f"head class {h!r}: group {nblocks[h][1]!r} has {nblocks[h][0]} heads, group {g!r} has {m}"
                )
            nblocks.setdefault(h, (m, g))

    @classmethod
    def from_params(
        cls,
        axes: Mapping[str, tuple[str | None, ...]],
        params: Mapping[str, Tensor],
        blocks: Mapping[str, int] | None = None,
        heads: Mapping[str, str] | None = None,
    ) -> PermutationSpec:
        """Build a spec for ``params``; every key of ``params`` must be named in ``axes``."""
        missing = sorted(set(params) - set(axes))
        extra = sorted(set(axes) - set(params))
        if missing or extra:
            raise ValueError(f"spec does not cover the parameters: missing keys {missing}, unknown keys {extra}")
        return cls(axes, {k: tuple(v.shape) for k, v in params.items()}, blocks or {}, heads or {})

    @property
    def groups(self) -> dict[str, list[tuple[str, int]]]:
        """group → [(key, axis), ...] in key order (derived, never stored). A segmented axis is listed
        once per segment of the group: use ``members`` for the segment's offset."""
        return {g: [(k, ax) for k, ax, _ in ms] for g, ms in self.members.items()}

    @property
    def members(self) -> dict[str, list[tuple[str, int, int | None]]]:
        """group → [(key, axis, offset), ...]: ``offset`` is ``None`` where the group spans the whole
        axis, else where its segment starts (the segment's length is the group's size)."""
        out: dict[str, list[tuple[str, int, int | None]]] = {}
        for k, entries in self.axes.items():
            for ax, e in enumerate(entries):
                if isinstance(e, str):
                    out.setdefault(e, []).append((k, ax, None))
                elif e is not None:
                    off = 0
                    for g, n in e:
                        if g is not None:
                            out.setdefault(g, []).append((k, ax, off))
                        off += n
        return out

    @property
    def sizes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for k, entries in self.axes.items():
            for ax, e in enumerate(entries):
                if isinstance(e, str):
                    out.setdefault(e, self.shapes[k][ax])
                elif e is not None:
                    for g, n in e:
                        if g is not None:
                            out.setdefault(g, n)
        return {g: out[g] for g in self.members}

    @property
    def head_classes(self) -> dict[str, list[str]]:
        """head class → its groups (in ``heads`` order)."""
        out: dict[str, list[str]] = {}
        for g, h in self.heads.items():
            out.setdefault(h, []).append(g)
        return out

    def index(self, perm: Mapping[str, Tensor], key: str, ax: int) -> Tensor | None:
        """The index ``P`` reindexes axis ``ax`` of ``key`` with (``None``: the axis is not permuted);
        a segmented axis gets the direct sum of its segments' indices."""
        e = self.axes[key][ax]
        if e is None:
            return None
        if isinstance(e, str):
            return perm[e]
        parts, off = [], 0
        for g, n in e:
            parts.append(torch.arange(off, off + n) if g is None else perm[g].cpu() + off)
            off += n
        return torch.cat(parts)

    def block(self, group: str) -> int:
        return self.blocks.get(group, 1)

    def check_params(self, params: Mapping[str, Tensor], batch_dims: int = 0) -> None:
        """Raise ``ValueError`` if ``params`` is not a point of this architecture."""
        batch_dims = validate.integer("batch_dims", batch_dims, minimum=0)
        missing = sorted(set(self.shapes) - set(params))
        extra = sorted(set(params) - set(self.shapes))
        if missing or extra:
            raise ValueError(
                f"parameters do not fit the spec: missing keys {missing[:5]}, unexpected keys {extra[:5]}"
            )
        for k, shape in self.shapes.items():
            got = tuple(params[k].shape[batch_dims:])
            if got != shape:
                raise ValueError(f"key {k!r}: shape {got} does not match the spec's {shape}")

    def canonical(self) -> PermutationSpec:
        """The same spec with groups renamed ``g0, g1, ...`` by first appearance in sorted key order
        (head classes ``h0, h1, ...`` by their first group's new name).

        Two specs describe the same symmetry iff their canonical forms are equal.
        """
        names: dict[str, str] = {}
        for k in sorted(self.axes):
            for e in self.axes[k]:
                for g in entry_groups(e):
                    if g not in names:
                        names[g] = f"g{len(names)}"

        def rename(e):
            if e is None:
                return None
            if isinstance(e, str):
                return names[e]
            return tuple((None if g is None else names[g], n) for g, n in e)

        axes = {k: tuple(rename(e) for e in self.axes[k]) for k in sorted(self.axes)}
        shapes = {k: self.shapes[k] for k in sorted(self.shapes)}
        blocks = {names[g]: b for g, b in sorted(self.blocks.items(), key=lambda gb: int(names[gb[0]][1:])) if b != 1}
        classes: dict[str, str] = {}
        heads: dict[str, str] = {}
        for g in sorted(self.heads, key=lambda g: int(names[g][1:])):
            h = self.heads[g]
            if len(self.head_classes[h]) < 2 and self.blocks.get(g, 1) in (1, self.sizes[g]):
                continue  # a class of one group adds nothing to its blocks
            classes.setdefault(h, f"h{len(classes)}")
            heads[names[g]] = classes[h]
        return PermutationSpec(axes, shapes, blocks, heads)

    def same_symmetry(self, other: PermutationSpec) -> bool:
        a, b = self.canonical(), other.canonical()
        return a.axes == b.axes and a.shapes == b.shapes and dict(a.blocks) == dict(b.blocks) and dict(
            a.heads
        ) == dict(b.heads)


def _check_index(group: str, idx: Tensor, n: int | None, block: int = 1) -> Tensor:
    if not isinstance(idx, Tensor):
        idx = torch.as_tensor(idx)
    if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise validate.ArgumentTypeError(
            f"group {group!r}: permutation index must be an integer tensor, got {idx.dtype}"
        )
    idx = idx.to(torch.long)
    if idx.ndim != 1:
        raise ValueError(f"group {group!r}: permutation index must be 1-D, got shape {tuple(idx.shape)}")
    if n is not None and idx.numel() != n:
        raise ValueError(f"group {group!r}: permutation has length {idx.numel()}, the group has size {n}")
    m = idx.numel()
    if m and (int(idx.min()) < 0 or int(idx.max()) >= m):
        lo, hi = int(idx.min()), int(idx.max())
        raise ValueError(f"group {group!r}: index values must lie in [0, {m}), got [{lo}, {hi}]")
    counts = torch.bincount(idx.cpu(), minlength=m)
    if bool((counts != 1).any()):
        dup = torch.nonzero(counts > 1).flatten()[:5].tolist()
        raise ValueError(f"group {group!r}: not a bijection; values repeated: {dup}")
    _check_blocks(group, idx, block)
    return idx


def _check_blocks(group: str, idx: Tensor, block: int) -> None:
    """Raise ``ValueError`` unless the bijection ``idx`` maps blocks of ``block`` units onto blocks."""
    if block > 1:
        if idx.numel() % block:
            raise ValueError(f"group {group!r}: permutation of length {idx.numel()} has no blocks of {block}")
        blocks = idx.cpu().view(-1, block) // block
        if bool((blocks != blocks[:, :1]).any()):
            raise ValueError(f"group {group!r}: permutation does not map blocks of {block} channels onto blocks")


def _head_map(idx: Tensor, block: int) -> Tensor:
    """Where each block of ``block`` units of a block-preserving index comes from."""
    return idx.cpu().view(-1, block)[:, 0] // block


def _check_heads(spec: PermutationSpec, perms: Mapping[str, Tensor]) -> None:
    """Raise ``ValueError`` unless the groups of every head class move heads the same way."""
    for h, gs in spec.head_classes.items():
        maps = [(g, _head_map(perms[g], spec.block(g))) for g in gs if g in perms]
        for g, m in maps[1:]:
            if not torch.equal(m, maps[0][1]):
                raise ValueError(
                    f"head class {h!r}: groups {maps[0][0]!r} and {g!r} move heads differently "
                    f"({maps[0][1].tolist()[:8]} vs {m.tolist()[:8]}); heads permute as wholes, one head "
                    "permutation per attention layer"
                )


class Permutation:
    """A map group → LongTensor index (a bijection of ``range(size)``); immutable."""

    __slots__ = ("_p",)

    def __init__(self, perms: Mapping[str, Tensor], spec: PermutationSpec | None = None):
        sizes = spec.sizes if spec is not None else {}
        if spec is not None:
            missing = sorted(set(sizes) - set(perms))
            extra = sorted(set(perms) - set(sizes))
            if missing or extra:
                raise ValueError(f"permutation groups do not fit the spec: missing {missing}, unknown {extra}")
        self._p = {
            g: _check_index(g, v, sizes.get(g), spec.block(g) if spec is not None else 1)
            for g, v in perms.items()
        }
        if spec is not None:
            _check_heads(spec, self._p)

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def identity(cls, spec: PermutationSpec) -> Permutation:
        return cls({g: torch.arange(n) for g, n in spec.sizes.items()}, spec)

    @classmethod
    def random(cls, spec: PermutationSpec, generator: torch.Generator | int | None = None) -> Permutation:
        """A uniformly random permutation respecting ``spec.blocks`` and ``spec.heads`` (one head
        permutation per head class); ``generator``: a ``torch.Generator``, an int seed, or ``None``
        (torch's global generator)."""
        if generator is not None:
            generator = validate.generator(generator)
        out = {}
        shared: dict[str, Tensor] = {}
        for g, n in spec.sizes.items():
            b = spec.block(g)
            h = spec.heads.get(g)
            if h is not None and h not in shared:
                shared[h] = torch.randperm(n // b, generator=generator)
            outer = shared[h] if h is not None else torch.randperm(n // b, generator=generator)
            inner = torch.stack([torch.randperm(b, generator=generator) for _ in range(n // b)])
            out[g] = (outer[:, None] * b + inner).reshape(-1)
        return cls(out, spec)

    # --- mapping interface ----------------------------------------------------------------
    def __getitem__(self, group: str) -> Tensor:
        return self._p[group]

    def __iter__(self):
        return iter(self._p)

    def __len__(self) -> int:
        return len(self._p)

    def keys(self):
        return self._p.keys()

    def items(self):
        return self._p.items()

    def to_dict(self) -> dict[str, Tensor]:
        return {g: v.clone() for g, v in self._p.items()}

    def __repr__(self) -> str:
        body = ", ".join(f"{g}: {len(v)}" for g, v in self._p.items())
        return f"Permutation({{{body}}})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Permutation):
            return NotImplemented
        return set(self._p) == set(other._p) and all(torch.equal(self._p[g], other._p[g]) for g in self._p)

    __hash__ = None  # type: ignore[assignment]

    # --- group operations -----------------------------------------------------------------
    def _same_groups(self, other: Permutation) -> None:
        if set(self._p) != set(other._p):
            raise ValueError(f"permutations over different groups: {sorted(self._p)} vs {sorted(other._p)}")
        for g in self._p:
            if len(self._p[g]) != len(other._p[g]):
                raise ValueError(f"group {g!r}: sizes differ ({len(self._p[g])} vs {len(other._p[g])})")

    def compose(self, other: Permutation) -> Permutation:
        """``self ∘ other``: applying the result equals applying ``other`` then ``self``."""
        self._same_groups(other)
        return Permutation({g: other._p[g][self._p[g]] for g in self._p})

    def __matmul__(self, other: Permutation) -> Permutation:
        return self.compose(other)

    def inverse(self) -> Permutation:
        return Permutation({g: torch.argsort(v) for g, v in self._p.items()})

    def is_identity(self) -> bool:
        return all(torch.equal(v, torch.arange(len(v))) for v in self._p.values())

    def num_moved(self) -> dict[str, int]:
        """Units not mapped to themselves, per group."""
        return {g: int((v != torch.arange(len(v))).sum()) for g, v in self._p.items()}

    # --- action on parameters -------------------------------------------------------------
    def check_fits(self, spec: PermutationSpec) -> None:
        """Raise ``ValueError`` unless every group of ``spec`` has an index here of the group's size that
        maps ``spec.blocks`` onto blocks and moves the heads of each head class alike (groups ``spec``
        does not name are ignored).

        ``Permutation(perms, spec)`` checks this on construction; a permutation made without a spec
        (``load`` / ``from_json`` without one) is checked here, by ``apply``.
        """
        sizes = spec.sizes
        missing = sorted(set(sizes) - set(self._p))
        if missing:
            raise ValueError(f"permutation lacks groups {missing} of the spec")
        for g, n in sizes.items():
            idx = self._p[g]
            if idx.numel() != n:
                raise ValueError(f"group {g!r}: permutation has length {idx.numel()}, the group has size {n}")
            _check_blocks(g, idx, spec.block(g))
        _check_heads(spec, self._p)

    def apply(self, spec: PermutationSpec, params: Mapping[str, Tensor], batch_dims: int = 0) -> Params:
        """P(θ) as a new dict; ``params`` is untouched. ``batch_dims`` leading dims are left alone.

        Raises ``ValueError`` if ``params`` do not fit ``spec`` or this permutation does not
        (``check_fits``: a group missing, of another length, or breaking a GroupNorm block).
        """
        spec.check_params(params, batch_dims=batch_dims)
        self.check_fits(spec)
        out: Params = {}
        for k, v in params.items():
            w = v
            for ax in range(len(spec.axes[k])):
                idx = spec.index(self._p, k, ax)
                if idx is not None:
                    w = w.index_select(ax + batch_dims, idx.to(w.device))
            out[k] = w if w is not v else v.clone()
        return out

    def __call__(self, spec: PermutationSpec, params: Mapping[str, Tensor]) -> Params:
        return self.apply(spec, params)

    # --- persistence ----------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Atomic write of ``{group: index}`` (``torch.save``; load with ``weights_only=True``)."""
        from .checkpoint import atomic_torch_save

        atomic_torch_save({"format": "modeconn.permutation/1", "perm": self.to_dict()}, Path(path))

    @classmethod
    def load(cls, path: str | Path, spec: PermutationSpec | None = None) -> Permutation:
        from .checkpoint import safe_torch_load

        obj = safe_torch_load(Path(path))
        if not isinstance(obj, dict) or obj.get("format") != "modeconn.permutation/1":
            raise ValueError(f"{path}: not a saved Permutation")
        return cls(obj["perm"], spec)

    def to_json(self) -> str:
        return json.dumps({g: v.tolist() for g, v in self._p.items()})

    @classmethod
    def from_json(cls, text: str, spec: PermutationSpec | None = None) -> Permutation:
        """Inverse of ``to_json``: ``{group: [int, ...]}``; any other entry (``0.5``, ``true``, ``"1"``)
        raises ``ValueError`` (it is never rounded)."""
        obj = json.loads(text)
        if not isinstance(obj, dict):
            raise ValueError(f"a permutation in JSON is an object {{group: [indices]}}, got {type(obj).__name__}")
        for g, v in obj.items():
            if not isinstance(v, list):
                raise ValueError(f"group {g!r}: permutation must be a list of integers, got {v!r:.80}")
            bad = [i for i in v if type(i) is not int]
            if bad:
                raise ValueError(f"group {g!r}: permutation entries must be integers, got {bad[0]!r}")
        return cls({g: torch.tensor(v, dtype=torch.long) for g, v in obj.items()}, spec)


def permutable_keys(spec: PermutationSpec) -> list[str]:
    """Floating keys a permutation acts on (others are left unchanged)."""
    return [k for k, gs in spec.axes.items() if any(entry_groups(g) for g in gs)]
