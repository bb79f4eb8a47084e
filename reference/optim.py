"""The optimiser maths every fitting loop shares: ``TrainConfig``, the learning-rate schedule,
gradient clipping and the SGD / Adam / AdamW update.

The update formulas repeat those of ``torch.optim`` (single-tensor path) operation for operation:

- ``"sgd"``: heavy-ball momentum with coupled weight decay, as ``torch.optim.SGD`` (Sutskever et al.
  2013; ``b ← μ b + (g + λθ)``, ``θ ← θ − η b``);
- ``"adam"``: Kingma & Ba 2015, Algorithm 1, with L2 weight decay added to the gradient, as
  ``torch.optim.Adam``;
- ``"adamw"``: Adam with decoupled weight decay (Loshchilov & Hutter 2019, Algorithm 2), as
  ``torch.optim.AdamW``.

Every update is element-wise, so it runs unchanged on K stacked models (any leading batch dims).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["OPTIMIZERS", "SCHEDULES", "TrainConfig", "clip_grads", "lr_schedule", "opt_step_"]

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

    @classmethod
    def adam(cls, epochs: int, batch_size: int = 128, lr: float = 1e-3, **fields: Any) -> TrainConfig:
        """Adam with cosine decay, the recipe most targets train their small models with; ``fields`` set
        (or override) any other field, e.g. ``optimizer="adamw"``."""
        return cls(epochs=epochs, batch_size=batch_size, lr=lr, **{"optimizer": "adam", "schedule": "cosine", **fields})

    def __post_init__(self) -> None:
        # Checks only: the fields keep the values given (``asdict()`` feeds provenance and cache keys, where
        # ``0`` and ``0.0`` differ), except ``betas``, stored as a tuple of floats.
        from . import validate

        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        validate.integer("epochs", self.epochs)
        validate.integer("batch_size", self.batch_size)
        validate.number("lr", self.lr, positive=True)
        validate.number("momentum", self.momentum, minimum=0.0, below=1.0)
        validate.number("weight_decay", self.weight_decay, minimum=0.0)
        validate.choice("optimizer", self.optimizer, OPTIMIZERS)
        validate.choice("schedule", self.schedule, SCHEDULES)
        validate.number("warmup_frac", self.warmup_frac, minimum=0.0, below=1.0)
        validate.number("label_smoothing", self.label_smoothing, minimum=0.0, below=1.0)
        validate.optional_number("grad_clip", self.grad_clip, positive=True)
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        for i, b in enumerate(self.betas):
            validate.number(f"betas[{i}]", b, minimum=0.0, below=1.0)
        validate.number("eps", self.eps, positive=True)
        validate.flag("drop_last", self.drop_last)

    def asdict(self) -> dict[str, Any]:
        """The fields as a plain dict (for ``provenance.json``)."""
        return dataclasses.asdict(self)

    def steps_per_epoch(self, n: int) -> int:
        """Minibatches per epoch for ``n`` examples."""
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


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
    *,
    foreach: bool | None = None,
) -> None:
    """One optimizer step, in place on ``params`` and ``state`` (element-wise: any leading batch dims).

    The formulas follow ``torch.optim.{SGD, Adam, AdamW}``'s single-tensor implementations. ``foreach``
    (default: when every tensor shares one device and dtype) runs each operation of the formula on all
    tensors in one ``torch._foreach_*`` call instead of one Python-level call per tensor: the same
    element-wise operations in the same order, so the same bits (tested), with less overhead per step
    (``bench/bench_optimizer.py``).
    """
    if foreach is None:
        foreach = len({(t.device, t.dtype) for t in (*params, *grads)}) == 1
    if foreach and params:
        _step_foreach(cfg, params, grads, state, lr, step)
        return
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


def _step_foreach(
    cfg: TrainConfig, params: list[Tensor], grads: list[Tensor], state: list[dict[str, Tensor]], lr: float, step: int
) -> None:
    """``opt_step_``'s formulas, each operation applied to every tensor by one ``torch._foreach_*`` call."""
    if len(params) != len(grads) or len(params) != len(state):
        raise ValueError(f"{len(params)} params, {len(grads)} grads and {len(state)} states: one of each per tensor")
    wd = cfg.weight_decay
    if cfg.optimizer == "sgd":
        d = torch._foreach_add(grads, params, alpha=wd) if wd else list(grads)
        if cfg.momentum:
            if "momentum_buffer" not in state[0]:
                for st, t in zip(state, d, strict=True):
                    st["momentum_buffer"] = t.clone()
            else:
                bufs = [st["momentum_buffer"] for st in state]
                torch._foreach_mul_(bufs, cfg.momentum)
                torch._foreach_add_(bufs, d)
            d = [st["momentum_buffer"] for st in state]
        torch._foreach_add_(params, d, alpha=-lr)
        return
    b1, b2 = cfg.betas
    if cfg.optimizer == "adamw":
        torch._foreach_mul_(params, 1.0 - lr * wd)
    elif wd:
        grads = torch._foreach_add(grads, params, alpha=wd)
    if "exp_avg" not in state[0]:
        for st, p in zip(state, params, strict=True):
            st["exp_avg"] = torch.zeros_like(p)
            st["exp_avg_sq"] = torch.zeros_like(p)
    m = [st["exp_avg"] for st in state]
    v = [st["exp_avg_sq"] for st in state]
    torch._foreach_lerp_(m, grads, 1.0 - b1)
    torch._foreach_mul_(v, b2)
    torch._foreach_addcmul_(v, grads, grads, value=1.0 - b2)
    bc1 = 1.0 - b1**step
    bc2_sqrt = math.sqrt(1.0 - b2**step)
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, cfg.eps)
    torch._foreach_addcdiv_(params, m, denom, value=-lr / bc1)
