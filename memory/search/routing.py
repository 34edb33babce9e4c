"""Partition-routed shards: a global coarse quantizer decides which shard holds an entry and which shards a
query visits. Pure numpy, no Beam.

With hash sharding (memory.store.sharding) every query must visit every shard, and each ScaNN searcher has a
fixed cost per query (tree centroids, AH lookup tables, re-ranking) that does not shrink with the shard:
measured on 1M x 256 clustered vectors, 4 hash shards searched one after another answered 55% slower than
one unsharded index at recall@10 0.95 (README, "Search benchmark").

A :class:`Router` fixes that the way inverted-file indexes are distributed (faiss ``IndexIVF`` with its
inverted lists split over machines; ScaNN's own tree is one level of the same idea): spherical k-means
centroids are trained once on a sample of the memory; every centroid is *owned* by one main shard (centroids
are grouped into spatially coherent shards of near-equal size); an entry lives in the shard owning its
nearest centroid; a query visits only the shards owning one of its ``probes`` nearest centroids. Most
queries then pay one or two searchers' fixed cost instead of ``num_shards``, and a shard holds one region
of the embedding space, so its own ScaNN tree is finer there.

Routing is approximate like any partition probe: a true neighbour in a shard that owns none of the query's
``probes`` nearest centroids is missed. ``probes`` is the recall knob (measured coverage is in the README).
Delta shards (entries added since the last re-index) are not routed: every query searches them exactly.

Entries are assigned once, at build time, from their embedding; a re-index keeps every main row in the
shard it is in and routes only folded delta rows, so assignment never depends on floating-point ties
being recomputed identically.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import math
from typing import Sequence

import numpy as np

from memory import storage
from memory.store.manifest import Manifest, ManifestError, RouterRef, read_checked_file, sha256_checksum

__all__ = ["ROUTER_DIR", "Router", "RouterConfig", "check_route_ratio", "group_centroids", "read_router",
           "router_sample_key", "select_sample_rows", "spherical_kmeans", "train_router", "write_router"]

ROUTER_DIR = "router"

# Rows scored against the centroids per matmul: bounds the [block, C] float32 score matrix (64 MB at C=1024).
_ASSIGN_BLOCK = 16_384
# A shard may exceed the mean size by this factor before centroids spill to their next-nearest shard group.
_BALANCE_SLACK = 1.05


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """How a partition-routed memory trains its router.

    Attributes:
      num_centroids: Coarse centroids (upper bound): at most one per 32 sample points and at least one per
        shard are used. Finer centroids draw finer shard boundaries, so one probe covers more of a query's
        neighbours (1M x 256 structured benchmark set, 4 shards, one probe: 0.930 of the true top-10 in the
        routed shard with 256 centroids, 0.995 with 1,024), at a routing cost of a [C x d] matmul and a
        top-``probes`` selection per query (1,000 256-d queries: 3.5 ms at C=256, 12 ms at C=1,024).
      training_sample_size: Entries the centroids are trained on, chosen by a stable hash of the id (the
        same entries on every run and runner).
      iterations: Spherical k-means iterations.
      probes: Default number of nearest centroids whose shards a query visits (override per search with
        ``VisualMemory.with_search_params(route_probes=...)``).
      seed: Seed of the k-means initialisation.
    """
    num_centroids: int = 1024
    training_sample_size: int = 50_000
    iterations: int = 10
    probes: int = 8
    seed: int = 0

    def __post_init__(self):
        for field in ("num_centroids", "training_sample_size", "iterations", "probes"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RouterConfig.{field} must be an int >= 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"RouterConfig.seed must be an int >= 0, got {self.seed!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RouterConfig:
        return cls(**d)


def router_sample_key(entry_id: str) -> bytes:
    """Sort key of an entry for the router's training sample: the smallest keys are sampled.

    A digest (not Python's salted ``hash``) so that the local build and every Beam worker pick the same
    entries; Beam takes them with ``Top.Smallest(n, key=router_sample_key)``.
    """
    return hashlib.blake2b(entry_id.encode("utf-8"), digest_size=16, person=b"vmem-router").digest()


def select_sample_rows(ids: Sequence[str], size: int) -> np.ndarray:
    """Row indices of the ``size`` entries with the smallest `router_sample_key`, in key order."""
    keys = [router_sample_key(i) for i in ids]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return np.asarray(order[:size], dtype=np.int64)


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    out = np.empty(x.shape[0], dtype=np.int64)
    for start in range(0, x.shape[0], _ASSIGN_BLOCK):
        out[start:start + _ASSIGN_BLOCK] = np.argmax(x[start:start + _ASSIGN_BLOCK] @ centroids.T, axis=1)
    return out


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def spherical_kmeans(x: np.ndarray, k: int, *, iterations: int, seed: int,
                     weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm k-means by cosine similarity (Lloyd iterations, k-means++-free random init).

    Args:
      x: [n, d] unit vectors, n >= k.
      k: Number of centroids.
      iterations: Lloyd iterations.
      seed: Initialisation seed (k distinct rows of x).
      weights: Optional [n] non-negative point weights.

    Returns:
      (centroids float32 [k, d] unit norm, assignment int64 [n] of x to them after the last update).
      An emptied centroid is re-seeded on the point farthest from its own centroid, so k stays k.
    """
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"spherical_kmeans needs 1 <= k <= n points, got k={k}, n={n}")
    w = np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32)
    rng = np.random.default_rng(seed)
    centroids = x[np.sort(rng.choice(n, size=k, replace=False))].copy()
    assign = _nearest(x, centroids)
    for _ in range(iterations):
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, x * w[:, None])
        counts = np.bincount(assign, weights=w, minlength=k)
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            sim = np.einsum("nd,nd->n", x, centroids[assign])
            sums[empty] = x[np.argsort(sim, kind="stable")[:empty.size]]
        centroids = _normalize_rows(sums)
        assign = _nearest(x, centroids)
    return centroids, assign


def group_centroids(centroids: np.ndarray, sizes: np.ndarray, num_shards: int, *, seed: int,
                    iterations: int = 20) -> np.ndarray:
    """Assigns each centroid to a shard: spatially coherent groups of near-equal total size.

    Groups are a size-weighted spherical k-means of the centroids; then centroids are placed greedily, most
    decided first (largest margin between their best and second-best group), into their most similar group
    that still has room (capacity 1.05 x the mean shard size), so one dense region cannot make one shard
    hold most of the memory.

    Returns:
      int32 [C] owner shard of each centroid.
    """
    c = centroids.shape[0]
    sizes = np.asarray(sizes, dtype=np.float64)
    if num_shards == 1:
        return np.zeros(c, np.int32)
    groups, _ = spherical_kmeans(centroids, num_shards, iterations=iterations, seed=seed,
                                 weights=np.maximum(sizes, 1e-3))
    sim = centroids @ groups.T
    ranked = np.sort(sim, axis=1)
    margin = ranked[:, -1] - ranked[:, -2]
    capacity = _BALANCE_SLACK * sizes.sum() / num_shards
    owners = np.full(c, -1, np.int32)
    load = np.zeros(num_shards)
    for j in np.argsort(-margin, kind="stable"):
        for s in np.argsort(-sim[j], kind="stable"):
            if load[s] + sizes[j] <= capacity:
                break
        else:
            s = int(np.argmin(load))
        owners[j] = s
        load[s] += sizes[j]
    return owners


@dataclasses.dataclass(frozen=True, eq=False)
class Router:
    """Coarse centroids and the main shard owning each.

    Attributes:
      centroids: float32 [C, d] unit vectors.
      owners: int32 [C] main shard index of each centroid, in [0, num_shards).
      num_shards: Main shards of the memory.
      probes: Default nearest centroids per query whose owners are searched.
    """
    centroids: np.ndarray
    owners: np.ndarray
    num_shards: int
    probes: int

    def __post_init__(self):
        c = self.centroids
        if c.ndim != 2 or c.shape[0] < 1 or self.owners.shape != (c.shape[0],):
            raise ValueError(f"router: centroids {c.shape} and owners {self.owners.shape} must be [C, d] and [C]")
        if self.num_shards < 1 or self.owners.min() < 0 or self.owners.max() >= self.num_shards:
            raise ValueError(f"router: owners must lie in [0, {self.num_shards}), got "
                             f"[{self.owners.min()}, {self.owners.max()}]")
        if self.probes < 1:
            raise ValueError(f"router: probes must be >= 1, got {self.probes}")

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    def assign(self, embeddings: np.ndarray) -> np.ndarray:
        """int64 [n] main shard of each (unit) embedding: the owner of its nearest centroid."""
        x = np.asarray(embeddings, dtype=np.float32).reshape(-1, self.dim)
        return self.owners[_nearest(x, self.centroids)].astype(np.int64)

    def route(self, queries: np.ndarray, probes: int | None = None, *, ratio: float | None = None) -> np.ndarray:
        """bool [nq, num_shards]: the main shards each query visits.

        By default a query visits the shards owning any of its ``probes`` nearest centroids. With ``ratio``
        (distance-ratio routing; ``probes`` is then ignored) it visits every shard whose nearest owned centroid
        is at most ``ratio`` times as far (cosine distance) as the query's nearest centroid overall: a query
        deep inside one shard's region visits that shard alone, one on a boundary or far from every centroid
        visits each shard that could hold its neighbours. Measured on the 1M x 256 structured benchmark
        memory (4 shards, 1,024 centroids, 10,000 queries): probes 8 put 0.9997 of the true top-10 in the
        visited shards at 3.45 shards per query, ratio 1.1 put 0.9996 there at 1.02 and ratio 1.15 0.9999 at
        1.04 (README, "Search benchmark"). ``ratio=1`` visits the nearest centroid's shard only (probes 1).
        """
        q = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        nq, c = q.shape[0], self.centroids.shape[0]
        routed = np.zeros((nq, self.num_shards), dtype=bool)
        if ratio is not None:
            check_route_ratio(ratio)
            if nq:
                grouped, owners, bounds = self._owner_groups
                sims = _normalize_rows(q) @ grouped.T  # Distances, unlike nearest-centroid ranks, need unit queries.
                # Each shard's best centroid similarity, then the shards within the distance ratio of the best.
                dist = np.float32(1.0) - np.stack([sims[:, a:b].max(axis=1) for a, b in zip(bounds, bounds[1:])],
                                                  axis=1)
                routed[:, owners] = dist <= np.float32(ratio) * dist.min(axis=1, keepdims=True)
            return routed
        p = self.probes if probes is None else probes
        if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 1:
            raise ValueError(f"route probes must be an int >= 1, got {p!r}")
        if not nq:
            return routed
        if p >= c:
            routed[:, np.unique(self.owners)] = True
        elif p == 1:  # argmax is ~20x cheaper than argpartition over [nq, C].
            routed[np.arange(nq), self.owners[np.argmax(q @ self.centroids.T, axis=1)]] = True
        else:
            top = np.argpartition(-(q @ self.centroids.T), p - 1, axis=1)[:, :p]
            routed[np.arange(nq)[:, None], self.owners[top]] = True
        return routed

    @functools.cached_property
    def _owner_groups(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(centroids grouped by owner, the owner of each group, group bounds) for per-shard maxima."""
        order = np.argsort(self.owners, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(self.owners[order]) != 0])
        return (np.ascontiguousarray(self.centroids[order]), self.owners[order[starts]],
                [*starts.tolist(), int(order.size)])

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, centroids=self.centroids.astype(np.float32), owners=self.owners.astype(np.int32),
                 num_shards=np.int64(self.num_shards), probes=np.int64(self.probes))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> Router:
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            return cls(centroids=z["centroids"].astype(np.float32), owners=z["owners"].astype(np.int32),
                       num_shards=int(z["num_shards"]), probes=int(z["probes"]))


def train_router(sample: np.ndarray, *, num_shards: int, config: RouterConfig = RouterConfig()) -> Router:
    """Trains centroids on ``sample`` (unit vectors) and groups them into ``num_shards`` shards.

    Uses min(config.num_centroids, max(num_shards, len(sample) // 32)) centroids; shard sizes are balanced
    on the sample's own assignment counts (an unbiased estimate of the memory's, since the sample is a hash
    of the id).

    Raises:
      ValueError: the sample has fewer points than shards (a router cannot give every shard a centroid).
    """
    x = np.asarray(sample, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"router sample must be [n, d], got shape {x.shape}")
    if x.shape[0] < num_shards:
        raise ValueError(f"partition sharding needs at least as many entries as shards to train its router: got "
                         f"{x.shape[0]} entries for {num_shards} shards; use fewer shards or hash sharding")
    k = max(1, min(config.num_centroids, max(num_shards, x.shape[0] // 32)))
    centroids, assign = spherical_kmeans(x, k, iterations=config.iterations, seed=config.seed)
    sizes = np.bincount(assign, minlength=k)
    owners = group_centroids(centroids, sizes, num_shards, seed=config.seed)
    return Router(centroids=centroids, owners=owners, num_shards=num_shards, probes=config.probes)


def write_router(root: str, router: Router) -> RouterRef:
    """Writes ``root/router/router-<digest>.npz`` (content-addressed, never overwritten with other bytes)."""
    blob = router.to_bytes()
    checksum = sha256_checksum(blob)
    rel = f"{ROUTER_DIR}/router-{checksum[len('sha256:'):][:16]}.npz"
    storage.write_bytes(storage.join(root, rel), blob)
    return RouterRef(path=rel, count=int(router.centroids.shape[0]), checksum=checksum, probes=router.probes)


def check_route_ratio(ratio) -> float:
    """``ratio`` as a float, or a ValueError naming it: distance-ratio routing needs a finite number >= 1."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.floating, np.integer)) \
            or not math.isfinite(ratio) or ratio < 1:
        raise ValueError(f"route ratio must be a number >= 1 (1 visits the nearest centroid's shard only), "
                         f"got {ratio!r}")
    return float(ratio)


def read_router(root: str, manifest: Manifest) -> Router | None:
    """The version's router, or None for a hash-sharded memory.

    Raises:
      ManifestError: the router file is missing, was modified (checksum), or disagrees with the manifest
        (centroid count, dimension, number of main shards).
    """
    ref = manifest.router
    if ref is None:
        return None
    blob = read_checked_file(root, manifest, ref.path, ref.checksum, "router file")
    path = storage.join(root, ref.path)
    router = Router.from_bytes(blob)
    if (router.centroids.shape[0] != ref.count or router.dim != manifest.dim
            or router.num_shards != len(manifest.shards)):
        raise ManifestError(
            f"version {manifest.version}: router file {path} holds {router.centroids.shape[0]} centroids of dim "
            f"{router.dim} for {router.num_shards} shards; the manifest has {ref.count} centroids, dim "
            f"{manifest.dim} and {len(manifest.shards)} main shards")
    return dataclasses.replace(router, probes=ref.probes)


def search_mask(router: Router | None, queries: np.ndarray, live: Sequence[bool], *,
                probes: int | None = None, ratio: float | None = None) -> np.ndarray:
    """Which shards each query searches: bool [nq, len(live)] over main shards then delta shards.

    Without a router every live shard is searched. With one, a query searches the live main shards its
    ``probes`` nearest centroids route it to, plus every live delta shard (delta shards are not routed). A
    query routed only to empty main shards, with no live delta shard either, searches every live main shard,
    so no query ever goes unanswered while the memory holds entries.

    Args:
      router: The memory's router, or None (hash sharding).
      queries: [nq, d] unit query embeddings.
      live: For each main shard then each delta shard, whether it holds rows (is searchable at all).
      probes: Centroids per query; None -> the router's default.
      ratio: Distance-ratio routing instead of probes (see `Router.route`); None -> probes.
    """
    live = np.asarray(live, dtype=bool)
    nq = int(np.asarray(queries).shape[0])
    if router is None:
        return np.broadcast_to(live, (nq, live.size)).copy()
    n_main = router.num_shards
    if live.size < n_main:
        raise ValueError(f"live has {live.size} entries, fewer than the router's {n_main} main shards")
    mask = np.zeros((nq, live.size), dtype=bool)
    mask[:, :n_main] = router.route(queries, probes, ratio=ratio) & live[:n_main]
    mask[:, n_main:] = live[n_main:]
    lost = ~mask.any(axis=1)
    if lost.any():
        mask[np.ix_(lost, np.flatnonzero(live[:n_main]))] = True
    return mask
