"""The ``python -m repro`` command: list, run --quick into a temp dir, cache reuse, errors."""

import json
import subprocess
import sys

import pytest

from repro.__main__ import main


def test_list_names_targets_and_claims(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "ainsworth2023-mlp" in out
    assert "arXiv:2209.04836" in out
    assert "claim: weight matching removes most of the naive loss barrier" in out
    for name in ("garipov2018-curves", "curve-ensemble", "benton2021-simplexes"):
        assert name in out


def test_random_control_keeps_distances_from_the_mode():
    import torch

    from reference.models import MLP, init_params
    from reference.params import distance
    from repro.benton2021 import _random_control

    model = MLP(6, [8], 3)
    mode, v1, v2 = (init_params(model, s) for s in range(3))
    ctrl = _random_control(mode, [v1, v2], seed=0)
    for v, c in zip((v1, v2), ctrl, strict=True):
        assert distance(mode, c) == pytest.approx(distance(mode, v), rel=1e-5)
        assert not torch.equal(c["layers.0.weight"], v["layers.0.weight"])


def test_unknown_target_lists_known_ones(capsys):
    assert main(["run", "no-such-target", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "unknown target 'no-such-target'" in err
    assert "ainsworth2023-mlp" in err


def test_cuda_without_gpu_is_a_clear_error(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the error path cannot be exercised")
    assert main(["run", "ainsworth2023-mlp", "--quick", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "cuda" in capsys.readouterr().err.lower()


def test_missing_data_dir_is_a_clear_error(capsys, tmp_path):
    assert main(["run", "ainsworth2023-mlp", "--quick", "--data-dir", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err


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
                 "interpolation.png", "barrier_vs_width.png", "provenance.json", "summary.json"):
        assert (d / name).is_file(), name
    summary = json.loads((d / "summary.json").read_text())
    assert summary["target"] == "ainsworth2023-mlp" and summary["quick"] is True
    assert summary["device"].startswith("cpu")
    ids = {c["id"] for c in summary["claims"]}
    assert {"wm-removes-most", "wm-shrinks-with-width", "am-removes-most"} <= ids
    for c in summary["claims"]:
        assert set(c) == {"id", "statement", "paper", "ours", "held"}
        assert isinstance(c["held"], bool)
    prov = json.loads((d / "provenance.json").read_text())
    for k in ("config", "versions", "device", "git", "wall_time_s"):
        assert k in prov
    assert prov["versions"]["torch"]
    assert "[held]" in first.stdout or "[DID NOT HOLD]" in first.stdout


def test_second_run_reuses_cache(quick_run):
    cmd, out, cache, first = quick_run
    assert "training" in first.stdout
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "training" not in second.stdout  # every endpoint came from the cache
    assert json.loads((out / "ainsworth2023-mlp" / "summary.json").read_text())["claims"]
    assert len(list((cache / "endpoints").glob("*.pt"))) == 3 * 2 * 2  # widths × pairs × 2


def test_interrupted_run_resumes(quick_run, tmp_path):
    """Delete one finished job record: the rerun recomputes only it and gives the same table."""
    cmd, out, _, _ = quick_run
    d = out / "ainsworth2023-mlp"
    before = (d / "barriers_per_pair.csv").read_text()
    jobs = sorted((d / ".jobs").glob("*.json"))
    assert len(jobs) == 3 * 2
    jobs[0].unlink()
    (jobs[1].parent / (jobs[1].name + ".tmp")).write_text("{torn")  # a stale temp file is ignored
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (d / "barriers_per_pair.csv").read_text() == before
