"""GeminiReranker against a fake generateContent endpoint (tests/fake_genai.py): nothing leaves 127.0.0.1."""

from __future__ import annotations

import io
import pickle
import socket
import time

import pytest
from PIL import Image

from memory.rerank import base as rerank
from memory.rerank import parse_rerank_spec
from memory.rerank.gemini import GeminiReranker, thumbnail
from tests.fake_genai import FakeGenai, answer, hang, status

MODEL = "gemini-2.5-flash"
COLOURS = {"query": (255, 0, 0), "Coat": (0, 0, 255), "Shirt": (0, 200, 0), "Dress": (250, 250, 0)}


class FakeSleep:
    """Records the waits instead of sleeping (module level, so a reranker holding it pickles)."""

    def __init__(self):
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture(autouse=True)
def no_real_google(monkeypatch):
    """Any request that is not to 127.0.0.1 goes to a proxy port nobody listens on: it fails, loudly."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, dead)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    for var in ("GOOGLE_API_KEY", "GEMINI_API_KEY", "GOOGLE_GENAI_API_VERSION", "GOOGLE_GENAI_USE_VERTEXAI",
                "GOOGLE_CLOUD_LOCATION"):
        monkeypatch.delenv(var, raising=False)


def _png(path, rgb, size=(32, 32)) -> str:
    Image.new("RGB", size, rgb).save(path, format="PNG")
    return str(path)


@pytest.fixture
def request_(tmp_path) -> rerank.RerankRequest:
    """A 640x480 red query and three small solid-colour candidates: Coat (blue), Shirt (green), Coat again."""
    query = _png(tmp_path / "q.png", COLOURS["query"], size=(640, 480))
    uris = [_png(tmp_path / "c0.png", COLOURS["Coat"]), _png(tmp_path / "c1.png", COLOURS["Shirt"]),
            _png(tmp_path / "c2.png", COLOURS["Coat"], size=(20, 40))]
    return rerank.make_request("q7", query, ["Coat", "Shirt", "Coat"], uris, [0.1, 0.2, 0.3],
                               vote_label="Coat", margin=0.1, top_n=3)


def _reranker(fake, **kw) -> GeminiReranker:
    kw = {"api_key": "test-key", "base_url": fake.url, "sleep": FakeSleep(), "timeout_s": 5.0, **kw}
    return GeminiReranker(MODEL, **kw)


def _colour(data: bytes) -> tuple[int, int, int]:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB").getpixel((im.width // 2, im.height // 2))


def _close(rgb, want, tol=8) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(rgb, want))


def test_valid_answer_sends_the_query_and_candidates_inline(request_, tmp_path):
    with FakeGenai(answer("Shirt")) as fake:
        outcome = _reranker(fake).rerank(request_)
    assert outcome == rerank.RerankOutcome("Shirt", rerank.RerankReason.ANSWERED, calls=1)
    [req] = fake.requests
    assert req.method == "POST" and req.path == f"/v1beta/models/{MODEL}:generateContent"
    assert req.headers["x-goog-api-key"] == "test-key"
    images = req.images()
    assert len(images) == 1 + 3
    # The query first, scaled down to 224 px (a JPEG: no transparency), then the candidates as they are.
    q_bytes, q_mime = images[0]
    assert q_mime == "image/jpeg" and q_bytes[:2] == b"\xff\xd8"
    with Image.open(io.BytesIO(q_bytes)) as im:
        assert im.size == (224, 168)
    assert _close(_colour(q_bytes), COLOURS["query"])
    for (data, mime), cand in zip(images[1:], request_.candidates):
        assert mime == "image/png"
        assert data == open(cand.uri, "rb").read()
        assert _close(_colour(data), COLOURS[cand.label])
    # The prompt's order and texts: head, "Query image:", query, then "Example i: label ..." before each image.
    kinds = [kind for kind, _ in req.prompt()]
    assert kinds == ["text", "text", "image", "text", "image", "text", "image", "text", "image", "text"]
    texts = req.texts()
    assert texts[1] == "Query image:"
    assert texts[2:5] == ['Example 1: label "Coat"', 'Example 2: label "Shirt"', 'Example 3: label "Coat"']
    assert '"Coat", "Shirt"' in texts[-1]
    config = req.generation_config
    assert config["temperature"] == 0 and config["maxOutputTokens"] == 32 and config.get("candidateCount") == 1
    assert config["responseMimeType"] == "text/x.enum"
    assert config["responseSchema"] == {"type": "STRING", "enum": ["Coat", "Shirt"]}
    assert fake.unexpected_requests() == []


def test_unreadable_candidate_is_left_out_with_its_label(request_, tmp_path):
    (tmp_path / "c2.png").write_bytes(b"not an image")  # The second Coat: Coat and Shirt stay on show.
    with FakeGenai(answer("coat.")) as fake:
        outcome = _reranker(fake).rerank(request_)
    assert outcome.reason == rerank.RerankReason.ANSWERED and outcome.label == "Coat"  # Normalised by parse_answer.
    [req] = fake.requests
    assert [_colour(d) for d, _ in req.images()[1:]] == [COLOURS["Coat"], COLOURS["Shirt"]]
    assert "2 labelled examples follow" in " ".join(req.texts())


def test_unreadable_candidates_leaving_one_label_make_no_call(request_, tmp_path):
    (tmp_path / "c1.png").write_bytes(b"not an image")  # The only Shirt: nothing left to choose between.
    with FakeGenai() as fake:
        outcome = _reranker(fake).rerank(request_)
    assert (outcome.reason, outcome.label, outcome.calls) == (rerank.RerankReason.SINGLE_LABEL, "Coat", 0)
    assert fake.requests == []


def test_answer_outside_the_candidates_is_invalid(request_):
    with FakeGenai(answer("a cat, probably")) as fake:
        outcome = _reranker(fake).rerank(request_)
    assert outcome == rerank.RerankOutcome("Coat", rerank.RerankReason.INVALID_ANSWER, calls=1,
                                           detail="a cat, probably")
    with FakeGenai(answer("x" * 500)) as fake:
        assert _reranker(fake).rerank(request_).detail == "x" * 200
    with FakeGenai(answer("", finish_reason="MAX_TOKENS")) as fake:
        outcome = _reranker(fake).rerank(request_)
    assert outcome.reason == rerank.RerankReason.INVALID_ANSWER and "MAX_TOKENS" in outcome.detail


def test_429_then_success_retries_after_the_backoff(request_):
    with FakeGenai(status(429), answer("Shirt")) as fake:
        reranker = _reranker(fake, backoff_s=0.25)
        outcome = reranker.rerank(request_)
    assert outcome == rerank.RerankOutcome("Shirt", rerank.RerankReason.ANSWERED, calls=2)
    assert reranker._sleep.calls == [0.25]
    assert len(fake.requests) == 2


def test_server_asked_delay_is_honoured(request_):
    with FakeGenai(status(503, retry_after=7), status(429, retry_delay="3.5s"), answer("Coat")) as fake:
        reranker = _reranker(fake, backoff_s=1.0)
        outcome = reranker.rerank(request_)
    assert outcome.reason == rerank.RerankReason.ANSWERED and outcome.calls == 3
    assert reranker._sleep.calls == [7.0, 3.5]  # max(backoff 1 then 2, the server's delay)


def test_timeout_after_retries(request_):
    start = time.monotonic()
    with FakeGenai(hang(3), hang(3)) as fake:
        reranker = _reranker(fake, timeout_s=0.5, max_retries=1, backoff_s=0.1)
        outcome = reranker.rerank(request_)
    assert time.monotonic() - start < 2.5
    assert outcome.label == "Coat" and outcome.reason == rerank.RerankReason.TIMEOUT and outcome.calls == 2
    assert "0.5 s" in outcome.detail and "Timeout" in outcome.detail
    assert reranker._sleep.calls == [0.1]
    assert len(fake.requests) == 2


def test_server_errors(request_):
    with FakeGenai(default=status(500)) as fake:
        reranker = _reranker(fake, max_retries=2, backoff_s=1.0)
        outcome = reranker.rerank(request_)
    assert outcome.label == "Coat" and outcome.reason == rerank.RerankReason.ERROR and outcome.calls == 3
    assert outcome.detail.startswith("HTTP 500 INTERNAL") and "after 3 attempts" in outcome.detail
    assert reranker._sleep.calls == [1.0, 2.0] and len(fake.requests) == 3
    with FakeGenai(status(400), answer("Shirt")) as fake:
        reranker = _reranker(fake)
        outcome = reranker.rerank(request_)
    assert outcome.label == "Coat" and outcome.reason == rerank.RerankReason.ERROR and outcome.calls == 1
    assert outcome.detail.startswith("HTTP 400 INVALID_ARGUMENT")
    assert reranker._sleep.calls == [] and len(fake.requests) == 1


def test_missing_images_make_no_call(request_, tmp_path):
    with FakeGenai(default=answer("Shirt")) as fake:
        reranker = _reranker(fake)
        no_query = rerank.RerankRequest("q", str(tmp_path / "gone.png"), request_.candidates, "Coat", 0.1)
        assert reranker.rerank(no_query) == rerank.RerankOutcome(
            "Coat", rerank.RerankReason.NO_IMAGE, calls=0, detail=f"query image unreadable: {tmp_path / 'gone.png'}")
        no_cands = rerank.RerankRequest("q", "", tuple(rerank.Candidate(c.label, str(tmp_path / "x"), 0.1)
                                                       for c in request_.candidates), "Coat", 0.1,
                                        query_image=open(request_.query_uri, "rb").read())
        outcome = reranker.rerank(no_cands)
        assert (outcome.label, outcome.reason, outcome.calls) == ("Coat", rerank.RerankReason.NO_IMAGE, 0)
        # Query bytes given directly (classify of bytes) do make a call.
        bytes_query = rerank.RerankRequest("q", "", request_.candidates, "Coat", 0.1,
                                           query_image=open(request_.query_uri, "rb").read())
        assert reranker.rerank(bytes_query).reason == rerank.RerankReason.ANSWERED
    assert len(fake.requests) == 1


def test_cache_serves_the_second_identical_request(request_, tmp_path):
    cache = rerank.ResponseCache(str(tmp_path / "cache"))
    with FakeGenai(answer("Shirt"), answer("Coat")) as fake:
        reranker = _reranker(fake)
        first = rerank.rerank_cached(reranker, request_, cache)
        second = rerank.rerank_cached(reranker, request_, cache)
        third = rerank.rerank_cached(reranker, request_, rerank.ResponseCache(str(tmp_path / "cache")))
    assert first == rerank.RerankOutcome("Shirt", rerank.RerankReason.ANSWERED, calls=1)
    assert second == third == rerank.RerankOutcome("Shirt", rerank.RerankReason.ANSWERED, calls=0, cached=True)
    assert len(fake.requests) == 1


def test_configuration_errors(monkeypatch):
    with pytest.raises(ValueError, match="GOOGLE_API_KEY"):
        GeminiReranker(MODEL)
    monkeypatch.setenv("GEMINI_API_KEY", "env-key")
    assert GeminiReranker(MODEL).api_key == "env-key"
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    with pytest.raises(ValueError, match="project"):
        GeminiReranker(MODEL, vertexai=True, location="us-central1")
    with pytest.raises(ValueError, match="location"):
        GeminiReranker(MODEL, vertexai=True, project="p")
    with pytest.raises(ValueError, match="not both"):
        GeminiReranker(MODEL, vertexai=True, api_key="k", project="p", location="l")
    with pytest.raises(ValueError, match="vertexai=True"):
        GeminiReranker(MODEL, api_key="k", project="p")
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "env-project")
    monkeypatch.setenv("GOOGLE_CLOUD_LOCATION", "europe-west4")
    vertex = GeminiReranker(MODEL, vertexai=True)
    assert (vertex.project, vertex.location, vertex.api_key, vertex.name) == (
        "env-project", "europe-west4", None, f"gemini:{MODEL}")
    for bad in ({"timeout_s": 0}, {"max_retries": -1}, {"backoff_s": -1}, {"rate_limit": 0}, {"thumbnail_px": 4}):
        with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
            GeminiReranker(MODEL, api_key="k", **bad)
    with pytest.raises(ValueError, match="model"):
        GeminiReranker(" ", api_key="k")
    assert "test-key" not in repr(GeminiReranker(MODEL, api_key="test-key"))


def test_parse_rerank_spec():
    assert parse_rerank_spec("gemini:gemini-2.5-flash") == ("gemini", "gemini-2.5-flash")
    assert parse_rerank_spec(" encoder:efficientnet-lite1 ") == ("encoder", "efficientnet-lite1")
    for bad in ("gemini", "gemini:", "openai:gpt-4o", "gemini:two words", "", None):
        with pytest.raises(ValueError, match=r"gemini:MODEL.*encoder:NAME"):
            parse_rerank_spec(bad)


def test_pickles_before_and_after_a_call(request_):
    with FakeGenai(answer("Shirt"), answer("Coat")) as fake:
        reranker = _reranker(fake, rate_limit=100.0)
        copy = pickle.loads(pickle.dumps(reranker))
        assert copy._client is None and copy.api_key == "test-key" and copy.base_url == fake.url
        assert reranker.rerank(request_).label == "Shirt"
        assert reranker._client is not None
        again = pickle.loads(pickle.dumps(reranker))
        assert again._client is None and again.name == reranker.name
        assert again.rerank(request_).label == "Coat"
    assert len(fake.requests) == 2


def test_rate_limit_waits_before_every_attempt(request_):
    with FakeGenai(status(429), answer("Shirt")) as fake:
        reranker = _reranker(fake, rate_limit=0.5, backoff_s=0.0)  # One call per 2 s: the retry must wait.
        assert reranker.rerank(request_).calls == 2
    waits = reranker._sleep.calls
    assert waits[0] == 0.0 and 1.5 < waits[1] <= 2.0  # The backoff (0 s), then the limiter's wait.


def test_a_request_to_a_real_google_host_fails_loudly(request_):
    """The guard itself: without base_url the client goes to googleapis.com, i.e. to the dead proxy."""
    reranker = GeminiReranker(MODEL, api_key="k", max_retries=0, timeout_s=2.0)
    outcome = reranker.rerank(request_)
    assert outcome.reason in (rerank.RerankReason.ERROR, rerank.RerankReason.TIMEOUT) and outcome.calls == 1
    assert "Connect" in outcome.detail or "Proxy" in outcome.detail


def test_thumbnail_keeps_transparency_and_rejects_garbage():
    im = Image.new("RGBA", (500, 250), (10, 20, 30, 128))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    small = thumbnail(buf.getvalue(), 100)
    with Image.open(io.BytesIO(small)) as out:
        assert out.format == "PNG" and out.size == (100, 50) and out.mode == "RGBA"
    assert thumbnail(b"GIF89a garbage", 100) is None and thumbnail(None, 100) is None
