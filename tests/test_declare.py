"""Target declarations: the TOML file beside a target module (paper, arXiv id, claims) and its checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from repro.runner import declare as dmod
from repro.runner.declare import Claim, Report, declare, load_all, read_source, source_file

GOOD = '''
[my-target]
paper = "A Paper (Someone et al. 2024)"
arxiv = "2401.00001"
description = "what it runs"

[my-target.claims.first]
statement = """\\
    a statement long enough to be wrapped \\
    over two lines"""
paper = "Fig. 1"

[my-target.claims.second]
statement = "another statement"
paper = "Table 2: 0.91"
'''


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "mod.toml"
    p.write_text(text)
    return p


def test_read_source_reads_the_table_in_file_order(tmp_path):
    src = read_source(_write(tmp_path, GOOD), "my-target", ("second", "first"))
    assert (src.paper, src.arxiv, src.description) == ("A Paper (Someone et al. 2024)", "2401.00001", "what it runs")
    # the file's order, whatever the order of the ids the module passes; a wrapped string is one line
    assert src.claims == (Claim("first", "a statement long enough to be wrapped over two lines", "Fig. 1"),
                          Claim("second", "another statement", "Table 2: 0.91"))


def test_optional_fields_default_to_empty(tmp_path):
    p = _write(tmp_path, '[t]\npaper = "P"\n[t.claims.c]\nstatement = "s"\npaper = "p"\n')
    src = read_source(p, "t", ("c",))
    assert (src.arxiv, src.description) == ("", "")


@pytest.mark.parametrize("text, ids, match", [
    (GOOD.replace('paper = "A Paper', 'papr = "A Paper'), ("first", "second"), r"unknown field\(s\) 'papr'"),
    (GOOD.replace('paper = "A Paper (Someone et al. 2024)"\n', ""), ("first", "second"), r"missing field\(s\) 'paper'"),
    (GOOD.replace('statement = "another', 'statment = "another'), ("first", "second"),
     r"\[my-target.claims.second\]: unknown field\(s\) 'statment'"),
    (GOOD.replace('paper = "Table 2: 0.91"\n', ""), ("first", "second"),
     r"\[my-target.claims.second\]: missing field\(s\) 'paper'"),
    (GOOD, ("first", "second", "third"), "missing: third; not judged: none"),
    (GOOD, ("first",), "missing: none; not judged: second"),
    (GOOD, ("first", "first"), "claim ids repeat"),
    (GOOD.replace("[my-target]", "[my-targte]").replace("[my-target.", "[my-targte."), ("first", "second"),
     r"no table \[my-target\] \(its tables: my-targte\)"),
    (GOOD + "\n[my-target.claims.first]\nstatement = 'again'\npaper = 'x'\n", ("first", "second"), "not valid TOML"),
])
def test_read_source_refuses_a_bad_file_with_where_and_what(tmp_path, text, ids, match):
    p = _write(tmp_path, text)
    with pytest.raises(ValueError, match=match) as e:
        read_source(p, "my-target", ids)
    assert "claim ids repeat" in str(e.value) or str(p) in str(e.value)


@pytest.mark.parametrize("text, match", [
    (GOOD.replace('arxiv = "2401.00001"', "arxiv = 2401.00001"), "arxiv must be a string"),
    (GOOD.replace('paper = "Fig. 1"', "paper = 1"), r"\[my-target.claims.first\]: paper must be a string"),
    ('[my-target]\npaper = "P"\nclaims = ["first", "second"]\n', "claims must be a table of claims"),
    ('my-target = "P"\n', r"\[my-target\] must be a table"),
])
def test_read_source_refuses_wrong_types(tmp_path, text, match):
    # a wrong type is both a TypeError and a ValueError (reference.validate.ArgumentTypeError)
    for exc in (TypeError, ValueError):
        with pytest.raises(exc, match=match):
            read_source(_write(tmp_path, text), "my-target", ("first", "second"))


def test_a_missing_source_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"target 'my-target': .*nowhere\.toml is missing"):
        read_source(tmp_path / "nowhere.toml", "my-target", ("first",))


@dataclass(frozen=True)
class _Cfg:
    dataset: str = "digits"
    seed: int = 0


def _jobs(cfg, data):
    return []


def _report(cfg, results):
    return Report()


def test_declare_registers_the_code_parts_with_the_files_metadata(tmp_path, monkeypatch):
    monkeypatch.setattr(dmod, "TARGETS", {})
    module = tmp_path / "mod.py"
    module.write_text("")
    _write(tmp_path, GOOD)
    t = declare("my-target", str(module), config=_Cfg, sizes={s: _Cfg() for s in ("quick", "cpu", "paper")},
                jobs=_jobs, report=_report, datasets=["digits", "mnist"], claim_ids=("first", "second"))
    assert dmod.TARGETS == {"my-target": t}
    assert (t.paper, t.arxiv, t.description, t.module_file) == ("A Paper (Someone et al. 2024)", "2401.00001",
                                                                  "what it runs", str(module))
    assert t.datasets == ("digits", "mnist") and t.claim_ids == ("first", "second")
    assert t.jobs is _jobs and t.report is _report and t.config is _Cfg
    # the Target checks still apply to a declared target
    with pytest.raises(ValueError, match="sizes must be exactly"):
        declare("my-target", str(module), config=_Cfg, sizes={"cpu": _Cfg()}, jobs=_jobs, report=_report,
                datasets=("digits",), claim_ids=("first", "second"))


def test_every_source_file_describes_only_targets_its_module_declares():
    """Each repro/targets/<module>.toml holds a table for every target its module declares and no other."""
    targets = load_all()
    by_file: dict[Path, set[str]] = {}
    for t in targets.values():
        by_file.setdefault(source_file(t.module_file).resolve(), set()).add(t.name)
    suite = Path(dmod.__file__).resolve().parents[1] / "targets"
    files = sorted(suite.glob("*.toml"))
    assert {p.stem for p in files} == {m.rsplit(".", 1)[1] for m in dmod.MODULES}
    for p in files:
        with p.open("rb") as f:
            assert set(dmod.tomllib.load(f)) == by_file[p.resolve()], p
