"""Tests of reference/merge.py: MergeMany, universe alignment, non-transitivity, BN reset, REPAIR.

Planted cases (K copies of one network under random permutations, weights in general position)
have known answers; on three independently trained digits MLPs (64-32-32-10, 5 epochs, seeds 0–2)
the measured values are quoted in the docstrings (CPU, float32):

- non-transitivity of pairwise weight matching: 0.859 of the units (P_0 0.844, P_1 0.875); the
  midpoint of A and cycle(A) has train loss 0.320 against A's 0.051;
- REPAIR at the midpoint of A and weight-matched B: train loss 0.0802 against 0.1085 for plain
  interpolation (test loss 0.168 vs 0.194); at t = 0.25 / 0.75: 0.064 vs 0.080, 0.068 vs 0.084;
- MergeMany of the three: summed squared distance to the mean 177.9 → 99.2 in 4 sweeps.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_nets import general_params
from torch.func import functional_call

from reference.bn import recompute_bn_stats
from reference.data import load_digits
from reference.evaluate import evaluate_points
from reference.matching import weight_matching
from reference.merge import (
    MergeResult,
    UniverseResult,
    bn_reset,
    canonical_permutation,
    channel_statistics,
    merge_many,
    nontransitivity,
    pairwise_from_universe,
    permutation_sync,
    repair,
    universe_alignment,
)
from reference.models import MLP, VGG, ResNet, init_params
from reference.params import combine, lerp, stack
from reference.permutation import Permutation
from reference.specs import spec_for
from reference.train import TrainConfig, train_many

CFG = TrainConfig(epochs=5, batch_size=64, lr=0.05, momentum=0.9)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


_general = general_params


def _f(model, params, x):
    model.eval()
    with torch.no_grad():
        return functional_call(model, {k: v.clone() for k, v in params.items()}, (x,))


PLANTED = [
    ("mlp", lambda: MLP(12, [16, 24, 8], 5), (6, 12)),
    ("vgg-gn", lambda: VGG(3, [8, "M", 12], 5, norm="group", groups=2), (3, 3, 8, 8)),
    ("resnet-bn", lambda: ResNet(3, 5, depth=8, norm="batch", base=4), (3, 3, 8, 8)),
]


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def trio(digits):
    """Three digits MLPs 64-32-32-10 trained 5 epochs from seeds 0, 1, 2 (train_many, ~0.5 s)."""
    model = MLP(64, [32, 32], 10)
    pts = train_many(
        model, [init_params(model, s) for s in range(3)], digits.x_train, digits.y_train, CFG, [0, 1, 2], progress=False
    )
    return model, spec_for(model), pts


def _loss(model, points, x, y) -> list[float]:
    return evaluate_points(model, stack(points), x, y).loss.tolist()


# ---------------------------------------------------------------------------------------------
# MergeMany


@pytest.mark.parametrize("init", ["canonical", "identity"])
@pytest.mark.parametrize("name,make,xshape", PLANTED, ids=[p[0] for p in PLANTED])
def test_merge_many_of_permuted_copies_is_the_original(name, make, xshape, init):
    """Ainsworth et al. 2023, Algorithm 3 on θᵢ = Qᵢ(θ): every model is aligned back, the merged
    point is θ in model 0's labels (Q₀(θ)), perms[i] = Q₀ ∘ Qᵢ⁻¹, the distance to the mean ends at 0
    and the merged network computes θ's function."""
    model = make()
    spec = spec_for(model)
    theta = _general(model, 1)
    Qs = [Permutation.random(spec, 20 + i) for i in range(4)]
    pts = [Q.apply(spec, theta) for Q in Qs]
    r = merge_many(spec, pts, seed=3, init=init)
    assert isinstance(r, MergeResult) and r.converged and r.init == init
    target = Qs[0].apply(spec, theta)
    for k in theta:
        torch.testing.assert_close(r.merged[k], target[k], rtol=1e-12, atol=1e-12)
    for i, Q in enumerate(Qs):
        assert r.perms[i] == Qs[0].compose(Q.inverse())
    assert r.history[-1] == pytest.approx(0.0, abs=1e-9)
    x = torch.randn(*xshape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(_f(model, r.merged, x), _f(model, theta, x), rtol=1e-9, atol=1e-9)


def test_merge_many_on_trained_mlps(trio, digits):
    """Three trained digits MLPs: the summed squared distance to the mean never increases (each
    re-alignment maximises ⟨Pᵢ(θᵢ), Σ_{j≠i} Pⱼ(θⱼ)⟩ from its warm start), the loop stops when no
    permutation changes, merged = mean of the aligned models, perms[0] = identity (anchor 0).
    Measured: 177.9 → 107.1 → 100.5 → 99.2 → 99.2 (canonical start); identity start 193.5 → 98.8."""
    model, spec, pts = trio
    r = merge_many(spec, pts, seed=0)
    h = r.history
    assert all(b <= a * (1 + 1e-9) for a, b in zip(h, h[1:], strict=False)), h
    assert h[-1] < 0.7 * h[0]
    assert r.converged and r.changed[-1] == 0 and r.sweeps == len(h) - 1
    assert r.perms[0].is_identity()
    mean = combine([1 / 3] * 3, [P.apply(spec, p) for P, p in zip(r.perms, pts, strict=True)])
    for k in mean:
        torch.testing.assert_close(r.merged[k], mean[k])
    # the merged model is a better single model than the naive average (measured: 0.128 vs 1.956)
    naive = combine([1 / 3] * 3, pts)
    merged_loss, naive_loss = _loss(model, [r.merged, naive], digits.x_train, digits.y_train)
    assert merged_loss < naive_loss
    # anchors relabel, never change the function
    r_none = merge_many(spec, pts, seed=0, anchor=None)
    r_two = merge_many(spec, pts, seed=0, anchor=2)
    assert r_two.perms[2].is_identity()
    x = digits.x_test[:64]
    for other in (r_none, r_two):
        torch.testing.assert_close(_f(model, other.merged, x), _f(model, r.merged, x), rtol=1e-5, atol=1e-5)
    # tol: a loose tolerance stops earlier, never later
    r_loose = merge_many(spec, pts, seed=0, tol=0.5)
    assert r_loose.sweeps <= r.sweeps and r_loose.converged
    # max_iter=0: the canonical start, unconverged
    r0 = merge_many(spec, pts, seed=0, max_iter=0)
    assert r0.sweeps == 0 and not r0.converged and r0.history == h[:1]


def test_canonical_permutation_forgets_labels():
    """canonical(Q(θ)) ∘ Q = canonical(θ): the canonical forms of θ and Q(θ) are equal (incl. GroupNorm blocks)."""
    model = VGG(3, [8, 12], 5, norm="group", groups=2)
    spec = spec_for(model)
    theta = _general(model, 2)
    Q = Permutation.random(spec, 7)
    C, Cq = canonical_permutation(spec, theta), canonical_permutation(spec, Q.apply(spec, theta))
    assert Cq.compose(Q) == C
    a, b = C.apply(spec, theta), Cq.apply(spec, Q.apply(spec, theta))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# universe alignment


def _assert_cycle_consistent(us, n):
    for i in range(n):
        for j in range(n):
            for k in range(n):
                lhs = pairwise_from_universe(us, i, j).compose(pairwise_from_universe(us, j, k))
                assert lhs == pairwise_from_universe(us, i, k), (i, j, k)


@pytest.mark.parametrize("name,make,xshape", PLANTED, ids=[p[0] for p in PLANTED])
def test_sync_recovers_planted_permutations(name, make, xshape):
    """Pachauri et al. 2013 on consistent inputs: θᵢ = Qᵢ(θ) gives Uᵢ = Q₀ ∘ Qᵢ⁻¹ (the planted maps up
    to the common relabelling Q₀, fixed by U₀ = identity), Uᵢ(θᵢ) all equal, agreement 1."""
    model = make()
    spec = spec_for(model)
    theta = _general(model, 3)
    Qs = [Permutation.random(spec, 40 + i) for i in range(4)]
    pts = [Q.apply(spec, theta) for Q in Qs]
    u = universe_alignment(spec, pts, method="sync", restarts=2)
    assert isinstance(u, UniverseResult) and u.method == "sync"
    assert u.agreement == 1.0
    for i, Q in enumerate(Qs):
        assert u.to_universe[i] == Qs[0].compose(Q.inverse())
        ui = u.to_universe[i].apply(spec, pts[i])
        assert all(torch.equal(ui[k], pts[0][k]) for k in ui)
    _assert_cycle_consistent(u.to_universe, 4)


def test_sync_repairs_a_corrupted_pairwise_map():
    """Spectral synchronisation uses every pair: one wrong P_ij among 10 (5 models) is outvoted, with
    Pachauri's reference rounding and with the Procrustes refinement; GroupNorm blocks respected."""
    model = VGG(3, [8, 12], 5, norm="group", groups=2)
    spec = spec_for(model)
    N = 5
    Qs = [Permutation.random(spec, 60 + i) for i in range(N)]
    pairwise = {(i, j): Qs[i].compose(Qs[j].inverse()) for i in range(N) for j in range(i + 1, N)}
    pairwise[(1, 3)] = Permutation.random(spec, 999)
    for refine in (0, 20):
        us = permutation_sync(pairwise, N, spec, refine_iters=refine)
        for i in range(N):
            Permutation(us[i].to_dict(), spec)  # block-preserving
            assert us[i] == Qs[0].compose(Qs[i].inverse())
    # both directions given: averaged into one block, same answer
    both = {**pairwise, **{(j, i): P.inverse() for (i, j), P in pairwise.items() if (i, j) != (1, 3)}}
    us = permutation_sync(both, N, spec)
    assert all(us[i] == Qs[0].compose(Qs[i].inverse()) for i in range(N))


def test_universe_on_trained_mlps_is_cycle_consistent(trio):
    """Pairwise weight matching of trained nets is not transitive (below), but the synchronised maps
    Uᵢ⁻¹ ∘ Uⱼ compose exactly, for both methods. Measured agreement of sync with the pairwise
    inputs: 0.714 of the units."""
    _, spec, pts = trio
    u = universe_alignment(spec, pts, method="sync")
    assert u.to_universe[0].is_identity()
    assert 0.0 < u.agreement < 1.0
    assert set(u.pairwise) == {(0, 1), (0, 2), (1, 2)}
    _assert_cycle_consistent(u.to_universe, 3)
    um = universe_alignment(spec, pts, method="mergemany", seed=0)
    assert um.merge is not None and um.to_universe == um.merge.perms
    _assert_cycle_consistent(um.to_universe, 3)
    assert u.pairwise_map(1, 2) == pairwise_from_universe(u, 1, 2)


# ---------------------------------------------------------------------------------------------
# non-transitivity


def test_nontransitivity_zero_for_planted_copies():
    """Exact alignments compose: P_AC = P_AB ∘ P_BC, fraction 0, the cycle is the identity."""
    model = MLP(12, [16, 24, 8], 5)
    spec = spec_for(model)
    theta = _general(model, 4)
    a, b, c = (Permutation.random(spec, s).apply(spec, theta) for s in (1, 2, 3))
    r = nontransitivity(spec, a, b, c, restarts=2)
    assert r["fraction"] == 0.0 and r["cycle"].is_identity()
    assert r["composed"] == r["P_AC"]
    assert r["units"] == 48 and set(r["per_group"]) == set(spec.sizes)


def test_nontransitivity_of_trained_mlps(trio, digits):
    """Three independently trained digits MLPs: pairwise weight matching is far from transitive
    (measured fraction 0.859: P_0 0.844, P_1 0.875), and the cycle C = P_AB ∘ P_BC ∘ P_AC⁻¹ is a
    real barrier: the midpoint of A and C(A) has train loss 0.320 vs A's 0.051 (C(A) computes A's
    function exactly)."""
    model, spec, (a, b, c) = trio
    r = nontransitivity(spec, a, b, c)
    assert 0.2 < r["fraction"] <= 1.0
    cyc = r["cycle"]
    assert sum(cyc.num_moved().values()) == sum(r["moved"].values())
    assert cyc == r["composed"].compose(r["P_AC"].inverse())
    ca = cyc.apply(spec, a)
    x, y = digits.x_train, digits.y_train
    torch.testing.assert_close(_f(model, ca, x), _f(model, a, x), rtol=1e-4, atol=1e-4)
    l_a, l_mid = _loss(model, [a, lerp(a, ca, 0.5)], x, y)
    assert l_mid > l_a + 0.05


# ---------------------------------------------------------------------------------------------
# BN reset and REPAIR


@pytest.fixture(scope="module")
def matched_pair(trio):
    model, spec, (a, b, _) = trio
    return model, spec, a, weight_matching(spec, a, b).perm.apply(spec, b)


def test_repair_endpoints_unchanged(matched_pair, digits):
    """Jordan et al. 2023: at k = (1, 0) the target statistics are θ₁'s own, so every correction is
    the identity (s = 1, shift 0) and REPAIR returns θ₁; likewise θ₂ at (0, 1)."""
    model, spec, a, pb = matched_pair
    x = digits.x_train
    for coeffs, end in (([1.0, 0.0], a), ([0.0, 1.0], pb)):
        r = repair(model, [a, pb], coeffs, x)
        for k in end:
            torch.testing.assert_close(r[k], end[k], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(_f(model, r, x), _f(model, end, x), rtol=1e-5, atol=1e-5)


def test_repair_lowers_midpoint_loss_and_hits_target_statistics(matched_pair, digits):
    """REPAIR (Jordan et al. 2023, §4) at the midpoint of two weight-matched digits MLPs: the train
    loss drops (measured 0.1085 → 0.0802; also at t = 0.25 and 0.75), and every repaired channel's
    pre-activation mean and std equal ½ (μ_A + μ_B), ½ (σ_A + σ_B) on the repair data (measured
    max deviation 1.5e-7, float32)."""
    model, spec, a, pb = matched_pair
    x, y = digits.x_train, digits.y_train
    a0 = {k: v.clone() for k, v in a.items()}
    for t in (0.25, 0.5, 0.75):
        plain = lerp(a, pb, t)
        rep = repair(model, [a, pb], [1 - t, t], x)
        l_plain, l_rep = _loss(model, [plain, rep], x, y)
        assert l_rep < l_plain - 0.01, (t, l_plain, l_rep)
        got = channel_statistics(model, rep, x)
        sa, sb = channel_statistics(model, a, x), channel_statistics(model, pb, x)
        assert set(got) == {"layers.0", "layers.1"}
        for n in got:
            torch.testing.assert_close(got[n][0], (1 - t) * sa[n][0] + t * sb[n][0], rtol=0, atol=1e-5)
            torch.testing.assert_close(got[n][1], (1 - t) * sa[n][1] + t * sb[n][1], rtol=0, atol=1e-5)
    assert all(torch.equal(a[k], a0[k]) for k in a)  # inputs untouched


def _stats_match(model, endpoints, coeffs, x, check_mean=True, tol=1e-8):
    rep = repair(model, endpoints, coeffs, x)
    got = channel_statistics(model, rep, x)
    ends = [channel_statistics(model, p, x) for p in endpoints]
    for n, (mu, sd) in got.items():
        mu_t = sum(c * e[n][0] for c, e in zip(coeffs, ends, strict=True))
        sd_t = sum(c * e[n][1] for c, e in zip(coeffs, ends, strict=True))
        torch.testing.assert_close(sd, sd_t, rtol=tol, atol=tol, msg=lambda m, n=n: f"{n} std: {m}")
        if check_mean:
            torch.testing.assert_close(mu, mu_t, rtol=tol, atol=tol, msg=lambda m, n=n: f"{n} mean: {m}")
    return rep, got


@pytest.mark.parametrize(
    "name,make,xshape,check_mean",
    [
        ("mlp-simplex", lambda: MLP(10, [12, 9, 7], 4), (200, 10), True),
        ("mlp-layernorm", lambda: MLP(10, [12, 9], 4, norm="layer"), (200, 10), True),
        ("vgg-none-2d", lambda: VGG(3, [6, "M", 8], 4), (40, 3, 6, 6), True),
        ("vgg-group-1d", lambda: VGG(2, [6, 8], 4, norm="group", groups=2, dims=1), (40, 2, 9), True),
        ("resnet-none", lambda: ResNet(3, 4, depth=8, norm=None, base=4), (20, 3, 6, 6), False),
        ("mlp-nobias", lambda: MLP(10, [12, 9], 4, bias=False), (200, 10), False),
    ],
)
def test_repair_target_statistics_across_architectures(name, make, xshape, check_mean):
    """A point of the 2-simplex (k = (0.2, 0.5, 0.3)), float64: the repaired channel statistics equal
    Σ kᵢ (μᵢ, σᵢ) at every producer — Linear / conv outputs, or LayerNorm / GroupNorm outputs via their
    affine. Layers without a bias (this ResNet's convs, bias-free MLPs) can only be rescaled: the std
    matches, the mean does not in general."""
    model = make().double()
    pts = [{k: v.double() if v.is_floating_point() else v for k, v in init_params(model, s).items()} for s in (0, 1, 2)]
    x = torch.randn(*xshape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _stats_match(model, pts, [0.2, 0.5, 0.3], x, check_mean=check_mean)


def test_repair_of_batchnorm_net_is_bn_reset():
    """With BatchNorm producing every group, REPAIR is the BatchNorm reset at θ (Jordan et al. 2023,
    §4): repair(θ₁, θ₂; k) = bn_reset(Σ kᵢ θᵢ) = recompute_bn_stats(Σ kᵢ θᵢ)."""
    model = VGG(3, [6, 8], 4, norm="batch").double()
    spec = spec_for(model)
    pts = [_general(model, s) for s in (0, 1)]
    x = torch.randn(30, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    r = repair(model, pts, [0.3, 0.7], x, spec=spec)
    mid = combine([0.3, 0.7], pts)
    ref = recompute_bn_stats(model, mid, x)
    assert all(torch.equal(r[k], ref[k]) for k in ref)
    reset = bn_reset(model, mid, x)
    assert all(torch.equal(reset[k], ref[k]) for k in ref)
    # a model without BatchNorm: bn_reset returns a copy
    mlp = MLP(4, [5], 3)
    p = init_params(mlp, 0)
    q = bn_reset(mlp, p, torch.randn(4, 4))
    assert all(torch.equal(p[k], q[k]) and p[k] is not q[k] for k in p)


# ---------------------------------------------------------------------------------------------
# error paths


def test_bad_inputs_raise_value_error():
    model = MLP(6, [5, 4], 3)
    spec = spec_for(model)
    a, b = init_params(model, 0), init_params(model, 1)
    other = init_params(MLP(6, [5, 5], 3), 2)
    with pytest.raises(ValueError, match="at least 2 models"):
        merge_many(spec, [a])
    with pytest.raises(ValueError, match="model 1"):
        merge_many(spec, [a, other])
    with pytest.raises(ValueError, match="unknown init"):
        merge_many(spec, [a, b], init="random")
    with pytest.raises(ValueError, match="anchor"):
        merge_many(spec, [a, b], anchor=2)
    with pytest.raises(ValueError, match="tol"):
        merge_many(spec, [a, b], tol=-1.0)
    with pytest.raises(ValueError, match="max_iter"):
        merge_many(spec, [a, b], max_iter=-1)
    bad = dict(b)
    bad["layers.0.weight"] = b["layers.0.weight"].clone()
    bad["layers.0.weight"][0, 0] = math.nan
    with pytest.raises(ValueError, match="model 1.*layers.0.weight"):
        merge_many(spec, [a, bad])
    with pytest.raises(TypeError):
        merge_many(spec, a)
    with pytest.raises(ValueError, match="unknown method"):
        universe_alignment(spec, [a, b], method="spectral")
    with pytest.raises(ValueError, match="does not take the options"):
        universe_alignment(spec, [a, b], method="sync", init="identity")
    with pytest.raises(ValueError, match="restarts applies"):
        universe_alignment(spec, [a, b], method="c2m3", restarts=2)
    with pytest.raises(ValueError, match="model index"):
        pairwise_from_universe([Permutation.identity(spec)] * 2, 0, 2)
    with pytest.raises(ValueError, match="missing for model pairs"):
        permutation_sync({(0, 1): Permutation.identity(spec)}, 3, spec)
    with pytest.raises(ValueError, match="two different model indices"):
        permutation_sync({(0, 0): Permutation.identity(spec)}, 2, spec)
    with pytest.raises(ValueError, match="at least 3 models|model 2"):
        nontransitivity(spec, a, b, other)
    x = torch.randn(8, 6)
    with pytest.raises(ValueError, match="convex"):
        repair(model, [a, b], [1.5, -0.5], x)
    with pytest.raises(ValueError, match="2 endpoints"):
        repair(model, [a, b], [1.0], x)
    with pytest.raises(ValueError, match="at least 2 examples"):
        repair(model, [a, b], [0.5, 0.5], x[:1])
    with pytest.raises(ValueError, match="finite"):
        repair(model, [a, b], [math.nan, 1.0], x)
    with pytest.raises(ValueError, match="batch_size"):
        repair(model, [a, b], [0.5, 0.5], x, batch_size=0)
