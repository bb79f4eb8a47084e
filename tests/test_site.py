"""``python -m repro report`` (repro/site.py): the site of the committed results and compare mode.

Every link and image of the site resolves to a file of the site (or an https URL), every result set and
every claim of every ``summary.json`` appears, and compare mode marks what differs and nothing else.
"""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from repro.__main__ import main
from repro.site import SiteError, build_site, differs, fmt

RESULTS = Path(__file__).resolve().parents[1] / "repro" / "results"


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str]] = []
        self.ids: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a" and a.get("href"):
            self.refs.append(("a", a["href"]))
        if tag == "img":
            self.refs.append(("img", a.get("src") or ""))

    def handle_data(self, data):
        self.text.append(data)


def _parse(path: Path) -> _Refs:
    p = _Refs()
    p.feed(path.read_text())
    return p


def _check_links(site: Path) -> int:
    n = 0
    pages = {p.name: _parse(p) for p in site.glob("*.html")}
    for name, page in pages.items():
        for tag, ref in page.refs:
            n += 1
            u = urlparse(ref)
            if u.scheme in ("http", "https"):
                assert tag == "a" and u.netloc == "arxiv.org", f"{name}: a network reference {ref!r}"
                continue
            assert not u.scheme and ref, f"{name}: {tag} {ref!r} is not a relative reference"
            target = unquote(u.path)
            if target:
                assert (site / target).is_file(), f"{name}: {tag} {ref!r} does not resolve"
            if u.fragment:
                assert u.fragment in pages[target or name].ids, f"{name}: anchor {ref!r} does not resolve"
    return n


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site") / "site"
    index = build_site([RESULTS], out)
    assert index == out / "index.html"
    return out


def test_every_result_set_and_claim_appears(site):
    index = (site / "index.html").read_text()
    sets = sorted(p.parent.name for p in RESULTS.glob("*/summary.json"))
    assert len(sets) >= 10
    n_claims = 0
    for name in sets:
        summary = json.loads((RESULTS / name / "summary.json").read_text())
        page = (site / f"{name}.html").read_text()
        assert f'href="{name}.html"' in index
        for c in summary["claims"]:
            n_claims += 1
            for html in (index, page):
                assert f"<code>{c['id']}</code>" in html
            row = re.search(rf"<tr class=\"([a-z -]+)\">\s*<td><code>{re.escape(c['id'])}</code>", page)
            assert row and ("not-held" in row.group(1)) == (not c["held"]), (name, c["id"])
        for png in (RESULTS / name).glob("*.png"):
            assert f'src="{name}/{png.name}"' in page and (site / name / png.name).is_file()
        for csv_file in (RESULTS / name).glob("*.csv"):
            assert f'id="t-{csv_file.stem}"' in page
    assert f"{n_claims} claims" in index


def test_every_link_and_image_resolves(site):
    assert _check_links(site) > 200


def test_readme_links_are_rewritten_or_dropped(site):
    page = (site / "permuted-simplex.html").read_text()
    assert "Property 2 holds" in page  # the set's own README, rendered
    assert "<table>" in page.split('id="readme"')[1]  # Markdown tables rendered by markdown-it
    c2m3 = (site / "c2m3-merging.html").read_text()
    assert "C2M3" in c2m3.split('id="readme"')[1]  # no README.md in the set: the README section of its target


def test_numbers_are_formatted_and_compared():
    assert fmt("0.80981108937511") == "0.8098" and fmt("12") == "12" and fmt("star") == "star"
    assert fmt("nan") == "nan" and fmt("1e-07") == "1e-07" and fmt("0.25612 ± 0.00049") == "0.2561 ± 0.00049"
    assert not differs("0.100 ± 0.002", "0.101 ± 0.009", 0.05) and differs("0.10 ± 0", "0.2 ± 0", 0.05)
    assert not differs("0.100", "0.104", 0.05) and differs("0.100", "0.106", 0.05)
    assert differs("star", "mergemany", 0.5) and not differs("nan", "nan", 0.0)


def test_compare_mode_marks_what_differs(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    for d in (a, b):
        shutil.copytree(RESULTS / "cycle-consistency", d / "cycle-consistency")
    shutil.copytree(RESULTS / "benton2021-simplexes", a / "benton2021-simplexes")  # only in A
    s = json.loads((b / "cycle-consistency" / "summary.json").read_text())
    s["claims"][0]["held"] = not s["claims"][0]["held"]
    (b / "cycle-consistency" / "summary.json").write_text(json.dumps(s))
    csv_b = b / "cycle-consistency" / "cycle_consistency.csv"
    lines = csv_b.read_text().split("\n")
    header = lines[0].split(",")
    col = header.index("merged_test_loss")
    cells = lines[1].split(",")
    cells[col] = str(float(cells[col]) * 1.5)
    lines[1] = ",".join(cells)
    csv_b.write_text("\n".join(lines))
    out = tmp_path / "cmp"
    build_site([a, b], out, rtol=0.05)
    index = (out / "index.html").read_text()
    assert index.count('class="differs') >= 1 and "1 set(s) with a claim whose verdict differs" in index
    page = (out / "cycle-consistency.html").read_text()
    assert page.count('class="differs ') == 1  # the flipped claim, and only it
    assert "<b>1 number(s) differ</b>" in page and page.count("diff\">") == 1
    assert "not in this run" in index  # benton2021 is missing from B
    assert _check_links(out) > 0
    # a looser tolerance hides the change; the verdict still differs
    build_site([a, b], out, rtol=0.6)
    page = (out / "cycle-consistency.html").read_text()
    assert "no number differs" in page and page.count('class="differs ') == 1


def test_bad_input_is_refused_and_nothing_is_lost(tmp_path, capsys):
    with pytest.raises(SiteError, match="does not exist"):
        build_site([tmp_path / "missing"], tmp_path / "out")
    with pytest.raises(SiteError, match="no result set"):
        build_site([tmp_path], tmp_path / "out")
    bad = tmp_path / "bad" / "x"
    bad.mkdir(parents=True)
    (bad / "summary.json").write_text("{not json")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous site")
    with pytest.raises(SiteError, match="cannot read the summary"):
        build_site([bad.parent], out)
    assert (out / "keep.txt").read_text() == "previous site"  # a failed build leaves the previous site
    with pytest.raises(SiteError, match="one results folder"):
        build_site([RESULTS, RESULTS, RESULTS], out)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SiteError, match="is a file"):
        build_site([RESULTS], tmp_path / "afile")
    with pytest.raises(SiteError, match="is or holds a results folder"):
        build_site([bad], bad.parent)  # would delete the results
    with pytest.raises(SiteError, match="rtol"):
        build_site([RESULTS], out, rtol=-1)
    assert main(["report", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_builds_the_committed_site(tmp_path, capsys):
    assert main(["report", "--out", str(tmp_path / "site")]) == 0
    assert "wrote the site" in capsys.readouterr().out
    assert (tmp_path / "site" / "index.html").is_file()
