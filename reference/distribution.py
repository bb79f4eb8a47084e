"""Distribution-based low-loss connectors of Anokhin & Yarotsky 2020 (ICML; arXiv 2008.00741), dense ReLU nets.

The network is read from its ``PermutationSpec`` (``dense_chain``; for a ``reference.models.MLP`` point
given as bare params, the spec of ``reference.specs.spec_for(MLP(...))``): a chain of D affine layers
``(W_ℓ, b_ℓ)``, ``h_{ℓ+1} = relu(W_ℓ h_ℓ + b_ℓ)`` and logits ``W_{D-1} h_{D-1} + b_{D-1}``, whose hidden
units form the spec's permutation groups: group ℓ (``DenseChain.groups[ℓ]``, ``P_ℓ`` for the MLP) is
written by layer ℓ (the out-axis of ``W_ℓ`` and ``b_ℓ``) and read by layer ℓ + 1 (the in-axis of
``W_{ℓ+1}``). The units of group ℓ are *samples* of a distribution: each is its slice of every tensor the
group acts on (``unit_samples``; row i of ``[W_ℓ | b_ℓ | W_{ℓ+1}ᵀ]``). Specs the connectors cannot
read this way are refused with a ``ValueError`` naming the key or group: residual streams (a group
written by several layers), branches, convolutions, normalisation layers and buffers.

A connector proposes points between the endpoints θ¹ and θ² and joins consecutive points by one of two
curves of the paper (``connect``):

- Eq. (5), ``lin``: s(t) = (1 − t) s¹ + t s²;
- Eq. (6), ``arc``: s(t) = m + cos(πt/2) (s¹ − m) + sin(πt/2) (s² − m), with m the mean of the pooled
  samples of both endpoints (the authors' code subtracts it): for i.i.d. samples the arc keeps the
  second moments about m, where the line shrinks them by (1 − t)² + t² (½ at t = ½).

Point finders (the names of the paper's Tables 1 and 2; ``METHODS``). For a one-hidden-layer network
(D = 2, Table 1) the stepwise procedures reduce to the paper's one-layer methods:

- ``Linear``: the straight line θ¹ → θ² (Eq. 5 on every tensor); one segment.
- ``Arc``: Eq. (6) on every hidden group with its units as samples on the layer writing it (rows of
  ``[W_ℓ | b_ℓ]``), on the head's weight with the last group's units as samples (its columns) and on
  the head bias (one sample per endpoint, m = the midpoint). For D = 2 this is the paper's one-layer Arc
  (samples ``[a_n, b_n, c_n]``); for D > 2 the authors' code arcs the head over its rows (classes) instead.
- ``Linear + WA`` / ``Arc + WA`` (weight adjustment, stepwise; D segments). ``adjust_layer`` re-solves
  a layer by least squares on the fitting inputs x so that it reads other features and keeps its
  outputs. Segment ℓ < D − 1 moves group ℓ's units: it starts at (θ²_0..θ²_{ℓ-1}, adj_ℓ, θ¹_{ℓ+1}, …)
  (adj_0 = θ¹_0), moves layer ℓ (the writer of group ℓ) from adj_ℓ to θ²_ℓ (Eq. 5 / 6) and re-solves
  layer ℓ + 1 (its reader) at every t, so that the network's output on x stays that of the segment's
  start (≈ θ¹'s); it ends with layer ℓ + 1 = adj_{ℓ+1}, the re-solved θ¹_{ℓ+1} reading θ²'s units of
  group ℓ. The last segment moves the head from adj_{D-1} to θ²'s.
  (The authors' code fits every re-solved layer to θ¹'s own pre-activations, which leaves the path
  discontinuous at segment ends where the fit is inexact, fits ``W`` only and takes the minimum-norm
  solution; we fit to the segment start's pre-activations, ``[W | b]`` jointly on ``[h, 1]``, with the
  solution closest to the layer being re-solved, so the path is continuous.)
- ``Linear + B-fly`` / ``Arc + B-fly`` (stepwise "butterfly"; D − 1 segments): adjusted layers
  adj_k = WA(θ¹_k: h¹_k → h²_k), computed once (adj_0 = θ¹_0, adj_{D-1} = θ²_{D-1}); segment ℓ moves
  group ℓ's units on both sides at the same time: its writer, layer ℓ, from adj_ℓ to θ²_ℓ (units as
  rows) and its reader, layer ℓ + 1, from θ¹_{ℓ+1} to adj_{ℓ+1} (units as columns), with no re-solving
  along t.
- ``OT`` (= ``OT + B-fly``) and ``OT + WA``: before the butterfly / WA path, the units of θ²'s group ℓ
  are paired with θ¹'s, group after group, by optimal transport between the two empirical distributions
  of unit samples (squared Euclidean cost, uniform weights; ``ot_pairing``). Each pairing is a
  ``Permutation`` of the spec moving that group alone, applied to θ² with ``Permutation.apply`` (every
  tensor the group touches is reindexed: a function-preserving relabelling); their composition is
  ``ConnectionPath.permutation`` (``ot_permutation``). The path then uses Eq. (5) and ends at
  P(θ²), which computes the same function as θ². For D = 2, ``OT`` pairs ``[a_n, b_n, c_n]`` (Table 1's
  OT) and ``OT + WA`` pairs the incoming ``[a_n, b_n]``. (The authors' stepwise code permutes inside each
  segment, so its path jumps between equivalent networks at segment ends; aligning θ² first gives the
  same points up to those relabellings and a continuous path.)

WA ensembling (paper §6, ``wa_ensemble``): members share the first D − n layers of a base network, up
to hidden group D − n − 1; member j keeps its own last n layers, the first of which (the reader of that
group) is weight-adjusted to read the base's units.

Everything is computed in float64 and returned in the endpoints' dtype and device; inputs are never
modified.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .models import MLP
from .params import Params, stack
from .permutation import Permutation, PermutationSpec
from .specs import spec_for
from .validate import ArgumentTypeError, choice, integer

__all__ = [
    "CONNECT",
    "METHODS",
    "Layer",
    "DenseChain",
    "dense_chain",
    "ConnectionPath",
    "hidden_features",
    "forward_layers",
    "lin_connect",
    "arc_connect",
    "connect",
    "unit_samples",
    "ot_pairing",
    "adjust_layer",
    "ot_permutation",
    "connection_path",
    "wa_ensemble",
]

Layer = tuple[Tensor, Tensor | None]
"""One affine layer: weight ``[out, in]`` and bias ``[out]`` (or ``None``)."""

CONNECT = ("lin", "arc")

# table name -> (procedure, curve); "OT" is the one-layer name of "OT + B-fly" (identical for D = 2)
METHODS: dict[str, tuple[str, str]] = {
    "Linear": ("straight", "lin"),
    "Arc": ("simultaneous", "arc"),
    "Linear + B-fly": ("butterfly", "lin"),
    "Arc + B-fly": ("butterfly", "arc"),
    "Linear + WA": ("wa", "lin"),
    "Arc + WA": ("wa", "arc"),
    "OT": ("ot_butterfly", "lin"),
    "OT + B-fly": ("ot_butterfly", "lin"),
    "OT + WA": ("ot_wa", "lin"),
}

_UNSUPPORTED = "the distribution connectors take chains of dense layers with ReLU between them"


# ---------------------------------------------------------------------------------------------
# the network as a chain of dense layers, read from its PermutationSpec
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DenseChain:
    """A dense ReLU network as its ``spec`` describes it: layer ℓ is ``(weights[ℓ], biases[ℓ])`` (input
    layer first, head last; a bias key is ``None`` for a bias-free layer), and hidden group ℓ,
    ``groups[ℓ]``, holds the units layer ℓ writes (out-axis of its weight, its bias) and layer ℓ + 1
    reads (in-axis of its weight). Built (and validated) by ``dense_chain``.
    """

    spec: PermutationSpec
    weights: tuple[str, ...]
    biases: tuple[str | None, ...]
    groups: tuple[str, ...]

    @property
    def depth(self) -> int:
        """D, the number of affine layers (hidden groups + 1)."""
        return len(self.weights)

    def layer_keys(self, ell: int) -> tuple[str, ...]:
        """The keys of layer ℓ (weight, then bias if any)."""
        b = self.biases[ell]
        return (self.weights[ell],) if b is None else (self.weights[ell], b)

    def layers(self, params: Mapping[str, Tensor], what: str = "params") -> list[Layer]:
        """``[(W_0, b_0), …, (W_{D-1}, b_{D-1})]`` of ``params`` (a point of ``spec``; no copies)."""
        _check_point(params, what)
        try:
            self.spec.check_params(params)
        except ValueError as e:
            raise ValueError(f"{what} do not fit the spec: {e}") from e
        return [(params[w], None if b is None else params[b]) for w, b in zip(self.weights, self.biases, strict=True)]

    def as_params(self, layers: Sequence[Layer]) -> Params:
        """The point ``{key: tensor}`` of ``layers`` (the inverse of ``layers``; no copies, no casts)."""
        if len(layers) != self.depth:
            raise ValueError(f"{len(layers)} layers given, the chain has {self.depth}")
        out: Params = {}
        for ell, (W, b) in enumerate(layers):
            out[self.weights[ell]] = W
            key = self.biases[ell]
            if key is not None:
                if b is None:
                    raise ValueError(f"layer {ell} has no bias, the spec has {key!r}")
                out[key] = b
        return out

    def to_params(self, layers: Sequence[Layer], like: Mapping[str, Tensor]) -> Params:
        """``as_params(layers)`` under the keys of ``like``, cast to ``like``'s dtypes and devices."""
        out = self.as_params(layers)
        for k, v in out.items():
            if v.shape != like[k].shape:
                raise ValueError(f"{k} has shape {tuple(v.shape)}, expected {tuple(like[k].shape)}")
        return {k: out[k].to(dtype=like[k].dtype, device=like[k].device) for k in like}

    def permutation(self, ell: int, perm: Tensor) -> Permutation:
        """The ``Permutation`` of the spec that relabels group ℓ's units by ``perm`` (new unit i = old
        unit ``perm[i]``) and leaves every other group alone."""
        if not 0 <= ell < len(self.groups):
            raise ValueError(f"hidden group index {ell} out of range 0..{len(self.groups) - 1}")
        p = {g: torch.arange(n) for g, n in self.spec.sizes.items()}
        p[self.groups[ell]] = torch.as_tensor(perm).cpu()
        return Permutation(p, self.spec)


def dense_chain(spec: PermutationSpec) -> DenseChain:
    """Read ``spec`` as a chain of dense layers, or raise ``ValueError`` saying why it is not one.

    Accepted: 2-D weights ``[out, in]`` with groups ``(out, in)``, each with an optional 1-D bias
    ``<prefix>.bias`` of its ``<prefix>.weight`` acting on its out group; exactly one layer reads the
    input (in-axis not permuted), every group is written by one layer and read by the next one, and the
    last layer (the head) writes the output (out-axis not permuted). Refused: a group written by several
    layers (a residual stream: outputs added together), read by several (a branch), convolutions, and
    any other key (normalisation layers, buffers). The spec says which tensors touch which units, not
    which nonlinearity the model applies: ReLU between the layers is assumed (as in ``MLP``).
    """
    if not isinstance(spec, PermutationSpec):
        raise ArgumentTypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    axes, shapes = spec.axes, spec.shapes
    segmented = [k for k, gs in axes.items() if any(isinstance(g, tuple) for g in gs)]
    if segmented or spec.heads:
        what = f"concatenated (segmented) axes in {segmented[:3]}" if segmented else "attention head classes"
        raise ValueError(f"the spec has {what}; {_UNSUPPORTED}, whose every axis one group permutes")
    writers: dict[str, list[str]] = {}
    readers: dict[str, list[str]] = {}
    for k, gs in axes.items():
        if len(gs) >= 2:
            if gs[0] is not None:
                writers.setdefault(gs[0], []).append(k)
            for g in gs[1:]:
                if g is not None:
                    readers.setdefault(g, []).append(k)
    for g, ks in writers.items():
        if len(ks) > 1:
            raise ValueError(f"group {g!r} is written by several layers {ks}: a residual stream (their outputs "
                             f"are added); {_UNSUPPORTED}, whose every hidden group one layer writes")
    for g, ks in readers.items():
        if len(ks) > 1:
            raise ValueError(f"group {g!r} is read by several tensors {ks} (a branch, or a group on several axes); "
                             f"{_UNSUPPORTED}")
    layer_keys = [k for k, s in shapes.items() if len(s) >= 2]
    for k in layer_keys:
        if len(shapes[k]) != 2:
            raise ValueError(f"key {k!r} has shape {shapes[k]}: a convolution; {_UNSUPPORTED} (weights [out, in])")
    bias_of: dict[str, str] = {}
    for k, s in shapes.items():
        if len(s) >= 2:
            continue
        w = k[: -len("bias")] + "weight" if k.endswith(".bias") else None
        if len(s) != 1 or w not in layer_keys or axes[k][0] != axes[w][0]:
            raise ValueError(f"key {k!r} (shape {s}) is not the bias of a dense layer: {_UNSUPPORTED} "
                             f"(no normalisation layers or buffers)")
        bias_of[w] = k
    inputs = [k for k in layer_keys if axes[k][1] is None]
    if len(inputs) != 1:
        raise ValueError(f"expected exactly one layer reading the input (in-axis not permuted), got {inputs}")
    order, groups = [inputs[0]], []
    while (g := axes[order[-1]][0]) is not None:
        nxt = readers.get(g)
        if not nxt:
            raise ValueError(f"group {g!r} is written by {order[-1]!r} and read by no layer; {_UNSUPPORTED}")
        if nxt[0] in order:
            raise ValueError(f"group {g!r} is read by {nxt[0]!r}, which comes before it: a cycle")
        groups.append(g)
        order.append(nxt[0])
    off = [k for k in layer_keys if k not in order]
    if off:
        raise ValueError(f"layers {off} are not on the chain from the input to the output {order}; {_UNSUPPORTED}")
    return DenseChain(spec, tuple(order), tuple(bias_of.get(w) for w in order), tuple(groups))


_HIDDEN = re.compile(r"^layers\.(\d+)\.weight$")


def _check_point(params: Mapping[str, Tensor], what: str) -> None:
    if not isinstance(params, Mapping):
        raise ArgumentTypeError(f"{what} must be a mapping of tensors, got {type(params).__name__}")
    for k, v in params.items():
        if not isinstance(v, Tensor):
            raise ArgumentTypeError(f"{what}[{k!r}] must be a Tensor, got {type(v).__name__}")


def _mlp_spec(params: Mapping[str, Tensor], what: str) -> PermutationSpec:
    """``spec_for`` of the zoo ``MLP`` whose point ``params`` is (widths, bias and norm read from the keys;
    the model is built on the meta device: no memory, no random draws)."""
    _check_point(params, what)
    hint = "pass spec= (e.g. reference.specs.spec_for(model)) for another model"
    hidden = sorted(int(m.group(1)) for k in params if (m := _HIDDEN.match(k)))
    if "head.weight" not in params:
        raise ValueError(f"{what} have no 'head.weight': not a point of a zoo MLP; {hint}")
    if hidden != list(range(len(hidden))):
        raise ValueError(f"{what}: hidden layer indices must be 0..n-1, got {hidden}")
    weights = [params[f"layers.{i}.weight"] for i in hidden] + [params["head.weight"]]
    for k, W in zip([f"layers.{i}.weight" for i in hidden] + ["head.weight"], weights, strict=True):
        if W.ndim != 2:
            raise ValueError(f"{what}[{k!r}] must be 2-D, got shape {tuple(W.shape)}")
    with torch.device("meta"):
        model = MLP(weights[0].shape[1], [W.shape[0] for W in weights[:-1]], weights[-1].shape[0],
                    bias="head.bias" in params, norm="layer" if any(k.startswith("norms.") for k in params) else None)
    spec = spec_for(model)
    try:
        spec.check_params(params)
    except ValueError as e:
        raise ValueError(f"{what} are not a point of a zoo MLP ({e}); {hint}") from e
    return spec


def _f64(params: Mapping[str, Tensor]) -> Params:
    return {k: v.detach().double() for k, v in params.items()}


def _affine(layer: Layer, h: Tensor) -> Tensor:
    W, b = layer
    z = h @ W.T
    return z if b is None else z + b


def hidden_features(layers: Sequence[Layer], x: Tensor) -> list[Tensor]:
    """``[h_0 = x (flattened), h_1, …, h_{D-1}]``: the input and the post-ReLU units of every hidden group
    (``layers`` as ``DenseChain.layers`` reads them)."""
    h = x.reshape(x.shape[0], -1).to(layers[0][0].dtype)
    if h.shape[1] != layers[0][0].shape[1]:
        raise ValueError(f"inputs have {h.shape[1]} features, the first layer takes {layers[0][0].shape[1]}")
    feats = [h]
    for layer in layers[:-1]:
        h = torch.relu(_affine(layer, h))
        feats.append(h)
    return feats


def forward_layers(layers: Sequence[Layer], x: Tensor) -> Tensor:
    """Logits of the dense ReLU network ``layers`` on ``x``."""
    return _affine(layers[-1], hidden_features(layers, x)[-1])


# ---------------------------------------------------------------------------------------------
# Eq. (5) and Eq. (6)
# ---------------------------------------------------------------------------------------------
def _times(t: Tensor | Sequence[float] | float, like: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=like.dtype if like.is_floating_point() else torch.float64, device=like.device)
    if t.ndim > 1:
        raise ValueError(f"t must be a scalar or 1-D, got shape {tuple(t.shape)}")
    t = t.reshape(-1)
    if t.numel() and (bool((t < 0).any()) or bool((t > 1).any())):
        raise ValueError(f"connection times must lie in [0, 1], got min {float(t.min())}, max {float(t.max())}")
    return t


def _check_pair(s1: Tensor, s2: Tensor) -> None:
    if not isinstance(s1, Tensor) or not isinstance(s2, Tensor):
        raise ArgumentTypeError("samples must be tensors")
    if s1.shape != s2.shape:
        raise ValueError(f"sample sets have different shapes {tuple(s1.shape)} and {tuple(s2.shape)}")


def lin_connect(s1: Tensor, s2: Tensor, t: Tensor | Sequence[float] | float) -> Tensor:
    """Eq. (5) of Anokhin & Yarotsky 2020: s(t) = (1 − t) s¹ + t s²; returns ``[T, *s.shape]``."""
    _check_pair(s1, s2)
    t = _times(t, s1).view(-1, *([1] * s1.ndim))
    return (1 - t) * s1 + t * s2


def arc_connect(s1: Tensor, s2: Tensor, t: Tensor | Sequence[float] | float, sample_dim: int | None = 0) -> Tensor:
    """Eq. (6) of Anokhin & Yarotsky 2020: s(t) = m + cos(πt/2)(s¹ − m) + sin(πt/2)(s² − m).

    ``sample_dim``: the dimension indexing samples (rows of a weight matrix: 0); m is the mean over
    the samples of both endpoints pooled. ``None``: each endpoint is one sample, m = (s¹ + s²)/2.
    Returns ``[T, *s.shape]``; s(0) = s¹ and s(1) = s² (cos(π/2) is set to exactly 0).
    """
    _check_pair(s1, s2)
    if sample_dim is None:
        m = 0.5 * (s1 + s2)
    else:
        if not -s1.ndim <= sample_dim < s1.ndim:
            raise ValueError(f"sample_dim {sample_dim} out of range for samples of shape {tuple(s1.shape)}")
        m = torch.cat([s1, s2], dim=sample_dim).mean(dim=sample_dim, keepdim=True)
    t = _times(t, s1)
    a = torch.cos(0.5 * math.pi * t)
    a = torch.where(t == 1, torch.zeros_like(a), a)
    b = torch.sin(0.5 * math.pi * t)
    shape = (-1, *([1] * s1.ndim))
    return m + a.view(shape) * (s1 - m) + b.view(shape) * (s2 - m)


def connect(s1: Tensor, s2: Tensor, t: Tensor | Sequence[float] | float, method: str,
            sample_dim: int | None = 0) -> Tensor:
    """``lin_connect`` (Eq. 5) or ``arc_connect`` (Eq. 6) by name."""
    choice("connection", method, CONNECT)
    if method == "lin":
        return lin_connect(s1, s2, t)
    return arc_connect(s1, s2, t, sample_dim)


def _rows(l1: Layer, l2: Layer, t: Tensor, method: str) -> list[Layer]:
    """Connect the layer writing a group, the group's units as samples: rows of ``[W | b]``."""
    (W1, b1), (W2, b2) = l1, l2
    if (b1 is None) != (b2 is None):
        raise ValueError("one layer has a bias and the other has none")
    if b1 is None:
        return [(W, None) for W in connect(W1, W2, t, method, 0)]
    s = connect(torch.cat([W1, b1[:, None]], 1), torch.cat([W2, b2[:, None]], 1), t, method, 0)
    return [(si[:, :-1], si[:, -1]) for si in s]


def _cols(l1: Layer, l2: Layer, t: Tensor, method: str) -> list[Layer]:
    """Connect the layer reading a group, the group's units as samples (columns of W); its bias as one sample."""
    (W1, b1), (W2, b2) = l1, l2
    if (b1 is None) != (b2 is None):
        raise ValueError("one layer has a bias and the other has none")
    Ws = connect(W1, W2, t, method, 1)
    bs = [None] * len(Ws) if b1 is None else list(connect(b1, b2, t, method, None))
    return list(zip(Ws, bs, strict=True))


# ---------------------------------------------------------------------------------------------
# unit samples, optimal transport, weight adjustment
# ---------------------------------------------------------------------------------------------
def unit_samples(spec: PermutationSpec, group: str, params: Mapping[str, Tensor], incoming: bool = False) -> Tensor:
    """The units of ``group`` as samples ``[n, d]``: row i is unit i's slice of every tensor the group acts
    on (``spec.groups[group]``, in key order; the group's axis first, the rest flattened).

    For a dense layer ℓ writing the group this is row i of ``[W_ℓ | b_ℓ | W_{ℓ+1}ᵀ]``, Table 1's
    ``[a_n, b_n, c_n]``; ``incoming=True`` keeps the tensors the group indexes on their first axis (the
    writer's weight rows and bias), ``[a_n, b_n]``.
    """
    if group not in spec.sizes:
        raise ValueError(f"unknown group {group!r}; the spec has {sorted(spec.sizes)}")
    n = spec.sizes[group]
    parts = [params[k].movedim(ax, 0).reshape(n, -1) for k, ax in spec.groups[group] if not incoming or ax == 0]
    return torch.cat(parts, 1)


def ot_pairing(s1: Tensor, s2: Tensor) -> Tensor:
    """Optimal-transport pairing of two equal-size empirical distributions with uniform weights.

    Solves min_P Σ_ij P_ij ‖s¹_i − s²_j‖² over couplings with uniform marginals (the Kantorovich
    problem; ``ot.emd`` when POT is installed); with equal sizes an optimal coupling is a permutation
    (Birkhoff–von Neumann), found exactly by ``scipy.optimize.linear_sum_assignment`` otherwise.
    Returns ``perm`` (LongTensor) with sample i of s¹ paired to sample ``perm[i]`` of s²
    (``s2[perm]`` is s² reordered to match s¹).
    """
    _check_pair(s1, s2)
    if s1.ndim != 2:
        raise ValueError(f"samples must be 2-D [n, d], got shape {tuple(s1.shape)}")
    a, b = s1.detach().double().cpu(), s2.detach().double().cpu()
    cost = torch.cdist(a, b).pow(2).numpy()
    try:  # POT, as in the authors' code
        import numpy as np
        import ot  # type: ignore[import-not-found]

        n = cost.shape[0]
        w = np.full(n, 1.0 / n)
        G = ot.emd(w, w, cost / max(float(cost.max()), 1e-300))
        perm = np.argmax(G, axis=1)
        if len(set(perm.tolist())) != n:  # a degenerate (non-permutation) vertex: fall back
            raise ImportError
    except ImportError:
        from scipy.optimize import linear_sum_assignment

        _, perm = linear_sum_assignment(cost)
    return torch.as_tensor(perm, dtype=torch.long, device=s1.device)


def adjust_layer(layer: Layer, f_from: Tensor, f_to: Tensor) -> Layer:
    """Weight adjustment (WA): re-solve ``layer`` to read features ``f_to`` instead of ``f_from``.

    Least squares over the N rows of the features: (W̃, b̃) = argmin ‖W̃ f_to + b̃ − (W f_from + b)‖²_F
    (``[f_to, 1]`` augmented for the bias; bias-free layers fit ``W`` alone). Of the solutions we take
    the one closest to the layer itself, Z = Z₀ + F⁺ (T − F Z₀) with F = ``[f_to, 1]``, Z₀ = ``[W | b]ᵀ``
    and T the target pre-activations (the authors' code takes the minimum-norm F⁺ T; the two differ only
    in directions that no fitting input sees). So f_to = f_from returns the layer unchanged, and the
    layer's outputs on these inputs are reproduced exactly whenever the system is solvable (e.g. F of
    full row rank), in the least-squares sense otherwise.
    """
    W, b = layer
    if f_from.ndim != 2 or f_to.ndim != 2 or f_from.shape[0] != f_to.shape[0]:
        raise ValueError(f"features must be [N, h] with equal N, got {tuple(f_from.shape)} and {tuple(f_to.shape)}")
    if f_from.shape[1] != W.shape[1] or f_to.shape[1] != W.shape[1]:
        raise ValueError(f"features have {f_from.shape[1]} and {f_to.shape[1]} columns, the layer takes {W.shape[1]}")
    Wd = W.double()
    bd = None if b is None else b.double()
    target = _affine((Wd, bd), f_from.double())
    F = f_to.double()
    Z0 = Wd.T
    if bd is not None:
        F = torch.cat([F, torch.ones(F.shape[0], 1, dtype=F.dtype, device=F.device)], 1)
        Z0 = torch.cat([Z0, bd[None]], 0)
    Z = Z0 + torch.linalg.pinv(F) @ (target - F @ Z0)  # [h(+1), out]
    if b is None:
        return Z.T.contiguous().to(W.dtype), None
    return Z[:-1].T.contiguous().to(W.dtype), Z[-1].to(b.dtype)


def _butterfly_adjusted(l1: Sequence[Layer], l2: Sequence[Layer], x: Tensor) -> list[Layer]:
    """[θ¹_0, WA(θ¹_1), …, WA(θ¹_{D-2}), θ²_{D-1}]: layer k re-solved to read θ²'s units h²_k of group k − 1."""
    h1, h2 = hidden_features(l1, x), hidden_features(l2, x)
    D = len(l1)
    return [l1[0]] + [adjust_layer(l1[k], h1[k], h2[k]) for k in range(1, D - 1)] + [l2[-1]]


def _wa_chain(l1: Sequence[Layer], l2: Sequence[Layer], x: Tensor) -> tuple[list[Layer], list[Tensor], list[Tensor]]:
    """The stepwise-WA junction layers ``adj`` and the features ``g``, ``h²`` they connect.

    Segment ℓ starts at θ²_{<ℓ}, adj_ℓ, θ¹_{>ℓ} (adj_0 = θ¹_0), whose units of group ℓ are
    g_{ℓ+1} = relu(adj_ℓ h²_ℓ) (g_1 = h¹_1); it ends at θ²_{≤ℓ}, adj_{ℓ+1}, θ¹_{>ℓ+1} with
    adj_{ℓ+1} = WA(θ¹_{ℓ+1}: g_{ℓ+1} → h²_{ℓ+1}). Returns (adj [D], g [D] with g_0 unused, h² [D]).
    """
    h2 = hidden_features(l2, x)
    adj: list[Layer] = [l1[0]]
    g: list[Tensor] = [h2[0]]
    for k in range(1, len(l1)):
        g.append(torch.relu(_affine(adj[k - 1], h2[k - 1])))
        adj.append(adjust_layer(l1[k], g[k], h2[k]))
    return adj, g, h2


def _ot_align(chain: DenseChain, l1: list[Layer], p2: Params, x: Tensor, mode: str) -> tuple[Params, Permutation]:
    """π(θ²) and π: θ²'s units paired with θ¹'s by ``ot_pairing``, group after group (float64 points).

    Group ℓ's unit samples (``unit_samples``) are taken on the two ends of segment ℓ of the path that
    follows. ``mode="butterfly"``: all the tensors the group touches, θ¹ side (adjusted layer ℓ writing
    it, θ¹'s layer ℓ + 1 reading it) against θ² side (θ²'s layer ℓ, adjusted layer ℓ + 1). ``mode="wa"``:
    the incoming ones, adjusted layer ℓ of θ¹ against θ²'s layer ℓ. Each pairing is the spec's
    ``Permutation`` of that group alone (``DenseChain.permutation``), applied to θ² before the next
    group is paired (later samples depend on it); π is their composition.
    """
    spec = chain.spec
    l2 = chain.layers(p2)
    total = Permutation.identity(spec)
    for ell, group in enumerate(chain.groups):
        if mode == "butterfly":
            adj = _butterfly_adjusted(l1, l2, x)
            end1 = l1[:ell] + [adj[ell]] + l1[ell + 1:]
            end2 = l2[:ell + 1] + [adj[ell + 1]] + l2[ell + 2:]
            s1 = unit_samples(spec, group, chain.as_params(end1))
            s2 = unit_samples(spec, group, chain.as_params(end2))
        else:
            adj = _wa_chain(l1, l2, x)[0]
            end1 = l1[:ell] + [adj[ell]] + l1[ell + 1:]
            s1 = unit_samples(spec, group, chain.as_params(end1), incoming=True)
            s2 = unit_samples(spec, group, p2, incoming=True)
        step = chain.permutation(ell, ot_pairing(s1, s2))
        p2 = step.apply(spec, p2)
        l2 = chain.layers(p2)
        total = step @ total
    return p2, total


def _endpoint_chain(theta1: Mapping[str, Tensor], theta2: Mapping[str, Tensor],
                      spec: PermutationSpec | None) -> DenseChain:
    chain = dense_chain(_mlp_spec(theta1, "theta1") if spec is None else spec)
    chain.layers(theta1, "theta1")
    chain.layers(theta2, "theta2")
    if len(chain.groups) < 1:
        raise ValueError("the connectors need at least one hidden layer")
    return chain


def _fitting_inputs(x: Tensor | None, method: str, like: Tensor) -> Tensor:
    if x is None:
        raise ValueError(f"method {method!r} needs the fitting inputs x")
    if not isinstance(x, Tensor):
        raise ArgumentTypeError(f"x must be a Tensor, got {type(x).__name__}")
    return x.detach().to(device=like.device, dtype=torch.float64)


def ot_permutation(theta1: Mapping[str, Tensor], theta2: Mapping[str, Tensor], x: Tensor, mode: str = "butterfly",
                   *, spec: PermutationSpec | None = None) -> Permutation:
    """The OT relabelling π of θ²'s hidden units (a ``Permutation`` of the spec) that ``OT`` (``mode=
    "butterfly"``) and ``OT + WA`` (``mode="wa"``) apply before their paths: ``π.apply(spec, θ²)`` is the
    point they end at, computing θ²'s function.

    ``spec``: the endpoints' ``PermutationSpec`` (default: the zoo MLP's, read from θ¹'s keys).
    """
    choice("mode", mode, ("butterfly", "wa"))
    chain = _endpoint_chain(theta1, theta2, spec)
    p1 = _f64(theta1)
    xd = _fitting_inputs(x, f"OT ({mode})", p1[chain.weights[0]])
    return _ot_align(chain, chain.layers(p1), _f64(theta2), xd, mode)[1]


# ---------------------------------------------------------------------------------------------
# paths
# ---------------------------------------------------------------------------------------------
SegmentFn = Callable[[int, Tensor], list[list[Layer]]]


@dataclass(frozen=True)
class ConnectionPath:
    """A piecewise path of ``segments`` pieces, path time τ ∈ [0, segments]; piece k covers [k, k + 1].

    ``points(τ)`` gives the stacked ``Params`` (one vmapped evaluation for all of them); ``end`` is the
    point the path arrives at, ``permutation.apply(spec, θ²)`` (θ² itself but for the OT methods, whose
    ``permutation`` relabels θ²'s units: the same function). ``moves[k]``: the chain's layers that piece k
    changes (``moved_keys``); the others stay put along it.
    """

    method: str
    segments: int
    segment_fn: SegmentFn
    template: Params
    end: Params
    chain: DenseChain
    permutation: Permutation
    moves: tuple[tuple[int, ...], ...]

    @property
    def spec(self) -> PermutationSpec:
        return self.chain.spec

    def moved_keys(self, k: int) -> tuple[str, ...]:
        """The keys that piece k may change (the tensors of the layers writing and reading its group)."""
        self._check_segment(k)
        return tuple(key for ell in self.moves[k] for key in self.chain.layer_keys(ell))

    def _check_segment(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.segments:
            raise ValueError(f"segment {k!r} out of range 0..{self.segments - 1}")

    def segment_points(self, k: int, s: Tensor | Sequence[float]) -> Params:
        """Stacked points of piece k at local times s ∈ [0, 1]."""
        self._check_segment(k)
        s = torch.as_tensor(s, dtype=torch.float64).reshape(-1)
        return stack([self.chain.to_params(ls, self.template) for ls in self.segment_fn(k, s)])

    def points(self, tau: Tensor | Sequence[float]) -> Params:
        """Stacked points at path times τ ∈ [0, segments] (an integer τ = k > 0 is the end of piece k − 1)."""
        tau = torch.as_tensor(tau, dtype=torch.float64).reshape(-1)
        if bool((tau < 0).any()) or bool((tau > self.segments).any()):
            raise ValueError(f"path times must lie in [0, {self.segments}]")
        k = torch.clamp(torch.ceil(tau) - 1, min=0).long()
        s = tau - k
        pts: list[Params | None] = [None] * tau.numel()
        for seg in torch.unique(k).tolist():
            idx = (k == seg).nonzero().flatten()
            st = self.segment_points(seg, s[idx])
            for j, i in enumerate(idx.tolist()):
                pts[i] = {n: v[j] for n, v in st.items()}
        return stack(pts)  # type: ignore[arg-type]

    def grid(self, points_per_segment: int) -> tuple[Tensor, Params]:
        """τ on ``points_per_segment`` equally spaced points per piece (shared ends counted once)."""
        integer("points_per_segment", points_per_segment, minimum=2)
        tau = torch.linspace(0, self.segments, self.segments * (points_per_segment - 1) + 1, dtype=torch.float64)
        return tau, self.points(tau)


def _straight(l1: list[Layer], l2: list[Layer], method: str) -> SegmentFn:
    def seg(k: int, s: Tensor) -> list[list[Layer]]:
        per_layer = []
        for (W1, b1), (W2, b2) in zip(l1, l2, strict=True):
            Ws = lin_connect(W1, W2, s)
            bs = [None] * len(Ws) if b1 is None else list(lin_connect(b1, b2, s))
            per_layer.append(list(zip(Ws, bs, strict=True)))
        return [list(p) for p in zip(*per_layer, strict=True)]

    return seg


def _simultaneous(l1: list[Layer], l2: list[Layer], method: str) -> SegmentFn:
    """Every hidden group on its writer (rows), the head on the last group's units (columns)."""
    def seg(k: int, s: Tensor) -> list[list[Layer]]:
        per_layer = [_rows(l1[i], l2[i], s, method) for i in range(len(l1) - 1)]
        per_layer.append(_cols(l1[-1], l2[-1], s, method))
        return [list(p) for p in zip(*per_layer, strict=True)]

    return seg


def _butterfly(l1: list[Layer], l2: list[Layer], x: Tensor, method: str) -> SegmentFn:
    """Piece ℓ moves group ℓ's units: its writer (layer ℓ, rows) adj_ℓ → θ²_ℓ and its reader (layer ℓ + 1,
    columns) θ¹_{ℓ+1} → adj_{ℓ+1}."""
    adj = _butterfly_adjusted(l1, l2, x)

    def seg(ell: int, s: Tensor) -> list[list[Layer]]:
        a = _rows(adj[ell], l2[ell], s, method)
        b = _cols(l1[ell + 1], adj[ell + 1], s, method)
        return [l2[:ell] + [ai, bi] + l1[ell + 2:] for ai, bi in zip(a, b, strict=True)]

    return seg


def _wa(l1: list[Layer], l2: list[Layer], x: Tensor, method: str) -> SegmentFn:
    """Piece ℓ < D − 1 moves group ℓ's writer (layer ℓ, rows) adj_ℓ → θ²_ℓ and re-solves its reader (layer
    ℓ + 1) at every t; the last piece moves the head adj_{D-1} → θ²_{D-1}."""
    D = len(l1)
    adj, g, h2 = _wa_chain(l1, l2, x)

    def seg(ell: int, s: Tensor) -> list[list[Layer]]:
        if ell == D - 1:
            return [l2[:-1] + [a] for a in _rows(adj[-1], l2[-1], s, method)]
        out = []
        for a in _rows(adj[ell], l2[ell], s, method):
            f = torch.relu(_affine(a, h2[ell]))
            out.append(l2[:ell] + [a, adjust_layer(l1[ell + 1], g[ell + 1], f)] + l1[ell + 2:])
        return out

    return seg


def connection_path(method: str, theta1: Mapping[str, Tensor], theta2: Mapping[str, Tensor],
                    x: Tensor | None = None, *, spec: PermutationSpec | None = None) -> ConnectionPath:
    """The path of ``method`` (a key of ``METHODS``) from θ¹ to θ² (two points of one dense ReLU net).

    ``x``: the inputs on which WA fits its layers (the training inputs); required by every method
    but ``Linear`` and ``Arc``. ``spec``: the endpoints' ``PermutationSpec``, read by ``dense_chain``
    (refused with a ``ValueError`` unless it is a chain of dense layers); default: the zoo ``MLP``'s
    (``spec_for``), read from θ¹'s keys and shapes.
    """
    choice("method", method, METHODS)
    proc, curve = METHODS[method]
    chain = _endpoint_chain(theta1, theta2, spec)
    D = chain.depth
    template = {k: v.detach() for k, v in theta1.items()}
    p2 = _f64(theta2)
    l1, l2 = chain.layers(_f64(theta1)), chain.layers(p2)
    identity = Permutation.identity(chain.spec)
    if proc in ("straight", "simultaneous"):
        fn = (_straight if proc == "straight" else _simultaneous)(l1, l2, curve)
        return ConnectionPath(method, 1, fn, template, {k: v.detach() for k, v in theta2.items()}, chain, identity,
                              (tuple(range(D)),))
    xd = _fitting_inputs(x, method, l1[0][0])
    perm = identity
    if proc.startswith("ot_"):
        p2, perm = _ot_align(chain, l1, p2, xd, "butterfly" if proc == "ot_butterfly" else "wa")
        l2 = chain.layers(p2)
    end = chain.to_params(l2, template)
    if proc in ("butterfly", "ot_butterfly"):
        moves = tuple((ell, ell + 1) for ell in range(D - 1))
        return ConnectionPath(method, D - 1, _butterfly(l1, l2, xd, curve), template, end, chain, perm, moves)
    moves = tuple((ell, ell + 1) for ell in range(D - 1)) + ((D - 1,),)
    return ConnectionPath(method, D, _wa(l1, l2, xd, curve), template, end, chain, perm, moves)


# ---------------------------------------------------------------------------------------------
# WA ensembling
# ---------------------------------------------------------------------------------------------
def wa_ensemble(base: Mapping[str, Tensor], others: Sequence[Mapping[str, Tensor]], x: Tensor,
                n_top: int, *, spec: PermutationSpec | None = None) -> list[Params]:
    """Members of a WA(n) ensemble (Anokhin & Yarotsky 2020, §6): ``[base, m_1, …]``.

    With D layers and s = D − n_top, member j is base's layers 0..s − 1 (the trunk, up to hidden group
    s − 1), then network j's layer s, the reader of that group, weight-adjusted to read base's units
    h^base_s (``adjust_layer``: it reproduces network j's pre-activations of its group s from base's
    units on ``x``), then network j's layers s + 1..D − 1. All members share the trunk, so the ensemble
    evaluates one trunk and n_top-layer heads. ``spec``: as for ``connection_path``.
    """
    n_top = integer("n_top", n_top, minimum=1)
    chain = dense_chain(_mlp_spec(base, "base") if spec is None else spec)
    chain.layers(base, "base")
    lb = chain.layers(_f64(base))
    D = chain.depth
    integer("n_top", n_top, minimum=1, maximum=D - 1)
    s = D - n_top
    if not isinstance(x, Tensor):
        raise ArgumentTypeError(f"x must be a Tensor, got {type(x).__name__}")
    xd = x.detach().to(device=lb[0][0].device, dtype=torch.float64)
    hb = hidden_features(lb, xd)[s]
    members = [{k: v.detach().clone() for k, v in base.items()}]
    for j, other in enumerate(others):
        chain.layers(other, f"others[{j}]")
        lo = chain.layers(_f64(other))
        ho = hidden_features(lo, xd)[s]
        layers = lb[:s] + [adjust_layer(lo[s], ho, hb)] + lo[s + 1:]
        members.append(chain.to_params(layers, base))
    return members
