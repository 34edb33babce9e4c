"""What a version references: its calibration's entry-similarity file too, so a purge deletes a replaced one."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from memory.build import build_memory_local
from memory.index.shard_index import IndexConfig, IndexKind
from memory.store.mutations import forget
from memory.store.purge import purge_history
from memory.store.references import referenced_paths
from memory.store.versions import publish_version, read_manifest
from memory.vectors import l2_normalize


def _calibrated(root, name):
    """Publishes the latest version again with a calibration whose out-of-memory test names ``name``."""
    os.makedirs(os.path.join(root, "calibration"), exist_ok=True)
    with open(os.path.join(root, "calibration", name), "wb") as f:
        f.write(b"entries")
    m = read_manifest(root)
    calibration = {"method": "logistic", "out_of_memory": {
        "entries": {"path": f"calibration/{name}", "sha256": "0" * 64, "count": 1, "k": 10}}}
    return publish_version(root, dataclasses.replace(m, calibration=calibration, change={"kind": "calibrate"}),
                           expected_parent=m.version)


def test_a_replaced_entry_similarity_file_is_purged_and_the_current_one_kept(tmp_path):
    root = str(tmp_path / "mem")
    x = l2_normalize(np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32))
    build_memory_local(root, ids=[f"e{i}" for i in range(20)], labels=["a", "b"] * 10, uris=[""] * 20,
                       embeddings=x, num_shards=1, index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE),
                       encoder_identity={"name": "fake", "content_hash": "sha256:" + "0" * 64, "dim": 8,
                                         "preprocess": {}})
    first = _calibrated(root, "entry-similarity-k10-aaaa.npy")  # v2
    assert "calibration/entry-similarity-k10-aaaa.npy" in referenced_paths(first)
    assert "calibration/entry-similarity-k10-aaaa.npy" not in referenced_paths(first, calibration=False)
    # A calibration alone reveals nothing the latest version hides: it does not make a purge purge anything.
    _calibrated(root, "entry-similarity-k10-bbbb.npy")  # v3
    assert purge_history(root) == []
    forget(root, ids=["e1"])  # v4, calibration bbbb carried over
    _calibrated(root, "entry-similarity-k10-cccc.npy")  # v5
    forget(root, ids=["e2"])  # v6
    # Versions 1-5 still show e2 (v1-v3 also e1): purged; the files only they referenced go with them.
    assert purge_history(root) == [1, 2, 3, 4, 5]
    calibration = os.path.join(root, "calibration")
    assert sorted(os.listdir(calibration)) == ["entry-similarity-k10-cccc.npy"]
    assert read_manifest(root).calibration["out_of_memory"]["entries"]["path"].endswith("cccc.npy")
