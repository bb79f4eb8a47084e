"""Anokhin & Yarotsky 2020, "Low-loss connection of weight vectors: distribution-based approaches".

``anokhin2020-connectors``: the connectors of ``reference/distribution.py`` between pairs of
independently trained dense ReLU networks on MNIST-1D and digits, in the shape of the paper's
Table 1 (one hidden layer of several widths: Linear, Arc, Linear + WA, Arc + WA, OT, OT + WA) and
Table 2 (3-layer networks, two hidden layers: Linear, Arc, Linear/Arc + B-fly, Linear/Arc + WA,
OT + B-fly, OT + WA), each cell the maximum train loss and the maximum test error along the path
(mean ± std over pairs; every path evaluated on a grid of ``points_per_segment`` points per piece, all
points of a path in one batched evaluation), and the WA(n) ensemble table (§6: members sharing the
first layers of a base network) beside the mean single network and the ordinary ensemble.

The tables cover every dataset of the config's ``datasets`` (rows in that order) when the run's
``dataset`` is one of them; a run on another dataset (``--dataset``) covers that dataset alone. Each
path pair and each ensemble is one job; its networks are declared endpoints.

The source available to this suite (the authors' README and code) carries no numbers of the paper's
tables, so each claim (anokhin2020.toml) states the paper's qualitative finding and says so; ours are measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reference.data import load_dataset
from reference.distribution import connection_path, wa_ensemble
from reference.ensembles import ensemble_probs
from reference.evaluate import ensemble_metrics, evaluate_points
from reference.params import stack
from reference.train import TrainConfig

from ..runner import DataRef, Endpoint, Job, JobContext, ModelsArgs, Report, Results, fmt_pm, mean_std, seaborn
from ..runner.context import LoadedData, data_fingerprint
from ..runner.declare import declare

TABLE1 = ("Linear", "Arc", "Linear + WA", "Arc + WA", "OT", "OT + WA")
TABLE2 = ("Linear", "Arc", "Linear + B-fly", "Arc + B-fly", "Linear + WA", "Arc + WA", "OT + B-fly", "OT + WA")
N_TOPS = (1, 2)  # WA(1), WA(2)
NO_ENSEMBLE = "no WA ensemble in this run (ensemble_width is not among deep_widths)"


@dataclass(frozen=True)
class AnokhinConfig:
    dataset: str = "digits"
    seed: int = 0
    datasets: tuple[str, ...] = ("mnist1d", "digits")  # the tables' datasets, in row order (see the docstring)
    one_layer_widths: tuple[int, ...] = (32, 128, 512)
    deep_widths: tuple[int, ...] = (64, 256)  # 3-layer nets: the first hidden layer's width
    deep_second: int | None = None  # the second hidden layer's width; None: the same as the first
    deep_bias: bool = True
    pairs: int = 2
    points_per_segment: int = 11
    ensemble_width: int = 64  # a deep width: WA(1), WA(2) of 3-layer nets
    ensemble_members: int = 5
    train: TrainConfig = TrainConfig.adam(60)


SIZES = {
    "quick": AnokhinConfig(datasets=("digits",), one_layer_widths=(16, 64), deep_widths=(32,), pairs=1,
                           points_per_segment=5, ensemble_width=32, ensemble_members=3,
                           train=TrainConfig.adam(15, lr=2e-3)),
    "cpu": AnokhinConfig(),
    # The authors' code (avecplezir/distribution-based-connectivity: README, models/linear.py, train.py,
    # eval_curve.py commands): CIFAR-10, one-hidden-layer nets LinearOneLayer100/500/1000/2000 (bias) and the
    # 3-layer Linear3NoBias (3072 → 6144 → 2000 → 10, no biases), 400 epochs of SGD, momentum 0.9, lr 0.01,
    # weight decay 1e-4, batch 128. Their schedule (constant for half the epochs, then linear to 1% at 90%)
    # is not among TrainConfig's: cosine is our stand-in; their augmentation (random crop and flip) is not
    # reproduced. Their paths are evaluated at 21 points over 1 or 2 pieces and 31 over 3 pieces; 21 points per
    # piece contains every one of them. WA(1)/WA(2) ensembles of Linear3NoBias as in their eval_ensemble.py
    # commands; the number of members (5) and of pairs (2) are ours. Their MNIST row (LinearOneLayer, 2000
    # hidden units, 30 epochs) is `--dataset mnist --set one_layer_widths=[2000] deep_widths=[] train.epochs=30`.
    # Needs --data-dir with the CIFAR-10 python batches.
    "paper": AnokhinConfig(dataset="cifar10", datasets=("cifar10",), one_layer_widths=(100, 500, 1000, 2000),
                           deep_widths=(6144,), deep_second=2000, deep_bias=False, pairs=2, points_per_segment=21,
                           ensemble_width=6144, ensemble_members=5,
                           train=TrainConfig(epochs=400, batch_size=128, lr=0.01, momentum=0.9, weight_decay=1e-4,
                                             optimizer="sgd", schedule="cosine")),
}


def _model_config(data, widths: list[int], bias: bool = True) -> dict:
    return {"name": "mlp", "in_features": data.in_features, "widths": widths, "num_classes": data.num_classes,
            "bias": bias}


@dataclass(frozen=True)
class PathArgs:
    """One pair a → b of one (dataset, architecture): every method's path on the grid."""

    model: dict
    a: Endpoint
    b: Endpoint
    data: DataRef
    methods: tuple[str, ...]
    pps: int

    @property
    def arch(self) -> str:
        return "1 hidden" if len(self.model["widths"]) == 1 else "3-layer"

    @property
    def width(self) -> int:
        return self.model["widths"][0]


@dataclass(frozen=True)
class EnsembleArgs(ModelsArgs):
    """WA(n) ensembles of the nets (``models``) of one (dataset, 3-layer width): the first one is the base."""

    n_tops: tuple[int, ...]

    @property
    def width(self) -> int:
        return self.model["widths"][0]


def path_job(args: PathArgs, ctx: JobContext) -> dict:
    """Every method's path a → b on the grid and the two endpoints, all stacked: one evaluation per split."""
    data, model = ctx.setup(args)
    a, b = ctx.endpoints([args.a, args.b])
    grids = []
    for method in args.methods:
        path = connection_path(method, a, b, data.x_train)
        tau, pts = path.grid(args.pps)
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
    ctx.log(f"  {args.data.dataset} {args.arch} width {args.width} pair ({args.a.seed}, {args.b.seed}): " + "; ".join(
        f"{m} {max(out[m]['train_loss']):.3f}/{max(out[m]['test_error']):.3f}" for m in args.methods))
    return out


def ensemble_job(args: EnsembleArgs, ctx: JobContext) -> dict:
    data, model = ctx.setup(args)
    nets = ctx.endpoints(args.models)
    x, y = data.x_test, data.y_test
    probs = ensemble_probs(model, stack(nets), x)
    single = [float((p.argmax(-1) != y).double().mean()) for p in probs]
    out = {"single_error": single, "ensemble": ensemble_metrics(probs, y)}
    for n in args.n_tops:
        members = wa_ensemble(nets[0], nets[1:], data.x_train, n)
        pm = ensemble_probs(model, stack(members), x)
        out[f"WA({n})"] = ensemble_metrics(pm, y)
        out[f"WA({n})_members_error"] = [float((p.argmax(-1) != y).double().mean()) for p in pm]
    ctx.log(f"{args.data.dataset} WA ensembles: single {fmt_pm(single)}, " + ", ".join(
        f"WA({n}) {out[f'WA({n})']['error']:.4f}" for n in args.n_tops) + f", ensemble {out['ensemble']['error']:.4f}")
    return out


def _datasets(cfg: AnokhinConfig) -> tuple[str, ...]:
    return tuple(cfg.datasets) if cfg.dataset in cfg.datasets else (cfg.dataset,)


def _loaded(cfg: AnokhinConfig, data, ds: str) -> LoadedData:
    """The runner's loaded data for ``cfg.dataset``; another dataset of the tables is read from the same folder
    and fingerprinted here, so its jobs and endpoints are keyed by its content like the runner's own."""
    if ds == cfg.dataset:
        return data
    d = load_dataset(ds, data_dir=data.ref.data_dir)
    return LoadedData(DataRef(ds, data_fingerprint(d), data.ref.data_dir), d)


def anokhin_jobs(cfg: AnokhinConfig, data) -> list[Job]:
    n_nets = 2 * cfg.pairs
    jobs = []
    for ds in _datasets(cfg):
        d = _loaded(cfg, data, ds)
        ref = d.ref
        archs = [("1 hidden", w, [w], TABLE1, True) for w in cfg.one_layer_widths] + \
                [("3-layer", w, [w, cfg.deep_second or w], TABLE2, cfg.deep_bias) for w in cfg.deep_widths]
        for arch, w, widths, methods, bias in archs:
            mcfg = _model_config(d, widths, bias)
            ens = arch == "3-layer" and w == cfg.ensemble_width
            n = max(n_nets, cfg.ensemble_members) if ens else n_nets
            nets = [Endpoint(mcfg, cfg.train, cfg.seed * 1000 + i, ref) for i in range(n)]
            for i in range(cfg.pairs):
                jobs.append(Job(path_job, PathArgs(mcfg, nets[2 * i], nets[2 * i + 1], ref, methods,
                                                   cfg.points_per_segment)))
            if ens:
                jobs.append(Job(ensemble_job, EnsembleArgs(mcfg, tuple(nets[: cfg.ensemble_members]), ref, N_TOPS)))
    return jobs


def _table_rows(results: list[dict], methods: tuple[str, ...], dataset: str, width: int, arch: str) -> list[dict]:
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


def anokhin_report(cfg: AnokhinConfig, results: Results) -> Report:
    """Tables 1 and 2 (max train loss / test error along each connector) and WA(n) ensembles."""
    rep = Report()
    t1_rows, t2_rows, ens_rows, curves = [], [], [], {}
    groups: dict[tuple, list] = {}  # (dataset, arch, width) → (methods, results), in job order
    ensembles = []
    for args, res in results:
        if isinstance(args, PathArgs):
            groups.setdefault((args.data.dataset, args.arch, args.width), [args.methods, []])[1].append(res)
        elif isinstance(args, EnsembleArgs):
            ensembles.append((args, res))
    for (ds, arch, w), (methods, rs) in groups.items():
        rows = _table_rows(rs, methods, ds, w, arch)
        (t1_rows if arch == "1 hidden" else t2_rows).extend(rows)
        curves[(ds, arch, w)] = rs[0]
        rep.notes.append(f"{ds} {arch} width {w}: " + "; ".join(
            f"{r['method']} {r['max_train_loss_mean']:.3f}/{r['max_test_error_mean']:.3f}" for r in rows))
    for args, r in ensembles:
        ens_rows.append({
            "dataset": args.data.dataset, "arch": f"3-layer {args.width}", "members": len(args.models),
            "single_test_error": fmt_pm(r["single_error"]),
            "single_test_error_mean": mean_std(r["single_error"])[0],
            "WA(1)_test_error": r["WA(1)"]["error"], "WA(2)_test_error": r["WA(2)"]["error"],
            "ensemble_test_error": r["ensemble"]["error"],
            "WA(1)_nll": r["WA(1)"]["nll"], "WA(2)_nll": r["WA(2)"]["nll"],
            "ensemble_nll": r["ensemble"]["nll"],
            "WA(1)_member_error": mean_std(r["WA(1)_members_error"])[0],
            "WA(2)_member_error": mean_std(r["WA(2)_members_error"])[0],
        })
    cols = ["dataset", "arch", "width", "method", "max_train_loss", "max_test_error", "endpoint_train_loss",
            "endpoint_test_error", "pairs"]
    rep.table("table1_one_hidden_layer", t1_rows, cols,
              title=f"Table 1 shape: one-hidden-layer ReLU nets; max train loss and max test error along each "
                    f"path (mean ± std over {cfg.pairs} pair(s); {cfg.points_per_segment} points per piece)")
    if cfg.deep_second is None and cfg.deep_bias:
        layers = "two hidden layers of the given width"
    else:
        layers = (f"two hidden layers: the given width, then {cfg.deep_second or 'the same'}"
                  + ("" if cfg.deep_bias else "; no biases"))
    rep.table("table2_three_layer", t2_rows, cols,
              title=f"Table 2 shape: 3-layer ReLU nets ({layers}); max train loss "
                    f"and max test error along each path (mean ± std over {cfg.pairs} pair(s))")
    rep.table("wa_ensembles", ens_rows,
              ["dataset", "arch", "members", "single_test_error", "WA(1)_test_error", "WA(2)_test_error",
               "ensemble_test_error", "WA(1)_nll", "WA(2)_nll", "ensemble_nll", "WA(1)_member_error",
               "WA(2)_member_error"],
              title="WA(n) ensembles (§6): members share the base network's first layers and keep their own "
                    "last n (the first of them weight-adjusted); test error and NLL of the averaged "
                    "probabilities")
    if curves:
        rep.figure("connector_paths", _figure(curves))
    _claims(rep, cfg, t1_rows, t2_rows, ens_rows)
    return rep


def _cells(rows: list[dict]) -> dict[tuple, dict[str, float]]:
    out: dict[tuple, dict[str, float]] = {}
    for r in rows:
        out.setdefault((r["dataset"], r["width"]), {})[r["method"]] = r["max_train_loss_mean"]
    return out


def _claims(rep: Report, cfg: AnokhinConfig, t1: list[dict], t2: list[dict], ens: list[dict]) -> None:
    c1, c2 = _cells(t1), _cells(t2)

    def count(cells: dict, pred) -> tuple[int, int]:
        return sum(1 for v in cells.values() if pred(v)), len(cells)

    k, n = count(c1, lambda v: v["Arc"] < v["Linear"])
    rep.verdict("arc-below-linear",
                f"{k}/{n} cells; " + "; ".join(f"{d}/{w}: Arc {v['Arc']:.3f} vs Linear {v['Linear']:.3f}"
                                               for (d, w), v in c1.items()), 0 < k == n)
    k, n = count(c1, lambda v: v["Linear + WA"] < v["Linear"] and v["Arc + WA"] < v["Arc"])
    rep.verdict("wa-lowers-loss",
                f"{k}/{n} cells; " + "; ".join(f"{d}/{w}: L+WA {v['Linear + WA']:.3f} vs L {v['Linear']:.3f}, "
                                               f"A+WA {v['Arc + WA']:.3f} vs A {v['Arc']:.3f}"
                                               for (d, w), v in c1.items()), 0 < k == n)
    k, n = count(c1, lambda v: v["OT"] < v["Linear"])
    rep.verdict("ot-below-linear",
                f"{k}/{n} cells; " + "; ".join(f"{d}/{w}: OT {v['OT']:.3f} vs Linear {v['Linear']:.3f}"
                                               for (d, w), v in c1.items()), 0 < k == n)
    k, n = count(c1, lambda v: min(v, key=v.get) == "OT + WA")
    rep.verdict("ot-wa-best-one-layer",
                f"{k}/{n} cells; best per cell: " + "; ".join(f"{d}/{w}: {min(v, key=v.get)} {min(v.values()):.3f}"
                                                              for (d, w), v in c1.items()), 0 < k == n)
    widths = sorted(cfg.one_layer_widths)
    ok, det = [], []
    for ds in _datasets(cfg) if widths else ():
        for m in ("Arc", "OT"):
            lo, hi = c1[(ds, widths[0])][m], c1[(ds, widths[-1])][m]
            ok.append(hi < lo)
            det.append(f"{ds} {m}: {lo:.3f} (w={widths[0]}) → {hi:.3f} (w={widths[-1]})")
    rep.verdict("width-helps", f"{sum(ok)}/{len(ok)}; " + "; ".join(det), bool(ok) and all(ok))
    step = ("Linear + B-fly", "Arc + B-fly", "Linear + WA", "Arc + WA", "OT + B-fly", "OT + WA")
    k, n = count(c2, lambda v: max(v[m] for m in step) < min(v["Linear"], v["Arc"]))
    rep.verdict("stepwise-below-simultaneous",
                f"{k}/{n} cells; " + "; ".join(
                    f"{d}/{w}: worst stepwise {max(v[m] for m in step):.3f} vs min(Linear, Arc) "
                    f"{min(v['Linear'], v['Arc']):.3f}" for (d, w), v in c2.items()), 0 < k == n)
    k, n = count(c2, lambda v: min(v, key=v.get) == "OT + WA")
    rep.verdict("ot-wa-best-deep",
                f"{k}/{n} cells; best per cell: " + "; ".join(f"{d}/{w}: {min(v, key=v.get)} {min(v.values()):.3f}"
                                                              for (d, w), v in c2.items()), 0 < k == n)
    ok = [r["WA(1)_test_error"] < r["single_test_error_mean"] and r["WA(2)_test_error"] < r["single_test_error_mean"]
          for r in ens]
    rep.verdict("wa-ensemble-beats-single",
                "; ".join(f"{r['dataset']}: single {r['single_test_error_mean']:.4f}, "
                          f"WA(1) {r['WA(1)_test_error']:.4f}, WA(2) {r['WA(2)_test_error']:.4f}, "
                          f"ensemble {r['ensemble_test_error']:.4f}" for r in ens) or NO_ENSEMBLE,
                bool(ok) and all(ok))
    ok = [r["WA(1)_test_error"] >= r["WA(2)_test_error"] >= r["ensemble_test_error"] for r in ens]
    rep.verdict("wa-ensemble-order",
                "; ".join(f"{r['dataset']}: {r['WA(1)_test_error']:.4f} ≥ {r['WA(2)_test_error']:.4f} ≥ "
                          f"{r['ensemble_test_error']:.4f}" for r in ens) or NO_ENSEMBLE, bool(ok) and all(ok))


def _figure(curves: dict):
    plt, _, _ = seaborn()
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
    return fig


NAME = declare("anokhin2020-connectors", __file__, config=AnokhinConfig, sizes=SIZES, jobs=anokhin_jobs,
               report=anokhin_report, datasets=("digits", "mnist1d", "mnist", "cifar10"),
               claim_ids=("arc-below-linear", "wa-lowers-loss", "ot-below-linear", "ot-wa-best-one-layer",
                          "width-helps", "stepwise-below-simultaneous", "ot-wa-best-deep", "wa-ensemble-beats-single",
                          "wa-ensemble-order"))
