"""Wall time of training K models one after another (``train``) vs at once (``train_many``).

    python bench/bench_train_many.py [--device auto|cpu|cuda] [--k 4] [--epochs 3] [--n 2000]

Default workload: K=4 MLPs 64-512-512-10, 2000 random examples, 3 epochs, batch 128, SGD. Prints
both times and their ratio (sequential / batched: > 1 means ``train_many`` is faster). Nothing is
asserted; one untimed warm-up run of each precedes the timed ones, which alternate between the two.
"""

from __future__ import annotations

import torch
from harness import device_label, random_task, time_calls, training_parser
from torch import nn

from reference.train import TrainConfig, pick_device, train, train_many


def make_mlp(d_in: int, width: int, n_cls: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, n_cls)
    )


def main() -> None:
    ap = training_parser(__doc__, n=2000, width=512, repeats=1)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    ap.add_argument("--k", type=int, default=4, help="number of models (default: 4)")
    args = ap.parse_args()

    dev = pick_device(args.device)
    d_in, n_cls = 64, 10
    x, y = random_task(args.n, (d_in,), n_cls, torch.Generator().manual_seed(0))
    model = make_mlp(d_in, args.width, n_cls)
    points = []
    for k in range(args.k):
        torch.manual_seed(k)
        points.append({n: v.clone() for n, v in make_mlp(d_in, args.width, n_cls).state_dict().items()})
    seeds = list(range(args.k))
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=0.05)

    def sequential() -> None:
        for p, s in zip(points, seeds, strict=True):
            train(model, p, x, y, cfg, s, device=dev, progress=False)

    def batched() -> None:
        train_many(model, points, x, y, cfg, seeds, device=dev, progress=False)

    t_seq, t_many = time_calls([sequential, batched], dev, args.repeats, stat=min)
    print(
        f"device {device_label(dev)}; K={args.k} MLPs {d_in}-{args.width}-{args.width}-{n_cls}, n={args.n}, "
        f"{args.epochs} epochs, batch {args.batch_size}, torch {torch.__version__}"
    )
    print(f"sequential train x{args.k}: {t_seq:8.3f} s")
    print(f"train_many (K={args.k}):    {t_many:8.3f} s")
    print(f"ratio sequential / train_many: {t_seq / t_many:.2f}x")


if __name__ == "__main__":
    main()
