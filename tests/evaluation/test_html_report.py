"""report.html: escaping, the Markdown subset, no external asset, and pages opened in headless Chromium
(tests/browser.py)."""

from __future__ import annotations

import ast
import base64
import json
import os
import re

import numpy as np
import pytest

from evaluation import html_report
from evaluation.experiments import common, k_sweep, new_classes, paper
from evaluation.experiments.common import plot_lines, write_report
from evaluation.experiments.registry import EXPERIMENTS
from evaluation.html_report import Section, markdown_to_html, render_html, write_html
from tests.browser import assert_loaded, dump_dom
from tests.evaluation.test_experiments import synthetic_workspace


def _plot(path: str) -> str:
    return plot_lines(path, {"<b>rank</b>": ([1, 2, 3], [90.0, 91.0, 89.5])}, xlabel="k", ylabel="accuracy (%)",
                      title="a & b")


# ---------------------------------------------------------------------------------------------- no browser


def test_markdown_subset_escapes_everything_and_marks_up_tables_lists_code_and_bold():
    md = ("# Title <i>\n\nA `vmem <x> & y` **bold <b>** line\ncontinued.\n\n"
          "| class | acc |\n|---|---:|\n| <script>alert(1)</script> | 90.00 |\n| a&b | 10 |\n\n"
          "- **k-sweep**: 1 < 2\n- two\n")
    out = markdown_to_html(md)
    assert "<script>" not in out and "<i>" not in out and "<b>" not in out
    assert "<h2>Title &lt;i&gt;</h2>" in out
    assert "<p>A <code>vmem &lt;x&gt; &amp; y</code> <strong>bold &lt;b&gt;</strong> line continued.</p>" in out
    assert "<th>class</th><th class=\"num\">acc</th>" in out
    assert "<td>&lt;script&gt;alert(1)&lt;/script&gt;</td><td class=\"num\">90.00</td>" in out
    assert "<td>a&amp;b</td>" in out
    assert "<ul>\n<li><strong>k-sweep</strong>: 1 &lt; 2</li>\n<li>two</li>\n</ul>" in out
    assert markdown_to_html("### deep", heading_offset=5) == "<h6>deep</h6>"


def test_page_is_self_contained_and_escapes_titles_facts_commands_and_json(tmp_path):
    fig = _plot(str(tmp_path / "f.png"))
    bad = "<img src=x onerror=alert(1)>"
    page = render_html(f"Experiment {bad}", [Section(bad, markdown=f"| {bad} |\n|---|\n| 1 |", figures=(fig,),
                                                     facts={bad: bad}, data={bad: [bad]})],
                       source=html_report.provenance(f"vmem experiment k-sweep --hold-out '{bad}'"))
    assert bad not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    # Offline: every src is inline data, nothing is linked or imported.
    assert re.findall(r'src="([^"]{0,22})', page) == ["data:image/png;base64,"]
    for outside in ("<link", "href=", "@import", "url(", "<script src", "http://", "https://"):
        assert outside not in page, outside
    embedded = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    with open(fig, "rb") as f:
        assert base64.b64decode(embedded) == f.read()


def test_provenance_names_the_commit_versions_and_machine():
    p = html_report.provenance("vmem experiment k-sweep")
    assert re.match(r"[0-9a-f]{40}( \+ uncommitted changes)?$", p.git), p.git
    assert p.versions["numpy"] == np.__version__ and p.versions["python"].startswith("3.")
    assert "CPUs" in p.machine and p.command == "vmem experiment k-sweep"


def test_a_figure_that_is_not_a_png_is_refused_by_name(tmp_path):
    fake = tmp_path / "plot.png"
    fake.write_text("<svg/>")
    with pytest.raises(ValueError, match=r"plot\.png is not a PNG file"):
        write_html(str(tmp_path / "r.html"), "t", [Section("s", figures=(str(fake),))], command="c")
    assert not (tmp_path / "r.html").exists()


def test_without_chromium_the_browser_check_fails_and_says_make_install_installs_it(tmp_path):
    with pytest.raises(pytest.fail.Exception, match=r"make install"):
        dump_dom(str(tmp_path / "r.html"), browser=None)


# ---------------------------------------------------------------------------------------------- in Chromium


def test_an_experiment_report_loads_in_chromium_and_a_broken_figure_fails_the_check(tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    _plot(str(out / "accuracy_vs_k.png"))
    paths = write_report(str(out), name="k-sweep", setup={"dataset": "<x>", "k_max": 3},
                         results={"best": {"rank": 0.91}},
                         markdown="| k | rank |\n|---:|---:|\n| 1 | 90.00 |\n| <trouser> | 91.00 |",
                         seconds={"build": 1.25}, command="vmem experiment k-sweep --dataset fashion-mnist")
    assert paths["html"] == str(out / "report.html")
    assert_loaded(dump_dom(paths["html"]), images=1, cells=("90.00", "&lt;trouser&gt;", "1.25", "k_max"))

    page = (out / "report.html").read_text()
    start = page.index("base64,") + len("base64,")
    (out / "broken.html").write_text(page[:start] + "iVBORw0KGgoAAAAbroken" + page[page.index('"', start):])
    with pytest.raises(AssertionError, match="did not load cleanly.*'data-images-broken': '1'"):
        assert_loaded(dump_dom(str(out / "broken.html")), images=1)


@pytest.fixture(scope="module")
def paper_output(tmp_path_factory):
    """Two real experiments on a synthetic workspace, laid out as `make paper` lays them out."""
    ws = synthetic_workspace(str(tmp_path_factory.mktemp("paper-work")))
    output = str(tmp_path_factory.mktemp("paper"))
    k_sweep.run(ws, os.path.join(output, "fashion-mnist", "k-sweep"))
    new_classes.run(ws, os.path.join(output, "fashion-mnist", "new-classes"))
    return output


def test_real_experiment_and_paper_reports_load_in_chromium(paper_output):
    ks = os.path.join(paper_output, "fashion-mnist", "k-sweep")
    with open(os.path.join(ks, "report.json")) as f:
        rank_at_1 = json.load(f)["results"]["accuracy"]["rank"]["1"]
    dom = dump_dom(os.path.join(ks, "report.html"))
    assert_loaded(dom, images=1, cells=(f"{100 * rank_at_1:.2f}", "best"))
    assert "vmem experiment k-sweep" in dom

    page = paper.write_paper_html(paper_output, "# Paper experiments: summary\n\n- **k-sweep**: <headline>",
                                  ["fashion-mnist"], ["k-sweep", "new-classes"],
                                  command="python -m evaluation.experiments.paper --output out/paper")
    assert page == os.path.join(paper_output, "report.html")
    dom = dump_dom(page)
    assert_loaded(dom, images=2, cells=(f"{100 * rank_at_1:.2f}",))
    assert "<h2>fashion-mnist: new-classes</h2>" in dom and "&lt;headline&gt;" in dom


def test_every_registered_experiment_writes_its_report_through_the_one_writer():
    """Each experiment calls common.write_report, which writes report.html: none writes its own page."""
    for name, module in EXPERIMENTS.items():
        with open(os.path.join(os.path.dirname(common.__file__), module + ".py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        imported = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert ("evaluation.experiments.common", "write_report") in imported and "write_report" in called, name
        assert "html" not in {a.name.split(".")[-1] for n in ast.walk(tree) if isinstance(n, ast.Import)
                              for a in n.names}, f"{name} builds HTML itself; use evaluation.html_report"
