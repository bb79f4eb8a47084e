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

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap
from tqdm import tqdm

from .params import Params, check_compatible, check_finite, is_float

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
    "split_trainable",
    "train",
    "train_many",
    "training_mode",
]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (saved verbatim with the result via ``asdict()``).

    ``schedule``: ``"constant"``; ``"cosine"`` (Loshchilov & Hutter 2017, SGDR without restarts,
    decaying to 0); ``"linear"`` (linear decay to 0). ``warmup_frac`` of the steps first ramp the
    rate linearly up to ``lr`` (with ``"linear"``: the triangular schedule of airbench / Git
    Re-Basin). ``drop_last=False`` keeps the last, smaller minibatch of each epoch.
    """

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    optimizer: str = "sgd"
    schedule: str = "constant"
    warmup_frac: float = 0.0
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    drop_last: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be an integer >= 1, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not self.weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; use one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; use one of {SCHEDULES}")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ValueError(f"warmup_frac must be in [0, 1), got {self.warmup_frac!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be None or > 0, got {self.grad_clip!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps!r}")

    def asdict(self) -> dict[str, Any]:
        """The fields as a plain dict (for ``provenance.json``)."""
        return dataclasses.asdict(self)

    def steps_per_epoch(self, n: int) -> int:
        """Minibatches per epoch for ``n`` examples."""
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


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


def lr_schedule(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate of step ``step`` (0-based) out of ``total_steps``.

    Warmup: ``lr · (step + 1) / W`` for the first ``W = round(warmup_frac · total_steps)`` steps;
    then with ``t = (step − W) / (total_steps − W) ∈ [0, 1)``: constant ``lr``, cosine
    ``lr · ½(1 + cos πt)``, linear ``lr · (1 − t)``.
    """
    warm = round(cfg.warmup_frac * total_steps)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, total_steps - warm)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * t))
    return cfg.lr * (1.0 - t)


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
) -> list[Params]:
    """Train K models at once (stacked parameters, ``vmap``); model k starts at ``params_list[k]``
    and draws its data order from ``seeds[k]``.

    Returns K new ``Params`` on CPU, equal to ``[train(model, p, x, y, cfg, s) for p, s in ...]``
    up to floating-point reassociation (see the module docstring).
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
    for name, mod in model.named_modules():
        if (
            isinstance(mod, nn.modules.batchnorm._NormBase)
            and mod.track_running_stats
            and mod.momentum is None
        ):
            raise ValueError(
                f"module {name!r} ({type(mod).__name__}) has momentum=None (cumulative running average), "
                "which reads num_batches_tracked as a Python number and cannot run under vmap; "
                "give it a momentum or train the models one at a time with train()"
            )
    return _fit(model, params_list, x, y, cfg, seeds, device, progress, batched=True)


# ---------------------------------------------------------------------------------------------
# the shared loop, and its pieces that curve, simplex, FGE, STE and NEB training loops reuse


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


def split_trainable(model: nn.Module, params: Mapping[str, Tensor]) -> tuple[list[str], list[str]]:
    """Keys of trainable parameters and of buffers; ``ValueError`` if ``params`` does not fit ``model``."""
    expected = list(model.state_dict().keys())
    missing = [k for k in expected if k not in params]
    extra = [k for k in params if k not in set(expected)]
    if missing or extra:
        raise ValueError(
            f"params do not match the model's state_dict: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
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


def _flat_sq_norm(g: Tensor, bd: int) -> Tensor:
    return g.pow(2).reshape(*g.shape[:bd], -1).sum(-1)


@torch.no_grad()
def clip_grads(grads: list[Tensor], max_norm: float, bd: int) -> list[Tensor]:
    """Each model's gradients scaled to global norm ≤ ``max_norm`` (as ``clip_grad_norm_``)."""
    total = torch.stack([_flat_sq_norm(g, bd) for g in grads]).sum(0).sqrt()  # [] or [K]
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    return [g * coef.reshape(coef.shape + (1,) * (g.ndim - bd)) for g in grads]


@torch.no_grad()
def opt_step_(
    cfg: TrainConfig,
    params: list[Tensor],
    grads: list[Tensor],
    state: list[dict[str, Tensor]],
    lr: float,
    step: int,
) -> None:
    """One optimizer step, in place on ``params`` and ``state`` (element-wise: any leading batch dims).

    The formulas follow ``torch.optim.{SGD, Adam, AdamW}``'s single-tensor implementations.
    """
    wd = cfg.weight_decay
    for p, g, st in zip(params, grads, state, strict=True):
        if cfg.optimizer == "sgd":
            d = g.add(p, alpha=wd) if wd else g
            if cfg.momentum:
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = d.clone()
                else:
                    st["momentum_buffer"].mul_(cfg.momentum).add_(d)
                d = st["momentum_buffer"]
            p.add_(d, alpha=-lr)
            continue
        b1, b2 = cfg.betas
        if cfg.optimizer == "adamw":
            p.mul_(1.0 - lr * wd)
        elif wd:
            g = g.add(p, alpha=wd)
        if "exp_avg" not in st:
            st["exp_avg"] = torch.zeros_like(p)
            st["exp_avg_sq"] = torch.zeros_like(p)
        m, v = st["exp_avg"], st["exp_avg_sq"]
        m.lerp_(g, 1.0 - b1)
        v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        bc1 = 1.0 - b1**step
        bc2_sqrt = math.sqrt(1.0 - b2**step)
        denom = (v.sqrt() / bc2_sqrt).add_(cfg.eps)
        p.addcdiv_(m, denom, value=-lr / bc1)


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
    check_data(x, y, cfg)
    p_keys, b_keys = split_trainable(model, params_list[0])
    dev = resolve_device(device, params_list[0])
    K = len(seeds)
    bd = 1 if batched else 0  # leading batch dims of every tensor in the loop

    def prepare(k: str) -> Tensor:
        """A new tensor on ``dev``: the K points stacked (batched) or a copy of the one point."""
        if batched:
            return torch.stack([p[k].detach().to(dev) for p in params_list])
        return params_list[0][k].detach().to(dev).clone()

    leaves = [prepare(k).requires_grad_(True) for k in p_keys]
    buffers = [prepare(k) for k in b_keys]  # our own copies: BatchNorm updates them in place
    # tensors the module holds outside its state_dict (non-persistent buffers): read-only constants
    extra = {n: b.detach().to(dev) for n, b in model.named_buffers() if n not in params_list[0]}

    x = x.to(dev)
    y = y.to(dev, dtype=torch.long)
    n = x.shape[0]
    steps = cfg.steps_per_epoch(n)
    total = cfg.epochs * steps
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    state: list[dict[str, Tensor]] = [{} for _ in leaves]
    ls = cfg.label_smoothing

    def forward(p: Sequence[Tensor], b: Sequence[Tensor], xb: Tensor) -> Tensor:
        tensors = {**dict(zip(p_keys, p, strict=True)), **dict(zip(b_keys, b, strict=True)), **extra}
        return functional_call(model, tensors, (xb,), strict=True)

    def ce(logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits, target, label_smoothing=ls)

    if batched:
        batched_forward: Callable[..., Tensor] = vmap(forward, in_dims=(0, 0, 0), randomness="different")
        batched_ce: Callable[..., Tensor] = vmap(ce)

    step = 0
    bar = tqdm(
        range(cfg.epochs),
        desc=f"train ×{K}" if batched else "train",
        unit="epoch",
        disable=not progress,
        dynamic_ncols=True,
    )
    with bar, training_mode(model), seeded_rng(int(seeds[0]), dev):
        for epoch in bar:
            order = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(dev)  # [K, n]
            if not batched:
                order = order[0]
            epoch_losses: list[Tensor] = []
            for s in range(steps):
                idx = order[..., s * cfg.batch_size : (s + 1) * cfg.batch_size]
                xb, yb = x[idx], y[idx]
                if batched:
                    losses = batched_ce(batched_forward(leaves, buffers, xb), yb)  # [K]
                    loss = losses.sum()
                else:
                    loss = losses = ce(forward(leaves, buffers, xb), yb)
                grads = list(torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True))
                if cfg.grad_clip is not None:
                    grads = clip_grads(grads, cfg.grad_clip, bd)
                step += 1
                opt_step_(cfg, leaves, grads, state, lr_schedule(cfg, step - 1, total), step)
                epoch_losses.append(losses.detach())
            # one host sync per epoch: find the first non-finite loss, if any
            hist = torch.stack(epoch_losses).reshape(steps, -1).cpu()  # [steps, K]
            bad = ~torch.isfinite(hist)
            if bool(bad.any()):
                s_bad, k_bad = (int(i) for i in bad.nonzero()[0])
                who = f" (model {k_bad} of {K}, seed {seeds[k_bad]})" if batched else f" (seed {seeds[0]})"
                raise ValueError(
                    f"training diverged: loss is {float(hist[s_bad, k_bad])} "
                    f"at epoch {epoch + 1}/{cfg.epochs}, "
                    f"step {s_bad + 1}/{steps}{who} with {cfg.optimizer} lr={cfg.lr:g}; "
                    "try a lower learning rate (or set grad_clip)"
                )
            bar.set_postfix(loss=f"{float(hist.mean()):.4f}")

    out: list[Params] = []
    for k in range(K):
        got = {key: t.detach()[k] if batched else t.detach() for key, t in zip(p_keys, leaves, strict=True)}
        got.update({key: t[k] if batched else t for key, t in zip(b_keys, buffers, strict=True)})
        point = {key: got[key].cpu().clone() for key in params_list[0]}
        check_finite(point, what=f"trained parameters (seed {seeds[k]}); try a lower learning rate")
        out.append(point)
    return out
