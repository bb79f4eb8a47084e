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
