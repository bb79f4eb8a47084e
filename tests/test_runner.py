"""The runner's guarantees (repro/runner): keys cover data content, config, seed and code; caches are
checked; outputs appear as one set; bad folders fail first; workers die with the main process.

Each test names the defect of the hand-built targets it guards against. Most use the tiny ``toy`` target
(tests/toy_target.py); the data-content test uses a real target on fake MNIST files.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import toy_target  # noqa: F401  (registers "toy" and "toy-mono")
from fake_data import make_mnist

from repro.__main__ import main
from repro.runner import get_target
from repro.runner import output as output_mod
from repro.runner.config import apply_overrides, config_for
from repro.runner.output import OutputError, lock
from repro.runner.run import RunOptions, run_target

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _run(tmp_path: Path, name: str = "toy", **kw):
    opts = RunOptions(size=kw.pop("size", "quick"), out=tmp_path / "out", cache_dir=tmp_path / "cache",
                      device="cpu", progress=False, **kw)
    return run_target(get_target(name), opts)


def _table(tmp_path: Path, name: str = "toy") -> str:
    return (tmp_path / "out" / name / "toy.csv").read_text()


def _endpoints(tmp_path: Path) -> int:
    return len(list((tmp_path / "cache" / "endpoints").glob("*.pt")))


def _jobs(tmp_path: Path, target: str = "toy") -> list[Path]:
    return sorted((tmp_path / "cache" / "jobs" / target).glob("*.json"))


def _env(**extra) -> dict:
    env = {**os.environ, "MODECONN_TARGETS": "toy_target", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.update(extra)
    return env


def _cli(tmp_path: Path, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "repro", "run", *args, "--out", str(tmp_path / "out"),
           "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--device", "cpu"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or _env(), cwd=ROOT)


# --- keys: data content, config fields read, seed, code ----------------------------------------------------
def test_changed_data_content_recomputes_everything(tmp_path):
    """Defect: keys named the dataset, not its content; a second --data-dir gave the first one's table."""
    make_mnist(tmp_path / "A", n_train=40, n_test=20, seed=1)
    make_mnist(tmp_path / "B", n_train=40, n_test=20, seed=2)
    a = _run(tmp_path, size="paper", data_dir=tmp_path / "A")
    table_a = _table(tmp_path, "toy-mnist")
    b = _run(tmp_path, size="paper", data_dir=tmp_path / "B")
    assert a["data_fingerprint"] != b["data_fingerprint"]
    assert _table(tmp_path, "toy-mnist") != table_a
    assert _endpoints(tmp_path) == 4  # two per data set: nothing of A's was reused for B
    # the same content in another folder is the same data: nothing is recomputed
    (tmp_path / "C").mkdir()
    for f in (tmp_path / "A").iterdir():
        (tmp_path / "C" / f.name).write_bytes(f.read_bytes())
    prov_before = len(_jobs(tmp_path))
    _run(tmp_path, size="paper", data_dir=tmp_path / "C")
    assert _table(tmp_path, "toy-mnist") == table_a
    assert len(_jobs(tmp_path)) == prov_before and _endpoints(tmp_path) == 4


def test_a_run_loads_its_data_once_in_this_process(tmp_path, monkeypatch):
    """The runner loads and fingerprints the data, and the training plan and the local jobs take that copy:
    no second load (MNIST-1D's generation takes seconds)."""
    import repro.runner.context as context

    make_mnist(tmp_path / "D", n_train=30, n_test=10, seed=3)  # a folder no other test loads
    loads = []
    real = context.load_dataset
    monkeypatch.setattr(context, "load_dataset", lambda *a, **k: loads.append(a) or real(*a, **k))
    _run(tmp_path, size="paper", data_dir=tmp_path / "D")
    assert loads == [] and _endpoints(tmp_path) == 2


def test_a_real_target_keys_by_content(tmp_path):
    """The same on ainsworth2023-mlp's paper path (MNIST IDX files), a few steps."""
    sets = ["widths=[8]", "depth=1", "pairs=1", "grid=3", "restarts=1", "train.epochs=1", "train.batch_size=64"]
    overrides = [tuple(s.split("=", 1)) for s in sets]
    make_mnist(tmp_path / "A", n_train=30, n_test=10, seed=1)
    make_mnist(tmp_path / "B", n_train=30, n_test=10, seed=2)
    out = tmp_path / "out" / "ainsworth2023-mlp-mnist"
    _run(tmp_path, "ainsworth2023-mlp", size="paper", data_dir=tmp_path / "A", overrides=overrides)
    first = (out / "barriers_per_pair.csv").read_text()
    _run(tmp_path, "ainsworth2023-mlp", size="paper", data_dir=tmp_path / "B", overrides=overrides)
    assert (out / "barriers_per_pair.csv").read_text() != first


def test_changing_a_field_the_jobs_read_recomputes_the_jobs_only(tmp_path, capsys):
    """Defect: permuted-simplex keyed its per-model jobs without the training config, so changed epochs
    reused old results. Here: a job field recomputes the jobs, not the endpoints; a training field
    retrains; a report-only field recomputes nothing."""
    _run(tmp_path)
    t0 = _table(tmp_path)
    assert _endpoints(tmp_path) == 2 and len(_jobs(tmp_path)) == 2
    _run(tmp_path, overrides=[("scale", "2.0")])
    assert _endpoints(tmp_path) == 2 and len(_jobs(tmp_path)) == 4
    assert _table(tmp_path) != t0
    _run(tmp_path, overrides=[("train.epochs", "2")])
    assert _endpoints(tmp_path) == 4 and len(_jobs(tmp_path)) == 6
    capsys.readouterr()
    _run(tmp_path, overrides=[("label", "other")])
    out = capsys.readouterr().out
    assert "0 of 2 jobs to run" in out and "all 2 endpoints cached" in out
    assert "other" in _table(tmp_path)


def test_the_seed_is_part_of_every_key(tmp_path):
    _run(tmp_path)
    s = _run(tmp_path, seed=3)
    assert s["seed"] == 3 and _endpoints(tmp_path) == 4 and len(_jobs(tmp_path)) == 4


def test_the_thread_count_is_part_of_every_key(tmp_path, capsys):
    """Defect: keys held the device type only, so floats computed with 2 torch threads (whose count steers the
    evaluator's and ``train_many``'s choices and the kernels' summation order) were reused by a 1-thread run,
    and endpoints were reused across devices. Now a run under another thread count recomputes everything,
    a run under the same one reuses everything, and the provenance names the jobs' thread count."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _run(tmp_path)
        torch.set_num_threads(2)
        s = _run(tmp_path)
        assert _endpoints(tmp_path) == 4 and len(_jobs(tmp_path)) == 4
        assert s["device"].endswith("2 threads)")
        capsys.readouterr()
        _run(tmp_path)
        out = capsys.readouterr().out
        assert "0 of 2 jobs to run" in out and "all 2 endpoints cached" in out
        prov = json.loads((tmp_path / "out" / "toy" / "provenance.json").read_text())
        assert prov["device"].endswith("2 threads)")
    finally:
        torch.set_num_threads(before)
    proc = _run(tmp_path, executor="process", workers=1)  # its worker runs with one thread: the 1-thread keys
    assert proc["device"].endswith("1 threads)") and _endpoints(tmp_path) == 4 and len(_jobs(tmp_path)) == 4


def test_groups_trained_one_after_another_are_one_job_per_endpoint(tmp_path, capsys):
    """A group that ``train_many`` trains one after another (a 19 MFLOP step with one torch thread) is planned as
    one training job per endpoint, so worker processes share it out; the endpoints are bit-identical to the
    group trained by ``train_many`` in one call. A group it trains at once (vmap) stays one job."""
    from reference.data import load_dataset
    from reference.models import build_model, init_params
    from reference.train import train_many
    from repro.runner.context import DataRef, Endpoint, JobContext, data_fingerprint
    from repro.runner.endpoints import load_endpoint, plan_training

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        s = _run(tmp_path, overrides=[("width", "512")])
        out = capsys.readouterr().out
        assert "training 2 of 2 endpoints in 2 job(s) (0 of groups trained at once, 2 of one endpoint)" in out
        # the provenance times the two phases of this invocation (the log keeps no wall time)
        jobs = json.loads((tmp_path / "out" / "toy" / "provenance.json").read_text())["jobs"]
        assert jobs["endpoint_training_s"] > 0 and jobs["jobs_s"] > 0 and jobs["endpoints_trained"] == 2
        log = (tmp_path / "out" / "toy" / "run.log").read_text()
        assert "trained 2 endpoints in" in out and "trained 2 endpoints in" not in log and " jobs in " not in log
        data = load_dataset("digits")
        ref = DataRef("digits", data_fingerprint(data), None)
        mcfg = {"name": "mlp", "in_features": data.x_train.shape[1], "widths": [512], "num_classes": data.num_classes,
                "bias": True}
        cfg = get_target("toy").sizes["quick"].train
        es = [Endpoint(mcfg, cfg, i, ref) for i in range(2)]
        model = build_model(mcfg)
        group = train_many(model, [init_params(model, e.seed) for e in es], data.x_train, data.y_train, cfg,
                           [e.seed for e in es], device="cpu", progress=False)
        ctx = JobContext(device="cpu", cache_dir=str(tmp_path / "cache"), numerics=s["device"])
        for e, want in zip(es, group, strict=True):
            got = load_endpoint(tmp_path / "cache", e, ctx.numerics)
            assert all(torch.equal(got[k], want[k]) for k in want)
        assert plan_training(es, ctx, threads=1) == [((es[0],), "sequential"), ((es[1],), "sequential")]
        assert plan_training(es, ctx, threads=2) == [(tuple(es), "vmap")]  # 19 MFLOP < 30 with 2 threads
        narrow = [Endpoint({**mcfg, "widths": [4]}, cfg, i, ref) for i in range(2)]
        assert plan_training([*narrow, *es], ctx, threads=1) == [
            (tuple(narrow), "vmap"), ((es[0],), "sequential"), ((es[1],), "sequential")]
    finally:
        torch.set_num_threads(before)


def test_another_cpu_recomputes(tmp_path, monkeypatch, capsys):
    """Defect: keys named the CPU by its architecture only ('x86_64'), and two machines of one kind whose MKL
    took other code paths computed different floats from the same code, seeds and threads. Now the key names
    the CPU's model and the instruction set torch dispatches to, so a cache made on another CPU recomputes."""
    import repro.runner.context as context_mod

    _run(tmp_path)
    here = context_mod.cpu_identity()
    assert context_mod.platform.machine() in here and torch.backends.cpu.get_cpu_capability() in here
    monkeypatch.setattr(context_mod, "cpu_identity", lambda: "x86_64 another CPU, AVX2")
    capsys.readouterr()
    s = _run(tmp_path)
    assert "2 of 2 jobs to run" in capsys.readouterr().out and _endpoints(tmp_path) == 4
    assert "another CPU, AVX2" in s["device"]


def test_a_code_change_recomputes(tmp_path, monkeypatch):
    import repro.runner.context as context_mod
    import repro.runner.run as run_mod

    _run(tmp_path)
    for mod in (run_mod, context_mod):  # as an edit of the code would: every key and the run's check see it
        monkeypatch.setattr(mod, "code_version", lambda module_file=None: "a-different-version")
    _run(tmp_path)
    assert len(_jobs(tmp_path)) == 4


# --- caches are checked -------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"\x00\xffrandom bytes\x13", b"[1, 2, 3]", b'{"key": 1}',
                                     b'{"key": {"job": "x"}, "result": {"index": 0}}', b'{"key": null, "result": 5}'])
def test_a_bad_job_file_is_reported_by_path_and_recomputed(tmp_path, capsys, content):
    """Defect: a cached file was trusted without checking its key; random bytes crashed every later run."""
    _run(tmp_path)
    before = _table(tmp_path)
    victim = _jobs(tmp_path)[0]
    victim.write_bytes(content)
    capsys.readouterr()
    _run(tmp_path)
    out = capsys.readouterr().out
    assert str(victim) in out and "recomputing" in out
    assert _table(tmp_path) == before
    assert json.loads(victim.read_text())["result"]["index"] in (0, 1)


def test_a_wrong_result_shape_is_recomputed(tmp_path, capsys):
    _run(tmp_path)
    victim = _jobs(tmp_path)[0]
    rec = json.loads(victim.read_text())
    rec["result"] = [1, 2]
    victim.write_text(json.dumps(rec))
    _run(tmp_path)
    assert str(victim) in capsys.readouterr().out


def test_a_corrupt_endpoint_is_retrained(tmp_path, capsys):
    _run(tmp_path)
    before = _table(tmp_path)
    ep = sorted((tmp_path / "cache" / "endpoints").glob("*.pt"))[0]
    ep.write_bytes(b"not a checkpoint")
    capsys.readouterr()
    _run(tmp_path)
    assert str(ep) in capsys.readouterr().out
    assert _table(tmp_path) == before


# --- options are honoured or refused ------------------------------------------------------------------------
def test_dataset_is_honoured_or_refused(tmp_path, capsys):
    """Defect: six targets read no --dataset and trained on their default data under the default name."""
    s = _run(tmp_path, dataset="mnist1d")
    assert s["dataset"] == "mnist1d" and (tmp_path / "out" / "toy-mnist1d" / "toy.csv").is_file()
    with pytest.raises(ValueError, match="does not take --dataset 'mnist1d'; it supports: digits"):
        _run(tmp_path, "toy-mono", dataset="mnist1d")
    assert main(["run", "toy-mono", "--dataset", "mnist1d", "--out", str(tmp_path / "o2")]) == 2
    assert "it supports: digits" in capsys.readouterr().err


def test_set_is_validated_and_recorded(tmp_path):
    cfg = get_target("toy").sizes["quick"]
    with pytest.raises(ValueError, match="no field 'nope'; its fields: dataset, seed"):
        apply_overrides(cfg, [("nope", "1")])
    with pytest.raises(ValueError, match="expected an integer"):
        apply_overrides(cfg, [("jobs", "two")])
    with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
        apply_overrides(cfg, [("train.epochs", "0")])
    with pytest.raises(ValueError, match="group of settings"):
        apply_overrides(cfg, [("train", "3")])
    assert apply_overrides(cfg, [("train.lr", "0.5"), ("jobs", "1")]).train.lr == 0.5
    s = _run(tmp_path, overrides=[("jobs", "1")])
    assert s["overrides"] == ["jobs=1"]
    prov = json.loads((tmp_path / "out" / "toy" / "provenance.json").read_text())
    assert prov["overrides"] == ["jobs=1"] and prov["config"]["jobs"] == 1
    assert prov["data"]["fingerprint"] == s["data_fingerprint"] and prov["size"] == "quick"


def test_every_target_honours_every_dataset_it_declares(tmp_path):
    """Defect: --dataset was read by 4 of 10 targets. Now, for every target and every dataset it declares,
    every data reference in every job (and in every endpoint it trains) names that dataset."""
    from fake_data import make_cifar

    from reference.data import load_dataset
    from repro.runner.context import DataRef, LoadedData, data_fingerprint, find, find_endpoints
    from repro.runner.declare import load_all

    make_mnist(tmp_path / "mnist", n_train=20, n_test=10)
    make_cifar(tmp_path / "cifar", n=4)
    dirs = {"mnist": tmp_path / "mnist", "cifar10": tmp_path / "cifar"}
    loaded = {}
    checked = 0
    for t in load_all().values():
        if t.name.startswith("toy"):
            continue
        for ds in t.datasets:
            if ds not in loaded:
                d = load_dataset(ds, data_dir=dirs.get(ds))
                loaded[ds] = LoadedData(DataRef(ds, data_fingerprint(d), str(dirs.get(ds))), d)
            jobs, errors = None, []
            for size in ("quick", "paper"):  # a size may refuse a dataset with a message (e.g. an exact
                try:                          # Hessian too large for MNIST); one size must take it
                    jobs = t.jobs(config_for(t, size, ds, None, []), loaded[ds])
                    break
                except ValueError as e:
                    errors.append(str(e))
            assert jobs is not None, (t.name, ds, errors)
            refs = [r for j in jobs for r in find(j.args, DataRef)]
            refs += [e.data for j in jobs for e in find_endpoints(j.args)]
            assert jobs and refs, (t.name, ds)
            assert {r.dataset for r in refs} == {ds}, (t.name, ds)
            checked += 1
    assert checked >= 10


def test_report_must_judge_exactly_the_declared_claims(tmp_path, monkeypatch):
    monkeypatch.setenv("TOY_BAD_REPORT", "1")
    with pytest.raises(ValueError, match=r"missing \['small'\]"):
        _run(tmp_path)
    assert not (tmp_path / "out" / "toy").exists()


# --- outputs as one set -------------------------------------------------------------------------------------
def test_a_failing_run_leaves_the_previous_set(tmp_path, monkeypatch):
    """Defect: tables were replaced one by one and the summary last, so a failed run mixed two runs."""
    _run(tmp_path)
    d = tmp_path / "out" / "toy"
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    monkeypatch.setenv("TOY_FAIL", "1")
    with pytest.raises(RuntimeError, match="fails on purpose"):
        _run(tmp_path, overrides=[("scale", "3.0")])
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert not any((tmp_path / "out" / ".staging").glob("*"))
    monkeypatch.delenv("TOY_FAIL")
    _run(tmp_path, overrides=[("scale", "3.0")])  # resumes: job 0 was cached by the failed run
    prov = json.loads((d / "provenance.json").read_text())
    assert prov["jobs"]["cached"] == 1 and prov["invocations"] == 2
    assert prov["cumulative_wall_time_s"] >= prov["wall_time_s"]


def test_a_killed_run_leaves_the_previous_set_and_its_leftovers_are_cleaned(tmp_path):
    assert _cli(tmp_path, "toy").returncode == 0
    d = tmp_path / "out" / "toy"
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    cmd = [sys.executable, "-m", "repro", "run", "toy", "--set", "sleep=30", "--out", str(tmp_path / "out"),
           "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--device", "cpu"]
    pidfile = tmp_path / "pids"
    p = subprocess.Popen(cmd, env=_env(TOY_PIDFILE=str(pidfile)), cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    _wait_for(lambda: pidfile.exists())
    (tmp_path / "out" / ".staging").mkdir(exist_ok=True)
    (tmp_path / "out" / ".staging" / f"toy.pid{p.pid}").mkdir()  # what a kill during the write leaves
    stale_tmp = tmp_path / "cache" / "jobs" / "toy" / f".x.json.pid{p.pid}.abc.tmp"
    stale_tmp.write_text("{torn")
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    assert {q.name: q.read_bytes() for q in d.iterdir()} == before
    r = _cli(tmp_path, "toy", "--set", "label=after")
    assert r.returncode == 0, r.stderr
    assert not stale_tmp.exists() and not any((tmp_path / "out" / ".staging").iterdir())
    assert "after" in _table(tmp_path)


def test_a_killed_swap_is_restored(tmp_path):
    _run(tmp_path)
    d = tmp_path / "out" / "toy"
    aside = tmp_path / "out" / ".old" / "toy.pid999999999"
    aside.parent.mkdir()
    os.replace(d, aside)  # a kill between the swap's two renames
    output_mod.clean_stale(tmp_path / "out")
    assert (d / "summary.json").is_file() and not aside.exists()


def test_a_second_run_into_the_same_out_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    with lock(tmp_path / "out", "toy"), pytest.raises(OutputError, match="is writing .*toy; wait for it"):
        _run(tmp_path)
    _run(tmp_path)  # once the first one is done, a run goes ahead


def test_outputs_are_group_readable(tmp_path):
    old = os.umask(0o022)
    try:
        _run(tmp_path)
    finally:
        os.umask(old)
    for p in (tmp_path / "out" / "toy").iterdir():
        assert p.stat().st_mode & 0o044 == 0o044, p
    for p in _jobs(tmp_path):
        assert p.stat().st_mode & 0o044 == 0o044, p


def test_summary_records_seed_size_overrides_fingerprint(tmp_path):
    s = _run(tmp_path, overrides=[("label", "z")], seed=1)
    stored = json.loads((tmp_path / "out" / "toy" / "summary.json").read_text())
    assert stored == s
    for k in ("seed", "size", "overrides", "data_fingerprint", "device", "claims", "target", "dataset"):
        assert k in stored
    assert [c["id"] for c in stored["claims"]] == ["finite", "small"]
    assert (tmp_path / "out" / "toy" / "run.log").read_text().count("claims") >= 1


# --- bad folders fail before any work ------------------------------------------------------------------------
def test_out_that_is_a_file_fails_first(tmp_path):
    (tmp_path / "f").write_text("x")
    for kw in ({"out": tmp_path / "f"}, {"cache_dir": tmp_path / "f"}, {"out": tmp_path / "f" / "sub"}):
        opts = RunOptions(size="quick", out=tmp_path / "out", cache_dir=tmp_path / "cache", device="cpu",
                          progress=False)
        opts = replace(opts, **kw)
        with pytest.raises(OutputError, match=str(tmp_path / "f")):
            run_target(get_target("toy"), opts)
    assert _endpoints(tmp_path) == 0


def test_a_full_disk_fails_first(tmp_path, monkeypatch):
    monkeypatch.setattr(output_mod, "free_bytes", lambda path: 1024)
    with pytest.raises(OutputError, match=r"only 0\.0 MiB free"):
        _run(tmp_path)
    assert _endpoints(tmp_path) == 0


def test_the_cli_reports_bad_folders(tmp_path):
    (tmp_path / "f").write_text("x")
    r = subprocess.run([sys.executable, "-m", "repro", "run", "toy", "--out", str(tmp_path / "f")],
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=120)
    assert r.returncode == 1 and f"--out {tmp_path / 'f'} is a file" in r.stderr


# --- executors -----------------------------------------------------------------------------------------------
def test_process_executor_equals_local(tmp_path):
    local = _run(tmp_path / "l")
    proc = _run(tmp_path / "p", executor="process", workers=2)
    assert _table(tmp_path / "l") == _table(tmp_path / "p")
    assert [c["held"] for c in local["claims"]] == [c["held"] for c in proc["claims"]]


def _wait_for(cond, timeout: float = 60.0) -> None:
    t = time.time()
    while not cond():
        if time.time() - t > timeout:
            raise TimeoutError("condition not met in time")
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_workers_end_with_the_main_process(tmp_path, sig):
    """Defect: after SIGTERM/SIGKILL of the main process the pool's workers stayed alive forever."""
    pidfile = tmp_path / "pids"
    cmd = [sys.executable, "-m", "repro", "run", "toy", "--set", "sleep=120", "--executor", "process", "--workers",
           "2", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    _kill_and_check_the_job_processes_end(cmd, sig, pidfile)


def _kill_and_check_the_job_processes_end(cmd: list[str], sig: int, pidfile: Path) -> None:
    """Start ``cmd``, wait until two processes wrote their pid into ``pidfile`` from a job, send ``sig`` to
    the command and check that both processes end."""
    p = subprocess.Popen(cmd, env=_env(TOY_PIDFILE=str(pidfile)), cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(lambda: pidfile.exists() and len(pidfile.read_text().split()) == 2, timeout=120)
        pids = [int(x) for x in pidfile.read_text().split()]
        assert len(set(pids)) == 2 and all(_alive(w) for w in pids)
        p.send_signal(sig)
        p.wait(30)
        _wait_for(lambda: not any(_alive(w) for w in pids), timeout=15)
    finally:
        if p.poll() is None:
            p.kill()


# --- the command line ----------------------------------------------------------------------------------------
def test_list_shows_sizes_datasets_and_claim_ids(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "ainsworth2023-mlp" in out and "arXiv:2209.04836" in out
    assert "sizes: quick, cpu, paper" in out and "claim wm-removes-most:" in out
    assert "datasets: digits, mnist1d" in out


def test_run_several_targets(tmp_path):
    r = _cli(tmp_path, "toy", "toy-mono")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "toy" / "summary.json").is_file()
    assert (tmp_path / "out" / "toy-mono" / "summary.json").is_file()


def test_cli_errors(tmp_path, capsys):
    assert main(["run", "no-such-target"]) == 2
    assert "unknown target 'no-such-target'" in capsys.readouterr().err
    assert main(["run"]) == 2
    assert main(["run", "toy", "--all"]) == 2
    assert main(["run", "toy", "--quick", "--size", "paper"]) == 2
    assert main(["run", "toy", "--set", "novalue"]) == 2
    assert "field=value" in capsys.readouterr().err
    assert main(["run", "toy", "--data-dir", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["run", "toy", "--executor", "local", "--workers", "2"]) == 2  # refused, not ignored
    assert "--workers is for --executor process or ray" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert main(["run", "toy", "--device", "cuda", "--out", str(tmp_path)]) == 2
        assert "cuda" in capsys.readouterr().err.lower()


def test_missing_data_dir_for_a_file_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--data-dir is required"):
        _run(tmp_path, size="paper")


def _have_ray() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):
        return False


@pytest.mark.ray
@pytest.mark.skipif(not _have_ray(), reason="needs Ray: pip install .[ray] (tox -e ray)")
def test_ray_executor_equals_local(tmp_path):
    local = _run(tmp_path / "l")
    ray = _run(tmp_path / "r", executor="ray", workers=2)
    assert _table(tmp_path / "l") == _table(tmp_path / "r")
    assert [c["held"] for c in local["claims"]] == [c["held"] for c in ray["claims"]]


def test_the_code_version_covers_the_runners_compute_modules(tmp_path):
    """Defect: the code version hashed ``reference/`` only, so an edit of how the runner builds data, models
    and endpoints or trains the endpoints (``repro/runner/context.py``, ``endpoints.py``) reused results
    computed the old way. Now an edit of either, or of the shared settings groups (``settings.py``: the STE
    as targets run it), changes the version; an edit of the output writer does not (it computes nothing that
    is cached)."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    for d in ("reference", "repro"):
        shutil.copytree(root / d, tmp_path / d, ignore=shutil.ignore_patterns("results", "__pycache__"))

    def version() -> str:
        code = "from repro.runner.context import code_version; print(code_version())"
        return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                              check=True).stdout.strip()

    versions = [version()]
    for name in ("output.py", "endpoints.py", "context.py", "settings.py"):
        with open(tmp_path / "repro" / "runner" / name, "a") as f:
            f.write("\n# an edit\n")
        versions.append(version())
    assert versions[1] == versions[0] and len(set(versions[1:])) == 4


def test_the_process_pool_serves_every_map_until_closed(tmp_path):
    """One pool per executor: a run's endpoint training and its jobs run in the same workers (two maps, one
    start-up); a failing map shuts the pool down, and the next map starts a fresh one."""
    from repro.runner.context import JobContext
    from repro.runner.executors import ProcessExecutor

    ctx = JobContext(device="cpu", cache_dir=str(tmp_path))
    ex = ProcessExecutor(workers=1)
    try:
        first = {r["pid"] for _, r in ex.imap([(toy_target.pid_job, "a"), (toy_target.pid_job, "b")], ctx)}
        second = {r["pid"] for _, r in ex.imap([(toy_target.pid_job, "c")], ctx)}
        assert len(first) == 1 and first == second and os.getpid() not in first
        with pytest.raises(RuntimeError, match="pid_job fails on purpose"):
            list(ex.imap([(toy_target.pid_job, "fail")], ctx))
        third = {r["pid"] for _, r in ex.imap([(toy_target.pid_job, "d")], ctx)}
        assert third.isdisjoint(first) and not _alive(next(iter(first)))  # the failed pool's worker is gone
    finally:
        ex.close()


def test_an_edit_of_reference_during_a_run_is_refused(tmp_path, monkeypatch):
    """A job sees the code version the run began with: when ``reference/`` changed on disk since (a worker
    started after the edit imports the new code while the run files results under the old keys), the job
    raises and says so, in this process and in a worker; an unchanged version runs."""
    from repro.runner.context import JobContext, code_version
    from repro.runner.executors import LocalExecutor, ProcessExecutor

    stale = JobContext(device="cpu", cache_dir=str(tmp_path), code="0" * 16)
    assert stale.code != code_version()
    for ex in (LocalExecutor(), ProcessExecutor(workers=1)):
        try:
            changed = (r"reference/ or repro/runner/context\.py, repro/runner/endpoints\.py, repro/runner/settings\.py "
                       r"changed while .*0{16}")
            with pytest.raises(RuntimeError, match=changed):
                list(ex.imap([(toy_target.toy_job, None)], stale))
        finally:
            ex.close()
    JobContext(device="cpu", cache_dir=str(tmp_path), code=code_version()).check_code()  # unchanged: no error
    JobContext(device="cpu", cache_dir=str(tmp_path)).check_code()  # no version recorded: unchecked


# --- several targets at once ----------------------------------------------------------------------------------
def test_targets_at_once_give_the_same_sets_as_one_after_another(tmp_path):
    """``--targets-at-once 2`` runs each target in its own process: the output sets equal those of a run one
    after another (fresh caches both; the two targets train the same endpoints at the same time, into one
    cache), and the log holds each target's whole output once."""
    seq = _cli(tmp_path / "seq", "toy", "toy-mono")
    assert seq.returncode == 0, seq.stderr
    par = _cli(tmp_path / "par", "toy", "toy-mono", "--targets-at-once", "2")
    assert par.returncode == 0, par.stderr + par.stdout
    for name in ("toy", "toy-mono"):
        assert _table(tmp_path / "seq", name) == _table(tmp_path / "par", name)
        assert par.stdout.count(f"== {name}: claims ==") == 1
    assert "2 targets in" in par.stdout and "2 at a time" in par.stdout
    assert _endpoints(tmp_path / "par") == 2 and not list((tmp_path / "par" / "out").glob(".staging/*"))


def test_targets_at_once_report_a_failed_target_and_refuse_one_target(tmp_path):
    bad = _cli(tmp_path, "toy", "toy-mono", "--targets-at-once", "2", env=_env(TOY_FAIL="1"))
    assert bad.returncode == 1
    assert "FAILED (exit status 1)" in bad.stdout and "toy job 1 fails on purpose" in bad.stdout
    assert "2 of 2 targets failed" in bad.stderr
    one = _cli(tmp_path, "toy", "--targets-at-once", "2")
    assert one.returncode == 2 and "--targets-at-once is for several targets" in one.stderr
    zero = _cli(tmp_path, "toy", "toy-mono", "--targets-at-once", "0")
    assert zero.returncode == 2 and "must be >= 1" in zero.stderr


def test_targets_at_once_start_the_longest_first(tmp_path):
    from repro.runner.concurrent import longest_first

    for name, secs in (("a", 5.0), ("b", 50.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "provenance.json").write_text(json.dumps({"wall_time_s": secs}))
    names = ["a", "b", "c"]  # c has never run: it may be the longest
    assert longest_first(names, [tmp_path / n for n in names]) == ["c", "b", "a"]
    # a time recorded in the cache comes first (a's output set may be from a run served by the cache)
    assert longest_first(names, [tmp_path / n for n in names], [90.0, None, 1.0]) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="3 names, 3 folders and 2 recorded"):
        longest_first(names, [tmp_path / n for n in names], [1.0, 2.0])


def test_the_cache_records_each_targets_wall_time_for_the_next_fresh_out(tmp_path):
    """A run that computed something records its wall time in the cache (a run served whole from the cache
    leaves the record alone), and ``--targets-at-once`` orders a new ``--out`` by it."""
    from repro.runner.run import record_wall_time, recorded_wall_time

    cache = tmp_path / "cache"
    assert recorded_wall_time(cache, "toy", "cpu") is None
    assert _cli(tmp_path, "toy", "--set", "sleep=0.5").returncode == 0
    first = recorded_wall_time(cache, "toy", "cpu")
    assert first is not None and first >= 0.5
    record_wall_time(cache, "toy", "cpu", 1234.0)  # stands for a long run; the cached rerun keeps it
    assert _cli(tmp_path, "toy", "--set", "sleep=0.5").returncode == 0
    assert recorded_wall_time(cache, "toy", "cpu") == 1234.0
    record_wall_time(cache, "toy-mono", "cpu", 5678.0)
    shutil.rmtree(tmp_path / "out")  # a new --out: no output set to read a time from
    run = _cli(tmp_path, "toy", "toy-mono", "--targets-at-once", "2")
    assert run.returncode == 0, run.stderr
    assert "longest first: toy-mono, toy)" in run.stdout


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_targets_at_once_end_with_the_main_process(tmp_path, sig):
    """The target processes (and their jobs) end when the command is killed."""
    pidfile = tmp_path / "pids"
    cmd = [sys.executable, "-m", "repro", "run", "toy", "toy-mono", "--targets-at-once", "2", "--set", "sleep=120",
           "--set", "jobs=1", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    _kill_and_check_the_job_processes_end(cmd, sig, pidfile)
