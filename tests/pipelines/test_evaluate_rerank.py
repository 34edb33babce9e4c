"""The evaluate job with filters, crowding and re-ranking (DirectRunner, real images, the tiny real encoder;
Gemini is the fake generateContent endpoint of tests/fake_genai.py on 127.0.0.1)."""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import socket

import pytest

from evaluation.neighbors_io import read_neighbor_files
from memory.visual_memory import VisualMemory
from vmem import main as cli
from tests.fake_genai import FakeGenai, answer, hang, status


def _records(out):
    return read_neighbor_files(sorted(glob.glob(os.path.join(out, "neighbors-*.jsonl"))))


def _rerank_rows(out):
    rows = []
    for path in sorted(glob.glob(os.path.join(out, "rerank-*.jsonl"))):
        rows += [json.loads(line) for line in open(path)]
    return {r["query_id"]: r for r in rows}


def _evaluate(tiny_memory, fmnist_small, out, *extra):
    rc = cli.main(["evaluate", "--memory", tiny_memory, "--images", os.path.join(fmnist_small, "test"),
                   "--output", out, "--k-max", "12", *extra])
    assert rc == 0
    return json.load(open(os.path.join(out, "report.json")))


def test_filter_and_crowding_in_the_job(tiny_memory, fmnist_small, tmp_path):
    memory = VisualMemory.open(tiny_memory)
    allowed = {"coat", "shirt", "pullover"}
    allowed_idx = {memory.class_names.index(c) for c in allowed}
    report = _evaluate(tiny_memory, fmnist_small, str(tmp_path / "f"), "--filter", "label=coat|shirt|pullover")
    records = _records(str(tmp_path / "f"))
    assert report["extra"]["filter"]["default"] == {"labels": sorted(allowed)}
    # k admitted neighbours for every query (60 admitted entries >= 12), nothing else.
    assert all(len(r.neighbor_ids) == 12 and set(r.neighbor_labels) <= allowed_idx for r in records)
    # Per-query filters from a file override the default for the listed queries.
    qid = sorted(r.query_id for r in records)[0]
    (tmp_path / "filters.jsonl").write_text(json.dumps({"query": qid, "filter": {"labels": ["bag"]}}) + "\n")
    _evaluate(tiny_memory, fmnist_small, str(tmp_path / "pq"), "--filters", str(tmp_path / "filters.jsonl"))
    by_id = {r.query_id: r for r in _records(str(tmp_path / "pq"))}
    assert set(by_id[qid].neighbor_labels) == {memory.class_names.index("bag")}
    assert len({lab for r in by_id.values() for lab in r.neighbor_labels}) > 1
    # Crowding by the source folder (= the class folder here): at most 2 votes per class among 12 neighbours.
    report = _evaluate(tiny_memory, fmnist_small, str(tmp_path / "c"), "--crowding", "2:uri")
    assert report["extra"]["crowding"] == {"max_per_group": 2, "by": "uri"}
    for r in _records(str(tmp_path / "c")):
        assert len(r.neighbor_ids) == 12 and max(collections.Counter(r.neighbor_labels).values()) <= 2


def _label_choices(req):
    return re.findall(r'"([^"]+)"', req.texts()[-1].split("nothing else:", 1)[1])


@pytest.fixture
def gemini_env(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(var, dead)  # Anything not for 127.0.0.1 fails loudly.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("GOOGLE_API_KEY", "test-key")


def test_gemini_rerank_in_the_job_with_fallbacks_and_no_second_call(tiny_memory, fmnist_small, tmp_path,
                                                                    gemini_env, capsys):
    out = str(tmp_path / "g")
    flags = ["--rerank", "gemini:gemini-test", "--rerank-below", "1.01", "--rerank-top-n", "5",
             "--gemini-base-url", None, "--gemini-timeout", "1", "--gemini-retries", "1"]
    # The first answers: an invalid label, two hangs (one query times out twice), a 429 (its query is retried
    # and answered); then always the *last* label offered (often not the vote's).
    with FakeGenai(answer("not a class"), hang(3), hang(3), status(429),
                   respond=lambda req: answer(_label_choices(req)[-1])) as fake:
        flags[flags.index(None)] = fake.url
        dry = _evaluate(tiny_memory, fmnist_small, str(tmp_path / "dry"), *flags, "--rerank-dry-run")
        assert fake.requests == []  # A dry run makes no call.
        printed = capsys.readouterr().out
        assert "dry run: no call made" in printed and f"A real run would send {dry['extra']['rerank']['would_send']}" \
            in printed
        report = _evaluate(tiny_memory, fmnist_small, out, *flags)
        calls = len(fake.generate_requests())
        assert fake.unexpected_requests() == []
    d = dry["extra"]["rerank"]
    assert d["dry_run"] and d["calls"] == 0 and d["would_send"] + d["reasons"].get("single_candidate_label", 0) == 50
    r = report["extra"]["rerank"]
    rows = _rerank_rows(out)
    assert len(rows) == r["queries"] == 50  # Every query has a record: nothing dropped.
    assert r["calls"] == calls == sum(row["calls"] for row in rows.values())
    assert r["reasons"].get("invalid_answer") == 1 and r["reasons"].get("timeout") == 1
    assert r["reranked"] == r["reasons"]["answered"] and r["fallbacks"] == 2
    for row in rows.values():
        if row["reason"] != "answered":
            assert row["label"] == row["vote_label"]  # Fallbacks keep the vote.
    # The report's accuracies are recomputed from the per-query records.
    assert r["accuracy_reranked"] == pytest.approx(100 * sum(x["label"] == x["true_label"] for x in rows.values()) / 50)
    assert r["accuracy_vote"] == pytest.approx(100 * sum(x["vote_label"] == x["true_label"] for x in rows.values()) / 50)
    assert r["changed"] > 0
    req = fake.generate_requests()[-1]
    assert len(req.images()) >= 3 and req.headers["x-goog-api-key"] == "test-key"
    assert "Re-ranking: gemini:gemini-test" in open(os.path.join(out, "report.md")).read()

    # A re-run over the same output (what a retried bundle sees): answered queries come from the cache.
    with FakeGenai(respond=lambda req: answer(_label_choices(req)[-1])) as again:
        rerun = _evaluate(tiny_memory, fmnist_small, out, *[again.url if f == fake.url else f for f in flags])
    answered = r["reasons"]["answered"] + r["reasons"]["invalid_answer"]
    assert rerun["extra"]["rerank"]["cached"] == answered
    assert len(again.generate_requests()) == 1  # Only the timed-out query is asked again.


@pytest.mark.parametrize("flags, message", [
    (["--rerank", "gemini:m"], "needs --rerank-below"),
    (["--rerank", "gemini:m", "--rerank-below", "0.3"], "GOOGLE_API_KEY"),
    (["--rerank-below", "0.3"], "needs --rerank KIND:NAME"),
    (["--rerank", "gpt:x", "--rerank-below", "0.3"], "gemini:MODEL"),
    (["--rerank", "encoder:efficientnet-lite1", "--rerank-below", "0.3", "--rerank-top-n", "20"], "must be in [1, --k-max 12]"),
    (["--rerank", "encoder:efficientnet-lite1", "--rerank-below", "0.3", "--rerank-k", "13"], "--rerank-k 13"),
    (["--filter", "colour=red"], "unknown name 'colour'"),
    (["--crowding", "two"], "expected C or C:BY"),
])
def test_rerank_and_filter_flag_errors(tiny_memory, fmnist_small, tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    rc = cli.main(["evaluate", "--memory", tiny_memory, "--images", os.path.join(fmnist_small, "test"), "--output",
                   str(tmp_path / "x"), "--k-max", "12", *flags])
    assert rc == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_offline_second_opinion_in_the_job(tiny_memory, fmnist_small, tmp_path):
    """The real EfficientNet-Lite1 re-ranker on real images: every gated query gets an answer from its candidates."""
    out = str(tmp_path / "lite1")
    report = _evaluate(tiny_memory, fmnist_small, out, "--rerank", "encoder:efficientnet-lite1", "--rerank-below",
                       "0.5", "--rerank-top-n", "6")
    r = report["extra"]["rerank"]
    rows = _rerank_rows(out)
    assert r["queries"] == len(rows) == 50 and r["sent"] > 0
    assert r["reasons"].get("answered", 0) + r["reasons"].get("single_candidate_label", 0) == r["sent"]
    assert all(row["margin"] < 0.5 for row in rows.values() if row["reason"] == "answered")
    assert all(row["label"] == row["vote_label"] for row in rows.values() if row["reason"] != "answered")


def test_a_retried_bundle_pays_no_call_twice(tmp_path, gemini_env):
    """RerankModelHandler.request on the same batch twice (what a runner does after a worker crash)."""
    from PIL import Image

    from memory.rerank import base as rerank
    from pipelines.stages.rerank import RerankModelHandler
    from memory.rerank import RerankSpec
    paths = []
    for i, rgb in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (8, 8), rgb).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    batch = [(f"q{i}", rerank.make_request(f"q{i}", paths[0], ["a", "b"], paths[1:], [0.1, 0.2], vote_label="a",
                                           margin=0.0, top_n=2), "a", "b") for i in range(3)]
    with FakeGenai(respond=lambda req: answer("b")) as fake:
        spec = RerankSpec("gemini", "gemini-test", (("api_key", "test-key"), ("base_url", fake.url)))
        first = RerankModelHandler(spec, str(tmp_path / "cache"))
        got = first.run_inference(batch, first.load_model())
        retried = RerankModelHandler(spec, str(tmp_path / "cache"))  # A new worker: nothing in memory.
        again = retried.run_inference(batch, retried.load_model())
        assert len(fake.generate_requests()) == 3
    assert [r.inference.label for r in got] == ["b"] * 3 and [r.inference.calls for r in got] == [1] * 3
    assert [(r.inference.label, r.inference.cached, r.inference.calls) for r in again] == [("b", True, 0)] * 3
    assert first.num_retries == 0  # Beam's whole-batch retry would re-send answered queries.


def test_a_registered_third_reranker_runs_in_the_job(tiny_memory, fmnist_small, tmp_path, monkeypatch):
    """--rerank KIND:NAME resolves through memory.rerank's registry: a kind registered there runs in the job."""
    from tests import fake_reranker
    fake_reranker.registered(monkeypatch)
    out = str(tmp_path / "last")
    report = _evaluate(tiny_memory, fmnist_small, out, "--rerank", "last:x", "--rerank-below", "1.01",
                       "--rerank-top-n", "5", "--rerank-rate", "7")
    r = report["extra"]["rerank"]
    rows = _rerank_rows(out)
    assert r["reranker"] == "last:x" and r["options"] == {"rate_limit": 7.0}
    assert r["queries"] == len(rows) == 50 and r["calls"] == r["reranked"] == r["reasons"]["answered"]
    assert r["reranked"] + r["reasons"].get("single_candidate_label", 0) == 50
    assert all(row["reason"] in ("answered", "single_candidate_label") for row in rows.values())
