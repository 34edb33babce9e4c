"""memory.rerank.second_opinion.EncoderReranker: re-scoring candidates with a second encoder (a colour-mean fake here;
the bundled EfficientNet-Lite1 in the slow end-to-end test and the demo measurement)."""

from __future__ import annotations

import pickle

import pytest
from PIL import Image

from encoders.base import PreprocessSpec
from memory.rerank import base as rerank
from memory.rerank.second_opinion import EncoderReranker


class MeanColour:
    """A stand-in second encoder: the mean RGB of the (preprocessed) image, so red and blue are orthogonal."""
    preprocess_spec = PreprocessSpec(image_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    def __init__(self):
        self.calls = 0

    def embed(self, x):
        self.calls += 1
        return x.mean(axis=(1, 2))


def _png(path, rgb):
    Image.new("RGB", (16, 16), rgb).save(path)
    return str(path)


@pytest.fixture
def request_(tmp_path):
    red, blue = (255, 0, 0), (0, 0, 255)
    uris = [_png(tmp_path / f"{i}.png", c) for i, c in enumerate([blue, blue, red, red])]
    # The memory's own order says B, B, A, A; the query is red.
    return rerank.make_request("q", _png(tmp_path / "q.png", red), ["B", "B", "A", "A"], uris,
                               [0.10, 0.12, 0.30, 0.32], vote_label="B", margin=0.1, top_n=4)


def test_second_encoder_order_decides_with_full_weight(request_):
    enc = MeanColour()
    out = EncoderReranker(weight=1.0, loaded=enc).rerank(request_)
    assert out == rerank.RerankOutcome("A", rerank.RerankReason.ANSWERED, calls=1)
    # Weight 0 is the memory's own order: a rank vote over the four, B.
    assert EncoderReranker(weight=0.0, loaded=MeanColour()).rerank(request_).label == "B"


def test_embeddings_are_cached_and_prefetched_in_batches(request_, tmp_path):
    enc = MeanColour()
    r = EncoderReranker(loaded=enc)
    r.prefetch([request_, request_])
    assert enc.calls == 1 and r.images_embedded == 5  # The query and four candidate files, once, one batch.
    r.rerank(request_)
    assert enc.calls == 1 and r.images_embedded == 5  # All cached: no second embedding.


def test_unreadable_query_falls_back(request_, tmp_path):
    bad = rerank.make_request("q", str(tmp_path / "missing.png"), ["B", "A"], [c.uri for c in request_.candidates[1:3]],
                              [0.1, 0.2], vote_label="B", margin=0.0, top_n=2)
    out = EncoderReranker(loaded=MeanColour()).rerank(bad)
    assert (out.reason, out.label) == (rerank.RerankReason.NO_IMAGE, "B")


def test_pickles_without_the_model(request_):
    r = EncoderReranker(loaded=MeanColour())
    r.rerank(request_)
    clone = pickle.loads(pickle.dumps(r))
    assert clone._encoder is None and clone.name == "encoder:efficientnet-lite1" and not clone._cache
    with pytest.raises(ValueError, match=r"weight must be in \[0, 1\]"):
        EncoderReranker(weight=2)
