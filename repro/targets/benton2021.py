"""Benton et al. 2021, "Loss Surface Simplexes for Mode Connecting Volumes and Fast Ensembling" (arXiv:2102.13042).

``benton2021-simplexes``: SPRO simplexes with 1–3 free vertices around a trained MLP on MNIST-1D:
test loss and accuracy at points sampled uniformly inside, against the mode itself and against a
control simplex whose free vertices lie at the same distances from the mode in random directions;
ESPRO ensembles (points sampled from simplexes around K independently trained modes) against the
deep ensemble of the same K modes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reference.ensembles import ensemble_probs, ensemble_table
from reference.evaluate import evaluate_points
from reference.params import float_keys, stack
from reference.simplex import Simplex, sample_members, train_simplex
from reference.train import TrainConfig

from ..runner import Endpoint, Job, JobContext, ModelsArgs, Report, Results, fmt_pm, mean_std, seaborn
from ..runner.declare import declare

ARCHS = ("mlp", "vgg")


@dataclass(frozen=True)
class SimplexConfig:
    dataset: str = "mnist1d"
    seed: int = 0
    arch: str = "mlp"  # "mlp" (hidden ``widths``, inputs flattened) or "vgg" (``vgg_stages``, on images)
    widths: tuple[int, ...] = (256, 256)
    # VGG without normalisation: conv widths per stage, each stage followed by a 2× max-pool
    vgg_stages: tuple[tuple[int, ...], ...] = ()
    modes: int = 3
    free_vertices: tuple[int, ...] = (1, 2, 3)
    espro_free: int = 2
    samples: int = 64
    members_per_simplex: int = 5
    vol_reg: float = 0.05
    samples_per_step: int = 4
    train: TrainConfig = TrainConfig.adam(60)
    vertex_train: TrainConfig = TrainConfig.adam(20)


# VGG-16's conv stages (13 conv layers, 5 max-pools)
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))

SIZES = {
    "quick": SimplexConfig(modes=2, free_vertices=(1, 2), samples=32, members_per_simplex=4,
                           train=TrainConfig.adam(20),
                           vertex_train=TrainConfig.adam(5)),
    "cpu": SimplexConfig(),
    # Benton et al. 2021, Sec. 4–5 (Figs. 3, 5: VGG-16 on CIFAR-10) with the authors' g-benton/loss-surface-simplexes
    # experiments/vgg-cifar10 scripts (README.md and the argparse defaults):
    # - modes: VGG16 of simplex/models/vgg_noBN.py (13 convs, no BatchNorm), base_trainer.py: 300 epochs, SGD
    #   momentum 0.9, lr 0.05, weight decay 5e-4, batch 128, CosineAnnealingLR over the epochs. Differences: the
    #   zoo's VGG ends in a global average pool and one Linear (theirs: dropout + 512-512-10 Linear layers), and
    #   their flip/crop augmentation is not reproduced;
    # - vertices: simplex_trainer.py / ensemble_trainer.py: 10 epochs per vertex, SGD momentum 0.9, lr 0.01,
    #   weight decay 5e-4, batch 128, cosine; n_sample = 5 points per step (samples_per_step);
    # - SPRO: simplex_trainer.py's --n_verts default 4 free vertices around one mode → free_vertices 1 … 4;
    # - ESPRO: ensemble_trainer.py's defaults --n_component 8 (modes) and --n_verts 4 vertices per simplex
    #   (the mode + 3 free: espro_free 3).
    # vol_reg: their weight is max(LMBD / log Vol₀, 1e-8) (LMBD 1e-6 in ensemble_trainer.py; Vol₀ the volume of a
    # random simplex) on a *sum* of the T losses, i.e. vol_reg = 2λ/T here (reference/simplex.py, difference (a));
    # Vol₀ is not known without their random init, so we take the floor λ = 1e-8: vol_reg = 2e-8 / 5 = 4e-9 (our
    # choice, negligible as theirs is). samples (64 test points per simplex) and members_per_simplex (5) are
    # our choice. Needs --data-dir with the CIFAR-10 python batches.
    "paper": SimplexConfig(dataset="cifar10", arch="vgg", vgg_stages=VGG16_STAGES, modes=8,
                           free_vertices=(1, 2, 3, 4), espro_free=3, samples=64, members_per_simplex=5,
                           vol_reg=4e-9, samples_per_step=5,
                           train=TrainConfig(epochs=300, batch_size=128, lr=0.05, optimizer="sgd", momentum=0.9,
                                             weight_decay=5e-4, schedule="cosine"),
                           vertex_train=TrainConfig(epochs=10, batch_size=128, lr=0.01, optimizer="sgd",
                                                    momentum=0.9, weight_decay=5e-4, schedule="cosine")),
}


def _random_control(mode: dict, free: list[dict], seed: int) -> list[dict]:
    """Free vertices at the same distances from the mode as ``free``, in random directions."""
    g = torch.Generator().manual_seed(seed)
    keys = float_keys(mode)
    out = []
    for v in free:
        d = {k: v[k] - mode[k] for k in keys}
        norm = torch.sqrt(sum((d[k].double() ** 2).sum() for k in keys))
        r = {k: torch.randn(mode[k].shape, generator=g, dtype=torch.float64) for k in keys}
        rn = torch.sqrt(sum((r[k] ** 2).sum() for k in keys))
        out.append({**mode, **{k: mode[k] + (r[k] * norm / rn).to(mode[k].dtype) for k in keys}})
    return out


@dataclass(frozen=True)
class ModesArgs(ModelsArgs):
    """The trained modes' (``models``) own test loss and accuracy."""


def modes_job(args: ModesArgs, ctx: JobContext) -> dict:
    data, model = ctx.setup(args)
    m = evaluate_points(model, stack(ctx.endpoints(args.models)), data.x_test, data.y_test)
    return {"loss": m.loss.tolist(), "accuracy": m.accuracy.tolist()}


@dataclass(frozen=True)
class VertexTraining:
    """How the free vertices of a simplex around one mode are trained, in SPRO and ESPRO alike:
    ``vertex_train`` with ``samples_per_step`` points of the simplex per step and the volume regulariser
    ``vol_reg`` (``reference.simplex.train_simplex``)."""

    vertex_train: TrainConfig
    samples_per_step: int
    vol_reg: float

    def simplex(self, model, mode: dict, n_free: int, data, seed: int, ctx: JobContext):
        return train_simplex(model, [mode], n_free, data.x_train, data.y_train, self.vertex_train, seed=seed,
                             samples_per_step=self.samples_per_step, vol_reg=self.vol_reg, device=ctx.dev,
                             progress=ctx.progress)


@dataclass(frozen=True)
class SimplexArgs(ModelsArgs):
    """SPRO simplices with ``n_free`` free vertices around each of the modes ``models``, each vertex trained as
    ``training`` says; ``seed`` seeds the training (and the draws inside the simplices)."""

    n_free: int
    training: VertexTraining
    seed: int


@dataclass(frozen=True)
class SproArgs(SimplexArgs):
    """One SPRO simplex around the one mode in ``models``, and its random-direction control, each sampled at
    ``samples`` points."""

    samples: int


def spro_job(args: SproArgs, ctx: JobContext) -> dict:
    data, model = ctx.setup(args)
    (mode,) = ctx.endpoints(args.models)
    cx = args.training.simplex(model, mode, args.n_free, data, args.seed, ctx)
    ctrl = Simplex([mode, *_random_control(mode, list(cx.vertices[1:]), args.seed + args.n_free)])

    def sampled(simplex: Simplex):  # the same barycentric draws inside the simplex and its control
        pts = simplex.sample(args.samples, torch.Generator().manual_seed(args.seed + 17))
        return evaluate_points(model, {k: v.to(ctx.dev) for k, v in pts.items()}, data.x_test, data.y_test)

    m, mc = sampled(cx), sampled(ctrl)
    res = {"loss": m.loss.tolist(), "acc": m.accuracy.tolist(), "volume": float(cx.volumes()[0]),
           "ctrl_loss": mc.loss.tolist(), "ctrl_acc": mc.accuracy.tolist()}
    ctx.log(f"  SPRO {args.n_free} free: test acc {fmt_pm(res['acc'])} (control {fmt_pm(res['ctrl_acc'])})")
    return res


@dataclass(frozen=True)
class EsproArgs(SimplexArgs):
    """ESPRO: a simplex around each mode; ensembles of the first K, K = 1 … N, of ``members_per_simplex``
    points drawn from each."""

    members_per_simplex: int


def espro_job(args: EsproArgs, ctx: JobContext) -> dict:
    data, model = ctx.setup(args)
    modes = ctx.endpoints(args.models)
    xte, yte = data.x_test, data.y_test
    out = []
    cxs = [args.training.simplex(model, mode, args.n_free, data, args.seed + 100 + j, ctx)
           for j, mode in enumerate(modes)]
    for K in range(1, len(modes) + 1):
        members = sample_members(cxs[:K], args.members_per_simplex, torch.Generator().manual_seed(args.seed + K))
        pe = ensemble_probs(model, members, xte, device=ctx.dev)
        pd = ensemble_probs(model, stack(modes[:K]), xte, device=ctx.dev)
        te, td = ensemble_table(pe, yte.cpu())["ensemble"], ensemble_table(pd, yte.cpu())["ensemble"]
        out.append({"modes": K, "espro_members": K * args.members_per_simplex,
                    "espro_accuracy": te["accuracy"], "espro_nll": te["nll"], "espro_ece": te["ece"],
                    "deep_ensemble_accuracy": td["accuracy"], "deep_ensemble_nll": td["nll"],
                    "deep_ensemble_ece": td["ece"]})
        ctx.log(f"  ESPRO {K} mode(s): accuracy {te['accuracy']:.4f} vs deep ensemble {td['accuracy']:.4f}")
    return {"rows": out}


def _model_config(cfg: SimplexConfig, data) -> dict:
    if cfg.arch == "mlp":
        return {"name": "mlp", "in_features": data.in_features, "widths": list(cfg.widths),
                "num_classes": data.num_classes, "bias": True}
    if cfg.arch != "vgg":
        raise ValueError(f"benton2021-simplexes: arch must be one of {ARCHS}, got {cfg.arch!r}")
    shape = tuple(data.input_shape)
    if len(shape) != 3 or not cfg.vgg_stages:
        raise ValueError(f"benton2021-simplexes: arch 'vgg' needs images (C, H, W) and vgg_stages; got input "
                         f"shape {shape} on {cfg.dataset!r} and vgg_stages {cfg.vgg_stages!r} (use arch=mlp)")
    if min(shape[1:]) < 2 ** len(cfg.vgg_stages):
        raise ValueError(f"benton2021-simplexes: {len(cfg.vgg_stages)} VGG stages pool {shape[1:]} below 1×1")
    channels: list = []
    for stage in cfg.vgg_stages:
        channels += [int(c) for c in stage] + ["M"]
    return {"name": "vgg", "in_channels": int(shape[0]), "channels": channels, "num_classes": data.num_classes,
            "norm": None, "dims": 2, "bias": True}


def jobs(cfg: SimplexConfig, data) -> list[Job]:
    mcfg = _model_config(cfg, data)
    seeds = [cfg.seed * 1000 + i for i in range(cfg.modes)]
    modes = tuple(Endpoint(mcfg, cfg.train, s, data.ref) for s in seeds)
    training = VertexTraining(cfg.vertex_train, cfg.samples_per_step, cfg.vol_reg)
    out = [Job(modes_job, ModesArgs(mcfg, modes, data.ref))]
    # (a) SPRO simplexes of growing dimension around mode 0, and their random-direction controls
    out += [Job(spro_job, SproArgs(mcfg, modes[:1], data.ref, n_free, training, cfg.seed, cfg.samples))
            for n_free in cfg.free_vertices]
    # (b) ESPRO vs deep ensembles of the same number of modes
    out.append(Job(espro_job, EsproArgs(mcfg, modes, data.ref, cfg.espro_free, training, cfg.seed,
                                        cfg.members_per_simplex)))
    return out


def report(cfg: SimplexConfig, results: Results) -> Report:
    """SPRO simplexes with 1–3 free vertices; ESPRO vs deep ensembles."""
    rep = Report()
    vm = results.one(ModesArgs)
    mode_loss, mode_acc = float(vm["loss"][0]), float(vm["accuracy"][0])
    rows = []
    complexes = {}
    for args, res in results.of(SproArgs):
        n_free = args.n_free
        complexes[n_free] = res
        rows.append({"free_vertices": n_free, "simplex": f"SPRO ({n_free + 1} vertices)",
                     "volume": res["volume"], "test_loss": fmt_pm(res["loss"]), "test_accuracy": fmt_pm(res["acc"]),
                     "worst_test_accuracy": min(res["acc"])})
        rows.append({"free_vertices": n_free, "simplex": "random directions, same distances",
                     "volume": float("nan"), "test_loss": fmt_pm(res["ctrl_loss"]),
                     "test_accuracy": fmt_pm(res["ctrl_acc"]), "worst_test_accuracy": min(res["ctrl_acc"])})
        rep.notes.append(f"  SPRO {n_free} free: test acc {fmt_pm(res['acc'])} (control {fmt_pm(res['ctrl_acc'])}), "
                         f"mode {mode_acc:.4f}")
    rows.insert(0, {"free_vertices": 0, "simplex": "the mode itself", "volume": 0.0,
                    "test_loss": f"{mode_loss:.3f}", "test_accuracy": f"{mode_acc:.3f}",
                    "worst_test_accuracy": mode_acc})
    rep.table("spro_simplexes", rows, title=f"Points sampled uniformly in SPRO simplexes around one mode "
                                            f"({cfg.samples} samples, test split, vol_reg {cfg.vol_reg})")
    espro = results.one(EsproArgs)["rows"]
    rep.table("espro_vs_deep_ensembles", espro,
              title=f"ESPRO ({cfg.espro_free} free vertices per mode, {cfg.members_per_simplex} samples each) "
                    f"vs deep ensembles of the same modes (test split)")
    rep.figure("simplexes", _figure(complexes, mode_acc, espro))

    # --- claims ----------------------------------------------------------------------------
    gaps = {n: mode_acc - mean_std(r["acc"])[0] for n, r in complexes.items()}
    rep.verdict("spro-low-loss", "; ".join(f"{n} free: {-100 * g:+.2f} points vs the mode" for n, g in gaps.items()),
                all(g < 0.01 for g in gaps.values()))
    last = espro[-1]
    rep.verdict("espro-beats-deep-ensemble",
                f"{last['modes']} modes: accuracy {last['espro_accuracy']:.4f} vs "
                f"{last['deep_ensemble_accuracy']:.4f}; NLL {last['espro_nll']:.4f} vs {last['deep_ensemble_nll']:.4f}",
                last["espro_accuracy"] > last["deep_ensemble_accuracy"]
                and last["espro_nll"] < last["deep_ensemble_nll"])
    return rep


def _figure(complexes: dict, mode_acc: float, espro: list[dict]):
    plt, pd, sns = seaborn()
    long = []
    for n, r in complexes.items():
        long += [{"free vertices": n, "test accuracy": a, "simplex": "SPRO"} for a in r["acc"]]
        long += [{"free vertices": n, "test accuracy": a, "simplex": "random directions"} for a in r["ctrl_acc"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    sns.boxplot(pd.DataFrame(long), x="free vertices", y="test accuracy", hue="simplex", ax=axes[0])
    axes[0].axhline(mode_acc, color="k", ls="--", lw=1, label="mode")
    axes[0].set_title("points sampled in the simplex")
    e = pd.DataFrame(espro)
    axes[1].plot(e["modes"], e["espro_accuracy"], "o-", label="ESPRO")
    axes[1].plot(e["modes"], e["deep_ensemble_accuracy"], "s-", label="deep ensemble")
    axes[1].set_xlabel("number of modes")
    axes[1].set_ylabel("test accuracy")
    axes[1].legend()
    axes[1].set_title("ensembles")
    return fig


SIMPLEXES = declare("benton2021-simplexes", __file__, config=SimplexConfig, sizes=SIZES, jobs=jobs, report=report,
                    datasets=("mnist1d", "digits", "mnist", "cifar10"),
                    claim_ids=("spro-low-loss", "espro-beats-deep-ensemble"))
