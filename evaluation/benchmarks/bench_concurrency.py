"""Readers while writers publish: a bounded load test of a living memory.

Reader threads loop ``VisualMemory.open`` (the latest version) and then ``classify`` several times on that one
open memory, and one more loops the evaluate job (``vmem evaluate``'s entry point,
pipelines.evaluate.evaluate_memory, in-process Beam, on the same queries as precomputed embeddings) on the
latest version, as `vmem evaluate` runs without ``--version``, while writers publish versions in a loop: one writer cycles add,
forget, ``forget`` + purge_history (``vmem forget --purge-history``) and a re-index (the Beam job, in-process,
with the purge a forget asked for), and a second writer adds entries with ids of its own at the same time (so
writers also lose races and re-base; every other re-index runs while the adding writer waits, the others race
it and lose: a re-index never re-bases).

Every answer is checked against the version it opened: each writer records what its version changed (ids added
or forgotten, or nothing), so the live ids of every version follow from version 1; the expected neighbours are
the exact (brute-force) nearest live entries of that version, with their uris, and an open memory's entry
count must be that version's (nothing half-published). An open that meets a purge re-opens the latest version
by itself; an open memory answers from what it read at open even after a purge deleted its version's files
(counted: answers from purged versions). An evaluation whose version a purge deletes while the job reads it
(the job reads shard files on its workers) runs again on the new latest by itself, and reports the version it
evaluated: counted (evaluations that ended on a newer version than the latest at their start), and its
answers are checked against the version it reports. Any error of the job is a failure. Reports queries served, versions published,
reader failures and wrong answers (target 0 of both), writer conflicts, and whether the run kept to its time
bound.

    python -m evaluation.benchmarks.bench_concurrency --seconds 120 --readers 4
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile
import threading
import time
from typing import NamedTuple

import numpy as np

from evaluation.benchmarks.synthetic import gaussian_unit_vectors
from evaluation.neighbors_io import read_neighbor_files
from memory.build import build_memory_local
from memory.index.shard_index import IndexConfig, IndexKind
from memory.store import mutations
from memory.store.purge import purge_history
from memory.store.versions import (ConcurrentUpdateError, latest_version, list_versions,
                                   read_version)
from memory.visual_memory import VisualMemory
from pipelines.build import precomputed_identity

__all__ = ["Answer", "LoadResult", "main", "run_load"]

_K = 5
_ENCODER = "synthetic-16"


def _write_query_embeddings(directory: str, q: np.ndarray) -> str:
    """The queries as a clip-retrieval folder (precomputed embeddings the evaluate job reads)."""
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    os.makedirs(os.path.join(directory, "img_emb"))
    os.makedirs(os.path.join(directory, "metadata"))
    np.save(os.path.join(directory, "img_emb", "img_emb_0.npy"), q.astype(np.float32))
    keys = [f"q{i}" for i in range(q.shape[0])]
    pq.write_table(pa.table({"key": keys, "label": ["c0"] * len(keys), "image_path": [f"/q/{k}" for k in keys]}),
                   os.path.join(directory, "metadata", "metadata_0.parquet"))
    return directory


class LoadResult(NamedTuple):
    """What a load run saw; ``reader_failures`` and ``wrong_answers`` should be 0."""
    seconds: float
    readers: int  # Threads of VisualMemory.open + classify; one evaluate job loops besides them.
    opens: int
    classifies: int
    answered_after_purge: int  # Classify calls of a memory whose version a purge had removed since its open.
    evaluations: int
    evaluations_moved: int  # Evaluations that ended on a newer version than the latest when they started.
    queries_served: int
    versions_published: int
    versions_by_kind: dict[str, int]
    reader_failures: list[str]
    wrong_answers: int
    writer_conflicts: list[str]
    within_time_bound: bool


class Answer(NamedTuple):
    """One reader call: the version it read, each query's neighbour ids and (classify) uris, its entry count."""
    version: int
    ids: list[list[str]]
    uris: list[list[str]] | None
    entries: int | None


def run_load(root: str, *, seconds: float, readers: int = 3, entries: int = 300, dim: int = 16,
             queries: int = 8, classifies_per_open: int = 4, reindex_every: int = 4, purge_every: int = 3,
             seed: int = 0, time_bound_s: float | None = None) -> LoadResult:
    """Builds a memory at ``root`` and runs readers against publishing writers for ``seconds``.

    Args:
      root: An empty directory for the memory.
      seconds: How long the writers publish and readers read.
      readers: Reader threads.
      entries: Entries of the initial build (as many more are available for adds).
      dim: Embedding dimension.
      queries: Queries per classify call.
      classifies_per_open: Classify calls of each opened memory before its reader opens the latest again.
      reindex_every: The cycling writer re-indexes every this many steps.
      purge_every: Every this many of its forgets is a ``forget --purge-history`` (the next re-index purges
        again).
      seed: Seed of the synthetic vectors.
      time_bound_s: The wall time the whole run must keep to (default: ``seconds`` + 60).
    """
    pool = gaussian_unit_vectors(4 * entries + 1000, dim, seed=seed)
    pool_ids = np.asarray([f"e{i:06d}" for i in range(pool.shape[0])])
    label_of = {i: f"c{n % 5}" for n, i in enumerate(pool_ids)}
    build_memory_local(root, ids=pool_ids[:entries].tolist(), labels=[label_of[i] for i in pool_ids[:entries]],
                       uris=[f"/p/{i}" for i in pool_ids[:entries]], embeddings=pool[:entries], num_shards=2,
                       index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE),
                       encoder_identity=precomputed_identity(_ENCODER, dim, "synthetic"))
    q = gaussian_unit_vectors(queries, dim, seed=seed + 1)
    query_dir = _write_query_embeddings(os.path.join(os.path.dirname(root), "queries"), q)
    evaluations = [0]
    changes: dict[int, tuple[int, str, set]] = {}  # version -> (parent, "add"/"forget"/"same", ids)
    kinds: dict[str, int] = {}
    lock = threading.Lock()
    stop = threading.Event()
    adding = threading.Lock()  # Held by the adding writer while it adds, and by a re-index that runs alone.
    answers: list[Answer] = []
    failures: list[str] = []
    conflicts: list[str] = []
    next_new = [entries]
    opens, classifies, after_purge = [0], [0], [0]
    forgets = [0]
    moved_evaluations = [0]

    def record(m, kind, ids=()):
        with lock:
            changes[m.version] = (m.parent, kind, set(ids))
            kinds[m.change.get("kind", "?")] = kinds.get(m.change.get("kind", "?"), 0) + 1

    def record_quiet_versions():
        """Re-index and purge versions change no live id (a purge copies its parent)."""
        for n in list_versions(root):
            if n not in changes:
                m = read_version(root, n)
                if m.change.get("kind") in ("reindex", "purge"):
                    record(m, "same")

    def take(n):
        with lock:
            lo = next_new[0]
            next_new[0] += n
        return pool_ids[lo:lo + n], pool[lo:lo + n]

    def add(n):
        ids, emb = take(n)
        m = mutations.add_entries_local(root, ids=ids.tolist(), labels=[label_of[i] for i in ids],
                                        uris=[f"/p/{i}" for i in ids], embeddings=emb)
        record(m, "add", ids.tolist())

    def cycling_writer():
        from pipelines import reindex  # pylint: disable=g-import-not-at-top  # Beam only for the re-index.
        rng = np.random.default_rng(seed + 2)
        step = 0
        while not stop.is_set():
            step += 1
            try:
                if step % reindex_every == 0:
                    # Every other re-index runs while the adding writer waits (so it publishes, and its purge
                    # deletes the old shards under the readers); the others race the adds and lose.
                    if (step // reindex_every) % 2:
                        with adding:
                            reindex.run(["--memory", root])
                    else:
                        reindex.run(["--memory", root])
                    record_quiet_versions()
                elif step % 2:
                    add(6)
                else:
                    live = mutations.live_ids(root)
                    gone = rng.choice(live, size=3, replace=False).tolist()
                    forgets[0] += 1
                    purge = forgets[0] % purge_every == 0
                    m = mutations.forget(root, ids=gone, request_purge=purge)
                    record(m, "forget", gone)
                    if purge:
                        purge_history(root)
                        record_quiet_versions()
            except ConcurrentUpdateError as e:  # A true conflict (or too many lost races): counted, not fatal.
                conflicts.append(str(e))

    def adding_writer():
        while not stop.is_set():
            try:
                with adding:
                    add(4)
            except ConcurrentUpdateError as e:
                conflicts.append(str(e))
            time.sleep(0.05)

    def reader():
        while not stop.is_set():
            try:
                mem = VisualMemory.open(root)
                with lock:
                    opens[0] += 1
                for _ in range(classifies_per_open):
                    preds = mem.classify(q, rule="plurality", k=_K)
                    purged = mem.version not in list_versions(root)  # Its files may be gone: still answered.
                    with lock:
                        classifies[0] += 1
                        after_purge[0] += purged
                        answers.append(Answer(mem.version, [[n.id for n in p.neighbors] for p in preds],
                                              [[n.uri for n in p.neighbors] for p in preds], len(mem)))
                    if stop.is_set():
                        break
            except Exception as e:  # pylint: disable=broad-except  # Every reader error is a failure.
                with lock:
                    failures.append(f"{type(e).__name__}: {e}")

    def evaluating_reader():
        from pipelines.evaluate import evaluate_memory  # pylint: disable=g-import-not-at-top  # Beam.
        from pipelines.io.embedding_sources import parse_embeddings_spec  # pylint: disable=g-import-not-at-top
        source = parse_embeddings_spec(f"clip:{query_dir},label_column=label")
        runs = 0
        while not stop.is_set():
            out = os.path.join(os.path.dirname(root), f"eval-{runs}")
            runs += 1
            at_start = latest_version(root)
            try:
                evaluate_memory(memory=root, source=source, output=out, encoder_id=_ENCODER, k_max=_K)
            except Exception as e:  # pylint: disable=broad-except  # Every reader error is a failure.
                with lock:
                    failures.append(f"evaluate: {type(e).__name__}: {e}")
                continue
            with open(os.path.join(out, "evaluation-summary.json"), encoding="utf-8") as f:
                version = json.load(f)["memory_version"]
            got = {r.query_id: list(r.neighbor_ids)
                   for r in read_neighbor_files(glob.glob(os.path.join(out, "*neighbors*.jsonl")))}
            with lock:
                if version < at_start:
                    failures.append(f"evaluate: version {at_start} was the latest at its start, evaluated {version}")
                moved_evaluations[0] += version > at_start
                evaluations[0] += 1
                answers.append(Answer(version, [got.get(f"q{i}", []) for i in range(queries)], None, None))

    start = time.monotonic()
    threads = [threading.Thread(target=cycling_writer), threading.Thread(target=adding_writer),
               threading.Thread(target=evaluating_reader)]
    threads += [threading.Thread(target=reader) for _ in range(readers)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    wrong = _check_answers(answers, changes, pool_ids, pool, q, entries)
    bound = seconds + 60 if time_bound_s is None else time_bound_s
    return LoadResult(seconds=round(elapsed, 2), readers=readers, opens=opens[0], classifies=classifies[0],
                      answered_after_purge=after_purge[0], evaluations=evaluations[0],
                      evaluations_moved=moved_evaluations[0], queries_served=len(answers) * queries,
                      versions_published=max(changes, default=1) - 1,
                      versions_by_kind=dict(sorted(kinds.items())),
                      reader_failures=failures, wrong_answers=wrong, writer_conflicts=conflicts,
                      within_time_bound=elapsed <= bound)


def _check_answers(answers: list[Answer], changes, pool_ids, pool, q, entries) -> int:
    """Query answers that differ from the version they opened: not its exact nearest live entries, not their
    uris, or read from a memory whose entry count is not that version's."""
    index_of = {i: n for n, i in enumerate(pool_ids)}
    live_of = {1: set(pool_ids[:entries].tolist())}

    def live(v):
        if v not in live_of:
            parent, kind, ids = changes[v]  # A version no writer recorded is a bookkeeping error: KeyError.
            base = live(parent)
            live_of[v] = base | ids if kind == "add" else base - ids if kind == "forget" else base
        return live_of[v]

    wrong = 0
    expected_of = {}
    for a in answers:
        if a.version not in expected_of:
            ids = np.asarray(sorted(live(a.version)))
            rows = np.asarray([index_of[i] for i in ids])
            d = 1.0 - q @ pool[rows].T  # Cosine distance; ties broken by id (ids are sorted).
            order = np.argsort(d, axis=1, kind="stable")[:, :_K]
            expected_of[a.version] = [ids[o].tolist() for o in order]
        expected = expected_of[a.version]
        uris = a.uris or [[f"/p/{i}" for i in got] for got in a.ids]
        if a.entries is not None and a.entries != len(live(a.version)):
            wrong += len(a.ids)
            continue
        wrong += sum(g != e or u != [f"/p/{i}" for i in e] for g, e, u in zip(a.ids, expected, uris))
    return wrong


def main(argv=None) -> int:
    """Runs the load test and prints its figures as JSON; exit status 1 when a reader failed or was wrong."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--entries", type=int, default=300)
    parser.add_argument("--classifies-per-open", type=int, default=4,
                        help="classify calls of each opened memory before its reader opens the latest (default 4)")
    parser.add_argument("--purge-every", type=int, default=3,
                        help="every this many forgets is a forget --purge-history (default 3)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vmem-concurrency-") as tmp:
        result = run_load(f"{tmp}/mem", seconds=args.seconds, readers=args.readers, entries=args.entries,
                          classifies_per_open=args.classifies_per_open, purge_every=args.purge_every)
    figures = result._asdict()
    figures["reader_failures"] = len(result.reader_failures)
    figures["first_reader_failures"] = result.reader_failures[:3]
    figures["writer_conflicts"] = len(result.writer_conflicts)
    figures["writer_conflicts_by_kind"] = {
        what: sum(c.startswith(what) for c in result.writer_conflicts) for what in ("re-index", "add", "forget")}
    figures["first_writer_conflicts"] = result.writer_conflicts[:3]
    print(json.dumps(figures, indent=2))
    return 0 if not result.reader_failures and not result.wrong_answers and result.within_time_bound else 1


if __name__ == "__main__":
    raise SystemExit(main())
