"""Wall time of training K models one after another vs at once (vmap) vs ``train_many``'s automatic choice.

    python bench/bench_train_many.py [--device auto|cpu|cuda] [--k 4] [--epochs 3] [--n 2000] [--widths 32 512]

Default workload: K=4 MLPs 64-w-w-10 (``--widths``, default 512), 2000 random examples, 3 epochs, batch
128, SGD. Prints, per width, ``train_many`` with ``strategy="sequential"`` (``train`` each), ``"vmap"``
and ``"auto"`` (what ``choose_strategy`` picks), their ratio (> 1: vmap faster) and auto's ratio to the
better of the two (the goal's ratio is paired: the median over rounds of the ratio within a round,
``harness.paired_ratio``; auto runs the same code as one of the two). Nothing is asserted; one untimed warm-up
run of each precedes the timed ones, which alternate.
"""

from __future__ import annotations

import torch
from harness import counted_flops, device_label, paired_ratio, peak_line, random_task, time_samples, training_parser
from torch import nn

from reference.train import TrainConfig, choose_strategy, pick_device, train_many


def make_mlp(d_in: int, width: int, n_cls: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, n_cls)
    )


def main() -> None:
    ap = training_parser(__doc__, n=2000, width=512, repeats=1)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    ap.add_argument("--k", type=int, default=4, help="number of models (default: 4)")
    ap.add_argument("--widths", type=int, nargs="+", help="several widths, one after another (default: --width)")
    args = ap.parse_args()

    dev = pick_device(args.device)
    d_in, n_cls = 64, 10
    x, y = random_task(args.n, (d_in,), n_cls, torch.Generator().manual_seed(0))
    seeds = list(range(args.k))
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=0.05)
    print(f"device {device_label(dev)}; K={args.k} MLPs {d_in}-w-w-{n_cls}, n={args.n}, {args.epochs} epochs, "
          f"batch {args.batch_size}, torch {torch.__version__}; best of {args.repeats}")
    for width in args.widths or [args.width]:
        model = make_mlp(d_in, width, n_cls)
        points = []
        for k in range(args.k):
            torch.manual_seed(k)
            points.append({n: v.clone() for n, v in make_mlp(d_in, width, n_cls).state_dict().items()})
        chosen = choose_strategy(model, points[0], x, cfg, dev)
        fns = [lambda st=st, m=model, p=points: train_many(m, p, x, y, cfg, seeds, device=dev, progress=False,
                                                           strategy=st)
               for st in ("sequential", "vmap", "auto")]
        samples = time_samples(fns, dev, args.repeats)
        t_seq, t_many, t_auto = (min(s) for s in samples)
        ratio = paired_ratio(samples, 0 if t_seq <= t_many else 1, 2)
        print(f"w={width:4d}: sequential {t_seq:7.3f} s, vmap {t_many:7.3f} s (sequential / vmap "
              f"{t_seq / t_many:.2f}x), auto -> {chosen} {t_auto:7.3f} s = {min(t_seq, t_many) / t_auto:.2f}x "
              f"the better of the two (best-of times), {ratio:.2f}x paired")
        print(f"goal: train_many 'auto' >= 0.95x the better strategy [w={width}, {dev.type}]: {ratio:.2f}x (paired): "
              f"{'met' if ratio >= 0.95 else 'MISSED'}")
        print(peak_line(f"w={width}: train_many auto ({chosen})", dev, counted_flops(fns[2]), t_auto))


if __name__ == "__main__":
    main()
