"""Garipov et al. 2018, "Loss Surfaces, Mode Connectivity, and Fast Ensembling of DNNs" (arXiv:1802.10026).

``garipov2018-curves``: for an MLP and a 1-D CNN with BatchNorm on MNIST-1D, independently trained
pairs are joined by the straight line, a polychain with one bend and a quadratic Bézier curve, both
trained on E_{t~U(0,1)} L(φ_θ(t)) (their Eq. 2) with several t per step in one vmapped call. Each
path is evaluated on a grid of t with BatchNorm statistics recomputed at every point. The table
reports the max train loss and max test error along each path (mean ± std over pairs); a figure
shows loss and error along t. Fast geometric ensembling (§4) is compared with an independently
trained ensemble of the same training budget.

A fourth path is AutoNEB (Draxler et al. 2018, "Essentially No Barriers in Neural Network Energy
Landscape", arXiv:1803.00885; ``reference/neb.py``): a piecewise-linear chain of pivots relaxed by
nudged-elastic-band forces, with pivots inserted where the loss between pivots rises. Its budget
(Σ over steps of the interior pivots whose gradient is taken) is set equal to a curve's
(steps × ``points_per_step``), and both are reported. Its t is the normalised arc length along the
chain, its grid every pivot plus ``neb_grid_sub`` points inside each segment (BatchNorm recomputed
at every point).

The ``paper`` size runs the authors' CIFAR-10 models as the zoo has them: VGG-16 and a ResNet-110
(see ``model_config``), with their training recipes.
"""

from __future__ import annotations

from dataclasses import dataclass

from reference.barrier import PathEval
from reference.curves import Bezier, Curve, evaluate_curve, train_curve
from reference.ensembles import ensemble_probs, ensemble_table, fge
from reference.neb import NEBConfig, evaluate_neb, neb
from reference.params import stack
from reference.train import TrainConfig

from ..runner import DataRef, Endpoint, Job, JobContext, Report, Results, mean_std, seaborn
from ..runner.declare import declare
from .reporting import summary_rows

PATHS = ("line", "polychain", "bezier", "neb")

# VGG-16's conv layers (Simonyan & Zisserman 2015, configuration D), as in the authors' models/vgg.py
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


@dataclass(frozen=True)
class Recipe:
    """The training settings of one architecture (``CurvesConfig.resnet``: those of the ResNets)."""

    train: TrainConfig
    curve_train: TrainConfig
    neb: NEBConfig
    curve_l2: float = 0.0
    fge_lr: tuple[float, float] = (5e-2, 5e-4)
    fge_weight_decay: float = 0.0


@dataclass(frozen=True)
class CurvesConfig:
    dataset: str = "mnist1d"
    seed: int = 0
    models: tuple[str, ...] = ("mlp", "cnn1d")
    pairs: int = 3
    grid: int = 21
    points_per_step: int = 4
    train: TrainConfig = TrainConfig.adam(60)
    # the curve gets the endpoints' training budget (Garipov et al. train curves as long as the models)
    curve_train: TrainConfig = TrainConfig.adam(60)
    # ½ curve_l2 ‖φ(t)‖² added to the curve's loss at every sampled t (the authors' curve regulariser)
    curve_l2: float = 0.0
    # FGE gets the budget of one more training run (train.epochs), in cycles of fge_cycle_epochs
    fge_cycle_epochs: int = 4
    fge_lr: tuple[float, float] = (5e-2, 5e-4)
    fge_weight_decay: float = 0.0
    # AutoNEB (Draxler et al. 2018): 3 pivots, then up to 2 inserted per cycle (3, 5, 7, 9 interior
    # pivots); 4 cycles × 10 epochs × 32 steps × 6 pivots on average = 7680 pivot gradients, the
    # curves' 60 epochs × 32 steps × 4 points per step
    neb: NEBConfig = NEBConfig(
        init_pivots=3, cycles=4, insert_per_cycle=2, max_pivots=15, insert_threshold=0.1, sub_points=9,
        train=TrainConfig.adam(10))
    neb_grid_sub: int = 2
    # models named resnet*: their own recipe (None: the settings above, as for every other model)
    resnet: Recipe | None = None


def _sgd(epochs: int, lr: float, wd: float) -> TrainConfig:
    # the authors' train.py: SGD, momentum 0.9, batch 128. Their schedule (lr constant for half the run,
    # linear decay to 1% by 90%, then 1%) is not one of reference.train's: cosine decay is our stand-in.
    return TrainConfig(epochs=epochs, batch_size=128, lr=lr, optimizer="sgd", momentum=0.9, weight_decay=wd,
                       schedule="cosine")


def _paper_neb(epochs: int) -> NEBConfig:
    # AutoNEB as at cpu size (3 pivots, up to 2 inserted per cycle: 3, 5, 7, 9 interior pivots; Adam 1e-3,
    # our choice, not Draxler et al.'s settings), its epochs per cycle chosen so that (3 + 5 + 7 + 9) interior
    # pivots × epochs ≈ the curve's epochs (one t per step): the same budget of point gradients
    return NEBConfig(init_pivots=3, cycles=4, insert_per_cycle=2, max_pivots=15, insert_threshold=0.1, sub_points=9,
                     train=TrainConfig.adam(epochs))


SIZES = {
    "quick": CurvesConfig(
        pairs=2, grid=11,
        train=TrainConfig.adam(20),
        curve_train=TrainConfig.adam(8),
        fge_cycle_epochs=4,
        neb=NEBConfig(init_pivots=2, cycles=2, insert_per_cycle=2, sub_points=5,
                      train=TrainConfig.adam(4)),
        neb_grid_sub=2),
    "cpu": CurvesConfig(),
    # The authors' CIFAR-10 runs (README of timgaripov/dnn-mode-connectivity, "Training the endpoints",
    # "Training the curves" and its CIFAR-10 table of VGG16 and PreResNet164 curves; train.py defaults: SGD,
    # momentum 0.9, batch 128): VGG16 endpoints 200 epochs at lr 0.05, wd 5e-4, curves 600 epochs at lr 0.015
    # with the L2 regulariser 5e-4 on φ(t); PreResNet endpoints 150 epochs at lr 0.1, wd 3e-4, curves 200
    # epochs at lr 0.03, regulariser 3e-4. Curves: --num_bends=3 (one bend; quadratic Bézier), both endpoints
    # fixed, one t ~ U(0, 1) per minibatch (their CurveNet.forward), evaluated at 61 points (eval_curve.py's
    # default). FGE (README's commands, given for CIFAR-100 only): cycles of 2 epochs, lr 1e-2 → 1e-2 for
    # VGG16 and 0.05 → 0.01 for PreResNet, with the training weight decay. Models: "vgg16bn" is the zoo VGG
    # with VGG-16's 13 conv layers and BatchNorm (the authors' VGG16BN), with a global-average-pool + one
    # Linear head instead of their 512-512 dropout classifier. Their VGG16 (no normalisation) is "vgg16",
    # but the zoo initialises with PyTorch's defaults, not their He-normal init, and that 13-conv stack then
    # passes almost no signal (at init: logits' std over a batch ~4e-7, first conv's gradient ~2e-6, so SGD
    # would stall): BatchNorm is our choice. "resnet110" is the zoo's CIFAR ResNet-110 (BatchNorm, 3 stages of 18
    # basic blocks of 16/32/64 channels), which stands in for PreResNet164 (also 3 × 18 blocks, but
    # bottleneck blocks with pre-activation; their PreResNet110 is ours with pre-activation). No data
    # augmentation. pairs=1 (the README reports one curve per model) is our choice. Needs --data-dir with
    # the CIFAR-10 python batches.
    "paper": CurvesConfig(
        dataset="cifar10", models=("vgg16bn", "resnet110"), pairs=1, grid=61, points_per_step=1,
        train=_sgd(200, 0.05, 5e-4), curve_train=_sgd(600, 0.015, 0.0), curve_l2=5e-4,
        fge_cycle_epochs=2, fge_lr=(1e-2, 1e-2), fge_weight_decay=5e-4, neb=_paper_neb(25), neb_grid_sub=2,
        resnet=Recipe(train=_sgd(150, 0.1, 3e-4), curve_train=_sgd(200, 0.03, 0.0), neb=_paper_neb(8),
                      curve_l2=3e-4, fge_lr=(0.05, 0.01), fge_weight_decay=3e-4)),
}


def recipe(cfg: CurvesConfig, name: str) -> Recipe:
    """The training settings of model ``name``: ``cfg.resnet`` for ResNets when set, else the shared ones."""
    if name.startswith("resnet") and cfg.resnet is not None:
        return cfg.resnet
    return Recipe(cfg.train, cfg.curve_train, cfg.neb, cfg.curve_l2, cfg.fge_lr, cfg.fge_weight_decay)


def model_config(name: str, data) -> tuple[dict, tuple[int, ...] | None]:
    """The zoo config of model ``name`` for ``data`` and the view its inputs take (None: as they are).

    ``mlp`` and ``cnn1d`` take any dataset (``cnn1d`` reads an image as one channel of C·H·W values);
    ``vgg16``, ``vgg16bn`` (the authors' VGG16BN) and ``resnet110`` need images."""
    shape = tuple(data.input_shape)
    if name == "mlp":
        return {"name": "mlp", "in_features": data.in_features, "widths": [256, 256],
                "num_classes": data.num_classes, "bias": True}, None
    if name == "cnn1d":
        return {"name": "cnn1d", "in_channels": 1, "channels": [32, 32, 32], "num_classes": data.num_classes,
                "norm": "batch", "kernel_size": 5, "groups": 2, "bias": True}, \
            (None if len(shape) == 1 else (1, data.in_features))
    if name in ("vgg16", "vgg16bn", "resnet110"):
        if len(shape) != 3:
            raise ValueError(f"model {name!r} needs image data ([C, H, W] inputs: mnist, cifar10), "
                             f"got inputs of shape {list(shape)}")
        if name == "resnet110":
            return {"name": "resnet", "in_channels": shape[0], "num_classes": data.num_classes, "depth": 110,
                    "width": 1, "norm": "batch", "groups": 2, "dims": 2, "base": 16}, None
        return {"name": "vgg", "in_channels": shape[0], "channels": list(VGG16), "num_classes": data.num_classes,
                "norm": "batch" if name == "vgg16bn" else None, "groups": 2, "dims": 2, "bias": True}, None
    raise ValueError(f"unknown model {name!r}; known: mlp, cnn1d, vgg16, vgg16bn, resnet110")


def _path_record(pe: PathEval) -> dict:
    return {"t": pe.t.tolist(),
            "curves": {s: {m: v.tolist() for m, v in per.items()} for s, per in pe.curves.items()},
            "barriers": pe.barrier_table()}


@dataclass(frozen=True)
class PairArgs:
    """One pair (θ_a, θ_b) of model ``mname`` and the view its inputs take: what every job of this target reads
    first (its own arguments follow these fields)."""

    mname: str
    model: dict
    a: Endpoint
    b: Endpoint
    data: DataRef
    view: tuple[int, ...] | None


@dataclass(frozen=True)
class CurvesArgs(PairArgs):
    """One pair: the line, the two trained curves and the AutoNEB chain."""

    grid: int
    points_per_step: int
    curve_train: TrainConfig
    curve_l2: float
    neb: NEBConfig
    neb_grid_sub: int
    pair: int  # the pair's index: seeds the curves' and the chain's training


def curves_job(args: CurvesArgs, ctx: JobContext) -> dict:
    data, model = ctx.setup(args)
    pa, pb = ctx.endpoints([args.a, args.b])
    seed, device = args.pair, ctx.dev
    splits = {"train": (data.x_train, data.y_train), "test": (data.x_test, data.y_test)}
    out = {}
    line = Curve(Bezier(1), pa, pb, ())
    out["line"] = _path_record(evaluate_curve(model, line, splits, args.grid, device=device))
    for kind in ("polychain", "bezier"):
        curve = train_curve(model, pa, pb, data.x_train, data.y_train, cfg=args.curve_train, kind=kind,
                            order=2, bends=1, seed=seed, points_per_step=args.points_per_step,
                            l2=args.curve_l2, l2_on="curve", device=device, progress=False)
        out[kind] = _path_record(evaluate_curve(model, curve, splits, args.grid, device=device))
        out[kind]["budget_point_grads"] = (args.curve_train.epochs
                                           * args.curve_train.steps_per_epoch(len(data.x_train))
                                           * args.points_per_step)
        out[kind]["free_points"] = curve.kind.n_free
    path = neb(model, pa, pb, data.x_train, data.y_train, cfg=args.neb, seed=seed, device=device, progress=False)
    out["neb"] = _path_record(evaluate_neb(model, path, splits, args.neb_grid_sub, device=device))
    out["neb"]["budget_point_grads"] = path.budget()["pivot_gradients"]
    out["neb"]["free_points"] = path.n_pivots - 2
    out["neb"]["history"] = list(path.history)
    out["line"]["budget_point_grads"] = 0
    out["line"]["free_points"] = 0
    ctx.log(f"  {args.mname} pair {args.pair}: max train loss " + ", ".join(
        f"{p} {max(out[p]['curves']['train']['loss']):.3f}" for p in PATHS))
    return out


@dataclass(frozen=True)
class FGEArgs(PairArgs):
    """FGE from θ_a vs the independent ensemble {θ_a, θ_b} of one model, at equal budget: 2 training runs each.

    FGE spends the second run's epochs (``train.epochs``) on ``n_cycles`` cycles of ``cycle_epochs`` epochs
    with SGD and the cyclic rate α(i) between ``lr``; BatchNorm statistics are recomputed for every member
    on the training inputs."""

    cycle_epochs: int
    n_cycles: int
    lr: tuple[float, float]
    batch_size: int
    weight_decay: float
    seed: int  # θ_a's seed: seeds FGE's data order


def fge_job(args: FGEArgs, ctx: JobContext) -> dict:
    data, model = ctx.setup(args)
    eps = ctx.endpoints([args.a, args.b])
    sgd = TrainConfig(epochs=1, batch_size=args.batch_size, lr=args.lr[0], optimizer="sgd", momentum=0.9,
                      weight_decay=args.weight_decay)
    snaps = fge(model, eps[0], data.x_train, data.y_train, args.cycle_epochs, args.n_cycles,
                args.lr[0], args.lr[1], sgd, seed=args.seed, device=ctx.dev, progress=ctx.progress)
    probs_fge = ensemble_probs(model, stack(snaps), data.x_test, True, data.x_train, device=ctx.dev)
    probs_ind = ensemble_probs(model, stack(eps[:2]), data.x_test, True, data.x_train, device=ctx.dev)
    t_fge = ensemble_table(probs_fge, data.y_test.cpu())
    t_ind = ensemble_table(probs_ind, data.y_test.cpu())
    return {"model": args.mname, "budget_runs": 2,
            "single_accuracy": t_ind["members"][0]["accuracy"], "single_nll": t_ind["members"][0]["nll"],
            "independent_members": 2, "independent_accuracy": t_ind["ensemble"]["accuracy"],
            "independent_nll": t_ind["ensemble"]["nll"],
            "fge_members": len(snaps), "fge_accuracy": t_fge["ensemble"]["accuracy"],
            "fge_nll": t_fge["ensemble"]["nll"], "fge_member_mean_accuracy": t_fge["member_mean"]["accuracy"]}


def curves_jobs(cfg: CurvesConfig, data) -> list[Job]:
    curves, fges = [], []
    for mname in cfg.models:
        mcfg, view = model_config(mname, data)
        r = recipe(cfg, mname)
        seeds = [cfg.seed * 1000 + 2 * p + s for p in range(cfg.pairs) for s in (0, 1)]
        eps = [Endpoint(mcfg, r.train, s, data.ref, view) for s in seeds]
        for pair in range(cfg.pairs):
            curves.append(Job(curves_job, CurvesArgs(mname, mcfg, eps[2 * pair], eps[2 * pair + 1], data.ref, view,
                                                     cfg.grid, cfg.points_per_step, r.curve_train, r.curve_l2,
                                                     r.neb, cfg.neb_grid_sub, pair)))
        fges.append(Job(fge_job, FGEArgs(mname, mcfg, eps[0], eps[1], data.ref, view, cfg.fge_cycle_epochs,
                                         max(1, r.train.epochs // cfg.fge_cycle_epochs), tuple(r.fge_lr),
                                         r.train.batch_size, r.fge_weight_decay, seeds[0])))
    return curves + fges


def _figure(cfg: CurvesConfig, results: dict):
    plt, pd, sns = seaborn()
    rows = []
    for (mname, pair), res in results.items():
        for path, rec in res.items():
            for split, per in rec["curves"].items():
                for metric, vals in per.items():
                    rows += [{"model": mname, "pair": pair, "path": path, "split": split, "metric": metric,
                              "t": t, "value": v} for t, v in zip(rec["t"], vals, strict=True)]
    df = pd.DataFrame(rows)
    fig, axes = plt.subplots(len(cfg.models), 2, figsize=(11, 3.8 * len(cfg.models)), squeeze=False)
    for i, mname in enumerate(cfg.models):
        for j, (metric, split) in enumerate((("loss", "train"), ("error", "test"))):
            ax = axes[i][j]
            sel = df[(df.model == mname) & (df.metric == metric) & (df.split == split)]
            curves = [p for p in PATHS if p != "neb"]
            sns.lineplot(sel[sel.path != "neb"], x="t", y="value", hue="path", hue_order=curves, errorbar="sd", ax=ax)
            # NEB: its t (arc length) differs per pair, so one line per pair, not a mean ± sd band
            for k, (_, per) in enumerate(sel[sel.path == "neb"].groupby("pair")):
                ax.plot(per.t, per.value, color="tab:red", lw=1.0, alpha=0.8,
                        label="neb (AutoNEB, per pair)" if k == 0 else None)
            ax.legend(fontsize=8)
            ax.set_xlabel("t (neb: normalised arc length)")
            ax.set_title(f"{mname}: {split} {metric} along the path ({cfg.dataset})")
            ax.set_ylabel(f"{split} {metric}")
            if metric == "loss":
                ax.set_yscale("log")
    fig.tight_layout()
    return fig


def curves_report(cfg: CurvesConfig, res_all: Results) -> Report:
    """Line vs polychain vs Bézier vs AutoNEB between independently trained models; FGE vs ensembles."""
    rep = Report()
    results: dict[tuple[str, int], dict] = {}
    rows: list[dict] = []
    for args, res in res_all.of(CurvesArgs):
        mname, pair = args.mname, args.pair
        results[mname, pair] = res
        for path in PATHS:
            rec = res[path]
            rows.append({
                "model": mname, "pair": pair, "path": path,
                "max_train_loss": max(rec["curves"]["train"]["loss"]),
                "max_test_error": max(rec["curves"]["test"]["error"]),
                "endpoint_train_loss": 0.5 * (rec["curves"]["train"]["loss"][0]
                                              + rec["curves"]["train"]["loss"][-1]),
                "endpoint_test_error": 0.5 * (rec["curves"]["test"]["error"][0]
                                              + rec["curves"]["test"]["error"][-1]),
                "train_loss_max_chord": rec["barriers"]["train_loss_max_chord"],
                "test_error_max_chord": rec["barriers"]["test_error_max_chord"],
                "grid_points": len(rec["t"]),
                "free_points": rec["free_points"],
                "budget_point_grads": rec["budget_point_grads"],
            })

    rep.table("paths_per_pair", rows, title="Every pair and path (BN recomputed at each t)")
    summary = summary_rows(rows, {"model": cfg.models, "path": PATHS},
                           ("max_train_loss", "max_test_error", "endpoint_train_loss", "endpoint_test_error",
                            "train_loss_max_chord", "free_points", "budget_point_grads"))
    rep.table("paths", summary,
              title=f"Max train loss and max test error along each path (mean ± std over pairs), "
                    f"{cfg.dataset}; curves on a grid of {cfg.grid} t, NEB at every pivot and "
                    f"{cfg.neb_grid_sub} points inside each segment; budget = gradients of free points "
                    f"(curves: steps × points per step; NEB: Σ steps × interior pivots)")
    # "paths" is the table's name: the runner wants one name per output
    rep.figure("paths", _figure(cfg, results))

    fge_rows = [r for _, r in res_all.of(FGEArgs)]
    rep.table("fge_vs_independent", fge_rows,
              title="FGE vs independent ensemble at equal training budget (test set; BN recomputed)")

    # --- claims ----------------------------------------------------------------------------
    def m(model: str, path: str, col: str) -> float:
        return mean_std([r[col] for r in rows if r["model"] == model and r["path"] == path])[0]

    # "High" in absolute terms: the paper's line rises from ~7% to ~90% test error; a relative criterion
    # (e.g. twice the endpoints' error) is meaningless for an MLP that already errs on 40% of MNIST-1D.
    line_ok = all(m(n, "line", "max_test_error") - m(n, "line", "endpoint_test_error") > 0.2 for n in cfg.models)
    rep.verdict(
        "line-high-barrier",
        "; ".join(f"{n}: max {m(n, 'line', 'max_test_error'):.3f} vs endpoints "
                  f"{m(n, 'line', 'endpoint_test_error'):.3f}" for n in cfg.models),
        line_ok,
    )
    const = {}
    for n in cfg.models:
        for p in ("polychain", "bezier"):
            const[n, p] = (m(n, p, "train_loss_max_chord") < 0.1 * m(n, "line", "train_loss_max_chord"))
    rep.verdict(
        "curves-near-constant",
        "; ".join(f"{n} {p}: {m(n, p, 'train_loss_max_chord'):.3f} vs line "
                  f"{m(n, 'line', 'train_loss_max_chord'):.3f}" for (n, p) in const),
        all(const.values()),
    )
    neb_ok = {n: m(n, "neb", "train_loss_max_chord") < 0.1 * m(n, "line", "train_loss_max_chord")
              for n in cfg.models}
    rep.verdict(
        "neb-essentially-no-barrier",
        "; ".join(f"{n} neb: {m(n, 'neb', 'train_loss_max_chord'):.3f} vs line "
                  f"{m(n, 'line', 'train_loss_max_chord'):.3f} ({m(n, 'neb', 'free_points'):.1f} pivots, "
                  f"{m(n, 'neb', 'budget_point_grads'):.0f} pivot gradients vs the curves' "
                  f"{m(n, 'bezier', 'budget_point_grads'):.0f})" for n in cfg.models),
        all(neb_ok.values()),
    )
    fge_held = all(r["fge_accuracy"] >= r["independent_accuracy"] - 0.005 for r in fge_rows)
    rep.verdict(
        "fge-matches-ensemble",
        "; ".join(f"{r['model']}: FGE {r['fge_accuracy']:.4f} ({r['fge_members']} members) vs independent "
                  f"{r['independent_accuracy']:.4f} ({r['independent_members']} members)" for r in fge_rows),
        fge_held,
    )
    return rep


CURVES = declare("garipov2018-curves", __file__, config=CurvesConfig, sizes=SIZES, jobs=curves_jobs,
                 report=curves_report, datasets=("mnist1d", "digits", "mnist", "cifar10"),
                 claim_ids=("line-high-barrier", "curves-near-constant", "neb-essentially-no-barrier",
                            "fge-matches-ensemble"))
