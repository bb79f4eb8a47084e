"""Benton et al. 2021, "Loss Surface Simplexes for Mode Connecting Volumes and Fast Ensembling" (arXiv:2102.13042).

``benton2021-simplexes``: SPRO simplexes with 1–3 free vertices around a trained MLP on MNIST-1D:
test loss and accuracy at points sampled uniformly inside, against the mode itself and against a
control simplex whose free vertices lie at the same distances from the mode in random directions;
ESPRO ensembles (points sampled from simplexes around K independently trained modes) against the
deep ensemble of the same K modes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from reference.data import load_dataset
from reference.ensembles import ensemble_probs, ensemble_table
from reference.evaluate import evaluate_points
from reference.models import build_model
from reference.params import float_keys, stack
from reference.simplex import Simplex, sample_members, train_simplex
from reference.train import TrainConfig

from .common import RunContext, fmt_pm, mean_std
from .endpoints import trained_endpoints
from .registry import target


@dataclass(frozen=True)
class SimplexConfig:
    dataset: str = "mnist1d"
    widths: tuple[int, ...] = (256, 256)
    modes: int = 3
    free_vertices: tuple[int, ...] = (1, 2, 3)
    espro_free: int = 2
    samples: int = 64
    members_per_simplex: int = 5
    vol_reg: float = 0.05
    samples_per_step: int = 4
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=60, batch_size=128, lr=1e-3, optimizer="adam", schedule="cosine"))
    vertex_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=20, batch_size=128, lr=1e-3, optimizer="adam", schedule="cosine"))

    @classmethod
    def quick(cls) -> SimplexConfig:
        return cls(modes=2, free_vertices=(1, 2), samples=32, members_per_simplex=4,
                   train=TrainConfig(epochs=20, batch_size=128, lr=1e-3, optimizer="adam", schedule="cosine"),
                   vertex_train=TrainConfig(epochs=5, batch_size=128, lr=1e-3, optimizer="adam",
                                            schedule="cosine"))


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


@target(
    "benton2021-simplexes",
    paper="Loss Surface Simplexes for Mode Connecting Volumes and Fast Ensembling (Benton et al., ICML 2021)",
    arxiv="2102.13042",
    claims=(
        "points sampled inside SPRO simplexes have test accuracy close to the mode's",
        "ESPRO ensembles beat deep ensembles of the same number of modes",
    ),
)
def run(ctx: RunContext) -> None:
    """SPRO simplexes with 1–3 free vertices; ESPRO vs deep ensembles, MNIST-1D MLP."""
    cfg = SimplexConfig.quick() if ctx.quick else SimplexConfig()
    ctx.config = asdict(cfg)
    data = load_dataset(cfg.dataset, data_dir=ctx.data_dir).to(ctx.device)
    mcfg = {"name": "mlp", "in_features": int(torch.tensor(data.input_shape).prod()), "widths": list(cfg.widths),
            "num_classes": data.num_classes, "bias": True}
    model = build_model(mcfg).to(ctx.device)
    seeds = [ctx.seed * 1000 + i for i in range(cfg.modes)]
    modes = trained_endpoints(ctx, mcfg, data, {"dataset": cfg.dataset}, cfg.train, seeds)
    xte, yte = data.x_test, data.y_test
    vertex_metrics = evaluate_points(model, stack([{k: v.to(ctx.device) for k, v in m.items()} for m in modes]),
                                     xte, yte)

    # (a) SPRO simplexes of growing dimension around mode 0, and their random-direction controls
    rows = []
    complexes = {}
    for n_free in cfg.free_vertices:
        def job(n_free=n_free):
            cx = train_simplex(model, [modes[0]], n_free, data.x_train, data.y_train, cfg.vertex_train,
                               seed=ctx.seed, samples_per_step=cfg.samples_per_step, vol_reg=cfg.vol_reg,
                               device=ctx.device, progress=ctx.progress)
            g = torch.Generator().manual_seed(ctx.seed + 17)
            pts = cx.sample(cfg.samples, g)
            m = evaluate_points(model, {k: v.to(ctx.device) for k, v in pts.items()}, xte, yte)
            ctrl = Simplex([modes[0], *_random_control(modes[0], list(cx.vertices[1:]), ctx.seed + n_free)])
            ctrl_pts = ctrl.sample(cfg.samples, torch.Generator().manual_seed(ctx.seed + 17))
            mc = evaluate_points(model, {k: v.to(ctx.device) for k, v in ctrl_pts.items()}, xte, yte)
            return {"loss": m.loss.tolist(), "acc": m.accuracy.tolist(), "volume": float(cx.volumes()[0]),
                    "ctrl_loss": mc.loss.tolist(), "ctrl_acc": mc.accuracy.tolist()}

        key = {"target": "benton2021-simplexes", "spro": n_free, "model": mcfg, "cfg": asdict(cfg), "seed": seeds[0]}
        res = ctx.job(key, job)
        complexes[n_free] = res
        rows.append({"free_vertices": n_free, "simplex": f"SPRO ({n_free + 1} vertices)",
                     "volume": res["volume"], "test_loss": fmt_pm(res["loss"]), "test_accuracy": fmt_pm(res["acc"]),
                     "worst_test_accuracy": min(res["acc"])})
        rows.append({"free_vertices": n_free, "simplex": "random directions, same distances",
                     "volume": float("nan"), "test_loss": fmt_pm(res["ctrl_loss"]),
                     "test_accuracy": fmt_pm(res["ctrl_acc"]), "worst_test_accuracy": min(res["ctrl_acc"])})
        ctx.log(f"  SPRO {n_free} free: test acc {fmt_pm(res['acc'])} (control {fmt_pm(res['ctrl_acc'])}), "
                f"mode {float(vertex_metrics.accuracy[0]):.4f}")
    rows.insert(0, {"free_vertices": 0, "simplex": "the mode itself", "volume": 0.0,
                    "test_loss": f"{float(vertex_metrics.loss[0]):.3f}",
                    "test_accuracy": f"{float(vertex_metrics.accuracy[0]):.3f}",
                    "worst_test_accuracy": float(vertex_metrics.accuracy[0])})
    ctx.write_table("spro_simplexes", rows, title=f"Points sampled uniformly in SPRO simplexes around one mode "
                                                  f"({cfg.samples} samples, test split, vol_reg {cfg.vol_reg})")

    # (b) ESPRO vs deep ensembles of the same number of modes
    def espro_job():
        out = []
        cxs = []
        for j, mode in enumerate(modes):
            cxs.append(train_simplex(model, [mode], cfg.espro_free, data.x_train, data.y_train, cfg.vertex_train,
                                     seed=ctx.seed + 100 + j, samples_per_step=cfg.samples_per_step,
                                     vol_reg=cfg.vol_reg, device=ctx.device, progress=ctx.progress))
        for K in range(1, cfg.modes + 1):
            members = sample_members(cxs[:K], cfg.members_per_simplex, torch.Generator().manual_seed(ctx.seed + K))
            pe = ensemble_probs(model, members, xte, device=ctx.device)
            pd = ensemble_probs(model, stack(modes[:K]), xte, device=ctx.device)
            te, td = ensemble_table(pe, yte.cpu())["ensemble"], ensemble_table(pd, yte.cpu())["ensemble"]
            out.append({"modes": K, "espro_members": K * cfg.members_per_simplex,
                        "espro_accuracy": te["accuracy"], "espro_nll": te["nll"], "espro_ece": te["ece"],
                        "deep_ensemble_accuracy": td["accuracy"], "deep_ensemble_nll": td["nll"],
                        "deep_ensemble_ece": td["ece"]})
        return out

    espro = ctx.job({"target": "benton2021-simplexes", "espro": cfg.espro_free, "model": mcfg, "cfg": asdict(cfg),
                     "seeds": seeds}, espro_job)
    ctx.write_table("espro_vs_deep_ensembles", espro,
                    title=f"ESPRO ({cfg.espro_free} free vertices per mode, {cfg.members_per_simplex} samples each) "
                          f"vs deep ensembles of the same modes (test split)")
    _figure(ctx, cfg, complexes, float(vertex_metrics.accuracy[0]), espro)

    # --- claims ----------------------------------------------------------------------------
    gaps = {n: float(vertex_metrics.accuracy[0]) - mean_std(r["acc"])[0] for n, r in complexes.items()}
    ctx.claim("spro-low-loss", "mean test accuracy of points sampled in each SPRO simplex is within 1 point of "
                               "the mode's",
              "simplexes of 1–3+ free vertices keep the mode's accuracy (Fig. 3, Sec. 5)",
              "; ".join(f"{n} free: {-100 * g:+.2f} points vs the mode" for n, g in gaps.items()),
              all(g < 0.01 for g in gaps.values()))
    last = espro[-1]
    ctx.claim("espro-beats-deep-ensemble",
              f"with {last['modes']} modes, ESPRO has higher accuracy and lower NLL than the deep ensemble",
              "ESPRO outperforms deep ensembles of the same number of independently trained models (Fig. 5)",
              f"accuracy {last['espro_accuracy']:.4f} vs {last['deep_ensemble_accuracy']:.4f}; "
              f"NLL {last['espro_nll']:.4f} vs {last['deep_ensemble_nll']:.4f}",
              last["espro_accuracy"] > last["deep_ensemble_accuracy"] and last["espro_nll"] < last["deep_ensemble_nll"])


def _figure(ctx: RunContext, cfg: SimplexConfig, complexes: dict, mode_acc: float, espro: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    sns.set_theme(style="whitegrid")
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
    ctx.save_figure(fig, "simplexes")
