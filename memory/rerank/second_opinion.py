"""An offline second opinion: a second image encoder re-scores a low-margin query's top-N neighbours.

`EncoderReranker` implements `memory.rerank.base.Reranker` without any service: the query and its N candidates
are embedded by another encoder (by default the bundled EfficientNet-Lite1, a different network from the
memory's Lite0), each candidate's score becomes ``weight * cos_second + (1 - weight) * cos_memory``, the
candidates are re-ordered by it and vote with RankVoting over all N. Its answer is one of the candidate
labels by construction. Images come from the candidates' recorded uris (and the query's uri or bytes);
their embeddings are kept in a bounded cache, since the same memory entries recur among many queries'
neighbours. `prefetch` embeds a whole batch's missing images in encoder-sized batches (the Beam stage
calls it per bundle).
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Sequence

import numpy as np

from memory.rerank import RerankFlags
from memory.rerank.base import RerankOutcome, RerankReason, RerankRequest, read_image_bytes
from memory.vectors import l2_normalize
from memory.decide.voting import VotingParams, VotingRule, vote

DEFAULT_ENCODER = "efficientnet-lite1"
_BATCH = 32


class EncoderReranker:
    """Second-opinion re-ranking by a bundled encoder (see the module docstring).

    Args:
      encoder: A bundled encoder name (encoders.bundled.VARIANTS).
      weight: Share of the second encoder's similarity in the candidates' new score, in [0, 1]
        (1 = its order alone; 0 = the memory's own order, i.e. a rank vote over N).
      cache_size: Image embeddings kept (by uri).
      loaded: An already loaded encoder (tests), instead of loading ``encoder``.
    """

    def __init__(self, encoder: str = DEFAULT_ENCODER, *, weight: float = 0.5, cache_size: int = 200_000,
                 params: VotingParams = VotingParams(), loaded: Any = None):
        if not 0.0 <= float(weight) <= 1.0:
            raise ValueError(f"second-opinion weight must be in [0, 1], got {weight!r}")
        self.encoder_name = encoder
        self.weight = float(weight)
        self.params = params
        self.name = f"encoder:{encoder}" + ("" if self.weight == 0.5 else f"@w={self.weight:g}")
        self._cache_size = int(cache_size)
        self._encoder = loaded
        self._spec = None
        self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.images_embedded = 0

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_encoder=None, _spec=None, _cache=collections.OrderedDict(), _lock=None, images_embedded=0)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _model(self):
        with self._lock:
            if self._encoder is None:
                from encoders.base import EncoderKind, EncoderSpec  # pylint: disable=g-import-not-at-top
                from encoders.loaders import load_encoder  # pylint: disable=g-import-not-at-top  # TensorFlow.
                self._encoder = load_encoder(EncoderSpec(EncoderKind.BUNDLED, self.encoder_name))
            if self._spec is None:
                self._spec = self._encoder.preprocess_spec
            return self._encoder, self._spec

    def _embed(self, items: Sequence[tuple[str, bytes | None]]) -> None:
        """Embeds the (key, bytes) images not cached yet; unreadable ones cache as None."""
        from encoders.preprocess import ImageDecodeError, decode_and_preprocess  # pylint: disable=g-import-not-at-top
        model, spec = self._model()
        todo = [(key, data) for key, data in items if key not in self._cache]
        pixels, keys = [], []
        for key, data in todo:
            try:
                pixels.append(decode_and_preprocess(data, spec) if data is not None else None)
            except ImageDecodeError:
                pixels.append(None)
            keys.append(key)
        ok = [i for i, p in enumerate(pixels) if p is not None]
        vectors: dict[str, np.ndarray | None] = {keys[i]: None for i in range(len(keys)) if pixels[i] is None}
        for s in range(0, len(ok), _BATCH):
            rows = ok[s:s + _BATCH]
            emb = l2_normalize(model.embed(np.stack([pixels[i] for i in rows])))
            self.images_embedded += len(rows)
            vectors.update({keys[i]: e for i, e in zip(rows, emb)})
        with self._lock:
            self._cache.update(vectors)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    @staticmethod
    def _query_key(request: RerankRequest) -> str:
        import hashlib  # pylint: disable=g-import-not-at-top
        if request.query_image is not None:
            return "bytes:" + hashlib.sha256(request.query_image).hexdigest()
        return request.query_uri

    def prefetch(self, requests: Sequence[RerankRequest]) -> None:
        """Embeds every image the requests need that is not cached, in encoder-sized batches; each distinct
        image is read once (the same memory entries recur among many queries' candidates)."""
        need: dict[str, bytes | None] = {}
        for r in requests:
            key = self._query_key(r)
            if key and key not in self._cache and key not in need:
                need[key] = r.query_image if r.query_image is not None else read_image_bytes(r.query_uri)
            for c in r.candidates:
                if c.uri and c.uri not in self._cache and c.uri not in need:
                    need[c.uri] = read_image_bytes(c.uri)
        if need:
            self._embed(list(need.items()))

    def rerank(self, request: RerankRequest) -> RerankOutcome:
        self.prefetch([request])
        q = self._cache.get(self._query_key(request))
        if q is None:
            return RerankOutcome(request.vote_label, RerankReason.NO_IMAGE, detail="query image unreadable: "
                                 f"{request.query_uri or '<bytes>'}")
        cands = [(c, self._cache.get(c.uri)) for c in request.candidates]
        cands = [(c, e) for c, e in cands if e is not None]
        if not cands:
            return RerankOutcome(request.vote_label, RerankReason.NO_IMAGE, detail="no candidate image is readable")
        second = np.asarray([float(e @ q) for _, e in cands])
        first = np.asarray([1.0 - c.distance for c, _ in cands])
        score = self.weight * second + (1.0 - self.weight) * first
        order = np.argsort(-score, kind="stable")
        labels = [cands[i][0].label for i in order]
        names = list(dict.fromkeys(labels))
        idx = np.asarray([[names.index(label) for label in labels]], dtype=np.int64)
        # The vote wants distances nearest first; RankVoting uses only the order.
        dist = np.asarray([1.0 - score[order]], dtype=np.float32)
        winner = int(vote(idx, dist, rule=VotingRule.RANK, k=idx.shape[1], params=self.params).labels[0])
        return RerankOutcome(names[winner], RerankReason.ANSWERED, calls=1)


def make_reranker(name: str, **options: Any) -> EncoderReranker:
    """The re-ranker of ``--rerank encoder:NAME`` (registered in `memory.rerank`)."""
    return EncoderReranker(name, **options)


def spec_options(flags: RerankFlags) -> dict[str, Any]:
    """`EncoderReranker` options from the shared re-rank flags: the second encoder's weight."""
    return dict(weight=flags.weight)
