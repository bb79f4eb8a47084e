"""Merging many models, cycle-consistent alignment, and repairing interpolated points.

Conventions (``reference/permutation.py``): ``P(θ)[k] = θ[k].index_select(axis, p[group])`` — new
unit ``i`` is old unit ``p[i]``; ``P.compose(Q) = P ∘ Q`` applies Q first. ``weight_matching(θ_a,
θ_b).perm`` is the P with ``P(θ_b) ≈ θ_a`` ("maps b into a's labels").

**MergeMany** (Ainsworth et al. 2023, "Git Re-Basin", §4, Algorithm 3). Every model i carries a
permutation ``Pᵢ`` into a shared frame. One sweep visits the models in a random order; model i is
re-aligned to the mean of the *other* aligned models, ``Pᵢ ← weight_matching(θ̄₋ᵢ, θᵢ, init=Pᵢ)``
with ``θ̄₋ᵢ = (1/(N−1)) Σ_{j≠i} Pⱼ(θⱼ)`` (warm-started from its current permutation). The merged
point is ``θ̄ = (1/N) Σᵢ Pᵢ(θᵢ)``. Sweeps stop when no permutation changed, when the summed squared
distance to the mean ``D = Σᵢ ‖Pᵢ(θᵢ) − θ̄‖²`` improved by at most ``tol · D``, or after
``max_iter`` sweeps. D never increases: ``D = Σᵢ ‖θᵢ‖² − N ‖θ̄‖²`` (permutations keep norms) and
re-aligning model i changes ``N² ‖θ̄‖²`` only through ``2 ⟨Pᵢ(θᵢ), Σ_{j≠i} Pⱼ(θⱼ)⟩``, which weight
matching never decreases (it accepts only improvements over its warm start).

*Start and labelling.* Algorithm 3 starts from the given labels (``init="identity"``); then the
result depends on how each input's units happen to be numbered. The default ``init="canonical"``
starts every model from a labelling-free order: the units of each group sorted by their squared
weight norm ``Σ_{(k, ax) ∋ g} ‖θ[k]_{ax=u}‖²`` (row norms do not change when other axes are
permuted), blocks of a GroupNorm group sorted by their summed norm and units within a block, the
heads of an attention head class sorted by their norm summed over the class's groups (one head
order) and units within each head (segments of a concatenated axis: the group's segment). Two
inputs that differ only by a relabelling Q then have the same canonical form, every later step is
the same, and the merged *function* is exactly invariant to permuting any input model (ties of
the norms aside: weights in general position have none). No model's permutation is fixed during
the sweeps; at the end everything is expressed in the labels of model ``anchor`` (default 0:
``perms[anchor]`` is the identity), a common relabelling that changes no function.

**Universe (cycle-consistent) alignment.** ``to_universe[i] = Uᵢ`` maps model i into one shared
labelling: ``Uᵢ(θᵢ)`` are the aligned models. The pairwise maps ``P_ij = Uᵢ⁻¹ ∘ Uⱼ`` (θⱼ into θᵢ's
labels, the convention of ``weight_matching(θᵢ, θⱼ)``) compose exactly: ``P_ij ∘ P_jk = Uᵢ⁻¹ ∘ Uⱼ
∘ Uⱼ⁻¹ ∘ U_k = P_ik``. ``method="sync"``: permutation synchronisation (Pachauri, Kondor & Singh 2013,
"Solving the multi-way matching problem by permutation synchronization", §3): pairwise weight
matching gives ``P_ij``; per group, with ``M(p)[a, p[a]] = 1`` (so ``M(P ∘ Q) = M(P) M(Q)``), the
block matrix ``T[i, j] = M(P_ij)`` equals ``V Vᵀ`` with ``Vᵢ = M(Uᵢ)ᵀ`` when the pairwise maps are
consistent; its top ``n`` eigenvectors E span V. Rounding: Pachauri's reference rounding
``M(P_i0) ≈ N Eᵢ E₀ᵀ`` by ``solve_lap``, then ``refine_iters`` rounds of orthogonal Procrustes
(``R = polar(Eᵀ V)``, ``Vᵢ = round(Eᵢ R)``), which no longer favour model 0. GroupNorm blocks are
respected by ``solve_lap(S, block)``; the groups of an attention head class are rounded jointly
(``reference.matching.solve_coupled``: one head permutation, the exact optimum of the summed
rounding objectives), so every ``Uᵢ`` moves heads as wholes. ``method="mergemany"``: ``Uᵢ`` =
MergeMany's ``perms[i]`` (everything aligned to the merged model).

**Non-transitivity.** Pairwise weight matching of three models A, B, C gives ``P_AB``, ``P_BC``,
``P_AC``; exact alignments satisfy ``P_AC = P_AB ∘ P_BC``. ``nontransitivity`` reports the fraction
of units where they differ and the cycle ``C = P_AB ∘ P_BC ∘ P_AC⁻¹`` (A → C → B → A), a
permutation of *A's* units, identity iff the three matchings are consistent: the barrier of A
against ``C(A)`` measures the cost of the inconsistency. (``P_AC⁻¹ ∘ P_AB ∘ P_BC`` is the same cycle
conjugated onto C's units.)

**REPAIR** (Jordan et al. 2023, "REPAIR: REnormalizing Permuted Activations for Interpolation
Repair", §4). At ``θ = Σ kᵢ θᵢ`` of aligned endpoints, every channel of every layer that produces a
permutation group's units (``reference.activations.group_producers``: the norm layer where the group
has one, else the Linear / conv layers writing into it; their outputs are the pre-activations) gets
the mean and standard deviation ``Σ kᵢ (μᵢ, σᵢ)`` of the endpoints' channels on data x. Layers are
repaired in forward order, each measured after the ones before it were repaired (what the paper's
inserted BatchNorm layers do in train mode, Eq. (3)): with θ's statistics (μ, σ), the producing
layer's affine map is composed with ``z ↦ s (z − μ) + μ_t``, ``s = σ_t / σ``: weight (or norm
gain) ``× s`` along the output channel, bias ``b ↦ s b + (μ_t − s μ)``. A layer without a bias can
only be rescaled (its mean becomes ``s μ``); a channel with ``σ ≤ eps`` is only shifted. For nets
whose groups are produced by BatchNorm, REPAIR *is* a BatchNorm reset (§4 of the paper): after
``recompute_bn_stats`` at θ each BN output channel has mean β = Σ kᵢ βᵢ and std |γ| = Σ kᵢ |γᵢ| (for
γ of one sign), the endpoints' own statistics interpolated, so ``repair`` returns ``bn_reset(θ)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import validate
from .activations import Producer, channel_stats, check_inputs, forward_order, group_producers, producer_names
from .bn import recompute_bn_stats
from .matching import matching_units, solve_coupled, weight_matching
from .params import Params, check_compatible, check_finite, combine, float_keys, is_float
from .permutation import Permutation, PermutationSpec

__all__ = [
    "MERGE_INITS",
    "MergeResult",
    "UniverseResult",
    "bn_reset",
    "canonical_permutation",
    "channel_statistics",
    "check_models",
    "merge_many",
    "nontransitivity",
    "pairwise_from_universe",
    "permutation_sync",
    "repair",
    "universe_alignment",
]

MERGE_INITS = ("canonical", "identity")
UNIVERSE_METHODS = ("sync", "sync-ascent", "mergemany", "c2m3", "star")


# ---------------------------------------------------------------------------------------------
# input checks


def _check_int(name: str, v: object, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return v


def check_models(spec: PermutationSpec, params_list: Sequence[Mapping[str, Tensor]], least: int) -> list:
    """The models as a list, after checking: a sequence of at least ``least`` dicts, each fitting ``spec``,
    finite, and all of one architecture (``ValueError`` naming the model otherwise; a wrong type raises
    ``reference.validate.ArgumentTypeError``, both a ``TypeError`` and a ``ValueError``)."""
    if isinstance(params_list, Mapping) or not isinstance(params_list, Sequence):
        raise validate.ArgumentTypeError(
            f"params_list must be a sequence of parameter dicts, got {type(params_list).__name__}"
        )
    pts = list(params_list)
    if len(pts) < least:
        raise ValueError(f"need at least {least} models, got {len(pts)}")
    for i, p in enumerate(pts):
        if not isinstance(p, Mapping):
            raise validate.ArgumentTypeError(f"model {i}: expected a dict of tensors, got {type(p).__name__}")
        try:
            spec.check_params(p)
        except ValueError as e:
            raise ValueError(f"model {i}: {e}") from None
        check_finite(p, f"model {i}")
    check_compatible(*pts)
    return pts


def _matrix(p: Tensor) -> np.ndarray:
    """``M(p)[a, p[a]] = 1``: ``M(P ∘ Q) = M(P) M(Q)``, ``M(P⁻¹) = M(P)ᵀ``."""
    n = p.numel()
    m = np.zeros((n, n))
    m[np.arange(n), p.cpu().numpy()] = 1.0
    return m


# ---------------------------------------------------------------------------------------------
# MergeMany (Git Re-Basin, Algorithm 3)


@dataclass(frozen=True)
class MergeResult:
    """MergeMany's output.

    ``perms[i]`` maps model i into the merged model's labels; ``merged = (1/N) Σᵢ perms[i](θᵢ)``
    (floating entries; integer buffers from model 0). ``history[s]``: the summed squared distance
    ``Σᵢ ‖perms[i](θᵢ) − mean‖²`` after sweep s (entry 0: at the start); ``changed[s]``: how many
    models got a new permutation in sweep s + 1.
    """

    perms: list[Permutation]
    merged: Params
    history: tuple[float, ...]
    changed: tuple[int, ...] = ()
    converged: bool = False
    init: str = "canonical"
    seed: int = 0
    anchor: int | None = 0

    @property
    def sweeps(self) -> int:
        return len(self.changed)


def canonical_permutation(spec: PermutationSpec, params: Mapping[str, Tensor]) -> Permutation:
    """A labelling-free order of every group: units sorted by their squared weight norm.

    ``key_g[u] = Σ_{(k, ax) ∋ g} ‖θ[k]_{ax=u}‖²`` over the floating entries (BatchNorm statistics
    included; on a concatenated axis the group's segment). A GroupNorm group (block b) sorts its
    blocks by the summed key, then the units inside each block. The groups of one attention head
    class sort their heads together, by the key summed over the head's units in every group of the
    class (one head order), then each group its units inside each head. Equivariance:
    ``canonical(Q(θ)) ∘ Q = canonical(θ)`` for every permutation Q respecting ``spec`` whenever the
    keys have no ties, so ``canonical(Q(θ)).apply(Q(θ)) == canonical(θ).apply(θ)``: the canonical
    form forgets labels.
    """
    spec.check_params(params)
    sizes = spec.sizes
    keys: dict[str, Tensor] = {}
    for g, members in spec.members.items():
        n = sizes[g]
        key = torch.zeros(n, dtype=torch.float64)
        for k, ax, off in members:
            v = params[k]
            if not is_float(v):
                continue
            t = v.detach().double().cpu()
            if off is not None:
                t = t.narrow(ax, off, n)
            key += t.movedim(ax, 0).reshape(n, -1).square().sum(1)
        keys[g] = key
    out = {}
    for gs in matching_units(spec).values():
        head_key = sum(keys[g].view(-1, spec.block(g)).sum(1) for g in gs) if len(gs) > 1 else None
        for g in gs:
            n, b = sizes[g], spec.block(g)
            if b == 1 and head_key is None:
                out[g] = torch.argsort(keys[g], stable=True)
                continue
            kb = keys[g].view(n // b, b)
            order = torch.argsort(kb.sum(1) if head_key is None else head_key, stable=True)
            inner = torch.argsort(kb, dim=1, stable=True)
            out[g] = (order[:, None] * b + inner[order]).reshape(-1)
    return Permutation(out, spec)


def _sq_dist_to_mean(aligned: Sequence[Mapping[str, Tensor]], keys: Sequence[str]) -> float:
    n = len(aligned)
    total = 0.0
    for k in keys:
        st = torch.stack([a[k].double() for a in aligned])
        total += float((st - st.mean(0)).square().sum())
    return total if n else 0.0


def merge_many(
    spec: PermutationSpec,
    params_list: Sequence[Mapping[str, Tensor]],
    *,
    max_iter: int = 100,
    seed: int = 0,
    tol: float = 0.0,
    init: str = "canonical",
    anchor: int | None = 0,
    max_passes: int = 100,
) -> MergeResult:
    """Git Re-Basin's MergeMany (Ainsworth et al. 2023, Algorithm 3); see the module docstring.

    ``max_iter``: at most this many sweeps over the N models. ``seed`` fixes the visiting order of
    every sweep and the group orders of weight matching (they depend on ``seed`` and N only, never
    on the weights). ``tol``: stop when a sweep improves the summed squared distance to the mean by
    at most ``tol`` times its previous value (``0``: stop only when nothing changes). ``init``:
    ``"canonical"`` (default; merged function invariant to relabelling any input) or
    ``"identity"`` (Algorithm 3 from the given labels). ``anchor``: express the result in model
    ``anchor``'s labels (``perms[anchor]`` = identity), or ``None`` for the frame the sweeps ended
    in. ``max_passes``: per weight-matching call.
    """
    pts = check_models(spec, params_list, 2)
    N = len(pts)
    _check_int("max_iter", max_iter, 0)
    _check_int("max_passes", max_passes, 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not (isinstance(tol, int | float) and not isinstance(tol, bool) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if init not in MERGE_INITS:
        raise ValueError(f"unknown init {init!r}; use one of {MERGE_INITS}")
    if anchor is not None and (isinstance(anchor, bool) or not isinstance(anchor, int) or not 0 <= anchor < N):
        raise ValueError(f"anchor must be None or a model index in [0, {N}), got {anchor!r}")
    keys = float_keys(pts[0])
    if init == "canonical":
        perms = [canonical_permutation(spec, p) for p in pts]
    else:
        perms = [Permutation.identity(spec) for _ in pts]
    aligned = [P.apply(spec, p) for P, p in zip(perms, pts, strict=True)]
    # running sum of the aligned models (float64) for the leave-one-out means
    total = {k: sum(a[k].double() for a in aligned) for k in keys}
    history = [_sq_dist_to_mean(aligned, keys)]
    changed: list[int] = []
    converged = False
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        n_changed = 0
        for i in rng.permutation(N):
            i = int(i)
            wm_seed = int(rng.integers(2**31 - 1))
            others = {k: ((total[k] - aligned[i][k].double()) / (N - 1)).to(pts[i][k].dtype) for k in keys}
            target = {**pts[i], **others}  # integer buffers: model i's own (not matched)
            new = weight_matching(spec, target, pts[i], seed=wm_seed, init=perms[i], max_passes=max_passes).perm
            if new != perms[i]:
                n_changed += 1
                perms[i] = new
                new_aligned = new.apply(spec, pts[i])
                for k in keys:
                    total[k] = total[k] - aligned[i][k].double() + new_aligned[k].double()
                aligned[i] = new_aligned
        changed.append(n_changed)
        history.append(_sq_dist_to_mean(aligned, keys))
        if n_changed == 0 or history[-2] - history[-1] <= tol * abs(history[-2]):
            converged = True
            break
    if anchor is not None:
        G = perms[anchor].inverse()
        perms = [G.compose(P) for P in perms]
        aligned = [P.apply(spec, p) for P, p in zip(perms, pts, strict=True)]
    merged = combine([1.0 / N] * N, aligned)
    return MergeResult(perms, merged, tuple(history), tuple(changed), converged, init, seed, anchor)


# ---------------------------------------------------------------------------------------------
# cycle-consistent ("universe") alignment


@dataclass(frozen=True)
class UniverseResult:
    """``to_universe[i] = Uᵢ`` maps model i into one shared labelling (``Uᵢ(θᵢ)`` are aligned).

    ``pairwise_from_universe(self, i, j) = Uᵢ⁻¹ ∘ Uⱼ`` maps θⱼ into θᵢ's labels and these maps are
    cycle-consistent by construction. ``pairwise``: the weight-matching inputs ``P_ij`` (i < j) of
    ``method="sync"``; ``agreement``: the fraction of units (over all pairs i < j and groups) where
    ``Uᵢ⁻¹ ∘ Uⱼ`` equals the input ``P_ij`` (1.0 when the inputs were already consistent).
    ``merge``: MergeMany's result for ``method="mergemany"``; ``c2m3``: the ``C2M3Result`` for
    ``method="c2m3"``; ``ascent``: the agreement count per sweep for ``method="sync-ascent"``.
    """

    to_universe: list[Permutation]
    method: str
    pairwise: dict[tuple[int, int], Permutation] = field(default_factory=dict, repr=False)
    agreement: float = float("nan")
    merge: MergeResult | None = field(default=None, repr=False)
    c2m3: object | None = field(default=None, repr=False)  # reference.universe.C2M3Result
    ascent: tuple[int, ...] = ()

    def pairwise_map(self, i: int, j: int) -> Permutation:
        return pairwise_from_universe(self, i, j)


def pairwise_from_universe(U: UniverseResult | Sequence[Permutation], i: int, j: int) -> Permutation:
    """``P_ij = Uᵢ⁻¹ ∘ Uⱼ``: maps θⱼ into θᵢ's labels (as ``weight_matching(θᵢ, θⱼ).perm``)."""
    us = U.to_universe if isinstance(U, UniverseResult) else list(U)
    for name, v in (("i", i), ("j", j)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < len(us):
            raise ValueError(f"{name} must be a model index in [0, {len(us)}), got {v!r}")
    return us[i].inverse().compose(us[j])


def _round_rows(spec: PermutationSpec, mats: Mapping[str, np.ndarray]) -> dict[str, Tensor]:
    """Round similarity matrices (group → array) to a permutation respecting ``spec``'s blocks and heads
    (``solve_coupled``: ``solve_lap(S, block)`` per group, the groups of a head class jointly)."""
    return solve_coupled({g: torch.from_numpy(S) for g, S in mats.items()}, spec)


def permutation_sync(
    pairwise: Mapping[tuple[int, int], Permutation],
    num_models: int,
    spec: PermutationSpec,
    *,
    refine_iters: int = 20,
) -> list[Permutation]:
    """Permutation synchronisation (Pachauri et al. 2013): cycle-consistent ``Uᵢ`` from ``P_ij``.

    ``pairwise[(i, j)]`` maps θⱼ into θᵢ's labels; every unordered pair must be given once or in
    both directions (then both enter the block matrix: ``T[i, j] = ½ (M(P_ij) + M(P_ji)ᵀ)``).
    Returns ``[U_0, …]`` with ``U_0`` the identity (the universe carries model 0's labels), such
    that ``Uᵢ⁻¹ ∘ Uⱼ`` equals ``P_ij`` whenever the inputs are consistent (module docstring).
    """
    N = _check_int("num_models", num_models, 2)
    _check_int("refine_iters", refine_iters, 0)
    blocks: dict[tuple[int, int], list[Permutation]] = {}
    for key, P in pairwise.items():
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(v, int) for v in key)):
            raise ValueError(f"pairwise keys must be (i, j) model index pairs, got {key!r}")
        i, j = key
        if not (0 <= i < N and 0 <= j < N) or i == j:
            raise ValueError(f"pairwise key {key!r}: need two different model indices in [0, {N})")
        P = Permutation(P.to_dict(), spec)  # ValueError if it does not fit the spec
        a, b = (i, j) if i < j else (j, i)
        blocks.setdefault((a, b), []).append(P if i < j else P.inverse())
    missing = [(i, j) for i in range(N) for j in range(i + 1, N) if (i, j) not in blocks]
    if missing:
        raise ValueError(f"pairwise permutations missing for model pairs {missing[:5]}")
    out: list[dict[str, Tensor]] = [{} for _ in range(N)]
    sizes = spec.sizes
    for gs in matching_units(spec).values():
        Es: dict[str, np.ndarray] = {}
        Eb: dict[str, list[np.ndarray]] = {}
        for g in gs:
            n = sizes[g]
            T = np.zeros((N * n, N * n))
            for i in range(N):
                T[i * n : (i + 1) * n, i * n : (i + 1) * n] = np.eye(n)
            for (i, j), ps in blocks.items():
                m = sum(_matrix(P[g]) for P in ps) / len(ps)
                T[i * n : (i + 1) * n, j * n : (j + 1) * n] = m
                T[j * n : (j + 1) * n, i * n : (i + 1) * n] = m.T
            _, vecs = np.linalg.eigh(T)
            E = Es[g] = vecs[:, -n:]  # top-n eigenvectors (eigh sorts ascending)
            Eb[g] = [E[i * n : (i + 1) * n] for i in range(N)]
        # Pachauri's rounding against model 0: M(P_i0) ≈ N Eᵢ E₀ᵀ; Vᵢ = M(P_i0) (rows: model-i units)
        ps = [{g: torch.arange(sizes[g]) for g in gs}] + [
            _round_rows(spec, {g: Eb[g][i] @ Eb[g][0].T for g in gs}) for i in range(1, N)
        ]
        for _ in range(refine_iters):
            R = {}
            for g in gs:
                V = np.concatenate([_matrix(p[g]) for p in ps])
                A, _, Bt = np.linalg.svd(Es[g].T @ V)
                R[g] = A @ Bt  # argmax_R ⟨E R, V⟩ over orthogonal R (Procrustes)
            new = [_round_rows(spec, {g: Eb[g][i] @ R[g] for g in gs}) for i in range(N)]
            if all(torch.equal(x[g], y[g]) for x, y in zip(new, ps, strict=True) for g in gs):
                break
            ps = new
        # Vᵢ = M(pᵢ) = M(Uᵢ)ᵀ, so Uᵢ = pᵢ⁻¹; relabel the universe so that U_0 = identity
        for g in gs:
            us = [torch.argsort(p[g]) for p in ps]
            g0 = torch.argsort(us[0])  # U_0⁻¹
            for i in range(N):
                out[i][g] = us[i][g0]  # (U_0⁻¹ ∘ Uᵢ) index: uᵢ[u0⁻¹]
    return [Permutation(o, spec) for o in out]


def _agreement(us: Sequence[Permutation], pairwise: Mapping[tuple[int, int], Permutation]) -> float:
    same = total = 0
    for (i, j), P in pairwise.items():
        Q = pairwise_from_universe(us, i, j)
        for g in P:
            same += int((P[g] == Q[g]).sum())
            total += P[g].numel()
    return same / total if total else 1.0


def universe_alignment(
    spec: PermutationSpec,
    params_list: Sequence[Mapping[str, Tensor]],
    *,
    method: str = "sync",
    seed: int = 0,
    restarts: int = 1,
    refine_iters: int = 20,
    **kwargs,
) -> UniverseResult:
    """Cycle-consistent joint alignment of N models into one universe (module docstring).

    ``method="sync"``: weight matching for every pair i < j (``seed``, ``restarts`` as in
    ``weight_matching``), then ``permutation_sync``; ``U_0`` is the identity. ``"sync-ascent"``: the
    same pairwise maps, then ``reference.universe.sync_ascent`` started from the spectral solution
    (``kwargs``: ``max_sweeps``). ``"mergemany"``: ``Uᵢ = merge_many(spec, params_list, seed=seed,
    **kwargs).perms[i]``. ``"c2m3"``: ``reference.universe.frank_wolfe_universe(spec, params_list,
    **kwargs)`` (``init``: ``"identity"``, ``"mergemany"`` or ``"star"``, or a list of permutations;
    ``max_iter``, ``tol``); its result is ``UniverseResult.c2m3``. ``"star"``: ``U_0`` = identity,
    ``Uᵢ = weight_matching(θ_0, θᵢ)`` (consistent by construction, every pair routed through model 0).
    An option a method does not take is refused with ``ValueError``.
    """
    from .universe import frank_wolfe_universe, sync_ascent

    pts = check_models(spec, params_list, 2)
    if method not in UNIVERSE_METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {UNIVERSE_METHODS}")
    N = len(pts)
    if method in ("mergemany", "c2m3") and restarts != 1:
        raise ValueError(f"restarts applies to the pairwise methods (sync, sync-ascent, star), not {method!r}")
    if method != "sync" and method != "sync-ascent" and refine_iters != 20:
        raise ValueError(f"refine_iters applies to method='sync' and 'sync-ascent' only, not {method!r}")
    allowed = {"sync": set(), "sync-ascent": {"max_sweeps"}, "star": set(), "c2m3": {"init", "max_iter", "tol", "fix"},
               "mergemany": {"max_iter", "tol", "init", "anchor", "max_passes"}}[method]
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"method={method!r} does not take the options {unknown}; it takes {sorted(allowed)}")
    if method == "mergemany":
        r = merge_many(spec, pts, seed=seed, **kwargs)
        return UniverseResult(list(r.perms), method, merge=r)
    if method == "star":
        us = [Permutation.identity(spec)] + [
            weight_matching(spec, pts[0], pts[i], seed=seed, restarts=restarts).perm for i in range(1, N)
        ]
        return UniverseResult(us, method)
    if method == "c2m3":
        init = kwargs.pop("init", "identity")
        if isinstance(init, str) and init in ("mergemany", "star"):
            init = universe_alignment(spec, pts, method=init, seed=seed).to_universe
        r = frank_wolfe_universe(spec, pts, init=init, **kwargs)
        return UniverseResult(list(r.to_universe), method, c2m3=r)
    pairwise = {
        (i, j): weight_matching(spec, pts[i], pts[j], seed=seed, restarts=restarts).perm
        for i in range(N)
        for j in range(i + 1, N)
    }
    us = permutation_sync(pairwise, N, spec, refine_iters=refine_iters)
    history: tuple[int, ...] = ()
    if method == "sync-ascent":
        us, history = sync_ascent(pairwise, N, spec, init=us, seed=seed, **kwargs)
    return UniverseResult(us, method, pairwise, _agreement(us, pairwise), ascent=history)


# ---------------------------------------------------------------------------------------------
# non-transitivity of pairwise matching


def nontransitivity(
    spec: PermutationSpec,
    pa: Mapping[str, Tensor],
    pb: Mapping[str, Tensor],
    pc: Mapping[str, Tensor],
    **wm_kwargs,
) -> dict:
    """How far pairwise weight matching of A, B, C is from composing (module docstring).

    Returns ``{"fraction", "per_group", "moved", "units", "P_AB", "P_BC", "P_AC", "composed",
    "cycle"}``: ``P_XY = weight_matching(θ_X, θ_Y, **wm_kwargs).perm`` (θ_Y into X's labels),
    ``composed = P_AB ∘ P_BC`` (C into A's labels via B), ``fraction`` = units (over all groups)
    where ``P_AC`` and ``composed`` differ / all units, ``per_group`` the same per group, ``moved``
    the counts, and ``cycle = P_AB ∘ P_BC ∘ P_AC⁻¹`` (a permutation of A's units; identity iff
    fraction = 0; ``moved`` = its non-fixed units). Barrier of the cycle: A against
    ``cycle.apply(spec, θ_A)``.
    """
    check_models(spec, [pa, pb, pc], 3)
    ab = weight_matching(spec, pa, pb, **wm_kwargs).perm
    bc = weight_matching(spec, pb, pc, **wm_kwargs).perm
    ac = weight_matching(spec, pa, pc, **wm_kwargs).perm
    composed = ab.compose(bc)
    cycle = composed.compose(ac.inverse())
    moved = {g: int((composed[g] != ac[g]).sum()) for g in spec.sizes}
    units = sum(spec.sizes.values())
    return {
        "fraction": sum(moved.values()) / units if units else 0.0,
        "per_group": {g: moved[g] / spec.sizes[g] for g in moved},
        "moved": moved,
        "units": units,
        "P_AB": ab,
        "P_BC": bc,
        "P_AC": ac,
        "composed": composed,
        "cycle": cycle,
    }


# ---------------------------------------------------------------------------------------------
# BatchNorm reset and REPAIR (Jordan et al. 2023)


def bn_reset(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, **kwargs) -> Params:
    """BatchNorm statistics recomputed at ``params`` on data ``x`` (``reference.bn.recompute_bn_stats``;
    ``batch_size`` / ``method`` passed through). A model without BatchNorm gets a copy back."""
    return recompute_bn_stats(model, params, x, **kwargs)


def _producers(model: nn.Module, spec: PermutationSpec) -> dict[str, Producer]:
    """Every module producing a group's units (``reference.activations.group_producers``), by name."""
    return producer_names(group_producers(model, spec))


def channel_statistics(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    *,
    spec: PermutationSpec | None = None,
    batch_size: int = 1024,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-channel mean and (population) standard deviation, float64 on CPU, of the output of every
    module producing a permutation group's units (``reference.activations.group_producers``), on
    ``x`` in eval mode: ``{module name: (mean [C], std [C])}``, over examples and positions."""
    spec = _spec_of(model, spec)
    spec.check_params(params)
    check_inputs(x, batch_size, model=model)
    prods = list(_producers(model, spec).values())
    return channel_stats(model, params, x, prods, batch_size=batch_size, sizes=spec.sizes)


def _spec_of(model: nn.Module, spec: PermutationSpec | None) -> PermutationSpec:
    if spec is not None:
        return spec
    from .specs import spec_for

    return spec_for(model)


def _check_coeffs(coeffs: Sequence[float], n: int) -> list[float]:
    try:
        c = [float(v) for v in coeffs]
    except (TypeError, ValueError):
        raise ValueError(f"coeffs must be a sequence of numbers, got {coeffs!r}") from None
    if len(c) != n:
        raise ValueError(f"got {len(c)} coefficients for {n} endpoints")
    if not all(math.isfinite(v) for v in c):
        raise ValueError(f"coeffs must be finite, got {c}")
    if any(v < 0 for v in c) or abs(math.fsum(c) - 1.0) > 1e-6:
        raise ValueError(f"coeffs must be convex (non-negative, summing to 1), got {c} (sum {math.fsum(c)})")
    return c


def _along(v: Tensor, axis: int, ndim: int) -> Tensor:
    """A per-channel vector ``v`` shaped to broadcast along ``axis`` of an ``ndim``-dimensional tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return v.view(shape)


def repair(
    model: nn.Module,
    endpoints: Sequence[Mapping[str, Tensor]],
    coeffs: Sequence[float],
    x: Tensor,
    *,
    spec: PermutationSpec | None = None,
    batch_size: int = 1024,
    eps: float = 1e-8,
    bn_method: str = "pooled",
) -> Params:
    """REPAIR (Jordan et al. 2023, §4) at ``θ = Σ kᵢ θᵢ``: a new ``Params`` (module docstring).

    ``endpoints`` must already be aligned (one labelling); ``coeffs`` convex (a point of a path or
    a simplex). Statistics on ``x`` in chunks of ``batch_size``, eval mode, float64. ``spec``
    defaults to ``spec_for(model)``. BatchNorm nets: ``bn_reset(θ)`` (``bn_method`` passed on).
    The producing layer's weight (and bias) is rescaled along the axis the spec gives its group.
    Raises ``ValueError`` for mismatched endpoints, non-convex coefficients, too few inputs, or a
    producing norm layer without an affine weight.
    """
    if isinstance(endpoints, Mapping) or not isinstance(endpoints, Sequence):
        raise TypeError(f"endpoints must be a sequence of parameter dicts, got {type(endpoints).__name__}")
    spec = _spec_of(model, spec)
    pts = check_models(spec, endpoints, 1)
    c = _check_coeffs(coeffs, len(pts))
    check_inputs(x, batch_size, model=model)
    eps = validate.number("eps", eps, minimum=0)
    theta = combine(c, pts)
    modules = dict(model.named_modules())
    prods = _producers(model, spec)
    names = list(prods)
    is_bn = {n: isinstance(modules[n], _BatchNorm) for n in names}
    if any(is_bn.values()):
        if not all(is_bn.values()):
            mixed = sorted(n for n, v in is_bn.items() if not v)
            raise ValueError(f"REPAIR: some groups are produced by BatchNorm and some are not ({mixed[:5]})")
        return bn_reset(model, theta, x, batch_size=batch_size, method=bn_method)
    for n, p in prods.items():
        if p.weight_key not in theta:
            raise ValueError(f"REPAIR: producing layer {n!r} has no weight to rescale (a norm without affine?)")
    try:
        order = forward_order(model, theta, names, x)
    except ValueError as e:
        raise ValueError(f"REPAIR: {e}") from None
    every = list(prods.values())
    ends = [channel_stats(model, p, x, every, batch_size=batch_size, sizes=spec.sizes) for p in pts]
    for n in order:
        p = prods[n]
        mu_t = sum(ci * e[n][0] for ci, e in zip(c, ends, strict=True))
        sd_t = sum(ci * e[n][1] for ci, e in zip(c, ends, strict=True))
        mu, sd = channel_stats(model, theta, x, [p], batch_size=batch_size, sizes=spec.sizes)[n]
        s = torch.where(sd > eps, sd_t / torch.where(sd > eps, sd, torch.ones_like(sd)), torch.ones_like(sd))
        w = theta[p.weight_key]
        theta[p.weight_key] = (w.double() * _along(s.to(w.device), p.weight_axis, w.ndim)).to(w.dtype)
        bk = f"{n}.bias" if n else "bias"
        if bk in theta and theta[bk] is not None:
            bias = theta[bk]
            ax = p.weight_axis if bias.ndim == w.ndim else 0
            shift = (mu_t - s * mu).to(bias.device)
            theta[bk] = (
                bias.double() * _along(s.to(bias.device), ax, bias.ndim) + _along(shift, ax, bias.ndim)
            ).to(bias.dtype)
    return theta
