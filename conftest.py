"""Hypothesis profiles, chosen by HYPOTHESIS_PROFILE (default ``dev``; tox sets ``ci``).

- ``ci``: deterministic (derandomize), few examples, prints the failing blob for replay.
- ``dev``: like ci but randomised.
- ``thorough``: at least 1000 examples per property.
- ``gpu``: the ci profile, run with MODECONN_DEVICE=cuda (tolerances for TF32 in invariants/).
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

_common = dict(
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile("ci", max_examples=25, derandomize=True, **_common)
settings.register_profile("dev", max_examples=25, **_common)
settings.register_profile("thorough", max_examples=1000, **_common)
settings.register_profile("gpu", max_examples=25, derandomize=True, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# Under pytest-xdist every worker is a process: one thread each avoids oversubscribing the cores
# (tiny convs ran ~600x slower with 2 threads per worker on a loaded 2-core machine).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: no GPU on this machine (run on a GPU host with -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
