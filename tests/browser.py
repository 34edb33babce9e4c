"""Opening a report.html in a real headless browser: Debian's ``chromium``, which ``make install`` installs.

The checks read what the page's own script leaves on ``<body>`` after the load event (``data-report``,
``data-images-loaded``; evaluation.html_report) from ``chromium --dump-dom``, and look for table cells in the
dumped DOM. Without Chromium they fail and say how to install it: a report nobody checked is not skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

import pytest

__all__ = ["CHROMIUM", "assert_loaded", "dump_dom"]

CHROMIUM = shutil.which("chromium")


def dump_dom(path: str, *, browser: str | None = CHROMIUM) -> str:
    """The DOM of ``path`` after Chromium has loaded it (scripts run)."""
    if browser is None:
        pytest.fail("chromium is not installed; the report.html tests open reports in it: run `make install` "
                    "(it installs Debian's chromium package) or `apt-get install chromium`", pytrace=False)
    # A fresh profile, and none of Chromium's own network traffic (sync, updates, QUIC): the machine may be
    # offline, and a reused profile or a refused connection must not decide the test.
    with tempfile.TemporaryDirectory(prefix="vmem-chromium-") as profile:
        proc = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
                               "--disable-background-networking", "--disable-component-update", "--disable-sync",
                               "--disable-quic", f"--user-data-dir={profile}",
                               "--dump-dom", "file://" + os.path.abspath(path)],
                              capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}"
    return proc.stdout


def assert_loaded(dom: str, *, images: int, cells: tuple[str, ...] = ()) -> None:
    """Every one of ``images`` images decoded, and each of ``cells`` is a table cell of the page."""
    body = re.search(r"<body[^>]*>", dom)
    assert body, f"no <body> in the DOM Chromium dumped: {dom[:500]!r}"
    attrs = dict(re.findall(r'(data-[a-z-]+)="([^"]*)"', body.group(0)))
    assert attrs.get("data-report") == "ok", f"the page did not load cleanly: {attrs}"
    assert attrs.get("data-images-loaded") == str(images), attrs
    for cell in cells:
        assert re.search(rf"<t[dh][^>]*>{re.escape(cell)}</t[dh]>", dom), f"no table cell {cell!r} in the DOM"
