"""`vmem info` reports the embedding dtype a memory's shards store, whichever build wrote it."""

from __future__ import annotations

import numpy as np
import pytest

from memory.build import build_memory_local
from memory.index.shard_index import EmbeddingDtype, IndexConfig, IndexKind
from memory.store.manifest import INDEX_CONFIG_KEY
from memory.store.versions import read_manifest
from memory.vectors import l2_normalize
from vmem import main as cli

D = 8


@pytest.mark.parametrize("dtype", list(EmbeddingDtype))
def test_info_of_an_in_process_build_names_its_dtype(tmp_path, capsys, dtype):
    rng = np.random.default_rng(0)
    ids = [f"e{i:02d}" for i in range(20)]
    root = str(tmp_path / "m")
    build_memory_local(root, ids=ids, labels=["a", "b"] * 10, uris=[f"/d/{i}.png" for i in ids],
                       embeddings=l2_normalize(rng.normal(size=(20, D))), num_shards=2,
                       index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE, embedding_dtype=dtype),
                       encoder_identity={"name": "fake", "content_hash": "sha256:" + "0" * 64, "dim": D,
                                         "preprocess": {}})
    manifest = read_manifest(root)
    assert manifest.build_config[INDEX_CONFIG_KEY]["embedding_dtype"] == dtype.value
    assert "index_config" not in manifest.build_config and manifest.embedding_dtype is dtype
    assert cli.main(["info", root]) == 0
    out = capsys.readouterr().out
    assert f"embeddings stored as {dtype.value} (inside each shard's index)" in out
