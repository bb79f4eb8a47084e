"""The one fitting loop: every method that moves parameters by minibatch gradient steps calls ``fit``.

Endpoint training (one model or K at once), curve training, SPRO/ESPRO, FGE, NEB relaxation and the
n-point straight-through search over permutations (Git Re-Basin's STE and the permuted simplex's
interior alignment) differ only in *what* they differentiate and *what happens around a step*; the
loop is the same:

1. data order: at the start of every epoch ``torch.randperm(n, generator=g)`` for each of the given
   CPU generators (one, or one per model for K models at once: indices ``[K, n]``); consecutive
   minibatches of ``cfg.batch_size`` indices, the last smaller one kept unless ``cfg.drop_last``;
2. ``before_step(batch)`` (e.g. re-project a free point onto a permutation orbit);
3. ``loss(batch)``: the caller's objective, differentiable in ``leaves``. It returns a tensor (a
   scalar, or one loss per model ``[K]``: their sum is differentiated, each is recorded); a pair
   ``(loss, record)`` to record something else than what is differentiated (NEB differentiates the
   sum of its pivots' losses and records their mean); or an iterable of parts whose gradients are
   accumulated one after another (the same gradient as their sum, one part's graph alive at a time);
4. gradients of ``leaves`` (unused leaves get zeros); optional ``grad_transform`` (NEB's nudged
   force); clipping to ``cfg.grad_clip`` per model; one ``cfg.optimizer`` step (``opt_step_``) at the
   rate ``lr(step, total)`` (default ``lr_schedule``);
5. ``after_step(batch)`` (snapshots, projections, re-parametrisations, candidate scoring);
6. a NaN / infinite loss (infinite in float32) raises ``ValueError`` naming where it happened:
   checked once per epoch (one host sync per epoch) or, with ``check="step"``, before every update.

``steps`` cuts the run after that many steps (a step budget instead of whole epochs). The caller
owns the module's mode and RNG contexts (``module_mode``, ``seeded_rng``, BatchNorm momentum), since
some callers share them across several ``fit`` calls (SPRO trains its vertices one after another in
one context).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap
from tqdm import tqdm

from .optim import TrainConfig, clip_grads, lr_schedule, opt_step_
from .params import Params, is_float, key_mismatch

__all__ = [
    "Batch",
    "FitResult",
    "Prepared",
    "check_data",
    "fit",
    "logits_at",
    "mean_cross_entropy",
    "module_constants",
    "module_mode",
    "pick_device",
    "prepare",
    "raise_if_diverged",
    "resolve_device",
    "seeded_rng",
    "split_trainable",
    "training_mode",
]


@dataclass(frozen=True)
class Batch:
    """One step's minibatch: ``x[idx]``, ``y[idx]``; ``step`` counts from 0 over the whole run,
    ``index`` within the epoch."""

    epoch: int
    step: int
    index: int
    idx: Tensor
    x: Tensor
    y: Tensor


@dataclass(frozen=True)
class FitResult:
    """``losses[s]``: the loss(es) of step s before its update, ``[steps, K]`` (K = 1 for a scalar loss), CPU."""

    losses: Tensor
    steps: int


LossValue = Tensor | tuple[Tensor, Tensor] | Iterable[Tensor]


def fit(
    leaves: Sequence[Tensor],
    loss: Callable[[Batch], LossValue],
    x: Tensor,
    y: Tensor,
    cfg: TrainConfig,
    generators: torch.Generator | Sequence[torch.Generator],
    *,
    epochs: int | None = None,
    steps: int | None = None,
    lr: Callable[[int, int], float] | None = None,
    batch_dims: int = 0,
    grad_transform: Callable[[list[Tensor]], list[Tensor]] | None = None,
    before_step: Callable[[Batch], None] | None = None,
    after_step: Callable[[Batch], None] | None = None,
    check: str = "epoch",
    what: str = "training",
    at: Callable[[int], str] | None = None,
    context: str | Callable[[int], str] = "",
    hint: str = "try a lower learning rate (or set grad_clip)",
    progress: bool = False,
    desc: str = "fit",
) -> FitResult:
    """Run the loop of the module docstring on ``leaves`` (tensors with ``requires_grad``, updated in
    place) and return the recorded step losses.

    ``x`` and ``y`` must already be on the leaves' device. ``epochs`` defaults to ``cfg.epochs``;
    ``steps`` (optional) stops earlier. ``batch_dims``: leading model dimensions of every leaf (1 for
    K stacked models; the data order then needs K generators). ``at(epoch)`` names the epoch in a
    divergence message (default ``"epoch e/E"``); ``context`` (a string, or a function of the model
    index k) follows the step.
    """
    if check not in ("epoch", "step"):
        raise ValueError(f"check must be 'epoch' or 'step', got {check!r}")
    gens = [generators] if isinstance(generators, torch.Generator) else list(generators)
    if batch_dims == 0 and len(gens) != 1:
        raise ValueError(f"one generator orders the data of one model, got {len(gens)}")
    leaves = list(leaves)
    dev = x.device
    n = x.shape[0]
    per_epoch = cfg.steps_per_epoch(n)
    n_epochs = cfg.epochs if epochs is None else epochs
    total = n_epochs * per_epoch if steps is None else steps
    if steps is not None:
        n_epochs = -(-steps // per_epoch)
    rate = lr or (lambda s, t: lr_schedule(cfg, s, t))
    state: list[dict[str, Tensor]] = [{} for _ in leaves]
    where = at or (lambda e: f"epoch {e + 1}/{n_epochs}")
    ctx = context if callable(context) else (lambda k: context)
    history: list[Tensor] = []
    step = 0
    bar = tqdm(range(n_epochs), desc=desc, unit="epoch", disable=not progress, dynamic_ncols=True)
    with bar:
        for epoch in bar:
            order = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(dev)
            if batch_dims == 0:
                order = order[0]
            epoch_losses: list[Tensor] = []
            for s in range(min(per_epoch, total - step)):
                idx = order[..., s * cfg.batch_size : (s + 1) * cfg.batch_size]
                batch = Batch(epoch, step, s, idx, x[idx], y[idx])
                if before_step is not None:
                    before_step(batch)
                value = loss(batch)
                grads, record = _gradients(value, leaves)
                if check == "step":
                    _raise_if_bad(record.reshape(1, -1), what, f"step {step + 1}/{total}", ctx, hint, step_in=False)
                if grad_transform is not None:
                    grads = grad_transform(grads)
                if cfg.grad_clip is not None:
                    grads = clip_grads(grads, cfg.grad_clip, batch_dims)
                step += 1
                opt_step_(cfg, leaves, grads, state, rate(step - 1, total), step)
                epoch_losses.append(record)
                if after_step is not None:
                    after_step(batch)
            hist = torch.stack(epoch_losses).reshape(len(epoch_losses), -1).cpu()  # [steps, K]
            if check == "epoch":
                _raise_if_bad(hist, what, where(epoch), ctx, hint, step_in=True)
            history.append(hist)
            if progress:
                bar.set_postfix(loss=f"{float(hist.float().mean()):.4f}")
    return FitResult(torch.cat(history) if history else torch.zeros(0, 1), step)


def _gradients(value: LossValue, leaves: list[Tensor]) -> tuple[list[Tensor], Tensor]:
    """Gradients of the loss (or of the sum of its parts, accumulated part by part) and the record."""
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, Tensor) for v in value):
        grads, _ = _gradients(value[0], leaves)
        return grads, value[1].detach()
    if isinstance(value, Tensor):
        target = value if value.ndim == 0 else value.sum()
        grads = torch.autograd.grad(target, leaves, allow_unused=True, materialize_grads=True)
        return list(grads), value.detach()
    acc = [torch.zeros_like(t) for t in leaves]
    record: Tensor | None = None
    for part in value:
        for a, g in zip(acc, torch.autograd.grad(part, leaves, allow_unused=True, materialize_grads=True), strict=True):
            a.add_(g)
        record = part.detach().double() if record is None else record + part.detach()
    if record is None:
        raise ValueError("the loss returned no parts")
    return acc, record.float()


def _raise_if_bad(hist: Tensor, what: str, at: str, ctx: Callable[[int], str], hint: str, step_in: bool) -> None:
    """``ValueError`` at the first entry of ``hist`` [steps, K] that is not finite in float32 (a loss
    beyond 3.4e38 has diverged for every purpose, also when the model computes in float64)."""
    hist = hist.float()
    bad = ~torch.isfinite(hist)
    if not bool(bad.any()):
        return
    s_bad, k_bad = (int(i) for i in bad.nonzero()[0])
    if step_in:
        raise_if_diverged(hist[:, k_bad], what=what, at=at, context=ctx(k_bad), hint=hint)
    where = " ".join(part for part in (at, ctx(k_bad)) if part)
    raise ValueError(f"{what} diverged: loss is {float(hist[s_bad, k_bad])} at {where}; {hint}")


# ---------------------------------------------------------------------------------------------
# what every caller prepares, and the forward pieces the objectives share


@dataclass(frozen=True)
class Prepared:
    """A fitting problem's data and layout, checked and on its device (``prepare``)."""

    p_keys: list[str]
    b_keys: list[str]
    device: torch.device
    constants: dict[str, Tensor]
    x: Tensor
    y: Tensor


def prepare(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    cfg: TrainConfig,
    device: torch.device | str | None,
) -> Prepared:
    """``check_data``, ``split_trainable``, ``resolve_device`` and ``module_constants`` in one call,
    and (x, y) moved to the device (labels as int64)."""
    check_data(x, y, cfg)
    p_keys, b_keys = split_trainable(model, params)
    dev = resolve_device(device, params)
    return Prepared(p_keys, b_keys, dev, module_constants(model, params, dev), x.to(dev), y.to(dev, dtype=torch.long))


def module_constants(model: nn.Module, params: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Tensors the module holds outside ``params`` (non-persistent buffers): read-only constants."""
    return {name: b.detach().to(device) for name, b in model.named_buffers() if name not in params}


def logits_at(
    model: nn.Module, stacked: Params, constants: Mapping[str, Tensor], x: Tensor, vectorized: bool = True
) -> Tensor:
    """Logits ``[T, B, C]`` of T stacked points on one input batch: one ``vmap`` call, or T calls."""

    def one(p: Params, x_: Tensor) -> Tensor:
        return functional_call(model, {**p, **constants}, (x_,))

    if vectorized:
        return vmap(one, in_dims=(0, None), randomness="different")(stacked, x)
    T = next(iter(stacked.values())).shape[0]
    return torch.stack([one({k: v[j] for k, v in stacked.items()}, x) for j in range(T)])


def mean_cross_entropy(logits: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """(1/T) Σⱼ CE(logits[j], y) for logits ``[T, B, C]``: one cross-entropy over the T·B rows."""
    T = logits.shape[0]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.repeat(T), label_smoothing=label_smoothing)


# ---------------------------------------------------------------------------------------------
# checks, devices and contexts


def raise_if_diverged(losses: Tensor, *, what: str, at: str, context: str, hint: str) -> None:
    """Raise ``ValueError`` if any of one epoch's step losses (1-D) is NaN or infinite.

    The message reads ``"{what} diverged: loss is {v} at {at}, step {s}/{steps} {context}; {hint}"``.
    Shared by the training loops of curves, simplexes and FGE (``train`` checks K models at once).
    """
    bad = ~torch.isfinite(losses)
    if bool(bad.any()):
        s_bad = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{what} diverged: loss is {float(losses[s_bad])} at {at}, step {s_bad + 1}/{losses.numel()} "
            f"{context}; {hint}"
        )


def pick_device(spec: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA if available, else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` checked.

    Raises ``ValueError`` for an unknown name or a device this machine does not have.
    """
    if isinstance(spec, torch.device):
        dev = spec
    else:
        s = str(spec).strip().lower()
        if s == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(s)
        except RuntimeError as e:
            raise ValueError(f"unknown device {spec!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(dev)!r} requested but CUDA is not available "
                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
                "use device 'cpu' or 'auto'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            n_gpu = torch.cuda.device_count()
            raise ValueError(f"device {str(dev)!r} requested but only {n_gpu} GPU(s) exist")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' requested but MPS is not available; use 'cpu' or 'auto'")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {str(dev)!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return dev


def check_data(x: Tensor, y: Tensor, cfg: TrainConfig) -> None:
    """``TypeError`` / ``ValueError`` unless (x, y) is a non-empty labelled set that yields a minibatch."""
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"x and y must be tensors, got {type(x).__name__} and {type(y).__name__}")
    if y.ndim != 1 or is_float(y) or y.dtype == torch.bool:
        raise ValueError(f"y must be a 1-D integer tensor of class indices, got {y.dtype} {tuple(y.shape)}")
    if x.ndim < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} differ in their number of examples")
    if x.shape[0] == 0:
        raise ValueError("no training examples (x is empty)")
    if cfg.steps_per_epoch(x.shape[0]) == 0:
        raise ValueError(
            f"drop_last=True with batch_size={cfg.batch_size} > {x.shape[0]} examples leaves no minibatch"
        )


def split_trainable(
    model: nn.Module, params: Mapping[str, Tensor], what: str = "params"
) -> tuple[list[str], list[str]]:
    """Keys of trainable parameters and of buffers; ``ValueError`` if ``params`` does not fit ``model``
    (the message names the missing and unexpected keys, and calls the dict ``what``)."""
    diff = key_mismatch(model.state_dict().keys(), params)
    if diff:
        raise ValueError(f"{what} do not match the model's state_dict: {diff}")
    trainable = {n for n, _ in model.named_parameters()}
    for k in trainable:
        if k in params and not is_float(params[k]):
            raise ValueError(f"parameter {k!r} has non-floating dtype {params[k].dtype}")
    p_keys = [k for k in params if k in trainable]
    b_keys = [k for k in params if k not in trainable]
    return p_keys, b_keys


def resolve_device(device: torch.device | str | None, params: Mapping[str, Tensor]) -> torch.device:
    """``pick_device(device)``, or the device the parameters are on when ``device`` is None."""
    if device is None:
        return next(iter(params.values())).device
    return pick_device(device)


@contextmanager
def seeded_rng(seed: int, dev: torch.device) -> Iterator[None]:
    """Fork torch's global RNG and seed it: dropout masks follow ``seed``; the caller's state returns.

    On CUDA every GPU's generator is forked and seeded; on CPU only the CPU generator is touched
    (``torch.manual_seed`` would also queue a seed for a not-yet-initialised CUDA and leak out).
    """
    if dev.type == "cuda":
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
            torch.manual_seed(seed)
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield


@contextmanager
def module_mode(model: nn.Module, train: bool) -> Iterator[None]:
    """Put ``model`` in train (``True``) or eval mode; restore every submodule's flag afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.train(train)
    try:
        yield
    finally:
        for m, flag in modes.items():
            m.training = flag


def training_mode(model: nn.Module) -> AbstractContextManager[None]:
    """``module_mode(model, True)``."""
    return module_mode(model, True)
