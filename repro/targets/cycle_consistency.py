"""Cycle consistency of permutation alignment across n models (Git Re-Basin issue; the permuted-simplex note).

``cycle-consistency``: n = 3 … 8 independently trained MLPs on digits, aligned five ways:
- **pairwise**: weight matching of every pair on its own (P_ij = WM(θ_i, θ_j));
- **MergeMany** (Ainsworth et al. 2023, Alg. 3): every model mapped to the merged model, P_ij = U_i⁻¹ ∘ U_j;
- **universe** (permutation synchronisation of the pairwise maps, Pachauri et al. 2013);
- **sync-ascent** (the same pairwise maps synchronised by coordinate ascent of their agreement,
  ``reference.universe.sync_ascent``);
- **c2m3** (Crisostomi et al. 2024: Frank–Wolfe over all pairs' weight-matching objective in one universe,
  ``reference.universe.frank_wolfe_universe``).
Per method: the non-transitivity fraction (units where P_ik ≠ P_ij ∘ P_jk, over triples), the loss
barrier of θ_i against θ_i pushed around the cycle i → j → k → i, the mean loss barrier of the
aligned pairs (what consistency costs), and the accuracy of the merged model (pairwise: every model
aligned to model 0 and averaged).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from reference.barrier import mid_loss_barriers
from reference.evaluate import evaluate_points
from reference.matching import weight_matching
from reference.merge import merge_many, pairwise_from_universe, universe_alignment
from reference.params import combine, stack
from reference.specs import spec_for
from reference.train import TrainConfig

from ..runner import CycleSettings, Endpoint, Job, JobContext, ModelsArgs, Report, Results, fmt_pm, mean_std, seaborn
from ..runner.declare import declare

METHODS = ("pairwise", "mergemany", "universe", "sync-ascent", "c2m3")


@dataclass(frozen=True)
class CycleConfig:
    dataset: str = "digits"
    seed: int = 0
    widths: tuple[int, ...] = (128, 128, 128)
    ns: tuple[int, ...] = (3, 4, 5, 6, 7, 8)
    cycles: CycleSettings = CycleSettings(grid=17, max_triples=10, max_pairs=10)
    train: TrainConfig = TrainConfig.adam(40)


SIZES = {
    "quick": CycleConfig(ns=(3, 4), cycles=CycleSettings(grid=9, max_triples=4, max_pairs=4),
                         train=TrainConfig.adam(20)),
    "cpu": CycleConfig(),
    # Git Re-Basin's MergeMany experiment (Ainsworth et al. 2023, Alg. 3; the authors' src/mnist_mlp_wm_many.py):
    # 32 MNIST MLPs with 3 hidden layers of 512 ReLU units, each trained with Adam, lr 1e-3, 100 epochs, batch 500
    # (no schedule), then merged by MergeMany. Difference: their models each see a random half of the training set;
    # ours all see all of it (the endpoints differ by their seed only). The n sweep up to their 32 models, the 25
    # interpolation points (as their src/mnist_mlp_weight_matching.py) and max_triples / max_pairs are our choice.
    # Needs --data-dir with the MNIST IDX files.
    "paper": CycleConfig(dataset="mnist", widths=(512, 512, 512), ns=(3, 4, 8, 16, 32),
                         cycles=CycleSettings(grid=25, max_triples=10, max_pairs=10),
                         train=TrainConfig(epochs=100, batch_size=500, lr=1e-3, optimizer="adam", schedule="constant")),
}


def _maps(method: str, spec, models: list, seed: int) -> tuple[dict, dict]:
    """All P_ij (i ≠ j) of a method, and its merged model."""
    n = len(models)
    if method == "pairwise":
        P = {}
        for i, j in itertools.combinations(range(n), 2):
            P[i, j] = weight_matching(spec, models[i], models[j], seed=seed).perm
            P[j, i] = P[i, j].inverse()
        merged = combine([1.0 / n] * n, [models[0]] + [P[0, j].apply(spec, models[j]) for j in range(1, n)])
        return P, merged
    if method == "mergemany":
        r = merge_many(spec, models, seed=seed)
        us, merged = r.perms, r.merged
    else:
        u = universe_alignment(spec, models, method="sync" if method == "universe" else method, seed=seed)
        us = u.to_universe
        merged = combine([1.0 / n] * n, [U.apply(spec, m) for U, m in zip(us, models, strict=True)])
    P = {(i, j): pairwise_from_universe(us, i, j) for i in range(n) for j in range(n) if i != j}
    return P, merged


@dataclass(frozen=True)
class CycleArgs(ModelsArgs):
    """The first n trained models (n = len(models)), aligned three ways."""

    cycles: CycleSettings
    seed: int  # seeds weight matching, MergeMany and the universe alignment


def cycle_job(args: CycleArgs, ctx: JobContext) -> dict:
    data, model = ctx.setup(args)
    spec = spec_for(model)
    models = ctx.endpoints(args.models)
    x, y = data.x_train, data.y_train
    n = len(models)
    out = {}
    triples = list(itertools.combinations(range(n), 3))
    pairs = list(itertools.combinations(range(n), 2))
    for method in METHODS:
        P, merged = _maps(method, spec, models, args.seed)
        fr = []
        for i, j, k in triples:
            comp = P[i, j].compose(P[j, k])
            diff = sum(int((comp[g] != P[i, k][g]).sum()) for g in spec.sizes)
            fr.append(diff / sum(spec.sizes.values()))
        cyc_pairs = [(models[i], P[i, j].compose(P[j, k]).compose(P[i, k].inverse()).apply(spec, models[i]))
                     for i, j, k in triples[: args.cycles.max_triples]]
        al_pairs = [(models[i], P[i, j].apply(spec, models[j])) for i, j in pairs[: args.cycles.max_pairs]]
        m = evaluate_points(model, stack([merged]), data.x_test, data.y_test)
        out[method] = {
            "nontransitivity": fr,
            "cycle_barrier": mid_loss_barriers(model, cyc_pairs, x, y, args.cycles.grid),
            "pair_barrier": mid_loss_barriers(model, al_pairs, x, y, args.cycles.grid),
            "merged_test_accuracy": float(m.accuracy[0]), "merged_test_loss": float(m.loss[0]),
        }
    members = evaluate_points(model, stack(models), data.x_test, data.y_test)
    out["members_test_accuracy"] = float(members.accuracy.mean())
    ctx.log(f"  n={n}: " + "; ".join(
        f"{m} non-transitive {mean_std(out[m]['nontransitivity'])[0]:.3f}, merged acc "
        f"{out[m]['merged_test_accuracy']:.3f}" for m in METHODS))
    return out


def jobs(cfg: CycleConfig, data) -> list[Job]:
    mcfg = {"name": "mlp", "in_features": data.in_features, "widths": list(cfg.widths),
            "num_classes": data.num_classes, "bias": True}
    seeds = [cfg.seed * 1000 + i for i in range(max(cfg.ns))]
    eps = tuple(Endpoint(mcfg, cfg.train, s, data.ref) for s in seeds)
    return [Job(cycle_job, CycleArgs(mcfg, eps[:n], data.ref, cfg.cycles, cfg.seed))
            for n in cfg.ns]


def report(cfg: CycleConfig, results: Results) -> Report:
    """Pairwise vs MergeMany vs universe alignment of n = 3 … 8 MLPs."""
    rep = Report()
    rows = []
    ns = []
    for args, res in results.of(CycleArgs):
        n = len(args.models)
        ns.append(n)
        for method in METHODS:
            r = res[method]
            rows.append({"n": n, "method": method,
                         "nontransitivity": mean_std(r["nontransitivity"])[0],
                         "cycle_barrier": fmt_pm(r["cycle_barrier"]),
                         "cycle_barrier_mean": mean_std(r["cycle_barrier"])[0],
                         "pair_barrier": fmt_pm(r["pair_barrier"]),
                         "pair_barrier_mean": mean_std(r["pair_barrier"])[0],
                         "merged_test_accuracy": r["merged_test_accuracy"],
                         "merged_test_loss": r["merged_test_loss"],
                         "members_test_accuracy": res["members_test_accuracy"]})
    rep.table("cycle_consistency", rows,
              ["n", "method", "nontransitivity", "cycle_barrier", "pair_barrier", "merged_test_accuracy",
               "merged_test_loss", "members_test_accuracy"],
              title=f"Alignment of n {cfg.dataset} MLPs {list(cfg.widths)}: non-transitivity (fraction of units, "
                    f"over triples), train-loss barriers (mid) of the cycle and of aligned pairs, merged model")
    rep.figure("cycle_consistency", _figure(rows))

    def sel(method: str, col: str) -> list[float]:
        return [r[col] for r in rows if r["method"] == method]

    pw = sel("pairwise", "nontransitivity")
    rep.verdict("pairwise-not-transitive", "mean non-transitive fraction by n: " + ", ".join(
        f"{n}: {f:.3f}" for n, f in zip(ns, pw, strict=True)), min(pw) > 0)
    joint = [m for m in METHODS if m != "pairwise"]
    un = [v for m in joint for v in sel(m, "nontransitivity")]
    cb = [v for m in joint for v in sel(m, "cycle_barrier_mean")]
    rep.verdict("universe-consistent", f"max non-transitivity {max(un):.3g}, max cycle barrier {max(cb):.3g}",
                max(un) == 0 and max(abs(c) for c in cb) < 1e-6)
    nmax = max(ns)
    acc = {m: [r["merged_test_accuracy"] for r in rows if r["method"] == m and r["n"] == nmax][0] for m in METHODS}
    rep.verdict("joint-merge-better", f"n = {nmax}: " + ", ".join(f"{m}: {a:.3f}" for m, a in acc.items()),
                acc["mergemany"] > acc["pairwise"])
    return rep


def _figure(rows: list[dict]):
    plt, pd, sns = seaborn()
    df = pd.DataFrame(rows)
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for ax, col, label in zip(axes, ("nontransitivity", "cycle_barrier_mean", "pair_barrier_mean",
                                     "merged_test_accuracy"),
                              ("non-transitive fraction", "cycle train-loss barrier", "aligned-pair barrier",
                               "merged test accuracy"), strict=True):
        sns.lineplot(df, x="n", y=col, hue="method", marker="o", ax=ax)
        ax.set_title(label)
    return fig


CYCLE = declare("cycle-consistency", __file__, config=CycleConfig, sizes=SIZES, jobs=jobs, report=report,
                datasets=("digits", "mnist1d", "mnist", "cifar10"),
                claim_ids=("pairwise-not-transitive", "universe-consistent", "joint-merge-better"))
