"""reference/validate.py: every check, its boundaries and its wording; and the callers' use of it where no
other test file covers them (TrainConfig, the loss landscape, the runner's executors)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from reference import validate
from reference.validate import ArgumentTypeError


def test_argument_type_error_is_both_type_and_value_error():
    assert issubclass(ArgumentTypeError, TypeError) and issubclass(ArgumentTypeError, ValueError)
    for catch in (TypeError, ValueError, ArgumentTypeError):
        with pytest.raises(catch):
            validate.integer("n", "3")


def test_integer():
    assert validate.integer("n", 1) == 1
    assert validate.integer("n", 0, minimum=0) == 0
    assert validate.integer("n", -5, minimum=None) == -5
    assert validate.integer("n", 3, minimum=1, maximum=3) == 3
    assert type(validate.integer("n", 7)) is int
    for bad in (True, False, 2.0, 2.5, "2", None, torch.tensor(2)):
        with pytest.raises(ArgumentTypeError, match="n must be an integer, got"):
            validate.integer("n", bad)
    with pytest.raises(ValueError, match=r"^n must be an integer >= 1, got 0$"):
        validate.integer("n", 0)
    with pytest.raises(ValueError, match=r"^n must be an integer <= 3, got 4$"):
        validate.integer("n", 4, maximum=3)
    with pytest.raises(ValueError) as info:
        validate.integer("n", 0)
    assert not isinstance(info.value, TypeError), "a value out of range is not a type error"


def test_integers():
    assert validate.integers("w", [1, 2]) == [1, 2]
    assert validate.integers("w", (3,)) == [3]
    assert validate.integers("w", []) == []
    assert validate.integers("w", [0, 5], minimum=0, maximum=5) == [0, 5]
    with pytest.raises(ArgumentTypeError, match=r"w\[1\] must be an integer, got 2.5"):
        validate.integers("w", [1, 2.5])
    with pytest.raises(ValueError, match=r"w\[0\] must be an integer >= 1, got 0"):
        validate.integers("w", [0])
    for bad in ("12", b"12", 3, {1, 2}, torch.tensor([1, 2]), None):
        with pytest.raises(ArgumentTypeError, match="w must be a sequence of integers"):
            validate.integers("w", bad)


def test_optional_integer_and_number():
    assert validate.optional_integer("k", None) is None
    assert validate.optional_integer("k", 0, minimum=0) == 0
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        validate.optional_integer("k", 0)
    assert validate.optional_number("x", None) is None
    assert validate.optional_number("x", 2, positive=True) == 2.0
    with pytest.raises(ValueError, match="x must be > 0"):
        validate.optional_number("x", 0.0, positive=True)


def test_number():
    v = validate.number("x", 3)
    assert v == 3.0 and type(v) is float
    assert validate.number("x", 0.0, minimum=0.0) == 0.0
    assert validate.number("x", 1.0, maximum=1.0) == 1.0
    assert validate.number("x", math.inf, finite=False) == math.inf
    for bad in (True, "1", None, torch.tensor(1.0), 1j):
        with pytest.raises(ArgumentTypeError, match="x must be a number"):
            validate.number("x", bad)
    with pytest.raises(ValueError, match="x must be a finite number"):
        validate.number("x", math.nan)
    with pytest.raises(ValueError, match="x must be a finite number"):
        validate.number("x", math.nan, finite=False)  # NaN is never a value
    with pytest.raises(ValueError, match="x must be a finite number"):
        validate.number("x", -math.inf)
    with pytest.raises(ValueError, match=r"^x must be > 0, got 0.0$"):
        validate.number("x", 0.0, positive=True)
    with pytest.raises(ValueError, match=r"^x must be >= 0.5, got 0.25$"):
        validate.number("x", 0.25, minimum=0.5)
    with pytest.raises(ValueError, match=r"^x must be <= 1, got 2$"):
        validate.number("x", 2, maximum=1)
    with pytest.raises(ValueError, match=r"^x must be < 1, got 1.0$"):
        validate.number("x", 1.0, minimum=0.0, below=1.0)  # an open bound: [0, 1)
    assert validate.number("x", 0.999, below=1.0) == 0.999


def test_flag_and_choice():
    assert validate.flag("f", True) is True and validate.flag("f", False) is False
    for bad in (0, 1, "true", None):
        with pytest.raises(ArgumentTypeError, match="f must be True or False"):
            validate.flag("f", bad)
    assert validate.choice("kind", "b", ("a", "b")) == "b"
    assert validate.choice("norm", None, (None, "batch")) is None
    with pytest.raises(ValueError, match=r"^unknown kind 'c'; use one of \('a', 'b'\)$"):
        validate.choice("kind", "c", ("a", "b"))


def test_generator():
    g = torch.Generator().manual_seed(3)
    assert validate.generator(g) is g
    a, b = validate.generator(5), torch.Generator().manual_seed(5)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    c, d = validate.generator(None, default_seed=9), torch.Generator().manual_seed(9)
    assert torch.equal(torch.rand(4, generator=c), torch.rand(4, generator=d))
    assert isinstance(validate.generator(None), torch.Generator)
    for bad in (True, 1.5, "1"):
        with pytest.raises(ArgumentTypeError, match="generator must be a torch.Generator, an int seed or None"):
            validate.generator(bad)


def test_leading_size():
    assert validate.leading_size({"a": torch.zeros(3, 2), "b": torch.zeros(3)}) == 3
    with pytest.raises(ValueError, match="stacked_params must be a non-empty dict"):
        validate.leading_size({})
    with pytest.raises(ValueError, match="points must be a non-empty dict"):
        validate.leading_size([torch.zeros(2)], "points")
    with pytest.raises(ValueError, match=r"need one leading size .* got \['2', '3'\]"):
        validate.leading_size({"a": torch.zeros(2), "b": torch.zeros(3)})
    with pytest.raises(ValueError, match="need one leading size"):
        validate.leading_size({"a": torch.zeros(2), "n": torch.tensor(1)})  # a 0-d entry has no leading dim


# --- callers without a test file of their own here ----------------------------------------------------

def test_train_config_checks_and_keeps_the_values_given():
    from reference.optim import TrainConfig

    cfg = TrainConfig(epochs=2, batch_size=8, lr=1, weight_decay=0, momentum=0)
    assert cfg.asdict()["lr"] == 1 and type(cfg.asdict()["lr"]) is int, "values are stored as given"
    assert type(cfg.weight_decay) is int and cfg.betas == (0.9, 0.999)
    cases = [
        (dict(epochs=True), TypeError, "epochs must be an integer"),
        (dict(epochs=2.0), TypeError, "epochs must be an integer, got 2.0"),
        (dict(epochs=0), ValueError, "epochs must be an integer >= 1"),
        (dict(batch_size=0), ValueError, "batch_size must be an integer >= 1"),
        (dict(lr=0.0), ValueError, "lr must be > 0"),
        (dict(lr=math.inf), ValueError, "lr must be a finite number"),
        (dict(lr="0.1"), TypeError, "lr must be a number"),
        (dict(momentum=1.0), ValueError, "momentum must be < 1"),
        (dict(momentum=-0.1), ValueError, "momentum must be >= 0"),
        (dict(weight_decay=math.nan), ValueError, "weight_decay must be a finite number"),
        (dict(optimizer="rmsprop"), ValueError, "unknown optimizer 'rmsprop'"),
        (dict(schedule="step"), ValueError, "unknown schedule 'step'"),
        (dict(warmup_frac=1.0), ValueError, "warmup_frac must be < 1"),
        (dict(label_smoothing=-0.5), ValueError, "label_smoothing must be >= 0"),
        (dict(grad_clip=0.0), ValueError, "grad_clip must be > 0"),
        (dict(betas=(0.9,)), ValueError, "betas must be two numbers"),
        (dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\] must be < 1"),
        (dict(eps=0.0), ValueError, "eps must be > 0"),
        (dict(drop_last=1), TypeError, "drop_last must be True or False"),
    ]
    for over, error, match in cases:
        with pytest.raises(error, match=match):
            TrainConfig(**{"epochs": 1, "batch_size": 4, "lr": 0.1, **over})
    assert TrainConfig(epochs=1, batch_size=4, lr=0.1, grad_clip=None).grad_clip is None


def _plane_case():
    model = nn.Linear(2, 3)
    g = torch.Generator().manual_seed(0)
    pts = [{"weight": torch.randn(3, 2, generator=g), "bias": torch.randn(3, generator=g)} for _ in range(3)]
    x, y = torch.randn(6, 2, generator=g), torch.randint(0, 3, (6,), generator=g)
    return model, pts, x, y


def test_plane_grid_argument_checks():
    from reference.landscape import plane_basis, plane_grid, plot_plane, project

    model, (p0, p1, p2), x, y = _plane_case()
    res = plane_grid(model, p0, p1, p2, x, y, grid=(2, 3), margin=0)
    assert res["loss"].shape == (2, 3)
    with pytest.raises(ValueError, match="grid must be an int >= 2 or a pair"):
        plane_grid(model, p0, p1, p2, x, y, grid=(2, 3, 4))
    with pytest.raises(ValueError, match=r"grid\[1\] must be an integer >= 2, got 1"):
        plane_grid(model, p0, p1, p2, x, y, grid=(2, 1))
    with pytest.raises(TypeError, match=r"grid\[0\] must be an integer, got 2.0"):
        plane_grid(model, p0, p1, p2, x, y, grid=(2.0, 3))
    with pytest.raises(ValueError, match="grid must be an int >= 2"):
        plane_grid(model, p0, p1, p2, x, y, grid=True)
    with pytest.raises(ValueError, match="margin must be >= 0"):
        plane_grid(model, p0, p1, p2, x, y, grid=2, margin=-0.1)
    with pytest.raises(TypeError, match="margin must be a number"):
        plane_grid(model, p0, p1, p2, x, y, grid=2, margin="0.2")
    with pytest.raises(TypeError, match="recompute_bn must be True or False"):
        plane_grid(model, p0, p1, p2, x, y, 2, 0.2, "yes")
    with pytest.raises(ValueError, match="unknown metric 'nll'"):
        plot_plane(res, metric="nll")
    basis = plane_basis(p0, p1, p2)
    stacked = {"weight": torch.stack([p0["weight"], p1["weight"]]), "bias": p0["bias"][None]}
    with pytest.raises(ValueError, match="stacked points need one leading size"):
        project(stacked, basis)


def test_executor_argument_checks():
    from repro.runner.executors import ProcessExecutor, make_executor

    with pytest.raises(ValueError, match="workers must be an integer >= 1, got 0"):
        ProcessExecutor(0)
    with pytest.raises(TypeError, match="workers must be an integer, got True"):
        ProcessExecutor(True)
    with pytest.raises(TypeError, match="threads_per_worker must be an integer"):
        ProcessExecutor(1, threads_per_worker=1.5)
    with pytest.raises(ValueError, match=r"unknown executor 'threads'; use one of \('local', 'process', 'ray'\)"):
        make_executor("threads")
    with pytest.raises(ValueError, match=r"workers \(2\) are for the process and ray executors"):
        make_executor("local", 2)  # refused, not ignored
    assert ProcessExecutor(2).workers == 2
    from repro.runner.executors import usable_cores

    assert make_executor("process").workers == usable_cores() and make_executor("process").threads == 1
