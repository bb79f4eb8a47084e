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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.func import functional_call

from .params import check_compatible, check_finite, float_keys
from .permutation import Permutation, PermutationSpec

__all__ = [
    "MatchResult",
    "weight_matching",
    "weight_matching_objective",
    "activation_matching",
    "solve_lap",
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
