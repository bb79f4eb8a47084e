"""Benchmark: weight matching (Git Re-Basin, Algorithm 1): ours vs snimu/rebasin 0.0.47 vs a plain loop.

On the two models of issue #18 (a random-init MLP 784-512×3-10 and two digits MLPs 64-512×4-10 trained
from different seeds), side by side in one process, the median of ``--repeats`` interleaved runs:

- ``rebasin 0.0.47``: ``PermutationCoordinateDescent(model_a, model_b, x).rebasin()`` (graph tracing
  included), when it imports (``pip install --no-deps rebasin==0.0.47 torchview``); its group order
  comes from ``torch.randperm`` after ``torch.manual_seed(0)``;
- ``plain loop``: Algorithm 1 written from scratch for MLPs (a loop over the hidden layers, one cost
  matrix each from the layer's incoming weights, bias and outgoing weights, scipy's assignment), with
  our visiting order, so its objective equals ours with ``solver="scipy"``;
- ``ours``: ``weight_matching`` from the identity (Algorithm 1 as published; ``solver="auto"`` takes
  ``lapjv`` when the package ``lap`` is installed), the same with ``solver="scipy"``, and from the
  one-pass start ``init="greedy"``.

Printed: seconds, J − J(identity) (J = Σ⟨θ_a, P(θ_b)⟩ over every entry, float64), the passes, and each
time as a ratio to the peer's and to the plain loop's (> 1: faster than it).

    python bench/bench_weight_matching.py [--device cpu|cuda] [--repeats 3] [--tiny]
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from harness import bench_parser, counted_flops, devices, peak_line, sync, versions
from scipy.optimize import linear_sum_assignment

from reference.data import load_digits
from reference.matching import SOLVERS, fastest_solver, weight_matching, weight_matching_objective
from reference.models import MLP, init_params
from reference.permutation import Permutation
from reference.specs import spec_for
from reference.train import TrainConfig, train_many


def plain_loop(a: dict, b: dict, depth: int, seed: int = 0, max_passes: int = 100) -> dict[str, torch.Tensor]:
    """Algorithm 1 for an MLP, from scratch: groups P_0 … P_{depth-1}, visited in the order
    ``numpy.random.default_rng(seed).permutation`` draws each pass (ours), until a pass improves nothing."""
    w = [(a[f"layers.{i}.weight"].double(), b[f"layers.{i}.weight"].double()) for i in range(depth)]
    w.append((a["head.weight"].double(), b["head.weight"].double()))
    bias = [(a[f"layers.{i}.bias"].double(), b[f"layers.{i}.bias"].double()) for i in range(depth)]
    perm = [torch.arange(wa.shape[0]) for wa, _ in w[:depth]]
    rng = np.random.default_rng(seed)
    for _ in range(max_passes):
        improved = False
        for i in rng.permutation(depth):
            wa, wb = w[i]
            if i > 0:
                wb = wb[:, perm[i - 1]]
            S = wa @ wb.T + torch.outer(bias[i][0], bias[i][1])
            na, nb = w[i + 1]
            if i + 1 < depth:
                nb = nb[perm[i + 1]]
            S = S + na.T @ nb
            S = S.cpu().numpy()
            _, col = linear_sum_assignment(S, maximize=True)
            rows = np.arange(len(col))
            if S[rows, col].sum() > S[rows, perm[i].numpy()].sum() + 1e-12:
                perm[i] = torch.as_tensor(col)
                improved = True
        if not improved:
            break
    return {f"P_{i}": p for i, p in enumerate(perm)}


def peer(model: torch.nn.Module, a: dict, b: dict, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """snimu/rebasin 0.0.47's coordinate descent; returns its permuted θ_b."""
    from rebasin import PermutationCoordinateDescent

    ma, mb = copy.deepcopy(model), copy.deepcopy(model)
    ma.load_state_dict(a)
    mb.load_state_dict(b)
    torch.manual_seed(0)
    PermutationCoordinateDescent(ma, mb, x).rebasin()
    return {k: v.detach() for k, v in mb.state_dict().items()}


def have_peer() -> bool:
    try:
        import rebasin  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    ap = bench_parser(__doc__, repeats=3, device="cpu")
    ap.add_argument("--epochs", type=int, default=20, help="training epochs of the digits MLPs")
    args = ap.parse_args()
    dev = devices(args.device)[-1]
    width, depth_r, depth_t, epochs = (8, 2, 2, 1) if args.tiny else (512, 3, 4, args.epochs)
    print(versions())
    print(f"device {dev}; solver='auto' is {fastest_solver()!r}; peer snimu/rebasin 0.0.47 "
          f"{'installed' if have_peer() else 'NOT installed: its rows are missing'}")
    data = load_digits()
    mr = MLP(784, [width] * depth_r, 10)
    mt = MLP(64, [width] * depth_t, 10)
    cfg = TrainConfig.adam(epochs, schedule="cosine")
    trained = train_many(mt, [init_params(mt, s) for s in (0, 1)], data.x_train, data.y_train, cfg, [0, 1],
                         progress=False)
    cases = [(f"random init MLP 784-{width}x{depth_r}-10", mr, init_params(mr, 0), init_params(mr, 1), depth_r,
              torch.randn(2, 784)),
             (f"trained digits MLP 64-{width}x{depth_t}-10", mt, *trained, depth_t, data.x_train[:2])]
    for label, model, a, b, depth, x in cases:
        a = {k: v.to(dev) for k, v in a.items()}
        b = {k: v.to(dev) for k, v in b.items()}
        spec = spec_for(model)
        j0 = weight_matching_objective(spec, a, b, Permutation.identity(spec))
        runs: dict[str, tuple[Callable[[], object], Callable[[object], tuple[float, int | None]]]] = {}
        if have_peer():
            m, xd = copy.deepcopy(model).to(dev), x.to(dev)
            runs["rebasin 0.0.47"] = (lambda m=m, a=a, b=b, x=xd: peer(m, a, b, x), lambda pb, a=a: (
                sum(float((a[k].double() * pb[k].double()).sum()) for k in a), None))
        runs["plain loop (scipy)"] = (lambda a=a, b=b, d=depth: plain_loop(a, b, d), lambda p, spec=spec, a=a, b=b: (
            weight_matching_objective(spec, a, b, Permutation(p, spec)), None))
        for name, kw in (("ours, identity start", {}), ("ours, identity, scipy", {"solver": "scipy"}),
                         ("ours, init='greedy'", {"init": "greedy"})):
            runs[name] = (lambda spec=spec, a=a, b=b, kw=kw: weight_matching(spec, a, b, seed=0, **kw),
                          lambda r: (r.objective, len(r.history) - 1))
        times: dict[str, list[float]] = {n: [] for n in runs}
        out: dict[str, object] = {}
        for _ in range(args.repeats):
            for name, (fn, _) in runs.items():
                sync(dev)
                t0 = time.perf_counter()
                out[name] = fn()
                sync(dev)
                times[name].append(time.perf_counter() - t0)
        med = {n: statistics.median(t) for n, t in times.items()}
        print(f"\n{label}, {args.repeats} runs each (median)")
        print(f"  {'method':<24} {'time [s]':>9} {'J - J(id)':>10} {'passes':>6} {'vs peer':>8} {'vs plain':>9}")
        for name, (_, score) in runs.items():
            j, passes = score(out[name])
            vs_peer = (f"{med['rebasin 0.0.47'] / med[name]:7.2f}x" if "rebasin 0.0.47" in med else "      -")
            print(f"  {name:<24} {med[name]:9.3f} {j - j0:10.2f} {passes if passes is not None else '-':>6} "
                  f"{vs_peer:>8} {med['plain loop (scipy)'] / med[name]:8.2f}x")
        objective = {name: score(out[name])[0] for name, (_, score) in runs.items()}
        for name in ("ours, identity start", "ours, init='greedy'"):
            if "rebasin 0.0.47" in med:
                speed, ok_j = med["rebasin 0.0.47"] / med[name], objective[name] >= objective["rebasin 0.0.47"]
                print(f"goal: weight matching >= 2x rebasin 0.0.47 with J >= its own [{label}, {name}]: "
                      f"{speed:.2f}x, J - J(id) {objective[name] - j0:.2f} vs {objective['rebasin 0.0.47'] - j0:.2f}: "
                      f"{'met' if speed >= 2 and ok_j else 'MISSED'}")
            speed = med["plain loop (scipy)"] / med[name]
            print(f"goal: weight matching never slower than the plain loop [{label}, {name}]: {speed:.2f}x: "
                  f"{'met' if speed >= 1 else 'MISSED'}")
        ours = runs["ours, identity start"][0]
        print(peak_line(f"{label}: ours, identity start (similarity products only; the assignment solves are not "
                        f"counted)", dev, counted_flops(ours), med["ours, identity start"], torch.float64))
        if "rebasin 0.0.47" in med:  # how much of the identity start's time its assignment solves take
            solve, spent = SOLVERS[fastest_solver()], []

            def timed(S, solve=solve, spent=spent):
                t0 = time.perf_counter()
                col = solve(S)
                spent.append(time.perf_counter() - t0)
                return col

            weight_matching(spec, a, b, seed=0, solver=timed)
            print(f"  ours, identity start: its {len(spent)} assignment solves ({fastest_solver()}) alone take "
                  f"{sum(spent):.3f} s; 2x the peer is {med['rebasin 0.0.47'] / 2:.3f} s in all")


if __name__ == "__main__":
    main()
