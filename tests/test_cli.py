"""The README's main job through the command line: ``python -m repro run ainsworth2023-mlp --quick``
writes the output contract, a second run reuses every cached endpoint and job, and a deleted job is
recomputed alone. (The runner's guarantees are tested on a tiny target in test_runner.py.)"""

import json
import subprocess
import sys

import pytest


def test_random_control_keeps_distances_from_the_mode():
    import torch

    from reference.models import MLP, init_params
    from reference.params import distance
    from repro.targets.benton2021 import _random_control

    model = MLP(6, [8], 3)
    mode, v1, v2 = (init_params(model, s) for s in range(3))
    ctrl = _random_control(mode, [v1, v2], seed=0)
    for v, c in zip((v1, v2), ctrl, strict=True):
        assert distance(mode, c) == pytest.approx(distance(mode, v), rel=1e-5)
        assert not torch.equal(c["layers.0.weight"], v["layers.0.weight"])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    cache = tmp_path_factory.mktemp("cache")
    cmd = [sys.executable, "-m", "repro", "run", "ainsworth2023-mlp", "--quick", "--device", "cpu",
           "--out", str(out), "--cache-dir", str(cache), "--no-progress"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stderr[-3000:]
    return cmd, out, cache, first


def test_quick_run_writes_the_output_contract(quick_run):
    _, out, _, first = quick_run
    d = out / "ainsworth2023-mlp"
    for name in ("barriers.csv", "barriers.md", "barriers_per_pair.csv", "wm_restart_spread.csv",
                 "interpolation.png", "barrier_vs_width.png", "provenance.json", "summary.json", "run.log"):
        assert (d / name).is_file(), name
    summary = json.loads((d / "summary.json").read_text())
    assert summary["target"] == "ainsworth2023-mlp" and summary["size"] == "quick" and summary["quick"] is True
    assert summary["device"].startswith("cpu") and summary["seed"] == 0 and summary["dataset"] == "digits"
    assert [c["id"] for c in summary["claims"]] == ["wm-removes-most", "am-removes-most", "wm-shrinks-with-width"]
    for c in summary["claims"]:
        assert set(c) == {"id", "statement", "paper", "ours", "held"}
        assert isinstance(c["held"], bool)
    prov = json.loads((d / "provenance.json").read_text())
    for k in ("config", "versions", "device", "git", "wall_time_s", "cumulative_wall_time_s", "data", "code_version"):
        assert k in prov
    assert prov["versions"]["torch"] and prov["data"]["fingerprint"] == summary["data_fingerprint"]
    assert "[held]" in first.stdout or "[DID NOT HOLD]" in first.stdout


def test_second_run_reuses_cache(quick_run):
    cmd, out, cache, first = quick_run
    assert "training" in first.stdout
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "training" not in second.stdout and "0 of 6 jobs to run" in second.stdout
    assert len(list((cache / "endpoints").glob("*.pt"))) == 3 * 2 * 2  # widths × pairs × 2


def test_interrupted_run_resumes(quick_run):
    """Delete one finished job record: the rerun recomputes only it and gives the same table."""
    cmd, out, cache, _ = quick_run
    d = out / "ainsworth2023-mlp"
    before = (d / "barriers_per_pair.csv").read_text()
    jobs = sorted((cache / "jobs" / "ainsworth2023-mlp").glob("*.json"))
    assert len(jobs) == 3 * 2
    jobs[0].unlink()
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "1 of 6 jobs to run" in rerun.stdout
    assert (d / "barriers_per_pair.csv").read_text() == before
