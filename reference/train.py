"""Training loops: one model (``train``), or K models at once (``train_many``).

A model is trained *functionally*: the ``nn.Module`` is only the architecture, its parameters and
buffers come from a ``Params`` dict (``state_dict`` keys, BatchNorm's ``running_mean``,
``running_var`` and ``num_batches_tracked`` included), and a new ``Params`` comes back, on CPU. The
inputs are never modified.

One step of ``train`` for model k with seed s_k:

1. data order: at the start of every epoch ``torch.randperm(n, generator=g_k)`` with
   ``g_k = torch.Generator().manual_seed(s_k)`` (drawn on CPU, so the order does not depend on the
   device); consecutive minibatches of ``batch_size`` indices. The last, smaller batch is *kept*
   (every example is seen once per epoch) unless ``drop_last=True``;
2. forward ``functional_call(model, θ_k ∪ buffers_k, x[idx])`` in train mode; BatchNorm updates the
   running statistics in ``buffers_k`` (our own copies) in place;
3. loss: mean cross-entropy (optionally label-smoothed, Szegedy et al. 2016, §7);
4. optional gradient clipping to a global norm (per model, as ``torch.nn.utils.clip_grad_norm_``);
5. optimizer step with learning rate ``lr_schedule(cfg, step, total_steps)``:
   - ``"sgd"``: heavy-ball momentum with coupled weight decay, as ``torch.optim.SGD``
     (Sutskever et al. 2013; ``b ← μ b + (g + λθ)``, ``θ ← θ − η b``);
   - ``"adam"``: Kingma & Ba 2015, Algorithm 1, with L2 weight decay added to the gradient, as
     ``torch.optim.Adam``;
   - ``"adamw"``: Adam with decoupled weight decay (Loshchilov & Hutter 2019, Algorithm 2), as
     ``torch.optim.AdamW``.
   The update formulas repeat those of ``torch.optim`` (single-tensor path) operation for operation.

``train_many`` runs the same algorithm for K models in one program: the K parameter dicts are
stacked along a new leading dimension (as ``torch.func.stack_module_state``), the forward pass is
``vmap(functional_call)`` over parameters, buffers *and* the per-model minibatches ``x[idx_k]``, the
loss is the sum of the K per-model mean losses (so the gradient with respect to model k's slice is
exactly model k's gradient), and the optimizer's element-wise updates run on the stacked tensors.
It gives the same numbers as K calls of ``train`` up to floating-point reassociation in the batched
kernels (tests: float64 to 1e-9, float32 to 1e-4 relative after a few epochs). One exception in
float32: a parameter whose true gradient is 0 (a bias right before BatchNorm) receives only rounding
noise, which Adam's m/√v normalisation turns into lr-sized steps that differ between the two.

BatchNorm under ``vmap``: the buffers are passed to the vmapped function with ``in_dims=0``, so
inside ``vmap`` they are batched tensors and BatchNorm's in-place running-statistics update (and
``num_batches_tracked += 1``) writes into each model's own slice of the stacked buffers. (An
unbatched buffer would make that in-place update illegal, which is why
``torch.func.replace_all_batch_norm_modules_`` exists: it drops running statistics, which we keep.)
The one BatchNorm form that cannot run under ``vmap`` is ``momentum=None`` (a cumulative average
that reads ``num_batches_tracked`` as a Python number); ``train_many`` rejects it with a
``ValueError``, ``train`` supports it.

Random layers (dropout) draw from torch's global RNG, forked and seeded with the model's seed for
the duration of the call (the caller's RNG state is left unchanged). ``train_many`` draws different
masks for the K models (``vmap(randomness="different")``) from the RNG seeded with ``seeds[0]``;
for such models it is deterministic but not equal to K sequential trains.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from .cost import forward_cost
from .fit import (
    Batch,
    check_data,
    fit,
    module_mode,
    pick_device,
    prepare,
    raise_if_diverged,
    resolve_device,
    seeded_rng,
    split_trainable,
    training_mode,
)
from .optim import OPTIMIZERS, SCHEDULES, TrainConfig, clip_grads, lr_schedule, opt_step_
from .params import Params, check_compatible, check_finite
from .validate import choice, integer

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "TrainConfig",
    "check_data",
    "clip_grads",
    "lr_schedule",
    "module_mode",
    "opt_step_",
    "pick_device",
    "raise_if_diverged",
    "resolve_device",
    "seeded_rng",
    "choose_strategy",
    "split_trainable",
    "train",
    "train_many",
    "training_mode",
]


# ---------------------------------------------------------------------------------------------
# public entry points


def train(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    cfg: TrainConfig,
    seed: int,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> Params:
    """Train one model from ``params``; return the trained ``Params`` (new tensors, on CPU).

    ``x``: inputs ``[n, ...]``; ``y``: class indices ``[n]``. ``device``: where to train (a
    ``torch.device`` or a name for ``pick_device``, e.g. ``"auto"``); ``None`` trains where
    ``params`` live. Raises ``ValueError`` if the loss becomes NaN or infinite.
    """
    return _fit(model, [params], x, y, cfg, [seed], device, progress, batched=False)[0]


def train_many(
    model: nn.Module,
    params_list: Sequence[Mapping[str, Tensor]],
    x: Tensor,
    y: Tensor,
    cfg: TrainConfig,
    seeds: Sequence[int],
    device: torch.device | str | None = None,
    progress: bool = True,
    strategy: str = "auto",
) -> list[Params]:
    """Train K models; model k starts at ``params_list[k]`` and draws its data order from ``seeds[k]``.

    ``strategy``: ``"vmap"`` trains them at once (stacked parameters, ``vmap``); ``"sequential"`` one
    after another (``train`` each); ``"auto"`` (default) takes ``choose_strategy``: vmap where it pays
    (small models, or any model on CUDA), sequential where it does not. Returns K new ``Params`` on CPU,
    equal to ``[train(model, p, x, y, cfg, s) for p, s in ...]``: exactly so for ``"sequential"``, up to
    floating-point reassociation for ``"vmap"`` (see the module docstring; models with dropout draw
    other masks under vmap).
    """
    params_list = list(params_list)
    seeds = list(seeds)
    if not params_list:
        raise ValueError("params_list is empty: need at least one model to train")
    if len(seeds) != len(params_list):
        raise ValueError(
            f"got {len(params_list)} parameter points but {len(seeds)} seeds; need one seed each"
        )
    check_compatible(*params_list)
    choice("strategy", strategy, ("auto", "vmap", "sequential"))
    cumulative = _cumulative_norms(model)
    if strategy == "auto":
        strategy = choose_strategy(model, params_list[0], x, cfg, device)
    if strategy == "sequential":
        return [train(model, p, x, y, cfg, s, device, progress) for p, s in zip(params_list, seeds, strict=True)]
    if cumulative:
        mod = model.get_submodule(cumulative[0])
        raise ValueError(
            f"module {cumulative[0]!r} ({type(mod).__name__}) has momentum=None (cumulative running average), "
            "which reads num_batches_tracked as a Python number and cannot run under vmap; "
            "give it a momentum or train the models one at a time (strategy='sequential')"
        )
    return _fit(model, params_list, x, y, cfg, seeds, device, progress, batched=True)


# ``choose_strategy`` on the CPU (bench/bench_train_many.py, K=4 MLPs 64-w-w-10, batch 128, torch 2.13):
# with 2 threads vmap / sequential = 1.34x at w=32 (0.9 MFLOP per model and step), 1.12x at w=128 (6.6),
# 0.96-1.05x at w=256 (22), 0.76-0.88x at w=512 (77); with 1 thread 1.15x at w=16 (0.4), 0.97x at w=32,
# 0.74-0.92x from w=64 on: batching K models pays where it gives the threads larger operations to share.
_VMAP_MAX_STEP_FLOPS = 30e6  # 2 or more torch threads
_VMAP_MAX_STEP_FLOPS_ONE_THREAD = 0.6e6


def _cumulative_norms(model: nn.Module) -> list[str]:
    """The norm layers with ``momentum=None`` (a cumulative running average): they cannot run under vmap."""
    return [name for name, mod in model.named_modules()
            if isinstance(mod, nn.modules.batchnorm._NormBase) and mod.track_running_stats and mod.momentum is None]


def choose_strategy(
    model: nn.Module, point: Mapping[str, Tensor], x: Tensor, cfg: TrainConfig,
    device: torch.device | str | None = None, threads: int | None = None,
) -> str:
    """``train_many``'s ``"auto"``: ``"sequential"`` for a model with a ``momentum=None`` norm layer (it cannot
    run under vmap); else ``"vmap"`` on CUDA; on the CPU ``"vmap"`` when one model's forward on a minibatch
    (``reference.cost.forward_cost`` × ``batch_size``) costs < 30 MFLOP with 2 or more torch threads, < 0.6
    MFLOP with 1, and runs no convolution (vmapped convolutions are slow on the CPU), else ``"sequential"``.
    ``threads``: the torch threads the training will run with (default: this process's; a runner deciding
    for a worker process passes the worker's). Depends on the architecture, the config and the thread count,
    never on a timing."""
    if _cumulative_norms(model):
        return "sequential"
    if resolve_device(device, point).type != "cpu":
        return "vmap"
    n = torch.get_num_threads() if threads is None else integer("threads", threads)
    flops, conv = forward_cost(model, point, x)
    limit = _VMAP_MAX_STEP_FLOPS_ONE_THREAD if n == 1 else _VMAP_MAX_STEP_FLOPS
    return "sequential" if conv or flops * min(cfg.batch_size, x.shape[0]) >= limit else "vmap"


def _fit(
    model: nn.Module,
    params_list: list[Mapping[str, Tensor]],
    x: Tensor,
    y: Tensor,
    cfg: TrainConfig,
    seeds: list[int],
    device: torch.device | str | None,
    progress: bool,
    batched: bool,
) -> list[Params]:
    """The loop behind ``train`` (``batched=False``, one model) and ``train_many`` (``batched=True``)."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    prep = prepare(model, params_list[0], x, y, cfg, device)
    p_keys, b_keys, dev, extra, x, y = prep.p_keys, prep.b_keys, prep.device, prep.constants, prep.x, prep.y
    K = len(seeds)
    bd = 1 if batched else 0  # leading batch dims of every tensor in the loop

    def start(k: str) -> Tensor:
        """A new tensor on ``dev``: the K points stacked (batched) or a copy of the one point."""
        if batched:
            return torch.stack([p[k].detach().to(dev) for p in params_list])
        return params_list[0][k].detach().to(dev).clone()

    leaves = [start(k).requires_grad_(True) for k in p_keys]
    buffers = [start(k) for k in b_keys]  # our own copies: BatchNorm updates them in place

    ls = cfg.label_smoothing

    def forward(p: Sequence[Tensor], b: Sequence[Tensor], xb: Tensor) -> Tensor:
        tensors = {**dict(zip(p_keys, p, strict=True)), **dict(zip(b_keys, b, strict=True)), **extra}
        return functional_call(model, tensors, (xb,), strict=True)

    def ce(logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits, target, label_smoothing=ls)

    if batched:
        batched_forward: Callable[..., Tensor] = vmap(forward, in_dims=(0, 0, 0), randomness="different")
        batched_ce: Callable[..., Tensor] = vmap(ce)

    def loss(batch: Batch) -> Tensor:
        if batched:
            return batched_ce(batched_forward(leaves, buffers, batch.x), batch.y)  # [K]
        return ce(forward(leaves, buffers, batch.x), batch.y)

    def who(k: int) -> str:
        tag = f"(model {k} of {K}, seed {seeds[k]})" if batched else f"(seed {seeds[0]})"
        return f"{tag} with {cfg.optimizer} lr={cfg.lr:g}"

    with training_mode(model), seeded_rng(int(seeds[0]), dev):
        fit(leaves, loss, x, y, cfg, [torch.Generator().manual_seed(int(s)) for s in seeds], batch_dims=bd,
            context=who, progress=progress, desc=f"train ×{K}" if batched else "train")

    out: list[Params] = []
    for k in range(K):
        got = {key: t.detach()[k] if batched else t.detach() for key, t in zip(p_keys, leaves, strict=True)}
        got.update({key: t[k] if batched else t for key, t in zip(b_keys, buffers, strict=True)})
        point = {key: got[key].cpu().clone() for key in params_list[0]}
        check_finite(point, what=f"trained parameters (seed {seeds[k]}); try a lower learning rate")
        out.append(point)
    return out
