"""Joint alignment and merging of n models: C2M3 against pairwise, star, MergeMany and synchronisation.

``c2m3-merging`` (Crisostomi et al., NeurIPS 2024, "C2M3: Cycle-Consistent Multi-Model Merging",
arXiv:2405.17897): for n = 2 … 8 independently trained MLPs (and n = 2 … 4 small BatchNorm ResNets),
in ``replicates`` independent sets of models, six ways to align them:

- **pairwise**: weight matching of every pair on its own (P_ij = WM(θ_i, θ_j)), not cycle-consistent;
  its merge aligns every model to model 0;
- **star**: P_0j = WM(θ_0, θ_j), every other pair routed through model 0 (consistent by construction);
- **mergemany** (Ainsworth et al. 2023, Alg. 3);
- **sync**: the pairwise maps synchronised spectrally (Pachauri et al. 2013; ``reference.merge.permutation_sync``);
- **sync-ascent**: the same pairwise maps synchronised by coordinate ascent of their agreement
  (``reference.universe.sync_ascent``, started from the spectral solution);
- **c2m3**: Frank–Wolfe over all pairs' weight-matching objective in one universe
  (``reference.universe.frank_wolfe_universe``, identity start as the paper).

Per method: the non-transitive fraction (units where P_ik ≠ P_ij ∘ P_jk, over triples), the train-loss
barrier (mid) of θ_i against θ_i pushed around the cycle i → j → k → i, the mean barrier of aligned pairs,
the all-pairs objective Σ_{i<j} ⟨θ_i, P_ij(θ_j)⟩, the agreement with the pairwise and with the star's
maps, the alignment's wall time, and the merged model (the mean of the aligned models) on the test set
without and with repair (REPAIR for the MLPs, a BatchNorm reset for the ResNets). C2M3's objective per
iteration goes in its own table.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

from reference.barrier import mid_loss_barriers
from reference.bn import has_batchnorm, recompute_bn_stats_batched
from reference.evaluate import evaluate_points
from reference.matching import weight_matching
from reference.merge import merge_many, pairwise_from_universe, permutation_sync, repair
from reference.params import combine, stack
from reference.permutation import Permutation
from reference.specs import spec_for
from reference.train import TrainConfig
from reference.universe import (
    all_pairs_objective,
    frank_wolfe_universe,
    pairwise_agreement,
    star_agreement,
    sync_ascent,
)

from ..runner import CycleSettings, Endpoint, Job, JobContext, ModelsArgs, Report, Results, fmt_pm, mean_std, seaborn
from ..runner.declare import declare

METHODS = ("pairwise", "star", "mergemany", "sync", "sync-ascent", "c2m3")
CONSISTENT = METHODS[1:]


@dataclass(frozen=True)
class C2M3Config:
    dataset: str = "digits"
    seed: int = 0
    replicates: int = 3
    widths: tuple[int, ...] = (128, 128, 128)
    ns: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    resnet_ns: tuple[int, ...] = (2, 3, 4)  # () : no ResNet rows
    resnet_depth: int = 8
    resnet_base: int = 8
    cycles: CycleSettings = CycleSettings(grid=17, max_triples=10, max_pairs=10)
    fw_iters: int = 100
    repair_examples: int = 1000
    train: TrainConfig = TrainConfig.adam(40)
    resnet_train: TrainConfig = TrainConfig.adam(20)


SIZES = {
    "quick": C2M3Config(replicates=2, ns=(2, 3, 4), resnet_ns=(2, 3),
                        cycles=CycleSettings(grid=9, max_triples=4, max_pairs=4), fw_iters=30, repair_examples=500,
                        train=TrainConfig.adam(15),
                        resnet_train=TrainConfig.adam(8)),
    "cpu": C2M3Config(),
    # MNIST MLPs of 3 × 512 units trained with Git Re-Basin's MNIST recipe (src/mnist_mlp_train.py: Adam,
    # lr 1e-3, batch 500, 100 epochs). C2M3's own training recipe, model sizes and number of models per set have
    # not been checked against the paper's PDF, so this size is Git Re-Basin's setting, not C2M3's; its
    # ResNet-20 / CIFAR-10 rows are not reproduced here. Needs --data-dir with the MNIST IDX files.
    "paper": C2M3Config(dataset="mnist", widths=(512, 512, 512), ns=(2, 3, 4, 5), resnet_ns=(),
                        cycles=CycleSettings(grid=25, max_triples=10, max_pairs=10), fw_iters=300, repair_examples=5000,
                        train=TrainConfig(epochs=100, batch_size=500, lr=1e-3, optimizer="adam", schedule="constant")),
}


@dataclass(frozen=True)
class MergeArgs(ModelsArgs):
    """The first n models of replicate ``replicate`` of one architecture, aligned six ways."""

    arch: str  # "mlp" or "resnet"
    view: tuple[int, ...] | None
    replicate: int
    cycles: CycleSettings
    fw_iters: int
    repair_examples: int
    seed: int  # seeds weight matching and MergeMany


def _evaluate(model, pts: list[dict], x, y, bn_x) -> object:
    st = stack(pts)
    if has_batchnorm(model):
        st = recompute_bn_stats_batched(model, st, bn_x)
    return evaluate_points(model, st, x, y)


class _Paths:
    """The barrier paths of one job, each asked for as (model i, model j, P) — the path θ_i → P(θ_j) —
    and each distinct one evaluated once: the six methods share many maps (star's P_0j are pairwise's,
    sync often returns the pairwise maps, and every cycle of a consistent method is the identity), and
    about half of the paths asked for repeat one already asked for. ``ask`` returns a handle into the list
    ``barriers`` returns."""

    def __init__(self, spec, models: list) -> None:
        self.spec, self.models = spec, models
        self.index: dict[tuple, int] = {}
        self.pairs: list[tuple[dict, dict]] = []

    def ask(self, i: int, j: int, P: Permutation) -> int:
        key = (i, j, *(P[g].numpy().tobytes() for g in sorted(self.spec.sizes)))
        if key not in self.index:
            self.index[key] = len(self.pairs)
            self.pairs.append((self.models[i], P.apply(self.spec, self.models[j])))
        return self.index[key]

    def barriers(self, model, x, y, grid: int, per_call: int) -> list[float]:
        """Every distinct path's barrier, ``per_call`` paths per evaluation (the points of one call are
        held at once)."""
        return [b for s in range(0, len(self.pairs), per_call)
                for b in mid_loss_barriers(model, self.pairs[s : s + per_call], x, y, grid)]


def _universes(spec, models: list, seed: int, fw_iters: int) -> tuple[dict, dict, dict, dict]:
    """(universe maps per consistent method, pairwise maps P_ij for i < j, seconds per method, info)."""
    n = len(models)
    secs: dict[str, float] = {}
    t0 = time.perf_counter()
    pw = {(i, j): weight_matching(spec, models[i], models[j], seed=seed).perm
          for i, j in itertools.combinations(range(n), 2)}
    secs["pairwise"] = time.perf_counter() - t0
    star_secs = secs["pairwise"] * (n - 1) / max(1, len(pw))  # the star is the pairs (0, j)
    us: dict[str, list[Permutation]] = {"star": [Permutation.identity(spec)] + [pw[0, j] for j in range(1, n)]}
    secs["star"] = star_secs
    t0 = time.perf_counter()
    mm = merge_many(spec, models, seed=seed)
    us["mergemany"] = list(mm.perms)
    secs["mergemany"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    us["sync"] = permutation_sync(pw, n, spec)
    secs["sync"] = secs["pairwise"] + time.perf_counter() - t0
    t0 = time.perf_counter()
    us["sync-ascent"], ascent = sync_ascent(pw, n, spec, init=us["sync"], seed=seed)
    secs["sync-ascent"] = secs["sync"] + time.perf_counter() - t0
    r = frank_wolfe_universe(spec, models, max_iter=fw_iters)
    us["c2m3"] = list(r.to_universe)
    secs["c2m3"] = r.seconds
    info = {"mergemany_sweeps": mm.sweeps, "ascent_history": list(ascent),
            "c2m3": {"history": list(r.history), "projected": list(r.projected), "gaps": list(r.gaps),
                     "steps": list(r.steps), "best_iter": r.best_iter, "converged": r.converged,
                     "iterations": r.iterations}}
    return us, pw, secs, info


def merge_job(args: MergeArgs, ctx: JobContext) -> dict:
    data, model = ctx.setup(args)
    spec = spec_for(model)
    models = ctx.endpoints(args.models)
    x, y = data.x_train, data.y_train
    x_rep = x[: args.repair_examples]
    n = len(models)
    us, pw, secs, info = _universes(spec, models, args.seed, args.fw_iters)
    star = us["star"][1:]
    pw_obj = sum(all_pairs_objective(spec, [models[i], models[j]], [Permutation.identity(spec), P])
                 for (i, j), P in pw.items())
    triples = list(itertools.combinations(range(n), 3))
    pairs = list(itertools.combinations(range(n), 2))
    units = sum(spec.sizes.values())
    out: dict = {"info": info}
    paths = _Paths(spec, models)
    asked: dict[str, tuple[list[int], list[int]]] = {}
    for method in METHODS:
        if method == "pairwise":
            P = {**pw, **{(j, i): p.inverse() for (i, j), p in pw.items()}}
            aligned = [models[0]] + [P[0, j].apply(spec, models[j]) for j in range(1, n)]
            obj = pw_obj
            agree, star_agree = 1.0, 1.0
        else:
            U = us[method]
            P = {(i, j): pairwise_from_universe(U, i, j) for i in range(n) for j in range(n) if i != j}
            aligned = [pairwise_from_universe(U, 0, i).apply(spec, models[i]) for i in range(n)]
            obj = all_pairs_objective(spec, models, U)
            agree, star_agree = pairwise_agreement(U, pw), star_agreement(U, star)
        fr = [sum(int((P[i, j].compose(P[j, k])[g] != P[i, k][g]).sum()) for g in spec.sizes) / units
              for i, j, k in triples]
        asked[method] = ([paths.ask(i, i, P[i, j].compose(P[j, k]).compose(P[i, k].inverse()))
                          for i, j, k in triples[: args.cycles.max_triples]],
                         [paths.ask(i, j, P[i, j]) for i, j in pairs[: args.cycles.max_pairs]])
        merged = combine([1.0 / n] * n, aligned)
        repaired = repair(model, aligned, [1.0 / n] * n, x_rep, spec=spec)
        m = evaluate_points(model, stack([merged, repaired]), data.x_test, data.y_test)
        out[method] = {
            "nontransitivity": fr,
            "objective": obj, "agreement": agree, "star_agreement": star_agree, "seconds": secs[method],
            "merged_test_accuracy": float(m.accuracy[0]), "merged_test_loss": float(m.loss[0]),
            "repaired_test_accuracy": float(m.accuracy[1]), "repaired_test_loss": float(m.loss[1]),
        }
    barrier = paths.barriers(model, x, y, args.cycles.grid, max(args.cycles.max_triples, args.cycles.max_pairs, 1))
    for method, (cycles, aligned_pairs) in asked.items():
        out[method]["cycle_barrier"] = [barrier[h] for h in cycles]
        out[method]["pair_barrier"] = [barrier[h] for h in aligned_pairs]
    members = _evaluate(model, models, data.x_test, data.y_test, x)
    out["members_test_accuracy"] = float(members.accuracy.mean())
    ctx.log(f"  {args.arch} rep {args.replicate} n={n}: repaired merged acc " + ", ".join(
        f"{m} {out[m]['repaired_test_accuracy']:.3f}" for m in METHODS)
        + f"; C2M3 {info['c2m3']['iterations']} it, {secs['c2m3']:.1f} s")
    return out


def _arch_models(cfg: C2M3Config, data) -> list[tuple[str, dict, tuple[int, ...] | None, TrainConfig, tuple]]:
    n_in = data.in_features
    mlp = {"name": "mlp", "in_features": n_in, "widths": list(cfg.widths), "num_classes": data.num_classes,
           "bias": True}
    out = [("mlp", mlp, None, cfg.train, cfg.ns)]
    if cfg.resnet_ns:
        res = {"name": "resnet", "in_channels": 1, "num_classes": data.num_classes, "depth": cfg.resnet_depth,
               "width": 1, "norm": "batch", "groups": 2, "dims": 1, "base": cfg.resnet_base}
        view: tuple[int, ...] | None = (1, n_in)
        if len(data.input_shape) == 3:  # images: a 2-D ResNet on the images as they are
            res = {**res, "in_channels": data.input_shape[0], "dims": 2}
            view = None
        out.append(("resnet", res, view, cfg.resnet_train, cfg.resnet_ns))
    return out


def jobs(cfg: C2M3Config, data) -> list[Job]:
    out = []
    for arch, mcfg, view, train, ns in _arch_models(cfg, data):
        for r in range(cfg.replicates):
            # replicate 0 of the MLP uses cycle-consistency's seeds, so those endpoints are shared
            seeds = [cfg.seed * 1000 + r * 100 + i for i in range(max(ns))]
            eps = tuple(Endpoint(mcfg, train, s, data.ref, view) for s in seeds)
            out += [Job(merge_job, MergeArgs(mcfg, eps[:n], data.ref, arch, view, r, cfg.cycles, cfg.fw_iters,
                                             cfg.repair_examples, cfg.seed + r))
                    for n in ns]
    return out


COLUMNS = ["arch", "n", "method", "nontransitivity", "cycle_barrier", "pair_barrier", "objective_rel",
           "agreement", "star_agreement", "seconds", "merged_test_accuracy", "repaired_test_accuracy",
           "repaired_test_loss", "members_test_accuracy", "replicates"]


def report(cfg: C2M3Config, results: Results) -> Report:
    """Six alignments of n models: consistency, barriers, all-pairs objective, merged models."""
    rep = Report()
    by: dict[tuple[str, int], list[dict]] = {}
    for args, res in results.of(MergeArgs):
        by.setdefault((args.arch, len(args.models)), []).append(res)
    rows, iters = [], []
    for (arch, n), reps in sorted(by.items()):
        base = [r["pairwise"]["objective"] for r in reps]
        for method in METHODS:
            rs = [r[method] for r in reps]

            def pool(col: str, rs=rs) -> list[float]:
                return [v for r in rs for v in r[col]]

            def each(col: str, rs=rs) -> list[float]:
                return [r[col] for r in rs]

            rel = [r["objective"] / b for r, b in zip(rs, base, strict=True)]
            rows.append({
                "arch": arch, "n": n, "method": method,
                "nontransitivity": mean_std(pool("nontransitivity"))[0] if n >= 3 else float("nan"),
                "cycle_barrier": fmt_pm(pool("cycle_barrier")) if n >= 3 else "",
                "cycle_barrier_mean": mean_std(pool("cycle_barrier"))[0] if n >= 3 else float("nan"),
                "pair_barrier": fmt_pm([mean_std(r["pair_barrier"])[0] for r in rs]),
                "pair_barrier_mean": mean_std([mean_std(r["pair_barrier"])[0] for r in rs])[0],
                "objective_rel": fmt_pm(rel, 4), "objective_rel_mean": mean_std(rel)[0],
                "agreement": mean_std(each("agreement"))[0],
                "star_agreement": mean_std(each("star_agreement"))[0],
                "seconds": mean_std(each("seconds"))[0],
                "merged_test_accuracy": fmt_pm(each("merged_test_accuracy")),
                "repaired_test_accuracy": fmt_pm(each("repaired_test_accuracy")),
                "repaired_test_accuracy_mean": mean_std(each("repaired_test_accuracy"))[0],
                "repaired_test_loss": fmt_pm(each("repaired_test_loss")),
                "members_test_accuracy": mean_std([r["members_test_accuracy"] for r in reps])[0],
                "replicates": len(reps),
            })
        for rep_i, r in enumerate(reps):
            c = r["info"]["c2m3"]
            for it, (h, p) in enumerate(zip(c["history"], c["projected"], strict=True)):
                iters.append({"arch": arch, "n": n, "replicate": rep_i, "iteration": it, "relaxed_objective": h,
                              "projected_objective": p, "gap": c["gaps"][it - 1] if 0 < it <= len(c["gaps"]) else "",
                              "step": c["steps"][it - 1] if it > 0 else ""})
    archs = sorted({r["arch"] for r in rows})
    rep.table("c2m3_merging", rows, COLUMNS,
              title=f"Alignment of n {cfg.dataset} models ({', '.join(archs)}; MLP {list(cfg.widths)}), mean ± std "
                    f"over {cfg.replicates} replicate sets: non-transitive fraction, train-loss barriers (mid) of the "
                    "cycle and of aligned pairs, all-pairs objective relative to pairwise matching's, agreement with "
                    "the pairwise / star maps, alignment seconds, merged model (test) plain and repaired")
    rep.table("c2m3_iterations", iters,
              ["arch", "n", "replicate", "iteration", "relaxed_objective", "projected_objective", "gap", "step"],
              title="C2M3's Frank–Wolfe: relaxed objective, objective of the iterate projected to permutations, "
                    "duality gap and step, per iteration")
    rep.figure("c2m3_merging", _figure(rows))
    rep.figure("c2m3_iterations", _iter_figure(iters))

    def sel(arch: str, method: str, col: str, nmin: int = 2) -> list[tuple[int, float]]:
        return [(r["n"], r[col]) for r in rows if r["arch"] == arch and r["method"] == method and r["n"] >= nmin]

    pw = [v for a in archs for _, v in sel(a, "pairwise", "nontransitivity", 3)]
    pcb = [v for a in archs for _, v in sel(a, "pairwise", "cycle_barrier_mean", 3)]
    rep.verdict("pairwise-cycle-not-identity",
                f"pairwise: non-transitive fraction {min(pw):.3f} … {max(pw):.3f}, cycle barrier "
                f"{min(pcb):.3f} … {max(pcb):.3f} (over arch and n ≥ 3)", min(pw) > 0 and min(pcb) > 0)
    cn = [v for a in archs for _, v in sel(a, "c2m3", "nontransitivity", 3)]
    ccb = [v for a in archs for _, v in sel(a, "c2m3", "cycle_barrier_mean", 3)]
    rep.verdict("c2m3-cycle-consistent", f"C2M3: max non-transitivity {max(cn):.3g}, max |cycle barrier| "
                f"{max(abs(c) for c in ccb):.3g}", max(cn) == 0 and max(abs(c) for c in ccb) < 1e-6)
    parts, held_mm, held_star = [], True, True
    for a in archs:
        nmax = max(n for n, _ in sel(a, "c2m3", "repaired_test_accuracy_mean"))
        acc = {m: dict(sel(a, m, "repaired_test_accuracy_mean"))[nmax] for m in ("c2m3", "mergemany", "star")}
        parts.append(f"{a} n = {nmax}: C2M3 {acc['c2m3']:.3f}, MergeMany {acc['mergemany']:.3f}, "
                     f"star {acc['star']:.3f}")
        held_mm &= acc["c2m3"] >= acc["mergemany"]
        held_star &= acc["c2m3"] > acc["star"]
    rep.verdict("c2m3-merge-vs-mergemany", "repaired merged test accuracy, " + "; ".join(parts), held_mm)
    rep.verdict("c2m3-merge-vs-star", "repaired merged test accuracy, " + "; ".join(parts), held_star)
    obj_parts, held_obj = [], True
    for a in archs:
        c = dict(sel(a, "c2m3", "objective_rel_mean"))
        o = {m: dict(sel(a, m, "objective_rel_mean")) for m in ("mergemany", "star")}
        held_obj &= all(c[n] >= o["mergemany"][n] and c[n] >= o["star"][n] for n in c)
        obj_parts.append(f"{a}: " + ", ".join(f"n={n} {c[n]:.4f}/{o['mergemany'][n]:.4f}/{o['star'][n]:.4f}"
                                              for n in sorted(c)))
    rep.verdict("c2m3-objective", "all-pairs objective relative to pairwise (C2M3/MergeMany/star): "
                + "; ".join(obj_parts), held_obj)
    def star(method: str) -> list[float]:
        return [v for a in archs for _, v in sel(a, method, "star_agreement", 3)]

    sp, cs, mm = star("sync"), star("c2m3"), star("mergemany")
    rep.verdict("spectral-sync-collapses",
                f"agreement with the star's maps (n ≥ 3): sync {min(sp):.3f} … {max(sp):.3f}, C2M3 {min(cs):.3f} … "
                f"{max(cs):.3f}, MergeMany {min(mm):.3f} … {max(mm):.3f}",
                min(sp) >= 0.9 and max(cs + mm) <= 0.5)
    cells, held_a = [], True
    for a in archs:
        s_star, a_star = dict(sel(a, "sync", "star_agreement", 3)), dict(sel(a, "sync-ascent", "star_agreement", 3))
        s_ag, a_ag = dict(sel(a, "sync", "agreement", 3)), dict(sel(a, "sync-ascent", "agreement", 3))
        for n in sorted(s_star):
            ok = a_star[n] < s_star[n] and a_ag[n] >= s_ag[n]
            held_a &= ok
            cells.append(f"{a} n={n}: star {s_star[n]:.3f}→{a_star[n]:.3f}, pairwise {s_ag[n]:.3f}→{a_ag[n]:.3f}")
    rep.verdict("sync-ascent-escapes", "agreement, spectral → ascent: " + "; ".join(cells), held_a)
    return rep


def _figure(rows: list[dict]):
    plt, pd, sns = seaborn()
    df = pd.DataFrame(rows)
    archs = sorted(df["arch"].unique())
    cols = (("cycle_barrier_mean", "cycle train-loss barrier"), ("pair_barrier_mean", "aligned-pair barrier"),
            ("objective_rel_mean", "all-pairs objective / pairwise"),
            ("repaired_test_accuracy_mean", "merged test accuracy (repaired)"))
    fig, axes = plt.subplots(len(archs), len(cols), figsize=(18, 3.8 * len(archs)), squeeze=False)
    for r, arch in enumerate(archs):
        d = df[df["arch"] == arch]
        for ax, (col, label) in zip(axes[r], cols, strict=True):
            sns.lineplot(d, x="n", y=col, hue="method", marker="o", ax=ax, legend=(ax is axes[r][-1]))
            ax.set_title(f"{arch}: {label}")
    return fig


def _iter_figure(iters: list[dict]):
    plt, pd, sns = seaborn()
    df = pd.DataFrame([r for r in iters if r["replicate"] == 0])
    archs = sorted(df["arch"].unique())
    fig, axes = plt.subplots(1, len(archs), figsize=(6 * len(archs), 3.8), squeeze=False)
    for ax, arch in zip(axes[0], archs, strict=True):
        d = df[df["arch"] == arch].copy()
        d["relative"] = d["relaxed_objective"] / d.groupby("n")["relaxed_objective"].transform("max")
        sns.lineplot(d, x="iteration", y="relative", hue="n", ax=ax, palette="viridis")
        ax.set_title(f"{arch}: C2M3 relaxed objective / its final value (replicate 0)")
    return fig


C2M3 = declare("c2m3-merging", __file__, config=C2M3Config, sizes=SIZES, jobs=jobs, report=report,
               datasets=("digits", "mnist1d", "mnist", "cifar10"),
               claim_ids=("pairwise-cycle-not-identity", "c2m3-cycle-consistent", "c2m3-merge-vs-mergemany",
                          "c2m3-merge-vs-star", "c2m3-objective", "spectral-sync-collapses",
                          "sync-ascent-escapes"))
