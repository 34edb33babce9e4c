"""``vmem classify`` and VisualMemory.classify on images, against a real memory built by the Beam job.

The memory holds 200 real Fashion-MNIST PNGs embedded by a tiny real SavedModel (tests/conftest.py), so an
image of the memory queried by path must come back as its own nearest neighbour at distance ~0.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from encoders.base import EncoderKind, EncoderSpec
from memory.decide.explain import Neighbor, Prediction
from memory.visual_memory import VisualMemory
from memory.decide.voting import VotingRule
from vmem import classify as classify_cli


def _image(fmnist_small: str, cls: str, index: int = 0) -> tuple[str, str]:
    """(path, entry id) of a training image, i.e. one that is in the memory."""
    folder = os.path.join(fmnist_small, "train", cls)
    name = sorted(os.listdir(folder))[index]
    return os.path.join(folder, name), f"{cls}/{name}"


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    code = classify_cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_explain_reports_the_image_as_its_own_nearest_neighbour(tiny_memory, fmnist_small, capsys):
    coat, coat_id = _image(fmnist_small, "coat", 3)
    bag, bag_id = _image(fmnist_small, "bag", 0)
    code, out, err = _main(capsys, "--memory", tiny_memory, coat, bag, "--explain", "--json", "--k", "7")
    assert code == 0, err
    results = json.loads(out)["results"]
    assert [r["image"] for r in results] == [coat, bag]
    for r, entry_id, cls in zip(results, (coat_id, bag_id), ("coat", "bag")):
        first = r["neighbors"][0]
        assert first["id"] == entry_id and first["label_name"] == cls
        assert abs(first["distance"]) < 1e-4
        assert first["uri"] == os.path.join(fmnist_small, "train", entry_id)
        assert r["rule"] == "rank" and r["k"] == 7 and len(r["neighbors"]) == 7
        assert [n["weight"] for n in r["neighbors"]] == pytest.approx([1 / (2 + i) for i in range(7)])
        assert sum(s["score"] for s in r["scores"]) == pytest.approx(sum(1 / (2 + i) for i in range(7)))
        assert r["scores"][0]["label_name"] == r["label_name"]

    # The text report names the prediction, the scores and each neighbour (rank, distance, weight, id, uri).
    code, out, err = _main(capsys, "--memory", tiny_memory, coat, "--explain", "--rule", "plurality", "--k", "3")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == coat
    assert lines[1].startswith("  predicted  ") and "[rule plurality, k 3]" in lines[1]
    # Uncalibrated memory: the confidence is the winner's raw share of the score (plurality over 3: 1/3 steps).
    assert lines[2].startswith("  confidence ") and "uncalibrated" in lines[2]
    assert float(lines[2].split()[1]) in (pytest.approx(1 / 3, abs=1e-3), pytest.approx(2 / 3, abs=1e-3), 1.0)
    assert lines[3].startswith("  scores     ")
    row0 = lines[5].split()
    assert row0[0] == "0" and abs(float(row0[1])) < 1e-4 and row0[2] == "1"
    assert coat_id in lines[5] and lines[5].endswith(os.path.join(fmnist_small, "train", coat_id))
    assert len(lines) == 5 + 3

    # Without --explain: prediction, confidence and scores only.
    code, out, _ = _main(capsys, "--memory", tiny_memory, coat)
    assert code == 0 and len(out.splitlines()) == 4 and out.count(coat_id) == 1  # Only in the query's path.

    # --abstain-below 1.01 is refused; --abstain-below 1 abstains on every vote that is not unanimous.
    code, _, err = _main(capsys, "--memory", tiny_memory, coat, "--abstain-below", "1.01")
    assert code == 2 and "--abstain-below must be a probability in [0, 1], got 1.01" in err
    code, out, err = _main(capsys, "--memory", tiny_memory, coat, bag, "--json", "--abstain-below", "1")
    assert code == 0, err
    for r in json.loads(out)["results"]:
        assert r["abstained"] == (r["confidence"] < 1.0)
        assert (r["label_name"] is None) == r["abstained"] and r["vote_label_name"]
        assert ("confidence" in r["reason"]) == r["abstained"]


def test_html_page_inlines_query_and_neighbour_thumbnails(tiny_memory, fmnist_small, tmp_path, capsys):
    coat, coat_id = _image(fmnist_small, "coat", 3)
    page = tmp_path / "page.html"
    code, out, err = _main(capsys, "--memory", tiny_memory, coat, "--k", "4", "--html", str(page))
    assert code == 0, err
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>")
    # 1 query + 4 neighbours, all inlined (self-contained: no file or http references).
    assert text.count('src="data:image/png;base64,') == 5
    assert "source unreadable" not in text
    (p,) = VisualMemory.open(tiny_memory).classify([coat], k=4)
    for n in p.neighbors:
        assert f"id {n.id}" in text and f"distance {n.distance:.6f}" in text
    assert coat_id in text


def test_render_html_escapes_text_and_shows_unreadable_sources(tmp_path):
    good = tmp_path / "good.png"
    from PIL import Image
    Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    neighbors = (
        Neighbor(id="<b>x</b>", label=0, label_name="a&b", distance=0.0, weight=0.5, uri=str(good)),
        Neighbor(id="y", label=1, label_name="<script>", distance=0.2, weight=1 / 3, uri=str(bad)),
        Neighbor(id="z", label=1, label_name="<script>", distance=0.3, weight=0.25, uri=str(tmp_path / "gone.png")),
    )
    p = Prediction(label=0, label_name="a&b", scores={"<script>": 0.5833, "a&b": 0.5}, neighbors=neighbors,
                   rule=VotingRule.RANK, k=3)
    page = classify_cli.render_html("mem<1>", [(str(good), p)])
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<b>x</b>" not in page and "id &lt;b&gt;x&lt;/b&gt;" in page and "a&amp;b" in page
    assert page.count('src="data:image/png;base64,') == 2  # The query and the first neighbour (same file).
    assert page.count("source unreadable") == 2
    assert "not_an_image" in page and "no such file" in page


@pytest.mark.parametrize("argv, status, message", [  # 1: a runtime failure; 2: a bad flag.
    (["--memory", "{tmp}/nowhere", "{img}"], 1, r"--memory '.*/nowhere': not a visual memory"),
    (["--memory", "{mem}", "{tmp}/missing.png"], 1, r"IMAGE '.*/missing.png' is not a readable file"),
    (["--memory", "{mem}", "{tmp}/notes.txt"], 1,
     r"cannot read query 0 \('.*/notes.txt'\) as an image: not_an_image"),
    (["--memory", "{mem}", "{img}", "--rule", "majority"], 2,
     r"--rule: unknown voting rule 'majority'; allowed: plurality, distance, softmax, rank"),
    (["--memory", "{mem}", "{img}", "--k", "0"], 2, r"--k must be an integer >= 1, got 0"),
    (["--memory", "{mem}", "{img}", "--k", "ten"], 2, r"--k must be an integer >= 1, got 'ten'"),
    (["{img}"], 2, r"the following arguments are required: --memory"),
])
def test_errors_exit_1_or_2_naming_the_bad_value(tiny_memory, fmnist_small, tmp_path, capsys, argv, status,
                                                 message):
    import re
    (tmp_path / "notes.txt").write_text("not an image\n")
    img, _ = _image(fmnist_small, "bag")
    argv = [a.format(tmp=tmp_path, mem=tiny_memory, img=img) for a in argv]
    code, out, err = _main(capsys, *argv)
    assert code == status and out == ""
    assert err.startswith("vmem classify: error: ") and re.search(message, err), err


def test_image_queries_use_the_memorys_encoder_and_reject_another(tiny_memory, fmnist_small, tiny_encoder_dir):
    from encoders import load_encoder
    from encoders.preprocess import decode_image
    memory = VisualMemory.open(tiny_memory)
    path, entry_id = _image(fmnist_small, "sneaker", 1)
    with open(path, "rb") as f:
        data = f.read()
    # Path, bytes and a decoded uint8 array give the same neighbours; the encoder is loaded once and cached.
    by_path, by_bytes, by_array = memory.classify([path, data, decode_image(data)], k=5)
    assert memory.query_encoder() is memory.query_encoder()
    for p in (by_path, by_bytes, by_array):
        assert p.neighbors[0].id == entry_id and p.neighbors[0].label_name == "sneaker"
        assert abs(p.neighbors[0].distance) < 1e-4
        assert [n.id for n in p.neighbors] == [n.id for n in by_path.neighbors]
    stored = memory.get_embeddings([entry_id])
    np.testing.assert_allclose(memory.embed_images([path]), stored, atol=1e-5)

    # The same model under the manifest's identity is accepted when passed explicitly ...
    same = load_encoder(EncoderSpec.from_dict(memory.manifest.build_config["encoder"]))
    (p,) = memory.classify([path], k=5, encoder=same)
    assert [n.id for n in p.neighbors] == [n.id for n in by_path.neighbors]
    # ... a different identity is refused, naming both and the fix.
    other = load_encoder(EncoderSpec(kind=EncoderKind.SAVED_MODEL, uri=tiny_encoder_dir, name="other-encoder"))
    with pytest.raises(ValueError) as e:
        memory.classify([path], encoder=other)
    msg = str(e.value)
    assert "'other-encoder'" in msg and "'tiny'" in msg and memory.manifest.encoder["content_hash"] in msg
    assert "omit encoder=" in msg


def test_classify_filter_crowding_and_gemini_rerank(tiny_memory, fmnist_small, tmp_path, capsys, monkeypatch):
    """--filter / --crowding / --rerank gemini:... with --rerank-cache, against the fake endpoint."""
    import re
    import socket

    from tests.fake_genai import FakeGenai, answer
    coat, _ = _image(fmnist_small, "coat", 3)
    shirt, _ = _image(fmnist_small, "shirt", 1)
    code, out, err = _main(capsys, "--memory", tiny_memory, coat, "--json", "--explain", "--k", "6",
                           "--filter", "label=shirt|pullover", "--crowding", "2:uri")
    assert code == 0, err
    [res] = json.loads(out)["results"]
    labels = [n["label_name"] for n in res["neighbors"]]
    assert set(labels) <= {"shirt", "pullover"} and max(labels.count(c) for c in set(labels)) <= 2
    # Crowding by class folder at c=2 leaves only 4 voters from two admitted classes: padding, not other classes.
    assert len(labels) == 4

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{s.getsockname()[1]}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("GOOGLE_API_KEY", "test-key")

    def last_label(req):
        return answer(re.findall(r'"([^"]+)"', req.texts()[-1].split("nothing else:", 1)[1])[-1])
    flags = ["--memory", tiny_memory, coat, shirt, "--json", "--rerank", "gemini:gemini-test", "--rerank-below",
             "1.01", "--rerank-top-n", "8", "--rerank-cache", str(tmp_path / "cache")]
    with FakeGenai(respond=last_label) as fake:
        code, out, err = _main(capsys, *flags, "--gemini-base-url", fake.url, "--rerank-dry-run")
        assert code == 0 and fake.requests == [] and "dry_run 2" in err
        code, out, err = _main(capsys, *flags, "--gemini-base-url", fake.url)
        assert code == 0, err
        first = json.loads(out)["results"]
        assert len(fake.generate_requests()) == 2 and "2 calls" in err
        code, out, err = _main(capsys, *flags, "--gemini-base-url", fake.url)
        assert len(fake.generate_requests()) == 2 and "0 calls" in err  # Served from --rerank-cache.
    again = json.loads(out)["results"]
    for a, b in zip(first, again):
        assert a["rerank_reason"] == "answered" and a["label_name"] == b["label_name"]
    # The query image went inline: its bytes are the file's (small PNGs are sent unchanged).
    assert fake.generate_requests()[0].images()[0][0] == open(coat, "rb").read()


def test_open_with_load_encoder_warms_the_encoder(tiny_memory, fmnist_small):
    memory = VisualMemory.open(tiny_memory, load_encoder=True)
    assert memory._encoder is not None  # Loaded and run inside open.
    coat, coat_id = _image(fmnist_small, "coat", 3)
    [p] = memory.classify([coat], k=3)
    assert p.neighbors[0].id == coat_id


def _calibrated_copy(tiny_memory, tmp_path, *, knot: float) -> str:
    """A copy of the memory carrying a calibration: confidence = the share, and an out-of-memory test whose 1,000
    held-out queries all had 10th-neighbour similarity ``knot`` (1.0: every query is unlike them; -1.0: none)."""
    from memory.decide.confidence import Calibration, CalibrationMethod, ConfidenceScore, publish_calibration
    from memory.decide.out_of_memory import OutOfMemoryTest
    from memory.store.versions import read_manifest
    root = str(tmp_path / f"mem-{knot}")
    shutil.copytree(tiny_memory, root)
    cal = Calibration(method=CalibrationMethod.ISOTONIC, score=ConfidenceScore.SHARE, rule=VotingRule.RANK, k=10,
                      softmax_tau=0.07, rank_alpha=2.0, knots_x=(0.0, 1.0), knots_y=(0.0, 1.0), queries=1000,
                      accuracy=0.9, fitted_on_version=read_manifest(root).version,
                      out_of_memory=OutOfMemoryTest(level=0.05, knots=(knot,), queries=1000, statistic="kth"))
    publish_calibration(root, cal)
    return root


def test_abstention_names_its_reason_in_text_and_json(tiny_memory, fmnist_small, tmp_path, capsys):
    coat, _ = _image(fmnist_small, "coat", 3)
    bag, _ = _image(fmnist_small, "bag", 0)
    unlike = _calibrated_copy(tiny_memory, tmp_path, knot=1.0)
    code, out, err = _main(capsys, "--memory", unlike, coat, "--abstain-below", "0.5")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[1].startswith("  predicted  abstained (the vote said ")
    assert lines[2].startswith("  abstained  unlike anything in memory: its neighbour 10 has similarity")
    assert lines[2].endswith("   [reason unlike_memory]")
    code, out, err = _main(capsys, "--memory", unlike, coat, bag, "--json", "--abstain-below", "0.5")
    assert code == 0, err
    results = json.loads(out)["results"]
    assert [r["abstain_reason"] for r in results] == ["unlike_memory", "unlike_memory"]
    assert all(r["abstained"] and r["out_of_memory_p"] == pytest.approx(1 / 1001) for r in results)

    # Nothing is unlike the held-out queries: a vote that is not unanimous abstains as split, the others answer.
    like = _calibrated_copy(tiny_memory, tmp_path, knot=-1.0)
    code, out, err = _main(capsys, "--memory", like, coat, bag, "--json", "--abstain-below", "1")
    assert code == 0, err
    for r in json.loads(out)["results"]:
        assert r["abstain_reason"] == ("split_vote" if r["confidence"] < 1.0 else None)
        assert r["abstained"] == (r["confidence"] < 1.0)
