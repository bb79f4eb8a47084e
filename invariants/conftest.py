"""Fixtures of the property suites (profiles are registered by the root ``conftest.py``)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread while a property runs.

    Every example is a tiny network: with two threads on a loaded 2-core machine one 16×144
    float64 matmul was measured at 16 ms against 5 µs on one thread (thread wake-ups dominate).
    Restored afterwards, so tests outside ``invariants/`` keep the root conftest's setting.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
