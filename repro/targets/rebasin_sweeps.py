"""The rebasin MLP study (``../shared/sources/004_aba5b3e51887f54f.txt``): permutation coordinate descent
(weight matching) and MergeMany on MLPs with LayerNorm, swept over weight decay, feature size and
number of models.

``rebasin-mlp-sweeps`` (digits by default; the study used MNIST, which ``--data-dir`` accepts):
(a) the loss barrier after weight matching vs weight decay, with the interpolation curves of
    model_a → model_b and model_a → model_b (rebasined);
(b) MergeMany vs number of models and feature size and weight decay: ratios of the merged model's
    loss / accuracy to the mean of its members and to a control model (trained like a member),
    as heatmaps;
(c) output statistics of merged models (max output, std of outputs) relative to the members';
(d) the number of permuted units vs weight decay.
Every (weight decay, feature size) cell is one job of the executor (``--executor``); cached jobs are
reused, so an interrupted sweep resumes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from reference.barrier import evaluate_path, linear_path
from reference.data import load_dataset
from reference.evaluate import predict_logits
from reference.matching import weight_matching
from reference.merge import merge_many
from reference.models import build_model
from reference.params import stack
from reference.specs import spec_for
from reference.train import TrainConfig

from .common import RunContext, mean_std
from .endpoints import trained_endpoints
from .executor import run_jobs
from .registry import target


@dataclass(frozen=True)
class SweepConfig:
    dataset: str = "digits"
    depth: int = 3
    features: tuple[int, ...] = (50, 100, 200, 400)
    weight_decays: tuple[float, ...] = (0.0, 0.01, 0.03, 0.1, 0.3, 0.9)
    n_models: tuple[int, ...] = (2, 3, 4, 6)
    grid: int = 25
    epochs: int = 30
    lr: float = 1e-3

    @classmethod
    def quick(cls) -> SweepConfig:
        return cls(features=(50, 200), weight_decays=(0.0, 0.1, 0.9), n_models=(2, 3), grid=11, epochs=15)

    def train_cfg(self, wd: float) -> TrainConfig:
        # Adam with coupled L2 (weight_decay), as the study's torch.optim.Adam(weight_decay=...)
        return TrainConfig(epochs=self.epochs, batch_size=128, lr=self.lr, optimizer="adam", weight_decay=wd,
                           schedule="cosine")


def _stats(model, params, x, y) -> dict:
    logits = predict_logits(model, stack([params]), x)[0].double()
    loss = float(torch.nn.functional.cross_entropy(logits, y))
    return {"loss": loss, "accuracy": float((logits.argmax(1) == y).double().mean()),
            "max_output": float(logits.max(1).values.mean()), "output_std": float(logits.std(1).mean())}


def sweep_cell(model_config: dict, wd: float, cfg: dict, seed: int, cache_dir: str, device: str,
               data_dir: str | None) -> dict:
    """One (weight decay, feature size) cell, self-contained so any executor can run it: loads the data,
    trains or loads (cache) the cell's models, and measures (a), (b), (c), (d)."""
    from pathlib import Path

    cfg_ = SweepConfig(**{**cfg, "features": tuple(cfg["features"]), "weight_decays": tuple(cfg["weight_decays"]),
                          "n_models": tuple(cfg["n_models"])})
    dev = torch.device(device)
    data = load_dataset(cfg_.dataset, data_dir=data_dir).to(dev)
    wctx = RunContext(target="rebasin-mlp-sweeps", out_root=Path(cache_dir), quick=False, device=dev,
                      cache_dir=Path(cache_dir), progress=False)
    seeds = [seed * 1000 + i for i in range(max(cfg_.n_models) + 1)]  # the last one is the control model
    models = [{k: v.to(dev) for k, v in p.items()} for p in
              trained_endpoints(wctx, model_config, data, {"dataset": cfg_.dataset}, cfg_.train_cfg(wd), seeds)]
    model = build_model(model_config).to(dev)
    spec = spec_for(model)
    splits = {"train": (data.x_train, data.y_train), "test": (data.x_test, data.y_test)}
    xt, yt = data.x_test, data.y_test
    a, b = models[0], models[1]
    wm = weight_matching(spec, a, b, seed=seed)
    out: dict = {"pcd": {}, "merge": []}
    for name, end in (("model_b", b), ("model_b_rebasin", wm.perm.apply(spec, b))):
        t, pts = linear_path(a, end, cfg_.grid)
        pe = evaluate_path(model, t, pts, splits)
        out["pcd"][name] = {"t": pe.t.tolist(), "test_loss": pe.curves["test"]["loss"].tolist(),
                            "test_error": pe.curves["test"]["error"].tolist(),
                            "train_loss": pe.curves["train"]["loss"].tolist(), "barriers": pe.barrier_table()}
    out["pcd_permuted_units"] = sum(wm.perm.num_moved().values())
    out["units"] = sum(spec.sizes.values())
    control = _stats(model, models[-1], xt, yt)
    for nm in cfg_.n_models:
        res = merge_many(spec, models[:nm], seed=seed)
        merged = _stats(model, res.merged, xt, yt)
        members = [_stats(model, m, xt, yt) for m in models[:nm]]
        avg = {k: sum(m[k] for m in members) / nm for k in members[0]}
        out["merge"].append({
            "n_models": nm, "merged": merged, "members_mean": avg, "control": control,
            "permuted_units": sum(sum(p.num_moved().values()) for p in res.perms),
        })
    return out


def _heatmaps(ctx: RunContext, cfg: SweepConfig, merge_rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    sns.set_theme(style="white")
    df = pd.DataFrame(merge_rows)
    cols = [("loss_ratio_vs_members", "loss: merged / members' mean"),
            ("accuracy_ratio_vs_members", "accuracy: merged / members' mean"),
            ("loss_ratio_vs_control", "loss: merged / control"),
            ("accuracy_ratio_vs_control", "accuracy: merged / control")]
    nms = list(cfg.n_models)
    fig, axes = plt.subplots(len(cols), len(nms), figsize=(3.6 * len(nms), 3.4 * len(cols)), squeeze=False)
    for i, (col, label) in enumerate(cols):
        for j, nm in enumerate(nms):
            piv = df[df.n_models == nm].pivot(index="features", columns="weight_decay", values=col)
            sns.heatmap(piv, annot=True, fmt=".2f", cmap="vlag", center=1.0, ax=axes[i][j], cbar=False)
            axes[i][j].set_title(f"{label}\n{nm} models", fontsize=9)
    fig.tight_layout()
    ctx.save_figure(fig, "merge_many_heatmaps")
    stat_cols = [("max_output_ratio", "max output: merged / members"),
                 ("output_std_ratio", "output std: merged / members")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (col, label) in zip(axes, stat_cols, strict=True):
        sns.lineplot(df, x="weight_decay", y=col, hue="n_models", style="features", marker="o", ax=ax)
        ax.set_xscale("symlog", linthresh=0.01)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_title(label)
    ctx.save_figure(fig, "merged_output_statistics")


def _pcd_figures(ctx: RunContext, cfg: SweepConfig, cells: dict, pcd_rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    f = max(cfg.features)
    wds = list(cfg.weight_decays)
    fig, axes = plt.subplots(2, len(wds), figsize=(3.2 * len(wds), 6), squeeze=False, sharex=True)
    for j, wd in enumerate(wds):
        res = cells[wd, f]
        for name, rec in res["pcd"].items():
            axes[0][j].plot(rec["t"], rec["test_loss"], label=name)
            axes[1][j].plot(rec["t"], [1 - e for e in rec["test_error"]], label=name)
        axes[0][j].set_title(f"weight decay {wd}")
        axes[1][j].set_xlabel("λ (model_a → model_b)")
    axes[0][0].set_ylabel("test loss")
    axes[1][0].set_ylabel("test accuracy")
    axes[0][0].legend()
    ctx.save_figure(fig, "pcd_interpolation")
    df = pd.DataFrame(pcd_rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    sns.lineplot(df, x="weight_decay", y="rebasin_test_loss_barrier", hue="features", marker="o", ax=axes[0])
    axes[0].set_xscale("symlog", linthresh=0.01)
    axes[0].set_title("test loss barrier (mid) after weight matching")
    sns.lineplot(df, x="weight_decay", y="permuted_fraction", hue="features", marker="o", ax=axes[1])
    axes[1].set_xscale("symlog", linthresh=0.01)
    axes[1].set_title("fraction of units permuted by weight matching")
    ctx.save_figure(fig, "pcd_vs_weight_decay")


@target(
    "rebasin-mlp-sweeps",
    paper="Git Re-Basin MLP study: PermutationCoordinateDescent and MergeMany sweeps (rebasin MLP results)",
    arxiv="2209.04836",
    claims=(
        "a higher weight decay lowers the loss barrier after permutation coordinate descent",
        "MergeMany works better with a higher weight decay",
        "the merged model never reaches the mean loss of its members",
        "merged models have lower max output and output std than their members",
        "the number of permutations rises with weight decay, then levels off",
    ),
)
def run(ctx: RunContext) -> None:
    """Weight decay × feature size × number of models sweep of weight matching and MergeMany."""
    cfg = SweepConfig.quick() if ctx.quick else SweepConfig()
    if ctx.options.get("dataset") and ctx.options["dataset"] != cfg.dataset:
        cfg = SweepConfig(**{**asdict(cfg), "dataset": ctx.options["dataset"]})
        ctx.variant = cfg.dataset
    ctx.config = asdict(cfg)
    data = load_dataset(cfg.dataset, data_dir=ctx.data_dir)
    jobs = []
    for feats in cfg.features:
        mcfg = {"name": "mlp", "in_features": int(torch.tensor(data.input_shape).prod()),
                "widths": [feats] * cfg.depth, "num_classes": data.num_classes, "bias": True, "norm": "layer"}
        for wd in cfg.weight_decays:
            key = {"target": "rebasin-mlp-sweeps", "model": mcfg, "wd": wd, "cfg": asdict(cfg), "seed": ctx.seed}
            jobs.append((key, {"model_config": mcfg, "wd": wd, "cfg": asdict(cfg), "seed": ctx.seed,
                               "cache_dir": str(ctx.cache_dir), "device": str(ctx.device),
                               "data_dir": str(ctx.data_dir) if ctx.data_dir else None}))
    ctx.log(f"rebasin-mlp-sweeps: {len(jobs)} cells ({len(cfg.features)} feature sizes × "
            f"{len(cfg.weight_decays)} weight decays), executor {ctx.options.get('executor') or 'local'}")
    results = run_jobs(ctx, sweep_cell, jobs)
    cells: dict[tuple[float, int], dict] = {}
    for (key, _), res in zip(jobs, results, strict=True):
        feats, wd = key["model"]["widths"][0], key["wd"]
        cells[wd, feats] = res
        rb = res["pcd"]["model_b_rebasin"]["barriers"]["test_loss_mid"]
        nv = res["pcd"]["model_b"]["barriers"]["test_loss_mid"]
        ratios = ", ".join(f"{m['n_models']}: {m['merged']['loss'] / m['members_mean']['loss']:.2f}"
                           for m in res["merge"])
        ctx.log(f"  features {feats:4d} wd {wd:<5}: test loss barrier naive {nv:.3f} rebasin {rb:.3f}; "
                f"merged/members loss ratio {ratios}")

    pcd_rows, merge_rows = [], []
    for (wd, feats), res in sorted(cells.items()):
        pcd_rows.append({
            "weight_decay": wd, "features": feats,
            "naive_test_loss_barrier": res["pcd"]["model_b"]["barriers"]["test_loss_mid"],
            "rebasin_test_loss_barrier": res["pcd"]["model_b_rebasin"]["barriers"]["test_loss_mid"],
            "naive_train_loss_barrier": res["pcd"]["model_b"]["barriers"]["train_loss_mid"],
            "rebasin_train_loss_barrier": res["pcd"]["model_b_rebasin"]["barriers"]["train_loss_mid"],
            "permuted_units": res["pcd_permuted_units"],
            "permuted_fraction": res["pcd_permuted_units"] / res["units"],
        })
        for m in res["merge"]:
            mg, mm, c = m["merged"], m["members_mean"], m["control"]
            merge_rows.append({
                "weight_decay": wd, "features": feats, "n_models": m["n_models"],
                "merged_loss": mg["loss"], "members_loss": mm["loss"], "control_loss": c["loss"],
                "merged_accuracy": mg["accuracy"], "members_accuracy": mm["accuracy"],
                "loss_ratio_vs_members": mg["loss"] / mm["loss"],
                "accuracy_ratio_vs_members": mg["accuracy"] / mm["accuracy"],
                "loss_ratio_vs_control": mg["loss"] / c["loss"],
                "accuracy_ratio_vs_control": mg["accuracy"] / c["accuracy"],
                "max_output_ratio": mg["max_output"] / mm["max_output"],
                "output_std_ratio": mg["output_std"] / mm["output_std"],
                "permuted_units": m["permuted_units"],
            })
    ctx.write_table("pcd_vs_weight_decay", pcd_rows,
                    title=f"(a, d) Weight matching of model_a and model_b: loss barriers (mid) and permuted units, "
                          f"{cfg.dataset}, MLP {cfg.depth}×features with LayerNorm")
    ctx.write_table("merge_many", merge_rows,
                    title="(b, c) MergeMany: merged model vs its members' mean and vs a control model (test split)")
    _pcd_figures(ctx, cfg, cells, pcd_rows)
    _heatmaps(ctx, cfg, merge_rows)

    # --- claims ----------------------------------------------------------------------------
    wds = sorted(cfg.weight_decays)
    w0, wmid, wmax = wds[0], min(wds, key=lambda w: abs(w - 0.1)), wds[-1]

    def avg(rows, col, **sel):
        return mean_std([r[col] for r in rows if all(r[k] == v for k, v in sel.items())])[0]

    b0, bmid = avg(pcd_rows, "rebasin_test_loss_barrier", weight_decay=w0), avg(
        pcd_rows, "rebasin_test_loss_barrier", weight_decay=wmid)
    ctx.claim("pcd-better-with-wd",
              f"the test loss barrier after weight matching (mean over feature sizes) is lower at weight decay {wmid} "
              f"than at {w0}",
              "at weight decay 0.1 there is no longer a loss barrier; too high a weight decay brings one back",
              "barrier by weight decay: " + ", ".join(
                  f"{w}: {avg(pcd_rows, 'rebasin_test_loss_barrier', weight_decay=w):.3f}" for w in wds),
              bmid < b0)
    r0 = avg(merge_rows, "loss_ratio_vs_control", weight_decay=w0)
    rmax = avg(merge_rows, "loss_ratio_vs_control", weight_decay=wmax)
    ctx.claim("mergemany-better-with-wd",
              f"merged/control loss ratio (mean over feature sizes and model counts) is lower at weight decay {wmax} "
              f"than at {w0}",
              "with high weight decay the merged loss is similar to the control model's, accuracy even higher",
              "loss ratio by weight decay: " + ", ".join(
                  f"{w}: {avg(merge_rows, 'loss_ratio_vs_control', weight_decay=w):.2f}" for w in wds),
              rmax < r0)
    worst = min(r["loss_ratio_vs_members"] for r in merge_rows)
    ctx.claim("merged-above-members-loss", "in every cell the merged loss is above the members' mean loss",
              "the merged model never reaches a loss as low as the average of the models that make it up",
              f"smallest merged/members loss ratio: {worst:.3f}", worst > 1.0)
    mx = avg(merge_rows, "max_output_ratio")
    sd = avg(merge_rows, "output_std_ratio")
    ctx.claim("merged-outputs-flatter", "mean ratios merged/members of max output and of output std are both < 1",
              "max output and std of outputs are lower in the merged model than in its members",
              f"max output ratio {mx:.3f}, output std ratio {sd:.3f}", mx < 1.0 and sd < 1.0)
    fr = [avg(pcd_rows, "permuted_fraction", weight_decay=w) for w in wds]
    rise = fr[min(len(fr) - 1, 1)] - fr[0]
    late = fr[-1] - fr[min(len(fr) - 1, 1)]
    ctx.claim("permutations-rise-then-level",
              "the fraction of permuted units rises from the lowest to the second weight decay more than over all "
              "the higher ones together",
              "the number of permutations rises quickly at low weight decay, then almost levels off",
              "permuted fraction by weight decay: " + ", ".join(f"{w}: {f:.3f}" for w, f in zip(wds, fr, strict=True)),
              rise > 0 and abs(late) < rise)
