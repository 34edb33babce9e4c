"""The HTTP API through the ASGI test client, on a copy of the tiny real memory (200 Fashion-MNIST images)."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest

from memory.store import mutations
from memory.store.versions import history
from memory.visual_memory import VisualMemory
from serving.live import LiveMemory
from tests.serving.helpers import TOKEN, flipping_query, make_client, training_image


@pytest.fixture()
def client(served_memory):
    with make_client(served_memory, write_token=TOKEN) as c:
        yield c


def _png(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _classify(client, data: bytes, **options):
    return client.post("/v1/classify", params=options, files={"image": ("q.png", data, "image/png")})


def test_health_info_schema_and_page(client, served_memory):
    assert client.get("/healthz").json() == {"status": "ok", "version": 1}
    info = client.get("/v1/info").json()
    assert info["version"] == 1 and info["live"]["live_entries"] == 200 and info["serving"]["write_enabled"]
    assert info["class_names"] == list(VisualMemory.open(served_memory).class_names)
    schema = client.get("/openapi.json").json()
    assert {"/v1/classify", "/v1/revote", "/v1/apply", "/v1/undo", "/v1/info", "/healthz", "/v1/thumbnail"} <= set(
        schema["paths"])
    assert set(schema["paths"]["/v1/classify"]["post"]["requestBody"]["content"]) == {
        "multipart/form-data", "image/*", "application/json"}
    assert client.get("/docs").status_code == 404  # Swagger UI loads assets from a CDN: not offered.
    page = client.get("/")
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/", "/static/page.js", "/static/page.css"):
        text = client.get(asset).text
        assert "http://" not in text and "https://" not in text, asset  # Offline: nothing from elsewhere.
    assert "innerHTML" not in client.get("/static/page.js").text


def test_classify_image_equals_in_process_classify(client, served_memory, fmnist_small):
    coat, coat_id = training_image(fmnist_small, "coat", 3)
    r = _classify(client, _png(coat), k=7, rule="rank", return_embedding="true")
    assert r.status_code == 200, r.text
    body = r.json()
    expected = VisualMemory.open(served_memory).classify([coat], k=7)[0]
    assert body["version"] == 1 and body["label_name"] == expected.label_name
    assert [n["id"] for n in body["neighbors"]] == [n.id for n in expected.neighbors]
    assert [n["weight"] for n in body["neighbors"]] == pytest.approx([n.weight for n in expected.neighbors])
    assert body["scores"] == pytest.approx(expected.scores)
    top = body["neighbors"][0]
    assert top["id"] == coat_id and top["similarity"] == pytest.approx(1.0, abs=1e-4) and top["entry_weight"] == 1.0
    assert top["thumbnail_url"] == "/v1/thumbnail?id=coat%2F" + coat_id.split("/")[1]
    assert len(body["embedding"]) == 48
    # The same image as raw bytes, and its embedding as JSON, get the same answer.
    raw = client.post("/v1/classify?k=7", content=_png(coat), headers={"Content-Type": "image/png"}).json()
    by_vector = client.post("/v1/classify?k=7", json={"embedding": body["embedding"]}).json()
    for other in (raw, by_vector):
        assert [n["id"] for n in other["neighbors"]] == [n["id"] for n in body["neighbors"]]
        assert other["label_name"] == body["label_name"]
    # Options as vmem classify takes them: a filter that admits only bags, abstention.
    bags = _classify(client, _png(coat), k=3, filter="label=bag").json()
    assert {n["label_name"] for n in bags["neighbors"]} == {"bag"} and bags["label_name"] == "bag"
    abstained = _classify(client, _png(coat), k=10, abstain_below=1.0).json()
    assert abstained["abstained"] == (abstained["confidence"] < 1.0)


@pytest.mark.parametrize("options, option, words", [
    ({"k": 0}, "k", "k must be an int >= 1, got 0"),
    ({"k": "ten"}, "k", "valid integer"),
    ({"rule": "loudest"}, "rule", "loudest"),
    ({"abstain_below": 1.5}, "abstain_below", "abstain_below must be a probability in [0, 1]"),
    ({"tau": -1}, "tau", "tau"),
    ({"filter": "colour=red"}, "filter", "colour"),
    ({"crowding": "0"}, "crowding", ""),
    ({"rerank_below": 0.3}, "rerank_below", "no re-ranker"),
])
def test_a_bad_option_is_400_naming_it(client, fmnist_small, options, option, words):
    r = _classify(client, _png(training_image(fmnist_small, "bag")[0]), **options)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"] == "bad_option" and body["option"] == option and words in body["reason"]
    assert body["request_id"] == r.headers["x-request-id"]


def test_bad_and_oversized_images(served_memory, fmnist_small):
    from PIL import Image
    with make_client(served_memory, max_upload_bytes=64 * 1024) as client:
        r = _classify(client, b"this is not an image\n")
        assert r.status_code == 422 and r.json()["option"] == "image"
        assert "not_an_image" in r.json()["reason"]  # The decoder's reason.
        truncated = _png(training_image(fmnist_small, "bag")[0])[:60]
        assert _classify(client, truncated).status_code == 422
        big = client.post("/v1/classify", content=b"\x89PNG" + b"\0" * (200 * 1024), headers={"Content-Type": "image/png"})
        assert big.status_code == 413 and big.json()["error"] == "too_large"
        # Over the decoder's pixel limit (the build's): a 10,000 x 10,000 PNG of a few kB.
        buf = io.BytesIO()
        Image.new("1", (10_000, 10_000)).save(buf, format="PNG")
        assert len(buf.getvalue()) < 64 * 1024
        bomb = _classify(client, buf.getvalue())
        assert bomb.status_code == 413 and "too_large" in bomb.json()["reason"], bomb.text
        wrong_dim = client.post("/v1/classify", json={"embedding": [0.1] * 5})
        assert wrong_dim.status_code == 400 and wrong_dim.json()["option"] == "embedding"
        assert "48" in wrong_dim.json()["reason"]
        assert client.post("/v1/classify", content=b"x", headers={"Content-Type": "text/plain"}).status_code == 400
        assert client.post("/v1/classify", files={"photo": ("q.png", b"x", "image/png")}).json()["option"] == "image"


def test_thumbnails_by_id_only(client, fmnist_small):
    _, bag_id = training_image(fmnist_small, "bag", 1)
    r = client.get("/v1/thumbnail", params={"id": bag_id})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content.startswith(b"\x89PNG")
    for bad in ("../../etc/passwd", "/etc/passwd", fmnist_small + "/train/" + bag_id, "bag/nope.png"):
        miss = client.get("/v1/thumbnail", params={"id": bad})
        assert miss.status_code == 404 and miss.json()["error"] == "unknown_id", bad
    assert client.get("/v1/thumbnail").status_code == 400


def test_revote_apply_and_undo(client, served_memory, fmnist_small, caplog):
    _, data, p = flipping_query(client, fmnist_small)
    top = p["neighbors"][0]["id"]
    r = client.post("/v1/revote?k=3", json={"embedding": p["embedding"], "changes": [{"id": top, "weight": 0}]})
    assert r.status_code == 200
    before, after = r.json()["before"], r.json()["after"]
    # Before is the classify answer; after, the excluded neighbour stays listed with weight 0.
    assert [n["id"] for n in before["neighbors"]] == [n["id"] for n in p["neighbors"]]
    assert before["label_name"] == p["label_name"] and before["scores"] == pytest.approx(p["scores"])
    assert after["neighbors"][0]["id"] == top and after["neighbors"][0]["weight"] == 0
    assert after["neighbors"][0]["entry_weight"] == 0 and after["label_name"] != before["label_name"]
    unknown = client.post("/v1/revote", json={"embedding": p["embedding"], "changes": [{"id": "no/such", "weight": 0}]})
    assert unknown.status_code == 404 and "no/such" in unknown.json()["reason"]
    twice = client.post("/v1/revote", json={"embedding": p["embedding"],
                                            "changes": [{"id": top, "weight": 0}, {"id": top, "weight": 1}]})
    assert twice.status_code == 400 and twice.json()["option"] == "changes"

    changes = {"changes": [{"id": top, "weight": 0}], "note": "a <b>mislabelled</b> shirt", "version": 1}
    assert client.post("/v1/apply", json=changes).status_code == 401
    assert client.post("/v1/apply", json=changes, headers={"Authorization": "Bearer " + "x" * 24}).status_code == 401
    bad_note = client.post("/v1/apply", json={**changes, "note": "two\nlines"}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert bad_note.status_code == 400 and bad_note.json()["option"] == "note"
    with caplog.at_level(logging.INFO, logger="visual_memory.serve"):
        applied = client.post("/v1/apply", json=changes, headers={"Authorization": f"Bearer {TOKEN}",
                                                                  "X-Request-ID": "apply-1"})
    assert applied.status_code == 200, applied.text
    assert applied.json()["version"] == 2 and applied.json()["parent"] == 1
    access = [json.loads(r.getMessage()) for r in caplog.records if r.name == "visual_memory.serve.access"]
    assert any(a["request_id"] == "apply-1" and a["path"] == "/v1/apply" and a["status"] == 200
               and a["version"] == 2 and a["ms"] > 0 for a in access)
    # The version is in the history with the note, and the new version decides as the re-vote said.
    record = history(served_memory)[-1]
    assert record["version"] == 2 and record["kind"] == "prune"
    assert record["change"]["note"] == "a <b>mislabelled</b> shirt" and "a <b>mislabelled</b> shirt" in record["summary"]
    now = _classify(client, data, k=3).json()
    assert now["version"] == 2 and now["label_name"] == after["label_name"]
    assert now["scores"] == pytest.approx(after["scores"])
    # Undo: version 3 restores the weights version 2 replaced (none): the decision of version 1 again.
    bad_undo = client.post("/v1/undo", json={"version": 1}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert bad_undo.status_code == 400 and "not a change of entry weights applied from the page" in bad_undo.json()["reason"]
    undone = client.post("/v1/undo", json={"version": 2, "note": "it was a shirt"},
                         headers={"Authorization": f"Bearer {TOKEN}"})
    assert undone.status_code == 200 and undone.json()["version"] == 3, undone.text
    again = _classify(client, data, k=3).json()
    assert again["version"] == 3 and again["label_name"] == before["label_name"]
    assert again["scores"] == pytest.approx(before["scores"])
    assert history(served_memory)[-1]["change"]["note"] == "it was a shirt"
    stale = client.post("/v1/undo", json={"version": 2}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert stale.status_code == 409 and "changed after it" in stale.json()["reason"]


def test_writes_are_disabled_without_a_token(served_memory, fmnist_small):
    _, entry = training_image(fmnist_small, "bag")
    with make_client(served_memory) as client:
        assert client.get("/v1/info").json()["serving"]["write_enabled"] is False
        r = client.post("/v1/apply", json={"changes": [{"id": entry, "weight": 0}]},
                        headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 403 and r.json()["error"] == "writes_disabled"
    assert [h["version"] for h in history(served_memory)] == [1]


def test_new_versions_are_served_without_a_restart(client, served_memory, fmnist_small):
    coat, coat_id = training_image(fmnist_small, "coat", 3)
    assert _classify(client, _png(coat), k=3).json()["neighbors"][0]["id"] == coat_id
    mutations.forget(served_memory, ids=[coat_id])  # Another writer publishes version 2.
    for _ in range(200):
        if client.get("/healthz").json()["version"] == 2:
            break
        import time
        time.sleep(0.05)
    body = _classify(client, _png(coat), k=3).json()
    assert body["version"] == 2 and coat_id not in [n["id"] for n in body["neighbors"]]


def test_a_request_in_flight_finishes_on_its_version(served_memory, fmnist_small):
    coat, coat_id = training_image(fmnist_small, "coat", 3)
    live = LiveMemory(served_memory, refresh_interval_s=10)
    held = live.current  # What a request took when it started.
    mutations.forget(served_memory, ids=[coat_id])
    assert live.refresh().version == 2 and live.current.version == 2
    old = held.memory.classify([coat], k=3, encoder=held.encoder)[0]
    new = live.current.memory.classify([coat], k=3, encoder=live.current.encoder)[0]
    assert held.version == 1 and old.neighbors[0].id == coat_id
    assert coat_id not in [n.id for n in new.neighbors]
    assert live.current.encoder is held.encoder  # Loaded once, reused by the new version.


def test_refresh_keeps_serving_when_the_new_version_cannot_be_opened(served_memory, fmnist_small, caplog):
    live = LiveMemory(served_memory, refresh_interval_s=0.05)
    _, bag_id = training_image(fmnist_small, "bag")
    m = mutations.forget(served_memory, ids=[bag_id])
    # The new version's tombstone file is damaged: its open fails, version 1 goes on answering.
    import os
    with open(os.path.join(served_memory, m.forgotten.path), "wb") as f:
        f.write(b"damaged")
    with pytest.raises(Exception, match="tombstone|checksum|sha256"):
        live.refresh()
    assert live.current.version == 1
    assert np.isfinite(live.current.memory.classify(np.ones((1, 48), np.float32), k=1)[0].neighbors[0].distance)


def test_bad_bodies_and_request_ids(client, fmnist_small):
    _, bag_id = training_image(fmnist_small, "bag")
    nan = client.post("/v1/revote", content=b'{"embedding": [NaN], "changes": []}',
                      headers={"Content-Type": "application/json"})
    assert nan.status_code == 400 and nan.json()["option"] == "embedding" and "finite" in nan.json()["reason"]
    negative = client.post("/v1/revote", json={"embedding": [0.1] * 48, "changes": [{"id": bag_id, "weight": -1}]})
    assert negative.status_code == 400 and negative.json()["option"] == "weight"
    many = client.post("/v1/apply", json={"changes": [{"id": f"e{i}", "weight": 0} for i in range(1001)]},
                       headers={"Authorization": f"Bearer {TOKEN}"})
    assert many.status_code == 400 and many.json()["option"] == "changes"
    assert client.post("/v1/revote", content=b"{not json", headers={"Content-Type": "application/json"}).status_code == 400
    hostile = client.get("/healthz", headers={"X-Request-ID": "<script>alert(1)</script>"})
    assert hostile.headers["x-request-id"] != "<script>alert(1)</script>" and len(hostile.headers["x-request-id"]) == 32
    with pytest.raises(ValueError, match="refresh_interval_s must be > 0"):
        LiveMemory("unused", refresh_interval_s=0)


def test_a_memory_without_an_encoder_answers_embeddings_only(tmp_path):
    from evaluation.benchmarks.bench_serve import synthetic_memory
    root = str(tmp_path / "synthetic")
    queries = synthetic_memory(root, entries=50, dim=8)
    with make_client(root) as client:
        r = client.post("/v1/classify?k=3", json={"embedding": queries[0].tolist()})
        assert r.status_code == 200 and len(r.json()["neighbors"]) == 3
        image = client.post("/v1/classify", content=b"\x89PNG", headers={"Content-Type": "image/png"})
        assert image.status_code == 400 and image.json()["error"] == "no_encoder"
        assert client.get("/v1/info").json()["serving"]["image_queries"] is False


def test_the_rerank_gate_as_vmem_classify_takes_it(served_memory, fmnist_small, monkeypatch):
    from memory.rerank import RerankFlags, RerankSpec
    from tests import fake_reranker
    fake_reranker.registered(monkeypatch)
    coat, _ = training_image(fmnist_small, "coat", 3)
    with make_client(served_memory, rerank=RerankSpec.from_flags("last", "x", RerankFlags())) as client:
        assert client.get("/v1/info").json()["serving"]["rerank"] == "last:x"
        plain = _classify(client, _png(coat), k=5).json()  # No gate asked, none configured: the vote.
        assert plain["rerank_reason"] == "" and plain["label_name"] == plain["vote_label_name"]
        gated = _classify(client, _png(coat), k=5, rerank_below=1.01).json()
        assert gated["rerank_reason"] == "answered"
        expected = VisualMemory.open(served_memory).classify([coat], k=5, rerank=fake_reranker.make_reranker("x"),
                                                              rerank_below=1.01)[0]
        assert gated["label_name"] == expected.label_name and gated["vote_label_name"] == expected.vote_label_name
        bad = _classify(client, _png(coat), k=5, rerank_below=1.01, rerank_top_n=1)
        assert bad.status_code == 400 and bad.json()["option"] == "rerank_top_n"
