"""Pure-Python (no Beam) build of a complete memory from in-memory arrays.

The Beam job in pipelines/ runs the same steps distributed (assign shards with shard_for_id, one
write_shard per shard, then write_manifest once); this function is for tests, notebooks and small data.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import numpy as np

from memory import storage
from memory.index.shard_index import IndexConfig
from memory.store.manifest import (FORMAT_VERSION, INDEX_CONFIG_KEY, BuildCounts, Manifest, Metric, manifest_path,
                                   utc_now_iso)
from memory.search.routing import RouterConfig, select_sample_rows, train_router, write_router
from memory.store.shard import ShardData, write_shard
from memory.index.template import local_template, train_template, uses_template, write_template
from memory.store.sharding import Sharding, parse_sharding, shard_for_id, shard_name
from memory.vectors import l2_normalize
from memory.store.versions import list_versions, publish_version, version_path


def build_memory_local(root: str, *, ids: Sequence[str], labels: Sequence[str], uris: Sequence[str],
                       embeddings: np.ndarray, num_shards: int, index_config: IndexConfig,
                       encoder_identity: dict, build_config: dict | None = None,
                       counts: BuildCounts | None = None, sharding: Sharding | str = Sharding.HASH,
                       router_config: RouterConfig = RouterConfig()) -> Manifest:
    """Builds a memory at ``root`` (local or ``gs://``) and returns its manifest.

    Args:
      root: Memory directory; shards go to ``root/shard-XXXXX-of-YYYYY``, version 1 to
        ``root/versions/v000001.json`` (and its copy to ``root/manifest.json``). An existing memory's
        versions and manifest there are deleted first, so a crash mid-build leaves no manifest rather than
        an old one describing a mix of old and new shards.
      ids: Unique entry ids.
      labels: Class name of each entry; class_names becomes the sorted unique set.
      uris: Source URI of each entry.
      embeddings: [n, d] embeddings; rows are L2-normalised here.
      num_shards: Number of shards (>= 1).
      index_config: Per-shard ScaNN index configuration.
      encoder_identity: EncoderIdentity.to_dict() of the encoder that produced the embeddings.
      build_config: Extra build description recorded in the manifest (``index_config`` under
        memory.store.manifest.INDEX_CONFIG_KEY, "num_shards" and "sharding" are added).
      counts: Build counts; defaults to read = embedded = n, failed = 0.
      sharding: HASH assigns entries by a stable hash of their id; PARTITION trains a router
        (memory.search.routing) on the ``router_config.training_sample_size`` entries with the smallest
        `router_sample_key` and assigns each entry to the shard owning its nearest centroid. A HASH build
        whose shards resolve to tree+AH first trains one index template for the whole memory on the
        ``index_config.training_sample_size`` entries with the smallest key and builds every tree+AH shard
        from it (memory.index.template), so the opened memory searches those shards as one index.
      router_config: How a PARTITION build trains its router.

    Returns:
      The written manifest.
    """
    ids_arr = np.asarray(list(ids), dtype=str)
    label_strs = np.asarray(list(labels), dtype=str)
    uris_arr = np.asarray(list(uris), dtype=str)
    emb = np.asarray(embeddings)
    n = ids_arr.shape[0]
    if emb.ndim != 2 or emb.shape[0] != n or label_strs.shape != (n,) or uris_arr.shape != (n,):
        raise ValueError(
            f"inconsistent inputs: {n} ids, {label_strs.shape[0]} labels, {uris_arr.shape[0]} uris, "
            f"embeddings {emb.shape}; expected n of each and [n, d] embeddings")
    dim = int(emb.shape[1])
    if encoder_identity.get("dim") != dim:
        raise ValueError(f"embeddings have dim {dim} but encoder_identity['dim'] is {encoder_identity.get('dim')!r}")
    emb = l2_normalize(emb) if n else emb.astype(np.float32)
    class_names = tuple(sorted(set(label_strs.tolist())))
    label_idx = np.searchsorted(np.asarray(class_names, dtype=str), label_strs).astype(np.int32)
    sharding = parse_sharding(sharding)
    router = None
    if sharding is Sharding.PARTITION:
        sample = emb[select_sample_rows(ids_arr.tolist(), router_config.training_sample_size)]
        router = train_router(sample, num_shards=num_shards, config=router_config)
        shard_of = router.assign(emb)
    else:
        shard_of = np.fromiter((shard_for_id(i, num_shards) for i in ids_arr.tolist()), dtype=np.int64, count=n)

    # The old memory's versions go first (latest first, so every moment shows a consistent older state or
    # none at all): a crash mid-build leaves no manifest rather than one describing a mix of old and new shards.
    for v in reversed(list_versions(root)):
        storage.remove_tree(version_path(root, v))
    if storage.exists(manifest_path(root)):
        storage.remove_tree(manifest_path(root))
    template = None
    if router is None and uses_template(index_config, np.bincount(shard_of, minlength=num_shards).tolist()):
        sample = emb[select_sample_rows(ids_arr.tolist(), index_config.training_sample_size or n)]
        template = write_template(root, train_template(sample, index_config, n))
    shards = []
    with contextlib.ExitStack() as stack:
        template_dir = None if template is None else stack.enter_context(local_template(root, template))
        for s in range(num_shards):
            rows = np.flatnonzero(shard_of == s)
            name = shard_name(s, num_shards)
            data = ShardData(ids=ids_arr[rows], labels=label_idx[rows], uris=uris_arr[rows],
                             embeddings=emb[rows].reshape(len(rows), dim))
            shards.append(write_shard(storage.join(root, name), data, index_config=index_config, name=name,
                                      root_relative_path=name, template_dir=template_dir))
    config: dict[str, Any] = dict(build_config or {})
    if template is not None:
        config.setdefault("index_template", template)
    config.setdefault(INDEX_CONFIG_KEY, index_config.to_dict())
    config.setdefault("num_shards", num_shards)
    config.setdefault("sharding", sharding.value)
    if router is not None:
        config.setdefault("router", router_config.to_dict())
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        encoder=dict(encoder_identity),
        dim=dim,
        metric=Metric.COSINE,
        class_names=class_names,
        shards=tuple(shards),
        build_config=config,
        counts=counts if counts is not None else BuildCounts(read=n, embedded=n, failed=0),
        created_at=utc_now_iso(),
        change={"kind": "build", "summary": f"built {n} entries in {num_shards} shards", "entries": n},
        router=None if router is None else write_router(root, router),
    )
    # Last: version 1's presence marks the memory complete.
    return publish_version(root, manifest, expected_parent=None)
