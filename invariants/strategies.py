"""Hypothesis strategies for the property suites: architectures, weights, permutations, coefficients.

Everything is *generated*, nothing hand-picked, and kept small so one example runs in milliseconds:

- ``archs()``: an ``Arch(config, input_shape)`` from the zoo of ``reference/models.py``: MLPs (depth
  1–5, uneven widths, with and without biases), VGG-style conv nets (norm None / batch / layer /
  group, ``dims`` 1 and 2, optional max-pools), ResNets (depth 8, base width 2–4, norm batch / layer /
  group / None, ``dims`` 1 and 2) and CNN1D (MNIST-1D's net, ``[B, L]`` or ``[B, C, L]`` inputs).
  GroupNorm groups hold ≥ 2 channels (a one-element group normalises rounding noise).
  ``archs(wide=True)``: the larger sizes of the matching properties.
- ``weights(model, arch, kind, seed)``: a parameter point at a realistic scale: ``"default"`` (PyTorch's
  init), ``"small"`` (×0.1), ``"large"`` (×10, badly scaled), ``"sgd"`` (a few SGD steps on random
  data, "trained-like"), ``"heavy"`` (default init plus heavy-tailed Student-t(2) noise), or
  ``"normal"`` (every entry N(0, 1): weights in general position, no ties, for matching). BatchNorm
  running statistics are never at their initial values: random ``running_mean``, positive
  ``running_var`` (and ``num_batches_tracked`` a random count).
- ``model_cases()``: ``ModelCase(model, params, spec, x, weights)`` with the hand-written spec
  (``reference.specs.spec_for``) or the traced one (``trace_spec``), looked up *at draw time* so a
  mutation test can monkeypatch them.
- ``point_sets()``: ``PointSet(model, points, spec, x)``: 2–5 points of one architecture.
- ``perm_seeds`` / ``permutations(spec)``: ``Permutation.random(spec, seed)``.
- ``coefficients(n, family)``: ``Coeffs(family, values)``, family ``"convex"`` (Dirichlet),
  ``"affine"`` (sum to 1, any sign) or ``"arbitrary"``; ``barycentric(n)``: Dirichlet points;
  ``curve_ts``: t in [0, 1]; ``value_curves()``: a barrier grid and values on it.

Short aliases: ``cases = model_cases``, ``perms = permutations``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call

import reference.specs as specs  # looked up at draw time (mutation tests patch spec_for / trace_spec)
from reference.models import build_model, init_params
from reference.params import Params
from reference.permutation import Permutation, PermutationSpec

__all__ = [
    "ARCH_FAMILIES",
    "COEFF_FAMILIES",
    "WEIGHT_KINDS",
    "Arch",
    "Coeffs",
    "ModelCase",
    "PointSet",
    "ValueCurve",
    "archs",
    "barycentric",
    "build_case",
    "cases",
    "coefficients",
    "curve_ts",
    "dtypes",
    "example_input",
    "model_cases",
    "perm_seeds",
    "permutations",
    "perms",
    "point_sets",
    "seeds",
    "value_curves",
    "weights",
]

ARCH_FAMILIES = ("mlp", "vgg", "resnet", "cnn1d")
NORMS = (None, "batch", "layer", "group")
RESNET_NORMS = (None, "batch", "layer", "group")
WEIGHT_KINDS = ("default", "small", "large", "sgd", "heavy")
COEFF_FAMILIES = ("convex", "affine", "arbitrary")


# ---------------------------------------------------------------------------------------------
# named tuples
# ---------------------------------------------------------------------------------------------
class Arch(NamedTuple):
    """A zoo architecture: ``build_model(config)`` and the shape of one input (no batch dim)."""

    config: dict[str, Any]
    input_shape: tuple[int, ...]

    def build(self) -> nn.Module:
        return build_model(self.config)


class ModelCase(NamedTuple):
    """A model, one parameter point of it, its spec and a batch of inputs."""

    model: nn.Module
    params: Params
    spec: PermutationSpec
    x: Tensor
    weights: str = ""  # how params were drawn, e.g. "sgd(seed=3)"

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    def __repr__(self) -> str:  # hypothesis prints this for a falsifying example
        return (
            f"ModelCase(config={getattr(self.model, 'config', type(self.model).__name__)}, "
            f"weights={self.weights!r}, x={tuple(self.x.shape)} {self.x.dtype}, "
            f"groups={dict(self.spec.sizes)}, blocks={dict(self.spec.blocks)})"
        )


class PointSet(NamedTuple):
    """Several parameter points of one architecture (for combinations, barriers and matching)."""

    model: nn.Module
    points: list[Params]
    spec: PermutationSpec
    x: Tensor
    weights: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return (
            f"PointSet(config={getattr(self.model, 'config', type(self.model).__name__)}, "
            f"n={len(self.points)}, weights={self.weights!r}, x={tuple(self.x.shape)} {self.x.dtype})"
        )


class Coeffs(NamedTuple):
    """Coefficients of a combination Σ kᵢ θᵢ and the family they were drawn from."""

    family: str
    values: tuple[float, ...]


class ValueCurve(NamedTuple):
    """A metric along a path on a grid 0 = t₀ < … < t_{G−1} = 1 (float64)."""

    t: Tensor
    values: Tensor


# ---------------------------------------------------------------------------------------------
# architectures
# ---------------------------------------------------------------------------------------------
@st.composite
def mlp_archs(
    draw: st.DrawFn, max_depth: int = 5, widths: tuple[int, int] = (2, 8), inputs: tuple[int, int] = (3, 6)
) -> Arch:
    """Git Re-Basin's MLP, depth 1–``max_depth``, every width drawn separately (uneven)."""
    depth = draw(st.integers(1, max_depth))
    ws = draw(st.lists(st.integers(*widths), min_size=depth, max_size=depth))
    in_features = draw(st.integers(*inputs))
    return Arch({"name": "mlp", "in_features": in_features, "widths": ws, **_head(draw)}, (in_features,))


def _head(draw: st.DrawFn) -> dict[str, Any]:
    """The class count and whether layers have biases (every zoo classifier takes both)."""
    return {"num_classes": draw(st.integers(2, 4)), "bias": draw(st.booleans())}


def _norm_and_groups(draw: st.DrawFn, norms: Sequence[str | None]) -> tuple[str | None, int]:
    norm = draw(st.sampled_from(list(norms)))
    groups = draw(st.integers(1, 3)) if norm == "group" else 2
    return norm, groups


def _channels(draw: st.DrawFn, n: int, widths: tuple[int, int], norm: str | None, groups: int) -> list[int]:
    """``n`` channel counts in ``widths``; under GroupNorm, multiples of the group count with ≥ 2 channels
    per group (a one-element group normalises rounding noise)."""
    if norm != "group":
        return [draw(st.integers(*widths)) for _ in range(n)]
    lo = max(2, -(-widths[0] // groups))
    hi = max(lo, widths[1] // groups)
    return [groups * draw(st.integers(lo, hi)) for _ in range(n)]


@st.composite
def vgg_archs(
    draw: st.DrawFn, max_convs: int = 3, widths: tuple[int, int] = (2, 5), inputs: tuple[int, int] = (1, 3)
) -> Arch:
    """VGG-style: 1–``max_convs`` conv blocks (widths multiples of the GroupNorm group count), up
    to two ``"M"`` pools, ``dims`` 1 or 2."""
    norm, groups = _norm_and_groups(draw, NORMS)
    dims = draw(st.sampled_from([1, 2]))
    ws = _channels(draw, draw(st.integers(1, max_convs)), widths, norm, groups)
    channels: list[int | str] = []
    pools = 0
    for w in ws:
        channels.append(w)
        if pools < 2 and draw(st.booleans()):
            channels.append("M")
            pools += 1
    size = draw(st.integers(2**pools, 2**pools + 3)) if dims == 2 else draw(st.integers(2**pools, 2**pools + 6))
    in_channels = draw(st.integers(*inputs))
    cfg = {"name": "vgg", "in_channels": in_channels, "channels": channels, "norm": norm, "groups": groups,
           "dims": dims, **_head(draw)}
    return Arch(cfg, (in_channels, *([size] * dims)))


@st.composite
def resnet_archs(draw: st.DrawFn, bases: tuple[int, int] = (2, 4), inputs: tuple[int, int] = (1, 3)) -> Arch:
    """The CIFAR ResNet at depth 8 (one basic block per stage), base width in ``bases``."""
    norm, groups = _norm_and_groups(draw, RESNET_NORMS)
    (base,) = _channels(draw, 1, bases, norm, groups)
    dims = draw(st.sampled_from([1, 2]))
    size = draw(st.integers(4, 8)) if dims == 2 else draw(st.integers(4, 12))
    in_channels = draw(st.integers(*inputs))
    cfg = {"name": "resnet", "in_channels": in_channels, "num_classes": draw(st.integers(2, 4)), "depth": 8,
           "width": 1, "norm": norm, "groups": groups, "dims": dims, "base": base}
    return Arch(cfg, (in_channels, *([size] * dims)))


@st.composite
def cnn1d_archs(
    draw: st.DrawFn,
    max_convs: int = 3,
    widths: tuple[int, int] = (2, 6),
    inputs: tuple[int, int] = (1, 2),
    kernels: Sequence[int] = (1, 3, 5),
) -> Arch:
    """MNIST-1D's CNN: 1–``max_convs`` conv blocks, odd kernel 1–5, 2× pools between blocks."""
    norm, groups = _norm_and_groups(draw, NORMS)
    n = draw(st.integers(1, max_convs))
    channels = _channels(draw, n, widths, norm, groups)
    in_channels = draw(st.integers(*inputs))
    length = draw(st.integers(2 ** (n - 1), 2 ** (n - 1) + 8))
    cfg = {"name": "cnn1d", "in_channels": in_channels, "channels": channels, "norm": norm, "groups": groups,
           "kernel_size": draw(st.sampled_from(list(kernels))), **_head(draw)}
    # one input channel: MNIST-1D's [B, L] layout half of the time
    shape = (length,) if in_channels == 1 and draw(st.booleans()) else (in_channels, length)
    return Arch(cfg, shape)


_ARCH_STRATEGIES = {"mlp": mlp_archs, "vgg": vgg_archs, "resnet": resnet_archs, "cnn1d": cnn1d_archs}


# Wider nets for the matching properties (invariants/props_matching.py): coordinate ascent from the
# identity has no guarantee of reaching the global optimum; on the default 2–8 unit layers with 3–6
# inputs it stops at a local one for ~1 draw in 10. At these sizes the conv families missed 5 of
# 6,000 draws with one group order and none of 8,200 with 3 restarts (measured; module docstring of
# props_matching.py). The wide MLPs serve activation matching.
_WIDE = {
    "mlp": dict(max_depth=4, widths=(6, 10), inputs=(16, 20)),
    "vgg": dict(widths=(6, 10), inputs=(3, 4)),
    "resnet": dict(bases=(4, 6), inputs=(3, 4)),
    "cnn1d": dict(widths=(6, 10), inputs=(3, 4), kernels=(3, 5)),
}


def archs(families: Sequence[str] = ARCH_FAMILIES, wide: bool = False) -> st.SearchStrategy[Arch]:
    """Architectures of the given zoo families (all four by default); ``wide`` for matching."""
    unknown = sorted(set(families) - set(_ARCH_STRATEGIES))
    if unknown:
        raise ValueError(f"unknown architecture families {unknown}; known: {list(_ARCH_STRATEGIES)}")
    return st.one_of([_ARCH_STRATEGIES[f](**(_WIDE[f] if wide else {})) for f in families])


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------
def example_input(arch: Arch, batch: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *arch.input_shape, generator=g, dtype=torch.float64).to(dtype)


def _student_t2(shape: torch.Size, g: torch.Generator) -> Tensor:
    """Student-t with 2 degrees of freedom: z / sqrt(χ²₂ / 2), χ²₂ = −2 log U (heavy tails)."""
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    u = torch.rand(shape, generator=g, dtype=torch.float64).clamp_min(1e-12)
    return z / torch.sqrt(-torch.log(u))


def _sgd_steps(model: nn.Module, params: Params, arch: Arch, g: torch.Generator, steps: int = 3) -> Params:
    """A few SGD steps on random data and labels in train mode (BatchNorm statistics move too)."""
    num_classes = arch.config["num_classes"]
    trainable = {n for n, _ in model.named_parameters()}
    p = {
        k: (v.detach().clone().requires_grad_(k in trainable) if v.is_floating_point() else v.clone())
        for k, v in params.items()
    }
    model.train()
    for _ in range(steps):
        x = torch.randn(8, *arch.input_shape, generator=g)
        y = torch.randint(0, num_classes, (8,), generator=g)
        loss = F.cross_entropy(functional_call(model, p, (x,)), y)
        grads = torch.autograd.grad(loss, [p[k] for k in sorted(trainable)])
        with torch.no_grad():
            for k, gr in zip(sorted(trainable), grads, strict=True):
                p[k] = (p[k] - 0.1 * gr).requires_grad_(True)
    return {k: v.detach() for k, v in p.items()}


def weights(model: nn.Module, arch: Arch, kind: str, seed: int) -> Params:
    """A parameter point of ``model`` of the given ``kind`` (see the module docstring), float32.

    BatchNorm buffers are always moved off their initial values: ``running_mean`` ~ N(0, 0.5²),
    ``running_var`` = exp(N(0, 0.5²)) > 0, ``num_batches_tracked`` a random count.
    """
    if kind not in (*WEIGHT_KINDS, "normal"):
        raise ValueError(f"unknown weight kind {kind!r}")
    g = torch.Generator().manual_seed(seed)
    p = init_params(model, seed)
    trainable = {n for n, _ in model.named_parameters()}
    if kind == "small":
        p = {k: v * 0.1 if k in trainable else v for k, v in p.items()}
    elif kind == "large":
        p = {k: v * 10.0 if k in trainable else v for k, v in p.items()}
    elif kind == "heavy":
        p = {
            k: (v + 0.3 * (v.std() if v.numel() > 1 else v.abs()).clamp_min(0.05) * _student_t2(v.shape, g).float())
            if k in trainable
            else v
            for k, v in p.items()
        }
    elif kind == "sgd":
        p = _sgd_steps(model, p, arch, g)
    elif kind == "normal":  # running_var must stay positive: |N(0, 1)| + 0.5
        p = {
            k: (
                torch.randn(v.shape, generator=g).abs() + 0.5
                if k.endswith("running_var")
                else torch.randn(v.shape, generator=g)
            )
            if v.is_floating_point()
            else v
            for k, v in p.items()
        }
    out: Params = {}
    for k, v in p.items():
        if k.endswith("running_mean"):
            out[k] = v + 0.5 * torch.randn(v.shape, generator=g)
        elif k.endswith("running_var"):
            out[k] = v * torch.exp(0.5 * torch.randn(v.shape, generator=g))
        elif k.endswith("num_batches_tracked"):
            out[k] = torch.randint(1, 1000, v.shape, generator=g, dtype=v.dtype)
        else:
            out[k] = v.detach().clone()
    return out


def _spec(model: nn.Module, x: Tensor, spec_kind: str) -> PermutationSpec:
    if spec_kind == "hand":
        return specs.spec_for(model)
    if spec_kind == "traced":
        return specs.trace_spec(model, x[:2].float())
    raise ValueError(f"unknown spec kind {spec_kind!r}; use 'hand' or 'traced'")


def build_case(
    arch: Arch,
    kind: str,
    seed: int,
    dtype: torch.dtype = torch.float64,
    batch: int = 4,
    spec_kind: str = "hand",
    device: str | torch.device = "cpu",
) -> ModelCase:
    """A ``ModelCase`` from explicit choices (the strategies draw these)."""
    model = arch.build()
    params = weights(model, arch, kind, seed)
    x = example_input(arch, batch, seed + 1)
    spec = _spec(model, x, spec_kind)
    model.to(device)
    params = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in params.items()}
    return ModelCase(model, params, spec, x.to(device=device, dtype=dtype), f"{kind}(seed={seed})")


seeds = st.integers(0, 2**31 - 1)
perm_seeds = st.integers(0, 2**31 - 1)
dtypes = st.sampled_from([torch.float32, torch.float64])


@st.composite
def model_cases(
    draw: st.DrawFn,
    families: Sequence[str] = ARCH_FAMILIES,
    kinds: Sequence[str] = WEIGHT_KINDS,
    dtype: st.SearchStrategy[torch.dtype] | torch.dtype = torch.float64,
    spec_kind: str = "hand",
    device: str | torch.device = "cpu",
) -> ModelCase:
    """``ModelCase(model, params, spec, x)`` over generated architectures and weight kinds."""
    arch = draw(archs(families))
    kind = draw(st.sampled_from(list(kinds)))
    dt = draw(dtype) if isinstance(dtype, st.SearchStrategy) else dtype
    batch = draw(st.integers(2, 5))
    return build_case(arch, kind, draw(seeds), dt, batch, spec_kind, device)


@st.composite
def point_sets(
    draw: st.DrawFn,
    n: int | st.SearchStrategy[int] = 2,
    families: Sequence[str] = ARCH_FAMILIES,
    kinds: Sequence[str] = WEIGHT_KINDS,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
) -> PointSet:
    """``n`` independently drawn parameter points of one generated architecture."""
    arch = draw(archs(families))
    k = draw(n) if isinstance(n, st.SearchStrategy) else n
    model = arch.build()
    points, labels = [], []
    for _ in range(k):
        kind = draw(st.sampled_from(list(kinds)))
        seed = draw(seeds)
        p = weights(model, arch, kind, seed)
        points.append({kk: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for kk, v in p.items()})
        labels.append(f"{kind}(seed={seed})")
    x = example_input(arch, draw(st.integers(2, 5)), draw(seeds))
    spec = specs.spec_for(model)
    model.to(device)
    return PointSet(model, points, spec, x.to(device=device, dtype=dtype), tuple(labels))


@st.composite
def permutations(draw: st.DrawFn, spec: PermutationSpec) -> Permutation:
    return Permutation.random(spec, draw(perm_seeds))


cases = model_cases
perms = permutations


# ---------------------------------------------------------------------------------------------
# coefficients, barycentric points, curve parameters, value curves
# ---------------------------------------------------------------------------------------------
def _dirichlet(alpha: Sequence[float], seed: int) -> tuple[float, ...]:
    """A Dirichlet(α) sample with ``torch.distributions.Dirichlet`` under a private seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lam = torch.distributions.Dirichlet(torch.tensor(alpha, dtype=torch.float64)).sample()
    lam = lam.clamp_min(0.0)
    lam = lam / lam.sum()
    return tuple(float(v) for v in lam)


@st.composite
def barycentric(draw: st.DrawFn, n: int) -> tuple[float, ...]:
    """A point of the (n−1)-simplex: Dirichlet(α), α drawn in [0.2, 5] (corners to centre)."""
    alpha = draw(st.lists(st.floats(0.2, 5.0), min_size=n, max_size=n))
    return _dirichlet(alpha, draw(seeds))


_coef = st.floats(-3.0, 3.0, allow_nan=False, allow_infinity=False)


@st.composite
def coefficients(draw: st.DrawFn, n: int, family: str | Sequence[str] = COEFF_FAMILIES) -> Coeffs:
    """``Coeffs(family, k)`` with ``len(k) == n``: convex (Dirichlet), affine (Σk = 1) or arbitrary."""
    fam = family if isinstance(family, str) else draw(st.sampled_from(list(family)))
    if fam == "convex":
        return Coeffs(fam, draw(barycentric(n)))
    if fam == "affine":
        head = draw(st.lists(_coef, min_size=n - 1, max_size=n - 1))
        return Coeffs(fam, (*head, 1.0 - math.fsum(head)))
    if fam == "arbitrary":
        return Coeffs(fam, tuple(draw(st.lists(_coef, min_size=n, max_size=n))))
    raise ValueError(f"unknown coefficient family {fam!r}; known: {COEFF_FAMILIES}")


curve_ts = st.floats(0.0, 1.0, allow_nan=False)


@st.composite
def value_curves(draw: st.DrawFn, max_points: int = 25) -> ValueCurve:
    """A strictly increasing grid from 0 to 1 (uniform, or dyadic non-uniform) and finite values."""
    g = draw(st.integers(2, max_points))
    if draw(st.booleans()):
        t = torch.linspace(0, 1, g, dtype=torch.float64)
    else:
        # dyadic points k / 1024: exact in float64, so 1 − t is exact too (reversed grids)
        inner = draw(st.lists(st.integers(1, 1023), min_size=g - 2, max_size=g - 2, unique=True))
        t = torch.tensor([0.0, *(k / 1024 for k in sorted(inner)), 1.0], dtype=torch.float64)
    vals = draw(st.lists(st.floats(-10.0, 10.0), min_size=len(t), max_size=len(t)))
    return ValueCurve(t, torch.tensor(vals, dtype=torch.float64))
