"""Activations of the units of permutation groups: which modules produce them, capture, statistics.

One place for what activation matching (Ainsworth et al. 2023, "Git Re-Basin", §3.1), REPAIR
(Jordan et al. 2023, §4) and the BatchNorm reset (``reference/bn.py``) read from a forward pass.

**Producers** (``group_producers``). The units of a permutation group g are the channels of the
outputs of the modules whose weight carries g. Normalisation layers are preferred where the group
has them (their output is what the next layer sees); otherwise the Linear / conv layers writing
into g (axis 0 of their weight). A residual stream has several producers: every layer whose output
is added into the stream. The *channel axis* of a producer's output follows from the module and
from the spec's axis for its weight, never from the type name alone:

- ``nn.Linear``: the last axis (a Linear maps the last axis, whatever the leading ones);
- ``nn.Conv{1,2,3}d`` with a ``k``-dimensional kernel: the axis ``k + 1`` from the end (dim 1 of a
  batched input, dim 0 of an unbatched one); ``nn.ConvTranspose{1,2,3}d`` the same, its output
  channels being weight axis 1 (``[in, out, k...]``);
- ``nn.Embedding``: the last axis (weight ``[vocab, dim]``, the group on axis 1);
- BatchNorm, GroupNorm, InstanceNorm: dim 1 (they require ``[N, C, *]``);
- ``nn.LayerNorm`` (and ``nn.RMSNorm``): its ``normalized_shape`` is the *trailing* axes of its input
  and its weight has that shape, so weight axis ``a`` is output axis ``a − weight.ndim`` (from the
  end). ``ChannelLayerNorm`` of ``reference/models.py`` moves channels last before its ``ln``, so the
  ``ln`` output carries them last (−1); a ``LayerNorm((C, L))`` applied to channels-first ``[B, C, L]``
  data carries them at −2.

Any other module whose weight carries a group raises ``ValueError`` (its channel axis is unknown).
A module whose output axis is a concatenation (spec segments: a fused ``qkv`` Linear whose rows are
``[q; k; v]``, a norm over ``torch.cat`` of channels) produces each of its segments' groups
(``Producer.offset``: where the group's channels start). A group that no module's output carries
raises ``ValueError`` naming where it acts: its units cannot be observed by a hook (e.g. the Q/K and
V groups of ``nn.MultiheadAttention``, whose ``in_proj`` runs inside the module), so activation
matching and REPAIR cannot treat it; weight matching can.

**Capture** (``hooked``). Forward hooks on the producing modules during ``functional_call``,
removed on exit (also after an exception). ``channel_stats``, ``cross_correlations`` and
``forward_order`` run the inputs in chunks of ``batch_size`` (``range(0, N, batch_size)``) under
``torch.no_grad`` in eval mode (or train mode: ``train=True``), restoring every module's
train/eval flag afterwards.

**Statistics**, float64, on the activations' device:

- ``ChannelStats``: per-channel count, mean and sum of squared deviations M2, chunks merged by the
  parallel update of Chan, Golub & LeVeque (1979): for chunks A, B with ``δ = μ_B − μ_A``,
  ``μ = μ_A + δ n_B / n``, ``M2 = M2_A + M2_B + δ² n_A n_B / n``; population std ``√(M2 / n)``;
- ``CrossMoments``: sums ``Σa, Σb, Σa², Σb², Σ a bᵀ`` of two models' channels on the same inputs,
  and the Pearson correlation matrix ``corr[i, j] = cov(a_i, b_j) / (σ(a_i) σ(b_j) + eps)`` of Git
  Re-Basin's activation matching (§3.1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from . import validate
from .permutation import PermutationSpec
from .train import module_mode

__all__ = [
    "ChannelStats",
    "CrossMoments",
    "Producer",
    "channel_stats",
    "check_inputs",
    "cross_correlations",
    "forward_order",
    "group_producers",
    "hooked",
    "producer_names",
]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_OUT_AXIS1 = _TRANSPOSED + (nn.Embedding,)  # weight [in, out, k...] / [vocab, dim]: output channels on axis 1


def _output_axis(mod: nn.Module) -> int | None:
    """The weight axis holding a layer's output channels (``None``: not a layer, e.g. a norm)."""
    if isinstance(mod, _LAYERS):
        return 0
    if isinstance(mod, _OUT_AXIS1):
        return 1
    return None


_CHANNEL_DIM1_NORMS = (_BatchNorm, nn.GroupNorm, _InstanceNorm)
_TRAILING_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


# ---------------------------------------------------------------------------------------------
# producers


@dataclass(frozen=True)
class Producer:
    """A module whose output channels are the units of ``group``.

    ``dim``: the channel axis of the module's output (``>= 0`` from the front, ``< 0`` from the
    end); ``weight_axis``: the axis of ``<name>.weight`` that carries the group; ``kind``:
    ``"norm"`` or ``"layer"`` (Linear / conv). ``offset``: ``None`` where the group spans the
    channel axis; on a concatenated axis (spec segments) where the group's channels start, and
    ``width`` the axis' full number of channels.
    """

    name: str
    group: str
    dim: int
    weight_axis: int
    kind: str
    offset: int | None = None
    width: int | None = None

    def units(self, m: Tensor, n: int) -> Tensor:
        """The group's ``n`` units of a per-channel matrix ``m`` ``[C, C]`` of the module's output
        channels (``m`` itself unless the channel axis is a concatenation)."""
        if self.offset is None:
            return m
        return m[self.offset : self.offset + n, self.offset : self.offset + n]

    @property
    def weight_key(self) -> str:
        return f"{self.name}.weight" if self.name else "weight"

    def channels(self, out: Tensor) -> Tensor:
        """The output as ``[values, C]``: every example and position a row, the channels columns."""
        if not isinstance(out, Tensor):
            raise TypeError(f"module {self.name!r} returned {type(out).__name__}, not a tensor")
        if not -out.ndim <= self.dim < out.ndim:
            raise ValueError(f"module {self.name!r}: output of shape {tuple(out.shape)} has no channel axis {self.dim}")
        d = self.dim % out.ndim
        if d == out.ndim - 1:
            return out.reshape(-1, out.shape[-1])
        return out.movedim(d, -1).reshape(-1, out.shape[d])


def _channel_dim(mod: nn.Module, name: str, group: str, axis: int, weight_ndim: int) -> tuple[int, str]:
    """(channel axis of ``mod``'s output, kind) for a weight whose axis ``axis`` carries ``group``."""
    out_axis = _output_axis(mod)
    if out_axis is not None:
        if axis != out_axis:
            raise ValueError(
                f"{type(mod).__name__} {name!r}: group {group!r} on weight axis {axis}; its output "
                f"channels are weight axis {out_axis}"
            )
        return (-1 if isinstance(mod, (nn.Linear, nn.Embedding)) else 1 - weight_ndim), "layer"
    if isinstance(mod, _CHANNEL_DIM1_NORMS):
        return 1, "norm"
    if isinstance(mod, _TRAILING_NORMS):
        return axis - weight_ndim, "norm"
    raise ValueError(
        f"cannot tell which axis of the output of {type(mod).__name__} {name!r} carries group {group!r} "
        "(known: Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, Embedding, BatchNorm, GroupNorm, InstanceNorm, "
        "LayerNorm, RMSNorm)"
    )


def group_producers(model: nn.Module, spec: PermutationSpec) -> dict[str, tuple[Producer, ...]]:
    """For each group of ``spec`` (in ``spec.groups`` order), the modules producing its units.

    Read from the spec's axes of every ``<module>.weight`` key (module docstring): the norm layers
    carrying the group where there are any, else the Linear / conv layers whose weight axis 0
    carries it, each in the order of ``spec.axes``; a segmented axis gives one producer per segment
    of a group. Raises ``ValueError`` for a group without a producer (activation statistics cannot
    observe it: use weight matching), a module whose weight carries groups on two axes, or a module
    of unknown channel axis.
    """
    modules = dict(model.named_modules())
    found: dict[str, dict[str, list[Producer]]] = {}
    seen: dict[str, object] = {}
    for k, gs in spec.axes.items():
        if k != "weight" and not k.endswith(".weight"):
            continue
        name = k[: -len("weight")].removesuffix(".")
        mod = modules.get(name)
        if mod is None:  # a shared module under its second name: hooked under its first
            continue
        for axis, e in enumerate(gs):
            out_axis = _output_axis(mod)
            if e is None or (out_axis is not None and axis != out_axis):
                continue  # a layer's input axes belong to the groups it reads
            if name in seen and seen[name] != e:
                raise ValueError(
                    f"module {name!r} carries two permutation groups on its weight ({seen[name]!r}, {e!r}); "
                    "its outputs cannot be read as one group's units"
                )
            seen[name] = e
            dim, kind = _channel_dim(mod, name, e if isinstance(e, str) else str(e), axis, len(gs))
            if isinstance(e, str):
                found.setdefault(e, {}).setdefault(kind, []).append(Producer(name, e, dim, axis, kind))
                continue
            off, width = 0, spec.shapes[k][axis]
            for g, n in e:
                if g is not None:
                    p = Producer(name, g, dim, axis, kind, offset=off, width=width)
                    found.setdefault(g, {}).setdefault(kind, []).append(p)
                off += n
    out = {}
    members = spec.members
    for g in spec.groups:
        kinds = found.get(g, {})
        ps = kinds.get("norm") or kinds.get("layer") or []
        if not ps:
            where = ", ".join(
                f"{k!r} axis {ax}" + ("" if off is None else f" (segment at {off})") for k, ax, off in members[g][:4]
            )
            raise ValueError(
                f"no module produces the units of group {g!r} (no Linear/conv/norm weight carries it on its output "
                f"axis; it acts on {where}): activation statistics cannot observe its units (e.g. the Q/K and V "
                "groups of nn.MultiheadAttention, projected inside the module), so activation matching and REPAIR "
                "cannot align it; use weight matching (reference.matching.weight_matching)"
            )
        out[g] = tuple(ps)
    return out


def producer_names(producers: Mapping[str, Sequence[Producer]]) -> dict[str, Producer]:
    """``{module name: Producer}`` over every group, sorted by name."""
    flat = {p.name: p for ps in producers.values() for p in ps}
    return {n: flat[n] for n in sorted(flat)}


# ---------------------------------------------------------------------------------------------
# capture


@contextmanager
def hooked(model: nn.Module, names: Sequence[str], fn: Callable[[str, Tensor], None]) -> Iterator[None]:
    """Forward hooks calling ``fn(name, output)`` after each call of the modules ``names``; removed on exit.

    The only activation hooks of ``reference/``: every capture goes through here.
    """
    modules = dict(model.named_modules())
    unknown = sorted(n for n in names if n not in modules)
    if unknown:
        raise ValueError(f"no modules named {unknown[:5]} in {type(model).__name__}")
    handles = []
    try:
        for n in names:
            handles.append(modules[n].register_forward_hook(lambda _mod, _inp, out, n=n: fn(n, out)))
        yield
    finally:
        for h in handles:
            h.remove()


def check_inputs(x: Tensor, batch_size: int, least: int = 2, *, model: nn.Module | None = None) -> None:
    """``x`` a floating-point tensor of at least ``least`` examples (an integer one, token ids, when
    ``model`` holds an ``nn.Embedding``); ``batch_size`` an integer >= 1."""
    if not isinstance(x, Tensor):
        raise validate.ArgumentTypeError(f"x must be a floating-point tensor, got {type(x).__name__}")
    tokens = model is not None and any(isinstance(mod, nn.Embedding) for mod in model.modules())
    integer = not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool
    if not (x.is_floating_point() or (tokens and integer)):
        raise validate.ArgumentTypeError(
            f"x must be a floating-point tensor (integer token ids only for a model with nn.Embedding), got "
            f"dtype {x.dtype}"
        )
    if x.ndim < 1 or x.shape[0] < least:
        raise ValueError(f"activation statistics need at least {least} examples, got x of shape {tuple(x.shape)}")
    validate.integer("batch_size", batch_size, 1)


def _call(model: nn.Module, params: Mapping[str, Tensor], extra: Mapping[str, Tensor], xb: Tensor) -> None:
    functional_call(model, {**params, **extra}, (xb,))


def _extra(model: nn.Module, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The model's buffers that ``params`` lacks (non-persistent buffers)."""
    return {k: b for k, b in model.named_buffers() if k not in params}


def _device(params: Mapping[str, Tensor]) -> torch.device | None:
    return next(iter(params.values())).device if params else None


# ---------------------------------------------------------------------------------------------
# statistics


class ChannelStats:
    """Per-channel count, mean and M2 in float64, chunks merged by Chan et al.'s parallel update."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, v: Tensor) -> None:
        """Add the rows of ``v`` ``[values, C]``."""
        v = v.detach().double()
        m = v.shape[0]
        mu = v.mean(0)
        m2 = (v - mu).square().sum(0)
        if self.mean is None:
            self.n, self.mean, self.m2 = m, mu, m2
            return
        tot = self.n + m
        d = mu - self.mean
        self.mean = self.mean + d * (m / tot)
        self.m2 = self.m2 + m2 + d.square() * (self.n * m / tot)
        self.n = tot

    def result(self) -> tuple[Tensor, Tensor]:
        """(mean, population std), float64 on the CPU."""
        if self.mean is None:
            raise ValueError("no activations were added")
        return self.mean.cpu(), (self.m2 / self.n).clamp_min(0).sqrt().cpu()


class CrossMoments:
    """Float64 sums of two models' channels on the same inputs: Σa, Σb, Σa², Σb², Σ a bᵀ."""

    def __init__(self) -> None:
        self.n = 0
        self.sa = self.sb = self.saa = self.sbb = self.sab = None

    def add(self, xa: Tensor, xb: Tensor) -> None:
        """Add paired rows ``xa`` ``[values, C_a]``, ``xb`` ``[values, C_b]``."""
        if xa.shape[0] != xb.shape[0]:
            raise ValueError(f"paired activations differ in rows: {tuple(xa.shape)} vs {tuple(xb.shape)}")
        xa, xb = xa.double(), xb.double()
        vals = (xa.sum(0), xb.sum(0), (xa * xa).sum(0), (xb * xb).sum(0), xa.T @ xb)
        if self.sa is None:
            self.sa, self.sb, self.saa, self.sbb, self.sab = vals
        else:
            self.sa, self.sb, self.saa, self.sbb, self.sab = (
                u + v for u, v in zip((self.sa, self.sb, self.saa, self.sbb, self.sab), vals, strict=True)
            )
        self.n += xa.shape[0]

    def corr(self, eps: float = 1e-8) -> Tensor:
        """Pearson correlations ``[C_a, C_b]`` (population moments; ``eps`` guards constant channels)."""
        if self.sa is None:
            raise ValueError("no activations were added")
        n = self.n
        ma, mb = self.sa / n, self.sb / n
        va = (self.saa / n - ma**2).clamp_min(0)
        vb = (self.sbb / n - mb**2).clamp_min(0)
        cov = self.sab / n - ma[:, None] * mb[None, :]
        return cov / (va.sqrt()[:, None] * vb.sqrt()[None, :] + eps)


def _check_size(p: Producer, v: Tensor, sizes: Mapping[str, int] | None) -> Tensor:
    if p.offset is not None:
        if v.shape[1] != p.width:
            raise ValueError(
                f"module {p.name!r}: its output has {v.shape[1]} channels on axis {p.dim}, the spec's concatenated "
                f"axis has {p.width}"
            )
    elif sizes is not None and v.shape[1] != sizes[p.group]:
        raise ValueError(
            f"module {p.name!r}: its output has {v.shape[1]} channels on axis {p.dim}, group {p.group!r} has "
            f"{sizes[p.group]} units"
        )
    return v


@torch.no_grad()
def channel_stats(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    producers: Sequence[Producer],
    *,
    batch_size: int = 1024,
    train: bool = False,
    sizes: Mapping[str, int] | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """``{name: (mean [C], std [C])}`` of every producer's output channels at ``params`` on ``x``.

    Float64 (``ChannelStats``), on the CPU, over examples and positions; every call of a module
    counts. ``x`` runs in chunks of ``batch_size`` (moved to the parameters' device) in eval mode
    (``train=True``: train mode; parameters are then cloned, so BatchNorm's running statistics of
    ``params`` stay as they were). ``sizes`` (group → units) checks the channel counts.
    """
    by_name = {p.name: p for p in producers}
    acc = {n: ChannelStats() for n in by_name}
    dev = _device(params)
    extra = _extra(model, params)
    if train:
        params = {k: v.clone() for k, v in params.items()}

    def add(n: str, out: Tensor) -> None:
        acc[n].add(_check_size(by_name[n], by_name[n].channels(out), sizes))

    with hooked(model, list(by_name), add), module_mode(model, train):
        for s in range(0, x.shape[0], batch_size):
            _call(model, params, extra, x[s : s + batch_size].to(dev))
    never = sorted(n for n, a in acc.items() if a.mean is None)
    if never:
        raise ValueError(f"producing modules never ran in the forward pass: {never[:5]}")
    return {n: acc[n].result() for n in by_name}


@torch.no_grad()
def cross_correlations(
    model: nn.Module,
    params_a: Mapping[str, Tensor],
    params_b: Mapping[str, Tensor],
    x: Tensor,
    producers: Sequence[Producer],
    *,
    batch_size: int = 1024,
    train: bool = False,
    sizes: Mapping[str, int] | None = None,
) -> dict[str, CrossMoments]:
    """``{name: CrossMoments}`` of every producer's channels, model a against model b, on ``x``.

    Per chunk of ``batch_size`` inputs, model a runs, then model b (parameters cloned: train-mode
    BatchNorm updates stay inside the call); the i-th call of a module in a is paired with its
    i-th call in b. Eval mode unless ``train``.
    """
    by_name = {p.name: p for p in producers}
    moments = {n: CrossMoments() for n in by_name}
    dev = _device(params_a)
    extra = _extra(model, params_a)
    captured: dict[str, list[Tensor]] = {}

    def keep(n: str, out: Tensor) -> None:
        captured.setdefault(n, []).append(_check_size(by_name[n], by_name[n].channels(out), sizes))

    with hooked(model, list(by_name), keep), module_mode(model, train):
        for s in range(0, x.shape[0], batch_size):
            xb = x[s : s + batch_size].to(dev)
            captured.clear()
            _call(model, {k: v.clone() for k, v in params_a.items()}, extra, xb)
            acts_a = dict(captured)
            captured.clear()
            _call(model, {k: v.clone() for k, v in params_b.items()}, extra, xb)
            for n in by_name:
                ua, ub = acts_a.get(n, []), captured.get(n, [])
                if len(ua) != len(ub):
                    raise ValueError(f"module {n!r} ran {len(ua)} times for model a and {len(ub)} for model b")
                for va, vb in zip(ua, ub, strict=True):
                    moments[n].add(va, vb)
    never = sorted(n for n, m in moments.items() if m.n == 0)
    if never:
        raise ValueError(f"producing modules never ran in the forward pass: {never[:5]}")
    return moments


@torch.no_grad()
def forward_order(model: nn.Module, params: Mapping[str, Tensor], names: Sequence[str], x: Tensor) -> list[str]:
    """``names`` in the order their modules run on ``x[:2]`` (eval mode); each must run exactly once."""
    seen: list[str] = []
    with hooked(model, names, lambda n, _out: seen.append(n)), module_mode(model, False):
        _call(model, params, _extra(model, params), x[:2].to(_device(params)))
    twice = sorted({n for n in seen if seen.count(n) > 1})
    never = sorted(set(names) - set(seen))
    if twice or never:
        raise ValueError(f"every producing layer must run once per forward: twice {twice}, never {never}")
    return seen
