"""Raw-pixel kNN baseline: what a memory would score without a learned encoder.

Pure numpy. Images are reduced to ``size x size`` greyscale, mean-centred and L2-normalised, and each query
is classified by its exact cosine neighbours with the same voting code as the memory, so the comparison
isolates the encoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from memory.decide.voting import VotingRule, predict_all_k


def pixel_features(images: list[np.ndarray], *, size: int = 28) -> np.ndarray:
    """uint8 HxWx3 (or HxW) images -> float32 [n, size*size] unit vectors of centred grey pixels."""
    from PIL import Image  # Pillow: already the project's decoder.
    feats = np.empty((len(images), size * size), np.float32)
    for i, image in enumerate(images):
        grey = Image.fromarray(np.asarray(image, np.uint8)).convert("L").resize((size, size), Image.BILINEAR)
        feats[i] = np.asarray(grey, np.float32).reshape(-1) / 255.0
    feats -= feats.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    return feats / np.maximum(norms, 1e-12)


def exact_knn(db: np.ndarray, queries: np.ndarray, k: int, *, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by cosine distance (blocked matmul + argpartition); returns (indices, distances)."""
    k = min(k, db.shape[0])
    idx_out = np.empty((queries.shape[0], k), np.int64)
    dist_out = np.empty((queries.shape[0], k), np.float32)
    for start in range(0, queries.shape[0], block):
        d = 1.0 - queries[start:start + block] @ db.T
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(d, part, axis=1), axis=1, kind="stable")
        idx = np.take_along_axis(part, order, axis=1)
        idx_out[start:start + block] = idx
        dist_out[start:start + block] = np.take_along_axis(d, idx, axis=1)
    return idx_out, dist_out


def pixel_knn_baseline(memory_images: list[np.ndarray], memory_labels: np.ndarray, query_images: list[np.ndarray],
                       query_labels: np.ndarray, *, k: int = 10, size: int = 28) -> dict[str, float]:
    """Accuracy of raw-pixel kNN: 1-NN and RankVoting at k (labels are class indices)."""
    db = pixel_features(memory_images, size=size)
    q = pixel_features(query_images, size=size)
    idx, dist = exact_knn(db, q, k)
    labels = np.asarray(memory_labels)[idx]
    preds = predict_all_k(labels, dist, rules=[VotingRule.RANK], k_max=idx.shape[1])[VotingRule.RANK]
    true = np.asarray(query_labels)
    return {"pixel 1-NN": float(np.mean(labels[:, 0] == true)),
            f"pixel kNN rank@{idx.shape[1]}": float(np.mean(preds[:, -1] == true))}


def _load_pixels(uris: Sequence[str]) -> list[np.ndarray]:
    from encoders.preprocess import decode_image  # pylint: disable=g-import-not-at-top
    from memory import storage  # pylint: disable=g-import-not-at-top
    return [decode_image(storage.read_bytes(u)) for u in uris]


def memory_pixel_baseline(root: str, manifest, query_uris: Sequence[str], query_labels: np.ndarray,
                   *, k: int) -> dict[str, float]:
    """Raw-pixel kNN over the memory's own source images (for the demo's comparison)."""
    from memory import storage  # pylint: disable=g-import-not-at-top
    from memory.store.shard import read_shard_data  # pylint: disable=g-import-not-at-top
    from memory.search.shard_search import load_forgotten, searchable_shards  # pylint: disable=g-import-not-at-top
    forgotten = load_forgotten(root, manifest)
    uris, labels = [], []
    for info in searchable_shards(manifest):
        data = read_shard_data(storage.join(root, info.path), info)
        live = ~np.isin(data.ids.astype(str), forgotten)  # The baseline sees exactly the live memory.
        uris += [str(u) for u in data.uris[live]]
        labels.append(data.labels[live])
    return pixel_knn_baseline(_load_pixels(uris), np.concatenate(labels), _load_pixels(query_uris), query_labels,
                              k=k)
