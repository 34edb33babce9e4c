"""`vmem info` describes the live memory after add, forget and prune (text and --json), not the build's counts."""

from __future__ import annotations

import json

import numpy as np

from memory.build import build_memory_local
from memory.index.shard_index import IndexConfig, IndexKind
from memory.live import live_counts
from memory.store.mutations import add_entries_local, forget, read_entry_weights
from memory.store.versions import read_manifest
from memory.vectors import l2_normalize
from vmem import main as cli

D = 8
ENCODER = {"name": "fake", "content_hash": "sha256:" + "0" * 64, "dim": D, "preprocess": {}}


def _info(capsys, root: str) -> tuple[str, dict]:
    assert cli.main(["info", root]) == 0
    text = capsys.readouterr().out
    assert cli.main(["info", root, "--json"]) == 0
    return text, json.loads(capsys.readouterr().out)


def test_info_after_add_forget_and_prune_shows_the_live_memory(tmp_path, capsys):
    rng = np.random.default_rng(0)
    root = str(tmp_path / "m")
    ids = [f"e{i:03d}" for i in range(60)]
    labels = [f"c{i % 3}" for i in range(60)]
    build_memory_local(root, ids=ids, labels=labels, uris=[f"/d/{i}.png" for i in ids],
                       embeddings=l2_normalize(rng.normal(size=(60, D))), num_shards=2,
                       index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE), encoder_identity=ENCODER)
    text, js = _info(capsys, root)
    assert "version      1 (build)" in text and "entries      60 live\n" in text
    assert "forgotten" not in text and "delta shards" not in text and "pruned" not in text
    assert js["live"] == {"version": 1, "parent": None, "change": "build", "live_entries": 60, "stored_rows": 60,
                          "shards": 2, "shard_rows": 60, "delta_shards": 0, "delta_rows": 0, "forgotten": 0,
                          "hard_pruned": 0, "soft_pruned": 0, "built_entries": 60}
    assert js["counts"]["embedded"] == 60 and js["version"] == 1  # The manifest itself is still there.

    # add: 12 entries in a delta shard.
    new = [f"n{i:03d}" for i in range(12)]
    add_entries_local(root, ids=new, labels=[f"c{i % 3}" for i in range(12)], uris=[f"/n/{i}.png" for i in new],
                      embeddings=l2_normalize(rng.normal(size=(12, D))))
    text, js = _info(capsys, root)
    assert "version      2 (add, parent 1)" in text
    assert "entries      72 live; the build embedded 60" in text
    assert "delta shards 1 (12 rows) added since the last re-index; main shards hold 60 rows" in text
    assert js["live"]["live_entries"] == 72 and js["live"]["delta_shards"] == 1 and js["live"]["delta_rows"] == 12
    assert js["live"]["version"] == 2 and js["live"]["stored_rows"] == 72

    # forget: 5 entries, one of them just added.
    forget(root, ids=["e000", "e001", "e002", "e003", "n000"])
    text, js = _info(capsys, root)
    assert "version      3 (forget, parent 2)" in text
    assert "entries      67 live of 72 stored rows (5 forgotten); the build embedded 60" in text
    assert "forgotten    5 entries; hidden by tombstones" in text and "pruned" not in text
    assert (js["live"]["live_entries"], js["live"]["forgotten"], js["live"]["hard_pruned"]) == (67, 5, 0)

    # hard prune: forgets every entry whose leave-one-out vote disagrees often enough.
    assert cli.main(["prune", "--memory", root, "--mode", "hard", "--threshold", "5", "--k", "10"]) == 0
    capsys.readouterr()
    m = read_manifest(root)
    hard = m.forgotten.count - 5
    assert m.version == 4 and hard > 0
    text, js = _info(capsys, root)
    assert "version      4 (forget, parent 3)" in text
    assert f"entries      {67 - hard} live of 72 stored rows ({5 + hard} forgotten)" in text
    assert f"forgotten    {5 + hard} entries, {hard} of them by hard pruning" in text
    assert f"pruned       hard {hard} (forgotten), soft 0" in text
    assert js["live"] == dict(js["live"], version=4, live_entries=67 - hard, forgotten=5 + hard, hard_pruned=hard,
                              soft_pruned=0)

    # soft prune: entries that vote with a weight below 1.
    assert cli.main(["prune", "--memory", root, "--mode", "soft", "--k", "10"]) == 0
    capsys.readouterr()
    m = read_manifest(root)
    soft = read_entry_weights(root, m)[0].size
    assert m.version == 5 and soft > 0
    text, js = _info(capsys, root)
    assert "version      5 (prune, parent 4)" in text
    assert f"pruned       hard {hard} (forgotten), soft {soft} (vote with a weight below 1)" in text
    assert (js["live"]["soft_pruned"], js["live"]["hard_pruned"], js["live"]["live_entries"]) == (soft, hard,
                                                                                                  67 - hard)
    assert live_counts(root, m) == live_counts(root, read_manifest(root, version=5))

    # reindex: forgotten rows are dropped and delta shards folded in; the soft weights stay.
    assert cli.main(["reindex", "--memory", root]) == 0
    capsys.readouterr()
    text, js = _info(capsys, root)
    assert "version      6 (reindex, parent 5)" in text
    assert f"entries      {67 - hard} live; the build embedded 60" in text
    assert "forgotten    " not in text and "delta shards " not in text
    assert js["live"] == dict(js["live"], live_entries=67 - hard, stored_rows=67 - hard, forgotten=0, hard_pruned=0,
                              delta_shards=0, soft_pruned=read_entry_weights(root, read_manifest(root))[0].size)
