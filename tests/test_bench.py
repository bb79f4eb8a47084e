"""``python -m bench`` (bench/__main__.py) on toy workloads: every benchmark still runs and its output lands in
the results file. Never a timed assertion: the numbers of a tiny run mean nothing."""

from __future__ import annotations

import bench.__main__ as runner


def test_every_benchmark_runs_at_tiny_size(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "RESULTS.md"
    assert runner.main(["--tiny", "--device", "cpu", "--out", str(out)]) == 0
    text = out.read_text()
    assert "--tiny (toy workloads" in text and "CPU cores" in text
    for name, (script, _, _) in runner.BENCHES.items():
        assert f"## {name}" in text and f"bench/{script}" in text
    assert "failed" not in text
    assert "× the loop" in text and "double backward" in text  # the scripts' ratio lines came through
    table = text.split("## Fraction of the device's peak", 1)[1].split("\n## ", 1)[0]
    for name in ("evaluate", "hvp", "curves", "train_many", "weight_matching"):  # every FLOP-bound benchmark
        assert f"| {name} | " in table and "matmul peak (" in table


def test_a_failing_benchmark_fails_the_run(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bench_bad.py"
    bad.write_text("import sys\nprint('half a result')\nsys.exit(3)\n")
    monkeypatch.setattr(runner, "BENCHES", {"bad": (str(bad), [], [])})
    out = tmp_path / "R.md"
    assert runner.main(["--tiny", "--device", "cpu", "--out", str(out)]) == 1
    assert "**failed (exit 3)**" in out.read_text() and "half a result" in out.read_text()
    assert "bad failed with exit code 3" in capsys.readouterr().err


def test_tiny_writes_no_file_unless_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "BENCHES", {"ok": (str(tmp_path / "ok.py"), [], [])})
    (tmp_path / "ok.py").write_text("print('ok')\n")
    monkeypatch.setattr(runner, "HERE", tmp_path)  # where the default RESULTS.md would go
    assert runner.main(["--tiny", "--device", "cpu"]) == 0
    assert not (tmp_path / "RESULTS.md").exists()


def test_only_rewrites_its_sections_and_keeps_the_others(tmp_path, monkeypatch):
    scripts = {}
    for name, text in (("one", "print('goal: g [one]: 1.00x: met')"), ("two", "print('goal: g [two]: 0.50x: MISSED')")):
        scripts[name] = tmp_path / f"{name}.py"
        scripts[name].write_text(text + "\n")
    monkeypatch.setattr(runner, "BENCHES", {n: (str(p), [], []) for n, p in scripts.items()})
    out = tmp_path / "R.md"
    assert runner.main(["--tiny", "--device", "cpu", "--out", str(out)]) == 0
    assert [r[0] for r in runner.previous_rows(out, "cpu", True)] == ["one", "two"]
    assert runner.previous_rows(out, "cuda", True) == [] and runner.previous_rows(out, "cpu", False) == []
    scripts["one"].write_text("print('goal: g [one]: 2.00x: met')\n")
    scripts["two"].write_text("print('goal: g [two]: 9.99x: met')\n")  # not re-run: must not appear
    assert runner.main(["--tiny", "--device", "cpu", "--out", str(out), "--only", "one"]) == 0
    text = out.read_text()
    assert "kept from the previous run of this file (not re-run by `--only`): two" in text
    assert "| g | one | 2.00x | met |" in text and "| g | two | 0.50x | **missed** |" in text
    assert "9.99x" not in text and text.index("## one") < text.index("## two")


def test_a_missed_goals_why_lines_follow_the_goals_table(tmp_path, monkeypatch):
    script = tmp_path / "w.py"
    script.write_text("print('goal: g [c1]: 0.50x: MISSED')\nprint('why: g [c1]: its solves take 0.4 s of 0.3 s')\n"
                      "print('goal: g [c2]: 3.00x: met')\n")
    monkeypatch.setattr(runner, "BENCHES", {"w": (str(script), [], [])})
    out = tmp_path / "R.md"
    assert runner.main(["--tiny", "--device", "cpu", "--out", str(out)]) == 0
    goals = out.read_text().split("## Goals", 1)[1].split("\n## ", 1)[0]
    assert "| g | c1 | 0.50x | **missed** |" in goals and "| g | c2 | 3.00x | met |" in goals
    assert goals.index("| g | c2 |") < goals.index("- g [c1]: its solves take 0.4 s of 0.3 s")
    assert runner.parse_whys("why: g [c1]: x: y") == [("g", "c1", "x: y")]


def test_the_suites_goal_comes_from_the_timing_file(tmp_path):
    rows = [("b", [], "goal: g [c]: 1.00x: met", 1.0, 0)]
    timing = tmp_path / "TIMING.md"
    assert runner.goals_table(rows, timing)[2:] == ["| g | c | 1.00x | met |"]  # no file: the benchmarks' goals
    timing.write_text("text\n```\ngoal: suite 2x [quick]: 1.76x: MISSED\nwhy: suite 2x [quick]: training\n```\n")
    table = runner.goals_table(rows, timing)
    assert table[2:4] == ["| g | c | 1.00x | met |", "| suite 2x | quick | 1.76x | **missed** |"]
    assert table[-1] == "- suite 2x [quick]: training"
    committed = runner.goals_table([])  # the committed TIMING.md carries the suite's goal
    assert any("whole suite >= 2x" in line for line in committed)


def test_counted_flops_are_the_products_forward_and_backward():
    import torch

    from bench.harness import counted_flops

    layer, x = torch.nn.Linear(32, 16, bias=False), torch.randn(8, 32, requires_grad=True)
    assert counted_flops(lambda: layer(x)) == 2 * 8 * 32 * 16
    # backward: the input's and the weight's gradient, one product each
    assert counted_flops(lambda: layer(x).sum().backward()) == 3 * 2 * 8 * 32 * 16


def test_peak_lines_reach_the_results_table(tmp_path, monkeypatch):
    import torch

    from bench.harness import matmul_peak, peak_line

    dev = torch.device("cpu")
    peak = matmul_peak(dev)
    assert peak > 0 and matmul_peak(dev) == peak  # measured once per process
    line = peak_line("MLP 8-4-10: default", dev, flops=0.25 * peak, seconds=1.0)
    assert line.startswith("peak: [MLP 8-4-10: default, cpu (") and "= 25.0% of the measured float32" in line
    assert runner.parse_peaks(line) == [("MLP 8-4-10: default", line.split(", ", 1)[1].split("]")[0],
                                         line.split("]: ", 1)[1])]
    script = tmp_path / "p.py"
    script.write_text(f"print({line!r})\n")
    monkeypatch.setattr(runner, "BENCHES", {"p": (str(script), [], [])})
    out = tmp_path / "R.md"
    assert runner.main(["--tiny", "--device", "cpu", "--out", str(out)]) == 0
    assert "| p | MLP 8-4-10: default | cpu (" in out.read_text() and "25.0% of the measured" in out.read_text()


def test_the_device_check_stops_plainly_without_cuda(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the device check would run its GPU steps")
    script = Path(runner.HERE) / "device_check.sh"
    env = {**os.environ, "OUT": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "no CUDA device: nothing to check" in r.stdout
    assert "available False" in (tmp_path / "gpu.txt").read_text()

