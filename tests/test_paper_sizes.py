"""Every target's ``paper`` size, end to end, on tiny synthetic files in the real formats (MNIST IDX,
CIFAR-10 python batches) with ``--set`` overrides that cut the budget to a few steps: paper mode is never
dead code. Each runs with the local and the process executor, which must give the same verdicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_data import make_cifar, make_mnist

from repro.runner import get_target
from repro.runner.run import RunOptions, run_target

ROOT = Path(__file__).resolve().parents[1]

# per target: the --set overrides that make its paper size tiny (the paper's models and data paths stay)
TINY: dict[str, list[str]] = {
    "ainsworth2023-mlp": ["widths=[8]", "depth=1", "pairs=1", "grid=3", "restarts=1", "train.epochs=1",
                          "train.batch_size=64"],
    "ainsworth2023-width": ["mlp_multipliers=[1]", "mlp_base=4", "resnet_multipliers=[1]", "resnet_depth=8",
                            "resnet_base=4", "pairs=1", "grid=3", "ste.steps=2", "ste.batch=8", "repair_examples=8",
                            "train.epochs=1", "resnet_train.epochs=1", "resnet_train.batch_size=16"],
    "benton2021-simplexes": ["train.epochs=1", "vertex_train.epochs=1", "modes=2", "free_vertices=[1]", "espro_free=1",
                             "samples=4", "members_per_simplex=2", "vgg_stages=[[8],[8]]"],
    "c2m3-merging": ["train.epochs=1", "widths=[8,8,8]", "ns=[2,3]", "replicates=1", "cycles.grid=3",
                     "cycles.max_triples=1", "cycles.max_pairs=1", "fw_iters=2", "repair_examples=50"],
    "cycle-consistency": ["train.epochs=1", "widths=[8,8,8]", "ns=[3]", "cycles.grid=3", "cycles.max_triples=1",
                          "cycles.max_pairs=1"],
    "rebasin-mlp-sweeps": ["features=[8]", "weight_decays=[0,0.1]", "n_models=[2]", "epochs=1", "grid=3"],
    "permuted-simplex": ["train.epochs=1", "curve_train.epochs=1", "widths=[8]", "main_width=8", "depth=1",
                         "n_models=3", "ns=[2,3]", "triples=[[0,1,2]]", "complex_simplices=[[0,1,2]]", "repair_ns=[3]",
                         "interior.steps=2", "interior.eval_lams=2", "samples=8", "adversarial_steps=1",
                         "grid_resolution=2", "ternary_resolution=3", "repair_resolution=2", "ensemble_samples=2"],
    "rashomon-hessian": ["train.epochs=1", "curve_train.epochs=1", "resnet_depth=8", "resnet_base=2", "t_grid=3",
                         "density_ts=[0.0]", "top_k=2", "hutchinson_samples=4", "slq_probes=2", "slq_steps=8",
                         "jacobian_examples=4", "hessian_batch=16"],
    "curve-ensemble": ["train.epochs=1", "curve_train.epochs=1", "members=2", "t_grid=3", "plane_grid=3"],
    "garipov2018-curves": ["train.epochs=1", "curve_train.epochs=1", "neb.cycles=1", "neb.train.epochs=1",
                           "neb.init_pivots=1", "neb.sub_points=1", "resnet.train.epochs=1",
                           "resnet.curve_train.epochs=1", "resnet.neb.cycles=1", "resnet.neb.train.epochs=1",
                           "resnet.neb.init_pivots=1", "resnet.neb.sub_points=1", "grid=3", "neb_grid_sub=0"],
    "anokhin2020-connectors": ["one_layer_widths=[8]", "deep_widths=[8]", "deep_second=4", "ensemble_width=8",
                               "ensemble_members=3", "pairs=1", "points_per_segment=3", "train.epochs=1"],
    "transformer-rebasin": ["widths=[8]", "depth=1", "heads=2", "pairs=1", "match.grid=3", "match.wm_restarts=1",
                            "match.am_examples=8", "match.ste.steps=2", "match.ste.batch=8", "train.epochs=1",
                            "train.batch_size=16",
                            "lm.dim=8", "lm.depth=1", "lm.heads=2", "lm.sequences=8", "lm.test_sequences=4",
                            "lm.pairs=1", "lm.train.epochs=1"],
}


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper-data")
    make_mnist(root / "mnist", n_train=48, n_test=16, seed=0)
    make_cifar(root / "cifar10", n=8, seed=0)
    return {"mnist": root / "mnist", "cifar10": root / "cifar10"}


def _data_dir(name: str, dirs: dict) -> Path | None:
    ds = get_target(name).sizes["paper"].dataset
    return dirs.get(ds)


@pytest.mark.parametrize("name", sorted(TINY))
def test_paper_size_runs_end_to_end(name, data_dirs, tmp_path):
    overrides = [tuple(s.split("=", 1)) for s in TINY[name]]
    opts = RunOptions(size="paper", data_dir=_data_dir(name, data_dirs), overrides=overrides, out=tmp_path / "out",
                      cache_dir=tmp_path / "cache", device="cpu", progress=False)
    summary = run_target(get_target(name), opts)
    assert summary["size"] == "paper"
    assert [c["id"] for c in summary["claims"]] == list(get_target(name).claim_ids)
    out = tmp_path / "out" / summary["target"]
    assert (out / "provenance.json").is_file() and list(out.glob("*.csv"))
    # the process executor on the same tiny run, through the command line: the same verdicts
    cmd = [sys.executable, "-m", "repro", "run", name, "--size", "paper", "--executor", "process", "--workers", "2",
           "--out", str(tmp_path / "out-p"), "--cache-dir", str(tmp_path / "cache-p"), "--no-progress",
           "--device", "cpu"]
    if opts.data_dir:
        cmd += ["--data-dir", str(opts.data_dir)]
    for s in TINY[name]:
        cmd += ["--set", s]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    proc = json.loads((tmp_path / "out-p" / summary["target"] / "summary.json").read_text())
    assert [(c["id"], c["held"]) for c in proc["claims"]] == [(c["id"], c["held"]) for c in summary["claims"]]


def test_every_target_has_a_tiny_paper_run():
    from repro.runner.declare import load_all

    names = {n for n in load_all() if not n.startswith("toy")}
    assert names == set(TINY), f"targets without a tiny paper run: {sorted(names - set(TINY))}"
