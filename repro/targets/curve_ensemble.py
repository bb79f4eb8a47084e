"""The Bézier-curve write-up (``../shared/sources/001_0e6dda0a94f78bde.txt``; Garipov et al. 2018's method).

``curve-ensemble``: two models trained from different seeds, a quadratic Bézier curve between them
trained on E_{t~U(0,1)} L(φ_θ(t)), and the ensemble of models sampled along the curve; the table
of the write-up (start model, end model, curve ensemble: cross-entropy, ECE, accuracy, AUROC), the
loss landscape in the plane of the curve, and the metrics along t.

Embedded default: a 1-D CNN on MNIST-1D. With ``--data-dir`` holding CIFAR-10 python batches
(``--dataset cifar10``) it runs the write-up's own setting, a small CNN on CIFAR-10, and prints the
write-up's numbers beside ours. The write-up averages the members' outputs; we average their
probabilities (the usual ensemble), and say so in the table title.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from reference.curves import train_curve
from reference.data import load_dataset
from reference.ensembles import ensemble_probs, ensemble_table
from reference.evaluate import all_metrics
from reference.landscape import plane_basis, plane_grid, plot_plane, project
from reference.models import build_model
from reference.train import TrainConfig

from .common import RunContext
from .endpoints import trained_endpoints
from .registry import target

# The write-up's table (small CNN on CIFAR-10): start, end, curve ensemble.
WRITEUP = {
    "start": {"nll": 0.5877, "ece": 0.0232, "accuracy": 0.8025, "auroc": 0.9778},
    "end": {"nll": 0.6073, "ece": 0.0216, "accuracy": 0.7918, "auroc": 0.9761},
    "ensemble": {"nll": 0.5447, "ece": 0.0374, "accuracy": 0.8158, "auroc": 0.9808},
}
METRICS = ("nll", "ece", "accuracy", "auroc")


@dataclass(frozen=True)
class CurveEnsembleConfig:
    dataset: str = "mnist1d"
    members: int = 20
    t_grid: int = 21
    plane_grid: int = 31
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=60, batch_size=128, lr=1e-3, optimizer="adam", schedule="cosine"))
    # the curve gets the endpoints' training budget (Garipov et al. train curves as long as the models)
    curve_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=60, batch_size=128, lr=1e-3, optimizer="adam", schedule="cosine"))

    @classmethod
    def quick(cls, dataset: str = "mnist1d") -> CurveEnsembleConfig:
        return cls(dataset=dataset, members=10, t_grid=11, plane_grid=15,
                   train=TrainConfig(epochs=20, batch_size=128, lr=1e-3, optimizer="adam", schedule="cosine"),
                   curve_train=TrainConfig(epochs=8, batch_size=128, lr=1e-3, optimizer="adam", schedule="cosine"))


def _model_config(dataset: str, data) -> dict:
    if dataset == "cifar10":  # the write-up's small CNN: three conv layers, then the classifier
        return {"name": "vgg", "in_channels": 3, "channels": [32, "M", 64, "M", 128, "M"],
                "num_classes": data.num_classes, "norm": None, "groups": 2, "dims": 2, "bias": True}
    if len(data.input_shape) == 1:
        return {"name": "cnn1d", "in_channels": 1, "channels": [32, 32, 32], "num_classes": data.num_classes,
                "norm": None, "kernel_size": 5, "groups": 2, "bias": True}
    raise ValueError(f"curve-ensemble has no model for dataset {dataset!r} (use mnist1d or cifar10)")


def _figures(ctx: RunContext, along: list[dict], plane: dict, curve_xy: torch.Tensor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    df = pd.DataFrame(along)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, m in zip(axes, METRICS, strict=True):
        sns.lineplot(df, x="t", y=m, marker="o", ax=ax)
        ax.set_title(f"test {m} along the curve")
    ctx.save_figure(fig, "metrics_along_t")
    fig = plot_plane(plane, curve_coords=curve_xy, labels=("start", "control point", "end"),
                     title="test loss in the plane of the Bézier curve")
    ctx.save_figure(fig, "plane_landscape")


@target(
    "curve-ensemble",
    paper="Mode connectivity with a Bézier curve (simoneiriksson/mode-connectivity write-up of Garipov et al. 2018)",
    arxiv="1802.10026",
    claims=(
        "the ensemble along the curve has lower cross-entropy than either endpoint",
        "the ensemble along the curve has higher accuracy and AUROC than either endpoint",
        "the ensemble along the curve has a higher ECE than the endpoints",
    ),
)
def run(ctx: RunContext) -> None:
    """Start / end / curve-ensemble table, metrics along t, and the landscape in the curve's plane."""
    dataset = ctx.options.get("dataset") or "mnist1d"
    cfg = CurveEnsembleConfig.quick(dataset) if ctx.quick else CurveEnsembleConfig(dataset=dataset)
    if dataset != "mnist1d":
        ctx.variant = dataset
    ctx.config = asdict(cfg)
    data = load_dataset(cfg.dataset, data_dir=ctx.data_dir).to(ctx.device)
    mcfg = _model_config(cfg.dataset, data)
    model = build_model(mcfg).to(ctx.device)
    seeds = [ctx.seed * 1000, ctx.seed * 1000 + 1]
    start, end = [{k: v.to(ctx.device) for k, v in p.items()}
                  for p in trained_endpoints(ctx, mcfg, data, {"dataset": cfg.dataset}, cfg.train, seeds)]
    ctx.log(f"curve-ensemble: training a quadratic Bézier curve on {cfg.dataset} ({ctx.device})")
    curve = train_curve(model, start, end, data.x_train, data.y_train, cfg=cfg.curve_train, kind="bezier",
                        order=2, seed=ctx.seed, device=ctx.device, progress=ctx.progress)
    curve = curve.to(ctx.device)
    y = data.y_test.cpu()
    g = torch.Generator().manual_seed(ctx.seed)
    t_members = torch.rand(cfg.members, generator=g, dtype=torch.float64)
    probs = ensemble_probs(model, curve.points_at(t_members), data.x_test, True, data.x_train, device=ctx.device)
    ends = ensemble_probs(model, curve.points_at(torch.tensor([0.0, 1.0])), data.x_test, True, data.x_train,
                          device=ctx.device)
    table = ensemble_table(probs, y)
    ours = {"start": all_metrics(ends[0], y), "end": all_metrics(ends[1], y), "ensemble": table["ensemble"]}
    rows = []
    for name in ("start", "end", "ensemble"):
        row = {"model": {"start": "start model", "end": "end model",
                         "ensemble": f"curve ensemble ({cfg.members} t ~ U(0,1))"}[name]}
        row.update({m: ours[name][m] for m in METRICS})
        if cfg.dataset == "cifar10":
            row.update({f"write-up {m}": WRITEUP[name][m] for m in METRICS})
        rows.append(row)
    ctx.write_table("ensemble", rows, title=f"Test metrics on {cfg.dataset} (ensemble = mean of member "
                                            f"probabilities; BN recomputed per member; CE = NLL)")
    t_grid = torch.linspace(0, 1, cfg.t_grid, dtype=torch.float64)
    grid_probs = ensemble_probs(model, curve.points_at(t_grid), data.x_test, True, data.x_train, device=ctx.device)
    along = [{"t": float(t), **{m: all_metrics(p, y)[m] for m in METRICS}}
             for t, p in zip(t_grid, grid_probs, strict=True)]
    ctx.write_table("metrics_along_t", along, title="Test metrics of single models along the curve")
    free = curve.free[0]
    basis = plane_basis(start, free, end)
    plane = plane_grid(model, start, free, end, data.x_test, data.y_test, grid=(cfg.plane_grid, cfg.plane_grid),
                       recompute_bn=True, x_bn=data.x_train, device=ctx.device)
    curve_xy = project(curve.points_at(torch.linspace(0, 1, 41, dtype=torch.float64)), basis)
    _figures(ctx, along, plane, curve_xy)

    s, e, en = ours["start"], ours["end"], ours["ensemble"]
    ref = " (write-up, CIFAR-10: start / end / ensemble {} )"

    def triple(m: str) -> str:
        return f"{s[m]:.4f} / {e[m]:.4f} / {en[m]:.4f}"

    def paper(m: str) -> str:
        return ref.format(f"{WRITEUP['start'][m]} / {WRITEUP['end'][m]} / {WRITEUP['ensemble'][m]}")

    ctx.claim("ensemble-lower-ce", "cross-entropy of the curve ensemble < both endpoints'",
              "0.5447 vs 0.5877 / 0.6073" + paper("nll"), f"start / end / ensemble: {triple('nll')}",
              en["nll"] < min(s["nll"], e["nll"]))
    ctx.claim("ensemble-higher-acc-auroc", "accuracy and AUROC of the curve ensemble > both endpoints'",
              "accuracy 0.8158 vs 0.8025 / 0.7918; AUROC 0.9808 vs 0.9778 / 0.9761",
              f"accuracy {triple('accuracy')}; AUROC {triple('auroc')}",
              en["accuracy"] > max(s["accuracy"], e["accuracy"]) and en["auroc"] > max(s["auroc"], e["auroc"]))
    ctx.claim("ensemble-higher-ece", "ECE of the curve ensemble > both endpoints' (more conservative predictions)",
              "0.0374 vs 0.0232 / 0.0216" + paper("ece"), f"start / end / ensemble: {triple('ece')}",
              en["ece"] > max(s["ece"], e["ece"]))
