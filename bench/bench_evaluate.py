"""Benchmark: a 25-point barrier evaluation as a plain loop vs the vmapped evaluator; weight matching.

Prints, measured side by side in one run (machines are noisy, so compare ratios, not seconds):
- the loop (``load_state_dict`` + forward per point) vs ``evaluate_points`` at several chunk sizes;
- the time of weight matching for the same architecture.

    python bench/bench_evaluate.py [--device cpu|cuda|auto] [--repeats 5] [--tf32] [--tiny]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from harness import devices, random_task, time_calls, versions

from reference.barrier import linear_path
from reference.evaluate import evaluate_points
from reference.matching import weight_matching
from reference.models import MLP, init_params
from reference.specs import spec_for


def _time(fn, dev, repeats: int) -> float:
    """Median seconds per call, after a warm-up call."""
    return time_calls([fn], dev, repeats)[0]


@torch.no_grad()
def _loop(model, pts: dict, x, y) -> torch.Tensor:
    K = next(iter(pts.values())).shape[0]
    out = torch.empty(K)
    for i in range(K):
        model.load_state_dict({k: v[i] for k, v in pts.items()})
        out[i] = F.cross_entropy(model(x), y)
    return out


def bench_case(name: str, in_features: int, widths: list[int], n: int, dev: torch.device, repeats: int) -> None:
    model = MLP(in_features, widths, 10).to(dev).eval()
    a = {k: v.to(dev) for k, v in init_params(model, 0).items()}
    b = {k: v.to(dev) for k, v in init_params(model, 1).items()}
    x, y = (t.to(dev) for t in random_task(n, (in_features,), 10, torch.Generator().manual_seed(0)))
    _, pts = linear_path(a, b, 25)
    pts = {k: v.to(dev) for k, v in pts.items()}
    ref = _loop(model, pts, x, y)
    got = evaluate_points(model, pts, x, y, chunk_size=25, batch_size=n).loss
    torch.testing.assert_close(got, ref.cpu(), rtol=1e-3, atol=1e-4)
    t_loop = _time(lambda: _loop(model, pts, x, y), dev, repeats)
    print(f"\n{name}: MLP {in_features}-{'-'.join(map(str, widths))}-10, 25 points × {n} inputs, {dev}")
    print(f"  plain loop (load_state_dict + forward): {1e3 * t_loop:8.1f} ms   1.00×")
    for chunk in (1, 5, 25):
        t = _time(lambda c=chunk: evaluate_points(model, pts, x, y, chunk_size=c, batch_size=n), dev, repeats)
        print(f"  vmapped evaluator, {chunk:2d} points/call:     {1e3 * t:8.1f} ms   {t_loop / t:.2f}× the loop")
    spec = spec_for(model)
    ac, bc = {k: v.cpu() for k, v in a.items()}, {k: v.cpu() for k, v in b.items()}
    t0 = time.perf_counter()
    r = weight_matching(spec, ac, bc, seed=0)
    t_wm = time.perf_counter() - t0
    print(f"  weight matching: {t_wm:.2f} s ({len(r.history) - 1} passes, objective {r.objective:.1f})")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA")
    p.add_argument("--tiny", action="store_true", help="tiny cases that only check the script runs (python -m bench)")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    print(versions())
    for dev in devices(args.device):
        if args.tiny:
            bench_case("tiny", 16, [8], 32, dev, args.repeats)
            continue
        bench_case("MNIST-sized", 784, [512, 512, 512], 10_000, dev, args.repeats)
        bench_case("digits", 64, [128] * 4, 360, dev, args.repeats)


if __name__ == "__main__":
    main()
