"""Benchmark: the zoo's 1-D max-pool (``ReshapeMaxPool1d``) vs ``nn.MaxPool1d`` in training.

While autograd records on the CPU, ``reference.models.ReshapeMaxPool1d`` takes window maxima as a reshape
and a ``max`` over the last axis instead of ``F.max_pool1d`` (which then runs the 2-D kernel with indices);
values and gradients are the same (``tests/test_models_specs.py``). Side by side in one run, interleaved:

- the pool alone, forward + backward, on the shapes of MNIST-1D's CNN1D (batch 128, 32 channels, L = 40
  and 20), and forward under ``no_grad`` (where both are ``F.max_pool1d``);
- whole training runs of CNN1D 32-32-32 with BatchNorm (``reference.train.train``, Adam, batch 128) and a
  quadratic Bézier curve between two of them (``reference.curves.train_curve``, 4 points per step), with the
  model's pools swapped between the two classes; the trained weights are compared bit for bit.

    python bench/bench_pooling.py [--device cpu|cuda|auto] [--repeats 5] [--tiny]

On CUDA the zoo's pool is ``nn.MaxPool1d`` (the reshape is not measured there), so the ratios read ~1.
"""

from __future__ import annotations

import statistics

import torch
from harness import bench_parser, devices, paired_ratio, random_task, time_samples, versions
from torch import nn

from reference.curves import train_curve
from reference.models import CNN1D, ReshapeMaxPool1d, init_params
from reference.optim import TrainConfig
from reference.train import train

POOLS = {"nn.MaxPool1d": nn.MaxPool1d, "ReshapeMaxPool1d": ReshapeMaxPool1d}


def bench_pool(shape: tuple[int, ...], dev: torch.device, repeats: int) -> float:
    x = torch.relu(torch.randn(shape, generator=torch.Generator().manual_seed(0))).to(dev)
    up = torch.randn(*shape[:-1], shape[-1] // 2, device=dev)

    def step(pool: nn.Module) -> None:
        xi = x.clone().requires_grad_()
        torch.autograd.grad(pool(xi), xi, up)

    def no_grad(pool: nn.Module) -> None:
        with torch.no_grad():
            pool(x)

    pools = [cls(2) for cls in POOLS.values()]
    grad_s = time_samples([lambda p=p: step(p) for p in pools], dev, repeats)
    ng_s = time_samples([lambda p=p: no_grad(p) for p in pools], dev, repeats)
    med = [statistics.median(s) for s in grad_s + ng_s]
    ratio = paired_ratio(grad_s, 0, 1)
    print(f"  pool {list(shape)}: forward+backward nn {1e3 * med[0]:.3f} ms, reshape {1e3 * med[1]:.3f} ms   "
          f"{ratio:.2f}x;  no_grad forward nn {1e3 * med[2]:.3f} ms, ours {1e3 * med[3]:.3f} ms   "
          f"{paired_ratio(ng_s, 0, 1):.2f}x")
    return ratio


def _with_pools(model: CNN1D, cls: type[nn.Module], run):
    model.pools = nn.ModuleList(cls(2) for _ in model.pools)
    return run()


def bench_training(label: str, model: CNN1D, run, dev: torch.device, repeats: int) -> tuple[float, bool]:
    outs = [_with_pools(model, cls, run) for cls in POOLS.values()]
    same = all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    samples = time_samples([lambda c=c: _with_pools(model, c, run) for c in POOLS.values()], dev, repeats)
    med = [statistics.median(s) for s in samples]
    ratio = paired_ratio(samples, 0, 1)
    print(f"  {label:<46} nn {med[0]:7.3f} s, reshape {med[1]:7.3f} s   {ratio:.2f}x   "
          f"(trained weights {'bit-identical' if same else 'DIFFER'})")
    return ratio, same


def main() -> None:
    p = bench_parser(__doc__)
    args = p.parse_args()
    print(versions())
    n, epochs, ch = (64, 1, 4) if args.tiny else (2000, 2, 32)
    x, y = random_task(n, (40,), 10, torch.Generator().manual_seed(0))
    for dev in devices(args.device):
        print(f"\n{dev}, median of {args.repeats} (ratio: the median of the paired ratios; > 1: the reshape is faster)")
        for shape in [(8, ch, 40)] if args.tiny else [(128, ch, 40), (128, ch, 20)]:
            bench_pool(shape, dev, args.repeats)
        model = CNN1D(channels=(ch, ch, ch), norm="batch")
        a, b = init_params(model, 0), init_params(model, 1)
        cfg = TrainConfig.adam(epochs)

        def endpoint(model=model, a=a, cfg=cfg, dev=dev):
            return train(model, a, x, y, cfg, seed=0, device=dev, progress=False)

        def curve(model=model, a=a, b=b, cfg=cfg, dev=dev):
            return train_curve(model, a, b, x, y, cfg=cfg, device=dev, progress=False).free[0]

        label = f"CNN1D {ch}x3 BatchNorm, {epochs} epochs, n={n}"
        runs = [bench_training(f"train, {label}", model, endpoint, dev, args.repeats),
                bench_training(f"train_curve, {label}", model, curve, dev, args.repeats)]
        ratios = [r for r, _ in runs]
        same = "bit-identical" if all(s for _, s in runs) else "DIFFERENT"
        print(f"training with the zoo's pool [{dev.type}]: {min(ratios):.2f}x / {max(ratios):.2f}x nn.MaxPool1d's "
              f"speed, trained weights {same}")

if __name__ == "__main__":
    main()
