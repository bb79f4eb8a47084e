"""The ``transformer-rebasin`` target: its pieces (the per-token LM wrapper, the ViT configs, the headless
spec) and its quick size end to end through the runner (outputs, a verdict for every claim, head-aware
permutations keeping the function, the jobs recomputing the cached numbers exactly)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from reference.data import load_dataset
from reference.models import init_params
from reference.permutation import Permutation
from reference.specs import spec_for
from reference.transformers import CausalTransformer, make_sequence_task
from repro.runner import get_target
from repro.runner.cache import JobCache, job_key
from repro.runner.context import DataRef, JobContext, LoadedData, code_version, data_fingerprint
from repro.runner.run import RunOptions, device_description, run_target
from repro.targets import transformer_rebasin as tr

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAME = "transformer-rebasin"


# --- pieces ----------------------------------------------------------------------------------------------
def test_next_token_at_reads_the_causal_lm_at_each_position():
    cfg = {"vocab": 5, "block_size": 6, "dim": 8, "depth": 1, "heads": 2, "mlp_ratio": 2}
    plain, at = CausalTransformer(**cfg), tr.NextTokenAt(**cfg)
    params = init_params(plain, 3)
    x, y = make_sequence_task(4, 6, 5, seed=1, lag=2)
    tokens, labels = tr.token_examples(x, y)
    assert tokens.shape == (24, 7) and labels.shape == (24,)
    assert torch.equal(labels, y.reshape(-1)) and torch.equal(tokens[7, :6], x[1]) and int(tokens[7, 6]) == 1
    with torch.no_grad():
        full = torch.func.functional_call(plain, params, (x,))  # [4, 6, 5]
        got = torch.func.functional_call(at, params, (tokens,))  # [24, 5]
    torch.testing.assert_close(got, full.reshape(24, 5), rtol=0, atol=1e-6)


def test_vit_configs_follow_the_dataset():
    cfg = tr.SIZES["cpu"]
    digits = tr.vit_config("digits", (64,), 10, 32, cfg)
    assert (digits["image_size"], digits["channels"], digits["dims"]) == (8, 1, 2)
    seq = tr.vit_config("mnist1d", (40,), 10, 32, cfg)
    assert (seq["image_size"], seq["channels"], seq["dims"]) == (40, 1, 1)
    img = tr.vit_config("cifar10", (3, 32, 32), 10, 64, tr.SIZES["paper"])
    assert (img["image_size"], img["channels"], img["dims"], img["patch"]) == (32, 3, 2, 4)
    with pytest.raises(ValueError, match="patch=3 does not divide"):
        tr.vit_config("digits", (64,), 10, 32, tr.RebasinConfig(patch=3))
    with pytest.raises(ValueError, match="heads=4 does not divide the width 18"):
        tr.vit_config("digits", (64,), 10, 18, cfg)


def test_headless_spec_moves_units_across_heads_and_breaks_the_function():
    """The spec without heads accepts a permutation that mixes heads; applied, it changes the function
    (what ``wm-headless`` measures), while a head-respecting random permutation keeps it."""
    from reference.models import build_model

    model = build_model(tr.vit_config("digits", (64,), 10, 16, tr.SIZES["cpu"]))
    params = init_params(model, 0)
    spec = spec_for(model)
    flat = tr.headless(spec)
    assert spec.heads and spec.blocks and not flat.heads and not flat.blocks and flat.axes == spec.axes
    x = load_dataset("digits").x_test[:32]
    aware = Permutation.random(spec, 1)
    assert tr.function_error(model, params, aware.apply(spec, params), x) < tr.FUNCTION_TOL
    mixed = Permutation.random(flat, 1)
    with pytest.raises(ValueError):
        mixed.check_fits(spec)  # it moves units across head boundaries
    assert tr.function_error(model, params, mixed.apply(flat, params), x) > tr.BROKEN


# --- the quick size end to end ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("transformer-rebasin")
    opts = RunOptions(size="quick", out=root / "out", cache_dir=root / "cache", device="cpu", progress=False)
    summary = run_target(get_target(NAME), opts)
    return root, summary


def test_quick_run_writes_every_output_and_judges_every_claim(quick):
    root, summary = quick
    out = root / "out" / NAME
    for name in ("barriers", "barriers_per_pair", "function_error", "endpoints"):
        assert (out / f"{name}.csv").is_file() and (out / f"{name}.md").is_file(), name
    for name in ("barrier_vs_width", "interpolation"):
        assert (out / f"{name}.png").stat().st_size > 0, name
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["target"] == NAME and summary["size"] == "quick"
    assert [c["id"] for c in summary["claims"]] == list(get_target(NAME).claim_ids)
    for c in summary["claims"]:
        assert isinstance(c["held"], bool) and c["ours"] and c["paper"] and c["statement"], c
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["config"]["widths"] == [8, 16] and prov["jobs"]["total"] == 3  # 1 LM pair + 2 ViT pairs


def test_quick_run_head_aware_permutations_keep_the_function(quick):
    root, _ = quick
    with (root / "out" / NAME / "barriers_per_pair.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["model"] for r in rows} == {"causal LM", "ViT-8", "ViT-16"}
    assert {r["method"] for r in rows} == set(tr.METHODS)
    for r in rows:
        err = float(r["function_error"])
        if r["method"] == "wm-headless":
            assert err > tr.BROKEN, r
        else:
            assert err <= tr.FUNCTION_TOL, r
        for col in tr.BARRIER_COLS:
            assert torch.isfinite(torch.tensor(float(r[col]))), (r, col)


def test_jobs_recompute_the_cached_numbers_exactly(quick):
    """Same seeds, same numbers: the LM job (training included) and a ViT job, run again outside the runner,
    give exactly the results the run cached (timings aside)."""
    root, _ = quick
    t = get_target(NAME)
    cfg = t.sizes["quick"]
    d = load_dataset(cfg.dataset)
    jobs = t.jobs(cfg, LoadedData(DataRef(cfg.dataset, data_fingerprint(d)), d))
    cache = JobCache(root / "cache" / "jobs" / NAME)
    numerics = device_description(torch.device("cpu"))  # the fixture ran in this process, on the local executor
    ctx = JobContext(device="cpu", cache_dir=str(root / "cache"), numerics=numerics)
    lm = next(j for j in jobs if isinstance(j.args, tr.LMPairArgs))
    vit = next(j for j in jobs if isinstance(j.args, tr.ViTPairArgs))
    for job in (lm, vit):
        hit, cached = cache.get(job_key(job, code_version(t.module_file), numerics))
        assert hit, job.name
        again = json.loads(json.dumps(job.fn(job.args, ctx)))
        cached.pop("timing_s")
        again.pop("timing_s")
        assert again == cached, job.name
