"""Benchmark: our spec-driven weight matching vs a straightforward per-layer reference, same models.

The reference is the simple one-pass scheme many ports use for MLPs: match hidden layer 1 on its
incoming weights and bias, then layer 2 on its incoming weights with layer 1's permutation already
applied to their input axis, and so on (no outgoing weights, no coordinate descent). Ours is Git
Re-Basin's Algorithm 1 (all weights touching a group, coordinate descent until no group improves),
with 1 and 5 random group orders. Printed side by side: time and the objective J(P) = Σ⟨θ_a, P(θ_b)⟩
relative to the identity's, on trained digits MLPs and on random MLPs.

    python bench/bench_weight_matching.py [--widths 64 256 1024]
"""

from __future__ import annotations

import argparse
import time

import torch
from scipy.optimize import linear_sum_assignment

from reference.data import load_digits
from reference.matching import weight_matching, weight_matching_objective
from reference.models import MLP, init_params
from reference.permutation import Permutation
from reference.specs import spec_for
from reference.train import TrainConfig, train_many


def per_layer_reference(a: dict, b: dict, depth: int) -> dict[str, torch.Tensor]:
    """One forward pass over the layers, each matched on its incoming weights only."""
    perm, prev = {}, None
    for i in range(depth):
        wa, wb = a[f"layers.{i}.weight"].double(), b[f"layers.{i}.weight"].double()
        if prev is not None:
            wb = wb[:, prev]
        S = wa @ wb.T + torch.outer(a[f"layers.{i}.bias"].double(), b[f"layers.{i}.bias"].double())
        _, col = linear_sum_assignment(S.numpy(), maximize=True)
        prev = torch.as_tensor(col)
        perm[f"P_{i}"] = prev
    return perm


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--widths", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--epochs", type=int, default=20)
    args = p.parse_args()
    data = load_digits()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; MLP 64-{args.depth}×width-10")
    print(f"{'models':>16} {'width':>6} | {'method':<26} {'time [s]':>9} {'J − J(id)':>12} {'vs per-layer':>12}")
    for width in args.widths:
        model = MLP(64, [width] * args.depth, 10)
        spec = spec_for(model)
        cfg = TrainConfig(epochs=args.epochs, batch_size=128, lr=1e-3, optimizer="adam", schedule="cosine")
        trained = train_many(model, [init_params(model, s) for s in (0, 1)], data.x_train, data.y_train, cfg,
                             [0, 1], progress=False)
        for label, (a, b) in (("trained (digits)", trained), ("random init", (init_params(model, 2),
                                                                             init_params(model, 3)))):
            j0 = weight_matching_objective(spec, a, b, Permutation.identity(spec))
            t0 = time.perf_counter()
            ref = Permutation(per_layer_reference(a, b, args.depth), spec)
            t_ref = time.perf_counter() - t0
            j_ref = weight_matching_objective(spec, a, b, ref) - j0
            rows = [("per-layer reference", t_ref, j_ref)]
            for restarts in (1, 5):
                t0 = time.perf_counter()
                r = weight_matching(spec, a, b, seed=0, restarts=restarts)
                rows.append((f"ours, {restarts} order(s)", time.perf_counter() - t0, r.objective - j0))
            for name, t, j in rows:
                rel = j / j_ref if j_ref else float("nan")
                print(f"{label:>16} {width:>6} | {name:<26} {t:9.3f} {j:12.2f} {rel:11.3f}×")


if __name__ == "__main__":
    main()
