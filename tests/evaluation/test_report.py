"""Tests for evaluation.report."""

import json

import pytest

from evaluation import report as report_lib

TABLE = {
    "plurality": {k: 0.5 + 0.001 * k for k in range(1, 13)},
    "rank": {k: 0.75 for k in range(1, 13)},
}


def _report():
    return report_lib.build_report(TABLE, queries=40, failed=2,
                                   extra={"memory": "toy"})


def test_build_report_schema():
    report = _report()
    assert report["schema_version"] == 1
    assert report["queries"] == 40
    assert report["failed"] == 2
    assert report["k_max"] == 12
    assert report["rules"] == ["plurality", "rank"]
    assert list(report["accuracy"]["rank"]) == [str(k) for k in range(1, 13)]
    assert report["accuracy"]["plurality"]["12"] == pytest.approx(0.512)
    assert report["best"] == {"plurality": {"k": 12, "accuracy": 0.512},
                              "rank": {"k": 1, "accuracy": 0.75}}
    assert report["extra"] == {"memory": "toy"}
    assert report_lib.accuracy_from_report(report) == TABLE


def test_build_report_errors():
    with pytest.raises(ValueError, match="empty"):
        report_lib.build_report({}, queries=1, failed=0)
    with pytest.raises(ValueError, match="queries and failed must be >= 0"):
        report_lib.build_report(TABLE, queries=-1, failed=0)
    with pytest.raises(ValueError, match="extra is not JSON-serialisable"):
        report_lib.build_report(TABLE, queries=1, failed=0, extra={"x": object()})


def test_table_ks():
    assert report_lib.table_ks(1) == [1]
    assert report_lib.table_ks(12) == [1, 3, 5, 10, 12]
    assert report_lib.table_ks(100) == [1, 3, 5, 10, 20, 50, 100]


def test_markdown_table():
    md = report_lib.markdown_table(_report(), baselines={"linear probe": 0.863})
    lines = md.splitlines()
    assert lines[0] == "Top-1 accuracy (%) over 40 queries (2 failed)."
    assert "| k | plurality | rank |" in lines
    assert "| 1 | 50.10 | 75.00 |" in lines
    assert "| 12 | 51.20 | 75.00 |" in lines
    assert "| best | 51.20 (k=12) | 75.00 (k=1) |" in lines
    assert "- linear probe: 86.30" in lines
    assert not any(line.startswith("| 20 |") for line in lines)


def test_write_report_files(tmp_path):
    out = tmp_path / "nested" / "report"
    paths = report_lib.write_report(out, _report(),
                                    baselines={"k=1 paper": 0.811})
    assert set(paths) == {"json", "markdown", "plot"}
    data = json.loads((out / "report.json").read_text())
    assert data["baselines"] == {"k=1 paper": 0.811}
    assert data["accuracy"]["rank"]["3"] == 0.75
    assert data["best"]["rank"] == {"k": 1, "accuracy": 0.75}
    md = (out / "report.md").read_text()
    assert md.startswith("# Visual memory voting report\n")
    assert "| best | 51.20 (k=12) | 75.00 (k=1) |" in md
    assert "- k=1 paper: 81.10" in md
    png = (out / "accuracy_vs_k.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 5000


def test_bad_baseline(tmp_path):
    with pytest.raises(ValueError, match=r"baseline 'probe'=86.3 must be a "
                       r"fraction in \[0, 1\]"):
        report_lib.write_report(tmp_path, _report(), baselines={"probe": 86.3})
