"""Benchmark: the optimizer step with one ``torch._foreach_*`` call per operation vs one call per tensor.

``reference.optim.opt_step_`` runs the Adam / AdamW / SGD formula either per tensor (a Python loop over
the parameters, ~8 tensor calls each) or with each operation applied to every tensor at once
(``foreach=True``, the default when all tensors share a device and dtype); both give the same bits
(``tests/test_train.py``). Side by side in one run, interleaved, best of ``--repeats``:

- the step alone, on the parameters of MLPs 64-w×d-10 (Adam);
- whole training runs, ``reference.train.train`` (Adam, batch 128, digits-sized random data) and
  ``reference.curves.train_curve`` (a quadratic Bézier, 4 points per step), with the fitting loop's step
  switched between the two (this script wraps ``reference.fit.opt_step_``; the library has no such switch).

    python bench/bench_optimizer.py [--device cpu|cuda|auto] [--repeats 5] [--tiny]
"""

from __future__ import annotations

import functools

import torch
from harness import bench_parser, devices, random_task, time_calls, versions

import reference.fit as fit_module
from reference.curves import train_curve
from reference.models import MLP, init_params
from reference.optim import TrainConfig, opt_step_
from reference.train import train

_STEP = fit_module.opt_step_


def _with_step(foreach: bool, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with the fitting loop's optimizer step pinned to ``foreach``."""
    fit_module.opt_step_ = functools.partial(_STEP, foreach=foreach)
    try:
        return fn(*args, **kwargs)
    finally:
        fit_module.opt_step_ = _STEP


def bench_step(width: int, depth: int, dev: torch.device, repeats: int) -> None:
    model = MLP(64, [width] * depth, 10)
    params = [v.to(dev) for v in init_params(model, 0).values()]
    grads = [torch.randn_like(p) for p in params]
    cfg = TrainConfig.adam(1)
    states = {f: [{} for _ in params] for f in (False, True)}
    counter = {False: 0, True: 0}

    def step(foreach: bool) -> None:
        counter[foreach] += 1
        opt_step_(cfg, params, grads, states[foreach], 1e-6, counter[foreach], foreach=foreach)

    t_loop, t_each = time_calls([lambda: step(False), lambda: step(True)], dev, repeats, stat=min)
    print(f"  step alone, MLP 64-{width}x{depth}-10 ({len(params)} tensors): per tensor {1e6 * t_loop:8.1f} us, "
          f"foreach {1e6 * t_each:8.1f} us   {t_loop / t_each:.2f}x")


def bench_training(label: str, run, dev: torch.device, repeats: int) -> float:
    outs = {f: _with_step(f, run) for f in (False, True)}
    same = all(torch.equal(outs[False][k], outs[True][k]) for k in outs[False])
    t_loop, t_each = time_calls([lambda: _with_step(False, run), lambda: _with_step(True, run)], dev, repeats,
                                stat=min)
    print(f"  {label:<44} per tensor {t_loop:7.3f} s, foreach {t_each:7.3f} s   {t_loop / t_each:.2f}x"
          f"   (results {'bit-identical' if same else 'DIFFER'})")
    return t_loop / t_each


def main() -> None:
    p = bench_parser(__doc__)
    args = p.parse_args()
    print(versions())
    n, epochs = (64, 1) if args.tiny else (1437, 3)
    x, y = random_task(n, (64,), 10, torch.Generator().manual_seed(0))
    for dev in devices(args.device):
        print(f"\n{dev}, Adam, best of {args.repeats}")
        shapes = [(8, 2)] if args.tiny else [(32, 2), (128, 3), (512, 4)]
        for width, depth in shapes:
            bench_step(width, depth, dev, args.repeats)
        cfg = TrainConfig.adam(epochs)
        ratios = []
        for width, depth in shapes:
            model = MLP(64, [width] * depth, 10)
            a, b = init_params(model, 0), init_params(model, 1)

            def endpoint(m=model, a=a, c=cfg, d=dev):
                return train(m, a, x, y, c, seed=0, device=d, progress=False)

            def curve(m=model, a=a, b=b, c=cfg, d=dev):
                return train_curve(m, a, b, x, y, cfg=c, device=d, progress=False).free[0]

            ratios.append(bench_training(f"train, MLP 64-{width}x{depth}-10, {epochs} epochs, n={n}", endpoint, dev,
                                         args.repeats))
            ratios.append(bench_training(f"train_curve, MLP 64-{width}x{depth}-10, {epochs} epochs", curve, dev,
                                         args.repeats))
        worst = min(ratios)
        print(f"goal: the foreach step never slower in training (>= 0.95x the per-tensor step) [{dev.type}]: "
              f"worst {worst:.2f}x, best {max(ratios):.2f}x: {'met' if worst >= 0.95 else 'MISSED'}")


if __name__ == "__main__":
    main()
