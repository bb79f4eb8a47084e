"""Metrics against scikit-learn; barrier definitions on hand-made paths with known answers."""

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score
from torch import nn

from reference.barrier import barrier, barrier_lower_bound, evaluate_path, linear_path
from reference.evaluate import (
    accuracy,
    auroc_ovr,
    ece,
    ensemble_metrics,
    evaluate_points,
    nll,
    predict_logits,
)
from reference.params import stack


def _random_probs(n=400, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(n, c, generator=g, dtype=torch.float64), 1)
    y = torch.randint(0, c, (n,), generator=g)
    return probs, y


@pytest.mark.parametrize("seed", range(3))
def test_metrics_match_sklearn(seed):
    probs, y = _random_probs(seed=seed)
    assert nll(probs, y) == pytest.approx(log_loss(y.numpy(), probs.numpy(), labels=list(range(5))), rel=1e-9)
    assert accuracy(probs, y) == pytest.approx(accuracy_score(y.numpy(), probs.argmax(1).numpy()))
    ref = roc_auc_score(y.numpy(), probs.numpy(), multi_class="ovr", average="macro")
    assert auroc_ovr(probs, y) == pytest.approx(ref, rel=1e-12)


def test_auroc_with_ties_matches_sklearn():
    probs, y = _random_probs(seed=4)
    probs = (probs * 4).round() / 4  # many ties
    probs = probs / probs.sum(1, keepdim=True).clamp_min(1e-9)
    ref = roc_auc_score(y.numpy(), probs.numpy(), multi_class="ovr", average="macro")
    assert auroc_ovr(probs, y) == pytest.approx(ref, rel=1e-12)


def test_ece_against_direct_loop():
    probs, y = _random_probs(n=1000, seed=1)
    conf, pred = probs.max(1)
    total = 0.0
    edges = np.linspace(0, 1, 16)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.double().mean() * abs((pred[m] == y[m]).double().mean() - conf[m].mean())
    assert ece(probs, y, 15) == pytest.approx(float(total), abs=1e-12)


def test_ece_perfectly_calibrated_is_zero():
    y = torch.tensor([0, 1, 0, 1])
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert ece(probs, y) == 0.0


def test_metric_shape_errors():
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        nll(torch.rand(3), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="do not match"):
        accuracy(torch.rand(3, 2), torch.tensor([0, 1]))


def test_ensemble_of_identical_members_equals_member():
    probs, y = _random_probs(seed=2)
    one = ensemble_metrics(probs[None], y)
    many = ensemble_metrics(probs[None].repeat(4, 1, 1), y)
    for k in ("nll", "accuracy", "ece", "auroc"):
        assert many[k] == pytest.approx(one[k], rel=1e-12)
    assert many["members"] == 4


def test_barrier_known_answers():
    t = torch.linspace(0, 1, 5)
    v = torch.tensor([1.0, 2.0, 4.0, 2.5, 3.0])
    # chord: 1 + 2t -> [1, 1.5, 2, 2.5, 3]; gaps [0, .5, 2, 0, 0]
    b = barrier(v, t, "max_chord")
    assert b.value == pytest.approx(2.0) and b.t_max == pytest.approx(0.5) and b.grid_size == 5
    # mid: max 4 - 2 = 2
    assert barrier(v, t, "mid").value == pytest.approx(2.0)
    # monotone path: chord barrier 0, mid barrier = half the endpoint gap
    mono = torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0])
    assert barrier(mono, t, "max_chord").value == pytest.approx(0.0)
    assert barrier(mono, t, "mid").value == pytest.approx(1.0) == barrier_lower_bound(mono, "mid")


def test_barrier_grid_errors():
    with pytest.raises(ValueError, match="start at t=0"):
        barrier(torch.ones(3), torch.tensor([0.1, 0.5, 1.0]))
    with pytest.raises(ValueError, match="strictly increasing"):
        barrier(torch.ones(3), torch.tensor([0.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="unknown barrier kind"):
        barrier(torch.ones(3), torch.tensor([0.0, 0.5, 1.0]), "max")


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def test_vmapped_evaluation_equals_loop():
    model = _mlp(0)
    pts = [{k: v.detach().clone() for k, v in _mlp(s).state_dict().items()} for s in range(5)]
    x, y = torch.randn(100, 6), torch.randint(0, 3, (100,))
    m = evaluate_points(model, stack(pts), x, y, chunk_size=2, batch_size=33)
    logits = predict_logits(model, stack(pts), x, chunk_size=3)
    for i, p in enumerate(pts):
        out = torch.func.functional_call(model, p, (x,))
        torch.testing.assert_close(logits[i], out)
        ce = torch.nn.functional.cross_entropy(out, y)
        assert float(m.loss[i]) == pytest.approx(float(ce), rel=1e-5)
        assert float(m.error[i]) == pytest.approx(float((out.argmax(1) != y).float().mean()))


def test_evaluate_path_endpoints_and_barrier_zero_for_identical():
    model = _mlp(0)
    a = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(50, 6), torch.randint(0, 3, (50,))
    t, pts = linear_path(a, a, 7)
    pe = evaluate_path(model, t, pts, {"train": (x, y)})
    assert all(abs(v) < 1e-6 for k, v in pe.barrier_table().items() if k.endswith("max_chord"))
    assert all(abs(v) < 1e-6 for v in pe.barrier_table().values())


def test_evaluate_path_recomputes_batchnorm_statistics_when_asked() -> None:
    """``recompute_bn=True``: the points' running statistics are recomputed on the train split's inputs
    first (as ``recompute_bn_stats_batched`` does), then evaluated in eval mode; without it the
    interpolated statistics are used as they are."""
    from reference.bn import recompute_bn_stats_batched
    from reference.models import build_model, init_params

    model = build_model({"name": "vgg", "in_channels": 1, "channels": [4, 4], "num_classes": 3, "norm": "batch",
                         "dims": 1})
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 12, generator=g), torch.randint(0, 3, (32,), generator=g)
    a, b = init_params(model, 0), init_params(model, 1)
    a["features.0.norm.running_var"] = a["features.0.norm.running_var"] * 5  # stored stats far from the data's
    t, pts = linear_path(a, b, 5)
    splits = {"train": (x, y)}
    got = evaluate_path(model, t, pts, splits, recompute_bn=True)
    ref = evaluate_path(model, t, recompute_bn_stats_batched(model, pts, x), splits)
    raw = evaluate_path(model, t, pts, splits)
    torch.testing.assert_close(got.curves["train"]["loss"], ref.curves["train"]["loss"])
    assert not torch.allclose(got.curves["train"]["loss"], raw.curves["train"]["loss"])
    with pytest.raises(ValueError, match="splits is empty"):
        evaluate_path(model, t, pts, {})


def test_mid_loss_barriers_of_many_pairs_equal_each_paths_own() -> None:
    """``mid_loss_barriers``: one evaluation of every pair's straight path gives each pair's ``mid`` train-loss
    barrier (BatchNorm statistics recomputed at every point, as ``evaluate_path(..., recompute_bn=True)``);
    a path through a NaN point has a NaN barrier; no pairs, no evaluation."""
    from reference.barrier import mid_loss_barriers
    from reference.models import build_model, init_params

    g = torch.Generator().manual_seed(0)
    mlp = {"name": "mlp", "in_features": 6, "widths": [8], "num_classes": 3}
    vgg = {"name": "vgg", "in_channels": 1, "channels": [4, 4], "num_classes": 3, "norm": "batch", "dims": 1}
    for cfg, x in ((mlp, torch.randn(40, 6, generator=g)), (vgg, torch.randn(40, 1, 12, generator=g))):
        model = build_model(cfg)
        y = torch.randint(0, 3, (40,), generator=g)
        ms = [init_params(model, s) for s in range(3)]
        pairs = [(ms[0], ms[1]), (ms[1], ms[2]), (ms[2], ms[2])]
        got = mid_loss_barriers(model, pairs, x, y, 5)
        for (a, b), value in zip(pairs, got, strict=True):
            t, pts = linear_path(a, b, 5)
            pe = evaluate_path(model, t, pts, {"train": (x, y)}, recompute_bn=True)
            assert value == pytest.approx(barrier(pe.curves["train"]["loss"], t, "mid").value, rel=1e-6, abs=1e-7)
        assert abs(got[2]) < 1e-6  # a path from a model to itself
    bad = {k: v.clone() for k, v in ms[1].items()}
    bad[next(k for k in bad if k.endswith("weight"))].fill_(float("nan"))
    assert np.isnan(mid_loss_barriers(model, [(ms[0], bad)], x, y, 3)[0])
    assert mid_loss_barriers(model, [], x, y, 5) == []


# --- non-finite points: NaN loss *and* NaN error, never a finite error rate ------------------------

def _points_with_a_broken_one(bad: float):
    """Three points of one MLP; the middle one has a non-finite weight (NaN or inf)."""
    pts = [{k: v.detach().clone() for k, v in _mlp(s).state_dict().items()} for s in range(3)]
    pts[1]["0.weight"][0, 0] = bad
    return pts


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_point_with_non_finite_logits_has_nan_loss_and_error(bad):
    model = _mlp(0)
    pts = _points_with_a_broken_one(bad)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    logits = predict_logits(model, stack(pts), x)
    assert not bool(torch.isfinite(logits[1]).all())  # the case under test: argmax of these picks some class
    m = evaluate_points(model, stack(pts), x, y, chunk_size=2, batch_size=16)
    assert torch.isnan(m.loss[1]) and torch.isnan(m.error[1]) and torch.isnan(m.accuracy[1])
    # the finite points are untouched (same numbers as evaluating them without the broken one)
    ok = evaluate_points(model, stack([pts[0], pts[2]]), x, y, chunk_size=2, batch_size=16)
    assert torch.equal(m.loss[[0, 2]], ok.loss) and torch.equal(m.error[[0, 2]], ok.error)
    assert bool(torch.isfinite(ok.loss).all() and torch.isfinite(ok.error).all())


def test_error_barrier_of_a_path_through_a_broken_point_is_nan_not_zero():
    model = _mlp(0)
    pts = _points_with_a_broken_one(float("nan"))
    pts[2] = pts[0]  # a loop a -> broken -> a: a finite error at t = 0.5 would give an error barrier of ~0
    x, y = torch.randn(30, 6), torch.randint(0, 3, (30,))
    t = torch.tensor([0.0, 0.5, 1.0])
    pe = evaluate_path(model, t, stack(pts), {"train": (x, y)})
    table = pe.barrier_table()
    assert set(table) == {"train_loss_max_chord", "train_loss_mid", "train_error_max_chord", "train_error_mid"}
    assert all(np.isnan(v) for v in table.values()), table
    b = barrier(pe.curves["train"]["error"], t, "max_chord", metric="error")
    assert np.isnan(b.value) and b.t_max == 0.5


def test_barrier_of_nan_values_is_nan_at_the_first_nan():
    t = torch.linspace(0, 1, 5)
    v = torch.tensor([0.1, 0.2, float("nan"), 0.2, float("nan")])
    for kind in ("max_chord", "mid"):
        b = barrier(v, t, kind)
        assert np.isnan(b.value) and b.t_max == 0.5 and b.kind == kind
        assert np.isnan(barrier_lower_bound(v, kind))
    with pytest.raises(ValueError, match="unknown barrier kind 'max'"):
        barrier_lower_bound(v, "max")
    # a finite path is unchanged, whatever the size of its values
    big = torch.tensor([0.0, 1e30, 0.0, 0.0, 0.0], dtype=torch.float64)
    assert barrier(big, t).value == 1e30 and barrier(big, t).t_max == 0.25


def test_metrics_of_non_finite_probabilities_are_nan():
    from reference.evaluate import all_metrics

    probs, y = _random_probs(seed=5)
    bad = probs.clone()
    bad[3] = float("nan")
    for fn in (nll, accuracy, ece, auroc_ovr):
        assert np.isnan(fn(bad, y)), fn.__name__
        assert np.isfinite(fn(probs, y)), fn.__name__
    assert all(np.isnan(v) for v in all_metrics(bad, y).values())
    inf = probs.clone()
    inf[0, 0] = float("inf")
    assert np.isnan(accuracy(inf, y))
    ens = ensemble_metrics(torch.stack([probs, bad]), y)
    assert ens["members"] == 2 and all(np.isnan(ens[k]) for k in ("nll", "accuracy", "error", "ece", "auroc"))
    with pytest.raises(ValueError, match="do not match"):  # shapes are still checked first
        accuracy(bad, y[:-1])


def test_evaluation_argument_checks():
    model = _mlp(0)
    pts = stack([{k: v.detach().clone() for k, v in _mlp(s).state_dict().items()} for s in range(2)])
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        evaluate_points(model, pts, x, y, batch_size=0)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        predict_logits(model, pts, x, chunk_size=0)
    with pytest.raises(TypeError, match="train_mode must be True or False"):
        evaluate_points(model, pts, x, y, train_mode=1)
    with pytest.raises(ValueError, match="one leading size"):
        evaluate_points(model, {**pts, "0.bias": pts["0.bias"][:1]}, x, y)
    with pytest.raises(ValueError, match="non-empty dict"):
        predict_logits(model, {}, x)
    with pytest.raises(ValueError, match="n_bins must be an integer >= 1"):
        ece(*_random_probs(), n_bins=0)
    with pytest.raises(ValueError, match="eps must be > 0"):
        nll(*_random_probs(), eps=0.0)
    a = {k: v[0] for k, v in pts.items()}
    with pytest.raises(ValueError, match="num_points must be an integer >= 2"):
        linear_path(a, a, 1)
    with pytest.raises(TypeError, match="recompute_bn must be True or False"):
        evaluate_path(model, torch.tensor([0.0, 1.0]), pts, {"train": (x, y)}, recompute_bn="yes")


# --- the evaluator's per-batch metrics equal cross_entropy and argmax ------------------------------


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_batch_metrics_equal_cross_entropy_and_argmax(scale):
    """``evaluate_points`` sums the cross-entropy and counts the errors from one row maximum and one
    log-sum-exp: equal to ``F.cross_entropy`` up to float rounding, and the same argmax (the first
    maximal index on ties, which the rounded logits below create)."""
    import torch.nn.functional as F

    from reference.evaluate import _batch_metrics

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 200, 10, generator=g) * scale).round()  # many ties
    y = torch.randint(0, 10, (200,), generator=g)
    ce, miss, bad = _batch_metrics(logits, y)
    ref = torch.stack([F.cross_entropy(l, y, reduction="sum") for l in logits])
    torch.testing.assert_close(ce, ref, rtol=1e-5, atol=1e-3)
    assert torch.equal(miss, (logits.argmax(-1) != y).sum(-1))
    assert not bool(bad.any())
    for value in (float("nan"), float("inf"), -float("inf")):
        broken = logits.clone()
        broken[1, 7, 3] = value
        assert _batch_metrics(broken, y)[2].tolist() == [False, True, False]


# --- TF32 behind an option (CUDA only) ------------------------------------------------------------


def test_tf32_is_refused_off_cuda_and_the_flags_are_restored():
    """``tf32=True`` on the CPU is refused (TF32 does not exist there; a silently ignored option would
    mislead); ``tf32_allowed`` sets both torch flags only within its block, also when the block raises."""
    from reference.evaluate import tf32_allowed

    model = nn.Sequential(nn.Linear(4, 3))
    pts = stack([{k: v.clone() for k, v in model.state_dict().items()}] * 2)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match="tf32=True needs a CUDA device"):
        evaluate_points(model, pts, x, y, tf32=True)
    with pytest.raises(ValueError, match="tf32=True needs a CUDA device"):
        predict_logits(model, pts, x, tf32=True)
    with pytest.raises(TypeError):
        evaluate_points(model, pts, x, y, tf32="yes")
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False
        with pytest.raises(RuntimeError, match="inside"), tf32_allowed(True, "cuda"):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
            raise RuntimeError("inside")
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
        with tf32_allowed(False, "cpu"):  # changes nothing
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["mlp", "cnn1d", "vgg"])
def test_tf32_changes_barrier_values_by_at_most_the_bound(arch):
    """Property: on CUDA, evaluating a 25-point linear path between two networks with ``tf32=True``
    moves every point's loss by at most 2% (relative, at least 0.02 absolute) and every point's error
    by at most 2 points, so the loss barriers by at most 4% and the error barriers by 4 points. TF32
    rounds each product's inputs to a 10-bit mantissa (relative error 2^-11 ≈ 5e-4), accumulates in
    fp32; over a few layers the logits move by ~1e-3 relative."""
    from reference.models import CNN1D, MLP, VGG, init_params

    make, shape = {"mlp": (lambda: MLP(784, [512, 512], 10), (784,)),
                   "cnn1d": (lambda: CNN1D(1, (32, 32, 32), 10, norm=None), (40,)),
                   "vgg": (lambda: VGG(3, [32, "M", 64, "M", 128], 10, norm=None, dims=2), (3, 32, 32))}[arch]
    model = make().cuda().eval()
    a, b = ({k: v.cuda() for k, v in init_params(model, s).items()} for s in (0, 1))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2048, *shape, generator=g).cuda(), torch.randint(0, 10, (2048,), generator=g).cuda()
    t, pts = linear_path(a, b, 25)
    plain = evaluate_points(model, pts, x, y)
    fast = evaluate_points(model, pts, x, y, tf32=True)
    assert torch.all((fast.loss - plain.loss).abs() <= torch.clamp(0.02 * plain.loss.abs(), min=0.02))
    assert torch.all((fast.error - plain.error).abs() <= 0.02)
    for kind in ("max_chord", "mid"):
        bl, bf = barrier(plain.loss, t, kind), barrier(fast.loss, t, kind)
        assert abs(bf.value - bl.value) <= 0.04 * max(1.0, abs(bl.value))
        assert abs(barrier(fast.error, t, kind).value - barrier(plain.error, t, kind).value) <= 0.04
