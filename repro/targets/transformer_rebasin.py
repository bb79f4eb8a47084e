"""Permutation alignment of independently trained transformers: heads matter.

``transformer-rebasin``: Vision Transformers (``reference.transformers.ViT``) on 8×8 digits (or MNIST-1D
read as a sequence of patches, ``--dataset mnist1d``) at several widths, and a GPT-style causal language
model (``CausalTransformer``) on the local lag task of ``make_sequence_task``; for each pair (θ_a, θ_b) of
independently trained endpoints, the loss and error along the straight line θ_a → P(θ_b) for

- ``naive``: P = identity (vanilla averaging);
- ``wm-headless``: weight matching (Git Re-Basin §3.2, Algorithm 1) with the spec stripped of its head
  structure, ``PermutationSpec(spec.axes, spec.shapes)``: the Q/K and V/O groups are permuted unit by unit
  across head boundaries and independently of each other. That P does *not* keep the function (its
  function error is reported); its path ends at another network, and its barrier is measured anyway —
  the "Ignore-Heads" ablation of Verma & Elbayad 2024 (arXiv 2403.00986), Table 1;
- ``wm``: head-aware weight matching (``reference.matching.weight_matching``: each attention layer's Q/K
  and V/O groups move whole heads the same way, within-head permutations free per group, solved jointly);
- ``am``: head-aware activation matching (Git Re-Basin §3.1; the correlation matching with per-head-pair
  costs of Verma & Elbayad 2024, their multi-headed attention alignment, "Head-Perm");
- ``ste``: Git Re-Basin's straight-through estimator (§3.3, Algorithm 2; ``ste_matching`` through
  ``repro.runner.SteSettings.run``) started from the head-aware weight matching.

Barriers: both definitions of ``reference.barrier`` (``mid``, Git Re-Basin Definition 2.2, the one Verma &
Elbayad report; ``max_chord``, Frankle et al. 2020), on train and test, for loss and error. Function error
of every P: max |f(P(θ_b), x) − f(θ_b, x)| / max |f(θ_b, x)| over the test inputs in float32; every
head-aware P must keep the function (≤ 1e-4), the head-unaware one does not.

The causal LM is trained and evaluated per *token*: an example is a sequence and one of its positions
(``[tokens, t]``, int64 ``[T + 1]``) with the target token at t as its label, and ``NextTokenAt`` (the
``CausalTransformer`` read at position t) is the model that training, evaluation and the STE see, so the
suite's loops (``train_many``, ``evaluate_points``, ``ste_matching``) compute the mean token cross-entropy
unchanged. Its specs, activation matching and function errors use the plain ``CausalTransformer`` on the
sequences (same state_dict). Its data are generated locally (no dataset to load), so its endpoints are
trained inside the pair's job (K = 2 at once) rather than by the runner's endpoint cache.

Not done: a LayerNorm-aware repair (REPAIR-style statistics correction of the interpolated transformers,
Jordan et al. 2023) — LayerNorm renormalises every token, so the REPAIR of ``reference.merge`` (written
for BatchNorm-free MLPs and BN nets) does not apply as is; left out rather than approximated.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from reference import validate
from reference.barrier import BARRIER_KINDS, evaluate_linear_path
from reference.fit import module_mode
from reference.matching import activation_matching, weight_matching
from reference.models import init_params
from reference.params import Params
from reference.permutation import Permutation, PermutationSpec
from reference.specs import spec_for
from reference.train import TrainConfig, train_many
from reference.transformers import CausalTransformer, make_sequence_task

from ..runner import DataRef, Endpoint, Job, JobContext, Report, Results, SteSettings, fmt_pm, mean_std, seaborn
from ..runner.declare import declare
from .reporting import summary_rows

METHODS = ("naive", "wm-headless", "wm", "am", "ste")
HEAD_AWARE = ("wm", "am", "ste")
FUNCTION_TOL = 1e-4  # relative, float32: what a head-aware permutation must keep
BROKEN = 1e-2  # relative: a function error above this is a different network


def _adamw(epochs: int, batch_size: int, lr: float = 3e-3) -> TrainConfig:
    """AdamW (weight decay 0.05) with 5% linear warm-up and cosine decay: how both transformers train."""
    return TrainConfig.adam(epochs, batch_size, lr, optimizer="adamw", weight_decay=0.05, warmup_frac=0.05)


@dataclass(frozen=True)
class LMConfig:
    """The causal language model on the lag task (``reference.transformers.make_sequence_task``)."""

    vocab: int = 8
    block_size: int = 8
    lag: int = 3
    dim: int = 32
    depth: int = 2
    heads: int = 4
    mlp_ratio: int = 2
    sequences: int = 256  # training sequences (each gives block_size token examples)
    test_sequences: int = 256
    data_seed: int = 0  # the training sequences; the test ones use data_seed + 1
    pairs: int = 3  # 0: no language model
    train: TrainConfig = _adamw(25, 128)


@dataclass(frozen=True)
class MatchSettings:
    """How every pair is aligned and measured: ``grid`` path points, weight matching with ``wm_restarts``
    restarts, activation matching on ``am_examples`` training inputs, and the STE."""

    grid: int = 13
    wm_restarts: int = 3
    am_examples: int = 2000
    ste: SteSettings = SteSettings(steps=100, lr=1e-3, batch=128, optimizer="adam")


@dataclass(frozen=True)
class RebasinConfig:
    dataset: str = "digits"
    seed: int = 0
    widths: tuple[int, ...] = (16, 32, 64)  # the ViT's model dimension
    depth: int = 2
    heads: int = 4
    mlp_ratio: int = 2
    patch: int = 2
    pairs: int = 3
    match: MatchSettings = MatchSettings()
    train: TrainConfig = _adamw(15, 64)
    lm: LMConfig = LMConfig()


SIZES = {
    "quick": RebasinConfig(
        widths=(8, 16),
        pairs=1,
        match=MatchSettings(grid=5, wm_restarts=1, am_examples=500,
                            ste=SteSettings(steps=10, lr=1e-3, batch=128, optimizer="adam")),
        train=_adamw(3, 64),
        lm=LMConfig(
            dim=16,
            sequences=64,
            test_sequences=32,
            pairs=1,
            train=_adamw(3, 128),
        ),
    ),
    "cpu": RebasinConfig(),
    # Larger models and budgets than the cpu size, our choice (neither source's models run here: Verma &
    # Elbayad merge BERT-base MultiBERTs on masked language modelling, Imfeld et al. fuse ViTs on CIFAR).
    # A ViT of depth 6 with 8 heads, patch 4, on CIFAR-10 at widths 64 … 256 (Imfeld et al.'s setting:
    # ViT, CIFAR-10, two independently trained parents), AdamW with warm-up and cosine decay, 100 epochs;
    # 5 pairs per width; 25 interpolation points as Git Re-Basin; the causal LM at dim 128, depth 4, on
    # sequences of 16 tokens of a 16-token vocabulary. Needs --data-dir with the CIFAR-10 python batches.
    "paper": RebasinConfig(
        dataset="cifar10",
        widths=(64, 128, 256),
        depth=6,
        heads=8,
        mlp_ratio=2,
        patch=4,
        pairs=5,
        match=MatchSettings(grid=25, wm_restarts=5, am_examples=5000,
                            ste=SteSettings(steps=1000, lr=1e-3, batch=256, optimizer="adam")),
        train=_adamw(100, 128, lr=1e-3),
        lm=LMConfig(
            vocab=16,
            block_size=16,
            lag=5,
            dim=128,
            depth=4,
            heads=8,
            mlp_ratio=4,
            sequences=4096,
            test_sequences=1024,
            pairs=5,
            train=_adamw(50, 256, lr=1e-3),
        ),
    ),
}


# ---------------------------------------------------------------------------------------------
# models


class NextTokenAt(CausalTransformer):
    """A ``CausalTransformer`` read at one position per example.

    Input ``[B, T + 1]`` int64: ``T`` token ids and, last, a position ``t`` in ``[0, T)``; output the logits
    ``[B, vocab]`` of position ``t`` (which sees tokens ``0..t`` only). The state_dict is the
    ``CausalTransformer``'s, so its spec (``spec_for(CausalTransformer(**config))``) and parameters serve
    both. Raises as ``CausalTransformer.forward`` for bad token ids.
    """

    def forward(self, x: Tensor) -> Tensor:
        T = x.shape[1] - 1
        logits = super().forward(x[:, :T])
        pos = x[:, T].reshape(-1, 1, 1).expand(-1, 1, logits.shape[-1])
        return logits.gather(1, pos).squeeze(1)


def token_examples(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token examples of sequences ``x, y`` ``[n, T]``: inputs ``[n·T, T + 1]`` (the sequence, then the
    position) and labels ``[n·T]`` (``y[i, t]``), sequence-major."""
    n, T = x.shape
    pos = torch.arange(T).repeat(n)
    return torch.cat([x.repeat_interleave(T, 0), pos[:, None]], dim=1), y.reshape(-1)


@contextmanager
def _quiet_sdpa() -> Iterator[None]:
    """Silence torch's notice that ``scaled_dot_product_attention`` has no vmap batching rule on CPU (it
    falls back to a loop: slower, same numbers); every other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message="There is a performance drop because we have not yet implemented the batching rule",
            category=UserWarning,
        )
        yield


def vit_config(dataset: str, input_shape: tuple[int, ...], num_classes: int, width: int, cfg: RebasinConfig) -> dict:
    """The ``ViT`` config for one width on ``dataset``: flat 8×8 digits as 2-D images, MNIST-1D (or any other
    flat input) as a 1-D sequence, ``[C, H, W]`` images as they are. Raises ``ValueError`` if ``cfg.patch``
    does not divide the image or ``cfg.heads`` the width."""
    if len(input_shape) == 3:
        channels, size, dims = input_shape[0], input_shape[1], 2
        if input_shape[1] != input_shape[2]:
            raise ValueError(f"the ViT takes square images, {dataset!r} has {input_shape}")
    elif dataset == "digits":
        side = math.isqrt(input_shape[0])
        channels, size, dims = 1, side, 2
    else:
        channels, size, dims = 1, input_shape[0], 1
    if size % cfg.patch:
        raise ValueError(f"patch={cfg.patch} does not divide the {dataset} inputs' size {size}; --set patch=…")
    if width % cfg.heads:
        raise ValueError(f"heads={cfg.heads} does not divide the width {width}")
    return {
        "name": "vit",
        "image_size": size,
        "patch": cfg.patch,
        "channels": channels,
        "dim": width,
        "depth": cfg.depth,
        "heads": cfg.heads,
        "mlp_ratio": cfg.mlp_ratio,
        "num_classes": num_classes,
        "norm_first": True,
        "activation": "gelu",
        "dims": dims,
    }


# ---------------------------------------------------------------------------------------------
# measurement


def headless(spec: PermutationSpec) -> PermutationSpec:
    """``spec`` without its head structure (no blocks, no head classes): units move freely across heads."""
    return PermutationSpec(spec.axes, spec.shapes)


@torch.no_grad()
def function_error(model: nn.Module, before: Params, after: Params, x: Tensor) -> float:
    """max |f(after, x) − f(before, x)| / max |f(before, x)| in eval mode (0 for an unchanged function)."""
    with module_mode(model, False):
        f0 = functional_call(model, dict(before), (x,))
        f1 = functional_call(model, dict(after), (x,))
    return float((f1 - f0).abs().max() / f0.abs().max().clamp_min(1e-30))


def measure_pair(
    model: nn.Module,
    plain: nn.Module,
    spec: PermutationSpec,
    pa: Params,
    pb: Params,
    splits: Mapping[str, tuple[Tensor, Tensor]],
    x_am: Tensor,
    x_fn: Tensor,
    s: MatchSettings,
    seed: int,
) -> dict:
    """Align θ_b to θ_a by every method of ``METHODS`` and measure each path θ_a → P(θ_b).

    ``model`` is what the losses are computed with (inputs ``splits[...][0]``, the STE's data
    ``splits["train"]``); ``plain`` the architecture ``spec`` belongs to, run on ``x_am`` (activation
    matching) and ``x_fn`` (function errors); ``seed`` (the pair's index) seeds weight matching and the
    STE. Returns ``{"methods": {name: {"barriers", "function_error", "t", "curves"}}, "endpoints": {...},
    "timing_s": {...}, ...}`` (JSON-able).
    """
    x_tr, y_tr = splits["train"]
    timing: dict[str, float] = {}
    perms: dict[str, tuple[PermutationSpec, Permutation]] = {"naive": (spec, Permutation.identity(spec))}
    t0 = time.perf_counter()
    flat = headless(spec)
    perms["wm-headless"] = (flat, weight_matching(flat, pa, pb, seed=seed, restarts=s.wm_restarts).perm)
    timing["wm-headless"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    wm = weight_matching(spec, pa, pb, seed=seed, restarts=s.wm_restarts)
    perms["wm"] = (spec, wm.perm)
    timing["wm"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    perms["am"] = (spec, activation_matching(plain, spec, pa, pb, x_am[: s.am_examples]).perm)
    timing["am"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ste = s.ste.run(model, spec, pa, pb, x_tr, y_tr, seed=seed, init=wm.perm)
    perms["ste"] = (spec, ste.perm)
    timing["ste"] = time.perf_counter() - t0
    out: dict = {"methods": {}, "timing_s": timing, "wm_objective": wm.objective, "ste_best_step": ste.best_step}
    for name, (sp, perm) in perms.items():
        b = perm.apply(sp, pb)
        pe = evaluate_linear_path(model, pa, b, s.grid, splits)
        out["methods"][name] = {
            "barriers": pe.barrier_table(),
            "function_error": function_error(plain, pb, b, x_fn),
            "moved": sum(perm.num_moved().values()),
            "t": pe.t.tolist(),
            "curves": {sp_: {m: v.tolist() for m, v in per.items()} for sp_, per in pe.curves.items()},
        }
    naive = out["methods"]["naive"]["curves"]
    out["endpoints"] = {
        end: {f"{split}_{m}": naive[split][m][i] for split in naive for m in naive[split]}
        for end, i in (("a", 0), ("b", -1))
    }
    return out


# ---------------------------------------------------------------------------------------------
# jobs


@dataclass(frozen=True)
class ViTPairArgs:
    """One pair (θ_a, θ_b) of ViTs of one width."""

    model: dict
    a: Endpoint
    b: Endpoint
    data: DataRef
    match: MatchSettings
    pair: int  # the pair's index: seeds weight matching and the STE
    width: int


def vit_pair_job(args: ViTPairArgs, ctx: JobContext) -> dict:
    """Every method's path and function error for one ViT pair."""
    data, model = ctx.setup(args)
    spec = spec_for(model)
    pa, pb = ctx.endpoints([args.a, args.b])
    splits = {"train": (data.x_train, data.y_train), "test": (data.x_test, data.y_test)}
    out = measure_pair(model, model, spec, pa, pb, splits, data.x_train, data.x_test, args.match, args.pair)
    _log(ctx, f"ViT dim {args.width:4d} pair {args.pair}", out)
    return out


@dataclass(frozen=True)
class LMPairArgs:
    """One pair of causal LMs: what determines their data, training and measurement."""

    model: dict  # CausalTransformer keyword arguments
    train: TrainConfig
    lag: int
    sequences: int
    test_sequences: int
    data_seed: int
    seeds: tuple[int, int]  # initialisation and data-order seeds of θ_a and θ_b
    match: MatchSettings
    pair: int  # the pair's index: seeds weight matching and the STE


def lm_data(args: LMPairArgs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training and test sequences ``(x_tr, y_tr, x_te, y_te)`` of the lag task, each ``[n, block_size]``."""
    T, V = args.model["block_size"], args.model["vocab"]
    x_tr, y_tr = make_sequence_task(args.sequences, T, V, seed=args.data_seed, lag=args.lag)
    x_te, y_te = make_sequence_task(args.test_sequences, T, V, seed=args.data_seed + 1, lag=args.lag)
    return x_tr, y_tr, x_te, y_te


def lm_pair_job(args: LMPairArgs, ctx: JobContext) -> dict:
    """Train the pair (K = 2 at once, per-token cross-entropy), then every method's path and function error."""
    x_tr, y_tr, x_te, y_te = lm_data(args)
    cfg = {k: v for k, v in args.model.items() if k != "name"}
    model, plain = NextTokenAt(**cfg).to(ctx.dev), CausalTransformer(**cfg).to(ctx.dev)
    spec = spec_for(plain)
    tok_tr, lab_tr = token_examples(x_tr, y_tr)
    tok_te, lab_te = token_examples(x_te, y_te)
    with _quiet_sdpa():
        t0 = time.perf_counter()
        trained = train_many(
            model,
            [init_params(model, s) for s in args.seeds],
            tok_tr,
            lab_tr,
            args.train,
            list(args.seeds),
            device=ctx.dev,
            progress=ctx.progress,
        )
        t_train = time.perf_counter() - t0
        pa, pb = ({k: v.to(ctx.dev) for k, v in p.items()} for p in trained)
        dev = ctx.dev
        splits = {"train": (tok_tr.to(dev), lab_tr.to(dev)), "test": (tok_te.to(dev), lab_te.to(dev))}
        out = measure_pair(model, plain, spec, pa, pb, splits, x_tr.to(dev), x_te.to(dev), args.match, args.pair)
    out["timing_s"]["train"] = t_train
    _log(ctx, f"causal LM dim {args.model['dim']} pair {args.pair}", out)
    return out


def _log(ctx: JobContext, what: str, out: dict) -> None:
    m = out["methods"]
    ctx.log(
        f"  {what}: test acc {1 - out['endpoints']['a']['test_error']:.3f}/"
        f"{1 - out['endpoints']['b']['test_error']:.3f}; train loss barrier "
        + ", ".join(f"{k} {m[k]['barriers']['train_loss_mid']:.3f}" for k in METHODS)
        + f"; function error wm-headless {m['wm-headless']['function_error']:.1e}, head-aware max "
        f"{max(m[k]['function_error'] for k in HEAD_AWARE):.1e}"
    )


def rebasin_jobs(cfg: RebasinConfig, data) -> list[Job]:
    """The causal LM pairs first (they train their own endpoints: the longest jobs), then every ViT pair."""
    validate.integer("pairs", cfg.pairs)
    validate.integer("lm.pairs", cfg.lm.pairs, minimum=0)
    validate.integer("match.grid", cfg.match.grid, minimum=2)
    if not validate.integers("widths", cfg.widths):
        raise ValueError("widths is empty: give at least one ViT width")
    lm = cfg.lm
    jobs = []
    lm_model = {
        "name": "causal_transformer",
        "vocab": lm.vocab,
        "block_size": lm.block_size,
        "dim": lm.dim,
        "depth": lm.depth,
        "heads": lm.heads,
        "mlp_ratio": lm.mlp_ratio,
        "norm": "layer",
        "tie_weights": False,
    }
    for pair in range(lm.pairs):
        seeds = (cfg.seed * 1000 + 500 + 2 * pair, cfg.seed * 1000 + 501 + 2 * pair)
        jobs.append(
            Job(
                lm_pair_job,
                LMPairArgs(
                    lm_model,
                    lm.train,
                    lm.lag,
                    lm.sequences,
                    lm.test_sequences,
                    lm.data_seed,
                    seeds,
                    cfg.match,
                    pair,
                ),
            )
        )
    for width in cfg.widths:
        mcfg = vit_config(cfg.dataset, tuple(data.input_shape), data.num_classes, width, cfg)
        seeds = [cfg.seed * 1000 + 2 * p + s for p in range(cfg.pairs) for s in (0, 1)]
        eps = [Endpoint(mcfg, cfg.train, s, data.ref) for s in seeds]
        for pair in range(cfg.pairs):
            jobs.append(
                Job(
                    vit_pair_job,
                    ViTPairArgs(mcfg, eps[2 * pair], eps[2 * pair + 1], data.ref, cfg.match, pair, width),
                )
            )
    return jobs


# ---------------------------------------------------------------------------------------------
# report

BARRIER_COLS = [f"{s}_{m}_{k}" for s in ("train", "test") for m in ("loss", "error") for k in BARRIER_KINDS]


def _rows(results: Results) -> tuple[list[dict], list[dict], dict]:
    """Per (model, pair, method) rows, per (model, pair) endpoint rows, and the results by (model, pair)."""
    rows, ends, by = [], [], {}
    for args, res in results:
        if isinstance(args, ViTPairArgs):
            model, width = f"ViT-{args.width}", args.width
        elif isinstance(args, LMPairArgs):
            model, width = "causal LM", args.model["dim"]
        else:
            continue
        pair = args.pair
        by[model, pair] = res
        for method in METHODS:
            m = res["methods"][method]
            rows.append(
                {
                    "model": model,
                    "width": width,
                    "pair": pair,
                    "method": method,
                    **m["barriers"],
                    "function_error": m["function_error"],
                    "moved": m["moved"],
                }
            )
        for end in ("a", "b"):
            e = res["endpoints"][end]
            ends.append(
                {
                    "model": model,
                    "width": width,
                    "pair": pair,
                    "endpoint": end,
                    "train_acc": 1 - e["train_error"],
                    "test_acc": 1 - e["test_error"],
                    "train_loss": e["train_loss"],
                    "test_loss": e["test_loss"],
                }
            )
    return rows, ends, by


def rebasin_report(cfg: RebasinConfig, results: Results) -> Report:
    """Barriers of naive / head-unaware / head-aware alignment of transformers, function errors, claims."""
    rep = Report()
    rows, ends, by = _rows(results)
    models = list(dict.fromkeys(r["model"] for r in rows))
    vits = [m for m in models if m.startswith("ViT")]
    rep.table(
        "barriers_per_pair",
        rows,
        ["model", "width", "pair", "method", *BARRIER_COLS, "function_error", "moved"],
        title="Barriers per pair (mid = Git Re-Basin Def. 2.2, as Verma & Elbayad; max_chord = Frankle et al.) "
        "and the relative function error max|f(P(θ_b)) − f(θ_b)| / max|f(θ_b)| of each P",
    )
    summary = summary_rows(
        rows,
        {"model": models, "method": METHODS},
        (
            "train_loss_mid",
            "test_loss_mid",
            "train_error_mid",
            "test_error_mid",
            "train_loss_max_chord",
            "test_error_max_chord",
        ),
    )
    rep.table(
        "barriers",
        summary,
        title=f"Barriers (mean ± std over pairs): ViTs on {cfg.dataset} (depth {cfg.depth}, {cfg.heads} heads) "
        f"and the causal LM on the lag task; grid {cfg.match.grid} points",
    )
    fn_rows = []
    for model in models:
        for method in METHODS:
            errs = [r["function_error"] for r in rows if r["model"] == model and r["method"] == method]
            fn_rows.append(
                {
                    "model": model,
                    "method": method,
                    "pairs": len(errs),
                    "max_function_error": max(errs),
                    "keeps_function": max(errs) <= FUNCTION_TOL,
                }
            )
    rep.table(
        "function_error",
        fn_rows,
        title=f"Does P keep the function? max over pairs of the relative function error (float32; kept: "
        f"≤ {FUNCTION_TOL:g})",
    )
    end_rows = []
    for model in models:
        sel = [e for e in ends if e["model"] == model]
        cols = ("train_acc", "test_acc", "train_loss", "test_loss")
        end_rows.append({"model": model, "endpoints": len(sel), **{c: fmt_pm([e[c] for e in sel]) for c in cols}})
    rep.table("endpoints", end_rows, title="The trained endpoints (mean ± std over all endpoints of a model)")
    _figures(rep, cfg, rows, by, vits, models)

    # --- claims ----------------------------------------------------------------------------
    def mean_of(model: str, method: str, col: str = "train_loss_mid") -> float:
        return mean_std([r[col] for r in rows if r["model"] == model and r["method"] == method])[0]

    def per_model(method: str) -> str:
        return ", ".join(f"{m} {mean_of(m, 'naive'):.3f} → {mean_of(m, method):.3f}" for m in models)

    for cid, method in (("am-lowers-barrier", "am"), ("wm-lowers-barrier", "wm")):
        ok = [mean_of(m, method) < mean_of(m, "naive") for m in models]
        rep.verdict(
            cid,
            f"train loss barrier (mid), naive → {method}: {per_model(method)}; lower at "
            f"{sum(ok)} of {len(models)} models",
            bool(models) and all(ok),
        )

    remains, parts = [], []
    for m in models:
        naive = mean_of(m, "naive")
        best_method = min(HEAD_AWARE, key=lambda k: mean_of(m, k))
        best = mean_of(m, best_method)
        remains.append(best > 0.1 * naive and best > 0.05)
        parts.append(
            f"{m}: best {best_method} {best:.3f} = {100 * best / naive:.0f}% of naive {naive:.3f}"
            if naive > 0
            else f"{m}: naive {naive:.3f} ≤ 0"
        )
    rep.verdict("barrier-remains", "; ".join(parts), bool(models) and all(remains))

    aware = [r["function_error"] for r in rows if r["method"] in HEAD_AWARE]
    flat = [r["function_error"] for r in rows if r["method"] == "wm-headless"]
    rep.verdict(
        "heads-keep-function",
        f"head-aware (wm, am, ste) max function error {max(aware):.1e} over {len(aware)} permutations; "
        f"head-unaware weight matching min {min(flat):.1e}, median {sorted(flat)[len(flat) // 2]:.1e} "
        f"over {len(flat)}",
        max(aware) <= FUNCTION_TOL and min(flat) > BROKEN,
    )

    def path_loss(model: str, method: str, at) -> float:  # mean over pairs of at(train loss along the path)
        return mean_std([at(by[mm, p]["methods"][method]["curves"]["train"]["loss"]) for mm, p in by if mm == model])[0]

    # the mid barrier subtracts the mean of the endpoints' losses, and the head-unaware path ends at another
    # (worse) network: its far end's loss and its path's peak loss are shown beside the verdict
    worse = [mean_of(m, "wm-headless") > mean_of(m, "wm") for m in models]
    rep.verdict(
        "headless-worse",
        "train loss barrier (mid), wm-headless vs wm: "
        + ", ".join(
            f"{m} {mean_of(m, 'wm-headless'):.3f} vs {mean_of(m, 'wm'):.3f} (far end's train loss "
            f"{path_loss(m, 'wm-headless', lambda v: v[-1]):.3f} vs θ_b's {path_loss(m, 'naive', lambda v: v[-1]):.3f}"
            f"; peak loss {path_loss(m, 'wm-headless', max):.3f} vs {path_loss(m, 'wm', max):.3f})"
            for m in models
        )
        + f"; higher at {sum(worse)} of {len(models)} models",
        bool(models) and all(worse),
    )

    from scipy.stats import spearmanr

    widths = sorted(cfg.widths)
    vals = {k: [mean_of(f"ViT-{w}", k) for w in widths] for k in ("wm", "am")}
    rho = {
        k: float(spearmanr(widths, v).statistic)
        if len(widths) > 2
        else (-1.0 if v[-1] < v[0] else 1.0)
        if len(widths) == 2
        else float("nan")
        for k, v in vals.items()
    }
    rep.verdict(
        "wm-shrinks-with-width",
        "ViT train loss barrier after weight matching by width: "
        + ", ".join(f"{w}: {b:.3f}" for w, b in zip(widths, vals["wm"], strict=True))
        + f" (ρ = {rho['wm']:.2f}); activation matching: "
        + ", ".join(f"{w}: {b:.3f}" for w, b in zip(widths, vals["am"], strict=True))
        + f" (ρ = {rho['am']:.2f})",
        len(widths) > 1 and rho["wm"] < 0 and vals["wm"][-1] < vals["wm"][0],
    )
    return rep


def _figures(rep: Report, cfg: RebasinConfig, rows: list[dict], by: dict, vits: list[str], models: list[str]) -> None:
    plt, pd, sns = seaborn(context="notebook")
    df = pd.DataFrame([r for r in rows if r["model"] in vits])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, col, label in zip(
        axes,
        ("train_loss_mid", "test_error_mid"),
        ("train loss barrier (mid)", "test error barrier (mid)"),
        strict=True,
    ):
        sns.lineplot(
            df,
            x="width",
            y=col,
            hue="method",
            style="method",
            markers=True,
            dashes=False,
            ax=ax,
            errorbar="sd",
            hue_order=list(METHODS),
            style_order=list(METHODS),
        )
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(cfg.widths), [str(w) for w in sorted(cfg.widths)])
        ax.set_xlabel("ViT width (model dimension)")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs width, ViT on {cfg.dataset}")
    rep.figure("barrier_vs_width", fig)

    long = []
    for model in ([vits[-1]] if vits else []) + [m for m in models if not m.startswith("ViT")]:
        for (mm, pair), res in by.items():
            if mm != model:
                continue
            for method, m in res["methods"].items():
                long += [
                    {"t": t, "loss": v, "method": method, "model": model, "pair": pair}
                    for t, v in zip(m["t"], m["curves"]["train"]["loss"], strict=True)
                ]
    if long:
        dl = pd.DataFrame(long)
        shown = list(dict.fromkeys(dl.model))
        fig, axes = plt.subplots(1, len(shown), figsize=(6 * len(shown), 4), squeeze=False)
        for ax, model in zip(axes[0], shown, strict=True):
            sns.lineplot(
                dl[dl.model == model], x="t", y="loss", hue="method", ax=ax, errorbar="sd", hue_order=list(METHODS)
            )
            ax.set_xlabel("λ")
            ax.set_ylabel("train loss")
            ax.set_title(f"train loss along θ_a → P(θ_b), {model}")
        rep.figure("interpolation", fig)


TARGET = declare(
    "transformer-rebasin",
    __file__,
    config=RebasinConfig,
    sizes=SIZES,
    jobs=rebasin_jobs,
    report=rebasin_report,
    datasets=("digits", "mnist1d", "mnist", "cifar10"),
    claim_ids=(
        "am-lowers-barrier",
        "wm-lowers-barrier",
        "barrier-remains",
        "heads-keep-function",
        "headless-worse",
        "wm-shrinks-with-width",
    ),
)
