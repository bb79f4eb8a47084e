"""Ensembles of parameter points: member probabilities, metric tables, FGE and deep ensembles.

An ensemble of K members θ₁ … θ_K of one architecture predicts the mean of the members'
probabilities, p̄(y | x) = (1/K) Σₖ softmax f(θₖ, x) (Lakshminarayanan et al. 2017; Garipov et al.
2018, FGE; Benton et al. 2021, ESPRO). Members are stacked ``Params`` (leading dimension K) and evaluated in
vmapped chunks by ``reference.evaluate.predict_logits``; the members may come from anywhere: curve
points, simplex samples (``reference.simplex.sample_members``), FGE snapshots or independent trainings.

**Fast Geometric Ensembling** (Garipov, Izmailov, Podoprikhin, Vetrov & Wilson 2018,
arXiv:1802.10026, the FGE section). Starting from a trained network, SGD runs with the cyclical
learning rate of cycle length c iterations

    t(i) = (mod(i − 1, c) + 1) / c,
    α(i) = (1 − 2t(i)) α₁ + 2t(i) α₂          for 0 < t(i) ≤ ½,
    α(i) = (2 − 2t(i)) α₂ + (2t(i) − 1) α₁    for ½ < t(i) ≤ 1,                        (FGE)

(i = 1, 2, … the iteration; the rate falls linearly from α₁ to α₂ in the first half of every cycle
and rises back to α₁ in the second), and the model is collected once per cycle when t(i) = ½, where
the rate is lowest (α₂). ``fge`` does this functionally (the loop of ``reference.train``): c =
``cycle_epochs · cfg.steps_per_epoch(n)`` iterations, the snapshot taken after iteration
``mod(i − 1, c) + 1 = c // 2`` of each cycle (t = ½ exactly when c is even; for odd c the first of
the two iterations that share the lowest rate). The authors' ``fge.py`` starts the optimizer from
the checkpoint's momentum buffer; here the momentum starts at 0.

**Deep ensembles** (``deep_ensemble``): independent trainings from ``init_params(model, seed)``, all
at once with ``reference.train.train_many``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .bn import has_batchnorm, recompute_bn_stats_batched
from .evaluate import all_metrics, ensemble_metrics, predict_logits
from .fit import Batch, fit, prepare, seeded_rng, training_mode
from .models import init_params
from .optim import TrainConfig
from .params import Params, check_finite
from .train import train_many
from .validate import integer, leading_size, number

__all__ = [
    "deep_ensemble",
    "ensemble_probs",
    "ensemble_table",
    "fge",
    "fge_learning_rate",
    "fge_snapshot_step",
]

_METRICS = ("nll", "accuracy", "error", "ece", "auroc")


def ensemble_probs(
    model: nn.Module,
    stacked_params: Mapping[str, Tensor],
    x: Tensor,
    recompute_bn: bool = False,
    x_bn: Tensor | None = None,
    *,
    bn_batch_size: int | None = None,
    bn_method: str = "pooled",
    chunk_size: int | None = None,
    batch_size: int = 4096,
    device: torch.device | str | None = None,
) -> Tensor:
    """Probabilities ``[K, N, C]`` (float64) of the K stacked members on inputs ``x``, in eval mode.

    With ``recompute_bn`` and a BatchNorm model, every member's running statistics are first
    recomputed on ``x_bn`` (``reference.bn.recompute_bn_stats_batched``, ``bn_method``,
    ``bn_batch_size``) — required for members that were never trained as such (curve points,
    simplex samples). ``x_bn`` must then be given (normally the training inputs: statistics taken on
    the evaluated test inputs would leak them). The softmax is taken in float64, so confident wrong
    predictions keep a finite log-probability.
    """
    leading_size(stacked_params)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    stacked = dict(stacked_params)
    if device is not None:
        stacked = {k: v.to(device) for k, v in stacked.items()}
    if recompute_bn and has_batchnorm(model):
        if x_bn is None:
            raise ValueError(
                "recompute_bn=True on a BatchNorm model needs x_bn, the inputs to recompute the running "
                "statistics on (normally the training inputs)"
            )
        stacked = recompute_bn_stats_batched(
            model, stacked, x_bn, batch_size=bn_batch_size, method=bn_method, chunk_size=chunk_size
        )
    logits = predict_logits(model, stacked, x, chunk_size=chunk_size, batch_size=batch_size, device=device)
    return torch.softmax(logits.double(), dim=-1)


def ensemble_table(member_probs: Tensor, y: Tensor, n_bins: int = 15) -> dict[str, object]:
    """Metrics of the ensemble and of each member: NLL (= cross-entropy), accuracy, error, ECE
    (``n_bins`` bins) and one-vs-rest AUROC (``reference.evaluate.all_metrics``).

    ``member_probs``: ``[K, N, C]``. Returns ``{"ensemble": ensemble_metrics(...)`` (the metrics of
    the mean probability, plus ``"members": K``), ``"members": [all_metrics(member k)]`` and
    ``"member_mean"``: each metric averaged over the members (the usual "single model" baseline)``}``.
    """
    if not isinstance(member_probs, Tensor) or member_probs.ndim != 3:
        shape = tuple(member_probs.shape) if isinstance(member_probs, Tensor) else type(member_probs).__name__
        raise ValueError(f"member probabilities must be a [K, N, C] tensor, got {shape}")
    if member_probs.shape[0] == 0:
        raise ValueError("member probabilities hold no members (K = 0)")
    members = [all_metrics(p, y, n_bins) for p in member_probs]
    mean = {m: math.fsum(r[m] for r in members) / len(members) for m in _METRICS}
    return {"ensemble": ensemble_metrics(member_probs, y, n_bins), "members": members, "member_mean": mean}


# ---------------------------------------------------------------------------------------------
# Fast Geometric Ensembling


def fge_learning_rate(i: int, cycle: int, lr1: float, lr2: float) -> float:
    """α(i) of Eq. (FGE) (module docstring) for iteration ``i`` ≥ 1 and cycle length ``cycle`` ≥ 2."""
    if isinstance(i, bool) or not isinstance(i, int) or i < 1:
        raise ValueError(f"iteration i must be an integer >= 1, got {i!r}")
    if isinstance(cycle, bool) or not isinstance(cycle, int) or cycle < 2:
        raise ValueError(f"cycle must be an integer >= 2 (iterations per cycle), got {cycle!r}")
    t = ((i - 1) % cycle + 1) / cycle
    if t <= 0.5:
        return (1.0 - 2.0 * t) * lr1 + 2.0 * t * lr2
    return (2.0 - 2.0 * t) * lr2 + (2.0 * t - 1.0) * lr1


def fge_snapshot_step(cycle: int) -> int:
    """The iteration within a cycle (1-based) after which FGE collects its snapshot: ``cycle // 2``."""
    if isinstance(cycle, bool) or not isinstance(cycle, int) or cycle < 2:
        raise ValueError(f"cycle must be an integer >= 2 (iterations per cycle), got {cycle!r}")
    return cycle // 2


def fge(
    model: nn.Module,
    params_init: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    cycle_epochs: int,
    n_cycles: int,
    lr1: float,
    lr2: float,
    cfg: TrainConfig,
    seed: int = 0,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> list[Params]:
    """Fast Geometric Ensembling (Garipov et al. 2018; Eq. (FGE) of the module docstring): run
    ``n_cycles`` cycles of ``cycle_epochs`` epochs from ``params_init`` (a trained network) and return
    the ``n_cycles`` snapshots (new ``Params`` on CPU, buffers as tracked during the run).

    ``cfg`` supplies the optimizer (``"sgd"`` with its momentum in the paper; Adam works too), weight
    decay, batch size, ``drop_last``, label smoothing and clipping; its ``lr``, ``schedule``,
    ``warmup_frac`` and ``epochs`` are not used (the rate is α(i), the length
    ``n_cycles · cycle_epochs`` epochs). Data order as ``reference.train.train``: per epoch
    ``torch.randperm(n, generator=g)`` with ``g`` seeded by ``seed``; with ``lr1 == lr2 == cfg.lr`` the
    run is exactly ``train`` with a constant schedule. Raises ``ValueError`` for a cycle of fewer than
    two iterations and when the loss becomes NaN or infinite.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    integer("cycle_epochs", cycle_epochs)
    integer("n_cycles", n_cycles)
    lr1, lr2 = number("lr1", lr1, positive=True), number("lr2", lr2, positive=True)
    prep = prepare(model, params_init, x, y, cfg, device)
    p_keys, b_keys, dev, extra, x, y = prep.p_keys, prep.b_keys, prep.device, prep.constants, prep.x, prep.y
    n = x.shape[0]
    steps = cfg.steps_per_epoch(n)
    cycle = cycle_epochs * steps
    if cycle < 2:
        raise ValueError(
            f"an FGE cycle needs at least 2 iterations, got {cycle} ({cycle_epochs} epoch(s) of {steps} "
            f"minibatch(es)); use more cycle_epochs or a smaller batch_size"
        )
    snap = fge_snapshot_step(cycle)
    leaves = [params_init[k].detach().to(dev).clone().requires_grad_(True) for k in p_keys]
    buffers = [params_init[k].detach().to(dev).clone() for k in b_keys]

    def objective(batch: Batch) -> Tensor:
        tensors = {**dict(zip(p_keys, leaves, strict=True)), **dict(zip(b_keys, buffers, strict=True)), **extra}
        logits = functional_call(model, tensors, (batch.x,), strict=True)
        return F.cross_entropy(logits, batch.y, label_smoothing=cfg.label_smoothing)

    snapshots: list[Params] = []

    def snapshot(batch: Batch) -> None:
        if batch.step % cycle + 1 == snap:
            got = {k: t.detach() for k, t in zip(p_keys, leaves, strict=True)}
            got.update(dict(zip(b_keys, buffers, strict=True)))
            point = {k: got[k].cpu().clone() for k in params_init}
            check_finite(point, what=f"FGE snapshot {len(snapshots) + 1} (seed {seed})")
            snapshots.append(point)

    with training_mode(model), seeded_rng(int(seed), dev):
        fit(leaves, objective, x, y, cfg, torch.Generator().manual_seed(int(seed)), epochs=n_cycles * cycle_epochs,
            lr=lambda i, _total: fge_learning_rate(i + 1, cycle, lr1, lr2), after_step=snapshot, what="FGE",
            context=f"(seed {seed}) with lr1={lr1:g}, lr2={lr2:g}", hint="try a lower lr1", progress=progress,
            desc="FGE")
    return snapshots


# ---------------------------------------------------------------------------------------------
# deep ensembles


def deep_ensemble(
    model: nn.Module,
    seeds: Sequence[int],
    x: Tensor,
    y: Tensor,
    cfg: TrainConfig,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> list[Params]:
    """Deep ensemble (Lakshminarayanan et al. 2017): member k starts at ``init_params(model, seeds[k])``
    and is trained with data order ``seeds[k]``; all K trainings run at once (``train_many``)."""
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds is empty: a deep ensemble needs at least one member")
    inits = [init_params(model, int(s)) for s in seeds]
    return train_many(model, inits, x, y, cfg, [int(s) for s in seeds], device=device, progress=progress)
