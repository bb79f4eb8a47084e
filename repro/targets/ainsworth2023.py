"""Git Re-Basin (Ainsworth, Hayase & Srinivasa 2023), MLP experiments on embedded data.

``ainsworth2023-mlp``: MLPs with 4 hidden layers, independently trained pairs per width; the loss and
error along the straight line between θ_a and P(θ_b) for P = identity (naive), weight matching and
activation matching; barriers (Definition 2.2, ``mid``; and the chord-relative ``max_chord``) on
train and test; barrier vs width; the spread of weight matching over random group orders.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from reference.barrier import BARRIER_KINDS, evaluate_linear_path, linear_path
from reference.evaluate import evaluate_points
from reference.matching import activation_matching, weight_matching
from reference.params import stack
from reference.specs import spec_for
from reference.train import TrainConfig

from ..runner import DataRef, Endpoint, Job, JobContext, Report, Results, SteSettings, fmt_pm, mean_std, seaborn
from ..runner.declare import declare
from .reporting import summary_rows

METHODS = ("naive", "weight", "activation")


@dataclass(frozen=True)
class MLPConfig:
    dataset: str = "digits"
    seed: int = 0
    widths: tuple[int, ...] = (32, 64, 128, 256, 512, 1024)
    depth: int = 4
    pairs: int = 3
    grid: int = 25
    restarts: int = 5
    train: TrainConfig = TrainConfig(epochs=60, batch_size=128, lr=1e-3, optimizer="adam", weight_decay=0.0,
                                     schedule="cosine")


MLP_SIZES = {
    "quick": MLPConfig(widths=(32, 128, 512), pairs=2, grid=17, restarts=3,
                       train=TrainConfig(epochs=25, batch_size=128, lr=1e-3, optimizer="adam", weight_decay=0.0,
                                         schedule="cosine")),
    "cpu": MLPConfig(),
    # Git Re-Basin §5.1 / Fig. 2 and the authors' src/mnist_mlp_train.py: MNIST, an MLP of 3 hidden layers of
    # 512 ReLU units, Adam, 100 epochs, batch 500 (no schedule); 25 interpolation points as in their
    # src/mnist_mlp_weight_matching.py. The learning rate is a command-line argument of that script, not
    # given in the paper: 1e-3 is our choice. Needs --data-dir with the MNIST IDX files.
    "paper": MLPConfig(dataset="mnist", widths=(512,), depth=3, pairs=3, grid=25, restarts=5,
                       train=TrainConfig(epochs=100, batch_size=500, lr=1e-3, optimizer="adam", schedule="constant")),
}


@dataclass(frozen=True)
class PairArgs:
    """One pair (θ_a, θ_b) of one width: what ``pair_job`` reads."""

    model: dict
    a: Endpoint
    b: Endpoint
    data: DataRef
    grid: int
    restarts: int
    seed: int  # the weight-matching seed (the pair's index)


def pair_job(args: PairArgs, ctx: JobContext) -> dict:
    """Everything measured for one pair (θ_a, θ_b): the three paths, barriers, WM restarts."""
    data, model = ctx.setup(args)
    spec = spec_for(model)
    pa, pb = ctx.endpoints([args.a, args.b])
    seed = args.seed
    splits = {"train": (data.x_train, data.y_train), "test": (data.x_test, data.y_test)}
    t0 = time.perf_counter()
    wm = weight_matching(spec, pa, pb, seed=seed, restarts=args.restarts)
    t_wm = time.perf_counter() - t0
    t0 = time.perf_counter()
    am = activation_matching(model, spec, pa, pb, data.x_train)
    t_am = time.perf_counter() - t0
    aligned = {"naive": pb, "weight": wm.perm.apply(spec, pb), "activation": am.perm.apply(spec, pb)}
    out: dict = {"methods": {}, "timing_s": {"weight_matching": t_wm, "activation_matching": t_am}}
    for name, b in aligned.items():
        pe = evaluate_linear_path(model, pa, b, args.grid, splits)
        out["methods"][name] = {
            "t": pe.t.tolist(),
            "curves": {s: {m: v.tolist() for m, v in per.items()} for s, per in pe.curves.items()},
            "barriers": pe.barrier_table(),
        }
    # spread over weight-matching restarts: each order's objective and train loss barrier
    restarts = wm.restarts or (wm,)
    ends = evaluate_points(model, stack([pa, pb]), data.x_train, data.y_train).loss
    mids = []
    for r in restarts:
        pe = evaluate_linear_path(model, pa, r.perm.apply(spec, pb), args.grid, {"train": splits["train"]})
        loss = pe.curves["train"]["loss"]
        mids.append(float(loss.max() - 0.5 * (ends[0] + ends[1])))
    out["wm_restarts"] = [
        {"order_seed": r.seed, "objective": r.objective, "passes": len(r.history) - 1, "train_loss_mid": b}
        for r, b in zip(restarts, mids, strict=True)
    ]
    out["moved_units"] = sum(wm.perm.num_moved().values())
    ctx.log(f"  width {args.model['widths'][0]:5d} pair {seed}: train loss barrier naive "
            f"{out['methods']['naive']['barriers']['train_loss_mid']:.3f}  weight "
            f"{out['methods']['weight']['barriers']['train_loss_mid']:.3f}  activation "
            f"{out['methods']['activation']['barriers']['train_loss_mid']:.3f}  (WM {t_wm:.2f} s)")
    return out


def _mlp_config(data, width: int, depth: int) -> dict:
    return {"name": "mlp", "in_features": data.in_features, "widths": [width] * depth,
            "num_classes": data.num_classes, "bias": True}


def mlp_jobs(cfg: MLPConfig, data) -> list[Job]:
    jobs = []
    for width in cfg.widths:
        mcfg = _mlp_config(data, width, cfg.depth)
        seeds = [cfg.seed * 1000 + 2 * p + s for p in range(cfg.pairs) for s in (0, 1)]
        eps = [Endpoint(mcfg, cfg.train, s, data.ref) for s in seeds]
        for pair in range(cfg.pairs):
            jobs.append(Job(pair_job, PairArgs(mcfg, eps[2 * pair], eps[2 * pair + 1], data.ref, cfg.grid,
                                               cfg.restarts, pair)))
    return jobs


def _figures(rep: Report, cfg: MLPConfig, results: dict, rows: list[dict]) -> None:
    plt, pd, sns = seaborn(context="notebook")
    w = max(cfg.widths)
    long = []
    for (width, pair), res in results.items():
        if width != w:
            continue
        for method, m in res["methods"].items():
            for split, per in m["curves"].items():
                for metric, vals in per.items():
                    long += [{"t": t, "value": v, "method": method, "split": split, "metric": metric, "pair": pair}
                             for t, v in zip(m["t"], vals, strict=True)]
    df = pd.DataFrame(long)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("loss", "error"), strict=True):
        sns.lineplot(df[df.metric == metric], x="t", y="value", hue="method", style="split", ax=ax,
                     errorbar="sd", hue_order=list(METHODS))
        ax.set_title(f"{metric} along θ_a → P(θ_b), width {w} ({cfg.dataset})")
        ax.set_xlabel("λ")
        ax.set_ylabel(metric)
    rep.figure("interpolation", fig)

    df2 = pd.DataFrame(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, col, label in zip(axes, ("train_loss_mid", "test_error_mid"),
                              ("train loss barrier (mid)", "test error barrier (mid)"), strict=True):
        sns.lineplot(df2, x="width", y=col, hue="method", marker="o", ax=ax, errorbar="sd", hue_order=list(METHODS))
        ax.set_xscale("log", base=2)
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs width ({cfg.dataset})")
    rep.figure("barrier_vs_width", fig)


def mlp_report(cfg: MLPConfig, res_all: Results) -> Report:
    """Naive vs weight vs activation matching barriers of MLPs across widths."""
    rep = Report()
    results: dict[tuple[int, int], dict] = {}
    rows: list[dict] = []
    restart_rows: list[dict] = []
    for args, res in res_all.of(PairArgs):
        width, pair = args.model["widths"][0], args.seed
        results[width, pair] = res
        for method, m in res["methods"].items():
            rows.append({"width": width, "pair": pair, "method": method, **m["barriers"]})
        for r in res["wm_restarts"]:
            restart_rows.append({"width": width, "pair": pair, **r})

    cols = [f"{s}_{m}_{k}" for s in ("train", "test") for m in ("loss", "error") for k in BARRIER_KINDS]
    rep.table("barriers_per_pair", rows, ["width", "pair", "method", *cols],
                    title="Barriers per pair (kind: mid = Git Re-Basin Def. 2.2; max_chord = Frankle et al.)")
    summary = summary_rows(rows, {"width": cfg.widths, "method": METHODS},
                           ("train_loss_mid", "test_loss_mid", "train_error_mid", "test_error_mid",
                            "train_loss_max_chord"))
    rep.table("barriers", summary,
                    title=f"Barriers (mean ± std over pairs), {cfg.dataset}, MLP {cfg.depth} hidden layers, "
                          f"grid {cfg.grid} points")
    spread = []
    for width in cfg.widths:
        for pair in range(cfg.pairs):
            sel = [r for r in restart_rows if r["width"] == width and r["pair"] == pair]
            bs = [r["train_loss_mid"] for r in sel]
            spread.append({"width": width, "pair": pair, "restarts": len(sel),
                           "barrier_min": min(bs), "barrier_max": max(bs),
                           "barrier_of_best_objective": max(sel, key=lambda r: r["objective"])["train_loss_mid"],
                           "objective_rel_spread": (max(r["objective"] for r in sel) - min(r["objective"] for r in sel))
                           / abs(max(r["objective"] for r in sel))})
    rep.table("wm_restarts", restart_rows, title="Weight matching: every random group order")
    rep.table("wm_restart_spread", spread,
                    title="Spread of weight matching over random group orders (train loss barrier, mid)")
    _figures(rep, cfg, results, rows)

    # --- claims ----------------------------------------------------------------------------
    def mean_of(width: int, method: str, col: str = "train_loss_mid") -> float:
        return mean_std([r[col] for r in rows if r["width"] == width and r["method"] == method])[0]

    wmax = max(cfg.widths)
    naive, wm, am = mean_of(wmax, "naive"), mean_of(wmax, "weight"), mean_of(wmax, "activation")
    rep.verdict(
        "wm-removes-most",
        f"width {wmax}: naive {naive:.3f}, weight matching {wm:.3f} "
        f"({100 * (1 - wm / naive):.0f}% removed)" if naive > 0 else f"naive barrier {naive:.3f} ≤ 0",
        naive > 0 and wm < 0.5 * naive,
    )
    rep.verdict(
        "am-removes-most",
        f"width {wmax}: naive {naive:.3f}, activation matching {am:.3f} "
        f"({100 * (1 - am / naive):.0f}% removed)" if naive > 0 else f"naive barrier {naive:.3f} ≤ 0",
        naive > 0 and am < 0.5 * naive,
    )
    widths = sorted(cfg.widths)
    per_width = [mean_of(w, "weight") for w in widths]
    from scipy.stats import spearmanr

    rho = float(spearmanr(widths, per_width).statistic) if len(widths) > 1 else float("nan")
    rep.verdict(
        "wm-shrinks-with-width",
        "barrier by width " + ", ".join(f"{w}: {b:.3f}" for w, b in zip(widths, per_width, strict=True))
        + f"; ρ = {rho:.2f}",
        len(widths) > 1 and rho < 0 and per_width[-1] < per_width[0],
    )
    return rep


MLP = declare("ainsworth2023-mlp", __file__, config=MLPConfig, sizes=MLP_SIZES, jobs=mlp_jobs, report=mlp_report,
              datasets=("digits", "mnist1d", "mnist", "cifar10"),
              claim_ids=("wm-removes-most", "am-removes-most", "wm-shrinks-with-width"))


# ---------------------------------------------------------------------------------------------
# ainsworth2023-width: barrier vs width, four alignment methods, with and without REPAIR / BN reset

WIDTH_METHODS = ("naive", "weight", "activation", "ste")


@dataclass(frozen=True)
class WidthConfig:
    dataset: str = "mnist1d"
    seed: int = 0
    mlp_base: int = 64
    mlp_depth: int = 3
    mlp_multipliers: tuple[int, ...] = (1, 2, 4, 8)
    resnet_multipliers: tuple[int, ...] = (1, 2)
    resnet_depth: int = 8
    resnet_base: int = 8
    pairs: int = 2
    grid: int = 13
    repair_examples: int = 1000
    ste: SteSettings = SteSettings(steps=200, lr=1e-2, batch=256)
    train: TrainConfig = TrainConfig.adam(40)
    resnet_train: TrainConfig | None = None  # None: the same as ``train``


WIDTH_SIZES = {
    "quick": WidthConfig(mlp_multipliers=(1, 4), resnet_multipliers=(1, 2), pairs=1, grid=9,
                         ste=SteSettings(steps=30, lr=1e-2, batch=256), repair_examples=500,
                         train=TrainConfig.adam(15)),
    "cpu": WidthConfig(),
    # Git Re-Basin Fig. 4 (width ablation, ResNet-20 on CIFAR-10 at widths ×1 … ×16) with the authors'
    # src/cifar10_resnet20_train.py recipe: SGD momentum 0.9, peak lr 0.1, 5 warm-up epochs of 250 then cosine
    # decay, batch 100, weight decay 1e-4 (their default; their data augmentation is not reproduced here).
    # BatchNorm with a BN reset at every path point as in REPAIR (Jordan et al. 2023). Their MNIST MLP
    # (src/mnist_mlp_train.py: 512 units, Adam, 100 epochs, batch 500) gives the MLP rows at ×1 … ×8 of 64
    # units. Needs --data-dir with the CIFAR-10 python batches; the MLP is trained on the flattened images.
    "paper": WidthConfig(dataset="cifar10", mlp_base=64, mlp_depth=3, mlp_multipliers=(1, 2, 4, 8),
                         resnet_multipliers=(1, 2, 4, 8, 16), resnet_depth=20, resnet_base=16, pairs=2, grid=25,
                         train=TrainConfig(epochs=100, batch_size=500, lr=1e-3, optimizer="adam"),
                         resnet_train=TrainConfig(epochs=250, batch_size=100, lr=0.1, optimizer="sgd", momentum=0.9,
                                                  weight_decay=1e-4, schedule="cosine", warmup_frac=5 / 250)),
}


@dataclass(frozen=True)
class WidthArgs:
    model: dict
    a: Endpoint
    b: Endpoint
    data: DataRef
    view: tuple[int, ...] | None
    fix: str  # "repair" (MLP) or "bn_reset" (BN ResNet)
    grid: int
    repair_examples: int
    ste: SteSettings
    seed: int  # the pair's index: seeds weight matching and the STE
    arch: str
    multiplier: int


def _fixed_path(model, pa, pb, t, plain: dict, x_stats, kind: str, spec) -> dict:
    """The path points ``plain`` with activation statistics repaired at every t: REPAIR (MLPs) or BN reset."""
    from reference.bn import recompute_bn_stats_batched
    from reference.merge import repair

    if kind == "bn_reset":
        return recompute_bn_stats_batched(model, plain, x_stats)
    pts = [repair(model, [pa, pb], [1.0 - float(s), float(s)], x_stats, spec=spec) for s in t]
    return stack(pts)


def width_job(args: WidthArgs, ctx: JobContext) -> dict:
    from reference.barrier import barrier

    data, model = ctx.setup(args)
    spec = spec_for(model)
    pa, pb = ctx.endpoints([args.a, args.b])
    seed, fix, cfg = args.seed, args.fix, args

    wm = weight_matching(spec, pa, pb, seed=seed)
    am = activation_matching(model, spec, pa, pb, data.x_train)
    t0 = time.perf_counter()
    ste = args.ste.run(model, spec, pa, pb, data.x_train, data.y_train, seed=seed, init=wm.perm)
    t_ste = time.perf_counter() - t0
    aligned = {"naive": pb, "weight": wm.perm.apply(spec, pb), "activation": am.perm.apply(spec, pb),
               "ste": ste.perm.apply(spec, pb)}
    x_stats = data.x_train[: cfg.repair_examples]
    out = {"ste_seconds": t_ste}
    for name, b in aligned.items():
        t, plain = linear_path(pa, b, cfg.grid)
        for variant, pts in (("plain", plain), (fix, _fixed_path(model, pa, b, t, plain, x_stats, fix, spec))):
            tr = evaluate_points(model, pts, data.x_train, data.y_train)
            te = evaluate_points(model, pts, data.x_test, data.y_test)
            out[f"{name}/{variant}"] = {
                "train_loss_mid": barrier(tr.loss, t, "mid").value,
                "test_error_mid": barrier(te.error, t, "mid").value,
                "train_loss": tr.loss.tolist(), "test_error": te.error.tolist(),
            }
    ctx.log(f"  {args.arch} ×{args.multiplier} pair {seed}: train loss barrier " + ", ".join(
        f"{m} {out[m + '/plain']['train_loss_mid']:.3f}/{out[m + '/' + fix]['train_loss_mid']:.3f}"
        for m in WIDTH_METHODS) + f" (plain/{fix}; STE {t_ste:.0f} s)")
    return out


def width_jobs(cfg: WidthConfig, data) -> list[Job]:
    n_in = data.in_features
    archs = [("mlp", k, {"name": "mlp", "in_features": n_in, "widths": [cfg.mlp_base * k] * cfg.mlp_depth,
                         "num_classes": data.num_classes, "bias": True}, None, "repair", cfg.train)
             for k in cfg.mlp_multipliers]
    archs += [("resnet", k, {"name": "resnet", "in_channels": 1, "num_classes": data.num_classes,
                             "depth": cfg.resnet_depth, "width": k, "norm": "batch", "groups": 2, "dims": 1,
                             "base": cfg.resnet_base}, (1, n_in), "bn_reset", cfg.resnet_train or cfg.train)
              for k in cfg.resnet_multipliers]
    if len(data.input_shape) == 3:  # images: the ResNet is a 2-D one on the images as they are
        c = data.input_shape[0]
        archs = [a if a[0] == "mlp" else (a[0], a[1], {**a[2], "in_channels": c, "dims": 2}, None, a[4], a[5])
                 for a in archs]
    jobs = []
    for arch, k, mcfg, view, fix, tcfg in archs:
        seeds = [cfg.seed * 1000 + i for i in range(2 * cfg.pairs)]
        eps = [Endpoint(mcfg, tcfg, s, data.ref, view) for s in seeds]
        for pair in range(cfg.pairs):
            jobs.append(Job(width_job, WidthArgs(mcfg, eps[2 * pair], eps[2 * pair + 1], data.ref, view, fix,
                                                 cfg.grid, cfg.repair_examples, cfg.ste, pair, arch, k)))
    return jobs


def width_report(cfg: WidthConfig, results: Results) -> Report:
    """Barrier vs width for MLPs and a BN ResNet: naive, WM, AM, STE, ± REPAIR / BN reset."""
    rep = Report()
    rows = []
    archs: list[tuple[str, int, str]] = []
    for args, res in results.of(WidthArgs):
        arch, k, fix, pair = args.arch, args.multiplier, args.fix, args.seed
        if (arch, k, fix) not in archs:
            archs.append((arch, k, fix))
        for method in WIDTH_METHODS:
            for variant in ("plain", fix):
                r = res[f"{method}/{variant}"]
                rows.append({"arch": arch, "multiplier": k, "pair": pair, "method": method,
                             "fix": "none" if variant == "plain" else fix,
                             "train_loss_mid": r["train_loss_mid"], "test_error_mid": r["test_error_mid"]})
    rep.table("width_barriers_per_pair", rows,
              title="Barriers (mid) per pair: train loss and test error, without and with REPAIR / BN reset")
    summary = []
    for arch, k, _ in archs:
        for method in WIDTH_METHODS:
            for fx in sorted({r["fix"] for r in rows if r["arch"] == arch}):
                sel = [r for r in rows if r["arch"] == arch and r["multiplier"] == k and r["method"] == method
                       and r["fix"] == fx]
                summary.append({"arch": arch, "multiplier": k, "method": method, "fix": fx,
                                "train_loss_mid": fmt_pm([r["train_loss_mid"] for r in sel]),
                                "test_error_mid": fmt_pm([r["test_error_mid"] for r in sel]),
                                "train_loss_mean": mean_std([r["train_loss_mid"] for r in sel])[0]})
    rep.table("width_barriers", summary, ["arch", "multiplier", "method", "fix", "train_loss_mid", "test_error_mid"],
              title=f"Barrier vs width on {cfg.dataset} (mean ± std over {cfg.pairs} pairs; grid {cfg.grid})")
    rep.figure("barrier_vs_width_multiplier", _width_figure(rows))

    def m(arch, k, method, fx):
        return mean_std([r["train_loss_mid"] for r in rows if r["arch"] == arch and r["multiplier"] == k
                         and r["method"] == method and r["fix"] == fx])[0]

    from scipy.stats import spearmanr

    shrink, parts = True, []
    for arch, ks, fx in (("mlp", cfg.mlp_multipliers, "none"), ("resnet", cfg.resnet_multipliers, "bn_reset")):
        if not ks:
            continue
        vals = [m(arch, k, "weight", fx) for k in ks]
        rho = float(spearmanr(list(ks), vals).statistic) if len(ks) > 2 else (-1.0 if vals[-1] < vals[0] else 1.0)
        shrink &= rho < 0 and vals[-1] < vals[0]
        parts.append(f"{arch} ({fx}): " + ", ".join(f"×{k} {v:.3f}" for k, v in zip(ks, vals, strict=True))
                     + f", ρ = {rho:.2f}")
    rep.verdict("width-shrinks-barrier", "; ".join(parts), shrink)
    better = [m(a, k, "weight", fx) <= m(a, k, "weight", "none") for a, k, fx in archs]
    rep.verdict("repair-helps", "; ".join(f"{a} ×{k}: {m(a, k, 'weight', 'none'):.3f} → {m(a, k, 'weight', fx):.3f}"
                                          for a, k, fx in archs), all(better))
    ste_ok = [m(a, k, "ste", "none") <= m(a, k, "weight", "none") + 1e-6 for a, k, _ in archs]
    rep.verdict("ste-at-least-wm", "; ".join(f"{a} ×{k}: STE {m(a, k, 'ste', 'none'):.3f} vs WM "
                                             f"{m(a, k, 'weight', 'none'):.3f}" for a, k, _ in archs), all(ste_ok))
    return rep


def _width_figure(rows: list[dict]):
    plt, pd, sns = seaborn()
    df = pd.DataFrame(rows)
    archs = list(dict.fromkeys(df.arch))
    fig, axes = plt.subplots(1, len(archs), figsize=(6 * len(archs), 4), squeeze=False)
    for ax, arch in zip(axes[0], archs, strict=True):
        sns.lineplot(df[df.arch == arch], x="multiplier", y="train_loss_mid", hue="method", style="fix",
                     marker="o", ax=ax, errorbar=None, hue_order=list(WIDTH_METHODS))
        ax.set_xscale("log", base=2)
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set_title(f"{arch}: train loss barrier (mid) vs width multiplier")
    return fig


WIDTH = declare("ainsworth2023-width", __file__, config=WidthConfig, sizes=WIDTH_SIZES, jobs=width_jobs,
                report=width_report, datasets=("mnist1d", "digits", "mnist", "cifar10"),
                claim_ids=("width-shrinks-barrier", "repair-helps", "ste-at-least-wm"))
