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
