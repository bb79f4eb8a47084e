"""Fixtures shared by the tests in this folder (Hypothesis profiles: the root ``conftest.py``)."""

from __future__ import annotations

import pytest
import torch

from reference.data import load_digits
from reference.models import MLP, init_params
from reference.train import TrainConfig, train


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny networks, restored afterwards: with two threads on a loaded
    2-core machine the thread wake-ups dominate (the digits MLP was measured ~100× slower). A module opts in
    with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits_modes():
    """``(model, digits, a, b)``: two MLPs 64-32-32-10 trained on sklearn digits from inits 1 and 2
    (SGD 0.05, momentum 0.9, batch 64, 20 epochs)."""
    ds = load_digits()
    model = MLP(64, [32, 32], 10)
    cfg = TrainConfig(epochs=20, batch_size=64, lr=0.05)
    a = train(model, init_params(model, 1), ds.x_train, ds.y_train, cfg, seed=1, progress=False)
    b = train(model, init_params(model, 2), ds.x_train, ds.y_train, cfg, seed=2, progress=False)
    return model, ds, a, b
