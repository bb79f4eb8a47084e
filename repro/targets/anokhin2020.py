"""Anokhin & Yarotsky 2020, "Low-loss connection of weight vectors: distribution-based approaches".

``anokhin2020-connectors``: the connectors of ``reference/distribution.py`` between pairs of
independently trained dense ReLU networks on MNIST-1D and digits, in the shape of the paper's
Table 1 (one hidden layer of several widths: Linear, Arc, Linear + WA, Arc + WA, OT, OT + WA) and
Table 2 (3-layer networks, two hidden layers: Linear, Arc, Linear/Arc + B-fly, Linear/Arc + WA,
OT + B-fly, OT + WA), each cell the maximum train loss and the maximum test error along the path
(mean ± std over pairs; every path evaluated on a grid of ``points_per_segment`` points per piece, all
points of a path in one batched evaluation), and the WA(n) ensemble table (§6: members sharing the
first layers of a base network) beside the mean single network and the ordinary ensemble.

The source available to this suite (the authors' README and code) carries no numbers of the paper's
tables, so each claim below states the paper's qualitative finding and says so; ours are measured.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial

import torch

from reference.data import load_dataset
from reference.distribution import connection_path, wa_ensemble
from reference.ensembles import ensemble_probs
from reference.evaluate import ensemble_metrics, evaluate_points
from reference.models import build_model
from reference.params import stack
from reference.train import TrainConfig

from .common import RunContext, fmt_pm, mean_std
from .endpoints import trained_endpoints
from .registry import target

TABLE1 = ("Linear", "Arc", "Linear + WA", "Arc + WA", "OT", "OT + WA")
TABLE2 = ("Linear", "Arc", "Linear + B-fly", "Arc + B-fly", "Linear + WA", "Arc + WA", "OT + B-fly", "OT + WA")
NOTE = "qualitative; the provided source has no table values"


@dataclass(frozen=True)
class AnokhinConfig:
    datasets: tuple[str, ...] = ("mnist1d", "digits")
    one_layer_widths: tuple[int, ...] = (32, 128, 512)
    deep_widths: tuple[int, ...] = (64, 256)  # 3-layer nets: two hidden layers of this width
    pairs: int = 2
    points_per_segment: int = 11
    ensemble_width: int = 64  # a deep width: WA(1), WA(2) of 3-layer nets
    ensemble_members: int = 5
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=60, batch_size=128, lr=1e-3, optimizer="adam", schedule="cosine"))

    @classmethod
    def quick(cls) -> AnokhinConfig:
        return cls(datasets=("digits",), one_layer_widths=(16, 64), deep_widths=(32,), pairs=1,
                   points_per_segment=5, ensemble_width=32, ensemble_members=3,
                   train=TrainConfig(epochs=15, batch_size=128, lr=2e-3, optimizer="adam", schedule="cosine"))


def _model_config(data, widths: list[int]) -> dict:
    return {"name": "mlp", "in_features": int(torch.tensor(data.input_shape).prod()), "widths": widths,
            "num_classes": data.num_classes, "bias": True}


def _path_job(model, a: dict, b: dict, data, methods: tuple[str, ...], pps: int) -> dict:
    """Every method's path a → b on the grid and the two endpoints, all stacked: one evaluation per split."""
    grids = []
    for method in methods:
        path = connection_path(method, a, b, data.x_train)
        tau, pts = path.grid(pps)
        grids.append((method, (tau / path.segments).tolist(), path.segments, pts))
    parts = [pts for *_, pts in grids] + [stack([a, b])]
    allpts = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    tr = evaluate_points(model, allpts, data.x_train, data.y_train)
    te = evaluate_points(model, allpts, data.x_test, data.y_test)
    out, s = {}, 0
    for method, tau, segments, _ in grids:
        sl = slice(s, s + len(tau))
        s += len(tau)
        out[method] = {"tau": tau, "segments": segments,
                       "train_loss": tr.loss[sl].tolist(), "train_error": tr.error[sl].tolist(),
                       "test_loss": te.loss[sl].tolist(), "test_error": te.error[sl].tolist()}
    out["endpoints"] = {"train_loss": tr.loss[s:].tolist(), "test_error": te.error[s:].tolist()}
    return out


def _ensemble_job(model, nets: list[dict], data, n_tops: tuple[int, ...]) -> dict:
    x, y = data.x_test, data.y_test
    probs = ensemble_probs(model, stack(nets), x)
    single = [float((p.argmax(-1) != y).double().mean()) for p in probs]
    out = {"single_error": single, "ensemble": ensemble_metrics(probs, y)}
    for n in n_tops:
        members = wa_ensemble(nets[0], nets[1:], data.x_train, n)
        pm = ensemble_probs(model, stack(members), x)
        out[f"WA({n})"] = ensemble_metrics(pm, y)
        out[f"WA({n})_members_error"] = [float((p.argmax(-1) != y).double().mean()) for p in pm]
    return out


def _table_rows(results: dict, methods: tuple[str, ...], dataset: str, width: int, arch: str) -> list[dict]:
    rows = []
    for m in methods:
        mtl = [max(r[m]["train_loss"]) for r in results]
        mte = [max(r[m]["test_error"]) for r in results]
        rows.append({"dataset": dataset, "arch": arch, "width": width, "method": m,
                     "max_train_loss": fmt_pm(mtl), "max_test_error": fmt_pm(mte),
                     "max_train_loss_mean": mean_std(mtl)[0], "max_test_error_mean": mean_std(mte)[0],
                     "endpoint_train_loss": mean_std([v for r in results for v in r["endpoints"]["train_loss"]])[0],
                     "endpoint_test_error": mean_std([v for r in results for v in r["endpoints"]["test_error"]])[0],
                     "pairs": len(results)})
    return rows


@target(
    "anokhin2020-connectors",
    paper="Anokhin & Yarotsky 2020, Low-loss connection of weight vectors: distribution-based approaches (ICML)",
    arxiv="2008.00741",
    claims=(
        "Arc (Eq. 6) connects with lower loss than the straight line (Eq. 5)",
        "weight adjustment lowers the loss along the path",
        "OT + WA, the method most sensitive to the endpoints' detail, is the most accurate",
        "distribution-based connectors improve with width",
        "stepwise procedures connect deep networks with lower loss than simultaneous Linear / Arc",
        "WA(n) ensembling improves on a single network",
    ),
)
def run(ctx: RunContext) -> None:
    """Tables 1 and 2 (max train loss / test error along each connector) and WA(n) ensembles."""
    cfg = AnokhinConfig.quick() if ctx.quick else AnokhinConfig()
    ctx.config = asdict(cfg)
    n_nets = 2 * cfg.pairs
    t1_rows, t2_rows, ens_rows, curves = [], [], [], {}
    for ds in cfg.datasets:
        data = load_dataset(ds, data_dir=ctx.data_dir).to(ctx.device)
        archs = [("1 hidden", w, [w], TABLE1) for w in cfg.one_layer_widths] + \
                [("3-layer", w, [w, w], TABLE2) for w in cfg.deep_widths]
        for arch, w, widths, methods in archs:
            mcfg = _model_config(data, widths)
            model = build_model(mcfg).to(ctx.device)
            n = max(n_nets, cfg.ensemble_members) if (arch == "3-layer" and w == cfg.ensemble_width) else n_nets
            seeds = [ctx.seed * 1000 + i for i in range(n)]
            nets = [{k: v.to(ctx.device) for k, v in p.items()}
                    for p in trained_endpoints(ctx, mcfg, data, {"dataset": ds}, cfg.train, seeds)]
            results = []
            for i in range(cfg.pairs):
                key = {"target": "anokhin2020-connectors", "job": "paths", "dataset": ds, "model": mcfg,
                       "train": asdict(cfg.train), "seeds": seeds[2 * i: 2 * i + 2], "methods": methods,
                       "pps": cfg.points_per_segment}
                results.append(ctx.job(key, partial(_path_job, model, nets[2 * i], nets[2 * i + 1], data,
                                                    methods, cfg.points_per_segment)))
            rows = _table_rows(results, methods, ds, w, arch)
            (t1_rows if arch == "1 hidden" else t2_rows).extend(rows)
            curves[(ds, arch, w)] = results[0]
            ctx.log(f"{ds} {arch} width {w}: " + "; ".join(
                f"{r['method']} {r['max_train_loss_mean']:.3f}/{r['max_test_error_mean']:.3f}" for r in rows))
            if arch == "3-layer" and w == cfg.ensemble_width:
                key = {"target": "anokhin2020-connectors", "job": "wa-ensemble", "dataset": ds, "model": mcfg,
                       "train": asdict(cfg.train), "seeds": seeds[: cfg.ensemble_members]}
                r = ctx.job(key, partial(_ensemble_job, model, nets[: cfg.ensemble_members], data, (1, 2)))
                ens_rows.append({
                    "dataset": ds, "arch": f"3-layer {w}", "members": cfg.ensemble_members,
                    "single_test_error": fmt_pm(r["single_error"]),
                    "single_test_error_mean": mean_std(r["single_error"])[0],
                    "WA(1)_test_error": r["WA(1)"]["error"], "WA(2)_test_error": r["WA(2)"]["error"],
                    "ensemble_test_error": r["ensemble"]["error"],
                    "WA(1)_nll": r["WA(1)"]["nll"], "WA(2)_nll": r["WA(2)"]["nll"],
                    "ensemble_nll": r["ensemble"]["nll"],
                    "WA(1)_member_error": mean_std(r["WA(1)_members_error"])[0],
                    "WA(2)_member_error": mean_std(r["WA(2)_members_error"])[0],
                })
                ctx.log(f"{ds} WA ensembles: single {ens_rows[-1]['single_test_error']}, WA(1) "
                        f"{r['WA(1)']['error']:.4f}, WA(2) {r['WA(2)']['error']:.4f}, "
                        f"ensemble {r['ensemble']['error']:.4f}")
    cols = ["dataset", "arch", "width", "method", "max_train_loss", "max_test_error", "endpoint_train_loss",
            "endpoint_test_error", "pairs"]
    ctx.write_table("table1_one_hidden_layer", t1_rows, cols,
                    title=f"Table 1 shape: one-hidden-layer ReLU nets; max train loss and max test error along each "
                          f"path (mean ± std over {cfg.pairs} pair(s); {cfg.points_per_segment} points per piece)")
    ctx.write_table("table2_three_layer", t2_rows, cols,
                    title=f"Table 2 shape: 3-layer ReLU nets (two hidden layers of the given width); max train loss "
                          f"and max test error along each path (mean ± std over {cfg.pairs} pair(s))")
    ctx.write_table("wa_ensembles", ens_rows,
                    ["dataset", "arch", "members", "single_test_error", "WA(1)_test_error", "WA(2)_test_error",
                     "ensemble_test_error", "WA(1)_nll", "WA(2)_nll", "ensemble_nll", "WA(1)_member_error",
                     "WA(2)_member_error"],
                    title="WA(n) ensembles (§6): members share the base network's first layers and keep their own "
                          "last n (the first of them weight-adjusted); test error and NLL of the averaged "
                          "probabilities")
    _figure(ctx, curves)
    _claims(ctx, cfg, t1_rows, t2_rows, ens_rows)


def _cells(rows: list[dict]) -> dict[tuple, dict[str, float]]:
    out: dict[tuple, dict[str, float]] = {}
    for r in rows:
        out.setdefault((r["dataset"], r["width"]), {})[r["method"]] = r["max_train_loss_mean"]
    return out


def _claims(ctx: RunContext, cfg: AnokhinConfig, t1: list[dict], t2: list[dict], ens: list[dict]) -> None:
    c1, c2 = _cells(t1), _cells(t2)

    def count(cells: dict, pred) -> tuple[int, int]:
        return sum(1 for v in cells.values() if pred(v)), len(cells)

    k, n = count(c1, lambda v: v["Arc"] < v["Linear"])
    ctx.claim("arc-below-linear", "one hidden layer: Arc's max train loss < Linear's, in every (dataset, width) cell",
              f"Table 1: Arc connects with lower loss than Linear ({NOTE})",
              f"{k}/{n} cells; " + "; ".join(f"{d}/{w}: Arc {v['Arc']:.3f} vs Linear {v['Linear']:.3f}"
                                             for (d, w), v in c1.items()), k == n)
    k, n = count(c1, lambda v: v["Linear + WA"] < v["Linear"] and v["Arc + WA"] < v["Arc"])
    ctx.claim("wa-lowers-loss",
              "one hidden layer: Linear + WA < Linear and Arc + WA < Arc (max train loss), every cell",
              f"Table 1: weight adjustment reduces the loss along the path ({NOTE})",
              f"{k}/{n} cells; " + "; ".join(f"{d}/{w}: L+WA {v['Linear + WA']:.3f} vs L {v['Linear']:.3f}, "
                                             f"A+WA {v['Arc + WA']:.3f} vs A {v['Arc']:.3f}"
                                             for (d, w), v in c1.items()), k == n)
    k, n = count(c1, lambda v: v["OT"] < v["Linear"])
    ctx.claim("ot-below-linear", "one hidden layer: OT's max train loss < Linear's, every cell",
              f"Table 1: pairing units by optimal transport before interpolating helps ({NOTE})",
              f"{k}/{n} cells; " + "; ".join(f"{d}/{w}: OT {v['OT']:.3f} vs Linear {v['Linear']:.3f}"
                                             for (d, w), v in c1.items()), k == n)
    k, n = count(c1, lambda v: min(v, key=v.get) == "OT + WA")
    ctx.claim("ot-wa-best-one-layer", "one hidden layer: OT + WA has the lowest max train loss of the six, every cell",
              f"abstract: accuracy correlates with complexity and sensitivity to the endpoints' detail ({NOTE})",
              f"{k}/{n} cells; best per cell: " + "; ".join(f"{d}/{w}: {min(v, key=v.get)} {min(v.values()):.3f}"
                                                            for (d, w), v in c1.items()), k == n)
    widths = sorted(cfg.one_layer_widths)
    ok, det = [], []
    for ds in cfg.datasets:
        for m in ("Arc", "OT"):
            lo, hi = c1[(ds, widths[0])][m], c1[(ds, widths[-1])][m]
            ok.append(hi < lo)
            det.append(f"{ds} {m}: {lo:.3f} (w={widths[0]}) → {hi:.3f} (w={widths[-1]})")
    ctx.claim("width-helps", f"one hidden layer: Arc and OT max train loss lower at width {widths[-1]} than at "
                             f"{widths[0]}, every dataset",
              f"distribution-based (mean-field) connectors work better for wider nets ({NOTE})",
              f"{sum(ok)}/{len(ok)}; " + "; ".join(det), all(ok))
    step = ("Linear + B-fly", "Arc + B-fly", "Linear + WA", "Arc + WA", "OT + B-fly", "OT + WA")
    k, n = count(c2, lambda v: max(v[m] for m in step) < min(v["Linear"], v["Arc"]))
    ctx.claim("stepwise-below-simultaneous",
              "3-layer nets: every stepwise method (B-fly, WA, OT) < min(Linear, Arc) in max train loss, every cell",
              f"Table 2: stepwise procedures connect deep nets far better than simultaneous ones ({NOTE})",
              f"{k}/{n} cells; " + "; ".join(
                  f"{d}/{w}: worst stepwise {max(v[m] for m in step):.3f} vs min(Linear, Arc) "
                  f"{min(v['Linear'], v['Arc']):.3f}" for (d, w), v in c2.items()), k == n)
    k, n = count(c2, lambda v: min(v, key=v.get) == "OT + WA")
    ctx.claim("ot-wa-best-deep", "3-layer nets: OT + WA has the lowest max train loss of the eight, every cell",
              f"Table 2: OT + WA is the most accurate connector ({NOTE})",
              f"{k}/{n} cells; best per cell: " + "; ".join(f"{d}/{w}: {min(v, key=v.get)} {min(v.values()):.3f}"
                                                            for (d, w), v in c2.items()), k == n)
    ok = [r["WA(1)_test_error"] < r["single_test_error_mean"] and r["WA(2)_test_error"] < r["single_test_error_mean"]
          for r in ens]
    ctx.claim("wa-ensemble-beats-single", "WA(1) and WA(2) ensembles have lower test error than the mean single net",
              f"§6: WA ensembling improves on a single network ({NOTE})",
              "; ".join(f"{r['dataset']}: single {r['single_test_error_mean']:.4f}, WA(1) {r['WA(1)_test_error']:.4f}, "
                        f"WA(2) {r['WA(2)_test_error']:.4f}, ensemble {r['ensemble_test_error']:.4f}" for r in ens),
              all(ok))
    ok = [r["WA(1)_test_error"] >= r["WA(2)_test_error"] >= r["ensemble_test_error"] for r in ens]
    ctx.claim("wa-ensemble-order", "test error WA(1) ≥ WA(2) ≥ ordinary ensemble (more member-specific layers, "
                                   "more diversity)",
              f"§6: WA(n) trades ensemble gain for a shared trunk ({NOTE})",
              "; ".join(f"{r['dataset']}: {r['WA(1)_test_error']:.4f} ≥ {r['WA(2)_test_error']:.4f} ≥ "
                        f"{r['ensemble_test_error']:.4f}" for r in ens), all(ok))


def _figure(ctx: RunContext, curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = []
    for arch in ("1 hidden", "3-layer"):
        ks = [k for k in curves if k[1] == arch]
        if ks:
            keys.append(max(ks, key=lambda k: (k[0] == ks[0][0], k[2])))
    fig, axes = plt.subplots(2, len(keys), figsize=(6.5 * len(keys), 7), squeeze=False)
    for j, k in enumerate(keys):
        res = curves[k]
        for m, r in res.items():
            if m == "endpoints":
                continue
            axes[0, j].plot(r["tau"], r["train_loss"], marker=".", label=m)
            axes[1, j].plot(r["tau"], r["test_error"], marker=".", label=m)
        axes[0, j].set_title(f"{k[0]}, {k[1]} width {k[2]}: train loss")
        axes[1, j].set_title("test error")
        axes[1, j].set_xlabel("path time / number of pieces")
        axes[0, j].set_yscale("log")
        axes[0, j].legend(fontsize=7)
    ctx.save_figure(fig, "connector_paths")
