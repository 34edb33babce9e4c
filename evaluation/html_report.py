"""report.html: one self-contained page per experiment (and per ``make paper``) that a browser opens offline.

Every figure is embedded as a base64 PNG ``data:`` URI, the style sheet and the one script are inline, and
nothing refers to another file or host, so the page can be mailed, archived or opened on a machine without
network. It shows the experiment's Markdown (tables, lists, emphasis), its figures, the command that reproduces
it, the command line that ran, the package versions, the git commit and the machine.

Every string that reaches the page (labels, class names, commands, paths, JSON) goes through
:func:`html.escape` first; :func:`markdown_to_html` then adds tags only for the small Markdown subset the
reports use (``#`` headings, pipe tables with ``---:`` alignment, ``-`` lists, paragraphs, `` `code` ``,
``**bold**``), so a class named ``<script>`` shows as text. A full Markdown library passes raw HTML through,
which is why this is not one.

When the page has loaded, its script sets ``data-report="ok"`` on ``<body>`` if every ``<img>`` decoded
(``naturalWidth > 0``), else ``"broken"``, with ``data-images-loaded`` / ``data-images-broken`` counts:
what the headless-browser test reads from Chromium's ``--dump-dom``.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import importlib.metadata
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["Provenance", "Section", "REPORT_HTML", "markdown_to_html", "png_paths", "provenance", "render_html",
           "write_html"]

REPORT_HTML = "report.html"
# Distributions whose versions decide the numbers (search, voting, embedding, plots).
VERSIONED = ("visual-memory", "apache-beam", "scann", "numpy", "tensorflow-cpu", "pyarrow", "pillow", "matplotlib")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclasses.dataclass(frozen=True)
class Section:
    """One part of the page.

    Attributes:
      title: Heading of the section.
      markdown: Body in the Markdown subset :func:`markdown_to_html` reads (its headings sit below ``title``).
      figures: PNG files embedded after the body, each captioned with its file name.
      facts: ``{name: value}`` shown as a two-column table (a setup, timings).
      data: Anything JSON-serialisable, shown folded as pretty-printed JSON (the results, to copy from).
    """
    title: str
    markdown: str = ""
    figures: tuple[str, ...] = ()
    facts: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    data: Any = None


@dataclasses.dataclass(frozen=True)
class Provenance:
    """Where the numbers come from.

    Attributes:
      command: The command that reproduces the report (``vmem experiment ...``).
      invocation: The command line of the process that wrote it, as run.
      versions: ``{distribution or "python": version}``.
      git: The source's commit (``+ uncommitted changes`` when its tracked files differ), or why none is known.
      machine: Operating system, architecture, CPU count and memory.
      created: UTC time the page was written (ISO 8601, seconds).
    """
    command: str
    invocation: str
    versions: Mapping[str, str]
    git: str
    machine: str
    created: str


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git_commit(source_dir: str) -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", source_dir, *args], check=True, capture_output=True, text=True,
                              timeout=20).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        # An installed wheel or a machine without git: the versions above still identify the code.
        return "unknown (the source is not a git checkout, or git is not installed)"
    return commit + (" + uncommitted changes" if dirty else "")


def _machine() -> str:
    parts = [f"{platform.system()} {platform.release()} {platform.machine()}", f"{os.cpu_count()} CPUs"]
    try:
        gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
        parts.append(f"{gib:.1f} GiB memory")
    except (AttributeError, ValueError, OSError):
        pass  # Not POSIX: the memory size is unknown, the rest still says what ran.
    return ", ".join(parts)


def provenance(command: str) -> Provenance:
    """The provenance of a report written now by this process.

    Args:
      command: The command that reproduces the report.
    """
    source = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    versions = {"python": platform.python_version(), **{d: _version(d) for d in VERSIONED}}
    return Provenance(command=command, invocation=shlex.join(sys.argv), versions=versions,
                      git=_git_commit(source), machine=_machine(),
                      created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


# ---------------------------------------------------------------------------------------------- Markdown subset

_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
_ALIGN = re.compile(r"^:?-{3,}:?$")


def _inline(text: str) -> str:
    """Escaped text with `code` and **bold** marked up (code spans are not searched for bold)."""
    out, last = [], 0
    for m in _CODE.finditer(text):
        out.append(_BOLD.sub(r"<strong>\1</strong>", html.escape(text[last:m.start()])))
        out.append(f"<code>{html.escape(m.group(1))}</code>")
        last = m.end()
    out.append(_BOLD.sub(r"<strong>\1</strong>", html.escape(text[last:])))
    return "".join(out)


def _cells(line: str) -> list[str]:
    line = line.strip()
    return [c.strip() for c in line[1:-1 if line.endswith("|") else None].split("|")]


def _table(lines: list[str]) -> str:
    head = _cells(lines[0])
    body = lines[1:]
    aligns = [""] * len(head)
    if body and all(_ALIGN.match(c) for c in _cells(body[0])):
        aligns = [' class="num"' if c.endswith(":") else "" for c in _cells(body[0])]
        body = body[1:]
    aligns += [""] * max(0, max((len(_cells(r)) for r in body), default=0) - len(aligns))
    rows = ["<tr>" + "".join(f"<th{aligns[i]}>{_inline(c)}</th>" for i, c in enumerate(head)) + "</tr>"]
    rows += ["<tr>" + "".join(f"<td{aligns[i]}>{_inline(c)}</td>" for i, c in enumerate(_cells(r))) + "</tr>"
             for r in body]
    return "<table>\n<thead>" + rows[0] + "</thead>\n<tbody>\n" + "\n".join(rows[1:]) + "\n</tbody>\n</table>"


def markdown_to_html(text: str, *, heading_offset: int = 1) -> str:
    """The Markdown subset of the reports as HTML; every character of ``text`` is escaped first.

    Args:
      text: Markdown: ``#`` headings, pipe tables, ``-`` lists, paragraphs, `` `code` `` and ``**bold**``.
        Anything else shows as the escaped text it is.
      heading_offset: Added to each heading's level (``#`` becomes ``<h2>`` with the default 1), so a report
        nests under the page's or a section's title; capped at ``<h6>``.
    """
    blocks: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if not line.strip():
            i += 1
            continue
        heading = _HEADING.match(line)
        if heading:
            level = min(6, len(heading.group(1)) + heading_offset)
            blocks.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
            i += 1
            continue
        kind = "table" if line.lstrip().startswith("|") else "list" if line.startswith("- ") else "p"
        group = []
        while i < len(lines) and lines[i].strip():
            nxt = lines[i].rstrip()
            nxt_kind = ("table" if nxt.lstrip().startswith("|") else "list" if nxt.startswith("- ")
                        else "heading" if _HEADING.match(nxt) else "p")
            if nxt_kind != kind and not (kind == "list" and nxt_kind == "p" and nxt.startswith("  ")):
                break
            group.append(nxt)
            i += 1
        if kind == "table":
            blocks.append(_table(group))
        elif kind == "list":
            items: list[str] = []
            for g in group:
                if g.startswith("- "):
                    items.append(g[2:])
                else:  # An indented continuation of the item above.
                    items[-1] += " " + g.strip()
            blocks.append("<ul>\n" + "\n".join(f"<li>{_inline(it)}</li>" for it in items) + "\n</ul>")
        else:
            blocks.append("<p>" + _inline(" ".join(g.strip() for g in group)) + "</p>")
    return "\n".join(blocks)


# ---------------------------------------------------------------------------------------------- the page

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 62rem; margin: 2rem auto;
       padding: 0 1rem; color: #1b1b1b; line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.3rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.1rem; } h4, h5, h6 { font-size: 1rem; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } .num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 0.85rem; }
pre { background: #f6f6f6; padding: 0.6rem; overflow-x: auto; white-space: pre-wrap; word-break: break-all; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85rem; color: #555; }
table.facts th { width: 12rem; }
"""

# Sets data-report on <body> once every image has had its chance to decode; the browser test reads it.
_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (img) { return !(img.complete && img.naturalWidth > 0); }).length;
  document.body.setAttribute("data-images-loaded", String(images.length - broken));
  document.body.setAttribute("data-images-broken", String(broken));
  document.body.setAttribute("data-report", broken ? "broken" : "ok");
});
"""


def _fact(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _facts_table(facts: Mapping[str, Any]) -> str:
    rows = "\n".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fact(v))}</td></tr>"
                     for k, v in facts.items())
    return f'<table class="facts">\n{rows}\n</table>'


def _figure(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(_PNG_MAGIC):
        raise ValueError(f"{path} is not a PNG file (report.html embeds figures as PNG); write it with "
                         "Figure.savefig(path) and a .png name")
    name = html.escape(os.path.basename(path))
    return (f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'
            f"<figcaption>{name}</figcaption></figure>")


def _section(section: Section, level: int) -> str:
    parts = [f"<section>\n<h{level}>{html.escape(section.title)}</h{level}>"]
    if section.markdown:
        parts.append(markdown_to_html(section.markdown, heading_offset=level))
    parts += [_figure(p) for p in section.figures]
    if section.facts:
        parts.append(_facts_table(section.facts))
    if section.data is not None:
        text = json.dumps(section.data, indent=2, sort_keys=True, allow_nan=False)
        parts.append(f"<details><summary>JSON</summary>\n<pre>{html.escape(text)}</pre>\n</details>")
    return "\n".join(parts) + "\n</section>"


def render_html(title: str, sections: Sequence[Section], *, source: Provenance) -> str:
    """The whole page as a string (see the module docstring).

    Args:
      title: Page title and top heading.
      sections: Shown in order, each under a second-level heading.
      source: Command, versions, commit and machine, shown first and last.

    Raises:
      ValueError: naming a figure that is not a PNG file.
    """
    versions = ", ".join(f"{k} {v}" for k, v in source.versions.items())
    about = _facts_table({"versions": versions, "git commit": source.git, "machine": source.machine,
                          "invoked as": source.invocation, "written (UTC)": source.created})
    body = "\n".join(_section(s, 2) for s in sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n<script>{_SCRIPT}</script>\n"
            f"</head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
            f'<p>Reproduce with:</p>\n<pre class="command">{html.escape(source.command)}</pre>\n'
            f"{body}\n<section>\n<h2>Provenance</h2>\n{about}\n</section>\n</body>\n</html>\n")


def write_html(path: str, title: str, sections: Sequence[Section], *, command: str) -> str:
    """Writes :func:`render_html`'s page with this process's :func:`provenance` to ``path``; returns ``path``.

    Raises:
      ValueError: naming a figure that is not a PNG file.
    """
    page = render_html(title, sections, source=provenance(command))
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


def png_paths(directory: str) -> tuple[str, ...]:
    """The PNG files directly in ``directory``, by name: the figures an experiment wrote next to its report."""
    return tuple(os.path.join(directory, n) for n in sorted(os.listdir(directory)) if n.endswith(".png"))
