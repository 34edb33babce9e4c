"""memory.store.export: a memory's live entries as a clip-retrieval folder, and back."""

from __future__ import annotations

import numpy as np

from memory import IndexConfig, IndexKind, VisualMemory
from memory.build import build_memory_local
from memory.store.export import export_embeddings, read_clip_folder
from memory.store.mutations import forget
from tests.memory.helpers import ENCODER, clustered


def test_export_writes_live_entries_with_class_names_and_uris(tmp_path):
    x, _ = clustered(50, 32, centres=3, noise=0.5, seed=4)
    root = str(tmp_path / "mem")
    ids = [f"e{i:02d}" for i in range(50)]
    build_memory_local(root, ids=ids, labels=[("cat", "dog")[i % 2] for i in range(50)],
                       uris=[f"/img/{i}.png" for i in ids], embeddings=x, num_shards=3,
                       index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE), encoder_identity=ENCODER)
    forget(root, ids=["e03", "e10"])
    out = str(tmp_path / "emb")
    assert export_embeddings(root, out) == 48
    table = read_clip_folder(out)
    assert sorted(table.ids.tolist()) == sorted(set(ids) - {"e03", "e10"})
    row = {i: r for r, i in enumerate(table.ids.tolist())}
    memory = VisualMemory.open(root)
    np.testing.assert_allclose(table.embeddings, memory.get_embeddings(table.ids.tolist()), atol=1e-6)
    assert table.labels[row["e04"]] == "cat" and table.labels[row["e05"]] == "dog"
    assert table.uris[row["e07"]] == "/img/e07.png"
    # One part per non-empty shard; an earlier export's parts are replaced, never mixed in.
    assert export_embeddings(root, out, version=1) == 50 and len(read_clip_folder(out)) == 50


def test_vmem_export_command_and_a_build_from_its_output(tmp_path, capsys):
    from vmem import main as cli
    x, _ = clustered(30, 32, centres=2, noise=0.5, seed=5)
    root = str(tmp_path / "mem")
    build_memory_local(root, ids=[f"e{i}" for i in range(30)], labels=["a", "b", "c"] * 10,
                       uris=[f"/img/{i}.png" for i in range(30)], embeddings=x, num_shards=1,
                       index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE), encoder_identity=ENCODER)
    out = str(tmp_path / "emb")
    assert cli.main(["export", "--memory", root, "--output", out]) == 0
    assert f"exported 30 entries to {out}" in capsys.readouterr().out
    rebuilt = str(tmp_path / "rebuilt")
    assert cli.main(["build", "--embeddings", f"clip:{out},label_column=label", "--encoder-id", "fake",
                     "--output", rebuilt, "--shards", "2"]) == 0
    again = VisualMemory.open(rebuilt)
    assert len(again) == 30 and again.class_names == ("a", "b", "c")
    np.testing.assert_allclose(again.get_embeddings(["e7"]), VisualMemory.open(root).get_embeddings(["e7"]),
                               atol=1e-6)
