"""``repro/timing.py``: outermost-call attribution, patching of ``from x import f`` aliases (and its undoing),
an end-to-end timing of one small target, and the committed-provenance table."""

from __future__ import annotations

import json
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest

import reference.fit
import reference.train
from repro import timing
from repro.runner import endpoints as runner_endpoints
from repro.runner.run import RESULTS

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

LIB, USER = "timing_dummy_lib", "timing_dummy_user"
# a library of two phases (``inner`` is called by ``outer``) and a class method, as reference/ modules are
LIB_SRC = """
import time

def inner(dt):
    time.sleep(dt)
    return "inner"

def outer(dt):
    time.sleep(dt)
    return inner(dt) + "+outer"

def fails():
    raise RuntimeError("boom")

class Thing:
    def work(self, dt):
        return inner(dt)
"""
PHASES = {"training": (f"{LIB}:outer", f"{LIB}:fails"), "evaluation": (f"{LIB}:inner", f"{LIB}:Thing.work")}


def _module(name: str, src: str, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    mod = types.ModuleType(name)
    exec(compile(src, f"<{name}>", "exec"), mod.__dict__)
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


@pytest.fixture
def dummies(monkeypatch: pytest.MonkeyPatch) -> tuple[types.ModuleType, types.ModuleType]:
    """The library and a module that imports its functions by name (``from timing_dummy_lib import …``)."""
    lib = _module(LIB, LIB_SRC, monkeypatch)
    user = _module(USER, f"from {LIB} import Thing, fails, inner, outer\ninner_alias = inner\n", monkeypatch)
    return lib, user


def _originals(lib: types.ModuleType, user: types.ModuleType) -> dict[str, object]:
    return {"lib.inner": lib.inner, "lib.outer": lib.outer, "lib.fails": lib.fails, "user.inner": user.inner,
            "user.inner_alias": user.inner_alias, "user.outer": user.outer, "user.fails": user.fails,
            "Thing.work": vars(lib.Thing)["work"]}


def test_only_the_outermost_call_is_charged(dummies):
    """outer (training) calls inner (evaluation): outer's whole time is training, none of it evaluation;
    inner called on its own, or under a method listed in its own phase, is evaluation once."""
    lib, user = dummies
    timer = timing.PhaseTimer()
    dt = 0.05
    with timing.instrumented(timer, PHASES):
        assert user.outer(dt) == "inner+outer"  # sleeps 2 dt, all training
    assert set(timer.seconds) == {"training"}
    assert 2 * dt <= timer.seconds["training"] < 2 * dt + 0.5
    with timing.instrumented(timer, PHASES):
        t0 = time.perf_counter()
        user.inner(dt)
        user.Thing().work(dt)  # a listed method calling a listed function: charged once
        elapsed = time.perf_counter() - t0
    assert 2 * dt <= timer.seconds["evaluation"] <= elapsed
    assert timer.seconds["training"] < 2 * dt + 0.5  # unchanged by the evaluation calls


def test_nested_depth_is_restored_when_a_call_raises(dummies):
    lib, user = dummies
    timer = timing.PhaseTimer()
    with timing.instrumented(timer, PHASES):
        with pytest.raises(RuntimeError, match="boom"):
            user.fails()
        user.inner(0.0)  # the failed call was outermost and is over: this one is outermost again
    assert set(timer.seconds) == {"training", "evaluation"}


def test_patching_reaches_aliases_and_is_undone_even_when_the_run_raises(dummies, monkeypatch):
    lib, user = dummies
    before = _originals(lib, user)
    timer = timing.PhaseTimer()
    with pytest.raises(RuntimeError, match="boom"):
        with timing.instrumented(timer, PHASES):
            for where, fn in _originals(lib, user).items():
                assert fn is not before[where] and fn.__wrapped__ is before[where], where
                assert fn.__name__ == before[where].__name__
            late = _module("timing_dummy_late", f"from {LIB} import inner\n", monkeypatch)
            assert late.inner is not before["lib.inner"]  # imported while patched: binds the wrapper
            user.inner_alias(0.0)
            user.fails()
    assert _originals(lib, user) == before
    assert late.inner is before["lib.inner"]  # undone in modules imported during the block, too
    assert timer.seconds["evaluation"] >= 0.0 and "training" in timer.seconds


def test_identity_not_name_decides_what_is_patched(dummies, monkeypatch):
    lib, _ = dummies
    other = _module("timing_dummy_other", "def inner(dt):\n    return 'mine'\n", monkeypatch)
    mine = other.inner
    with timing.instrumented(timing.PhaseTimer(), PHASES):
        assert other.inner is mine  # the same name, another function: left alone
        assert lib.inner is not mine and lib.inner.__wrapped__ is not mine


@pytest.mark.parametrize(("phases", "match"), [
    ({"training": (f"{LIB}:missing",)}, "defines no function"),
    ({"training": (f"{LIB}.outer",)}, "module:qualname"),
    ({"training": (f"{LIB}:outer",), "evaluation": (f"{LIB}:outer",)}, "listed under 'training' and 'evaluation'"),
])
def test_bad_phase_entries_are_refused_before_patching(dummies, phases, match):
    lib, user = dummies
    before = _originals(lib, user)
    with pytest.raises(ValueError, match=match):
        with timing.instrumented(timing.PhaseTimer(), phases):
            pass
    assert _originals(lib, user) == before


def test_every_listed_entry_resolves():
    """The suite's own mapping names functions that exist, each under one phase."""
    entries = timing.resolve_phases()
    assert len(entries) == sum(len(v) for v in timing.PHASES.values())
    assert set(timing.PHASE_NAMES) == {"training", "alignment", "evaluation", "report", "other"}


def _row(table: str, name: str) -> dict[str, str]:
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if cells[0] == name:
            return dict(zip(header, cells, strict=True))
    raise AssertionError(f"no row {name!r} in\n{table}")


def _seconds(cell: str) -> float:
    return float(cell.strip("*").split()[0])


def test_end_to_end_one_small_target(tmp_path, monkeypatch, capsys):
    """benton2021-simplexes at quick size, epochs cut down: phases plus other add up to the total, training
    is charged, the outputs go where --outputs says (the temporary folders are removed), and nothing stays
    patched."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the run's temporary output folder
    committed = RESULTS / "benton2021-simplexes" / "provenance.json"
    stamp = committed.stat().st_mtime_ns if committed.exists() else None
    fit, train_many = reference.fit.fit, reference.train.train_many
    out = tmp_path / "timing.md"
    rc = timing.main(["--targets", "benton2021-simplexes", "--size", "quick", "--cache-dir", str(tmp_path / "cache"),
                      "--threads", "1", "--set", "train.epochs=3", "--set", "vertex_train.epochs=1",
                      "--out", str(out), "--outputs", str(tmp_path / "outputs")])
    assert rc == 0
    table = out.read_text()
    kept = json.loads((tmp_path / "outputs" / "benton2021-simplexes" / "provenance.json").read_text())
    assert kept["size"] == "quick" and kept["target"] == "benton2021-simplexes"
    assert table == capsys.readouterr().out
    row, total = _row(table, "benton2021-simplexes"), _row(table, "**total**")
    phases = {p: _seconds(row[p]) for p in timing.PHASE_NAMES}
    assert abs(sum(phases.values()) - _seconds(row["total s"])) <= 0.05 * len(phases) + 1e-9
    assert phases["training"] > 0 and phases["evaluation"] > 0 and phases["report"] > 0
    assert _seconds(total["total s"]) == _seconds(row["total s"])
    assert "size: quick; --set train.epochs=3; --set vertex_train.epochs=1" in table
    assert "torch" in table and "commit:" in table
    assert list((tmp_path / "cache" / "endpoints").glob("*.pt"))  # the given cache was used
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("modeconn-timing-")] == []
    assert (committed.stat().st_mtime_ns if committed.exists() else None) == stamp
    assert reference.fit.fit is fit and reference.train.train_many is train_many
    assert runner_endpoints.train_many is train_many and not hasattr(reference.fit.fit, "__wrapped__")


def _provenance(root: Path, name: str, wall: float, **extra) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "provenance.json").write_text(json.dumps({"target": name, "size": "cpu", "wall_time_s": wall,
                                                             **extra}))


def test_from_provenance(tmp_path, capsys):
    res = tmp_path / "results"
    _provenance(res, "a-target", 12.5, jobs={"total": 3, "run": 3, "endpoints": 4, "endpoints_trained": 0},
                executor="LocalExecutor()", git={"commit": "0123456789abcdef"})
    _provenance(res, "b-target", 7.5)
    (res / "no-provenance").mkdir()
    out = tmp_path / "before.md"
    assert timing.main(["--from-provenance", str(res), "--out", str(out)]) == 0
    table = out.read_text()
    assert "no phase breakdown" in table
    a = _row(table, "a-target")
    assert a["wall s"] == "12.5" and a["endpoints trained"] == "0 of 4" and a["commit"] == "0123456789"
    assert _row(table, "**total**")["wall s"] == "**20.0**"
    capsys.readouterr()
    assert timing.main(["--from-provenance", str(res), "--targets", "b-target"]) == 0
    assert "a-target" not in capsys.readouterr().out
    assert timing.main(["--from-provenance", str(res), "--targets", "nope"]) == 2
    assert timing.main(["--from-provenance", str(res), "--size", "cpu"]) == 2
    assert timing.main(["--from-provenance", str(tmp_path / "empty")]) == 2
    (res / "b-target" / "provenance.json").write_text("{}")
    assert timing.main(["--from-provenance", str(res)]) == 2
    assert "b-target" in capsys.readouterr().err
