"""Permuted simplexes (the project's research note, ``sources/000``): do low-loss simplexes
θ₁, P₂(θ₂), …, Pₙ(θₙ) exist, which alignment finds them, and are they useful ensembles?

``permuted-simplex``: N independently trained MLPs per cell of (width × weight decay); for n = 2 … N
the simplex of the first n models aligned by every method of ``reference.permuted_simplex``
(identity, star, MergeMany, universe, interior optimisation from universe and from MergeMany), its
barrier (Eq. SB: exact grid + adversarial ascent for n ≤ 4, Dirichlet samples + adversarial ascent
above), mean and centroid loss and worst edge. Then, on the main cell: the loss over a 2-simplex
(ternary heatmaps), the "Property 2" table (edges to θ₁ vs the far edge), and the ensemble table
(simplex / glued complex samples vs deep ensembles vs the merged centroid vs a Bézier curve).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass

import torch

from reference.curves import train_curve
from reference.data import load_dataset
from reference.ensembles import ensemble_probs, ensemble_table
from reference.merge import merge_many, repair
from reference.models import build_model
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

from .common import RunContext, fmt_pm, mean_std
from .endpoints import trained_endpoints
from .registry import target

# (label, align_simplex method, init for "interior")
METHODS = (
    ("identity", "identity", None),
    ("star", "star", None),
    ("mergemany", "mergemany", None),
    ("universe", "universe", None),
    ("interior", "interior", "universe"),
    ("interior-mm", "interior", "mergemany"),
)


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
    train: TrainConfig = TrainConfig(epochs=40, batch_size=128, lr=1e-3, optimizer="adamw", schedule="cosine")
    curve_train: TrainConfig = TrainConfig(epochs=40, batch_size=128, lr=1e-3, optimizer="adam", schedule="cosine")

    @classmethod
    def quick(cls) -> PermutedSimplexConfig:
        return cls(widths=(32,), weight_decays=(0.0,), main_width=32, n_models=4, ns=(2, 3, 4), grid_resolution=4,
                   samples=32, adversarial_steps=5, ternary_resolution=8, triples=((0, 1, 2),),
                   complex_simplices=((0, 1, 2), (0, 2, 3)), ensemble_samples=6, repair_ns=(3,),
                   repair_methods=("star", "interior"), repair_resolution=3,
                   interior=InteriorConfig(steps=20, eval_lams=8),
                   train=TrainConfig(epochs=8, batch_size=128, lr=1e-3, optimizer="adamw", schedule="cosine"),
                   curve_train=TrainConfig(epochs=4, batch_size=128, lr=1e-3, optimizer="adam", schedule="cosine"))


# alignments already computed in this process, by (the models' identities, method label, seed): the
# main cell's simplexes of the first 3 and 4 models are reused by the Property 2, REPAIR, ternary and
# ensemble parts instead of being searched again
_ALIGNED: dict = {}


def _align(spec, model, models, label: str, data, cfg: PermutedSimplexConfig, seed: int):
    if len(models) > 4:  # only the small simplexes are reused
        return _align_new(spec, model, models, label, data, cfg, seed)
    key = (tuple(id(m) for m in models), label, seed)
    if key not in _ALIGNED:
        _ALIGNED[key] = _align_new(spec, model, models, label, data, cfg, seed)
    return _ALIGNED[key]


def _align_new(spec, model, models, label: str, data, cfg: PermutedSimplexConfig, seed: int):
    meth, init = next((m, i) for lab, m, i in METHODS if lab == label)
    kw = {}
    if meth == "interior":
        ic = cfg.interior
        kw = dict(model=model, x=data.x_train, y=data.y_train, init=init, steps=ic.steps, lr=ic.lr,
                  batch_size=ic.batch_size, lams_per_step=ic.lams_per_step, eval_lams=ic.eval_lams)
    return align_simplex(spec, models, meth, seed=seed, **kw)


def _barrier(model, vertices, data, cfg: PermutedSimplexConfig, seed: int):
    return simplex_barrier(model, vertices, data.x_train, data.y_train, method="adversarial",
                           resolution=cfg.grid_resolution, samples=cfg.samples,
                           adversarial_steps=cfg.adversarial_steps, seed=seed)


def _cell_job(model, spec, models, data, cfg: PermutedSimplexConfig, n: int, seed: int) -> dict:
    out = {}
    for label, _, _ in METHODS:
        t0 = time.time()
        ps = _align(spec, model, models[:n], label, data, cfg, seed)
        t_align = time.time() - t0
        b = _barrier(model, ps.vertices, data, cfg, seed)
        cen = evaluate_simplex(model, ps.vertices, data.x_test, data.y_test, [[1.0 / n] * n])
        out[label] = {**b.as_dict(), "align_s": t_align, "centroid_test_error": float(cen.error[0]),
                      "vertex_test_error": float(cen.vertex_error.mean()),
                      "best_step": ps.info.get("best_step"), "changed": (ps.info.get("changed") or [0])[-1]}
    return out


def _property2_job(model, spec, models, data, cfg: PermutedSimplexConfig, seed: int) -> dict:
    out = {}
    for tri in cfg.triples:
        ms = [models[i] for i in tri]
        for label, _, _ in METHODS:
            ps = _align(spec, model, ms, label, data, cfg, seed)
            b = simplex_barrier(model, ps.vertices, data.x_train, data.y_train, method="grid",
                                resolution=cfg.grid_resolution * 2, seed=seed)
            out[f"{tri}/{label}"] = b.as_dict()
    return out


def _repair_job(model, spec, models, data, cfg: PermutedSimplexConfig, seed: int) -> dict:
    """Simplex barriers without and with REPAIR (Jordan et al. 2023) at every evaluated point."""
    out = {}
    for n in cfg.repair_ns:
        for label in cfg.repair_methods:
            ps = _align(spec, model, models[:n], label, data, cfg, seed)
            for corr in (None, "repair"):
                b = simplex_barrier(model, ps.vertices, data.x_train, data.y_train, method="grid",
                                    resolution=cfg.repair_resolution, mean_samples=64, edge_grid=7, seed=seed,
                                    correction=corr, x_stats=data.x_train)
                out[f"{n}/{label}/{corr}"] = b.as_dict()
    return out


def _ternary_job(model, spec, models, data, cfg: PermutedSimplexConfig, seed: int) -> dict:
    lams = barycentric_grid(3, cfg.ternary_resolution)
    out = {"lams": lams.tolist()}
    for label in ("star", "universe", "mergemany", "interior"):
        ps = _align(spec, model, models[:3], label, data, cfg, seed)
        ev = evaluate_simplex(model, ps.vertices, data.x_train, data.y_train, lams)
        out[label] = ev.loss.tolist()
    return out


def _ensemble_job(model, spec, models, data, cfg: PermutedSimplexConfig, seed: int, device) -> dict:
    x, y, xt, yt = data.x_train, data.y_train, data.x_test, data.y_test
    S = cfg.ensemble_samples
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
    first = cfg.complex_simplices[0]
    table(stack([models[i] for i in first]), len(first), f"deep ensemble of simplex 1's {len(first)} vertices")
    # one permuted simplex and the glued complex of permuted simplexes
    sims = [_align(spec, model, [models[i] for i in s], cfg.complex_method, data, cfg, seed)
            for s in cfg.complex_simplices]
    lam = sample_dirichlet(S, len(first), g)
    table(sims[0].points(lam), len(first), f"permuted simplex 1 ({S} samples)")
    cx = glue(spec, [s.vertices for s in sims])
    truth = [tuple(s) for s in cfg.complex_simplices]
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
    curve = train_curve(model, models[0], models[1], x, y, cfg=cfg.curve_train, kind="bezier", seed=seed,
                        device=device, progress=False)
    ts = (torch.arange(S, dtype=torch.float64) + 0.5) / S
    table(curve.points_at(ts), 3, f"Bézier curve θ₁–θ₂ ({S} samples)")
    return {"rows": rows, "glue": {"classes": [list(c) for c in cx.classes], "expected": [list(c) for c in expected],
                                   "shared": len(cx.shared()), "max_function_gap": max(gaps.values())}}


def _mcfg(data, width: int, depth: int) -> dict:
    return {"name": "mlp", "in_features": int(torch.tensor(data.input_shape).prod()), "widths": [width] * depth,
            "num_classes": data.num_classes, "bias": True}


@target(
    "permuted-simplex",
    paper="Extensive Linear Connectivity and Application in Model Ensemble (project research note, sources/000)",
    claims=(
        "pairwise alignment to θ₁ leaves a barrier between P₂(θ₂) and P₃(θ₃) (Property 2)",
        "joint alignment gives lower simplex barriers than the star",
        "optimising the interior loss lowers the simplex barrier of its initialisation",
        "low-loss permuted simplexes stop existing as n grows",
        "permuted simplexes glue into a complex whose samples form an ensemble",
    ),
)
def run(ctx: RunContext) -> None:
    """Simplex barrier vs n per alignment method; ternary heatmaps; Property 2; ensembles."""
    cfg = PermutedSimplexConfig.quick() if ctx.quick else PermutedSimplexConfig()
    ctx.config = asdict(cfg)
    data = load_dataset(cfg.dataset, data_dir=ctx.data_dir).to(ctx.device)
    seeds = [ctx.seed * 1000 + i for i in range(cfg.n_models)]
    rows = []
    main = None
    for width, wd in itertools.product(cfg.widths, cfg.weight_decays):
        mcfg = _mcfg(data, width, cfg.depth)
        model = build_model(mcfg).to(ctx.device)
        spec = spec_for(model)
        tcfg = TrainConfig(**{**asdict(cfg.train), "weight_decay": wd})
        models = [{k: v.to(ctx.device) for k, v in p.items()}
                  for p in trained_endpoints(ctx, mcfg, data, {"dataset": cfg.dataset}, tcfg, seeds)]
        if width == cfg.main_width and wd == cfg.main_wd:
            main = (model, spec, models, mcfg)
        base = {"target": "permuted-simplex", "model": mcfg, "train": asdict(tcfg), "seeds": seeds,
                "interior": asdict(cfg.interior), "grid": cfg.grid_resolution, "samples": cfg.samples,
                "adv": cfg.adversarial_steps}
        for n in cfg.ns:
            res = ctx.job({**base, "n": n},
                          lambda n=n, model=model, spec=spec, models=models: _cell_job(
                              model, spec, models, data, cfg, n, ctx.seed))
            for label, _, _ in METHODS:
                r = res[label]
                rows.append({"width": width, "weight_decay": wd, "n": n, "method": label, **{
                    k: r[k] for k in ("barrier", "mean_loss", "centroid_loss", "max_edge_barrier",
                                      "centroid_test_error", "vertex_test_error", "align_s", "changed")},
                    "vertex_loss": sum(r["vertex_loss"]) / n})
            ctx.log(f"  width {width} wd {wd} n={n}: " + ", ".join(
                f"{lab} {res[lab]['barrier']:.3f}" for lab, _, _ in METHODS))
    cols = ["width", "weight_decay", "n", "method", "barrier", "mean_loss", "centroid_loss", "max_edge_barrier",
            "vertex_loss", "centroid_test_error", "vertex_test_error", "align_s", "changed"]
    ctx.write_table("simplex_barrier", rows, cols,
                    title=f"Simplex train-loss barrier (Eq. SB; adversarial search) of θ₁, P₂(θ₂), …, Pₙ(θₙ), "
                          f"{cfg.dataset} MLPs depth {cfg.depth}; mean/centroid/edge losses; interior moved "
                          f"'changed' units from its start")
    _barrier_figure(ctx, rows, cfg)
    _low_loss_table(ctx, rows, cfg)

    model, spec, models, mcfg = main
    mkey = {"target": "permuted-simplex", "model": mcfg, "seeds": seeds, "interior": asdict(cfg.interior)}
    p2 = ctx.job({**mkey, "part": "property2", "triples": cfg.triples, "grid": cfg.grid_resolution},
                 lambda: _property2_job(model, spec, models, data, cfg, ctx.seed))
    p2rows = _property2_table(ctx, p2, cfg)
    rep = ctx.job({**mkey, "part": "repair", "ns": cfg.repair_ns, "methods": cfg.repair_methods,
                   "res": cfg.repair_resolution},
                  lambda: _repair_job(model, spec, models, data, cfg, ctx.seed))
    rrows = []
    for n in cfg.repair_ns:
        for label in cfg.repair_methods:
            a, b = rep[f"{n}/{label}/None"], rep[f"{n}/{label}/repair"]
            rrows.append({"n": n, "method": label, "barrier": a["barrier"], "barrier_repair": b["barrier"],
                          "mean_loss": a["mean_loss"], "mean_loss_repair": b["mean_loss"],
                          "centroid_loss": a["centroid_loss"], "centroid_loss_repair": b["centroid_loss"]})
    ctx.write_table("repair", rrows, ["n", "method", "barrier", "barrier_repair", "mean_loss", "mean_loss_repair",
                                      "centroid_loss", "centroid_loss_repair"],
                    title=f"Simplex barrier (grid, resolution {cfg.repair_resolution}) and mean/centroid train loss "
                          f"without and with REPAIR at every point, width {cfg.main_width}")
    tern = ctx.job({**mkey, "part": "ternary", "res": cfg.ternary_resolution},
                   lambda: _ternary_job(model, spec, models, data, cfg, ctx.seed))
    _ternary_figure(ctx, tern, cfg)
    ens = ctx.job({**mkey, "part": "ensemble", "complex": cfg.complex_simplices, "method": cfg.complex_method,
                   "S": cfg.ensemble_samples, "curve": asdict(cfg.curve_train)},
                  lambda: _ensemble_job(model, spec, models, data, cfg, ctx.seed, ctx.device))
    erows = [{"ensemble": k, **v} for k, v in ens["rows"].items()]
    ctx.write_table("ensembles", erows,
                    ["ensemble", "nll", "accuracy", "ece", "auroc", "members", "stored_vectors", "member_mean_nll",
                     "member_mean_accuracy"],
                    title=f"Test metrics of ensembles, {cfg.dataset} MLP width {cfg.main_width}; permuted simplexes "
                          f"aligned by {cfg.complex_method}; stored_vectors = parameter vectors kept")
    _claims(ctx, rows, p2rows, ens, cfg)


def _low_loss_table(ctx: RunContext, rows: list[dict], cfg: PermutedSimplexConfig) -> None:
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
    ctx.write_table("low_loss_n", out, ["width", "weight_decay", "method", "largest_low_loss_n"],
                    title=f"Largest n such that every simplex of n = 2 … that n has barrier < {cfg.low_loss} nats "
                          f"(0: none)")


def _property2_table(ctx: RunContext, p2: dict, cfg: PermutedSimplexConfig) -> list[dict]:
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
    ctx.write_table("property2", rows, ["method", "edges_to_theta1", "far_edge", "simplex_barrier"],
                    title=f"Property 2: train-loss barriers (max chord) of the edges θ₁–Pᵢ(θᵢ) vs the far edge "
                          f"P₂(θ₂)–P₃(θ₃) and of the 2-simplex (grid), mean ± std over {len(cfg.triples)} triples")
    return rows


def _claims(ctx: RunContext, rows: list[dict], p2rows: list[dict], ens: dict, cfg: PermutedSimplexConfig) -> None:
    star = next(r for r in p2rows if r["method"] == "star")
    ctx.claim("property-2", "with star alignment the far edge P₂(θ₂)–P₃(θ₃) has a higher barrier than the edges "
                            "θ₁–Pᵢ(θᵢ) (mean over triples)",
              "research note, Property 2: pairwise alignment guarantees nothing between P₂(θ₂) and P₃(θ₃)",
              f"edges to θ₁ {star['edges_to_theta1']}, far edge {star['far_edge']}",
              star["far_mean"] > star["near_mean"])

    def sel(label, width=None, wd=None, nmin=3):
        width = cfg.main_width if width is None else width
        wd = cfg.main_wd if wd is None else wd
        return {r["n"]: r["barrier"] for r in rows if r["method"] == label and r["width"] == width
                and r["weight_decay"] == wd and r["n"] >= nmin}

    ns3 = [n for n in cfg.ns if n >= 3]
    st, un, mm = sel("star"), sel("universe"), sel("mergemany")
    joint = {n: min(un[n], mm[n]) for n in ns3}
    ctx.claim("joint-beats-star", f"at every n ≥ 3 (width {cfg.main_width}, wd {cfg.main_wd}) the better joint "
                                  f"alignment (MergeMany or universe) has a lower simplex barrier than the star",
              "research note §1.3 (pairwise alignment is not transitive); Ainsworth et al. 2023 MergeMany",
              "; ".join(f"n={n}: star {st[n]:.3f}, MergeMany {mm[n]:.3f}, universe {un[n]:.3f}" for n in ns3),
              all(joint[n] < st[n] for n in ns3))
    better, total, detail = 0, 0, []
    for width, wd in itertools.product(cfg.widths, cfg.weight_decays):
        a, b = sel("universe", width, wd), sel("interior", width, wd)
        for n in ns3:
            total += 1
            better += b[n] < a[n]
        detail.append(f"w{width}/wd{wd}: " + ", ".join(f"{a[n]:.3f}→{b[n]:.3f}" for n in ns3))
    ctx.claim("interior-improves", "interior optimisation (from universe) lowers the simplex barrier of universe "
                                   "alignment at every n ≥ 3 in every cell",
              "the issue's hypothesis: optimising the expected interior loss finds better permutations than "
              "alignment by weights",
              f"lower in {better}/{total} cells×n; universe→interior " + " | ".join(detail), better == total)
    ll = []
    grows = True
    for width, wd in itertools.product(cfg.widths, cfg.weight_decays):
        for label in ("interior-mm", "mergemany"):
            s = sel(label, width, wd, nmin=2)
            nmax, nmin = max(s), min(s)
            grows &= s[nmax] > s[nmin]
            ll.append(f"w{width}/wd{wd} {label}: n={nmin} {s[nmin]:.3f} → n={nmax} {s[nmax]:.3f}")
    ctx.claim("barrier-grows-with-n", "for the best aligners the simplex barrier at the largest n exceeds that of "
                                      "the edge (n = 2) in every cell",
              "research note §1.3: like Benton et al.'s simplexes, the number of vertices n 'may not be large'",
              "; ".join(ll), grows)
    g = ens["glue"]
    ctx.claim("glue-exact", "gluing identifies exactly the vertices that are the same model up to permutation, and "
                            "identified vertices compute the same function",
              "research note §1.3, Figure 2: simplexes glued through equivalence classes θ̄",
              f"classes {g['classes']} (expected {g['expected']}), {g['shared']} shared classes, max logit gap "
              f"{g['max_function_gap']:.2e}", g["classes"] == g["expected"] and g["max_function_gap"] < 1e-3)
    er = ens["rows"]
    cx = next(v for k, v in er.items() if k.startswith("permuted complex"))
    de = next(v for k, v in er.items() if k.startswith("deep ensemble (") )
    single = next(v for k, v in er.items() if k.startswith("single"))
    ctx.claim("complex-ensemble", "a permuted-complex ensemble is better than a single model in test NLL and "
                                  "within 5% of the deep ensemble of the same stored models",
              "research note title: 'application in model ensemble' (no numbers given)",
              f"NLL: single {single['nll']:.4f}, complex {cx['nll']:.4f} ({cx['stored_vectors']} vectors), deep "
              f"ensemble {de['nll']:.4f} ({de['stored_vectors']} vectors)",
              cx["nll"] < single["nll"] and cx["nll"] <= 1.05 * de["nll"])


def _barrier_figure(ctx: RunContext, rows: list[dict], cfg: PermutedSimplexConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    sns.set_theme(style="whitegrid")
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
    ctx.save_figure(fig, "simplex_barrier")


def _ternary_figure(ctx: RunContext, tern: dict, cfg: PermutedSimplexConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.tri as mtri
    import seaborn as sns

    sns.set_theme(style="white")
    lams = torch.tensor(tern["lams"], dtype=torch.float64)
    # barycentric → plane: vertices θ₁ (0, 0), P₂(θ₂) (1, 0), P₃(θ₃) (½, √3/2)
    px = lams[:, 1] + 0.5 * lams[:, 2]
    py = lams[:, 2] * math.sqrt(3) / 2
    tri = mtri.Triangulation(px.numpy(), py.numpy())
    labels = [k for k in ("star", "universe", "mergemany", "interior") if k in tern]
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
    ctx.save_figure(fig, "ternary")
