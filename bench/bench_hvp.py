"""Benchmark: one Hessian-vector product of the training loss, three ways, side by side in one run.

- forward-over-reverse: ``jvp(grad(L), θ, v)`` (``reference.hessian.hvp``, what ``LossHessian`` uses);
- double backward: ``torch.autograd.grad`` twice, ∇(∇L · v) (the classic reference, PyHessian's);
- reverse-over-reverse: ``vjp(grad(L), θ)(v)`` with ``torch.func``;
``LossHessian``'s two ``hvp_mode``s (one HVP and k at once), and k HVPs in one ``hvp_many`` call against k single
calls.
All three are checked to agree before timing; repeats are interleaved round-robin and the median
reported; the goal line (``hvp_mode="auto"`` at least 0.95x the faster mode) compares the two modes by the paired
ratio (``harness.paired_ratio``). Machines are noisy: compare the ratios, not seconds.

    python bench/bench_hvp.py [--device cpu|cuda|auto] [--repeats 7] [--dtype float32|float64] [--tiny]
"""

from __future__ import annotations

import statistics

import torch
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

from reference.hessian import hvp, hvp_double_backward, hvp_reverse_over_reverse, loss_hessian
from reference.models import CNN1D, MLP, init_params


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def bench_case(name: str, model, x_shape: tuple[int, ...], n: int, dev: torch.device, dtype: torch.dtype,
               repeats: int, k: int) -> None:
    model = model.to(dev, dtype)
    params = {kk: v.to(dev, dtype) for kk, v in init_params(model, 0).items()}
    g = torch.Generator().manual_seed(0)
    x, y = random_task(n, x_shape, 10, g)
    x, y = x.to(dev, dtype), y.to(dev)
    H = loss_hessian(model, params, x, y)
    f = H.loss_fn()
    v = torch.randn(H.dim, generator=g).to(dev, dtype)
    V = torch.randn(k, H.dim, generator=g).to(dev, dtype)
    ref = hvp(f, H.theta, v)
    tol = 1e-3 if dtype == torch.float32 else 1e-9
    for other in (hvp_double_backward(f, H.theta, v), hvp_reverse_over_reverse(f, H.theta, v)):
        torch.testing.assert_close(other, ref, rtol=tol, atol=tol * float(ref.abs().max()))
    print(f"\n{name}: {H.dim} parameters, {n} inputs, {dtype}, {dev}")
    t_db, t_for, t_rr = time_calls([lambda: hvp_double_backward(f, H.theta, v), lambda: hvp(f, H.theta, v),
                                    lambda: hvp_reverse_over_reverse(f, H.theta, v)], dev, repeats)
    print(f"  double backward (autograd.grad ×2):    {1e3 * t_db:8.2f} ms   1.00×")
    print(f"  forward-over-reverse (jvp ∘ grad):      {1e3 * t_for:8.2f} ms   {t_db / t_for:.2f}× double backward")
    print(f"  reverse-over-reverse (vjp ∘ grad):      {1e3 * t_rr:8.2f} ms   {t_db / t_rr:.2f}× double backward")
    Hf, Hd = (loss_hessian(model, params, x, y, hvp_mode=m) for m in ("forward-over-reverse", "double-backward"))
    torch.testing.assert_close(Hd.hvp_many(V), Hf.hvp_many(V), rtol=tol, atol=tol * float(ref.abs().max()))
    samples = time_samples([lambda: Hf.hvp(v), lambda: Hd.hvp(v), lambda: Hf.hvp_many(V), lambda: Hd.hvp_many(V)],
                           dev, repeats)
    t_f1, t_d1, t_fk, t_dk = (statistics.median(s) for s in samples)
    print(f"  LossHessian, 1 HVP:  forward-over-reverse {1e3 * t_f1:8.2f} ms, double backward {1e3 * t_d1:8.2f} ms   "
          f"double backward {t_f1 / t_d1:.2f}× as fast")
    print(f"  LossHessian, {k} HVPs (hvp_many): forward {1e3 * t_fk:8.2f} ms, double backward {1e3 * t_dk:8.2f} ms   "
          f"double backward {t_fk / t_dk:.2f}× as fast; hvp_mode='auto' takes {H.mode} on {dev.type}")
    # the paired ratio (median over rounds of the other mode's time over auto's, both taken in the same round):
    # where the two modes nearly tie, ratios of medians taken over the whole run drift with the machine's load
    auto_i, other_i = (3, 2) if H.mode == "double-backward" else (2, 3)
    ratio = min(1.0, paired_ratio(samples, other_i, auto_i))
    print(f"goal: HVP mode 'auto' is the faster one [{name}, {dev.type}]: auto ({H.mode}) = "
          f"{ratio:.2f}x the faster of the two (paired): {_met(ratio >= 0.95)}")
    t_loop, t_many = time_calls([lambda: [H.hvp(V[i]) for i in range(k)], lambda: H.hvp_many(V)], dev, repeats)
    print(f"  {k} HVPs, one call each (LossHessian.hvp): {1e3 * t_loop:8.2f} ms = {1e3 * t_loop / k:.2f} ms/HVP")
    print(f"  {k} HVPs, one vmapped call (hvp_many):    {1e3 * t_many:8.2f} ms = {1e3 * t_many / k:.2f} ms/HVP   "
          f"{t_loop / t_many:.2f}× the loop")
    print(peak_line(f"{name}: {k} HVPs, hvp_many ({H.mode})", dev, counted_flops(lambda: H.hvp_many(V)), t_many, dtype))


def main() -> None:
    p = bench_parser(__doc__, repeats=7)
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--k", type=int, default=16, help="HVPs per vmapped call")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    print(versions())
    for dev in devices(args.device):
        if args.tiny:
            bench_case("tiny MLP 8-4-10", MLP(8, [4], 10), (8,), 32, dev, dtype, args.repeats, args.k)
            continue
        bench_case("digits MLP 64-24-24-10 (the rashomon-hessian net)", MLP(64, [24, 24], 10), (64,), 1437, dev,
                   dtype, args.repeats, args.k)
        bench_case("MLP 784-256-256-10", MLP(784, [256, 256], 10), (784,), 2000, dev, dtype, args.repeats, args.k)
        bench_case("CNN1D [32, 32, 32] on MNIST-1D-shaped inputs", CNN1D(1, [32, 32, 32], 10), (40,), 2000, dev,
                   dtype, args.repeats, args.k)


if __name__ == "__main__":
    main()
