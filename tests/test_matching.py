"""Weight and activation matching: planted permutations recovered, restarts, error paths."""

import pytest
import torch

from reference.matching import activation_matching, solve_lap, weight_matching, weight_matching_objective
from reference.models import CNN1D, MLP, VGG, ResNet, init_params
from reference.permutation import Permutation
from reference.specs import spec_for

ZOO = [
    ("mlp", lambda: MLP(12, [16, 24, 8], 5), (4, 12)),
    ("mlp-nobias", lambda: MLP(12, [16, 16], 5, bias=False), (4, 12)),
    ("vgg-bn", lambda: VGG(3, [8, "M", 12], 5, norm="batch"), (2, 3, 8, 8)),
    ("vgg-gn", lambda: VGG(3, [8, "M", 12], 5, norm="group", groups=2), (2, 3, 8, 8)),
    ("resnet-bn", lambda: ResNet(3, 5, depth=8, width=1, norm="batch", base=4), (2, 3, 8, 8)),
    ("resnet-ln", lambda: ResNet(3, 5, depth=8, width=1, norm="layer", base=4), (2, 3, 8, 8)),
    ("cnn1d", lambda: CNN1D(1, (8, 8, 8), 5, norm="batch"), (2, 40)),
]


def _randomise_buffers(params, seed):
    g = torch.Generator().manual_seed(seed)
    out = dict(params)
    for k, v in params.items():
        if k.endswith("running_mean"):
            out[k] = torch.randn(v.shape, generator=g)
        elif k.endswith("running_var"):
            out[k] = torch.rand(v.shape, generator=g) + 0.5
    return out


@pytest.mark.parametrize("name,make,xshape", ZOO, ids=[z[0] for z in ZOO])
def test_planted_permutation_recovered_exactly(name, make, xshape):
    model = make()
    spec = spec_for(model)
    theta = _randomise_buffers(init_params(model, 0), 1)
    # general position: a random normal perturbation breaks any ties of the initialisation
    g = torch.Generator().manual_seed(2)
    theta = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in theta.items()}
    P = Permutation.random(spec, 3)
    res = weight_matching(spec, theta, P.apply(spec, theta), seed=0)
    assert res.perm == P.inverse()
    aligned = res.perm.apply(spec, P.apply(spec, theta))
    for k in theta:
        torch.testing.assert_close(aligned[k], theta[k], rtol=0, atol=0)
    # the objective history never decreases and ends at <theta, theta>
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(res.history, res.history[1:], strict=False))
    assert res.objective == pytest.approx(weight_matching_objective(spec, theta, theta, Permutation.identity(spec)))


def test_restarts_keep_best_and_report_all():
    model = MLP(10, [32, 32, 32], 4)
    spec = spec_for(model)
    a, b = init_params(model, 0), init_params(model, 1)
    res = weight_matching(spec, a, b, seed=5, restarts=4)
    assert len(res.restarts) == 4
    assert [r.seed for r in res.restarts] == [5, 6, 7, 8]
    assert res.objective == max(res.restart_objectives)
    for r in res.restarts:
        assert r.history[-1] >= r.history[0]


def test_activation_matching_recovers_planted_permutation():
    model = MLP(12, [16, 24], 5)
    spec = spec_for(model)
    theta = init_params(model, 0)
    P = Permutation.random(spec, 4)
    x = torch.randn(300, 12)
    res = activation_matching(model, spec, theta, P.apply(spec, theta), x)
    assert res.perm == P.inverse()


def test_blocked_lap_is_optimal_among_block_permutations():
    g = torch.Generator().manual_seed(0)
    S = torch.randn(6, 6, generator=g, dtype=torch.float64)
    idx = solve_lap(S, block=3)
    best = S[torch.arange(6), idx].sum()
    import itertools

    brute = max(
        sum(S[bi * 3 + i, bo * 3 + p[i]] for bi, bo in enumerate(outer) for p in [inner[bi]] for i in range(3))
        for outer in itertools.permutations(range(2))
        for inner in itertools.product(itertools.permutations(range(3)), repeat=2)
    )
    assert float(best) == pytest.approx(float(brute))


def test_matching_rejects_mismatched_or_nonfinite_params():
    model = MLP(10, [8], 3)
    spec = spec_for(model)
    a = init_params(model, 0)
    other = init_params(MLP(10, [9], 3), 0)
    with pytest.raises(ValueError, match="shape"):
        weight_matching(spec, a, other)
    k = next(iter(a))
    bad = {**a, k: torch.full_like(a[k], float("nan"))}
    with pytest.raises(ValueError, match="non-finite"):
        weight_matching(spec, a, bad)
    with pytest.raises(ValueError, match="restarts"):
        weight_matching(spec, a, a, restarts=0)


def _naive_weight_matching(spec, a, b, seed, init=None, max_passes=100):
    """Algorithm 1 with nothing skipped or reused: every visited unit's S rebuilt from ``permute_except``
    and solved by scipy, J recomputed from scratch after every pass."""
    import numpy as np

    from reference import matching as m

    rng = np.random.default_rng(seed)
    units = m.matching_units(spec)
    perm = m.starting_permutation(spec, init)
    history = [weight_matching_objective(spec, a, b, Permutation(perm, spec))]
    for _ in range(max_passes):
        improved = False
        for u in m.group_order(list(units), rng):
            mats = {}
            for g in units[u]:
                n, S = spec.sizes[g], 0
                for k, ax, off in spec.members[g]:
                    wa, wb = a[k].double(), m.permute_except(spec, perm, k, b[k].double(), ax)
                    if off is not None:
                        wa, wb = wa.narrow(ax, off, n), wb.narrow(ax, off, n)
                    S = S + wa.movedim(ax, 0).reshape(n, -1) @ wb.movedim(ax, 0).reshape(n, -1).T
                mats[g] = S
            new = m.solve_coupled(mats, spec, "scipy")
            rows = {g: torch.arange(spec.sizes[g]) for g in mats}
            old_v = sum(float(S[rows[g], perm[g]].sum()) for g, S in mats.items())
            new_v = sum(float(S[rows[g], new[g]].sum()) for g, S in mats.items())
            if new_v > old_v + 1e-12 * max(1.0, abs(old_v)):
                perm.update(new)
                improved = True
        history.append(weight_matching_objective(spec, a, b, Permutation(perm, spec)))
        if not improved:
            break
    return Permutation(perm, spec), history


@pytest.mark.parametrize("name,make,xshape", ZOO, ids=[z[0] for z in ZOO])
@pytest.mark.parametrize("solver", ["scipy", "auto"])
def test_weight_matching_equals_the_plain_algorithm(name, make, xshape, solver):
    """Skipping a unit whose inputs did not change and reusing unchanged terms of S_g and of J change
    nothing: the same permutation and objective history as Algorithm 1 written plainly (and "auto", the
    lapjv solver, the same as scipy on these general-position costs)."""
    model = make()
    spec = spec_for(model)
    a, b = _randomise_buffers(init_params(model, 0), 1), _randomise_buffers(init_params(model, 3), 4)
    want, history = _naive_weight_matching(spec, a, b, seed=7)
    got = weight_matching(spec, a, b, seed=7, solver=solver)
    assert got.perm == want
    assert list(got.history) == pytest.approx(history, rel=1e-12, abs=1e-9)


@pytest.mark.parametrize("solver", ["scipy", "auto"])
def test_weight_matching_with_small_moves_equals_the_plain_algorithm(solver):
    """Late in a run coordinate ascent moves a few units per solve, and a term of S_g is then updated by a
    rank-|C| product instead of recomputed (10-25 times in each of these runs): on random-init MLPs
    20-64x3 and CNN1Ds [48]x3 (8-11 passes), the permutations and the objective history are still Algorithm 1's."""
    for model in (MLP(20, [64] * 3, 5), CNN1D(1, (48, 48, 48), 5, kernel_size=3)):
        spec = spec_for(model)
        for s in (0, 2):
            a, b = init_params(model, s), init_params(model, s + 1)
            want, history = _naive_weight_matching(spec, a, b, seed=s)
            got = weight_matching(spec, a, b, seed=s, solver=solver)
            assert len(history) > 4
            assert got.perm == want
            assert list(got.history) == pytest.approx(history, rel=1e-12, abs=1e-9)


def test_greedy_start_is_the_per_layer_matching_for_an_mlp():
    """``init="greedy"`` on an MLP: layer i matched once on its incoming weights (input axis already
    permuted by layer i-1's match) and bias, in order, the last hidden layer on the head's weights too
    (their other axis is not permuted); coordinate ascent from there never goes below it."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    from reference.matching import greedy_permutation

    model = MLP(10, [12, 9, 7], 4)
    spec = spec_for(model)
    a, b = init_params(model, 0), init_params(model, 1)
    want, prev = {}, None
    for i in range(3):
        wa, wb = a[f"layers.{i}.weight"].double(), b[f"layers.{i}.weight"].double()
        if prev is not None:
            wb = wb[:, prev]
        S = wa @ wb.T + torch.outer(a[f"layers.{i}.bias"].double(), b[f"layers.{i}.bias"].double())
        if i == 2:
            S = S + a["head.weight"].double().T @ b["head.weight"].double()
        prev = torch.as_tensor(linear_sum_assignment(S.numpy(), maximize=True)[1])
        want[f"P_{i}"] = prev
    start = greedy_permutation(spec, a, b)
    assert start == Permutation(want, spec)
    res = weight_matching(spec, a, b, init="greedy", restarts=2)
    assert all(r.history[0] == pytest.approx(weight_matching_objective(spec, a, b, start)) for r in res.restarts)
    assert all(np.all(np.diff(r.history) >= -1e-9) for r in res.restarts)
    with pytest.raises(ValueError, match="unknown init"):
        weight_matching(spec, a, b, init="warm")
    with pytest.raises(TypeError, match="init"):
        weight_matching(spec, a, b, init={"P_0": torch.arange(12)})


def test_lapjv_solver_is_exact_and_a_permutation():
    """The "lapjv" entry (package lap) reaches the optimum scipy reaches, on random and on tied costs."""
    import numpy as np

    from reference.matching import SOLVERS, fastest_solver, lapjv_solver, scipy_solver

    assert fastest_solver() == ("lapjv" if "lapjv" in SOLVERS else "scipy")
    rng = np.random.default_rng(0)
    for S in [rng.standard_normal((n, n)) for n in (1, 2, 7, 40)] + [np.zeros((5, 5)), np.ones((4, 4))]:
        c1, c2 = scipy_solver(S), lapjv_solver(S)
        assert sorted(c2.tolist()) == list(range(len(S)))
        rows = np.arange(len(S))
        assert S[rows, c2].sum() == pytest.approx(S[rows, c1].sum(), rel=1e-12, abs=1e-12)
    assert solve_lap(torch.eye(3), solver="auto").tolist() == [0, 1, 2]
