"""Embeddings out of a memory, in clip-retrieval's layout (the layout ``vmem build --embeddings clip:`` reads).

``DIR/img_emb/img_emb_<i>.npy`` (float32 [n, d] unit rows) beside ``DIR/metadata/metadata_<i>.parquet``
with the columns ``key`` (entry id), ``label`` (class name) and ``image_path`` (source uri): one pair per
shard of the memory, live entries only (forgotten ones are not exported). Any tool that reads
clip-retrieval output (autofaiss, a notebook) reads it, and it is what the paper experiments build their
memories from: the images are embedded once, every other memory is built from these files.

    vmem export --memory out/fmnist-memory --output out/fmnist-embeddings
    vmem build --embeddings clip:out/fmnist-embeddings,label_column=label --encoder-id NAME --output M2
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from memory import storage
from memory.store.blocks import EntryBlock

__all__ = ["export_embeddings", "read_clip_folder", "write_clip_folder"]


def write_clip_folder(directory: str, parts: Sequence[EntryBlock]) -> int:
    """Writes ``parts`` as ``img_emb/img_emb_<i>.npy`` + ``metadata/metadata_<i>.parquet``; returns the rows.

    Existing files of the layout under ``directory`` are removed first, so a re-export never mixes in
    stale parts.
    """
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    for sub in ("img_emb", "metadata"):
        path = storage.join(directory, sub)
        if storage.exists(path):
            storage.remove_tree(path)
    rows = 0
    for i, part in enumerate(parts):
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(part.embeddings, dtype=np.float32), allow_pickle=False)
        storage.write_bytes(storage.join(directory, "img_emb", f"img_emb_{i}.npy"), buf.getvalue())
        table = pa.table({"key": [str(v) for v in part.ids], "label": [str(v) for v in part.labels],
                          "image_path": [str(v) for v in part.uris]})
        sink = io.BytesIO()
        pq.write_table(table, sink)
        storage.write_bytes(storage.join(directory, "metadata", f"metadata_{i}.parquet"), sink.getvalue())
        rows += len(part)
    return rows


def read_clip_folder(directory: str, *, label_column: str = "label") -> EntryBlock:
    """Reads a clip-retrieval folder written by :func:`write_clip_folder` (or clip-retrieval) into memory."""
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    names = sorted((n for n in storage.list_dir(storage.join(directory, "img_emb")) if n.endswith(".npy")),
                   key=lambda n: int(n.rsplit("_", 1)[1].split(".")[0]))
    if not names:
        raise FileNotFoundError(f"{directory}/img_emb holds no img_emb_<i>.npy files")
    ids, labels, uris, embeddings = [], [], [], []
    for name in names:
        i = name.rsplit("_", 1)[1].split(".")[0]
        emb = np.load(io.BytesIO(storage.read_bytes(storage.join(directory, "img_emb", name))), allow_pickle=False)
        meta = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(directory, "metadata",
                                                                        f"metadata_{i}.parquet"))))
        if meta.num_rows != emb.shape[0]:
            raise ValueError(f"{directory}: img_emb_{i}.npy has {emb.shape[0]} rows, metadata_{i}.parquet "
                             f"{meta.num_rows}")
        ids += meta.column("key").to_pylist()
        labels += meta.column(label_column).to_pylist()
        uris += meta.column("image_path").to_pylist()
        embeddings.append(emb.astype(np.float32))
    return EntryBlock(np.asarray(ids, dtype=str), np.asarray(labels, dtype=str), np.asarray(uris, dtype=str),
                          np.concatenate(embeddings))


def export_embeddings(root: str, directory: str, *, version: int | None = None, verify: bool = True) -> int:
    """Writes a memory's live entries (one part per main or delta shard) as a clip-retrieval folder.

    Args:
      root: Memory root (local or ``gs://``).
      directory: Output folder (local or ``gs://``); its ``img_emb``/``metadata`` parts are replaced.
      version: Version to export (default: the latest).
      verify: Check every shard file read against the manifest (memory.store.integrity).

    Returns:
      The number of rows written (the version's live entries).
    """
    from memory.store.versions import read_manifest  # pylint: disable=g-import-not-at-top
    from memory.store.shard import read_shard_data  # pylint: disable=g-import-not-at-top
    from memory.search.shard_search import load_forgotten  # pylint: disable=g-import-not-at-top
    manifest = read_manifest(root, version=version)
    forgotten = load_forgotten(root, manifest)
    names = np.asarray(manifest.class_names, dtype=str)
    parts = []
    for info in manifest.all_shards:
        if info.count == 0:
            continue
        data = read_shard_data(storage.join(root, info.path), info, verify=verify)
        live = ~np.isin(data.ids.astype(str), forgotten) if forgotten.size else np.ones(len(data), bool)
        parts.append(EntryBlock(data.ids[live], names[data.labels[live]], data.uris[live],
                                    data.embeddings[live]))
    written = write_clip_folder(directory, parts)
    if written != manifest.total:
        raise ValueError(f"exported {written} rows but version {manifest.version} of {root} has {manifest.total} "
                         "live entries; the memory's tombstones do not match its shards")
    return written
