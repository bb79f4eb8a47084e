"""Batched evaluation of K parameter points, and the metrics of this suite.

K points (interpolation grids, curve points, simplex samples, ensemble members) are stacked along a
leading dimension and evaluated by ``vmap(functional_call)`` in chunks of ``chunk_size`` points and
``batch_size`` inputs, or one point per ``functional_call`` when the chunk is 1 (``auto_chunk_size``
picks 1 on the CPU for all but tiny models: there a loop is faster than vmap). All points are
evaluated in the same mode (eval by default: BatchNorm uses the running statistics stored in each
point; recompute them first where they are invalid, e.g. at an interpolated point).

Metrics, all on probabilities ``[N, C]`` (or ``[K, N, C]`` for K points):
- cross-entropy / NLL ``−mean log p(y|x)``;
- accuracy and error;
- ECE with ``n_bins`` equal-width confidence bins (Guo et al. 2017, Eq. 3);
- AUROC, one-vs-rest macro average (as ``sklearn.metrics.roc_auc_score(multi_class="ovr")``),
  computed with the Mann–Whitney rank statistic, ties averaged;
- ensemble metrics of the members' averaged probabilities.

Non-finite points: a point whose logits hold a NaN or an infinity on any input (NaN weights, an
overflow) has NaN loss *and* NaN error (so NaN accuracy); ``argmax`` would otherwise pick a class and
report a finite error rate for a broken point (and an error barrier of 0.0 along a broken path). Each
metric of a probability matrix holding a non-finite value is NaN likewise.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from . import validate
from .cost import forward_cost

__all__ = [
    "PointMetrics",
    "default_chunk_size",
    "auto_chunk_size",
    "predict_logits",
    "evaluate_points",
    "metrics_of_chunks",
    "chunk_plan",
    "tf32_allowed",
    "accuracy",
    "nll",
    "ece",
    "auroc_ovr",
    "ensemble_metrics",
    "all_metrics",
]

# Points per vmapped call on CUDA (``auto_chunk_size``; unmeasured by us), and points built at a time
# where a caller builds them in chunks (``landscape.plane_grid``).
_CHUNK = {"cpu": 8, "cuda": 64}

# ``auto_chunk_size`` on the CPU (bench/bench_evaluate.py, 2 cores, torch 2.13): one point per call (no
# vmap) beat every vmapped chunk for MLPs from ~170 MFLOP per point and batch up (vmap: 0.5-0.9x) and
# for every CNN1D (vmap of a convolution: 0.1-0.45x). Below that the crossover depends on the threads:
# digits MLPs 64-w×4-10 on 1437 inputs, 25 points, vmap / loop = 0.99x at 30 MFLOP (w=48), 0.86x at 49
# and 0.80x at 100 with 1 thread; 1.16x at 30, 1.04x at 49, 0.66x at 100 with 2 threads.
_VMAP_MAX_FLOPS = 60e6  # 2 or more torch threads
_VMAP_MAX_FLOPS_ONE_THREAD = 30e6
_VMAP_CHUNK = 25


def default_chunk_size(device: torch.device | str) -> int:
    return _CHUNK.get(torch.device(device).type, 8)


def auto_chunk_size(
    model: nn.Module, stacked: Mapping[str, Tensor], x: Tensor, batch_size: int, device: torch.device | str
) -> int:
    """Points per call when ``chunk_size`` is not given: on CUDA ``default_chunk_size`` (many points per
    vmapped call); on the CPU 1 (a plain loop over the points, no vmap) unless one point's forward on
    a batch is cheap (no convolution, < 60 MFLOP with 2 or more torch threads, < 30 MFLOP with 1), then
    25 per vmapped call. Chosen from the architecture, the batch and the thread count alone, so the same
    call on the same machine always takes the same path (and gives the same floats)."""
    dev = torch.device(device)
    if dev.type != "cpu":
        return default_chunk_size(dev)
    flops, conv = forward_cost(model, {k: v[0] for k, v in stacked.items()}, x)
    limit = _VMAP_MAX_FLOPS_ONE_THREAD if torch.get_num_threads() == 1 else _VMAP_MAX_FLOPS
    if conv or flops * min(batch_size, x.shape[0]) >= limit:
        return 1
    return _VMAP_CHUNK


def _device_of(stacked: Mapping[str, Tensor], device: torch.device | str | None) -> torch.device:
    validate.leading_size(stacked)  # a clear error for an empty or ragged stack
    return torch.device(device) if device is not None else next(iter(stacked.values())).device


@contextmanager
def tf32_allowed(enabled: bool, device: torch.device | str) -> Iterator[None]:
    """Within the block, CUDA matmuls and cuDNN convolutions may use TF32 (10-bit mantissa, fp32 range)
    when ``enabled``; torch's two flags are restored afterwards. ``enabled=False`` changes nothing (torch's
    defaults: fp32 matmuls, TF32 cuDNN convolutions). ``ValueError`` for ``enabled`` on a non-CUDA device,
    where TF32 does not exist (the option would be silently ignored)."""
    enabled = validate.flag("tf32", enabled)
    if not enabled:
        yield
        return
    if torch.device(device).type != "cuda":
        raise ValueError(f"tf32=True needs a CUDA device (TF32 is a tensor-core format), got {str(device)!r}")
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def chunk_plan(
    model: nn.Module,
    stacked: Mapping[str, Tensor],
    x: Tensor,
    chunk_size: int | None,
    batch_size: int,
    train_mode: bool,
    device: torch.device | str | None,
) -> tuple[int, int, int, bool, torch.device]:
    """The evaluators' arguments checked: ``(K points, points per call, inputs per call, train mode, device)``,
    the points per call from ``auto_chunk_size`` when ``chunk_size`` is None."""
    K = validate.leading_size(stacked)
    chunk_size = validate.optional_integer("chunk_size", chunk_size)
    batch_size = validate.integer("batch_size", batch_size)
    train_mode = validate.flag("train_mode", train_mode)
    dev = _device_of(stacked, device)
    return K, chunk_size or auto_chunk_size(model, stacked, x, batch_size, dev), batch_size, train_mode, dev


def _chunked_logits(
    model: nn.Module, stacked: Mapping[str, Tensor], x: Tensor, plan: tuple[int, int, int, bool, torch.device]
) -> Iterator[tuple[int, int, int, Tensor]]:
    """Yield ``(first point, points in chunk, first input, logits [k, B, C])`` over chunks of points
    and batches of inputs (``plan``: ``chunk_plan``): one ``vmap(functional_call)`` call each (one plain
    ``functional_call`` when the chunk is 1), all points in the same mode."""
    K, chunk, batch_size, train_mode, dev = plan
    was_training = model.training
    model.train(train_mode)
    model.to(dev)
    if chunk == 1:  # one point per call: the plain forward, without vmap's batching of every op
        def fv(p: Mapping[str, Tensor], xb: Tensor) -> Tensor:
            return functional_call(model, p, (xb,)).unsqueeze(0)

        def part_at(s: int) -> dict[str, Tensor]:
            return {k: v[s].to(dev) for k, v in stacked.items()}
    else:
        fv = vmap(lambda p, xb: functional_call(model, p, (xb,)), in_dims=(0, None))

        def part_at(s: int) -> dict[str, Tensor]:
            return {k: v[s : s + chunk].to(dev) for k, v in stacked.items()}
    try:
        for s in range(0, K, chunk):
            part = part_at(s)
            if train_mode:  # BatchNorm would update the running statistics of the caller's tensors
                part = {k: v.clone() for k, v in part.items()}
            k_here = min(chunk, K - s)
            for b in range(0, x.shape[0], batch_size):
                yield s, k_here, b, fv(part, x[b : b + batch_size].to(dev))
    finally:
        model.train(was_training)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    stacked: Mapping[str, Tensor],
    x: Tensor,
    *,
    chunk_size: int | None = None,
    batch_size: int = 4096,
    train_mode: bool = False,
    device: torch.device | str | None = None,
    tf32: bool = False,
) -> Tensor:
    """Logits ``[K, N, C]`` of K stacked points on inputs ``x`` (one vmapped call per chunk).

    ``train_mode=True`` evaluates with batch statistics (BatchNorm); running statistics of the
    given points are not modified (buffers are cloned per call). ``tf32``: as ``evaluate_points``.
    """
    chunks: dict[int, list[Tensor]] = {}
    plan = chunk_plan(model, stacked, x, chunk_size, batch_size, train_mode, device)
    with tf32_allowed(tf32, plan[4]):
        for s, _, _, logits in _chunked_logits(model, stacked, x, plan):
            chunks.setdefault(s, []).append(logits)
    return torch.cat([torch.cat(rows, dim=1) for _, rows in sorted(chunks.items())], dim=0)


@dataclass(frozen=True)
class PointMetrics:
    """Per-point loss and error, each a CPU tensor ``[K]``."""

    loss: Tensor
    error: Tensor

    @property
    def accuracy(self) -> Tensor:
        return 1.0 - self.error


@torch.no_grad()
def evaluate_points(
    model: nn.Module,
    stacked: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    chunk_size: int | None = None,
    batch_size: int = 4096,
    train_mode: bool = False,
    device: torch.device | str | None = None,
    tf32: bool = False,
) -> PointMetrics:
    """Mean cross-entropy and error of each of K stacked points on ``(x, y)``.

    Reduces per data batch, so memory is O(chunk · batch) whatever N is. A point with a non-finite
    logit on any input gets NaN loss and NaN error (module docstring). ``tf32=True`` (CUDA only;
    ``ValueError`` elsewhere) runs the forward passes with TF32 matmuls and convolutions
    (``tf32_allowed``): faster on tensor cores, ~1e-3 relative error per product;
    ``tests/test_evaluate_barrier.py`` bounds its change of barrier values on a GPU.
    """
    plan = chunk_plan(model, stacked, x, chunk_size, batch_size, train_mode, device)
    with tf32_allowed(tf32, plan[4]):
        return metrics_of_chunks(_chunked_logits(model, stacked, x, plan), plan[0], x.shape[0], y, plan[2])


def metrics_of_chunks(
    chunks: Iterable[tuple[int, int, int, Tensor]], K: int, N: int, y: Tensor, batch_size: int
) -> PointMetrics:
    """``PointMetrics`` of K points on N inputs from their logits, given in chunks ``(first point, points in
    the chunk, first input, logits [k, B, C])`` of ``batch_size`` inputs (the labels of a chunk are
    ``y[first input : first input + batch_size]``), in any order: each (point, input batch) once."""
    parts: list[tuple[int, int, Tensor, Tensor, Tensor]] = []
    for s, k, b, logits in chunks:
        parts.append((s, k, *_batch_metrics(logits, y[b : b + batch_size].to(logits.device))))
    loss = torch.zeros(K, dtype=torch.float64)
    wrong = torch.zeros(K, dtype=torch.float64)
    broken = torch.zeros(K, dtype=torch.bool)
    for s, k, ce, miss, bad in parts:  # one host transfer per batch, after all the forward passes
        loss[s : s + k] += ce.double().cpu()
        wrong[s : s + k] += miss.double().cpu()
        broken[s : s + k] |= bad.cpu()
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    loss, wrong = torch.where(broken, nan, loss), torch.where(broken, nan, wrong)
    return PointMetrics(loss=(loss / N).float(), error=(wrong / N).float())


def _batch_metrics(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per point of ``logits [k, B, C]`` (labels ``y [B]``): the summed cross-entropy (float32), the
    number of wrong argmax predictions, and whether any logit is NaN or infinite; each ``[k]``.

    The cross-entropy is computed as ``F.cross_entropy`` does (shift by the row maximum, log-sum-exp,
    minus the label's logit, in float32), written out so that the row maximum serves both the shift and
    the prediction: 3x faster than ``cross_entropy`` + ``argmax`` on 10 classes on the CPU, where the
    per-row reductions of ``log_softmax`` over a short last dimension dominate a small model's
    evaluation (bench/bench_evaluate.py). Equal to ``cross_entropy`` up to float rounding; the argmax
    is the same (the first maximal index).
    """
    logits = logits.float()
    top, pred = logits.max(-1)  # [k, B]
    lse = top + (logits - top.unsqueeze(-1)).exp().sum(-1).log()
    picked = logits.gather(-1, y.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(-1)
    ce = (lse - picked).sum(-1)
    miss = (pred != y).sum(-1)
    bad = ~torch.isfinite(logits).flatten(1).all(1)
    return ce, miss, bad


# ---------------------------------------------------------------------------------------------
# metrics on probabilities


def _check_probs(probs: Tensor, y: Tensor) -> bool:
    """Raise for shapes that do not fit; ``True`` if every probability is finite (else metrics are NaN)."""
    if probs.ndim != 2:
        raise ValueError(f"probabilities must be [N, C], got shape {tuple(probs.shape)}")
    if y.ndim != 1 or y.shape[0] != probs.shape[0]:
        raise ValueError(f"labels of shape {tuple(y.shape)} do not match probabilities {tuple(probs.shape)}")
    return bool(torch.isfinite(probs).all())


def nll(probs: Tensor, y: Tensor, eps: float = 1e-12) -> float:
    """Negative log-likelihood −mean log p(yᵢ|xᵢ) (= cross-entropy of probabilities)."""
    eps = validate.number("eps", eps, positive=True)
    if not _check_probs(probs, y):
        return float("nan")
    p = probs.double().gather(1, y.long().view(-1, 1)).clamp_min(eps)
    return float(-p.log().mean())


def accuracy(probs: Tensor, y: Tensor) -> float:
    """Fraction of ``argmax`` predictions equal to ``y`` (NaN if a probability is not finite)."""
    if not _check_probs(probs, y):
        return float("nan")
    return float((probs.argmax(1) == y).double().mean())


def ece(probs: Tensor, y: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error: Σ_b |B_b|/N · |acc(B_b) − conf(B_b)|, equal-width bins on (0, 1]."""
    n_bins = validate.integer("n_bins", n_bins)
    if not _check_probs(probs, y):
        return float("nan")
    conf, pred = probs.double().max(1)
    correct = (pred == y).double()
    # bin b holds conf in (b/n, (b+1)/n]
    idx = (torch.ceil(conf * n_bins) - 1).clamp(0, n_bins - 1).long()
    sc = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    sa = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, correct)
    return float((sa - sc).abs().sum() / conf.numel())


def _binary_auc(score: Tensor, pos: Tensor) -> float:
    """Mann–Whitney AUC with average ranks for ties."""
    n_pos = int(pos.sum())
    n_neg = pos.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(score, stable=True)
    s = score[order]
    ranks = torch.empty_like(s, dtype=torch.float64)
    # average ranks over runs of equal scores
    uniq, inverse, counts = torch.unique_consecutive(s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks = avg[inverse]
    r_pos = ranks[pos[order]].sum()
    return float((r_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc_ovr(probs: Tensor, y: Tensor) -> float:
    """One-vs-rest macro AUROC over the classes present in ``y``."""
    finite = _check_probs(probs, y)
    probs = probs.double().cpu()
    y = y.cpu()
    classes = torch.unique(y).tolist()
    if len(classes) < 2:
        raise ValueError("AUROC needs at least two classes in y")
    if not finite:
        return float("nan")
    aucs = [_binary_auc(probs[:, c], y == c) for c in classes]
    return float(sum(aucs) / len(aucs))


def all_metrics(probs: Tensor, y: Tensor, n_bins: int = 15) -> dict[str, float]:
    """CE (NLL), accuracy, error, ECE and AUROC of one probability matrix ``[N, C]`` (all NaN if a
    probability is not finite)."""
    acc = accuracy(probs, y)
    return {
        "nll": nll(probs, y),
        "accuracy": acc,
        "error": 1.0 - acc,
        "ece": ece(probs, y, n_bins),
        "auroc": auroc_ovr(probs, y),
    }


def ensemble_metrics(member_probs: Tensor, y: Tensor, n_bins: int = 15) -> dict[str, float]:
    """Metrics of the ensemble whose prediction is the mean of the members' probabilities [K, N, C]."""
    if member_probs.ndim != 3:
        raise ValueError(f"member probabilities must be [K, N, C], got {tuple(member_probs.shape)}")
    out = all_metrics(member_probs.double().mean(0), y, n_bins)
    out["members"] = int(member_probs.shape[0])
    return out
