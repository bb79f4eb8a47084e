"""Permuted simplexes (the project's research note, ``sources/000``): do low-loss simplexes
θ₁, P₂(θ₂), …, Pₙ(θₙ) exist, which alignment finds them, and are they useful ensembles?

``permuted-simplex``: N independently trained MLPs per cell of (width × weight decay); for n = 2 … N
the simplex of the first n models aligned by every method of ``reference.permuted_simplex``
(identity, star, MergeMany, universe, sync by ascent, C2M3, interior optimisation from universe and from
MergeMany), its
barrier (Eq. SB: exact grid + adversarial ascent for n ≤ 4, Dirichlet samples + adversarial ascent
above), mean and centroid loss and worst edge. Then, on the main cell: the loss over a 2-simplex
(ternary heatmaps), the "Property 2" table (edges to θ₁ vs the far edge), and the ensemble table
(simplex / glued complex samples vs deep ensembles vs the merged centroid vs a Bézier curve).

Every job's arguments hold the :class:`Endpoint` s it reads (model, training config with its weight
decay, seed, data), so a part of the main cell is recomputed whenever its models change. The simplexes
of n ≤ 4 models that several jobs align (the main cell's first 3 and 4 models) are memoised per process
by content: the endpoints' key hashes, the method, the seed and, for the interior search, its config
and the data fingerprint.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from reference.curves import train_curve
from reference.ensembles import ensemble_probs, ensemble_table
from reference.merge import merge_many, repair
from reference.params import stack
from reference.permuted_simplex import (
    align_simplex,
    barycentric_grid,
    evaluate_simplex,
    glue,
    simplex_barrier,
)
from reference.simplex import sample_dirichlet
from reference.specs import spec_for
from reference.train import TrainConfig

from ..runner import DataRef, Endpoint, Job, JobContext, ModelsArgs, Report, Results, fmt_pm, mean_std, seaborn
from ..runner.declare import declare
from ..runner.util import config_hash, jsonable

# (label, align_simplex method, init for "interior")
METHODS = (
    ("identity", "identity", None),
    ("star", "star", None),
    ("mergemany", "mergemany", None),
    ("universe", "universe", None),
    ("sync-ascent", "sync-ascent", None),
    ("c2m3", "c2m3", None),
    ("interior", "interior", "universe"),
    ("interior-mm", "interior", "mergemany"),
)
TERNARY_METHODS = ("star", "universe", "mergemany", "c2m3", "interior")


@dataclass(frozen=True)
class InteriorConfig:
    steps: int = 300
    lr: float = 0.1
    batch_size: int = 128
    lams_per_step: int = 4
    eval_lams: int = 32


@dataclass(frozen=True)
class PermutedSimplexConfig:
    dataset: str = "digits"
    seed: int = 0
    depth: int = 2
    widths: tuple[int, ...] = (64, 256)
    weight_decays: tuple[float, ...] = (0.0, 0.5)
    main_width: int = 256
    main_wd: float = 0.0
    n_models: int = 8
    ns: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    grid_resolution: int = 8
    samples: int = 256
    adversarial_steps: int = 40
    low_loss: float = 0.1  # nats: a simplex "has low loss" when its barrier (Eq. SB) is below this
    ternary_resolution: int = 24
    triples: tuple[tuple[int, int, int], ...] = ((0, 1, 2), (0, 3, 4), (0, 5, 6), (1, 3, 5))
    complex_simplices: tuple[tuple[int, ...], ...] = ((0, 1, 2, 3), (0, 3, 4, 5), (0, 5, 6, 7))
    complex_method: str = "interior-mm"
    repair_ns: tuple[int, ...] = (3, 4)
    repair_methods: tuple[str, ...] = ("star", "mergemany", "interior", "interior-mm")
    repair_resolution: int = 6
    ensemble_samples: int = 32
    interior: InteriorConfig = InteriorConfig()
    train: TrainConfig = TrainConfig.adam(40, optimizer="adamw")
    curve_train: TrainConfig = TrainConfig.adam(40)


SIZES = {
    "quick": PermutedSimplexConfig(
        widths=(32,), weight_decays=(0.0,), main_width=32, n_models=4, ns=(2, 3, 4), grid_resolution=4,
        samples=32, adversarial_steps=5, ternary_resolution=8, triples=((0, 1, 2),),
        complex_simplices=((0, 1, 2), (0, 2, 3)), ensemble_samples=6, repair_ns=(3,),
        repair_methods=("star", "interior"), repair_resolution=3,
        interior=InteriorConfig(steps=20, eval_lams=8),
        train=TrainConfig.adam(8, optimizer="adamw"),
        curve_train=TrainConfig.adam(4)),
    "cpu": PermutedSimplexConfig(),
    # The research note (sources/000) states no experiment: no model, data or budget. It reasons about
    # M-layer fully-connected nets (§1.1) and builds on Git Re-Basin ([3] of the note), so the paper size
    # is Git Re-Basin's MNIST MLP (§5.1 / Fig. 2 and the authors' src/mnist_mlp_train.py: 3 hidden layers
    # of 512 ReLU units, Adam, 100 epochs, batch 500, no schedule, no weight decay; lr 1e-3 is our choice,
    # it is a command-line argument there). One cell (no weight-decay grid: our choice), 8 models and
    # n = 2 … 8 as at the cpu size (our choice; the note only says n "may not be large", like the
    # k < 10 of Benton et al. [4]). The Bézier curve of the ensemble table is trained with the same recipe
    # (our choice). Every search/evaluation budget (grid, samples, ascent, interior steps) is the cpu
    # size's (our choice). Needs --data-dir with the MNIST IDX files; the MLP reads the flattened images.
    "paper": PermutedSimplexConfig(
        dataset="mnist", depth=3, widths=(512,), weight_decays=(0.0,), main_width=512, main_wd=0.0,
        train=TrainConfig(epochs=100, batch_size=500, lr=1e-3, optimizer="adam", schedule="constant"),
        curve_train=TrainConfig(epochs=100, batch_size=500, lr=1e-3, optimizer="adam", schedule="constant")),
}


# ---------------------------------------------------------------------------------------------
# alignment, memoised by content

# simplexes of n ≤ 4 models aligned in this process, by (the endpoints' key hashes, method label, seed,
# interior search config and data fingerprint for the interior methods, device): the main cell's
# simplexes of its first 3 and 4 models are reused by the Property 2, REPAIR, ternary and ensemble
# parts instead of being searched again
_ALIGNED: dict[tuple, Any] = {}


def _method(label: str) -> tuple[str, str | None]:
    return next((m, i) for lab, m, i in METHODS if lab == label)


def _needs_interior(labels) -> bool:
    return any(_method(lab)[0] == "interior" for lab in labels)


def _align(ctx: JobContext, model, spec, eps, models, label: str, ref: DataRef, data, interior, seed: int):
    if len(models) > 4:  # only the small simplexes are reused
        return _align_new(model, spec, models, label, data, interior, seed)
    meth, _ = _method(label)
    key = (tuple(config_hash(e.key()) for e in eps), label, int(seed),
           (config_hash(jsonable(interior)), ref.fingerprint) if meth == "interior" else None, ctx.device)
    if key not in _ALIGNED:
        _ALIGNED[key] = _align_new(model, spec, models, label, data, interior, seed)
    return _ALIGNED[key]


def _align_new(model, spec, models, label: str, data, interior: InteriorConfig | None, seed: int):
    meth, init = _method(label)
    kw = {}
    if meth == "interior":
        ic = interior
        kw = dict(model=model, x=data.x_train, y=data.y_train, init=init, steps=ic.steps, lr=ic.lr,
                  batch_size=ic.batch_size, lams_per_step=ic.lams_per_step, eval_lams=ic.eval_lams)
    return align_simplex(spec, models, meth, seed=seed, **kw)


def _setup(args, ctx: JobContext):
    data, model = ctx.setup(args)
    spec = spec_for(model)
    models = ctx.endpoints(list(args.models))
    return data, model, spec, models


# ---------------------------------------------------------------------------------------------
# jobs


@dataclass(frozen=True)
class CellArgs(ModelsArgs):
    """The simplex of θ₁ … θₙ of one cell, aligned by every method, and its barrier. ``models``: θ₁ … θₙ (n = len)."""

    interior: InteriorConfig
    grid_resolution: int
    samples: int
    adversarial_steps: int
    seed: int

    @property
    def width(self) -> int:
        return self.model["widths"][0]

    @property
    def weight_decay(self) -> float:
        return self.models[0].train.weight_decay


def cell_job(args: CellArgs, ctx: JobContext) -> dict:
    data, model, spec, models = _setup(args, ctx)
    n = len(models)
    out = {}
    for label, _, _ in METHODS:
        t0 = time.time()
        ps = _align(ctx, model, spec, args.models, models, label, args.data, data, args.interior, args.seed)
        t_align = time.time() - t0
        b = simplex_barrier(model, ps.vertices, data.x_train, data.y_train, method="adversarial",
                            resolution=args.grid_resolution, samples=args.samples,
                            adversarial_steps=args.adversarial_steps, seed=args.seed)
        cen = evaluate_simplex(model, ps.vertices, data.x_test, data.y_test, [[1.0 / n] * n])
        out[label] = {**b.as_dict(), "align_s": t_align, "centroid_test_error": float(cen.error[0]),
                      "vertex_test_error": float(cen.vertex_error.mean()),
                      "best_step": ps.info.get("best_step"), "changed": (ps.info.get("changed") or [0])[-1]}
    ctx.log(f"  width {args.width} wd {args.weight_decay} n={n}: " + ", ".join(
        f"{lab} {out[lab]['barrier']:.3f}" for lab, _, _ in METHODS))
    return out


@dataclass(frozen=True)
class Property2Args(ModelsArgs):
    """Every triple's 2-simplex on the main cell, aligned by every method: its grid barrier and edges.
    ``models``: θ₁ … θ_k, k = 1 + the largest index in ``triples``."""

    triples: tuple[tuple[int, int, int], ...]
    interior: InteriorConfig
    grid_resolution: int
    seed: int


def property2_job(args: Property2Args, ctx: JobContext) -> dict:
    data, model, spec, models = _setup(args, ctx)
    out = {}
    for tri in args.triples:
        es, ms = [args.models[i] for i in tri], [models[i] for i in tri]
        for label, _, _ in METHODS:
            ps = _align(ctx, model, spec, es, ms, label, args.data, data, args.interior, args.seed)
            b = simplex_barrier(model, ps.vertices, data.x_train, data.y_train, method="grid",
                                resolution=args.grid_resolution * 2, seed=args.seed)
            out[f"{tuple(tri)}/{label}"] = b.as_dict()
    ctx.log(f"  property 2: {len(args.triples)} triple(s) × {len(METHODS)} methods")
    return out


@dataclass(frozen=True)
class RepairArgs(ModelsArgs):
    """Simplex barriers without and with REPAIR (Jordan et al. 2023) at every evaluated point.
    ``models``: θ₁ … θ_k, k = max(ns)."""

    ns: tuple[int, ...]
    methods: tuple[str, ...]
    resolution: int
    interior: InteriorConfig | None  # None when no method is an interior search
    seed: int


def repair_job(args: RepairArgs, ctx: JobContext) -> dict:
    data, model, spec, models = _setup(args, ctx)
    out = {}
    for n in args.ns:
        for label in args.methods:
            ps = _align(ctx, model, spec, args.models[:n], models[:n], label, args.data, data, args.interior,
                        args.seed)
            for corr in (None, "repair"):
                b = simplex_barrier(model, ps.vertices, data.x_train, data.y_train, method="grid",
                                    resolution=args.resolution, mean_samples=64, edge_grid=7, seed=args.seed,
                                    correction=corr, x_stats=data.x_train)
                out[f"{n}/{label}/{corr}"] = b.as_dict()
    ctx.log("  repair: " + ", ".join(f"n={n} {lab} {out[f'{n}/{lab}/None']['barrier']:.3f}→"
                                     f"{out[f'{n}/{lab}/repair']['barrier']:.3f}"
                                     for n in args.ns for lab in args.methods))
    return out


@dataclass(frozen=True)
class TernaryArgs(ModelsArgs):
    """The train loss on a barycentric grid of the 2-simplex θ₁, P₂(θ₂), P₃(θ₃), per method. ``models``: θ₁, θ₂, θ₃."""

    resolution: int
    interior: InteriorConfig
    seed: int


def ternary_job(args: TernaryArgs, ctx: JobContext) -> dict:
    data, model, spec, models = _setup(args, ctx)
    lams = barycentric_grid(3, args.resolution)
    out = {"lams": lams.tolist()}
    for label in TERNARY_METHODS:
        ps = _align(ctx, model, spec, args.models[:3], models[:3], label, args.data, data, args.interior, args.seed)
        ev = evaluate_simplex(model, ps.vertices, data.x_train, data.y_train, lams)
        out[label] = ev.loss.tolist()
    ctx.log("  ternary: max loss " + ", ".join(f"{k} {max(out[k]):.3f}" for k in TERNARY_METHODS))
    return out


@dataclass(frozen=True)
class EnsembleArgs(ModelsArgs):
    """Ensembles of the main cell: single model, deep ensembles, a permuted simplex, the glued complex,
    the merged centroid with and without REPAIR, a Bézier curve. ``models``: all N models of the main cell."""

    complex_simplices: tuple[tuple[int, ...], ...]
    complex_method: str
    samples: int
    curve_train: TrainConfig
    interior: InteriorConfig | None  # None when complex_method is not an interior search
    seed: int


def ensemble_job(args: EnsembleArgs, ctx: JobContext) -> dict:
    data, model, spec, models = _setup(args, ctx)
    seed = args.seed
    x, y, xt, yt = data.x_train, data.y_train, data.x_test, data.y_test
    S = args.samples
    g = torch.Generator().manual_seed(seed)
    rows = {}

    def table(stacked, cost, what):
        probs = ensemble_probs(model, stacked, xt)
        t = ensemble_table(probs, yt)
        rows[what] = {**t["ensemble"], "member_mean_nll": t["member_mean"]["nll"],
                      "member_mean_accuracy": t["member_mean"]["accuracy"], "stored_vectors": cost}

    n_all = len(models)
    table(stack(models[:1]), 1, "single model (θ₁)")
    table(stack(models), n_all, f"deep ensemble ({n_all} models)")
    first = args.complex_simplices[0]
    table(stack([models[i] for i in first]), len(first), f"deep ensemble of simplex 1's {len(first)} vertices")
    # one permuted simplex and the glued complex of permuted simplexes
    sims = [_align(ctx, model, spec, [args.models[i] for i in s], [models[i] for i in s], args.complex_method,
                   args.data, data, args.interior, seed)
            for s in args.complex_simplices]
    lam = sample_dirichlet(S, len(first), g)
    table(sims[0].points(lam), len(first), f"permuted simplex 1 ({S} samples)")
    cx = glue(spec, [s.vertices for s in sims])
    truth = [tuple(s) for s in args.complex_simplices]
    first_seen: dict[int, int] = {}
    for s in truth:
        for m in s:
            first_seen.setdefault(m, len(first_seen))
    expected = tuple(tuple(first_seen[m] for m in s) for s in truth)
    _, _, pts = cx.sample(S, g, weighting="volume")
    table(pts, cx.n_classes, f"permuted complex ({len(sims)} simplexes, {S} samples)")
    gaps = cx.function_gap(model, xt[:256])
    # merged centroid: MergeMany of all models, with and without REPAIR
    mm = merge_many(spec, models, seed=seed)
    table(stack([mm.merged]), 1, f"merged centroid (MergeMany of {n_all})")
    aligned = [p.apply(spec, m) for p, m in zip(mm.perms, models, strict=True)]
    rep = repair(model, aligned, [1.0 / n_all] * n_all, x)
    table(stack([rep]), 1, f"merged centroid + REPAIR (of {n_all})")
    # a Bézier curve between θ₁ and θ₂ (Garipov et al. 2018)
    curve = train_curve(model, models[0], models[1], x, y, cfg=args.curve_train, kind="bezier", seed=seed,
                        device=ctx.dev, progress=False)
    ts = (torch.arange(S, dtype=torch.float64) + 0.5) / S
    table(curve.points_at(ts), 3, f"Bézier curve θ₁–θ₂ ({S} samples)")
    ctx.log("  ensembles: test NLL " + ", ".join(f"{k} {v['nll']:.4f}" for k, v in rows.items()))
    return {"rows": rows, "glue": {"classes": [list(c) for c in cx.classes], "expected": [list(c) for c in expected],
                                   "shared": len(cx.shared()), "max_function_gap": max(gaps.values())}}


def _mcfg(data, width: int, depth: int) -> dict:
    return {"name": "mlp", "in_features": data.in_features, "widths": [width] * depth,
            "num_classes": data.num_classes, "bias": True}


def _train_cfg(cfg: PermutedSimplexConfig, wd: float) -> TrainConfig:
    return TrainConfig(**{**asdict(cfg.train), "weight_decay": wd})


def jobs(cfg: PermutedSimplexConfig, data) -> list[Job]:
    if cfg.main_width not in cfg.widths or cfg.main_wd not in cfg.weight_decays:
        raise ValueError(f"permuted-simplex: the main cell (main_width {cfg.main_width}, main_wd {cfg.main_wd}) "
                         f"must be one of the grid's cells (widths {cfg.widths} × weight_decays {cfg.weight_decays})")
    if max(cfg.ns) > cfg.n_models:
        raise ValueError(f"permuted-simplex: ns {cfg.ns} asks for more than n_models = {cfg.n_models} models")
    used = [i for tri in cfg.triples for i in tri] + [i for s in cfg.complex_simplices for i in s]
    if max(used) >= cfg.n_models or max(cfg.repair_ns) > cfg.n_models or cfg.n_models < 3:
        raise ValueError(f"permuted-simplex: triples, complex_simplices and repair_ns must index the first "
                         f"n_models = {cfg.n_models} (≥ 3) models")
    seeds = [cfg.seed * 1000 + i for i in range(cfg.n_models)]
    out: list[Job] = []
    for width, wd in itertools.product(cfg.widths, cfg.weight_decays):
        mcfg = _mcfg(data, width, cfg.depth)
        eps = tuple(Endpoint(mcfg, _train_cfg(cfg, wd), s, data.ref) for s in seeds)
        for n in cfg.ns:
            out.append(Job(cell_job, CellArgs(mcfg, eps[:n], data.ref, cfg.interior, cfg.grid_resolution,
                                              cfg.samples, cfg.adversarial_steps, cfg.seed)))
    mcfg = _mcfg(data, cfg.main_width, cfg.depth)
    eps = tuple(Endpoint(mcfg, _train_cfg(cfg, cfg.main_wd), s, data.ref) for s in seeds)
    k = 1 + max(i for tri in cfg.triples for i in tri)
    out.append(Job(property2_job, Property2Args(mcfg, eps[:k], data.ref, cfg.triples, cfg.interior,
                                                cfg.grid_resolution, cfg.seed)))
    out.append(Job(repair_job, RepairArgs(mcfg, eps[:max(cfg.repair_ns)], data.ref, cfg.repair_ns,
                                          cfg.repair_methods, cfg.repair_resolution,
                                          cfg.interior if _needs_interior(cfg.repair_methods) else None, cfg.seed)))
    out.append(Job(ternary_job, TernaryArgs(mcfg, eps[:3], data.ref, cfg.ternary_resolution, cfg.interior,
                                            cfg.seed)))
    out.append(Job(ensemble_job, EnsembleArgs(mcfg, eps, data.ref, cfg.complex_simplices, cfg.complex_method,
                                              cfg.ensemble_samples, cfg.curve_train,
                                              cfg.interior if _needs_interior([cfg.complex_method]) else None,
                                              cfg.seed)))
    return out


# ---------------------------------------------------------------------------------------------
# report


def report(cfg: PermutedSimplexConfig, results: Results) -> Report:
    """Simplex barrier vs n per alignment method; ternary heatmaps; Property 2; ensembles."""
    rep = Report()
    rows = []
    for args, res in results.of(CellArgs):
        n = len(args.models)
        for label, _, _ in METHODS:
            r = res[label]
            rows.append({"width": args.width, "weight_decay": args.weight_decay, "n": n, "method": label, **{
                k: r[k] for k in ("barrier", "mean_loss", "centroid_loss", "max_edge_barrier",
                                  "centroid_test_error", "vertex_test_error", "align_s", "changed")},
                "vertex_loss": sum(r["vertex_loss"]) / n})
    cols = ["width", "weight_decay", "n", "method", "barrier", "mean_loss", "centroid_loss", "max_edge_barrier",
            "vertex_loss", "centroid_test_error", "vertex_test_error", "align_s", "changed"]
    rep.table("simplex_barrier", rows, cols,
              title=f"Simplex train-loss barrier (Eq. SB; adversarial search) of θ₁, P₂(θ₂), …, Pₙ(θₙ), "
                    f"{cfg.dataset} MLPs depth {cfg.depth}; mean/centroid/edge losses; interior moved "
                    f"'changed' units from its start")
    rep.figure("simplex_barrier", _barrier_figure(rows, cfg))
    _low_loss_table(rep, rows, cfg)

    p2rows = _property2_table(rep, results.one(Property2Args), cfg)
    rp = results.one(RepairArgs)
    rrows = []
    for n in cfg.repair_ns:
        for label in cfg.repair_methods:
            a, b = rp[f"{n}/{label}/None"], rp[f"{n}/{label}/repair"]
            rrows.append({"n": n, "method": label, "barrier": a["barrier"], "barrier_repair": b["barrier"],
                          "mean_loss": a["mean_loss"], "mean_loss_repair": b["mean_loss"],
                          "centroid_loss": a["centroid_loss"], "centroid_loss_repair": b["centroid_loss"]})
    rep.table("repair", rrows, ["n", "method", "barrier", "barrier_repair", "mean_loss", "mean_loss_repair",
                                "centroid_loss", "centroid_loss_repair"],
              title=f"Simplex barrier (grid, resolution {cfg.repair_resolution}) and mean/centroid train loss "
                    f"without and with REPAIR at every point, width {cfg.main_width}")
    rep.figure("ternary", _ternary_figure(results.one(TernaryArgs)))
    ens = results.one(EnsembleArgs)
    erows = [{"ensemble": k, **v} for k, v in ens["rows"].items()]
    rep.table("ensembles", erows,
              ["ensemble", "nll", "accuracy", "ece", "auroc", "members", "stored_vectors", "member_mean_nll",
               "member_mean_accuracy"],
              title=f"Test metrics of ensembles, {cfg.dataset} MLP width {cfg.main_width}; permuted simplexes "
                    f"aligned by {cfg.complex_method}; stored_vectors = parameter vectors kept")
    _verdicts(rep, rows, p2rows, ens, cfg)
    return rep


def _low_loss_table(rep: Report, rows: list[dict], cfg: PermutedSimplexConfig) -> None:
    out = []
    for width, wd in itertools.product(cfg.widths, cfg.weight_decays):
        for label, _, _ in METHODS:
            ok = [r["n"] for r in rows if r["width"] == width and r["weight_decay"] == wd and r["method"] == label
                  and r["barrier"] < cfg.low_loss]
            largest = 0
            for n in sorted(cfg.ns):
                if n in ok:
                    largest = n
                else:
                    break
            out.append({"width": width, "weight_decay": wd, "method": label, "largest_low_loss_n": largest})
    rep.table("low_loss_n", out, ["width", "weight_decay", "method", "largest_low_loss_n"],
              title=f"Largest n such that every simplex of n = 2 … that n has barrier < {cfg.low_loss} nats "
                    f"(0: none)")


def _property2_table(rep: Report, p2: dict, cfg: PermutedSimplexConfig) -> list[dict]:
    rows = []
    for label, _, _ in METHODS:
        near, far, sb = [], [], []
        for tri in cfg.triples:
            r = p2[f"{tuple(tri)}/{label}"]
            e = r["edge_barriers"]
            near += [e["0-1"], e["0-2"]]
            far.append(e["1-2"])
            sb.append(r["barrier"])
        rows.append({"method": label, "edges_to_theta1": fmt_pm(near), "far_edge": fmt_pm(far),
                     "simplex_barrier": fmt_pm(sb), "near_mean": mean_std(near)[0], "far_mean": mean_std(far)[0],
                     "simplex_mean": mean_std(sb)[0]})
    rep.table("property2", rows, ["method", "edges_to_theta1", "far_edge", "simplex_barrier"],
              title=f"Property 2: train-loss barriers (max chord) of the edges θ₁–Pᵢ(θᵢ) vs the far edge "
                    f"P₂(θ₂)–P₃(θ₃) and of the 2-simplex (grid), mean ± std over {len(cfg.triples)} triples")
    return rows


def _verdicts(rep: Report, rows: list[dict], p2rows: list[dict], ens: dict, cfg: PermutedSimplexConfig) -> None:
    star = next(r for r in p2rows if r["method"] == "star")
    rep.verdict("property-2", f"edges to θ₁ {star['edges_to_theta1']}, far edge {star['far_edge']}",
                star["far_mean"] > star["near_mean"])

    def sel(label, width=None, wd=None, nmin=3):
        width = cfg.main_width if width is None else width
        wd = cfg.main_wd if wd is None else wd
        return {r["n"]: r["barrier"] for r in rows if r["method"] == label and r["width"] == width
                and r["weight_decay"] == wd and r["n"] >= nmin}

    ns3 = [n for n in cfg.ns if n >= 3]
    st, un, mm = sel("star"), sel("universe"), sel("mergemany")
    joint = {n: min(un[n], mm[n]) for n in ns3}
    rep.verdict("joint-beats-star",
                f"width {cfg.main_width}, wd {cfg.main_wd}: "
                + "; ".join(f"n={n}: star {st[n]:.3f}, MergeMany {mm[n]:.3f}, universe {un[n]:.3f}" for n in ns3),
                all(joint[n] < st[n] for n in ns3))
    c_le, c_total, c_detail = 0, 0, []
    for width, wd in itertools.product(cfg.widths, cfg.weight_decays):
        c, m, i = sel("c2m3", width, wd), sel("mergemany", width, wd), sel("interior-mm", width, wd)
        c_le += sum(c[n] <= m[n] for n in ns3)
        c_total += len(ns3)
        c_detail.append(f"w{width}/wd{wd}: " + ", ".join(f"{c[n]:.3f}/{m[n]:.3f}/{i[n]:.3f}" for n in ns3))
    rep.verdict("c2m3-vs-mergemany",
                f"C2M3 ≤ MergeMany in {c_le}/{c_total} cells×n; C2M3/MergeMany/interior-from-MergeMany, n = "
                f"{ns3[0]} … {ns3[-1]}: " + " | ".join(c_detail), c_le == c_total)
    better, total, detail = 0, 0, []
    for width, wd in itertools.product(cfg.widths, cfg.weight_decays):
        a, b = sel("universe", width, wd), sel("interior", width, wd)
        for n in ns3:
            total += 1
            better += b[n] < a[n]
        detail.append(f"w{width}/wd{wd}: " + ", ".join(f"{a[n]:.3f}→{b[n]:.3f}" for n in ns3))
    rep.verdict("interior-improves", f"lower in {better}/{total} cells×n; universe→interior " + " | ".join(detail),
                better == total)
    ll = []
    grows = True
    for width, wd in itertools.product(cfg.widths, cfg.weight_decays):
        for label in ("interior-mm", "mergemany"):
            s = sel(label, width, wd, nmin=2)
            nmax, nmin = max(s), min(s)
            grows &= s[nmax] > s[nmin]
            ll.append(f"w{width}/wd{wd} {label}: n={nmin} {s[nmin]:.3f} → n={nmax} {s[nmax]:.3f}")
    rep.verdict("barrier-grows-with-n", "; ".join(ll), grows)
    g = ens["glue"]
    rep.verdict("glue-exact", f"classes {g['classes']} (expected {g['expected']}), {g['shared']} shared classes, "
                              f"max logit gap {g['max_function_gap']:.2e}",
                g["classes"] == g["expected"] and g["max_function_gap"] < 1e-3)
    er = ens["rows"]
    cx = next(v for k, v in er.items() if k.startswith("permuted complex"))
    de = next(v for k, v in er.items() if k.startswith("deep ensemble ("))
    single = next(v for k, v in er.items() if k.startswith("single"))
    rep.verdict("complex-ensemble",
                f"NLL: single {single['nll']:.4f}, complex {cx['nll']:.4f} ({cx['stored_vectors']} vectors), deep "
                f"ensemble {de['nll']:.4f} ({de['stored_vectors']} vectors)",
                cx["nll"] < single["nll"] and cx["nll"] <= 1.05 * de["nll"])


def _barrier_figure(rows: list[dict], cfg: PermutedSimplexConfig):
    plt, pd, sns = seaborn()
    df = pd.DataFrame(rows)
    df["cell"] = df.apply(lambda r: f"width {r['width']}, wd {r['weight_decay']}", axis=1)
    cells = list(dict.fromkeys(df["cell"]))
    fig, axes = plt.subplots(2, len(cells), figsize=(4.2 * len(cells), 7.5), squeeze=False, sharex=True)
    for j, cell in enumerate(cells):
        d = df[df["cell"] == cell]
        sns.lineplot(d, x="n", y="barrier", hue="method", marker="o", ax=axes[0, j], legend=j == 0)
        axes[0, j].set_yscale("log")
        axes[0, j].set_title(cell)
        axes[0, j].axhline(cfg.low_loss, color="grey", ls="--", lw=0.8)
        sns.lineplot(d, x="n", y="mean_loss", hue="method", marker="o", ax=axes[1, j], legend=False)
        axes[1, j].set_yscale("log")
        for i in range(2):
            axes[i, j].set_ylabel("")
    axes[0, 0].set_ylabel("simplex barrier (train loss, Eq. SB)")
    axes[1, 0].set_ylabel("mean train loss over the simplex")
    return fig


def _ternary_figure(tern: dict):
    import matplotlib.tri as mtri

    plt, _, _ = seaborn(style="white")
    lams = torch.tensor(tern["lams"], dtype=torch.float64)
    # barycentric → plane: vertices θ₁ (0, 0), P₂(θ₂) (1, 0), P₃(θ₃) (½, √3/2)
    px = lams[:, 1] + 0.5 * lams[:, 2]
    py = lams[:, 2] * math.sqrt(3) / 2
    tri = mtri.Triangulation(px.numpy(), py.numpy())
    labels = [k for k in TERNARY_METHODS if k in tern]
    vals = {k: torch.tensor(tern[k]).log10().numpy() for k in labels}
    lo = min(float(v.min()) for v in vals.values())
    hi = max(float(v.max()) for v in vals.values())
    levels = [lo + (hi - lo) * i / 20 for i in range(21)]
    fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels), 3.9))
    for ax, k in zip(axes, labels, strict=True):
        cs = ax.tricontourf(tri, vals[k], levels=levels, cmap="magma_r")
        ax.set_title(f"{k}: max loss {max(tern[k]):.3f}", pad=18)
        ax.set_aspect("equal")
        ax.axis("off")
        for (vx, vy), name in zip(((0, 0), (1, 0), (0.5, math.sqrt(3) / 2)), ("θ₁", "P₂(θ₂)", "P₃(θ₃)"), strict=True):
            ax.annotate(name, (vx, vy), ha="center", va="top" if vy == 0 else "bottom", fontsize=9)
    fig.colorbar(cs, ax=axes, shrink=0.8, label="log₁₀ train loss")
    return fig


TARGET = declare("permuted-simplex", __file__, config=PermutedSimplexConfig, sizes=SIZES, jobs=jobs, report=report,
                 datasets=("digits", "mnist1d", "mnist", "cifar10"),
                 claim_ids=("property-2", "joint-beats-star", "c2m3-vs-mergemany", "interior-improves",
                            "barrier-grows-with-n", "glue-exact", "complex-ensemble"))
