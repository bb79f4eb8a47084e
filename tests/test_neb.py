"""Tests of reference/neb.py (Draxler et al. 2018, AutoNEB): the vmapped chain gradient equals one
call per pivot, relaxation lowers the loss barrier of two digits MLPs below the segment's, AutoNEB
inserts pivots where the chain's loss rises between them, determinism, no mutation, budget
accounting, BatchNorm (statistics recomputed at every evaluated point), the result's path accepted
by ``reference.barrier.evaluate_path``, and input errors."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_nets import bn_mlp, bn_point, relu_mlp
from torch import Tensor, nn
from torch.func import functional_call

from reference.barrier import evaluate_path, linear_path
from reference.bn import recompute_bn_stats
from reference.evaluate import evaluate_points
from reference.neb import (
    NEBConfig,
    NEBPath,
    _chain_losses,
    evaluate_neb,
    improved_tangents,
    insert_pivots,
    insertion_points,
    interp_coeffs,
    neb,
    redistribute,
)
from reference.params import Params, unstack
from reference.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny networks (tests/conftest.py)

D_IN, N_CLS = 6, 3


def mlp() -> nn.Module:
    return relu_mlp(D_IN, [8], N_CLS).double()


def bn_net() -> nn.Module:
    return bn_mlp(D_IN, [8], N_CLS).double()


point = bn_point  # float64 initialisations (the nets are), BatchNorm statistics not 0 / 1


def data(n: int = 96, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    w = torch.randn(D_IN, N_CLS, generator=g, dtype=torch.float64)
    return x, (x @ w).argmax(1)


def small_cfg(**kw) -> NEBConfig:
    base = dict(init_pivots=2, cycles=2, max_pivots=5, sub_points=3,
                train=TrainConfig(epochs=2, batch_size=16, lr=1e-2, optimizer="adam"))
    return NEBConfig(**{**base, **kw})


def snapshot(p: Params) -> Params:
    return {k: v.clone() for k, v in p.items()}


# ---------------------------------------------------------------------------------------------
# the pieces


@pytest.mark.parametrize("make", [mlp, bn_net], ids=["mlp", "bn"])
def test_vmapped_chain_gradient_equals_per_pivot_calls(make) -> None:
    """One vmapped call over the M pivots gives each interior pivot the gradient of its own minibatch
    loss (train mode: BatchNorm uses batch statistics)."""
    model = make()
    pts = [point(make, s) for s in range(4)]
    keys = [k for k, _ in model.named_parameters()]
    bkeys = [k for k in pts[0] if k not in keys]
    flat = torch.stack([torch.cat([p[k].reshape(-1) for k in keys]) for p in pts])
    leaf = flat[1:-1].clone().requires_grad_(True)
    bufs = {k: torch.stack([p[k] for p in pts]) for k in bkeys}
    x, y = data(32)
    model.train()
    losses = _chain_losses(model, torch.cat([flat[:1], leaf, flat[-1:]]), keys, pts[0], bufs, {}, x, y)
    (g,) = torch.autograd.grad(losses[1:-1].sum(), leaf)
    for i in (1, 2):
        p = {k: pts[i][k].clone().requires_grad_(k in keys) for k in pts[i]}
        loss = nn.functional.cross_entropy(functional_call(model, p, (x,)), y)
        torch.testing.assert_close(losses[i], loss.detach(), rtol=1e-12, atol=1e-12)
        want = torch.cat([gk.reshape(-1) for gk in torch.autograd.grad(loss, [p[k] for k in keys])])
        torch.testing.assert_close(g[i - 1], want, rtol=1e-10, atol=1e-12)


def test_tangent_at_a_maximum_mixes_both_sides() -> None:
    """At a loss maximum the tangent weighs τ⁺ and τ⁻ by ΔL_max / ΔL_min (Henkelman & Jónsson Eq. 10)."""
    chain = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    losses = torch.tensor([0.0, 3.0, 1.0], dtype=torch.float64)
    tau = improved_tangents(chain, losses)
    # ΔL_max = 3, ΔL_min = 2 and L_next > L_prev: τ = τ⁺ ΔL_max + τ⁻ ΔL_min = (0, 1)·3 + (1, 0)·2
    want = torch.tensor([[2.0, 3.0]], dtype=torch.float64) / math.sqrt(13.0)
    torch.testing.assert_close(tau, want)


def test_interp_coeffs_and_redistribute_on_a_bent_chain() -> None:
    """Arc length along a right angle: the midpoint of a chain (0,0)→(1,0)→(1,1) is the corner."""
    chain = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    out = redistribute(chain, 5)
    want = torch.tensor([[0, 0], [0.5, 0], [1, 0], [1, 0.5], [1, 1]], dtype=torch.float64)
    torch.testing.assert_close(out, want)
    c = interp_coeffs(torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64), torch.tensor([0.125, 0.25, 0.625]))
    torch.testing.assert_close(c, torch.tensor([[0.5, 0.5, 0], [0, 1, 0], [0, 0.5, 0.5]], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# relaxation


def test_autoneb_lowers_the_barrier_on_digits(digits_modes) -> None:
    """Two independently trained digits MLPs: 3 AutoNEB cycles of 3 epochs (Adam 1e-3, 3 pivots to
    start, up to 2 inserted per cycle) bring the max train loss along the chain far below that along
    the segment (asserted: below half, and a lower max test error); endpoints exact, inputs untouched;
    the same seed gives the same chain."""
    model, ds, a, b = digits_modes
    splits = {"train": (ds.x_train, ds.y_train), "test": (ds.x_test, ds.y_test)}
    a0, b0 = snapshot(a), snapshot(b)
    cfg = NEBConfig(init_pivots=3, cycles=3, train=TrainConfig(epochs=3, batch_size=64, lr=1e-3, optimizer="adam"))
    path = neb(model, a, b, ds.x_train, ds.y_train, cfg=cfg, seed=0, progress=False)
    for k in a:
        assert torch.equal(a[k], a0[k]) and torch.equal(b[k], b0[k])
        assert torch.equal(path.pivots[k][0], a[k]) and torch.equal(path.pivots[k][-1], b[k])
    line = evaluate_path(model, *linear_path(a, b, 21), splits)
    pe = evaluate_neb(model, path, splits, sub=4)
    assert pe.t.shape[0] == (path.n_pivots - 1) * 5 + 1
    line_max, neb_max = float(line.curves["train"]["loss"].max()), float(pe.curves["train"]["loss"].max())
    assert neb_max < 0.5 * line_max, (neb_max, line_max)
    assert pe.barrier_table()["train_loss_max_chord"] < line.barrier_table()["train_loss_max_chord"]
    assert float(pe.curves["test"]["error"].max()) < float(line.curves["test"]["error"].max())
    # history and budget
    steps = cfg.train.epochs * cfg.train.steps_per_epoch(ds.x_train.shape[0])
    assert [h["steps"] for h in path.history] == [steps] * 3
    assert path.budget()["pivot_gradients"] == sum(steps * h["interior_pivots"] for h in path.history)
    assert path.n_pivots - 2 == path.history[-1]["interior_pivots"] >= 3
    again = neb(model, a, b, ds.x_train, ds.y_train, cfg=NEBConfig(**{**cfg.__dict__, "cycles": 1}),
                seed=0, progress=False)
    once = neb(model, a, b, ds.x_train, ds.y_train, cfg=NEBConfig(**{**cfg.__dict__, "cycles": 1}),
               seed=0, progress=False)
    for k in again.pivots:
        assert torch.equal(again.pivots[k], once.pivots[k]), k


def test_insertion_follows_the_loss_between_pivots() -> None:
    """The refinement before cycle 2 inserts exactly the pivots that ``insertion_points`` picks from the
    loss at the pivots and at ``sub_points`` points inside each segment of the chain after cycle 1
    (eval mode, first ``eval_examples`` examples), here computed independently with
    ``evaluate_points`` on ``NEBPath.grid``. The endpoints are a network and a copy with its hidden
    units permuted (the same loss, a bump between them), so some segment has a positive residual."""
    x, y = data(64)
    model = mlp()
    a = point(mlp, 1)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    b = {**a, "0.weight": a["0.weight"][perm], "0.bias": a["0.bias"][perm], "2.weight": a["2.weight"][:, perm]}
    kw = dict(init_pivots=2, insert_threshold=0.0, insert_per_cycle=2, sub_points=5, eval_examples=40,
              train=TrainConfig(epochs=1, batch_size=16, lr=1e-2, optimizer="adam"))
    one = neb(model, a, b, x, y, cfg=small_cfg(cycles=1, **kw), seed=3, progress=False)
    two = neb(model, a, b, x, y, cfg=small_cfg(cycles=2, **kw), seed=3, progress=False)
    t, pts = one.grid(5)
    loss = evaluate_points(model, pts, x[:40], y[:40]).loss.view(-1)
    M = one.n_pivots
    at_pivots = loss[::6]
    inside = torch.stack([loss[6 * s + 1 : 6 * s + 6] for s in range(M - 1)])
    alphas = torch.arange(1, 6, dtype=torch.float64) / 6
    want = insertion_points(at_pivots, inside, alphas, 0.0, 2)
    got = two.history[1]["inserted"]
    assert want, "the permuted pair should give a residual above 0 somewhere"
    assert [(g["segment"], g["alpha"]) for g in got] == [(s, a_) for s, a_, _ in want]
    assert two.history[1]["interior_pivots"] == 2 + len(want)
    for g, (_, _, sc) in zip(got, want, strict=True):
        assert math.isclose(g["score"], sc, rel_tol=1e-4, abs_tol=1e-6)


def test_finite_spring_and_cap_on_pivots() -> None:
    """``spring_k`` finite runs the spring force; ``max_pivots`` caps insertion; ``insert_per_cycle=0``
    never inserts."""
    x, y = data(64)
    model = mlp()
    a, b = point(mlp, 1), point(mlp, 2)
    p1 = neb(model, a, b, x, y, cfg=small_cfg(spring_k=1.0, cycles=4, insert_threshold=0.0, max_pivots=3),
             progress=False)
    assert [h["interior_pivots"] for h in p1.history] == [2, 3, 3, 3]
    p2 = neb(model, a, b, x, y, cfg=small_cfg(cycles=3, insert_per_cycle=0), progress=False)
    assert [h["interior_pivots"] for h in p2.history] == [2, 2, 2]
    # spring_k = inf: every step ends by spacing the pivots equally in arc length along the chain
    # *before* the move, so the new chain's segments are equal only up to the corners it cuts
    d = p2.distances()
    assert float(d.max() - d.min()) < 0.05 * float(d.mean()), d


def test_batchnorm_statistics_recomputed_at_every_point() -> None:
    """A BatchNorm chain: ``evaluate_neb`` recomputes the statistics at each grid point, equal to
    ``recompute_bn_stats`` at that point followed by ``evaluate_points``."""
    x, y = data(96)
    model = bn_net()
    a, b = point(bn_net, 1), point(bn_net, 2)
    path = neb(model, a, b, x, y, cfg=small_cfg(), progress=False)
    assert torch.equal(path.pivots["1.num_batches_tracked"][0], a["1.num_batches_tracked"])
    splits = {"train": (x, y)}
    pe = evaluate_neb(model, path, splits, sub=1)
    t, stacked = path.grid(1)
    for j in (0, 2, len(t) - 2):
        p = recompute_bn_stats(model, unstack(stacked)[j], x)
        m = evaluate_points(model, {k: v[None] for k, v in p.items()}, x, y)
        torch.testing.assert_close(pe.curves["train"]["loss"][j], m.loss[0], rtol=1e-5, atol=1e-6)
    raw = evaluate_neb(model, path, splits, sub=1, recompute_bn=False)
    assert not torch.allclose(raw.curves["train"]["loss"][1:-1], pe.curves["train"]["loss"][1:-1])


def test_path_points_at_matches_grid_and_uniform_param() -> None:
    g = torch.Generator().manual_seed(0)
    chain = torch.randn(4, 3, generator=g, dtype=torch.float64)
    path = NEBPath({"w": chain}, ("w",))
    t, pts = path.grid(2)
    torch.testing.assert_close(path.points_at(t)["w"], pts["w"])
    tu, pu = path.grid(0, "uniform")
    torch.testing.assert_close(tu, torch.tensor([0, 1 / 3, 2 / 3, 1], dtype=torch.float64))
    assert torch.equal(pu["w"], chain)


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(init_pivots=0), "init_pivots"),
        (dict(cycles=1.5), "cycles"),
        (dict(init_pivots=9, max_pivots=3), "exceeds max_pivots"),
        (dict(spring_k=0.0), "spring_k"),
        (dict(spring_k=math.nan), "spring_k"),
        (dict(insert_threshold=-1.0), "insert_threshold"),
        (dict(eval_examples=1), "eval_examples"),
        (dict(train=TrainConfig(epochs=1, batch_size=8, lr=0.1, weight_decay=1e-4)), "weight_decay"),
    ],
)
def test_config_errors(kw, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NEBConfig(**kw)
    with pytest.raises(TypeError, match="TrainConfig"):
        NEBConfig(train={"epochs": 1})


def test_input_errors() -> None:
    x, y = data(32)
    model = mlp()
    a, b = point(mlp, 1), point(mlp, 2)
    with pytest.raises(TypeError, match="NEBConfig"):
        neb(model, a, b, x, y, cfg=TrainConfig(epochs=1, batch_size=8, lr=0.1))
    bad = {k: v for k, v in b.items() if k != "2.bias"}
    with pytest.raises(ValueError, match="2.bias"):
        neb(model, a, bad, x, y, cfg=small_cfg(), progress=False)
    nan = {**b, "0.weight": torch.full_like(b["0.weight"], math.nan)}
    with pytest.raises(ValueError, match="0.weight"):
        neb(model, a, nan, x, y, cfg=small_cfg(), progress=False)
    with pytest.raises(ValueError, match="param"):
        NEBPath({"w": torch.zeros(3, 2)}, ("w",)).knots("curvature")
    with pytest.raises(ValueError, match="coords"):
        NEBPath({"w": torch.zeros(3, 2)}, ("v",))
    with pytest.raises(ValueError, match="leading size"):
        NEBPath({"w": torch.zeros(1, 2)}, ("w",))
    with pytest.raises(ValueError, match="sub"):
        NEBPath({"w": torch.zeros(3, 2)}, ("w",)).grid(-1)
    with pytest.raises(ValueError, match="one insertion per segment"):
        insert_pivots(torch.zeros(3, 2), [(0, 0.5), (0, 0.2)])
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        insert_pivots(torch.zeros(3, 2), [(0, 1.0)])
    with pytest.raises(ValueError, match="out of range"):
        insert_pivots(torch.zeros(3, 2), [(2, 0.5)])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        interp_coeffs(torch.tensor([0.0, 1.0]), torch.tensor([1.5]))
    with pytest.raises(TypeError, match="NEBPath"):
        evaluate_neb(model, {"w": torch.zeros(2)}, {"train": (x, y)})
