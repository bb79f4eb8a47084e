"""Tests of reference/curves.py and reference/bn.py: curve algebra (endpoints, partition of unity,
Bezier linear precision, polychain bends, tangents), the Eq. (2) objective (vmapped = looped, values
and gradients), curve training (it lowers the loss barrier of two digits MLPs; vectorized = loop;
determinism; no mutation), BatchNorm recomputation (exact statistics) and input errors."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_nets import bn_point, relu_mlp
from torch import Tensor, nn
from torch.func import functional_call

from reference.barrier import linear_path
from reference.bn import recompute_bn_stats, recompute_bn_stats_batched
from reference.curves import Bezier, Curve, PolyChain, curve_loss, evaluate_curve, make_kind, train_curve
from reference.evaluate import evaluate_points
from reference.params import Params, unstack
from reference.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny networks (tests/conftest.py)

KINDS = [Bezier(n) for n in (1, 2, 3, 4)] + [PolyChain(b) for b in (1, 2, 3)]
D_IN, N_CLS = 6, 3


def mlp() -> nn.Module:
    return relu_mlp(D_IN, [8], N_CLS)


def bn_net(momentum: float | None = 0.1) -> nn.Module:
    # two BatchNorm layers, the second after a Linear with a bias
    return nn.Sequential(
        nn.Linear(D_IN, 8, bias=False),
        nn.BatchNorm1d(8, momentum=momentum),
        nn.ReLU(),
        nn.Linear(8, 5),
        nn.BatchNorm1d(5, momentum=momentum),
        nn.ReLU(),
        nn.Linear(5, N_CLS),
    )


def point(make, seed: int, dtype: torch.dtype = torch.float64) -> Params:
    """An initialisation with non-trivial BatchNorm statistics (not 0 / 1), in ``dtype``."""
    return bn_point(make, seed, dtype)


def data(n: int = 96, dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    w = torch.randn(D_IN, N_CLS, generator=g, dtype=torch.float64)
    return x.to(dtype), (x @ w).argmax(1)


def random_curve(kind, make=mlp, seed: int = 0) -> Curve:
    pts = [point(make, seed + i) for i in range(kind.n_points)]
    return Curve(kind, pts[0], pts[-1], tuple(pts[1:-1]))


def snapshot(p: Params) -> Params:
    return {k: v.clone() for k, v in p.items()}


def assert_equal_params(a: Params, b: Params) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------
# curve algebra


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_endpoints_are_exact(kind) -> None:
    """φ(0) = θ_start and φ(1) = θ_end exactly (c(0) = e₀, c(1) = e_n), integer buffers included."""
    c = random_curve(kind, bn_net)
    ends = unstack(c.points_at(torch.tensor([0.0, 1.0], dtype=torch.float64)))
    assert_equal_params(ends[0], c.start)
    for k, v in c.end.items():
        if v.is_floating_point():
            assert torch.equal(ends[1][k], v), k
        else:  # counters come from the start point all along the curve
            assert torch.equal(ends[1][k], c.start[k]), k


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_coefficients_partition_of_unity(kind) -> None:
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    c = kind.coeffs(t)
    assert c.shape == (1001, kind.n_points)
    assert bool((c >= 0).all())
    torch.testing.assert_close(c.sum(1), torch.ones(1001, dtype=torch.float64), rtol=0, atol=1e-14)
    torch.testing.assert_close(kind.dcoeffs(t).sum(1), torch.zeros(1001, dtype=torch.float64), rtol=0, atol=1e-12)


def test_bezier_coefficients_formula() -> None:
    """Quadratic case written out as in Garipov et al. §3.2: (1 − t)², 2t(1 − t), t²."""
    t = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0], dtype=torch.float64)
    want = torch.stack([(1 - t) ** 2, 2 * t * (1 - t), t**2], 1)
    torch.testing.assert_close(Bezier(2).coeffs(t), want, rtol=0, atol=1e-15)


def test_polychain_one_bend_formula() -> None:
    """One bend as in Garipov et al. §3.2: 2(tθ + (½ − t)ŵ₁) on [0, ½], 2((t − ½)ŵ₂ + (1 − t)θ) on [½, 1]."""
    t = torch.linspace(0, 1, 41, dtype=torch.float64)
    lo = t <= 0.5
    want = torch.zeros(41, 3, dtype=torch.float64)
    want[lo, 0] = 2 * (0.5 - t[lo])
    want[lo, 1] = 2 * t[lo]
    want[~lo, 1] = 2 * (1 - t[~lo])
    want[~lo, 2] = 2 * (t[~lo] - 0.5)
    torch.testing.assert_close(PolyChain(1).coeffs(t), want, rtol=0, atol=1e-15)


@pytest.mark.parametrize("order", [2, 3, 4])
def test_bezier_on_a_line_is_the_line(order: int) -> None:
    """Control points equally spaced on the segment (init_linear) give φ(t) = (1 − t)θ₁ + tθ₂; for
    the quadratic curve that is the midpoint control point."""
    a, b = point(mlp, 1), point(mlp, 2)
    c = Curve.init_linear(a, b, Bezier(order))
    if order == 2:
        mid = {k: 0.5 * (a[k] + b[k]) for k in a}
        for k in a:
            torch.testing.assert_close(c.free[0][k], mid[k], rtol=0, atol=1e-15)
    t = torch.linspace(0, 1, 17, dtype=torch.float64)
    got = c.points_at(t)
    _, want = linear_path(a, b, 17)
    for k in a:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bends", [1, 2, 3])
def test_polychain_passes_through_its_bends(bends: int) -> None:
    kind = PolyChain(bends)
    c = random_curve(kind)
    at = unstack(c.points_at(kind.knots))
    for got, want in zip(at, c.points, strict=True):
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_dcoeffs_match_finite_differences(kind) -> None:
    """Central differences, h = 1e-6, at points away from the polychain's kinks."""
    t = torch.tensor([0.05, 0.2, 0.41, 0.6, 0.77, 0.9], dtype=torch.float64)
    h = 1e-6
    fd = (kind.coeffs(t + h) - kind.coeffs(t - h)) / (2 * h)
    torch.testing.assert_close(kind.dcoeffs(t), fd, rtol=1e-6, atol=1e-6)
    c = random_curve(kind)
    tan = c.tangents_at(t)
    hi, lo = c.points_at(t + h), c.points_at(t - h)
    for k in tan:
        torch.testing.assert_close(tan[k], (hi[k] - lo[k]) / (2 * h), rtol=1e-5, atol=1e-6)


def test_python_float_t_is_float64() -> None:
    """A Python float t is not rounded to float32 (torch's default dtype) on its way in."""
    c = random_curve(Bezier(2))
    t = 0.5625357252285826
    assert Bezier(2).coeffs(t).dtype == torch.float64
    got = unstack(c.points_at(t))[0]
    want = unstack(c.points_at(torch.tensor([t], dtype=torch.float64)))[0]
    assert_equal_params(got, want)
    torch.testing.assert_close(Bezier(2).coeffs(t)[0, 2], torch.tensor(t * t, dtype=torch.float64), rtol=1e-15, atol=0)


def test_polychain_derivative_at_knots_is_right_sided() -> None:
    k = PolyChain(2)  # knots 0, 1/3, 2/3, 1; slopes ±3
    d = k.dcoeffs(torch.tensor([0.0, 1 / 3, 1.0], dtype=torch.float64))
    want = torch.tensor([[-3, 3, 0, 0], [0, -3, 3, 0], [0, 0, -3, 3]], dtype=torch.float64)
    torch.testing.assert_close(d, want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# the objective of Eq. (2)


@pytest.mark.parametrize("make", [mlp, bn_net], ids=["mlp", "bn"])
@pytest.mark.parametrize("kind", [Bezier(3), PolyChain(2)], ids=str)
def test_vmapped_objective_is_mean_of_single_t_losses(make, kind) -> None:
    """(1/T) Σⱼ L(φ(tⱼ)) in one vmapped call = the mean of T single-t losses: value and gradient."""
    c = random_curve(kind, make)
    x, y = data(40)
    keys = [n for n, _ in make().named_parameters()]
    free = tuple({k: (v.clone().requires_grad_(True) if k in keys else v) for k, v in p.items()} for p in c.free)
    c = Curve(c.kind, c.start, c.end, free)
    leaves = [p[k] for p in free for k in keys]
    t = torch.tensor([0.1, 0.35, 0.5, 0.93], dtype=torch.float64)

    many = curve_loss(make(), c, x, y, t)
    g_many = torch.autograd.grad(many, leaves)
    singles = [curve_loss(make(), c, x, y, t[j : j + 1]) for j in range(len(t))]
    mean = sum(singles) / len(t)
    g_mean = torch.autograd.grad(mean, leaves)
    looped = curve_loss(make(), c, x, y, t, vectorized=False)
    torch.testing.assert_close(many, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(looped, mean, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_many, g_mean, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # endpoints are constants: only the free points receive gradients
    assert all(not v.requires_grad for v in c.start.values())


def test_curve_loss_in_eval_mode_is_evaluate_points() -> None:
    c = random_curve(Bezier(2), bn_net)
    x, y = data(30)
    t = torch.tensor([0.2, 0.7], dtype=torch.float64)
    got = curve_loss(bn_net(), c, x, y, t, train_mode=False)
    want = evaluate_points(bn_net(), c.points_at(t), x, y).loss.double().mean()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)  # evaluate_points reports float32


# ---------------------------------------------------------------------------------------------
# training


def test_trained_bezier_lowers_the_barrier_on_digits(digits_modes) -> None:
    """Two independently trained MLPs 64-32-32-10 on sklearn digits: after 10 epochs of curve training
    (SGD 0.05, momentum 0.9, T = 4 per step) the maximum train loss along the quadratic Bezier is far
    below that along the segment (measured: 0.07 against 0.71; asserted: below half)."""
    model, ds, a, b = digits_modes
    splits = {"train": (ds.x_train, ds.y_train), "test": (ds.x_test, ds.y_test)}
    a0, b0 = snapshot(a), snapshot(b)
    cfg = TrainConfig(epochs=10, batch_size=64, lr=0.05)
    curve = train_curve(model, a, b, ds.x_train, ds.y_train, cfg=cfg, seed=0, points_per_step=4, progress=False)
    assert_equal_params(a, a0)
    assert_equal_params(b, b0)
    assert_equal_params(curve.start, a)
    assert_equal_params(curve.end, b)
    line = evaluate_curve(model, Curve.init_linear(a, b, "bezier", 2), splits, 21)
    bez = evaluate_curve(model, curve, splits, 21)
    line_max = float(line.curves["train"]["loss"].max())
    bez_max = float(bez.curves["train"]["loss"].max())
    assert bez_max < 0.5 * line_max, (bez_max, line_max)
    assert bez.barrier_table()["train_loss_max_chord"] < line.barrier_table()["train_loss_max_chord"]
    assert float(bez.curves["test"]["error"].max()) < float(line.curves["test"]["error"].max())


@pytest.mark.parametrize("kind,n", [("bezier", 3), ("polychain", 2)])
@pytest.mark.parametrize("make", [mlp, bn_net], ids=["mlp", "bn"])
def test_vectorized_training_equals_the_loop(kind: str, n: int, make) -> None:
    """Same draws, same objective: the vmapped and the looped trainer follow the same trajectory."""
    a, b = point(make, 1), point(make, 2)
    x, y = data(64)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, optimizer="adam")
    kw = dict(cfg=cfg, kind=kind, order=n, bends=n, seed=3, points_per_step=3, l2=1e-3, progress=False)
    vec = train_curve(make(), a, b, x, y, vectorized=True, **kw)
    loop = train_curve(make(), a, b, x, y, vectorized=False, **kw)
    for p, q in zip(vec.free, loop.free, strict=True):
        for k in p:
            torch.testing.assert_close(p[k], q[k], rtol=1e-9, atol=1e-10)
    moved = max(
        float((p[k] - q[k]).abs().max())
        for p, q in zip(vec.free, Curve.init_linear(a, b, kind, n).free, strict=True)
        for k in p
    )
    assert moved > 1e-3  # the free points were trained


def test_curve_l2_option_matches_authors_regulariser() -> None:
    """``l2_on="curve"`` penalises ½λ‖φ(t)‖²: its trajectory differs from ``"free"`` and from no L2."""
    a, b = point(mlp, 1), point(mlp, 2)
    x, y = data(48)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.1)
    runs = {
        on: train_curve(mlp(), a, b, x, y, cfg=cfg, seed=0, l2=0.5 if on else 0.0, l2_on=on or "free", progress=False)
        for on in ("", "free", "curve")
    }
    w = "0.weight"
    assert not torch.allclose(runs[""].free[0][w], runs["free"].free[0][w])
    assert not torch.allclose(runs["free"].free[0][w], runs["curve"].free[0][w])
    # L2 shrinks the free point
    assert runs["free"].free[0][w].norm() < runs[""].free[0][w].norm()


def test_training_is_deterministic_and_leaves_inputs_alone() -> None:
    model = bn_net(momentum=None)  # cumulative BatchNorm runs under vmap during curve training
    a, b = point(bn_net, 1, torch.float32), point(bn_net, 2, torch.float32)
    x, y = data(50, torch.float32)
    a0, b0, x0, y0 = snapshot(a), snapshot(b), x.clone(), y.clone()
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, grad_clip=1.0)
    c1 = train_curve(model, a, b, x, y, cfg=cfg, kind="polychain", bends=2, seed=5, progress=False)
    c2 = train_curve(model, a, b, x, y, cfg=cfg, kind="polychain", bends=2, seed=5, progress=False)
    for p, q in zip(c1.free, c2.free, strict=True):
        assert_equal_params(p, q)
    assert_equal_params(a, a0)
    assert_equal_params(b, b0)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert model[1].momentum is None and model[4].momentum is None
    assert model.training  # a fresh module is in train mode and stays so
    model.eval()
    train_curve(model, a, b, x, y, cfg=cfg, kind="polychain", bends=2, seed=5, progress=False)
    assert not any(m.training for m in model.modules())
    # buffers of the free points are the initial (interpolated) ones: recomputed at evaluation
    init = Curve.init_linear(a, b, "polychain", 2)
    for p, q in zip(c1.free, init.free, strict=True):
        assert torch.equal(p["1.running_mean"], q["1.running_mean"])


def test_training_diverges_with_a_clear_error() -> None:
    a, b = point(mlp, 1), point(mlp, 2)
    x, y = data(32)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=1e30)
    with pytest.raises(ValueError, match="diverged"):
        train_curve(mlp(), a, b, x, y, cfg=cfg, progress=False)


# ---------------------------------------------------------------------------------------------
# BatchNorm statistics


def bn_inputs(model: nn.Module, params: Params, x: Tensor) -> list[Tensor]:
    """The inputs of every BatchNorm module (train mode, batch statistics), by forward hooks."""
    seen: list[Tensor] = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
        for m in model.modules()
        if isinstance(m, nn.BatchNorm1d)
    ]
    model.train()
    with torch.no_grad():
        functional_call(model, {k: v.clone() for k, v in params.items()}, (x,))
    for h in hooks:
        h.remove()
    return seen


def test_bn_recompute_gives_the_exact_statistics() -> None:
    model = bn_net()
    p = point(bn_net, 4)
    x, _ = data(45)
    p0, x0 = snapshot(p), x.clone()
    q = recompute_bn_stats(model, p, x)
    h1, h2 = bn_inputs(model, p, x)
    for pre, h in (("1", h1), ("4", h2)):
        torch.testing.assert_close(q[f"{pre}.running_mean"], h.mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(q[f"{pre}.running_var"], h.var(0), rtol=1e-12, atol=1e-12)  # unbiased
        assert int(q[f"{pre}.num_batches_tracked"]) == 1
    for k in p:
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(q[k], p[k])
    assert_equal_params(p, p0)
    assert torch.equal(x, x0)
    # in eval mode the recomputed point normalises the first layer by the data's own statistics
    model.eval()
    with torch.no_grad():
        z = functional_call(model[:2], {k: v for k, v in q.items() if k.split(".")[0] in ("0", "1")}, (x,))
    torch.testing.assert_close(z.mean(0), q["1.bias"], rtol=1e-10, atol=1e-10)


def test_bn_recompute_in_chunks() -> None:
    """The first BatchNorm's input does not depend on the chunking: pooled = exact for any
    batch_size; ``"garipov"`` = the size-weighted mean of the chunks' variances (update_bn)."""
    model = bn_net()
    p = point(bn_net, 4)
    x, _ = data(45)
    (h1, _) = bn_inputs(model, p, x)
    q = recompute_bn_stats(model, p, x, batch_size=10)  # 5 chunks of 9
    torch.testing.assert_close(q["1.running_mean"], h1.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q["1.running_var"], h1.var(0), rtol=1e-12, atol=1e-12)
    assert int(q["1.num_batches_tracked"]) == 5
    g = recompute_bn_stats(model, p, x, batch_size=10, method="garipov")
    want = torch.stack([h1[i : i + 9].var(0) for i in range(0, 45, 9)]).mean(0)
    torch.testing.assert_close(g["1.running_mean"], h1.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g["1.running_var"], want, rtol=1e-12, atol=1e-12)
    # module state restored
    assert model[1].momentum == 0.1 and model.training


def test_bn_recompute_conv_counts_positions() -> None:
    """BatchNorm2d: statistics over examples × positions, unbiased by that count."""
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, momentum=None), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2)
    )
    model = model.double()
    p = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(11, 2, 6, 6, dtype=torch.float64)
    h = functional_call(model[:1], {k[2:]: v for k, v in p.items() if k.startswith("0.")}, (x,)).detach()
    for bs in (None, 4):
        q = recompute_bn_stats(model, p, x, batch_size=bs)
        torch.testing.assert_close(q["1.running_mean"], h.mean((0, 2, 3)), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(q["1.running_var"], h.var((0, 2, 3)), rtol=1e-12, atol=1e-12)
    assert model[1].momentum is None


def test_bn_recompute_batched_equals_single() -> None:
    model = bn_net()
    c = random_curve(Bezier(2), bn_net)
    x, _ = data(40)
    st = c.points_at(torch.linspace(0, 1, 5, dtype=torch.float64))
    st0 = snapshot(st)
    for chunk in (2, 1, None):  # vmapped, one point per call without vmap, the default (auto_chunk_size)
        got = recompute_bn_stats_batched(model, st, x, batch_size=16, chunk_size=chunk)
        assert_equal_params(st, st0)
        for j, pj in enumerate(unstack(st)):
            want = recompute_bn_stats(model, pj, x, batch_size=16)
            for k in want:
                torch.testing.assert_close(got[k][j], want[k], rtol=1e-10, atol=1e-12)


def test_bn_recompute_without_batchnorm_is_a_copy() -> None:
    p = point(mlp, 0)
    q = recompute_bn_stats(mlp(), p, data(10)[0])
    assert_equal_params(q, p)
    assert all(q[k] is not p[k] for k in p)


def test_evaluate_curve_recomputes_bn_at_every_t() -> None:
    model = bn_net()
    c = random_curve(Bezier(2), bn_net)
    x, y = data(60)
    splits = {"train": (x, y)}
    ev = evaluate_curve(model, c, splits, 5)
    pts = unstack(c.points_at(torch.linspace(0, 1, 5, dtype=torch.float64)))
    want = [evaluate_points(model, {k: v[None] for k, v in recompute_bn_stats(model, p, x).items()}, x, y) for p in pts]
    torch.testing.assert_close(ev.curves["train"]["loss"], torch.cat([w.loss for w in want]), rtol=1e-5, atol=1e-6)
    stale = evaluate_curve(model, c, splits, 5, recompute_bn=False)
    assert not torch.allclose(stale.curves["train"]["loss"], ev.curves["train"]["loss"])
    assert ev.t.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert {b.split for b in ev.barriers()} == {"train"}


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_kinds() -> None:
    with pytest.raises(ValueError, match="order"):
        Bezier(0)
    with pytest.raises(ValueError, match="bends"):
        PolyChain(0)
    with pytest.raises(TypeError, match="order"):
        Bezier(2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown curve kind"):
        make_kind("spline")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Bezier(2).coeffs(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="1-D"):
        PolyChain(1).coeffs(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Bezier(2).coeffs(torch.tensor([math.nan]))


def test_mismatched_points_name_the_key() -> None:
    a, b = point(mlp, 1), point(mlp, 2)
    bad = dict(b)
    bad["2.weight"] = torch.zeros(4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="2.weight"):
        Curve.init_linear(a, bad, "bezier", 2)
    missing = {k: v for k, v in b.items() if k != "0.bias"}
    with pytest.raises(ValueError, match="0.bias"):
        Curve.init_linear(a, missing, "polychain", 1)
    with pytest.raises(ValueError, match="2.weight"):
        Curve(Bezier(2), a, b, (bad,))
    with pytest.raises(ValueError, match="free control point"):
        Curve(Bezier(3), a, b, (a,))
    with pytest.raises(ValueError, match="one or the other"):
        Curve.init_linear(a, b, Bezier(2), 3)
    x, y = data(20)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.1)
    with pytest.raises(ValueError, match="2.weight"):
        train_curve(mlp(), a, bad, x, y, cfg=cfg, progress=False)


def test_bad_training_arguments() -> None:
    a, b = point(mlp, 1), point(mlp, 2)
    x, y = data(20)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.1)
    with pytest.raises(ValueError, match="no free control points"):
        train_curve(mlp(), a, b, x, y, cfg=cfg, order=1, progress=False)
    with pytest.raises(ValueError, match="order"):
        train_curve(mlp(), a, b, x, y, cfg=cfg, order=0, progress=False)
    with pytest.raises(ValueError, match="bends"):
        train_curve(mlp(), a, b, x, y, cfg=cfg, kind="polychain", bends=0, progress=False)
    with pytest.raises(ValueError, match="points_per_step"):
        train_curve(mlp(), a, b, x, y, cfg=cfg, points_per_step=0, progress=False)
    with pytest.raises(ValueError, match="l2"):
        train_curve(mlp(), a, b, x, y, cfg=cfg, l2=-1.0, progress=False)
    with pytest.raises(ValueError, match="l2_on"):
        train_curve(mlp(), a, b, x, y, cfg=cfg, l2_on="all", progress=False)
    with pytest.raises(TypeError, match="TrainConfig"):
        train_curve(mlp(), a, b, x, y, cfg={"lr": 0.1}, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="state_dict"):
        train_curve(bn_net(), a, b, x, y, cfg=cfg, progress=False)
    with pytest.raises(ValueError, match="2 examples"):
        recompute_bn_stats(bn_net(), point(bn_net, 0), x[:1])
    with pytest.raises(ValueError, match="batch_size"):
        recompute_bn_stats(bn_net(), point(bn_net, 0), x, batch_size=0)
    with pytest.raises(ValueError, match="method"):
        recompute_bn_stats(bn_net(), point(bn_net, 0), x, method="ema")
    with pytest.raises(ValueError, match="state_dict"):
        recompute_bn_stats(bn_net(), a, x)


@pytest.mark.gpu
def test_train_curve_on_cuda_matches_cpu() -> None:
    a, b = point(bn_net, 1, torch.float32), point(bn_net, 2, torch.float32)
    x, y = data(64, torch.float32)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05)
    cpu = train_curve(bn_net(), a, b, x, y, cfg=cfg, seed=1, progress=False)
    gpu = train_curve(bn_net(), a, b, x, y, cfg=cfg, seed=1, device="cuda", progress=False)
    for k in cpu.free[0]:
        torch.testing.assert_close(gpu.free[0][k], cpu.free[0][k], rtol=5e-3, atol=5e-4)
    ev = evaluate_curve(bn_net(), gpu, {"train": (x, y)}, 5, device="cuda")
    assert bool(torch.isfinite(ev.curves["train"]["loss"]).all())
