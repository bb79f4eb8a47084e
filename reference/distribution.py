"""Distribution-based low-loss connectors of Anokhin & Yarotsky 2020 (ICML; arXiv 2008.00741), dense ReLU nets.

A dense ReLU network (``reference.models.MLP``) is a list of D affine layers ``(W_k, b_k)``,
``h_{k+1} = relu(W_k h_k + b_k)`` for the hidden layers and logits ``W_{D-1} h_{D-1} + b_{D-1}``; the
hidden units of layer k are *samples* of a distribution (their incoming weights ``[W_k | b_k]`` row by
row, their outgoing weights column by column of ``W_{k+1}``). A connector proposes points between the
endpoints θ¹ and θ² and joins consecutive points by one of two curves of the paper (``connect``):

- Eq. (5), ``lin``: s(t) = (1 − t) s¹ + t s²;
- Eq. (6), ``arc``: s(t) = m + cos(πt/2) (s¹ − m) + sin(πt/2) (s² − m), with m the mean of the pooled
  samples of both endpoints (the authors' code subtracts it): for i.i.d. samples the arc keeps the
  second moments about m, where the line shrinks them by (1 − t)² + t² (½ at t = ½).

Point finders (the names of the paper's Tables 1 and 2; ``METHODS``). For a one-hidden-layer network
(D = 2, Table 1) the stepwise procedures reduce to the paper's one-layer methods:

- ``Linear``: the straight line θ¹ → θ² (Eq. 5 on every tensor); one segment.
- ``Arc``: Eq. (6) on every hidden layer with its units as samples (rows of ``[W_k | b_k]``), on the
  head's weight with the last hidden units as samples (its columns) and on the head bias (one sample
  per endpoint, m = the midpoint). For D = 2 this is the paper's one-layer Arc (samples
  ``[a_n, b_n, c_n]``); for D > 2 the authors' code arcs the head over its rows (classes) instead.
- ``Linear + WA`` / ``Arc + WA`` (weight adjustment, stepwise; D segments). ``adjust_layer`` re-solves
  a layer by least squares on the fitting inputs x so that it reads other features and keeps its
  outputs. Segment ℓ < D − 1 starts at (θ²_0..θ²_{ℓ-1}, adj_ℓ, θ¹_{ℓ+1}, …) (adj_0 = θ¹_0), moves
  layer ℓ from adj_ℓ to θ²_ℓ (Eq. 5 / 6) and re-solves layer ℓ + 1 at every t, so that the network's
  output on x stays that of the segment's start (≈ θ¹'s); it ends with layer ℓ + 1 = adj_{ℓ+1}, the
  re-solved θ¹_{ℓ+1} reading θ²'s features. The last segment moves the head from adj_{D-1} to θ²'s.
  (The authors' code fits every re-solved layer to θ¹'s own pre-activations, which leaves the path
  discontinuous at segment ends where the fit is inexact, fits ``W`` only and takes the minimum-norm
  solution; we fit to the segment start's pre-activations, ``[W | b]`` jointly on ``[h, 1]``, with the
  solution closest to the layer being re-solved, so the path is continuous.)
- ``Linear + B-fly`` / ``Arc + B-fly`` (stepwise "butterfly"; D − 1 segments): adjusted layers
  adj_k = WA(θ¹_k: h¹_k → h²_k), computed once (adj_0 = θ¹_0, adj_{D-1} = θ²_{D-1}); segment ℓ moves
  layer ℓ from adj_ℓ to θ²_ℓ (units as samples) and layer ℓ + 1 from θ¹_{ℓ+1} to adj_{ℓ+1} (its input
  units as samples) at the same time, with no re-solving along t.
- ``OT`` (= ``OT + B-fly``) and ``OT + WA``: before the butterfly / WA path, the hidden units of θ² are
  paired with those of θ¹ layer by layer by optimal transport between the two empirical distributions
  of unit samples (squared Euclidean cost, uniform weights; ``ot_pairing``), and θ² is permuted
  accordingly (a function-preserving relabelling); the path then uses Eq. (5) and ends at π(θ²),
  which computes the same function as θ². For D = 2, ``OT`` pairs ``[a_n, b_n, c_n]`` (Table 1's OT)
  and ``OT + WA`` pairs the incoming ``[a_n, b_n]``. (The authors' stepwise code permutes inside each
  segment, so its path jumps between equivalent networks at segment ends; aligning θ² first gives the
  same points up to those relabellings and a continuous path.)

WA ensembling (paper §6, ``wa_ensemble``): members share the first D − n layers of a base network;
member j keeps its own last n layers, the first of which is weight-adjusted to read the base's
features. WA(n) ensembles average the members' probabilities.

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

from .params import Params, stack

__all__ = [
    "CONNECT",
    "METHODS",
    "Layer",
    "ConnectionPath",
    "mlp_layers",
    "layers_to_params",
    "hidden_features",
    "forward_layers",
    "lin_connect",
    "arc_connect",
    "connect",
    "ot_pairing",
    "permute_hidden",
    "adjust_layer",
    "ot_align",
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

_HIDDEN = re.compile(r"^layers\.(\d+)\.(weight|bias)$")


# ---------------------------------------------------------------------------------------------
# Params <-> layers
# ---------------------------------------------------------------------------------------------
def mlp_layers(params: Mapping[str, Tensor]) -> list[Layer]:
    """The layers ``[(W_0, b_0), …, (W_{D-1}, b_{D-1})]`` of a ``reference.models.MLP`` point (head last).

    Keys: ``layers.{i}.weight``, ``layers.{i}.bias`` (optional), ``head.weight``, ``head.bias``
    (optional). Raises ``ValueError`` for other keys (e.g. LayerNorm ``norms.*``), a missing head, or
    shapes that do not chain.
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of tensors, got {type(params).__name__}")
    hidden: dict[int, dict[str, Tensor]] = {}
    head: dict[str, Tensor] = {}
    for k, v in params.items():
        if not isinstance(v, Tensor):
            raise TypeError(f"params[{k!r}] must be a Tensor, got {type(v).__name__}")
        m = _HIDDEN.match(k)
        if m:
            hidden.setdefault(int(m.group(1)), {})[m.group(2)] = v
        elif k in ("head.weight", "head.bias"):
            head[k.split(".")[1]] = v
        else:
            raise ValueError(f"unsupported key {k!r}: distribution connectors take plain dense ReLU MLPs "
                             f"(layers.i.weight/bias, head.weight/bias)")
    if "weight" not in head:
        raise ValueError("params have no 'head.weight'")
    if sorted(hidden) != list(range(len(hidden))):
        raise ValueError(f"hidden layer indices must be 0..n-1, got {sorted(hidden)}")
    out: list[Layer] = []
    for i in range(len(hidden)):
        if "weight" not in hidden[i]:
            raise ValueError(f"params have 'layers.{i}.bias' but no 'layers.{i}.weight'")
        out.append((hidden[i]["weight"], hidden[i].get("bias")))
    out.append((head["weight"], head.get("bias")))
    for i, (W, b) in enumerate(out):
        name = f"layers.{i}" if i < len(out) - 1 else "head"
        if W.ndim != 2:
            raise ValueError(f"{name}.weight must be 2-D, got shape {tuple(W.shape)}")
        if b is not None and tuple(b.shape) != (W.shape[0],):
            raise ValueError(f"{name}.bias has shape {tuple(b.shape)}, expected ({W.shape[0]},)")
        if i > 0 and W.shape[1] != out[i - 1][0].shape[0]:
            raise ValueError(f"{name}.weight has {W.shape[1]} inputs but the previous layer has "
                             f"{out[i - 1][0].shape[0]} outputs")
    return out


def layers_to_params(layers: Sequence[Layer], like: Mapping[str, Tensor]) -> Params:
    """The ``Params`` of ``layers`` under the keys of ``like`` (cast to ``like``'s dtype and device)."""
    ref = mlp_layers(like)
    if len(layers) != len(ref):
        raise ValueError(f"{len(layers)} layers given, the template has {len(ref)}")
    out: Params = {}
    for i, ((W, b), (W0, b0)) in enumerate(zip(layers, ref, strict=True)):
        prefix = f"layers.{i}" if i < len(ref) - 1 else "head"
        if W.shape != W0.shape:
            raise ValueError(f"{prefix}.weight has shape {tuple(W.shape)}, expected {tuple(W0.shape)}")
        out[f"{prefix}.weight"] = W.to(dtype=W0.dtype, device=W0.device)
        if b0 is not None:
            if b is None:
                raise ValueError(f"{prefix}.bias is missing")
            out[f"{prefix}.bias"] = b.to(dtype=b0.dtype, device=b0.device)
    return {k: out[k] for k in like}


def _f64(layers: Sequence[Layer]) -> list[Layer]:
    return [(W.detach().double(), None if b is None else b.detach().double()) for W, b in layers]


def _affine(layer: Layer, h: Tensor) -> Tensor:
    W, b = layer
    z = h @ W.T
    return z if b is None else z + b


def hidden_features(layers: Sequence[Layer], x: Tensor) -> list[Tensor]:
    """``[h_0 = x (flattened), h_1, …, h_{D-1}]``: the input and the post-ReLU hidden features."""
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
        raise TypeError("samples must be tensors")
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
    if method == "lin":
        return lin_connect(s1, s2, t)
    if method == "arc":
        return arc_connect(s1, s2, t, sample_dim)
    raise ValueError(f"unknown connection {method!r}; choose one of {CONNECT}")


def _rows(l1: Layer, l2: Layer, t: Tensor, method: str) -> list[Layer]:
    """Connect a layer with its output units as samples: rows of ``[W | b]``."""
    (W1, b1), (W2, b2) = l1, l2
    if (b1 is None) != (b2 is None):
        raise ValueError("one layer has a bias and the other has none")
    if b1 is None:
        return [(W, None) for W in connect(W1, W2, t, method, 0)]
    s = connect(torch.cat([W1, b1[:, None]], 1), torch.cat([W2, b2[:, None]], 1), t, method, 0)
    return [(si[:, :-1], si[:, -1]) for si in s]


def _cols(l1: Layer, l2: Layer, t: Tensor, method: str) -> list[Layer]:
    """Connect a layer with its *input* units as samples (columns of W); the bias as one sample."""
    (W1, b1), (W2, b2) = l1, l2
    if (b1 is None) != (b2 is None):
        raise ValueError("one layer has a bias and the other has none")
    Ws = connect(W1, W2, t, method, 1)
    bs = [None] * len(Ws) if b1 is None else list(connect(b1, b2, t, method, None))
    return list(zip(Ws, bs, strict=True))


# ---------------------------------------------------------------------------------------------
# optimal transport, permutations, weight adjustment
# ---------------------------------------------------------------------------------------------
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


def permute_hidden(layers: Sequence[Layer], k: int, perm: Tensor) -> list[Layer]:
    """Relabel hidden layer k's units (outputs of layer k): rows of W_k, b_k and columns of W_{k+1}.

    The network function is unchanged (the permutation symmetry of dense ReLU nets).
    """
    if not 0 <= k < len(layers) - 1:
        raise ValueError(f"hidden layer index {k} out of range 0..{len(layers) - 2}")
    n = layers[k][0].shape[0]
    perm = torch.as_tensor(perm, dtype=torch.long, device=layers[k][0].device)
    if perm.shape != (n,) or not torch.equal(torch.sort(perm).values, torch.arange(n, device=perm.device)):
        raise ValueError(f"perm must be a permutation of {n} units, got shape {tuple(perm.shape)}")
    out = list(layers)
    W, b = layers[k]
    out[k] = (W[perm], None if b is None else b[perm])
    W, b = layers[k + 1]
    out[k + 1] = (W[:, perm], b)
    return out


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
    """[θ¹_0, WA(θ¹_1), …, WA(θ¹_{D-2}), θ²_{D-1}]: layer k re-solved to read θ²'s features h²_k."""
    h1, h2 = hidden_features(l1, x), hidden_features(l2, x)
    D = len(l1)
    return [l1[0]] + [adjust_layer(l1[k], h1[k], h2[k]) for k in range(1, D - 1)] + [l2[-1]]


def _wa_chain(l1: Sequence[Layer], l2: Sequence[Layer], x: Tensor) -> tuple[list[Layer], list[Tensor], list[Tensor]]:
    """The stepwise-WA junction layers ``adj`` and the features ``g``, ``h²`` they connect.

    Segment ℓ starts at θ²_{<ℓ}, adj_ℓ, θ¹_{>ℓ} (adj_0 = θ¹_0), whose hidden ℓ + 1 features are
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


def ot_align(layers1: Sequence[Layer], layers2: Sequence[Layer], x: Tensor, mode: str) -> list[Layer]:
    """θ² with its hidden units paired to θ¹'s by ``ot_pairing``, layer after layer (π(θ²)).

    ``mode="butterfly"``: hidden layer ℓ + 1's unit samples are ``[W_ℓ | b_ℓ | W_{ℓ+1}ᵀ]`` of the
    butterfly's endpoints of segment ℓ (θ¹: adjusted layer ℓ and θ¹'s layer ℓ + 1; θ²: its layer ℓ and
    adjusted layer ℓ + 1). ``mode="wa"``: the incoming ``[W_ℓ | b_ℓ]`` (adjusted layer ℓ of θ¹ vs θ²'s).
    For D = 2 these are Table 1's ``[a_n, b_n, c_n]`` (OT) and ``[a_n, b_n]`` (OT + WA).
    """
    if mode not in ("butterfly", "wa"):
        raise ValueError(f"mode must be 'butterfly' or 'wa', got {mode!r}")
    l1, l2 = list(layers1), list(layers2)
    D = len(l1)

    def unit_samples(layer: Layer, outgoing: Tensor | None) -> Tensor:
        W, b = layer
        parts = [W] + ([] if b is None else [b[:, None]]) + ([] if outgoing is None else [outgoing.T])
        return torch.cat(parts, 1)

    for ell in range(D - 1):
        if mode == "butterfly":
            adj = _butterfly_adjusted(l1, l2, x)
            s1 = unit_samples(adj[ell], l1[ell + 1][0])
            s2 = unit_samples(l2[ell], adj[ell + 1][0])
        else:
            adj = _wa_chain(l1, l2, x)[0]
            s1, s2 = unit_samples(adj[ell], None), unit_samples(l2[ell], None)
        l2 = permute_hidden(l2, ell, ot_pairing(s1, s2))
    return l2


# ---------------------------------------------------------------------------------------------
# paths
# ---------------------------------------------------------------------------------------------
SegmentFn = Callable[[int, Tensor], list[list[Layer]]]


@dataclass(frozen=True)
class ConnectionPath:
    """A piecewise path of ``segments`` pieces, path time τ ∈ [0, segments]; piece k covers [k, k + 1].

    ``points(τ)`` gives the stacked ``Params`` (one vmapped evaluation for all of them); ``end`` is the
    point the path arrives at (θ², or π(θ²) for the OT methods: the same function).
    """

    method: str
    segments: int
    segment_fn: SegmentFn
    template: Params
    end: Params

    def segment_points(self, k: int, s: Tensor | Sequence[float]) -> Params:
        """Stacked points of piece k at local times s ∈ [0, 1]."""
        if not 0 <= k < self.segments:
            raise ValueError(f"segment {k} out of range 0..{self.segments - 1}")
        s = torch.as_tensor(s, dtype=torch.float64).reshape(-1)
        return stack([layers_to_params(ls, self.template) for ls in self.segment_fn(k, s)])

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
        if points_per_segment < 2:
            raise ValueError(f"points_per_segment must be >= 2, got {points_per_segment}")
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
    def seg(k: int, s: Tensor) -> list[list[Layer]]:
        per_layer = [_rows(l1[i], l2[i], s, method) for i in range(len(l1) - 1)]
        per_layer.append(_cols(l1[-1], l2[-1], s, method))
        return [list(p) for p in zip(*per_layer, strict=True)]

    return seg


def _butterfly(l1: list[Layer], l2: list[Layer], x: Tensor, method: str) -> SegmentFn:
    adj = _butterfly_adjusted(l1, l2, x)

    def seg(ell: int, s: Tensor) -> list[list[Layer]]:
        a = _rows(adj[ell], l2[ell], s, method)
        b = _cols(l1[ell + 1], adj[ell + 1], s, method)
        return [l2[:ell] + [ai, bi] + l1[ell + 2:] for ai, bi in zip(a, b, strict=True)]

    return seg


def _wa(l1: list[Layer], l2: list[Layer], x: Tensor, method: str) -> SegmentFn:
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
                    x: Tensor | None = None) -> ConnectionPath:
    """The path of ``method`` (a key of ``METHODS``) from θ¹ to θ² (``MLP`` points with equal shapes).

    ``x``: the inputs on which WA fits its layers (the training inputs); required by every method
    but ``Linear`` and ``Arc``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    proc, curve = METHODS[method]
    l1, l2 = mlp_layers(theta1), mlp_layers(theta2)
    if len(l1) != len(l2):
        raise ValueError(f"endpoints have {len(l1)} and {len(l2)} layers")
    for i, ((W1, b1), (W2, b2)) in enumerate(zip(l1, l2, strict=True)):
        if W1.shape != W2.shape or (b1 is None) != (b2 is None):
            raise ValueError(f"layer {i} differs between the endpoints: {tuple(W1.shape)} vs {tuple(W2.shape)}")
    if len(l1) < 2:
        raise ValueError("the connectors need at least one hidden layer")
    template = {k: v.detach() for k, v in theta1.items()}
    l1, l2 = _f64(l1), _f64(l2)
    if proc in ("straight", "simultaneous"):
        fn = (_straight if proc == "straight" else _simultaneous)(l1, l2, curve)
        return ConnectionPath(method, 1, fn, template, {k: v.detach() for k, v in theta2.items()})
    if x is None:
        raise ValueError(f"method {method!r} needs the fitting inputs x")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    xd = x.detach().to(device=l1[0][0].device, dtype=torch.float64)
    D = len(l1)
    if proc.startswith("ot_"):
        l2 = ot_align(l1, l2, xd, "butterfly" if proc == "ot_butterfly" else "wa")
    end = layers_to_params(l2, template)
    if proc in ("butterfly", "ot_butterfly"):
        return ConnectionPath(method, D - 1, _butterfly(l1, l2, xd, curve), template, end)
    return ConnectionPath(method, D, _wa(l1, l2, xd, curve), template, end)


# ---------------------------------------------------------------------------------------------
# WA ensembling
# ---------------------------------------------------------------------------------------------
def wa_ensemble(base: Mapping[str, Tensor], others: Sequence[Mapping[str, Tensor]], x: Tensor,
                n_top: int) -> list[Params]:
    """Members of a WA(n) ensemble (Anokhin & Yarotsky 2020, §6): ``[base, m_1, …]``.

    With D layers and s = D − n_top, member j is base's layers 0..s − 1, then network j's layer s
    weight-adjusted to read base's features h^base_s (``adjust_layer``: it reproduces network j's
    pre-activations of layer s + 1 from base's features on ``x``), then network j's layers s + 1..D − 1.
    All members share the first s layers, so the ensemble evaluates one trunk and n_top-layer heads.
    """
    if isinstance(n_top, bool) or not isinstance(n_top, int):
        raise TypeError(f"n_top must be an int, got {n_top!r}")
    lb = _f64(mlp_layers(base))
    D = len(lb)
    if not 1 <= n_top <= D - 1:
        raise ValueError(f"n_top must be in 1..{D - 1} for a network of {D} layers, got {n_top}")
    s = D - n_top
    xd = x.detach().to(device=lb[0][0].device, dtype=torch.float64)
    hb = hidden_features(lb, xd)[s]
    members = [{k: v.detach().clone() for k, v in base.items()}]
    for j, other in enumerate(others):
        lo = _f64(mlp_layers(other))
        if [W.shape for W, _ in lo] != [W.shape for W, _ in lb]:
            raise ValueError(f"others[{j}] has layer shapes {[tuple(W.shape) for W, _ in lo]}, "
                             f"base has {[tuple(W.shape) for W, _ in lb]}")
        ho = hidden_features(lo, xd)[s]
        layers = lb[:s] + [adjust_layer(lo[s], ho, hb)] + lo[s + 1:]
        members.append(layers_to_params(layers, base))
    return members
