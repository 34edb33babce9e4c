"""Image queries and classification: what ``VisualMemory.embed_images`` and ``VisualMemory.classify`` run.

Classification = search (optionally filtered and crowded, memory.search.filters) + vote + explanation
(memory.decide.explain) + confidence (memory.decide.confidence), then two optional second steps: abstention below a
confidence, and re-ranking of low-margin votes by a second opinion (memory.rerank.base).
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from memory import storage
from memory.decide.confidence import memory_calibration, vote_confidence
from memory.decide.explain import Prediction, explain
from memory.search.filters import Crowding, QueryFilter
from memory.rerank.base import (Reranker, RerankReason, ResponseCache, check_top_n, gate, make_request,
                                rerank_cached)
from memory.vectors import l2_normalize
from memory.decide.voting import VotingParams, VotingRule

if TYPE_CHECKING:
    from encoders.base import Encoder, PreprocessSpec
    from memory.visual_memory import VisualMemory

# Images embedded per encoder call: bounds the float32 pixel batch held in memory.
_EMBED_BATCH = 32


def _preprocess_spec(memory: VisualMemory) -> PreprocessSpec:
    from encoders.base import EncoderError, PreprocessSpec
    raw = memory.manifest.encoder.get("preprocess")
    try:
        return PreprocessSpec.from_dict(raw)
    except (EncoderError, TypeError) as e:
        raise ValueError(f"the manifest of {memory.root} has an unusable encoder preprocess spec {raw!r} "
                         f"({e}); query with vectors embedded by the memory's encoder instead") from None


def embed_images(memory: VisualMemory, images: Sequence[Any], *, encoder: Encoder | None = None) -> np.ndarray:
    """See `VisualMemory.embed_images`."""
    from encoders.preprocess import ImageDecodeError, decode_and_preprocess, preprocess
    spec = _preprocess_spec(memory)
    pixels = []
    # Every image is decoded before the encoder loads, so a bad query fails in milliseconds, not after
    # the seconds a model load takes.
    for i, item in enumerate(images):
        where = f"query {i}"
        try:
            if isinstance(item, (bytes, bytearray, memoryview)):
                where += f" ({len(item)} bytes)"
                pixels.append(decode_and_preprocess(bytes(item), spec))
            elif isinstance(item, (str, os.PathLike)):
                path = os.fspath(item)
                where += f" ({path!r})"
                local = path[len("file://"):] if path.startswith("file://") else path
                try:
                    data = storage.read_bytes(local)
                except IsADirectoryError:
                    raise FileNotFoundError(f"{where}: {path!r} is a directory, not an image file") from None
                except FileNotFoundError:
                    raise FileNotFoundError(f"{where}: no such image file {path!r}") from None
                pixels.append(decode_and_preprocess(data, spec))
            elif isinstance(item, np.ndarray):
                where += f" (array {item.dtype} {item.shape})"
                pixels.append(preprocess(item, spec))
            else:
                raise ValueError(
                    f"{where}: unsupported query of type {type(item).__name__}; pass encoded image bytes, a "
                    "file path or a uint8 [H, W, 3] array (or a float [n, dim] array of embeddings)")
        except ImageDecodeError as e:
            raise ValueError(f"cannot read {where} as an image: {e}") from None
    if not pixels:
        return np.zeros((0, memory.dim), np.float32)
    model = memory.query_encoder(encoder)
    features = [model.embed(np.stack(pixels[s:s + _EMBED_BATCH])) for s in range(0, len(pixels), _EMBED_BATCH)]
    return l2_normalize(np.concatenate(features))



def _image_bytes(item: Any) -> tuple[str, bytes | None]:
    """(uri, encoded bytes) of one image query, for a re-ranker (arrays are PNG-encoded)."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return "", bytes(item)
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item), None  # Read by the re-ranker from its uri.
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        from PIL import Image  # pylint: disable=g-import-not-at-top
        buf = io.BytesIO()
        Image.fromarray(item).save(buf, format="PNG")
        return "", buf.getvalue()
    return "", None


def check_abstain_below(abstain_below: Any) -> None:
    if abstain_below is not None and not (isinstance(abstain_below, (int, float, np.floating))
                                          and not isinstance(abstain_below, bool)
                                          and 0.0 <= float(abstain_below) <= 1.0):
        raise ValueError(f"abstain_below must be a probability in [0, 1] (e.g. 0.8) or None, got {abstain_below!r}")


def classify(memory: VisualMemory, queries: np.ndarray | Sequence[Any], *, rule: VotingRule | str, k: int,
             params: VotingParams, encoder: Encoder | None, abstain_below: float | None,
             filters: QueryFilter | Sequence[QueryFilter | None] | None, crowding: Crowding | None,
             rerank: Reranker | None, rerank_below: float | None, rerank_top_n: int,
             rerank_cache: ResponseCache | None) -> list[Prediction]:
    """See `VisualMemory.classify`."""
    rule = VotingRule.parse(rule)
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    check_abstain_below(abstain_below)
    if rerank is not None:
        check_top_n(rerank_top_n)
        if rerank_below is None:
            raise ValueError("rerank needs rerank_below (the vote margin under which a query is sent, e.g. 0.3; "
                             "use 1.01 to send every query)")
    gate(np.zeros(0), rerank_below)  # Validates the number.
    calibration = memory_calibration(memory.manifest)
    items: list[Any] | None = None
    if isinstance(queries, np.ndarray) and queries.dtype.kind == "f":
        vectors = queries
    elif isinstance(queries, np.ndarray) and queries.dtype == np.uint8 and queries.ndim == 4:
        items = list(queries)
        vectors = embed_images(memory, items, encoder=encoder)
    elif isinstance(queries, (np.ndarray, str, bytes, bytearray, os.PathLike)):
        raise ValueError(
            f"queries must be a float [n, {memory.dim}] array of embeddings or a list of images, got "
            f"{type(queries).__name__}"
            + (f" {queries.dtype} {queries.shape}" if isinstance(queries, np.ndarray) else "")
            + "; wrap a single image in a list: classify([image])")
    else:
        items = list(queries)
        vectors = embed_images(memory, items, encoder=encoder)
    if vectors.ndim == 2 and vectors.shape[0] == 0:
        return []
    fetch = max(int(k), int(rerank_top_n)) if rerank is not None else int(k)
    result = memory.search(vectors, fetch, filters=filters, crowding=crowding)
    uris = memory.uris_of_results(result.ids)
    names = memory.label_names(result.labels)
    # Soft-pruning weights, when the memory has them, multiply each neighbour's vote.
    predictions = [explain(result.ids[q, :k], result.labels[q, :k], result.distances[q, :k], rule=rule, k=int(k),
                           params=params, class_names=memory.class_names, uris=uris[q, :k],
                           entry_weights=None if result.weights is None else result.weights[q, :k])
                   for q in range(result.ids.shape[0])]
    kk = min(int(k), result.labels.shape[1])
    vc = vote_confidence(result.labels[:, :kk], result.distances[:, :kk], rule=rule, k=kk, params=params,
                         entry_weights=None if result.weights is None else result.weights[:, :kk])
    calibrated = calibration is not None and calibration.matches(rule, k, params)
    confidence = calibration.confidence(vc) if calibrated else vc.share
    how = calibration.describe() if calibrated else (
        "raw share of the winner's score; uncalibrated" + (
            "" if calibration is None else f" (the memory's calibration is for rule {calibration.rule.value}, "
                                           f"k {calibration.k})"))
    send = gate(vc.margin, rerank_below) if rerank is not None else np.zeros(len(predictions), dtype=bool)
    out = []
    for q, (p, c) in enumerate(zip(predictions, confidence.tolist())):
        fields: dict[str, Any] = dict(confidence=float(c), calibrated=calibrated)
        answered = False
        if rerank is not None:
            outcome = None
            if send[q]:
                uri, data = _image_bytes(items[q]) if items is not None else ("", None)
                request = make_request(str(q), uri, names[q], uris[q], result.distances[q],
                                       vote_label=p.label_name, margin=float(vc.margin[q]), top_n=rerank_top_n,
                                       query_image=data)
                outcome = rerank_cached(rerank, request, rerank_cache)
            reason = RerankReason.NOT_GATED if outcome is None else outcome.reason
            fields.update(rerank_reason=reason, rerank_calls=0 if outcome is None else outcome.calls,
                          rerank_detail="" if outcome is None else outcome.detail)
            answered = outcome is not None and outcome.reranked
            if answered and outcome.label != p.label_name:
                fields.update(label=memory.class_names.index(outcome.label), label_name=outcome.label,
                              reason=f"re-ranked by {rerank.name} (vote said {p.label_name!r}, margin "
                                     f"{float(vc.margin[q]):.3f} < {float(rerank_below):g})")
        # A re-ranker's answer is the decision; abstention applies to the vote alone.
        if abstain_below is not None and c < abstain_below and not answered:
            fields.update(label=-1, label_name="unknown", abstained=True,
                          reason=f"confidence {c:.3f} < {float(abstain_below):g} ({how})")
        out.append(dataclasses.replace(p, **fields))
    return out
