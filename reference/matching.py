"""Permutation alignment driven only by a ``PermutationSpec`` (Ainsworth et al. 2023, Git Re-Basin).

Both methods return P such that P(θ_b) is aligned to θ_a (``perm.apply(spec, params_b)``).

**Weight matching** (Git Re-Basin §3.2, Algorithm 1) maximises the sum of inner products
``J(P) = Σ_k ⟨θ_a[k], P(θ_b)[k]⟩`` by coordinate descent: for one group g at a time, with every
other group held fixed, J is linear in P_g, ``J = ⟨S_g, P_g⟩ + const`` with
``S_g[i, j] = Σ_{(k, ax) ∋ g} ⟨θ_a[k]_{ax=i}, P_{−g}(θ_b)[k]_{ax=j}⟩``, solved exactly by
``scipy.optimize.linear_sum_assignment``. Groups are visited in a random order each pass; passes
stop when no group improves. J never decreases, and the result depends on the visiting order
(measured in the README), so ``restarts`` runs several orders and keeps the best objective.

For a group with block size b (GroupNorm), P_g must map blocks onto blocks; the best such P_g is
an assignment between blocks whose costs are the optimal within-block assignments (exact).

**Activation matching** (Git Re-Basin §3.1) maximises, for every group independently, the sum of
Pearson correlations between the units' activations of the two models on data.

**Straight-through estimator** (Git Re-Basin §3.3, Algorithm 2; ``ste_matching``) searches for the P
whose midpoint ``½(θ_a + P(θ_b))`` has a low training loss: a free point θ̃ is projected onto θ_b's
permutation orbit by weight matching, and the loss gradient at the midpoint is passed straight
through the projection to θ̃.

**Sinkhorn matching** (``sinkhorn_matching``) relaxes each group's assignment in weight matching to a
doubly-stochastic matrix (an entropy-regularised linear assignment solved by Sinkhorn iterations,
Cuturi 2013), anneals the temperature, and rounds each matrix to a permutation with ``solve_lap``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.func import functional_call
from tqdm import tqdm

from .params import check_compatible, check_finite, float_keys, is_float
from .permutation import Permutation, PermutationSpec
from .train import TrainConfig, check_data, clip_grads, module_mode, opt_step_, pick_device, split_trainable

__all__ = [
    "MatchResult",
    "weight_matching",
    "weight_matching_objective",
    "activation_matching",
    "solve_lap",
    "sinkhorn",
    "sinkhorn_matching",
    "SinkhornResult",
    "ste_matching",
    "STEResult",
]


@dataclass(frozen=True)
class MatchResult:
    """A permutation aligning θ_b to θ_a, its objective and how it was found.

    ``history``: the objective after each pass, starting with the initial permutation's.
    ``restarts``: every restart's result (the best one included) when several orders were run.
    """

    perm: Permutation
    objective: float
    history: tuple[float, ...]
    method: str
    seed: int | None = None
    restarts: tuple[MatchResult, ...] = field(default=(), repr=False)

    @property
    def restart_objectives(self) -> list[float]:
        return [r.objective for r in self.restarts] or [self.objective]


def solve_lap(S: Tensor, block: int = 1) -> Tensor:
    """argmax_P ⟨S, P⟩ over permutations (``P[i] = j`` pairs row i with column j).

    With ``block`` > 1 the permutation must map each block of ``block`` consecutive rows onto a
    block of columns; solved exactly as an assignment of blocks weighted by within-block optima.
    """
    S_np = S.detach().double().cpu().numpy()
    n = S_np.shape[0]
    if block == 1:
        _, col = linear_sum_assignment(S_np, maximize=True)
        return torch.as_tensor(col, dtype=torch.long)
    m = n // block
    inner: dict[tuple[int, int], np.ndarray] = {}
    W = np.empty((m, m))
    for bi in range(m):
        for bj in range(m):
            sub = S_np[bi * block : (bi + 1) * block, bj * block : (bj + 1) * block]
            _, c = linear_sum_assignment(sub, maximize=True)
            inner[bi, bj] = c
            W[bi, bj] = sub[np.arange(block), c].sum()
    _, bcol = linear_sum_assignment(W, maximize=True)
    perm = np.concatenate([bj * block + inner[bi, bj] for bi, bj in enumerate(bcol)])
    return torch.as_tensor(perm, dtype=torch.long)


def _permute_except(spec: PermutationSpec, perm: Mapping[str, Tensor], key: str, w: Tensor, skip: int) -> Tensor:
    for ax, g in enumerate(spec.axes[key]):
        if g is not None and ax != skip:
            w = w.index_select(ax, perm[g].to(w.device))
    return w


def _validate_pair(spec: PermutationSpec, a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> None:
    spec.check_params(a)
    spec.check_params(b)
    check_compatible(a, b)
    check_finite(a, "params_a")
    check_finite(b, "params_b")


def weight_matching_objective(
    spec: PermutationSpec, params_a: Mapping[str, Tensor], params_b: Mapping[str, Tensor], perm: Permutation
) -> float:
    """J(P) = Σ_k ⟨θ_a[k], P(θ_b)[k]⟩ over the floating entries."""
    pb = perm.apply(spec, params_b)
    return float(sum((params_a[k].double() * pb[k].double()).sum() for k in float_keys(params_a)))


def _weight_matching_once(
    spec: PermutationSpec,
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    seed: int,
    max_passes: int,
    init: Permutation | None,
    keys: Sequence[str],
) -> MatchResult:
    rng = np.random.default_rng(seed)
    groups = spec.groups
    names = list(groups)
    perm = {g: v.clone() for g, v in (init or Permutation.identity(spec)).items()}
    obj0 = weight_matching_objective(spec, a, b, Permutation(perm, spec))
    history = [obj0]
    keyset = set(keys)
    for _ in range(max_passes):
        improved = False
        for gi in rng.permutation(len(names)):
            g = names[gi]
            n = spec.sizes[g]
            S = torch.zeros(n, n, dtype=torch.float64)
            for k, ax in groups[g]:
                if k not in keyset:
                    continue
                wa = a[k].double().movedim(ax, 0).reshape(n, -1)
                wb = _permute_except(spec, perm, k, b[k].double(), ax).movedim(ax, 0).reshape(n, -1)
                S += (wa @ wb.T).cpu()
            old = float(S[torch.arange(n), perm[g]].sum())
            new_idx = solve_lap(S, spec.block(g))
            new = float(S[torch.arange(n), new_idx].sum())
            if new > old + 1e-12 * max(1.0, abs(old)):
                perm[g] = new_idx
                improved = True
        history.append(weight_matching_objective(spec, a, b, Permutation(perm, spec)))
        if not improved:
            break
    P = Permutation(perm, spec)
    return MatchResult(P, history[-1], tuple(history), "weight", seed)


def weight_matching(
    spec: PermutationSpec,
    params_a: Mapping[str, Tensor],
    params_b: Mapping[str, Tensor],
    *,
    seed: int = 0,
    restarts: int = 1,
    max_passes: int = 100,
    init: Permutation | None = None,
    keys: Sequence[str] | None = None,
) -> MatchResult:
    """Git Re-Basin weight matching (Algorithm 1), best of ``restarts`` random group orders.

    ``keys`` restricts the objective to some entries (default: every floating entry, BatchNorm
    running statistics included). Restart r uses order seed ``seed + r``.
    """
    _validate_pair(spec, params_a, params_b)
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    ks = list(keys) if keys is not None else float_keys(params_a)
    unknown = sorted(set(ks) - set(params_a))
    if unknown:
        raise ValueError(f"keys not in the parameters: {unknown}")
    runs = [_weight_matching_once(spec, params_a, params_b, seed + r, max_passes, init, ks) for r in range(restarts)]
    best = max(runs, key=lambda r: r.objective)
    if restarts == 1:
        return best
    return MatchResult(best.perm, best.objective, best.history, "weight", best.seed, tuple(runs))


# ---------------------------------------------------------------------------------------------
# activation matching

_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _group_producers(model: nn.Module, spec: PermutationSpec) -> dict[str, list[str]]:
    """For each group, the modules whose output channels (dim 1, or last for Linear) live in it.

    Normalisation layers are preferred where a group has them (their output is what the next layer
    sees); otherwise the linear/conv layers writing into the group.
    """
    modules = dict(model.named_modules())
    out: dict[str, dict[str, list[str]]] = {}
    for k, gs in spec.axes.items():
        if not k.endswith(".weight") or not gs or gs[0] is None:
            continue
        name = k[: -len(".weight")]
        mod = modules.get(name)
        if mod is None:
            continue
        kind = "linear" if isinstance(mod, _PRODUCERS) else "norm"
        out.setdefault(gs[0], {}).setdefault(kind, []).append(name)
    res = {}
    for g in spec.groups:
        found = out.get(g, {})
        res[g] = found.get("norm") or found.get("linear") or []
        if not res[g]:
            raise ValueError(f"activation matching: no module produces the units of group {g!r}")
    return res


def _channels_last(o: Tensor, mod: nn.Module) -> Tensor:
    if isinstance(mod, nn.Linear) or o.ndim == 2:
        return o.reshape(-1, o.shape[-1])
    return o.movedim(1, -1).reshape(-1, o.shape[1])


class _Moments:
    def __init__(self) -> None:
        self.n = 0
        self.sa = self.sb = self.saa = self.sbb = self.sab = None

    def add(self, xa: Tensor, xb: Tensor) -> None:
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
        n = self.n
        ma, mb = self.sa / n, self.sb / n
        va = (self.saa / n - ma**2).clamp_min(0)
        vb = (self.sbb / n - mb**2).clamp_min(0)
        cov = self.sab / n - ma[:, None] * mb[None, :]
        return cov / (va.sqrt()[:, None] * vb.sqrt()[None, :] + eps)


@torch.no_grad()
def activation_matching(
    model: nn.Module,
    spec: PermutationSpec,
    params_a: Mapping[str, Tensor],
    params_b: Mapping[str, Tensor],
    x: Tensor,
    *,
    batch_size: int = 1024,
    train_mode: bool = False,
) -> MatchResult:
    """Git Re-Basin activation matching: per group, argmax_P Σᵢ corr(z_a[i], z_b[P[i]]) on inputs ``x``.

    Activations are the outputs of the modules producing each group (see ``_group_producers``);
    where a group has several (a residual stream), their correlation matrices are summed.
    """
    _validate_pair(spec, params_a, params_b)
    producers = _group_producers(model, spec)
    modules = dict(model.named_modules())
    wanted = sorted({m for ms in producers.values() for m in ms})
    moments = {m: _Moments() for m in wanted}
    was_training = model.training
    model.train(train_mode)
    captured: dict[str, Tensor] = {}
    hooks = [
        modules[m].register_forward_hook(lambda mod, inp, out, m=m: captured.__setitem__(m, _channels_last(out, mod)))
        for m in wanted
    ]
    try:
        for s in range(0, x.shape[0], batch_size):
            xb = x[s : s + batch_size]
            captured.clear()
            functional_call(model, {k: v.clone() for k, v in params_a.items()}, (xb,))
            acts_a = dict(captured)
            captured.clear()
            functional_call(model, {k: v.clone() for k, v in params_b.items()}, (xb,))
            for m in wanted:
                moments[m].add(acts_a[m], captured[m])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    perm = {}
    obj = obj0 = 0.0
    for g, ms in producers.items():
        C = sum(moments[m].corr() for m in ms)
        idx = solve_lap(C, spec.block(g))
        perm[g] = idx
        n = C.shape[0]
        obj += float(C[torch.arange(n), idx].sum())
        obj0 += float(C.diagonal().sum())
    return MatchResult(Permutation(perm, spec), obj, (obj0, obj), "activation")


# ---------------------------------------------------------------------------------------------
# Sinkhorn relaxation of weight matching


def sinkhorn(log_alpha: Tensor, iters: int = 100, *, tol: float | None = None) -> Tensor:
    """Sinkhorn–Knopp normalisation in the log domain: a doubly-stochastic matrix from ``log_alpha``.

    ``X⁰ = log_alpha``; each iteration normalises the rows, then the columns:
    ``X ← X − logsumexp_j X[i, j]``, ``X ← X − logsumexp_i X[i, j]``; returns ``exp(X)``
    (Sinkhorn 1964; the log-domain form of Mena et al. 2018, "Gumbel-Sinkhorn", Eq. (2)).

    For a finite square matrix the iterates converge to the unique doubly-stochastic matrix of the
    form ``diag(u) exp(log_alpha) diag(v)`` (Sinkhorn 1964), i.e. the maximiser of
    ``⟨log_alpha, M⟩ + H(M)`` over the Birkhoff polytope, ``H(M) = −Σ M log M`` (Cuturi 2013).
    After the last step every column sums to 1 up to rounding and every row to within the
    convergence error; with ``tol`` the loop stops as soon as every row sum is within ``tol`` of 1
    (at most ``iters`` iterations). Leading dimensions are batch dimensions; differentiable.
    Working in logs never overflows: ``exp(S / τ)`` for small τ would.
    """
    if not isinstance(log_alpha, Tensor) or not log_alpha.is_floating_point():
        raise TypeError(f"log_alpha must be a floating-point tensor, got {type(log_alpha).__name__}")
    if log_alpha.ndim < 2 or log_alpha.shape[-1] != log_alpha.shape[-2]:
        raise ValueError(f"log_alpha must be square in its last two dims, got shape {tuple(log_alpha.shape)}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an integer >= 1, got {iters!r}")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be None or > 0, got {tol!r}")
    if not bool(torch.isfinite(log_alpha).all()):
        raise ValueError("log_alpha holds non-finite values (NaN or inf)")
    zeros = log_alpha.new_zeros(log_alpha.shape[:-1])
    return _sinkhorn_duals(log_alpha, zeros, zeros, iters, tol)[0].exp()


def _sinkhorn_duals(L: Tensor, f: Tensor, h: Tensor, iters: int, tol: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """``sinkhorn`` on ``L`` written with dual potentials, started at ``(f, h)``.

    ``X = L + f[..., :, None] + h[..., None, :]``; the row step is ``f = −logsumexp_j(L + h)``, the
    column step ``h = −logsumexp_i(L + f)`` (the same iterates as ``sinkhorn`` from ``f = h = 0``).
    Returns ``(X, f, h)``; a warm start (``f, h`` of a nearby problem) converges in fewer steps.
    """
    X = L + f.unsqueeze(-1) + h.unsqueeze(-2)
    for _ in range(iters):
        f = -torch.logsumexp(L + h.unsqueeze(-2), dim=-1)
        h = -torch.logsumexp(L + f.unsqueeze(-1), dim=-2)
        X = L + f.unsqueeze(-1) + h.unsqueeze(-2)
        if tol is not None and float((torch.logsumexp(X, dim=-1).exp() - 1.0).abs().max()) <= tol:
            break
    return X, f, h


def _soft_apply_except(spec: PermutationSpec, mats: Mapping[str, Tensor], key: str, w: Tensor, skip: int) -> Tensor:
    """M(θ)[key] with every group's soft matrix applied except on axis ``skip``.

    Along an axis of group g, unit i becomes ``Σ_j M_g[i, j] w[j]``; for the 0/1 matrix of an index
    p (``M[i, p[i]] = 1``) this is ``w.index_select(ax, p)``, i.e. ``Permutation.apply``.
    """
    for ax, g in enumerate(spec.axes[key]):
        if g is not None and ax != skip:
            w = torch.movedim(torch.tensordot(mats[g].to(w), w, dims=([1], [ax])), 0, ax)
    return w


def _soft_objective(
    spec: PermutationSpec, a: Mapping[str, Tensor], b: Mapping[str, Tensor], mats: Mapping[str, Tensor]
) -> float:
    """J(M) = Σ_k ⟨θ_a[k], M(θ_b)[k]⟩ over the floating entries (multilinear in the group matrices)."""
    return float(
        sum((a[k].double() * _soft_apply_except(spec, mats, k, b[k].double(), -1)).sum() for k in float_keys(a))
    )


@dataclass(frozen=True)
class SinkhornResult(MatchResult):
    """``MatchResult`` of ``sinkhorn_matching``; ``soft``: the final doubly-stochastic matrix per group.

    ``objective`` is the weight-matching objective J(P) of the rounded permutation; ``history`` the
    relaxed objective J(M) of the soft matrices, first the initial ones', then after each pass.
    """

    soft: Mapping[str, Tensor] = field(default_factory=dict, repr=False)
    taus: tuple[float, ...] = ()


_DEFAULT_TAUS = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01)


def sinkhorn_matching(
    spec: PermutationSpec,
    params_a: Mapping[str, Tensor],
    params_b: Mapping[str, Tensor],
    *,
    tau: float | Sequence[float] = _DEFAULT_TAUS,
    iters: int = 200,
    tol: float | None = 1e-9,
    passes_per_tau: int = 1,
    seed: int = 0,
    init: Permutation | None = None,
    keys: Sequence[str] | None = None,
    refine: bool = False,
) -> SinkhornResult:
    """Weight matching with each group's assignment relaxed to a doubly-stochastic matrix.

    Relaxation of Git Re-Basin's weight-matching objective (§3.2, Eq. (3)): every group g carries a
    doubly-stochastic M_g (``M_g[i, j]``: how much unit j of θ_b is placed at unit i) instead of a
    permutation, and ``M(θ_b)`` mixes the units along each axis of g (``_soft_apply_except``):
    ``J(M) = Σ_k ⟨θ_a[k], M(θ_b)[k]⟩`` is linear in each M_g. One pass visits the groups in a
    random order (``numpy.random.default_rng(seed)``, as ``weight_matching``) and replaces M_g by

        M_g = sinkhorn(S_g / (τ σ_g), iters, tol) = argmax_{M ∈ Birkhoff} ⟨S_g, M⟩ + τ σ_g H(M),

    ``S_g[i, j] = Σ_{(k, ax) ∋ g} ⟨θ_a[k]_{ax=i}, M_{−g}(θ_b)[k]_{ax=j}⟩`` (weight matching's S_g,
    the other groups applied softly), ``H`` the entropy, ``σ_g`` the standard deviation of the
    entries of S_g (1 if they are all equal): τ is relative to the spread of the similarities, so
    the result does not change when θ_a or θ_b is rescaled. ``tau`` is the annealing schedule: one
    temperature per ``passes_per_tau`` passes, in the given order (default 1 → 0.01); a float is a
    single temperature. As τ → 0 the update tends to weight matching's exact assignment (the
    relaxation of a linear assignment over the Birkhoff polytope is tight: Birkhoff–von Neumann).

    Each Sinkhorn solve runs at most ``iters`` iterations (stopping once rows are within ``tol``),
    warm-started from the dual potentials of the group's previous solve (ε-scaling, as in
    Schmitzer 2019): at small τ Sinkhorn converges slowly, so M_g is column-stochastic to rounding
    and row-stochastic only approximately (two digits MLPs 64-32-32-10: rows within 7e-3 after
    200 iterations with the warm start, 0.27 without).

    Start: the uniform matrices ``1/n`` (no unit preferred), or ``init``'s 0/1 matrices. End: each
    M_g is rounded to ``solve_lap(M_g, spec.block(g))`` = argmax_P Σᵢ M_g[i, P[i]], over
    block-preserving permutations for GroupNorm groups. ``refine=True`` then runs
    ``weight_matching`` from the rounded permutation (coordinate ascent to a local optimum of the
    hard objective). Unlike hard coordinate ascent, J(M) need not increase monotonically
    (the entropy term and the temperature change between updates). ``keys``: as in
    ``weight_matching``. Computed in float64 on the parameters' device.
    """
    _validate_pair(spec, params_a, params_b)
    taus_in = (tau,) if isinstance(tau, int | float) else tuple(tau)
    if not taus_in or not all(isinstance(t, int | float) and math.isfinite(t) and t > 0 for t in taus_in):
        raise ValueError(f"tau must be a positive number or a non-empty sequence of them, got {tau!r}")
    taus = tuple(float(t) for t in taus_in)
    if isinstance(passes_per_tau, bool) or not isinstance(passes_per_tau, int) or passes_per_tau < 1:
        raise ValueError(f"passes_per_tau must be an integer >= 1, got {passes_per_tau!r}")
    ks = list(keys) if keys is not None else float_keys(params_a)
    unknown = sorted(set(ks) - set(params_a))
    if unknown:
        raise ValueError(f"keys not in the parameters: {unknown}")
    if init is not None:
        init = Permutation(init.to_dict(), spec)  # ValueError if it does not fit the spec
    keyset = set(ks)
    groups = spec.groups
    names = list(groups)
    sizes = spec.sizes
    dev = next(iter(params_a.values())).device
    mats: dict[str, Tensor] = {}
    for g in names:
        n = sizes[g]
        if init is None:
            mats[g] = torch.full((n, n), 1.0 / n, dtype=torch.float64, device=dev)
        else:
            mats[g] = torch.zeros(n, n, dtype=torch.float64, device=dev)
            mats[g][torch.arange(n), init[g].to(dev)] = 1.0
    history = [_soft_objective(spec, params_a, params_b, mats)]
    duals: dict[str, tuple[Tensor, Tensor]] = {}
    rng = np.random.default_rng(seed)
    for t in taus:
        for _ in range(passes_per_tau):
            for gi in rng.permutation(len(names)):
                g = names[gi]
                n = sizes[g]
                S = torch.zeros(n, n, dtype=torch.float64, device=dev)
                for k, ax in groups[g]:
                    if k not in keyset:
                        continue
                    wa = params_a[k].double().movedim(ax, 0).reshape(n, -1)
                    wb = _soft_apply_except(spec, mats, k, params_b[k].double(), ax).movedim(ax, 0).reshape(n, -1)
                    S += wa @ wb.T
                sigma = float(S.std(correction=0)) if n > 1 else 0.0
                scale = sigma if sigma > 0 and math.isfinite(sigma) else 1.0
                eps = t * scale
                f0, h0 = duals.get(g, (S.new_zeros(n), S.new_zeros(n)))
                X, f, h = _sinkhorn_duals(S / eps, f0 / eps, h0 / eps, iters, tol)
                mats[g] = X.exp()
                duals[g] = (f * eps, h * eps)  # in units of S: the next update starts here
            history.append(_soft_objective(spec, params_a, params_b, mats))
    perm = Permutation({g: solve_lap(mats[g], spec.block(g)) for g in names}, spec)
    if refine:
        perm = weight_matching(spec, params_a, params_b, seed=seed, init=perm, keys=ks).perm
    obj = weight_matching_objective(spec, params_a, params_b, perm)
    soft = {g: m.detach().cpu() for g, m in mats.items()}
    return SinkhornResult(perm, obj, tuple(history), "sinkhorn", seed, soft=soft, taus=taus)


# ---------------------------------------------------------------------------------------------
# straight-through estimator (Git Re-Basin §3.3, Algorithm 2)


@dataclass(frozen=True)
class STEResult(MatchResult):
    """``MatchResult`` of ``ste_matching``. Here ``objective`` is a *loss* (lower is better):

    - ``history[i]``: mean cross-entropy on all of (x, y) at the midpoint ½(θ_a + Pᵢ(θ_b)) of the
      i-th candidate ``candidates[i]``, measured after ``eval_steps[i]`` optimizer steps (entry 0:
      the initial permutation, before any step);
    - ``objective = min(history)``, reached first by ``perm = candidates[i]`` at ``best_step``;
    - ``step_losses[s]``: the minibatch midpoint loss of step s (before its update).
    """

    step_losses: tuple[float, ...] = ()
    eval_steps: tuple[int, ...] = ()
    best_step: int = 0
    candidates: tuple[Permutation, ...] = field(default=(), repr=False)


@torch.no_grad()
def _midpoint_loss(
    model: nn.Module,
    a: Mapping[str, Tensor],
    pb: Mapping[str, Tensor],
    extra: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    batch_size: int,
) -> float:
    """Mean cross-entropy on (x, y) at ½(θ_a + P(θ_b)) (integer buffers from θ_a), in ``batch_size`` chunks."""
    mid = {k: 0.5 * (a[k] + pb[k]) if is_float(a[k]) else a[k].clone() for k in a}
    total = 0.0
    for s in range(0, x.shape[0], batch_size):
        logits = functional_call(model, {**mid, **extra}, (x[s : s + batch_size],))
        total += float(F.cross_entropy(logits, y[s : s + batch_size], reduction="sum"))
    return total / x.shape[0]


def ste_matching(
    model: nn.Module,
    spec: PermutationSpec,
    params_a: Mapping[str, Tensor],
    params_b: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
    init: Permutation | None = None,
    rematch_every: int = 1,
    eval_every: int | None = None,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    grad_clip: float | None = None,
    train_mode: bool = True,
    eval_batch_size: int = 4096,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> STEResult:
    """Git Re-Basin's straight-through estimator (Ainsworth et al. 2023, §3.3, Algorithm 2).

    Searches for P minimising the training loss at the midpoint ½(θ_a + P(θ_b)). A free point θ̃
    (the trainable parameters) starts at θ_a, as in Algorithm 2 and the authors' code; each step

    1. projects θ̃ onto θ_b's permutation orbit: ``P = weight_matching(θ̃, θ_b, init=previous P)``
       (warm-started; only every ``rematch_every`` steps, and at every evaluation);
    2. forms ``θ_mid = ½(θ_a + P(θ_b) + θ̃ − stopgrad(θ̃))``: its value is ½(θ_a + P(θ_b)), its
       gradient with respect to θ̃ is the identity's (the straight-through estimator, Bengio et al.
       2013), so ``∇_θ̃ L = ½ ∇L(θ_mid)``;
    3. takes one optimizer step on θ̃ for the minibatch cross-entropy at θ_mid (``optimizer`` as in
       ``reference.train``: ``"sgd"`` with ``momentum`` — the authors used SGD, momentum 0.9 — or
       ``"adam"`` / ``"adamw"``; constant ``lr``, optional ``grad_clip``).

    Buffers (BatchNorm running statistics) are not trained: in θ̃ they stay θ_a's (so they enter
    the projection as constants), at the midpoint they are ½(θ_a + P(θ_b)). ``train_mode=True``
    evaluates the midpoint with batch statistics (the averaged running statistics are not the
    midpoint's own); it makes no difference for nets without BatchNorm or dropout.

    Data order: a ``torch.randperm`` per epoch from ``torch.Generator().manual_seed(seed)``;
    projection at step s uses weight-matching order seed ``seed + 1 + s``. Candidates — the initial
    permutation and the projection of θ̃ after every ``eval_every`` steps (default: once per epoch
    of ``x``) and after the last step — are scored by the midpoint loss on all of (x, y); the best
    is returned. ``init`` defaults to ``weight_matching(spec, θ_a, θ_b, seed=seed)``: the first
    projection of θ̃ = θ_a is then that same permutation, so the result is never worse than weight
    matching on this training loss *by construction* (``best_step == 0`` says STE found nothing
    better). The authors instead kept the permutation with the lowest minibatch loss.
    """
    _validate_pair(spec, params_a, params_b)
    for name, v in (("steps", steps), ("rematch_every", rematch_every), ("eval_batch_size", eval_batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if eval_every is not None and (isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1):
        raise ValueError(f"eval_every must be None or an integer >= 1, got {eval_every!r}")
    cfg = TrainConfig(
        epochs=1,
        batch_size=batch_size,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        optimizer=optimizer,
        grad_clip=grad_clip,
    )
    check_data(x, y, cfg)
    p_keys, _ = split_trainable(model, params_a)
    if not p_keys:
        raise ValueError("the model has no trainable parameters: nothing for the straight-through estimator to move")
    dev = next(iter(params_a.values())).device if device is None else pick_device(device)
    a = {k: v.detach().to(dev) for k, v in params_a.items()}
    b = {k: v.detach().to(dev) for k, v in params_b.items()}
    extra = {n: t.detach().to(dev) for n, t in model.named_buffers() if n not in a}
    x = x.to(dev)
    y = y.to(dev, dtype=torch.long)
    n = x.shape[0]
    per_epoch = cfg.steps_per_epoch(n)
    every = eval_every or per_epoch

    if init is None:
        perm = weight_matching(spec, a, b, seed=seed).perm
    else:
        perm = Permutation(init.to_dict(), spec)  # ValueError if it does not fit the spec

    leaves = [a[k].clone().requires_grad_(True) for k in p_keys]  # θ̃ ← θ_a (Algorithm 2)
    state: list[dict[str, Tensor]] = [{} for _ in leaves]

    def project(start: Permutation, s: int) -> Permutation:
        tilde = {**a, **{k: t.detach() for k, t in zip(p_keys, leaves, strict=True)}}
        return weight_matching(spec, tilde, b, seed=seed + 1 + s, init=start).perm

    def score(pb: Mapping[str, Tensor]) -> float:
        with module_mode(model, train_mode):
            return _midpoint_loss(model, a, pb, extra, x, y, eval_batch_size)

    pb = perm.apply(spec, b)
    history = [score(pb)]
    eval_steps = [0]
    candidates = [perm]
    step_losses: list[float] = []
    projected = False  # is ``perm`` the projection of the current θ̃?
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    bar = tqdm(range(steps), desc="ste", unit="step", disable=not progress, dynamic_ncols=True)
    with bar:
        for s in bar:
            if s % per_epoch == 0:
                order = torch.randperm(n, generator=gen).to(dev)
            if s % rematch_every == 0 and not projected:
                new = project(perm, s)
                if new != perm:
                    perm, pb = new, new.apply(spec, b)
            i0 = (s % per_epoch) * cfg.batch_size
            idx = order[i0 : i0 + cfg.batch_size]
            leaf = dict(zip(p_keys, leaves, strict=True))
            mid = {
                k: 0.5 * (a[k] + pb[k] + (leaf[k] - leaf[k].detach()))
                if k in leaf
                else (0.5 * (a[k] + pb[k]) if is_float(a[k]) else a[k].clone())
                for k in a
            }
            with module_mode(model, train_mode):
                logits = functional_call(model, {**mid, **extra}, (x[idx],))
            loss = F.cross_entropy(logits, y[idx])
            if not bool(torch.isfinite(loss)):
                raise ValueError(
                    f"ste_matching diverged: midpoint loss is {float(loss)} at step {s + 1}/{steps} "
                    f"with {optimizer} lr={lr:g}; try a lower learning rate (or set grad_clip)"
                )
            grads = list(torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True))
            if cfg.grad_clip is not None:
                grads = clip_grads(grads, cfg.grad_clip, 0)
            opt_step_(cfg, leaves, grads, state, cfg.lr, s + 1)
            # the midpoint's value ½(θ_a + P(θ_b)) stays finite whatever θ̃ is; θ̃ itself may not
            if not all(bool(torch.isfinite(t).all()) for t in leaves):
                raise ValueError(
                    f"ste_matching diverged: the free point θ̃ became non-finite at step {s + 1}/{steps} "
                    f"with {optimizer} lr={lr:g}; try a lower learning rate (or set grad_clip)"
                )
            projected = False
            step_losses.append(float(loss.detach()))
            if (s + 1) % every == 0 or s + 1 == steps:
                new = project(perm, s + 1)
                if new != perm:
                    perm, pb = new, new.apply(spec, b)
                projected = True
                history.append(score(pb))
                eval_steps.append(s + 1)
                candidates.append(perm)
                bar.set_postfix(mid_loss=f"{history[-1]:.4f}")
    best = min(range(len(history)), key=lambda i: (history[i], i))
    return STEResult(
        candidates[best],
        history[best],
        tuple(history),
        "ste",
        seed,
        step_losses=tuple(step_losses),
        eval_steps=tuple(eval_steps),
        best_step=eval_steps[best],
        candidates=tuple(candidates),
    )
