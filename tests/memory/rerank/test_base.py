"""memory.rerank.base: strict parsing, the cost gate, the response cache, the report summary, and re-ranking in
VisualMemory.classify (with a scripted re-ranker and with GeminiReranker against the fake endpoint)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from memory.rerank import base as rerank
from memory.build import build_memory_local
from memory.search.filters import QueryFilter
from memory.index.shard_index import IndexConfig, IndexKind
from memory.vectors import l2_normalize
from memory.visual_memory import VisualMemory

LABELS = ("T-shirt/top", "Coat", "Shirt")


@pytest.mark.parametrize("text, want", [
    ("Coat", "Coat"), (" coat. ", "Coat"), ('"Shirt"', "Shirt"), ("`t-shirt/top`", "T-shirt/top"),
    ("Label: Coat", "Coat"), ("answer = shirt", "Shirt"),
    ("Coat or Shirt", None), ("probably a coat", None), ("", None), (None, None), ("Dress", None),
])
def test_parse_answer_is_strict(text, want):
    assert rerank.parse_answer(text, LABELS) == want


def test_gate_sends_only_margins_below():
    m = np.array([0.0, 0.29, 0.3, 0.9])
    assert rerank.gate(m, 0.3).tolist() == [True, True, False, False]
    assert not rerank.gate(m, None).any() and rerank.gate(m, 1.01).all()
    # The gate takes its threshold as checked where it entered (VisualMemory.classify, --rerank-below).
    with pytest.raises(ValueError, match="rerank_below must be a number >= 0"):
        rerank.check_rerank_below(-1)
    assert rerank.check_rerank_below(0.3) == 0.3 and rerank.check_rerank_below(None) is None


@pytest.mark.parametrize("below", [float("nan"), np.float32("nan")])
def test_a_nan_gate_is_refused(below):
    # NaN compares False with every margin: accepted, it would silently send no query.
    with pytest.raises(ValueError, match=r"rerank_below must be a number >= 0 .*, got (np\.float32\()?nan"):
        rerank.check_rerank_below(below)


def _request(**kw):
    return rerank.make_request("q1", "/q.png", ["Coat", "Shirt", "Coat", ""], ["/a", "/b", "/c", ""],
                               [0.1, 0.2, 0.3, np.inf], vote_label="Coat", margin=0.1, top_n=kw.pop("top_n", 4), **kw)


def test_request_skips_padding_and_lists_labels_in_order():
    r = _request()
    assert [c.uri for c in r.candidates] == ["/a", "/b", "/c"] and r.labels == ("Coat", "Shirt")
    assert _request(top_n=2).labels == ("Coat", "Shirt") and len(_request(top_n=2).candidates) == 2
    with pytest.raises(ValueError, match=r"top_n must be an int in \[2, 64\]"):
        rerank.check_top_n(1)  # Checked where it enters; make_request takes it as checked.
    # The key covers the re-ranker, the query's image bytes and the candidates.
    assert r.key("gemini:a") != r.key("gemini:b")
    assert _request(query_image=b"1").key("x") != _request(query_image=b"2").key("x")
    assert dataclasses.replace(r, candidates=r.candidates[:2]).key("x") != r.key("x")


def test_prompt_lists_only_shown_candidates():
    parts = rerank.prompt_parts(_request(), b"Q", [b"A", None, b"C"])
    texts = [v for kind, v in parts if kind == "text"]
    assert [v for kind, v in parts if kind == "image"] == [b"Q", b"A", b"C"]
    assert "2 labelled examples" in texts[0] and texts[-1].endswith('"Coat"')  # Shirt had no image.
    assert 'Example 2: label "Coat"' in texts


class Scripted:
    """A re-ranker answering from a dict by query id (or falling back), counting calls."""

    def __init__(self, answers, name="scripted"):
        self.answers, self.name, self.seen = answers, name, []

    def rerank(self, request):
        self.seen.append(request)
        got = self.answers.get(request.query_id)
        if got is None:
            return rerank.RerankOutcome(request.vote_label, rerank.RerankReason.TIMEOUT, calls=3, detail="slow")
        label = rerank.parse_answer(got, request.labels)
        if label is None:
            return rerank.RerankOutcome(request.vote_label, rerank.RerankReason.INVALID_ANSWER, calls=1, detail=got)
        return rerank.RerankOutcome(label, rerank.RerankReason.ANSWERED, calls=1)


def test_cache_answers_once_and_retries_timeouts(tmp_path):
    cache = rerank.ResponseCache(str(tmp_path / "cache"))
    s = Scripted({"q1": "Shirt"})
    first = rerank.rerank_cached(s, _request(), cache)
    again = rerank.rerank_cached(s, _request(), rerank.ResponseCache(str(tmp_path / "cache")))  # New process.
    assert first == rerank.RerankOutcome("Shirt", rerank.RerankReason.ANSWERED, calls=1)
    assert again == rerank.RerankOutcome("Shirt", rerank.RerankReason.ANSWERED, calls=0, cached=True)
    assert len(s.seen) == 1
    slow = Scripted({}, name="slow")
    assert rerank.rerank_cached(slow, _request(), cache).reason == rerank.RerankReason.TIMEOUT
    assert rerank.rerank_cached(slow, _request(), cache).reason == rerank.RerankReason.TIMEOUT
    assert len(slow.seen) == 2  # Timeouts are not cached: asked again.
    # A damaged cache file is a miss, not a crash.
    [path] = (tmp_path / "cache").glob("*/*.json")
    path.write_text("{not json")
    assert rerank.rerank_cached(s, _request(), rerank.ResponseCache(str(tmp_path / "cache"))).calls == 1


def test_cached_outcome_must_keep_the_vote_on_fallback(tmp_path):
    class Liar:
        name = "liar"

        def rerank(self, request):
            return rerank.RerankOutcome("Shirt", rerank.RerankReason.ERROR)
    with pytest.raises(AssertionError, match="must keep the vote"):
        rerank.rerank_cached(Liar(), _request(), None)


def _outcomes():
    reason = rerank.RerankReason
    return [rerank.RerankOutcome("a", reason.NOT_GATED), rerank.RerankOutcome("b", reason.ANSWERED, 1),
            rerank.RerankOutcome("c", reason.ANSWERED, 2), rerank.RerankOutcome("a", reason.TIMEOUT, 3)]


def test_summarize_counts():
    s = rerank.summarize(_outcomes(), vote_labels=["a", "a", "c", "a"], true_labels=["a", "b", "a", "b"]).to_dict()
    assert s["accuracy_vote"] == 25.0 and s["accuracy_reranked"] == 50.0
    assert (s["calls"], s["sent"], s["reranked"], s["changed"], s["changed_to_right"], s["fallbacks"]) == \
        (6, 3, 2, 1, 1, 1)
    assert s["reasons"] == {"answered": 2, "margin_above_gate": 1, "timeout": 1}


def test_report_section_json_is_unchanged():
    """The report's re-rank section and a record line, byte for byte as the job writes them."""
    s = rerank.summarize(_outcomes(), vote_labels=["a", "a", "c", "a"], true_labels=["a", "b", "a", "b"])
    assert json.dumps(s.to_dict()) == (
        '{"queries": 4, "calls": 6, "cached": 0, "sent": 3, "would_send": 0, "reranked": 2, "changed": 1, '
        '"changed_to_right": 1, "changed_to_wrong": 0, "reasons": {"answered": 2, "margin_above_gate": 1, '
        '"timeout": 1}, "accuracy_vote": 25.0, "accuracy_reranked": 50.0, "fraction_sent": 0.75, '
        '"fraction_reranked": 0.5, "fallbacks": 1}')
    assert json.dumps(rerank.RerankTally().to_dict()) == (
        '{"queries": 0, "calls": 0, "cached": 0, "sent": 0, "would_send": 0, "reranked": 0, "changed": 0, '
        '"changed_to_right": 0, "changed_to_wrong": 0, "reasons": {}, "accuracy_vote": 0.0, '
        '"accuracy_reranked": 0.0, "fraction_sent": 0.0, "fraction_reranked": 0.0, "fallbacks": 0}')
    outcome = rerank.RerankOutcome("a", "invalid_answer", 1, "a cat")
    record = rerank.RerankRecord.of("q1", "b", "a", 0.25, outcome)
    line = json.dumps(record.to_dict())
    assert line == ('{"query_id": "q1", "true_label": "b", "vote_label": "a", "margin": 0.25, "label": "a", '
                    '"reason": "invalid_answer", "calls": 1, "cached": false, "detail": "a cat"}')
    assert rerank.RerankRecord.from_dict(json.loads(line)) == record and record.outcome == outcome
    assert record.reason is rerank.RerankReason.INVALID_ANSWER and record.reason.is_fallback
    # Tallies add in any grouping (what Beam's CombineFn does) and a record's tally is its outcome's.
    parts = [rerank.RerankTally.of(o, v, t) for o, v, t in zip(_outcomes(), "aaca", "abab")]
    assert (parts[0] + parts[1]) + (parts[2] + parts[3]) == s == sum(parts, rerank.RerankTally())
    assert record.tally() == rerank.RerankTally.of(outcome, "a", "b")
    with pytest.raises(ValueError, match="unknown re-rank reason 'maybe'; allowed: answered, margin_above_gate"):
        rerank.RerankOutcome("a", "maybe")


def test_rate_limiter_spaces_calls():
    now = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s
    lim = rerank.RateLimiter(2.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        lim.acquire()
    assert slept == [0.5, 0.5]
    with pytest.raises(ValueError, match="rate limit"):
        rerank.RateLimiter(True)


# ------------------------------------------------------------------------------------ classify + rerank


@pytest.fixture
def image_memory(tmp_path):
    """A memory whose entries are real PNG files: two near-tied classes around each query."""
    rng = np.random.default_rng(0)
    d = 8
    centre = l2_normalize(rng.normal(size=(1, d)))[0]
    x, ids, labels, uris = [], [], [], []
    for i in range(12):
        lab = LABELS[i % 2]  # T-shirt/top and Coat alternate around one centre: a low-margin vote.
        x.append(centre + 0.05 * rng.normal(size=d))
        ids.append(f"e{i:02d}")
        labels.append(lab)
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(path)
        uris.append(str(path))
    for i in range(6):  # Six shirts on the far side: a unanimous vote there.
        x.append(-centre + 0.05 * rng.normal(size=d))
        ids.append(f"far{i}")
        labels.append("Shirt")
        Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / f"far{i}.png")
        uris.append(str(tmp_path / f"far{i}.png"))
    enc = {"name": "fake", "content_hash": "sha256:" + "0" * 64, "dim": d, "preprocess": {}}
    build_memory_local(str(tmp_path / "m"), ids=ids, labels=labels, uris=uris, embeddings=l2_normalize(np.asarray(x)),
                       num_shards=2, index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE), encoder_identity=enc)
    return VisualMemory.open(str(tmp_path / "m")), centre, -centre


def test_classify_reranks_only_low_margin_queries(image_memory, tmp_path):
    mem, near, far = image_memory
    q = np.stack([near, far])
    plain = mem.classify(q, k=5)
    s = Scripted({"0": "T-shirt/top", "1": "Shirt"})
    got = mem.classify(q, k=5, rerank=s, rerank_below=0.6, rerank_top_n=6)  # Margins: 0.54 and 1.
    # Query 1 (the far one) has a unanimous vote: margin 1, never sent.
    assert [r.query_id for r in s.seen] == ["0"]
    assert got[1].rerank_reason == rerank.RerankReason.NOT_GATED and got[1].label_name == plain[1].label_name
    assert plain[0].label_name == "Coat" and got[0].vote_label_name == "Coat"
    assert got[0].rerank_reason == rerank.RerankReason.ANSWERED and got[0].label_name == "T-shirt/top"
    assert got[0].rerank_calls == 1 and "re-ranked by scripted" in got[0].reason
    assert len(s.seen[0].candidates) == 6 and len(got[0].neighbors) == 5  # top-N shown, k voted.
    # Vector queries carry no image: a Gemini-style re-ranker would answer NO_IMAGE; the scripted one needs none.
    assert s.seen[0].query_image is None and s.seen[0].query_uri == ""
    assert json.loads(json.dumps(got[0].to_dict()))["rerank_reason"] == "answered"


def test_classify_rerank_fallback_keeps_the_vote_and_filters_apply(image_memory):
    mem, near, _ = image_memory
    got = mem.classify(near[None], k=5, rerank=Scripted({}), rerank_below=1.01)[0]
    assert got.rerank_reason == rerank.RerankReason.TIMEOUT and got.rerank_detail == "slow" and got.rerank_calls == 3
    assert got.label_name == mem.classify(near[None], k=5)[0].label_name
    s = Scripted({"0": "Shirt"})
    only = mem.classify(near[None], k=3, filters=QueryFilter(labels=("Coat", "Shirt")), rerank=s, rerank_below=1.01)
    assert {n.label_name for n in only[0].neighbors} <= {"Coat", "Shirt"}
    assert set(s.seen[0].labels) <= {"Coat", "Shirt"}
    with pytest.raises(ValueError, match="rerank needs rerank_below"):
        mem.classify(near[None], k=5, rerank=s)
