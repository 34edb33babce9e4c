"""A bad image among many does not lose the rest: `vmem classify` and VisualMemory.classify answer every readable
image (embedded in batches), name each unreadable one with its reason in its place, and exit 1."""

from __future__ import annotations

import json
import os

import pytest

import memory.visual_memory as visual_memory
from memory.queries import OnUnreadable, UnreadableQuery
from memory.visual_memory import VisualMemory
from vmem import classify as classify_cli


def _image(fmnist_small: str, cls: str, index: int = 0) -> tuple[str, str]:
    folder = os.path.join(fmnist_small, "train", cls)
    name = sorted(os.listdir(folder))[index]
    return os.path.join(folder, name), f"{cls}/{name}"


@pytest.fixture
def queries(fmnist_small, tmp_path):
    """Two readable images around a missing file, a text file and a directory; and their entry ids."""
    coat, coat_id = _image(fmnist_small, "coat", 3)
    bag, bag_id = _image(fmnist_small, "bag", 0)
    (tmp_path / "notes.txt").write_text("not an image\n")
    (tmp_path / "folder.png").mkdir()
    paths = [coat, str(tmp_path / "missing.png"), str(tmp_path / "notes.txt"), bag, str(tmp_path / "folder.png")]
    return paths, {0: coat_id, 3: bag_id}


@pytest.fixture
def embed_calls(monkeypatch):
    """The number of images of every encoder batch VisualMemory embeds."""
    calls = []
    real = visual_memory.embed_pixels

    def spy(encoder, pixels):
        calls.append(len(pixels))
        return real(encoder, pixels)

    monkeypatch.setattr(visual_memory, "embed_pixels", spy)
    return calls


def test_library_reports_each_unreadable_image_in_its_place(tiny_memory, queries, embed_calls):
    paths, ids = queries
    memory = VisualMemory.open(tiny_memory)
    out = memory.classify(paths, k=5, on_unreadable=OnUnreadable.REPORT)
    assert [type(p).__name__ for p in out] == ["Prediction", "UnreadableQuery", "UnreadableQuery", "Prediction",
                                               "UnreadableQuery"]
    assert embed_calls == [2]  # The readable images in one batch, not one by one.
    for i, entry_id in ids.items():
        assert out[i].neighbors[0].id == entry_id and abs(out[i].neighbors[0].distance) < 1e-4
    missing, text, folder = out[1], out[2], out[4]
    assert missing == UnreadableQuery(index=1, query=paths[1], reason=f"query 1 ({paths[1]!r}): no such image file "
                                                                      f"{paths[1]!r}")
    assert text.index == 2 and "cannot read query 2" in text.reason and "not_an_image" in text.reason
    assert folder.index == 4 and "is a directory, not an image file" in folder.reason
    # The answers equal those of the readable images alone.
    alone = memory.classify([paths[0], paths[3]], k=5)
    assert [[n.id for n in p.neighbors] for p in alone] == [[n.id for n in out[i].neighbors] for i in (0, 3)]
    # Per-query filters follow their queries.
    from memory.search.filters import QueryFilter
    only_bags = QueryFilter.parse("label=bag")
    filtered = memory.classify(paths, k=3, on_unreadable="report", filters=[None, None, None, only_bags, None])
    assert {n.label_name for n in filtered[3].neighbors} == {"bag"}
    assert [n.id for n in filtered[0].neighbors] == [n.id for n in out[0].neighbors][:3]
    # Every image unreadable: no encoder call at all; RAISE (the default) fails on the first one.
    assert all(isinstance(p, UnreadableQuery) for p in memory.classify(paths[1:3], on_unreadable="report"))
    assert embed_calls == [2, 2, 2]  # The first call, the one alone and the filtered one.
    with pytest.raises(FileNotFoundError, match=r"query 1 \('.*missing.png'\): no such image file"):
        memory.classify(paths)
    with pytest.raises(ValueError, match="unknown on_unreadable 'skip'; allowed: raise, report"):
        memory.classify(paths, on_unreadable="skip")


def test_cli_answers_every_readable_image_names_each_unreadable_one_and_exits_1(tiny_memory, queries, capsys,
                                                                                embed_calls):
    paths, ids = queries
    code = classify_cli.main(["--memory", tiny_memory, *paths, "--json", "--k", "5"])
    captured = capsys.readouterr()
    assert code == 1
    doc = json.loads(captured.out)
    assert doc["unreadable"] == 3 and [r["image"] for r in doc["results"]] == paths
    for i, entry_id in ids.items():
        assert doc["results"][i]["label_name"] and "error" not in doc["results"][i]
    assert doc["results"][1] == {"image": paths[1], "error": f"query 1 ({paths[1]!r}): no such image file "
                                                              f"{paths[1]!r}"}
    assert "not_an_image" in doc["results"][2]["error"] and "is a directory" in doc["results"][4]["error"]
    err = captured.err
    assert err.startswith("vmem classify: error: 3 of 5 images could not be read (the other 2 are answered):")
    assert all(r["error"] in err for r in doc["results"] if "error" in r) and "Traceback" not in err
    assert embed_calls == [2]

    # Text: the answers and, in place, each unreadable image with its reason.
    code = classify_cli.main(["--memory", tiny_memory, *paths, "--k", "5"])
    out = capsys.readouterr().out
    assert code == 1
    blocks = out.strip().split("\n\n")
    assert [b.splitlines()[0] for b in blocks] == paths
    for i in ids:  # The same answers as in JSON.
        assert blocks[i].splitlines()[1].startswith(f"  predicted  {doc['results'][i]['label_name']} ")
    assert blocks[1].splitlines()[1] == f"  unreadable query 1 ({paths[1]!r}): no such image file {paths[1]!r}"
    assert blocks[2].splitlines()[1].startswith("  unreadable cannot read query 2")

    # Every image readable: exit 0; none readable: exit 1 with only the reasons, on stderr.
    assert classify_cli.main(["--memory", tiny_memory, paths[0], paths[3]]) == 0
    capsys.readouterr()
    assert classify_cli.main(["--memory", tiny_memory, paths[2], paths[4]]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "cannot read query 0" in captured.err and "query 1" in captured.err
    assert "is a directory" in captured.err


def test_html_page_shows_each_unreadable_image_in_its_place(tiny_memory, queries, tmp_path, capsys):
    """The --html page has one section per image, in order: answers, and each unreadable one with its reason."""
    import html
    import re
    paths, _ = queries
    page = tmp_path / "page.html"
    assert classify_cli.main(["--memory", tiny_memory, *paths, "--k", "5", "--html", str(page)]) == 1
    capsys.readouterr()
    text = page.read_text()
    headings = [html.unescape(h) for h in re.findall(r"<h2>(.*?)</h2>", text)]
    assert headings == paths
    sections = text.split("<section>")[1:]
    for i in (1, 2, 4):
        assert 'class="unreadable">unreadable: ' in sections[i] and "predicted" not in sections[i]
    assert html.escape(f"no such image file {paths[1]!r}") in sections[1]
    for i in (0, 3):
        assert "predicted <b>" in sections[i] and "unreadable" not in sections[i]


def test_help_documents_the_exit_status(capsys):
    assert classify_cli.main(["--help"]) == 0
    assert "1 a runtime failure, or some images could not be read" in " ".join(capsys.readouterr().out.split())
