"""Sweep executors: local, process and Ray give the same results; the job cache resumes a sweep."""

import hashlib
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from reference.models import MLP, init_params
from reference.train import TrainConfig, train
from repro.common import RunContext
from repro.executor import (
    Executor,
    LocalExecutor,
    ProcessExecutor,
    RayExecutor,
    job_path,
    make_executor,
    run_jobs,
)


def _have_ray() -> bool:
    try:
        return importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):
        return False


HAVE_RAY = _have_ray()


# --- job functions: module level, so worker processes can import them ---------------------------
def train_job(seed: int, width: int = 8, epochs: int = 3) -> dict:
    """Train a tiny MLP on random data: a deterministic function of its arguments."""
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(48, 6, generator=g)
    y = torch.randint(0, 3, (48,), generator=g)
    model = MLP(6, [width], 3)
    params = train(model, init_params(model, seed), x, y, TrainConfig(epochs=epochs, batch_size=16, lr=0.1),
                   seed=seed, device="cpu", progress=False)
    with torch.no_grad():
        loss = F.cross_entropy(functional_call(model, params, (x,)), y).item()
    h = hashlib.sha256()
    for k in sorted(params):
        h.update(k.encode())
        h.update(params[k].contiguous().numpy().tobytes())
    return {"seed": seed, "width": width, "loss": loss, "params_sha256": h.hexdigest(),
            "head_bias": params["head.bias"]}  # a tensor: made JSON-able in the worker


def counting_job(x: int, log: str) -> dict:
    """Appends ``x`` to the file ``log`` every time it runs."""
    with open(log, "a") as f:
        f.write(f"{x}\n")
    return {"x": x, "square": x * x, "tuple": (x, x + 1), "nan": float("nan")}


def failing_job(x: int, log: str) -> int:
    if x == 2:
        raise ValueError("job 2 is broken")
    return counting_job(x, log)["square"]


def runs(log: Path) -> list[int]:
    return [int(s) for s in log.read_text().split()] if log.exists() else []


class Recording:
    """Wraps an executor (``map`` only, no ``imap``) and records the jobs it is handed."""

    def __init__(self, inner: Executor):
        self.inner = inner
        self.received: list = []

    def map(self, fn, jobs):
        self.received.extend(key for key, _ in jobs)
        return self.inner.map(fn, jobs)


@pytest.fixture
def ctx(tmp_path):
    return RunContext(target="sweep-test", out_root=tmp_path / "out", quick=True, device=torch.device("cpu"),
                      cache_dir=tmp_path / "cache")


TRAIN_JOBS = [({"job": "train", "seed": s, "width": w}, {"seed": s, "width": w}) for s in (0, 1) for w in (4, 8)]


@pytest.fixture(scope="module")
def local_results():
    return LocalExecutor().map(train_job, TRAIN_JOBS)


# --- executors ----------------------------------------------------------------------------------
def test_local_results_are_jsonable_and_deterministic(local_results):
    assert json.loads(json.dumps(local_results)) == local_results
    assert [r["seed"] for r in local_results] == [0, 0, 1, 1]
    assert isinstance(local_results[0]["head_bias"], list)
    assert LocalExecutor().map(train_job, TRAIN_JOBS[:1]) == local_results[:1]
    assert len({r["params_sha256"] for r in local_results}) == 4


def test_process_executor_equals_local(local_results):
    assert ProcessExecutor(workers=2).map(train_job, TRAIN_JOBS) == local_results


def test_process_executor_rejects_unpicklable_functions():
    with pytest.raises(TypeError, match="module-level function"):
        ProcessExecutor(workers=1).map(lambda seed: seed, [("k", {"seed": 0})])
    with pytest.raises(ValueError, match="workers"):
        ProcessExecutor(workers=0)


def test_executors_satisfy_the_protocol():
    assert isinstance(LocalExecutor(), Executor)
    assert isinstance(ProcessExecutor(1), Executor)
    assert LocalExecutor().map(train_job, []) == [] == ProcessExecutor(1).map(train_job, [])


def test_make_executor_reads_ctx_options():
    assert isinstance(make_executor({}), LocalExecutor)
    assert isinstance(make_executor({"executor": None, "dataset": "digits"}), LocalExecutor)
    ex = make_executor({"executor": "process", "workers": 3})
    assert isinstance(ex, ProcessExecutor) and ex.workers == 3
    with pytest.raises(ValueError, match="unknown executor 'dask'"):
        make_executor({"executor": "dask"})
    with pytest.raises(ValueError, match="ray executor"):
        make_executor({"executor": "process", "address": "auto"})


def test_ray_missing_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ImportError, match=r"pip install \.\[ray\]"):
        make_executor({"executor": "ray"})
    with pytest.raises(ImportError, match=r"pip install \.\[ray\]"):
        RayExecutor()


# --- caching and resumption ---------------------------------------------------------------------
def _js(results) -> str:
    """Results compared as JSON text (NaN ≠ NaN as floats, but their spellings are equal)."""
    return json.dumps(results, sort_keys=True)


def _count_jobs(log: Path, xs=range(5)) -> list:
    return [({"job": "count", "x": x}, {"x": x, "log": str(log)}) for x in xs]


def test_run_jobs_caches_every_job_in_ctx_job_files(ctx, tmp_path):
    log = tmp_path / "log.txt"
    jobs = _count_jobs(log)
    first = run_jobs(ctx, counting_job, jobs, LocalExecutor())
    assert math.isnan(first[3]["nan"])  # stored as "nan" on disk, handed back as a float
    assert _js(first[3]) == _js({"x": 3, "square": 9, "tuple": [3, 4], "nan": math.nan})
    assert sorted(runs(log)) == [0, 1, 2, 3, 4]
    for key, _ in jobs:
        stored = json.loads(job_path(ctx, key).read_text())
        assert stored["key"] == key
    # a fresh result equals the cached one, and ctx.job finds run_jobs' files (the same cache)
    again = Recording(LocalExecutor())
    assert _js(run_jobs(ctx, counting_job, jobs, again)) == _js(first)
    assert again.received == []
    assert _js(ctx.job(jobs[2][0], lambda: pytest.fail("ctx.job recomputed a cached job"))) == _js(first[2])
    assert sorted(runs(log)) == [0, 1, 2, 3, 4]


def test_run_jobs_finds_jobs_cached_by_ctx_job(ctx, tmp_path):
    log = tmp_path / "log.txt"
    jobs = _count_jobs(log, range(3))
    ctx.job(jobs[1][0], lambda: counting_job(**jobs[1][1]))
    rec = Recording(LocalExecutor())
    out = run_jobs(ctx, counting_job, jobs, rec)
    assert rec.received == [jobs[0][0], jobs[2][0]]
    assert [r["x"] for r in out] == [0, 1, 2]
    assert sorted(runs(log)) == [0, 1, 2]


def test_resumption_recomputes_only_the_missing_job(ctx, tmp_path):
    log = tmp_path / "log.txt"
    jobs = _count_jobs(log)
    first = run_jobs(ctx, counting_job, jobs, LocalExecutor())
    job_path(ctx, jobs[3][0]).unlink()
    log.unlink()
    rec = Recording(LocalExecutor())
    assert _js(run_jobs(ctx, counting_job, jobs, rec)) == _js(first)
    assert rec.received == [jobs[3][0]]
    assert runs(log) == [3]


def test_a_torn_job_file_is_recomputed(ctx, tmp_path):
    log = tmp_path / "log.txt"
    jobs = _count_jobs(log)
    first = run_jobs(ctx, counting_job, jobs, LocalExecutor())
    path = job_path(ctx, jobs[1][0])
    path.write_text(path.read_text()[:17])  # a partial write by an older, non-atomic writer
    job_path(ctx, jobs[4][0]).write_text('{"key": 4}')  # valid JSON without a result
    log.unlink()
    assert _js(run_jobs(ctx, counting_job, jobs, LocalExecutor())) == _js(first)
    assert sorted(runs(log)) == [1, 4]
    assert json.loads(path.read_text())["result"] == {**first[1], "nan": "nan"}


def test_repeated_keys_run_once(ctx, tmp_path):
    log = tmp_path / "log.txt"
    jobs = _count_jobs(log, [1, 2, 1, 1])
    out = run_jobs(ctx, counting_job, jobs, LocalExecutor())
    assert [r["x"] for r in out] == [1, 2, 1, 1]
    assert sorted(runs(log)) == [1, 2]


def test_a_failing_job_keeps_the_finished_ones_cached(ctx, tmp_path):
    log = tmp_path / "log.txt"
    jobs = [({"job": "fail", "x": x}, {"x": x, "log": str(log)}) for x in range(4)]
    with pytest.raises(ValueError, match="job 2 is broken") as info:
        run_jobs(ctx, failing_job, jobs, LocalExecutor())
    if hasattr(info.value, "__notes__"):
        assert "'x': 2" in info.value.__notes__[0]
    assert [job_path(ctx, k).is_file() for k, _ in jobs] == [True, True, False, False]
    rec = Recording(LocalExecutor())
    with pytest.raises(ValueError):
        run_jobs(ctx, failing_job, jobs, rec)
    assert rec.received == [jobs[2][0], jobs[3][0]]


def test_process_sweep_resumes_from_the_cache(ctx, tmp_path, local_results):
    """The train sweep through run_jobs with worker processes: same results as local, cached, resumed."""
    out = run_jobs(ctx, train_job, TRAIN_JOBS, ProcessExecutor(workers=2))
    assert out == local_results
    job_path(ctx, TRAIN_JOBS[2][0]).unlink()
    rec = Recording(LocalExecutor())
    assert run_jobs(ctx, train_job, TRAIN_JOBS, rec) == local_results
    assert rec.received == [TRAIN_JOBS[2][0]]


def test_run_jobs_defaults_to_the_executor_in_ctx_options(ctx, tmp_path):
    log = tmp_path / "log.txt"
    ctx.options = {"executor": "local"}
    assert [r["x"] for r in run_jobs(ctx, counting_job, _count_jobs(log, [7]))] == [7]
    ctx.options = {"executor": "nope"}
    with pytest.raises(ValueError, match="unknown executor"):
        run_jobs(ctx, counting_job, _count_jobs(log, [8]))
    assert run_jobs(ctx, counting_job, _count_jobs(log, [7]))[0]["x"] == 7  # cached: no executor needed


# --- command line -------------------------------------------------------------------------------
def test_cli_stores_executor_options(monkeypatch, tmp_path):
    import repro.__main__ as cli
    from repro.registry import Target

    seen = {}
    fake = Target("fake-sweep", "paper", "", (), "", run=lambda ctx: seen.update(ctx.options))
    monkeypatch.setattr(cli, "get_target", lambda name: fake)
    argv = ["run", "fake-sweep", "--quick", "--device", "cpu", "--out", str(tmp_path), "--no-progress"]
    assert cli.main([*argv, "--executor", "process", "--workers", "2"]) == 0
    assert seen["executor"] == "process" and seen["workers"] == 2 and seen["address"] is None
    assert isinstance(make_executor(seen), ProcessExecutor)
    assert cli.main(argv) == 0
    assert seen["executor"] == "local" and seen["workers"] is None
    assert cli.main([*argv, "--workers", "0"]) == 2
    assert cli.main([*argv, "--address", "auto"]) == 2


# --- Ray ----------------------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed (pip install .[ray]; tox -e ray)")
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
def test_ray_executor_equals_local(ctx, local_results):
    import ray

    ex = RayExecutor(num_cpus=2)  # starts a local instance: ray.init(num_cpus=2, include_dashboard=False)
    try:
        assert ex.map(train_job, TRAIN_JOBS) == local_results
        out = run_jobs(ctx, train_job, TRAIN_JOBS, ex)  # imap: cached as they complete
        assert out == local_results
        assert all(job_path(ctx, k).is_file() for k, _ in TRAIN_JOBS)
        with pytest.raises(ValueError, match="job 2 is broken"):
            ex.map(failing_job, [({"x": x}, {"x": x, "log": str(ctx.out / "log.txt")}) for x in (1, 2)])
    finally:
        ex.shutdown()
    assert not ray.is_initialized()


def test_job_returns_non_finite_floats_as_floats_fresh_and_cached(tmp_path) -> None:
    """JSON spells NaN/inf as strings on disk; ``ctx.job`` hands back floats both times."""
    import math

    ctx = RunContext(target="nan-test", out_root=tmp_path, quick=True, device=torch.device("cpu"),
                     cache_dir=tmp_path / "cache", progress=False)
    fresh = ctx.job({"k": 1}, lambda: {"a": float("nan"), "b": [float("inf"), -math.inf, 1.5], "c": "name"})
    cached = ctx.job({"k": 1}, lambda: pytest.fail("recomputed"))
    for r in (fresh, cached):
        assert math.isnan(r["a"]) and r["b"][:2] == [math.inf, -math.inf] and r["b"][2] == 1.5 and r["c"] == "name"
