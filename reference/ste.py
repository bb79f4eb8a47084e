"""The straight-through estimator over permutations of n points (Git Re-Basin §3.3 for n = 2).

Given models θ₁ … θₙ (θ₁ fixed), look for permutations P₂ … Pₙ such that points
Σᵢ λᵢ Pᵢ(θᵢ) (P₁ = id) have a low training loss. A free point θ̃ᵢ is kept for every i ≥ 2; each step

1. projects θ̃ᵢ onto θᵢ's permutation orbit, ``Pᵢ = weight_matching(θ̃ᵢ, θᵢ, init=Pᵢ)``
   (warm-started; only every ``rematch_every`` steps, and at every evaluation), weight-matching order
   seed ``seed + 1 + s`` at step s; the projection is the only place a similarity is rounded to a
   permutation, so it respects the spec's blocks, segments and attention head classes (each class
   solved jointly, ``reference.matching.solve_coupled``) and every candidate keeps the function;
2. forms the point(s) ``Σᵢ λᵢ (Pᵢ(θᵢ) + θ̃ᵢ − stopgrad(θ̃ᵢ))``: their value is Σᵢ λᵢ Pᵢ(θᵢ), their
   gradient with respect to θ̃ᵢ is λᵢ times the loss gradient at the point (the straight-through
   estimator, Bengio et al. 2013);
3. takes one optimiser step (``reference.fit``) on the θ̃ᵢ for the minibatch cross-entropy: at one
   fixed λ (Git Re-Basin: the midpoint λ = (½, ½), one forward pass), or averaged over T points
   λ ∼ Dir drawn per step from the data-order generator (the permuted simplex's interior search,
   one vmapped forward pass).

Buffers (BatchNorm running statistics) are not trained: at the points they are Σᵢ λᵢ Pᵢ(θᵢ)'s,
integer buffers are θ₁'s. θ̃ᵢ starts at Pᵢ(θᵢ) (``start="vertex"``) or at θ₁ (``start="anchor"``,
Algorithm 2 and the authors' code for n = 2); its buffers are those of its starting point. The
candidates, the initial permutations and the projections after every ``eval_every`` steps and after
the last step, are scored by the caller's ``score`` on the permuted vertices; the best is returned
(lowest score, earliest on ties), so the result is never worse than the initial permutations on
that score by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from .fit import Batch, check_data, fit, module_constants, module_mode, pick_device, split_trainable
from .matching import MatchResult, weight_matching
from .merge import check_models
from .optim import TrainConfig
from .params import Params, is_float
from .permutation import Permutation, PermutationSpec
from .validate import choice, integer, optional_integer

__all__ = ["STEResult", "SearchResult", "midpoint_loss", "ste_matching", "straight_through"]

STARTS = ("vertex", "anchor")


@dataclass(frozen=True)
class SearchResult:
    """``straight_through``'s output.

    ``history[c]``: the score of candidate c (``candidates[c]``, one permutation per model, the first
    the identity), measured after ``eval_steps[c]`` steps (c = 0: the initial permutations); ``perms``
    and ``score``: the best candidate, reached at ``best_step``; ``step_losses[s]``: the minibatch loss
    of step s before its update; ``changed[c]``: units moved relative to the initial permutations,
    summed over groups and models.
    """

    perms: tuple[Permutation, ...]
    score: float
    history: tuple[float, ...]
    eval_steps: tuple[int, ...]
    best_step: int
    step_losses: tuple[float, ...]
    changed: tuple[int, ...]
    candidates: tuple[tuple[Permutation, ...], ...] = field(default=(), repr=False)


def _moved(a: Sequence[Permutation], b: Sequence[Permutation]) -> int:
    return sum(int((p[g] != q[g]).sum()) for p, q in zip(a, b, strict=True) for g in p.keys())


def straight_through(
    model: nn.Module,
    spec: PermutationSpec,
    models: Sequence[Mapping[str, Tensor]],
    x: Tensor,
    y: Tensor,
    *,
    init: Sequence[Permutation],
    cfg: TrainConfig,
    steps: int,
    coefficients: Tensor | Callable[[torch.Generator], Tensor],
    score: Callable[[list[Params]], float],
    start: str = "vertex",
    rematch_every: int = 1,
    eval_every: int | None = None,
    train_mode: bool = False,
    seed: int = 0,
    what: str = "straight-through search",
    progress: bool = False,
    desc: str = "ste",
) -> SearchResult:
    """The search of the module docstring on ``models`` (on one device; θ₁ = ``models[0]``).

    ``init``: one permutation per model, ``init[0]`` the identity. ``cfg``: batch size, optimiser
    (``"sgd"``/``"adam"``/``"adamw"``, momentum, weight decay, clipping) and a constant rate
    ``cfg.lr`` (its ``epochs`` are not used: ``steps`` counts the steps). ``coefficients``: one λ
    ``[n]`` for every step, or a function drawing ``[T, n]`` from the data-order generator
    (``torch.Generator().manual_seed(seed)``). ``score(vertices)``: lower is better, given the
    permuted vertices [θ₁, P₂(θ₂), …]. ``eval_every`` defaults to one epoch of ``x``.
    """
    n = len(models)
    steps = integer("steps", steps)
    rematch_every = integer("rematch_every", rematch_every)
    eval_every = optional_integer("eval_every", eval_every)
    choice("start", start, STARTS)
    check_data(x, y, cfg)
    perms = [Permutation(p.to_dict(), spec) for p in init]  # ValueError if one does not fit the spec
    if len(perms) != n:
        raise ValueError(f"init holds {len(perms)} permutations for {n} models")
    if not perms[0].is_identity():
        raise ValueError("init[0] must be the identity: the first model is the fixed vertex")
    p_keys, _ = split_trainable(model, models[0])
    p_keys = [k for k in p_keys if is_float(models[0][k])]
    if not p_keys:
        raise ValueError(f"the model has no trainable parameters: nothing for the {what} to move")
    ms = list(models)
    first = ms[0]
    dev = next(iter(first.values())).device
    f_keys = [k for k in first if is_float(first[k])]
    ints = {k: first[k] for k in first if k not in f_keys}
    extra = module_constants(model, first, dev)
    verts = [first] + [perms[i].apply(spec, ms[i]) for i in range(1, n)]
    origin = [first if start == "anchor" else verts[i] for i in range(n)]
    leaves = [{k: origin[i][k].clone().requires_grad_(True) for k in p_keys} for i in range(1, n)]
    flat = [t for lv in leaves for t in lv.values()]
    fixed = isinstance(coefficients, Tensor)
    g = torch.Generator().manual_seed(seed)
    x, y = x.to(dev), y.to(dev, torch.long)
    init_perms = list(perms)

    def project(s: int) -> None:
        """Pᵢ ← WM(θ̃ᵢ, θᵢ), warm-started from the current Pᵢ (order seed ``seed + 1 + s``), i ≥ 2."""
        for i in range(1, n):
            base = first if start == "anchor" else verts[i]
            tilde = {**base, **{k: t.detach() for k, t in leaves[i - 1].items()}}
            new = weight_matching(spec, tilde, ms[i], seed=seed + 1 + s, init=perms[i]).perm
            if new != perms[i]:
                perms[i], verts[i] = new, new.apply(spec, ms[i])

    def forward(p: Mapping[str, Tensor], xb: Tensor) -> Tensor:
        # integer buffers copied: BatchNorm in train mode counts batches into them in place
        return functional_call(model, {**p, **{k: v.clone() for k, v in ints.items()}, **extra}, (xb,))

    def objective(batch: Batch) -> Tensor:
        lam = coefficients if fixed else coefficients(g)
        lam = lam.to(dev, first[f_keys[0]].dtype)
        point = {}
        for k in f_keys:
            rows = [first[k]] + [
                verts[i][k] + (leaves[i - 1][k] - leaves[i - 1][k].detach()) if k in leaves[i - 1] else verts[i][k]
                for i in range(1, n)
            ]
            point[k] = torch.tensordot(lam, torch.stack(rows), dims=1)
        if fixed:
            return F.cross_entropy(forward(point, batch.x), batch.y)
        logits = vmap(forward, in_dims=(0, None), randomness="different")(point, batch.x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.y.repeat(logits.shape[0]))

    history = [score(verts)]
    eval_steps, candidates, changed = [0], [tuple(perms)], [0]
    every = eval_every or cfg.steps_per_epoch(x.shape[0])
    projected = start == "vertex"  # θ̃ᵢ = Pᵢ(θᵢ) projects onto Pᵢ itself

    def before(batch: Batch) -> None:
        if batch.step % rematch_every == 0 and not projected:
            project(batch.step)

    def after(batch: Batch) -> None:
        nonlocal projected
        # the points' value Σ λᵢ Pᵢ(θᵢ) stays finite whatever θ̃ is; θ̃ itself may not
        if not bool(torch.stack([torch.isfinite(t).all() for t in flat]).all()):  # one host sync
            raise ValueError(
                f"{what} diverged: a free point θ̃ became non-finite at step {batch.step + 1}/{steps} "
                f"with {cfg.optimizer} lr={cfg.lr:g}; try a lower learning rate (or set grad_clip)"
            )
        projected = False
        s = batch.step + 1
        if s % every == 0 or s == steps:
            project(s)
            projected = True
            history.append(score(verts))
            eval_steps.append(s)
            candidates.append(tuple(perms))
            changed.append(_moved(perms, init_perms))

    with module_mode(model, train_mode):
        res = fit(flat, objective, x, y, cfg, g, steps=steps, before_step=before, after_step=after, check="step",
                  what=what, context=f"with {cfg.optimizer} lr={cfg.lr:g}", progress=progress, desc=desc)
    best = min(range(len(history)), key=lambda c: (history[c], c))
    return SearchResult(
        perms=candidates[best], score=history[best], history=tuple(history), eval_steps=tuple(eval_steps),
        best_step=eval_steps[best], step_losses=tuple(float(v) for v in res.losses[:, 0]), changed=tuple(changed),
        candidates=tuple(candidates),
    )


# ---------------------------------------------------------------------------------------------
# Git Re-Basin's STE: n = 2 at the midpoint


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
def midpoint_loss(
    model: nn.Module,
    a: Mapping[str, Tensor],
    pb: Mapping[str, Tensor],
    constants: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    batch_size: int,
) -> float:
    """Mean cross-entropy on (x, y) at ½(θ_a + P(θ_b)) (integer buffers from θ_a), in ``batch_size`` chunks."""
    mid = {k: 0.5 * (a[k] + pb[k]) if is_float(a[k]) else a[k].clone() for k in a}
    total = 0.0
    for s in range(0, x.shape[0], batch_size):
        logits = functional_call(model, {**mid, **constants}, (x[s : s + batch_size],))
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
    """Git Re-Basin's straight-through estimator (Ainsworth et al. 2023, §3.3, Algorithm 2):
    ``straight_through`` with n = 2, λ = (½, ½) and θ̃ starting at θ_a (``start="anchor"``).

    Searches for P minimising the training loss at the midpoint ½(θ_a + P(θ_b)); ``∇_θ̃ L = ½ ∇L(θ_mid)``.
    ``optimizer`` as in ``reference.optim`` (``"sgd"`` with ``momentum``, as the authors, or
    ``"adam"`` / ``"adamw"``; constant ``lr``, optional ``grad_clip``). ``train_mode=True`` evaluates
    the midpoint with batch statistics (the averaged running statistics are not the midpoint's own);
    it makes no difference for nets without BatchNorm or dropout.

    Data order: a ``torch.randperm`` per epoch from ``torch.Generator().manual_seed(seed)``;
    candidates are scored by the midpoint loss on all of (x, y) (``midpoint_loss``). ``init`` defaults
    to ``weight_matching(spec, θ_a, θ_b, seed=seed)``: the first projection of θ̃ = θ_a is then that
    same permutation, so the result is never worse than weight matching on this training loss *by
    construction* (``best_step == 0`` says STE found nothing better). The authors instead kept the
    permutation with the lowest minibatch loss.
    """
    check_models(spec, [params_a, params_b], 2)
    integer("eval_batch_size", eval_batch_size)
    cfg = TrainConfig(epochs=1, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
                      optimizer=optimizer, grad_clip=grad_clip)
    check_data(x, y, cfg)
    dev = next(iter(params_a.values())).device if device is None else pick_device(device)
    a = {k: v.detach().to(dev) for k, v in params_a.items()}
    b = {k: v.detach().to(dev) for k, v in params_b.items()}
    extra = module_constants(model, a, dev)
    x, y = x.to(dev), y.to(dev, dtype=torch.long)
    if init is None:
        perm = weight_matching(spec, a, b, seed=seed).perm
    else:
        perm = Permutation(init.to_dict(), spec)  # ValueError if it does not fit the spec

    def score(verts: list[Params]) -> float:
        with module_mode(model, train_mode):
            return midpoint_loss(model, a, verts[1], extra, x, y, eval_batch_size)

    half = torch.tensor([0.5, 0.5], dtype=torch.float64)
    r = straight_through(model, spec, [a, b], x, y, init=[Permutation.identity(spec), perm], cfg=cfg, steps=steps,
                         coefficients=half, score=score, start="anchor", rematch_every=rematch_every,
                         eval_every=eval_every, train_mode=train_mode, seed=seed, what="ste_matching",
                         progress=progress, desc="ste")
    return STEResult(
        r.perms[1], r.score, r.history, "ste", seed, step_losses=r.step_losses, eval_steps=r.eval_steps,
        best_step=r.best_step, candidates=tuple(c[1] for c in r.candidates),
    )
