"""Time per epoch of curve training: T values of t per step in one vmapped call vs one t at a time.

    python bench/bench_curves.py [--devices cpu,cuda] [--t 4] [--epochs 3] [--n 1437] [--repeats 3]

Workload (digits-sized): a quadratic Bezier curve between two MLPs 64-128-128-10, n = 1437 random
examples (the size of sklearn digits' training split), batch 128, SGD, T = ``--t`` points per
step. ``train_curve(vectorized=True)`` evaluates the T points in one ``vmap(functional_call)`` call
and one backward pass; ``vectorized=False`` runs T forward/backward passes per step (same
objective, same number of optimizer steps). Prints the best time per epoch of each and the ratio
loop / vmapped (> 1: vmap is faster) on every device given that this machine has (CUDA is skipped
with a note when absent). Nothing is asserted; one untimed warm-up run of each precedes the timed
ones, which alternate between the two.
"""

from __future__ import annotations

import torch
from harness import counted_flops, device_label, peak_line, random_task, time_calls, training_parser

from reference.curves import train_curve
from reference.models import MLP, init_params
from reference.train import TrainConfig


def main() -> None:
    ap = training_parser(__doc__, n=1437, width=128, repeats=3)
    ap.add_argument("--devices", default="cpu,cuda", help="comma-separated (default: cpu,cuda)")
    ap.add_argument("--t", type=int, default=4, help="points (values of t) per step (default: 4)")
    args = ap.parse_args()

    d_in, n_cls = 64, 10
    x, y = random_task(args.n, (d_in,), n_cls, torch.Generator().manual_seed(0))
    model = MLP(d_in, [args.width, args.width], n_cls)
    a, b = init_params(model, 1), init_params(model, 2)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=0.05)
    print(
        f"quadratic Bezier between MLPs {d_in}-{args.width}-{args.width}-{n_cls}, n={args.n}, batch "
        f"{args.batch_size}, T={args.t} points per step, {args.epochs} epochs per run, torch {torch.__version__}"
    )
    for name in args.devices.split(","):
        dev = torch.device(name.strip())
        if dev.type == "cuda" and not torch.cuda.is_available():
            print(f"{name}: skipped (CUDA not available)")
            continue

        def run(vectorized: bool, dev: torch.device = dev) -> None:
            train_curve(
                model, a, b, x, y, cfg=cfg, seed=0, points_per_step=args.t,
                vectorized=vectorized, device=dev, progress=False,
            )  # fmt: skip

        t_vec, t_loop = (t / args.epochs for t in time_calls([lambda: run(True), lambda: run(False)], dev,
                                                              args.repeats, stat=min))
        print(f"{device_label(dev)}:")
        print(f"  vmapped, {args.t} t per call:    {1e3 * t_vec:9.2f} ms/epoch")
        print(f"  loop, one t per pass:      {1e3 * t_loop:9.2f} ms/epoch")
        print(f"  ratio loop / vmapped:      {t_loop / t_vec:9.2f}x")
        flops = counted_flops(lambda: run(True)) / args.epochs
        case = f"curve training, vmapped, MLPs 64-{args.width}-{args.width}-10, T={args.t}"
        print(peak_line(case, dev, flops, t_vec))


if __name__ == "__main__":
    main()
