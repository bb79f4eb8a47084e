"""Tests of reference/simplex.py, reference/ensembles.py and reference/landscape.py.

Simplexes (Benton et al. 2021): Dirichlet sampling (on the simplex, uniform, seeded), vertices, the
volume of known simplexes (Gram = Cayley–Menger), the log-volume regulariser's gradient, complexes and
their sampling, SPRO around one digits MLP (interior loss low, volume grows with the regulariser) and
between two (the complex lowers the linear path's barrier), ESPRO. Ensembles: identical members,
metric tables, FGE (the Eq. of Garipov et al. 2018; constant rate = ``train``), deep ensembles. Planes
(Garipov et al. 2018, Fig. 1): basis, exact reconstruction, grid values, integer buffers, the figure.
Error paths throughout.
"""

from __future__ import annotations

import io
import math

import pytest
import tiny_nets
import torch
from scipy import stats
from torch import Tensor, nn

from reference.bn import recompute_bn_stats_batched
from reference.data import load_digits
from reference.ensembles import (
    deep_ensemble,
    ensemble_probs,
    ensemble_table,
    fge,
    fge_learning_rate,
    fge_snapshot_step,
)
from reference.evaluate import evaluate_points, predict_logits
from reference.landscape import plane_basis, plane_grid, plane_points, plot_plane, project
from reference.models import MLP, init_params
from reference.params import Params, combine_batch, distance, flatten, stack, unflatten
from reference.simplex import (
    Simplex,
    SimplicialComplex,
    cayley_menger_volume,
    espro_ensemble,
    mode_connecting_simplices,
    sample_dirichlet,
    sample_members,
    simplex_log_volume,
    simplex_volume,
    train_simplex,
)
from reference.train import TrainConfig, train, train_many

MODE_CFG = TrainConfig(epochs=15, batch_size=64, lr=0.05, momentum=0.9, schedule="cosine")
SPRO_CFG = TrainConfig(epochs=10, batch_size=64, lr=0.02, momentum=0.9, schedule="cosine")


# ---------------------------------------------------------------------------------------------
# fixtures and helpers


# tiny networks: one intra-op thread (tests/conftest.py; the 15-epoch fixture training took 31 s instead of
# 0.6 s with two threads on a loaded 2-core machine)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def mlp() -> nn.Module:
    return MLP(64, [32, 32], 10)


@pytest.fixture(scope="module")
def modes(digits, mlp) -> list[Params]:
    """Two digits MLPs (64-32-32-10) trained from seeds 0 and 1 (15 epochs, ~0.6 s)."""
    inits = [init_params(mlp, 0), init_params(mlp, 1)]
    return train_many(mlp, inits, digits.x_train, digits.y_train, MODE_CFG, [0, 1], progress=False)


def vec_point(coords: list[float], split: int = 2) -> Params:
    """A point of ℝᴰ as Params with two keys (coordinates split between them), float64."""
    t = torch.tensor(coords, dtype=torch.float64)
    return {"a": t[:split].clone(), "b": t[split:].clone(), "n": torch.tensor(3)}


def bn_net() -> nn.Module:
    return tiny_nets.bn_mlp(6, [8], 3, bias=True)


def bn_point(seed: int) -> Params:
    """An initialisation of ``bn_net`` with non-trivial BatchNorm statistics."""
    return tiny_nets.bn_point(bn_net, seed)


def train_loss(model: nn.Module, stacked: Params, digits) -> Tensor:
    return evaluate_points(model, stacked, digits.x_train, digits.y_train).loss


# ---------------------------------------------------------------------------------------------
# Dirichlet sampling


def test_dirichlet_samples_lie_on_the_simplex_and_are_uniform() -> None:
    k, n = 4, 20000
    lam = sample_dirichlet(n, k, generator=0)
    assert lam.shape == (n, k) and lam.dtype == torch.float64
    assert bool((lam >= 0).all())
    torch.testing.assert_close(lam.sum(1), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-12)
    # uniform on Δ³: mean 1/k (sd of the mean ≈ 0.0014) and each marginal is Beta(1, k − 1)
    torch.testing.assert_close(lam.mean(0), torch.full((k,), 1 / k, dtype=torch.float64), rtol=0, atol=0.01)
    for i in range(k):
        assert stats.kstest(lam[:, i].numpy(), stats.beta(1, k - 1).cdf).pvalue > 1e-3
    # seeded: the same generator seed gives the same draws; Simplex uses the same sampler
    assert torch.equal(lam, sample_dirichlet(n, k, generator=torch.Generator().manual_seed(0)))
    s = Simplex(tuple(vec_point([float(i), 0.0, 1.0]) for i in range(k)))
    assert torch.equal(s.sample_barycentric(5, 3), sample_dirichlet(5, k, 3))


# ---------------------------------------------------------------------------------------------
# simplexes: vertices and volume


def test_simplex_vertices_evaluate_to_the_vertex_models(modes, mlp, digits) -> None:
    """Σᵢ λᵢ θᵢ at λ = eᵢ is θᵢ: the same tensors and the same network outputs."""
    third = {k: 0.5 * (modes[0][k] + modes[1][k]) for k in modes[0]}
    s = Simplex((modes[0], modes[1], third))
    pts = s.points(torch.eye(3, dtype=torch.float64))
    for i, v in enumerate(s.vertices):
        for k in v:
            assert torch.equal(pts[k][i], v[k]), (i, k)
    logits = predict_logits(mlp, pts, digits.x_test)
    ref = predict_logits(mlp, stack(list(s.vertices)), digits.x_test)
    assert torch.equal(logits, ref)


@pytest.mark.parametrize(
    "coords, expected",
    [
        ([[0, 0, 0], [3, 4, 0]], 5.0),  # a segment: its length
        ([[0, 0, 0], [1, 0, 0], [0, 1, 0]], 0.5),  # unit right triangle
        ([[1, 0, 0], [0, 1, 0], [0, 0, 1]], math.sqrt(3) / 2),  # the standard 2-simplex in ℝ³
        ([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], 1 / 6),  # corner of the unit cube
        ([[0, 0, 0, 0], [2, 0, 0, 0], [0, 3, 0, 0], [0, 0, 4, 0], [0, 0, 0, 5]], 120 / 24),  # 4-simplex
    ],
)
def test_volume_of_known_simplexes(coords, expected) -> None:
    """Eq. (V): √det G / (k − 1)!, equal to the Cayley–Menger volume of the same distances."""
    pts = [vec_point([float(c) for c in p]) for p in coords]
    vol = simplex_volume(pts)
    assert vol.dtype == torch.float64
    assert float(vol) == pytest.approx(expected, rel=1e-12)
    flat = torch.stack([flatten(p) for p in pts])
    cm = cayley_menger_volume(torch.cdist(flat, flat).pow(2))
    assert float(cm) == pytest.approx(expected, rel=1e-9)
    assert float(Simplex(tuple(pts)).log_volume()) == pytest.approx(math.log(expected), rel=1e-12)
    # volume is homogeneous of degree k − 1 and translation invariant
    k = len(coords)
    moved = [{**p, "a": 3.0 * p["a"] + 1.0, "b": 3.0 * p["b"] - 2.0} for p in pts]
    assert float(simplex_volume(moved)) == pytest.approx(expected * 3.0 ** (k - 1), rel=1e-12)


def test_volume_keys_and_degenerate_simplexes() -> None:
    pts = [vec_point([0, 0, 0]), vec_point([1, 0, 0]), vec_point([0, 1, 0])]
    assert float(simplex_volume(pts, keys=["a"])) == pytest.approx(0.5)
    assert float(simplex_volume(pts, keys=["b"])) == 0.0  # all vertices agree on "b"
    collinear = [vec_point([0, 0, 0]), vec_point([1, 1, 1]), vec_point([2, 2, 2])]
    assert float(simplex_volume(collinear)) == pytest.approx(0.0, abs=1e-7)
    assert simplex_log_volume([pts[0], pts[0]]) == -math.inf


def test_log_volume_regulariser_gradient_is_finite() -> None:
    """½ log(Vol² + ε): finite gradient everywhere with ε > 0 (0 on a degenerate simplex, the SPRO
    start); with ε = 0 the gradient of log Vol for a segment is (v − θ)/‖v − θ‖² analytically."""
    theta = vec_point([1.0, -2.0, 0.5, 3.0])
    other = vec_point([0.0, 1.0, 1.0, 1.0])
    centre = {k: 0.5 * (theta[k] + other[k]) if v.is_floating_point() else v for k, v in theta.items()}
    for v0, expect_zero in ((centre, True), (vec_point([2.0, 0.0, 0.0, 1.0]), False)):
        v = {k: t.clone().requires_grad_(t.is_floating_point()) for k, t in v0.items()}
        lv = simplex_log_volume([theta, other, v], keys=["a", "b"], eps=1e-4)
        ga, gb = torch.autograd.grad(lv, [v["a"], v["b"]])
        assert bool(torch.isfinite(lv)) and bool(torch.isfinite(ga).all()) and bool(torch.isfinite(gb).all())
        assert (float(torch.cat([ga, gb]).abs().max()) == 0.0) == expect_zero
    v = {k: t.clone().requires_grad_(t.is_floating_point()) for k, t in other.items()}
    lv = simplex_log_volume([theta, v], keys=["a", "b"])
    ga, gb = torch.autograd.grad(lv, [v["a"], v["b"]])
    d = flatten(other) - flatten(theta)
    torch.testing.assert_close(torch.cat([ga, gb]), d / d.dot(d), rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------
# simplicial complexes


def test_complex_sampling_stays_in_one_simplex_and_weights_simplices() -> None:
    pts = [vec_point(c) for c in ([0, 0, 0], [4, 0, 0], [0, 1, 0], [0, 0, 1])]
    cx = SimplicialComplex(tuple(pts), ((0, 1, 2), (0, 2, 3)), fixed=(0,))
    assert cx.free == (1, 2, 3)
    torch.testing.assert_close(cx.volumes(), torch.tensor([2.0, 0.5], dtype=torch.float64))
    for weighting, expected in (("uniform", 0.5), ("volume", 0.8)):
        c = cx.sample_coefficients(4000, generator=1, weighting=weighting)
        assert bool((c >= 0).all())
        torch.testing.assert_close(c.sum(1), torch.ones(4000, dtype=torch.float64), rtol=0, atol=1e-12)
        in_first = c[:, 3] == 0
        in_second = c[:, 1] == 0
        assert bool((in_first | in_second).all())  # every sample lies in one of the two simplices
        assert float(in_first.double().mean()) == pytest.approx(expected, abs=0.03)
    stacked = cx.sample(7, generator=2)
    assert stacked["a"].shape == (7, 2) and torch.equal(stacked["n"], torch.full((7,), 3))
    assert torch.equal(cx.points(torch.eye(4, dtype=torch.float64))["b"], torch.stack([p["b"] for p in pts]))
    assert mode_connecting_simplices(1, 3) == ((0, 1, 2, 3),)
    assert mode_connecting_simplices(3, 2) == ((0, 3, 4), (1, 3, 4), (2, 3, 4))


# ---------------------------------------------------------------------------------------------
# SPRO / ESPRO on digits


def test_spro_simplex_around_one_mode(modes, mlp, digits) -> None:
    """One free vertex joined to a trained digits MLP (SPRO, 10 epochs, T = 4).

    Measured expectation: the mean training loss over 64 points sampled uniformly from the simplex
    stays below 2× the mode's loss, and the volume grows with the regulariser (λ = 0.05 against
    λ = 0: measured 1.46 vs 0.19; loss ratio 1.20)."""
    theta = modes[0]
    vols = {}
    for lam in (0.0, 0.05):
        cx = train_simplex(
            mlp, [theta], 1, digits.x_train, digits.y_train, SPRO_CFG, seed=1, vol_reg=lam, progress=False
        )
        assert cx.simplices == ((0, 1),) and cx.fixed == (0,)
        assert all(torch.equal(cx.vertices[0][k], theta[k]) for k in theta)  # the mode is not trained
        vols[lam] = float(cx.volumes()[0])
        if lam:
            vertex_loss = float(train_loss(mlp, stack([theta]), digits)[0])
            sampled = train_loss(mlp, cx.sample(64, generator=0), digits)
            assert float(sampled.mean()) < 2.0 * vertex_loss
    assert 0.0 < vols[0.0] and vols[0.05] > 3.0 * vols[0.0]


def test_spro_mode_connecting_complex_lowers_the_barrier(modes, mlp, digits) -> None:
    """Two modes and two shared free vertices: simplices {θ_j, v₁, v₂}. Measured: the worst of 256
    sampled points has training loss 0.23 against 0.89 at the middle of the straight line."""
    cfg = TrainConfig(epochs=5, batch_size=64, lr=0.02, momentum=0.9, schedule="cosine")
    cx = train_simplex(mlp, modes, 2, digits.x_train, digits.y_train, cfg, seed=2, progress=False)
    assert cx.simplices == ((0, 2, 3), (1, 2, 3)) and cx.fixed == (0, 1) and cx.n_vertices == 4
    for j in (0, 1):
        assert all(torch.equal(cx.vertices[j][k], modes[j][k]) for k in modes[j])
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    line = train_loss(mlp, combine_batch(torch.stack([1 - t, t], 1), modes), digits)
    sampled = train_loss(mlp, cx.sample(256, generator=0), digits)
    assert float(sampled.max()) < 0.5 * float(line.max())
    assert bool((cx.volumes() > 0).all())


def test_spro_is_deterministic_and_leaves_inputs_alone(modes, mlp, digits) -> None:
    cfg = TrainConfig(epochs=1, batch_size=128, lr=0.02)
    before = {k: v.clone() for k, v in modes[0].items()}
    a = train_simplex(mlp, [modes[0]], 2, digits.x_train, digits.y_train, cfg, seed=5, vol_reg=0.01, progress=False)
    b = train_simplex(mlp, [modes[0]], 2, digits.x_train, digits.y_train, cfg, seed=5, vol_reg=0.01, progress=False)
    c = train_simplex(
        mlp, [modes[0]], 2, digits.x_train, digits.y_train, cfg, seed=5, vol_reg=0.01, weighting="volume",
        progress=False,
    )
    assert a.simplices == ((0, 1, 2),)
    for va, vb in zip(a.vertices, b.vertices, strict=True):
        assert all(torch.equal(va[k], vb[k]) for k in va)
    assert c.n_vertices == 3 and bool(torch.isfinite(c.volumes()).all())
    assert all(torch.equal(modes[0][k], before[k]) for k in before)


def test_spro_on_a_batchnorm_net_keeps_the_buffers() -> None:
    """BatchNorm in train mode under vmap (momentum=None too); the free vertices' buffers are the
    centroid's (here θ's: the running statistics are never trained) and θ is left alone."""
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, momentum=None), nn.ReLU(), nn.Linear(8, 3))
    theta = {k: v.clone() for k, v in bn_point(3).items()}
    before = {k: v.clone() for k, v in theta.items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    y = (x @ torch.randn(6, 3, generator=g)).argmax(1)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, momentum=0.9)
    cx = train_simplex(model, [theta], 2, x, y, cfg, seed=0, vol_reg=0.01, progress=False)
    assert bn_net().state_dict().keys() == cx.vertices[2].keys()
    for v in cx.vertices[1:]:
        for k in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
            assert torch.equal(v[k], theta[k]), k
        assert not torch.equal(v["0.weight"], theta["0.weight"])
    assert all(torch.equal(theta[k], before[k]) for k in before)
    assert float(cx.volumes()[0]) > 0


def test_espro_trains_one_simplex_per_mode(modes, mlp, digits) -> None:
    cfg = TrainConfig(epochs=2, batch_size=128, lr=0.02, momentum=0.9)
    cxs = espro_ensemble(mlp, modes, 1, digits.x_train, digits.y_train, cfg, seed=0, vol_reg=0.01, progress=False)
    assert len(cxs) == 2
    for cx, mode in zip(cxs, modes, strict=True):
        assert cx.simplices == ((0, 1),) and all(torch.equal(cx.vertices[0][k], mode[k]) for k in mode)
    members = sample_members(cxs, 3, generator=0)
    assert members["head.weight"].shape == (6, 10, 32)
    probs = ensemble_probs(mlp, members, digits.x_test)
    table = ensemble_table(probs, digits.y_test)
    assert table["ensemble"]["members"] == 6 and table["ensemble"]["accuracy"] > 0.9


# ---------------------------------------------------------------------------------------------
# ensembles


def test_ensemble_of_identical_members_equals_the_member(modes, mlp, digits) -> None:
    probs = ensemble_probs(mlp, stack([modes[0]] * 3), digits.x_test)
    assert probs.shape == (3, digits.num_test, 10) and probs.dtype == torch.float64
    table = ensemble_table(probs, digits.y_test)
    member = table["members"][0]
    assert all(m == member for m in table["members"])
    for name in ("nll", "accuracy", "error", "ece", "auroc"):
        assert table["ensemble"][name] == pytest.approx(member[name], rel=0, abs=1e-12), name
        assert table["member_mean"][name] == pytest.approx(member[name], rel=0, abs=1e-12), name
    # two different members: the ensemble's NLL is at most the members' mean (Jensen)
    two = ensemble_table(ensemble_probs(mlp, stack(modes), digits.x_test), digits.y_test)
    assert two["ensemble"]["nll"] <= two["member_mean"]["nll"]


def test_ensemble_probs_recomputes_batchnorm_statistics() -> None:
    model = bn_net()
    pts = stack([bn_point(0), bn_point(1)])
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="x_bn"):
        ensemble_probs(model, pts, x, recompute_bn=True)
    got = ensemble_probs(model, pts, x[:10], recompute_bn=True, x_bn=x)
    ref = torch.softmax(predict_logits(model, recompute_bn_stats_batched(model, pts, x), x[:10]).double(), -1)
    torch.testing.assert_close(got, ref)
    plain = ensemble_probs(model, pts, x[:10])
    assert not torch.allclose(plain, got)


def test_fge_learning_rate_is_the_papers_formula() -> None:
    """α(i) of Garipov et al. 2018 (FGE): linear α₁ → α₂ on the first half of each cycle, back to α₁."""
    lr1, lr2 = 0.05, 0.001
    for c in (2, 5, 8):
        for i in range(1, 3 * c + 1):
            t = ((i - 1) % c + 1) / c
            expected = (1 - 2 * t) * lr1 + 2 * t * lr2 if t <= 0.5 else (2 - 2 * t) * lr2 + (2 * t - 1) * lr1
            assert fge_learning_rate(i, c, lr1, lr2) == pytest.approx(expected, rel=1e-15)
        rates = [fge_learning_rate(i, c, lr1, lr2) for i in range(1, c + 1)]
        s = fge_snapshot_step(c)
        assert rates[s - 1] == pytest.approx(min(rates))  # snapshot at the lowest rate
        assert rates[-1] == pytest.approx(lr1)  # the cycle ends back at α₁
    assert fge_learning_rate(4, 8, lr1, lr2) == pytest.approx(lr2)  # t = ½ exactly for even c
    with pytest.raises(ValueError, match="cycle"):
        fge_learning_rate(1, 1, lr1, lr2)


def test_fge_snapshots(modes, mlp, digits) -> None:
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, momentum=0.9)
    snaps = fge(mlp, modes[0], digits.x_train, digits.y_train, 2, 3, 0.05, 0.001, cfg, seed=0, progress=False)
    assert len(snaps) == 3
    pts = [modes[0], *snaps]
    for i in range(len(pts)):
        for j in range(i + 1, len(pts)):
            assert distance(pts[i], pts[j]) > 1e-3, (i, j)
    acc = 1 - evaluate_points(mlp, stack(snaps), digits.x_test, digits.y_test).error
    assert bool((acc > 0.9).all())
    # with α₁ = α₂ = lr the run is train() at a constant rate: snapshots after epochs 1 and 3
    flat = fge(mlp, modes[0], digits.x_train, digits.y_train, 2, 2, cfg.lr, cfg.lr, cfg, seed=4, progress=False)
    for snap, epochs in zip(flat, (1, 3), strict=True):
        ref = train(mlp, modes[0], digits.x_train, digits.y_train, TrainConfig(epochs=epochs, batch_size=64, lr=0.05),
                    seed=4, progress=False)
        assert all(torch.equal(snap[k], ref[k]) for k in ref)
    with pytest.raises(ValueError, match="at least 2 iterations"):
        fge(mlp, modes[0], digits.x_train[:64], digits.y_train[:64], 1, 1, 0.1, 0.01, cfg, progress=False)


def test_deep_ensemble_trains_independent_members(mlp, digits) -> None:
    cfg = TrainConfig(epochs=2, batch_size=128, lr=0.05, momentum=0.9)
    members = deep_ensemble(mlp, [3, 4], digits.x_train, digits.y_train, cfg, progress=False)
    ref = train(mlp, init_params(mlp, 3), digits.x_train, digits.y_train, cfg, seed=3, progress=False)
    assert len(members) == 2 and distance(members[0], members[1]) > 1.0
    for k in ref:
        torch.testing.assert_close(members[0][k], ref[k], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="seeds is empty"):
        deep_ensemble(mlp, [], digits.x_train, digits.y_train, cfg)


# ---------------------------------------------------------------------------------------------
# planes


def test_plane_basis_is_orthonormal_and_reconstructs_the_points(modes, mlp) -> None:
    f0 = flatten(modes[0])
    p2 = unflatten(f0 + 0.3 * torch.randn(f0.shape, generator=torch.Generator().manual_seed(1)), modes[0])
    basis = plane_basis(modes[0], modes[1], p2)
    assert basis.u.dtype == torch.float64 and basis.dim == flatten(modes[0]).numel()
    gram = torch.stack([basis.u, basis.v]) @ torch.stack([basis.u, basis.v]).T
    torch.testing.assert_close(gram, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-12)
    coords = project([modes[0], modes[1], p2], basis)
    torch.testing.assert_close(coords[0], torch.zeros(2, dtype=torch.float64), rtol=0, atol=0)
    assert float(coords[1, 0]) == pytest.approx(distance(modes[0], modes[1]), rel=1e-12)
    assert abs(float(coords[1, 1])) < 1e-10
    rebuilt = plane_points(basis, coords)
    for i, p in enumerate((modes[0], modes[1], p2)):
        for k in p:  # float32 points rebuilt in float64 and rounded: exactly the same numbers
            assert torch.equal(rebuilt[k][i], p[k]), (i, k)
    # stacked input projects like a list
    torch.testing.assert_close(project(stack([modes[1], p2]), basis), coords[1:], rtol=0, atol=1e-12)


def test_plane_grid_values(modes, mlp, digits) -> None:
    p0, p1 = modes
    p2 = {k: 0.5 * (p0[k] + p1[k]) + 0.05 * torch.ones_like(p0[k]) for k in p0}
    x, y = digits.x_train, digits.y_train
    at_p0 = plane_grid(mlp, p0, p1, p2, x, y, alphas=[0.0], betas=[0.0])
    assert at_p0["loss"].shape == (1, 1)
    ref = evaluate_points(mlp, stack([p0]), x, y)
    assert float(at_p0["loss"][0, 0]) == pytest.approx(float(ref.loss[0]), rel=1e-6)
    res = plane_grid(mlp, p0, p1, p2, x, y, grid=(3, 4), margin=0.2, chunk_size=5)
    assert res["loss"].shape == (3, 4) and res["error"].shape == (3, 4) and res["coords"].shape == (3, 2)
    a_lo, a_hi = float(res["coords"][:, 0].min()), float(res["coords"][:, 0].max())
    assert float(res["alphas"][0]) == pytest.approx(a_lo - 0.2 * (a_hi - a_lo))
    assert float(res["alphas"][-1]) == pytest.approx(a_hi + 0.2 * (a_hi - a_lo))
    i, j = 2, 1
    pt = plane_points(res["basis"], [[float(res["alphas"][i]), float(res["betas"][j])]])
    assert float(res["loss"][i, j]) == pytest.approx(float(evaluate_points(mlp, pt, x, y).loss[0]), rel=1e-6)
    fig = plot_plane(res, curve_coords=res["coords"], title="digits")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:4] == b"\x89PNG"
    assert len(fig.axes) == 2  # the plane and its colour bar


def test_plane_grid_keeps_integer_buffers_and_recomputes_batchnorm() -> None:
    model = bn_net()
    p0, p1, p2 = bn_point(0), bn_point(1), bn_point(2)
    basis = plane_basis(p0, p1, p2)
    assert "1.num_batches_tracked" not in basis.keys
    pts = plane_points(basis, [[0.3, -0.2], [1.0, 2.0]])
    assert int(p0["1.num_batches_tracked"]) != int(p1["1.num_batches_tracked"])
    assert torch.equal(pts["1.num_batches_tracked"], p0["1.num_batches_tracked"].expand(2))  # the origin's
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (30,), generator=torch.Generator().manual_seed(2))
    res = plane_grid(model, p0, p1, p2, x, y, grid=3, recompute_bn=True)
    assert res["recompute_bn"] and bool(torch.isfinite(res["loss"]).all())
    stale = plane_grid(model, p0, p1, p2, x, y, grid=3)
    assert not torch.allclose(res["loss"], stale["loss"])


# ---------------------------------------------------------------------------------------------
# errors


def test_errors_name_the_problem(modes, mlp, digits) -> None:
    p = vec_point([0, 0, 0])
    with pytest.raises(ValueError, match="at least 2 vertices"):
        simplex_volume([p])
    with pytest.raises(ValueError, match="at least 2 vertices"):
        Simplex((p,)).volume()
    with pytest.raises(ValueError, match="'a'"):
        Simplex((p, {**p, "a": torch.zeros(5, dtype=torch.float64)}))
    with pytest.raises(ValueError, match="missing"):
        simplex_volume([p, {"a": p["a"]}])
    with pytest.raises(ValueError, match=r"lams must be \[n, 2\]"):
        Simplex((p, p)).points(torch.ones(3, 3))
    with pytest.raises(ValueError, match="names vertex 5"):
        SimplicialComplex((p, p), ((0, 5),))
    with pytest.raises(ValueError, match="repeats a vertex"):
        SimplicialComplex((p, p), ((0, 0),))
    with pytest.raises(ValueError, match="one dimension"):
        SimplicialComplex((p, vec_point([1, 0, 0]), vec_point([0, 1, 0])), ((0, 1), (0, 1, 2))).sample_coefficients(
            2, 0, weighting="volume"
        )
    with pytest.raises(ValueError, match="unknown weighting"):
        SimplicialComplex((p, p), ((0, 1),)).sample_coefficients(2, 0, weighting="area")
    with pytest.raises(ValueError, match="square"):
        cayley_menger_volume(torch.zeros(2, 3))
    x, y = digits.x_train, digits.y_train
    with pytest.raises(ValueError, match="n_free must be an integer >= 1"):
        train_simplex(mlp, [modes[0]], 0, x, y, SPRO_CFG, progress=False)
    with pytest.raises(ValueError, match="vol_eps must be > 0"):
        train_simplex(mlp, [modes[0]], 1, x, y, SPRO_CFG, vol_reg=0.1, vol_eps=0.0, progress=False)
    bad = {**modes[1], "head.bias": torch.zeros(11)}
    with pytest.raises(ValueError, match="head.bias"):
        train_simplex(mlp, [modes[0], bad], 1, x, y, SPRO_CFG, progress=False)
    with pytest.raises(ValueError, match="collinear"):
        plane_basis(modes[0], modes[1], {k: 2 * modes[1][k] - modes[0][k] for k in modes[0]})
    with pytest.raises(ValueError, match="coincides"):
        plane_basis(modes[0], modes[0], modes[1])
    with pytest.raises(ValueError, match="head.bias"):
        plane_basis(modes[0], modes[1], bad)
    with pytest.raises(ValueError, match=r"\[K, N, C\]"):
        ensemble_table(torch.rand(5, 10), digits.y_test[:5])
    with pytest.raises(ValueError, match="leading size"):
        ensemble_probs(mlp, {"a": torch.zeros(2, 3), "b": torch.zeros(3, 3)}, x)


def test_simplex_points_refuse_weights_outside_the_simplex() -> None:
    """Simplex.points takes barycentric coordinates only, as evaluate_simplex does: [2, 2] would
    extrapolate far outside the simplex instead of raising."""
    s = Simplex((vec_point([0, 0, 0]), vec_point([1, 0, 0])))
    for bad in ([[2.0, 2.0]], [[1.5, -0.5]], [[float("nan"), 1.0]]):
        with pytest.raises(ValueError, match="barycentric"):
            s.points(bad)
    assert torch.equal(s.points([[0.25, 0.75]])["a"], torch.tensor([[0.75, 0.0]], dtype=torch.float64))
