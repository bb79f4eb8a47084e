"""BatchNorm running statistics recomputed at a parameter point.

At a point that was not trained as such (an interpolated point, a point on a curve, a simplex
sample) the stored ``running_mean`` / ``running_var`` of BatchNorm are not the statistics of that
network's activations, and evaluation mode gives meaningless results. Garipov et al. (2018, §5 and
their code's ``utils.update_bn``) recompute them before evaluating every point of a curve: reset the
statistics, run the training data through the network in train mode, and keep the *cumulative*
average over batches (``momentum = b / (n_seen + b)``, i.e. PyTorch's ``momentum=None`` average
weighted by batch size).

This module does the same as a pure function on ``Params``:

1. ``x`` is cut into ``ceil(N / batch_size)`` contiguous chunks of near-equal size (at most
   ``batch_size`` each; no chunk of 1 unless ``batch_size`` is 1); ``batch_size=None`` is one chunk;
2. every chunk runs through ``functional_call`` with the BatchNorm modules in train mode (they
   normalise by batch statistics, exactly as during training) and every other module in eval mode
   (dropout off: the statistics are a deterministic function of the weights and the data). Each
   BatchNorm module's ``momentum`` is set to 1 for the call, so its running buffers come back
   holding that chunk's mean μ_b and unbiased variance v_b per channel (over ``m_b`` = examples ×
   positions values); the module's own ``momentum`` is restored afterwards;
3. the chunks are pooled per channel, in float64, by ``method``:

   - ``"pooled"`` (default): the mean and unbiased variance of all ``M = Σ m_b`` values
     (Chan, Golub & LeVeque 1979's parallel update:
     ``M2 = Σ_b [(m_b − 1) v_b + m_b (μ_b − μ)²]``, ``running_var = M2 / (M − 1)``);
   - ``"garipov"``: ``update_bn``'s cumulative average, ``μ = Σ m_b μ_b / M`` and
     ``running_var = Σ m_b v_b / M`` (the average of the per-batch variances: it omits the spread of
     the batch means, so it is below the pooled variance when batches differ).

   Both give the same mean, and with one chunk both are exactly the statistics BatchNorm computes on
   the whole of ``x``. Behind the first BatchNorm layer the *inputs* of a deeper layer depend on the
   chunking (each chunk is normalised by its own statistics upstream, as in training);
4. ``num_batches_tracked`` is set to the number of chunks (what ``update_bn`` leaves after
   resetting it and running the chunks).

The given parameters are never modified (fresh buffers are passed to every call); BatchNorm modules
without running statistics (``track_running_stats=False``) are left alone; a model without BatchNorm
gets a copy of its parameters back.

``recompute_bn_stats_batched`` does the same for K stacked points in one ``vmap``\\ ed call per chunk
of points: inside ``vmap`` the buffers are batched (``in_dims=0``), so BatchNorm's in-place update
writes into each point's own slice (see ``reference/train.py``). It equals K calls of
``recompute_bn_stats`` up to floating-point reassociation in the batched kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from . import validate
from .activations import hooked
from .evaluate import auto_chunk_size
from .fit import split_trainable
from .params import Params

__all__ = [
    "BN_METHODS",
    "batchnorm_modules",
    "has_batchnorm",
    "override_momentum",
    "recompute_bn_stats",
    "recompute_bn_stats_batched",
]

BN_METHODS = ("pooled", "garipov")


def batchnorm_modules(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """``(name, module)`` of every BatchNorm module that keeps running statistics."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` holds a BatchNorm module with running statistics."""
    return bool(batchnorm_modules(model))


@contextmanager
def override_momentum(model: nn.Module, momentum: float) -> Iterator[None]:
    """Set every BatchNorm module's ``momentum`` to ``momentum`` for the block; restore it after.

    Used where the running statistics a call produces are either read as batch statistics
    (``momentum=1``) or thrown away (curve training), so that ``momentum=None`` modules, whose
    cumulative average reads ``num_batches_tracked`` as a Python number, can run under ``vmap``.
    """
    mods = [m for _, m in batchnorm_modules(model)]
    before = [m.momentum for m in mods]
    try:
        for m in mods:
            m.momentum = momentum
        yield
    finally:
        for m, mom in zip(mods, before, strict=True):
            m.momentum = mom


@contextmanager
def _bn_train_only(model: nn.Module) -> Iterator[None]:
    """BatchNorm modules in train mode, every other module in eval mode; every flag restored."""
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        for _, m in batchnorm_modules(model):
            m.train()
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def _check_x(x: Tensor, batch_size: int | None, method: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.ndim < 1 or x.shape[0] < 2:
        raise ValueError(f"recomputing BatchNorm statistics needs at least 2 examples, got x {tuple(x.shape)}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None or an integer >= 1, got {batch_size!r}")
    if method not in BN_METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {BN_METHODS}")


def _chunks(n: int, batch_size: int | None) -> list[slice]:
    """``ceil(n / batch_size)`` contiguous slices of near-equal size (one slice if ``None``)."""
    k = 1 if batch_size is None else -(-n // batch_size)
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _recompute(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    batch_size: int | None,
    method: str,
    call: Callable[[Params, Tensor], Tensor],
) -> Params:
    """The shared algorithm (module docstring); ``call`` runs one point or K stacked points."""
    bns = batchnorm_modules(model)
    out: Params = {k: v.detach().clone() for k, v in params.items()}
    if not bns:
        return out
    dev = next(iter(params.values())).device
    # per-example number of positions each BatchNorm normalises over (1 for BatchNorm1d on [B, C]),
    # read off its output (of its input's shape) by ``reference.activations.hooked``
    positions: dict[str, int] = {}

    def count(name: str, y: Tensor) -> None:
        positions[name] = math.prod(y.shape[2:])

    # running totals per BatchNorm module, float64: count M, mean μ, and M2 (pooled) or Σ m_b v_b
    acc: dict[str, tuple[float, Tensor, Tensor]] = {}
    chunks = _chunks(x.shape[0], batch_size)
    with hooked(model, [name for name, _ in bns], count):
        with _bn_train_only(model), override_momentum(model, 1.0), torch.no_grad():
            for sl in chunks:
                fresh = dict(out)
                for name, _ in bns:
                    p = f"{name}." if name else ""
                    fresh[p + "running_mean"] = torch.zeros_like(params[p + "running_mean"])
                    fresh[p + "running_var"] = torch.ones_like(params[p + "running_var"])
                    if p + "num_batches_tracked" in params:
                        fresh[p + "num_batches_tracked"] = torch.zeros_like(params[p + "num_batches_tracked"])
                xb = x[sl].to(dev)
                call(fresh, xb)
                n_b = sl.stop - sl.start
                for name, _ in bns:
                    p = f"{name}." if name else ""
                    mu_b = fresh[p + "running_mean"].double()
                    v_b = fresh[p + "running_var"].double()
                    m_b = float(n_b * positions[name])
                    if name not in acc:
                        s = (m_b - 1.0) * v_b if method == "pooled" else m_b * v_b
                        acc[name] = (m_b, mu_b, s)
                        continue
                    m_tot, mu, s = acc[name]
                    new_tot = m_tot + m_b
                    delta = mu_b - mu
                    mu = mu + delta * (m_b / new_tot)
                    if method == "pooled":
                        s = s + (m_b - 1.0) * v_b + delta.square() * (m_tot * m_b / new_tot)
                    else:
                        s = s + m_b * v_b
                    acc[name] = (new_tot, mu, s)
    for name, _ in bns:
        p = f"{name}." if name else ""
        m_tot, mu, s = acc[name]
        if method == "pooled":
            if m_tot < 2:
                raise ValueError(f"BatchNorm {name!r} saw a single value per channel: variance undefined")
            var = s / (m_tot - 1.0)
        else:
            var = s / m_tot
        rm, rv = params[p + "running_mean"], params[p + "running_var"]
        out[p + "running_mean"] = mu.to(rm.dtype).reshape(rm.shape)
        out[p + "running_var"] = var.to(rv.dtype).reshape(rv.shape)
        if p + "num_batches_tracked" in params:
            out[p + "num_batches_tracked"] = torch.full_like(params[p + "num_batches_tracked"], len(chunks))
    return out


def recompute_bn_stats(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    batch_size: int | None = None,
    method: str = "pooled",
) -> Params:
    """New ``Params`` whose BatchNorm ``running_mean`` / ``running_var`` are the statistics of the
    activations of ``x`` at ``params`` (algorithm and ``method`` in the module docstring).

    Every other entry is copied unchanged; ``params`` and ``model`` are left as they were. The
    result lives where ``params`` live (``x`` is moved there chunk by chunk). A model without
    BatchNorm gets a copy of ``params``.
    """
    split_trainable(model, params, "params")
    _check_x(x, batch_size, method)
    extra = {n: b for n, b in model.named_buffers() if n not in params}

    def call(p: Params, xb: Tensor) -> Tensor:
        return functional_call(model, {**p, **extra}, (xb,))

    return _recompute(model, params, x, batch_size, method, call)


def recompute_bn_stats_batched(
    model: nn.Module,
    stacked: Mapping[str, Tensor],
    x: Tensor,
    batch_size: int | None = None,
    method: str = "pooled",
    chunk_size: int | None = None,
) -> Params:
    """``recompute_bn_stats`` for K points stacked along a leading dimension, ``vmap``\\ ed over the
    points: ``chunk_size`` points per call (default ``evaluate.auto_chunk_size``: on the CPU one point per
    call, without vmap, unless the model is tiny).

    Returns stacked ``Params`` whose entry ``[k]`` equals ``recompute_bn_stats(model, point_k, x)``
    up to floating-point reassociation.
    """
    split_trainable(model, stacked, "stacked params")
    _check_x(x, batch_size, method)
    K = validate.leading_size(stacked, "stacked params")
    chunk_size = validate.optional_integer("chunk_size", chunk_size)
    dev = next(iter(stacked.values())).device
    chunk = chunk_size or auto_chunk_size(model, stacked, x, batch_size or x.shape[0], dev)
    extra = {n: b for n, b in model.named_buffers() if n not in stacked}

    def one(p: Params, xb: Tensor) -> Tensor:
        return functional_call(model, {**p, **extra}, (xb,))

    if chunk == 1:  # one point per call, without vmap (the running statistics land in views of ``p``)
        def many(p: Params, xb: Tensor) -> Tensor:
            return one({k: v[0] for k, v in p.items()}, xb).unsqueeze(0)
    else:
        many = vmap(one, in_dims=(0, None))
    parts = []
    for s in range(0, K, chunk):
        part = {k: v[s : s + chunk] for k, v in stacked.items()}
        parts.append(_recompute(model, part, x, batch_size, method, many))
    return {k: torch.cat([p[k] for p in parts]) for k in stacked}
