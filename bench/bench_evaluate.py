"""Benchmark: a 25-point barrier evaluation as a plain loop vs the evaluator's strategies and its default;
and a linear path evaluated plainly vs with the first layer's outputs combined from the endpoints'.

Prints, measured side by side in one run, interleaved (machines are noisy, so compare ratios, not
seconds): the loop (``load_state_dict`` + forward per point) vs ``evaluate_points`` with one point per
call (no vmap), 5 and 25 points per vmapped call, and its default (``auto_chunk_size``), with the
default's ratio to the best of the others (issue #18's goal: >= 0.95x), taken as the median over rounds of the
ratio within a round (``harness.paired_ratio``): where the default resolves to one of the strategies, the two
are the same call, and a ratio of best-of times taken a minute apart read 0.76-1.02x for it on this machine.

    python bench/bench_evaluate.py [--device cpu|cuda|auto] [--repeats 5] [--tiny]

Each case also prints the default's rate in GFLOP/s and its fraction of the device's measured matmul peak
(``harness.peak_line``). On CUDA it also times ``evaluate_points(..., tf32=True)`` against the default and
prints the largest change of a point's loss. The linear-path cases compare the default (``first_layer_shortcut=
"auto"``) with the better of plain evaluation and the shortcut by the same paired ratio (where the default is
plain evaluation, the two are the same computation, and best-of times a minute apart read 0.92-0.99x for it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from harness import (
    bench_parser,
    counted_flops,
    devices,
    paired_ratio,
    peak_line,
    random_task,
    time_calls,
    time_samples,
    versions,
)

from reference.barrier import evaluate_linear_path, evaluate_path, linear_path
from reference.combinations import first_layer
from reference.evaluate import auto_chunk_size, evaluate_points
from reference.models import CNN1D, MLP, init_params


@torch.no_grad()
def _loop(model, pts: dict, x, y) -> torch.Tensor:
    K = next(iter(pts.values())).shape[0]
    out = torch.empty(K)
    for i in range(K):
        model.load_state_dict({k: v[i] for k, v in pts.items()})
        out[i] = F.cross_entropy(model(x), y)
    return out


def bench_case(name: str, model: torch.nn.Module, shape: tuple[int, ...], n: int, dev: torch.device,
               repeats: int) -> None:
    model = model.to(dev).eval()
    a = {k: v.to(dev) for k, v in init_params(model, 0).items()}
    b = {k: v.to(dev) for k, v in init_params(model, 1).items()}
    x, y = (t.to(dev) for t in random_task(n, shape, 10, torch.Generator().manual_seed(0)))
    _, pts = linear_path(a, b, 25)
    pts = {k: v.to(dev) for k, v in pts.items()}
    ref = _loop(model, pts, x, y)
    auto = auto_chunk_size(model, pts, x, n, dev)
    got = evaluate_points(model, pts, x, y, batch_size=n).loss
    torch.testing.assert_close(got, ref.cpu(), rtol=1e-3, atol=1e-4)
    names = ["plain loop (load_state_dict + forward)", "evaluate_points, 1 point/call (no vmap)",
             "evaluate_points, vmap  5 points/call", "evaluate_points, vmap 25 points/call",
             f"evaluate_points, default (auto: {auto})"]
    fns = [lambda: _loop(model, pts, x, y)] + [
        lambda c=c: evaluate_points(model, pts, x, y, chunk_size=c, batch_size=n) for c in (1, 5, 25, None)]
    samples = time_samples(fns, dev, repeats)
    times = [min(s) for s in samples]
    print(f"\n{name}, 25 points x {n} inputs, {dev}, best of {repeats}")
    for label, t in zip(names, times, strict=True):
        print(f"  {label:<42} {1e3 * t:9.1f} ms   {times[0] / t:.2f}x the loop")
    best = min(range(len(times) - 1), key=times.__getitem__)
    ratio = paired_ratio(samples, best, len(times) - 1)
    print(f"  default / best strategy: {times[best] / times[-1]:.2f}x of the best-of times; {ratio:.2f}x paired "
          f"(median over rounds of the ratio within a round); default / loop: {times[0] / times[-1]:.2f}x")
    met = "met" if ratio >= 0.95 else "MISSED"
    print(f"goal: evaluator default >= 0.95x the best strategy [{name}, {dev.type}]: {ratio:.2f}x (paired): {met}")
    if times[0] / min(times[2:4]) >= 1.2:  # vmap pays here
        met = "met" if times[0] / times[-1] >= 1.2 else "MISSED"
        print(f"goal: evaluator default >= 1.2x the loop where vmap pays [{name}, {dev.type}]: "
              f"{times[0] / times[-1]:.2f}x: {met}")
    print(peak_line(f"{name}: evaluate_points default", dev, counted_flops(fns[-1]), times[-1]))
    if dev.type == "cuda":  # the TF32 option, side by side with the default
        fast = evaluate_points(model, pts, x, y, batch_size=n, tf32=True).loss
        (t32,) = time_calls([lambda: evaluate_points(model, pts, x, y, batch_size=n, tf32=True)], dev, repeats, min)
        print(f"  evaluate_points, default + tf32=True        {1e3 * t32:9.1f} ms   {times[-1] / t32:.2f}x the "
              f"default; max |loss change| {float((fast - got).abs().max()):.2e}")


def bench_first_layer(name: str, model: torch.nn.Module, shape: tuple[int, ...], n: int, dev: torch.device,
                      repeats: int) -> None:
    """A 25-point linear path on one split: the combined points evaluated plainly vs the first layer's outputs
    combined from the endpoints' (``reference.combinations``) vs ``evaluate_linear_path``'s default."""
    model = model.to(dev).eval()
    a = {k: v.to(dev) for k, v in init_params(model, 0).items()}
    b = {k: v.to(dev) for k, v in init_params(model, 1).items()}
    x, y = (t.to(dev) for t in random_task(n, shape, 10, torch.Generator().manual_seed(0)))
    split = {"train": (x, y)}
    layer = first_layer(model, a, x)

    def plain():
        t, pts = linear_path(a, b, 25)
        return evaluate_path(model, t, pts, split)

    ref = plain().curves["train"]["loss"]
    got = evaluate_linear_path(model, a, b, 25, split, first_layer_shortcut=True).curves["train"]["loss"]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    names = ["linear_path + evaluate_path (plain)", "evaluate_linear_path, shortcut on",
             "evaluate_linear_path, default (auto)"]
    fns = [plain, lambda: evaluate_linear_path(model, a, b, 25, split, first_layer_shortcut=True),
           lambda: evaluate_linear_path(model, a, b, 25, split)]
    samples = time_samples(fns, dev, repeats)
    times = [min(s) for s in samples]
    print(f"\nfirst layer linear in theta: {name}, 25 points x {n} inputs, {dev}, best of {repeats}; first layer "
          f"{layer.name}: {100 * layer.share:.0f}% of the forward FLOPs")
    for label, t in zip(names, times, strict=True):
        print(f"  {label:<42} {1e3 * t:9.1f} ms   {times[0] / t:.2f}x plain")
    best = min(range(len(times) - 1), key=times.__getitem__)
    ratio = paired_ratio(samples, best, len(times) - 1)  # as the evaluator's goal: paired, not best-of
    print(f"  default / the better of the two: {times[best] / times[-1]:.2f}x of the best-of times; "
          f"{ratio:.2f}x paired")
    met = "met" if ratio >= 0.95 else "MISSED"
    print(f"goal: linear-path default >= 0.95x the better of plain and first-layer shortcut [{name}, {dev.type}]: "
          f"{ratio:.2f}x paired ({times[0] / times[-1]:.2f}x plain): {met}")
    print(peak_line(f"{name}: evaluate_linear_path default", dev, counted_flops(fns[-1]), times[-1]))


def main() -> None:
    p = bench_parser(__doc__)
    args = p.parse_args()
    print(versions())
    for dev in devices(args.device):
        if args.tiny:
            bench_case("tiny: MLP 16-8-10", MLP(16, [8], 10), (16,), 32, dev, args.repeats)
            bench_first_layer("tiny: MLP 16-8-10", MLP(16, [8], 10), (16,), 32, dev, args.repeats)
            continue
        bench_case("MNIST-sized: MLP 784-512x3-10", MLP(784, [512] * 3, 10), (784,), 10_000, dev, args.repeats)
        bench_case("digits: MLP 64-512x4-10", MLP(64, [512] * 4, 10), (64,), 1437, dev, args.repeats)
        bench_case("digits: MLP 64-64x4-10", MLP(64, [64] * 4, 10), (64,), 1437, dev, args.repeats)
        bench_case("digits: MLP 64-32x2-10", MLP(64, [32] * 2, 10), (64,), 1437, dev, args.repeats)
        bench_case("MNIST-1D: CNN1D [32, 32, 32]", CNN1D(1, (32, 32, 32), 10), (1, 40), 4000, dev, args.repeats)
        bench_first_layer("MNIST-sized: MLP 784-512x3-10", MLP(784, [512] * 3, 10), (784,), 10_000, dev, args.repeats)
        bench_first_layer("MNIST-sized: MLP 784-128x2-10", MLP(784, [128] * 2, 10), (784,), 10_000, dev, args.repeats)
        bench_first_layer("digits: MLP 64-512x4-10", MLP(64, [512] * 4, 10), (64,), 1437, dev, args.repeats)


if __name__ == "__main__":
    main()
