"""memory.search.shard_search: the helpers VisualMemory.search runs its threads with, and the merge by query rows."""

import concurrent.futures
import threading

import numpy as np
import pytest
from threadpoolctl import ThreadpoolController

from memory.search.shard_search import (MIN_CHUNK_QUERIES, PAD_ID, PartialTopK, merge_partials, one_thread_blas,
                                        search_in_chunks)


def _blas_threads() -> set[int]:
    """Thread counts of the process-wide (pthreads) BLAS pools: numpy's OpenBLAS. (faiss's bundled OpenBLAS
    runs on OpenMP, whose limits are per thread, and is left alone.)"""
    return {info["num_threads"] for info in ThreadpoolController().info()
            if info["user_api"] == "blas" and info.get("threading_layer") == "pthreads"}


def _set_blas_threads(n: int) -> None:
    """Set numpy's BLAS thread count from a short-lived thread, so no live thread keeps threadpoolctl's control
    of OpenBLAS afterwards (as in a process where nothing else limits BLAS)."""
    t = threading.Thread(target=lambda: ThreadpoolController().select(threading_layer="pthreads").limit(limits=n))
    t.start()
    t.join()


@pytest.fixture
def two_blas_threads():
    """numpy's BLAS on two threads for the test (whatever this machine's core count), restored after."""
    if not _blas_threads():
        pytest.skip("numpy's BLAS has no pthreads thread pool that threadpoolctl can see")
    original = max(_blas_threads())
    _set_blas_threads(2)
    assert _blas_threads() == {2}
    yield
    _set_blas_threads(original)


def test_one_thread_blas_limits_inside_and_restores_after_the_last_caller(two_blas_threads):
    with one_thread_blas:
        assert _blas_threads() == {1}
        with one_thread_blas:  # Re-entrant: the inner exit must not restore while the outer is inside.
            assert _blas_threads() == {1}
        assert _blas_threads() == {1}
    assert _blas_threads() == {2}

    # Two caller threads overlapping: the first to leave must not restore while the other is still inside.
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with one_thread_blas:
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second():
        first_in.wait(10)
        with one_thread_blas:
            second_in.set()
            first_out.wait(10)
            seen["after first left"] = _blas_threads()

    threads = [threading.Thread(target=f) for f in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen["after first left"] == {1}
    assert _blas_threads() == {2}


def test_one_thread_blas_restores_after_an_exception(two_blas_threads):
    with pytest.raises(RuntimeError, match="boom"):
        with one_thread_blas:
            raise RuntimeError("boom")
    assert _blas_threads() == {2}


def test_a_callers_own_blas_limit_keeps_control(two_blas_threads):
    with ThreadpoolController().limit(limits=2, user_api="blas"):
        with one_thread_blas:
            assert _blas_threads() == {2}
    with one_thread_blas:  # And once the caller's limit is gone, the search's own applies again.
        assert _blas_threads() == {1}
    assert _blas_threads() == {2}


def test_search_in_chunks_splits_contiguously_and_concatenates_in_order():
    calls = []

    def search(a, b):
        calls.append((a, b))
        rows = np.arange(a, b)[:, None] * 10 + np.arange(3)
        return rows, rows.astype(np.float32) / 2

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        nq = 3 * MIN_CHUNK_QUERIES + 5
        rows, dist = search_in_chunks(search, nq, 3, lambda: pool)
        assert sorted(calls) == [(0, 65), (65, 131), (131, 197)]
        np.testing.assert_array_equal(rows, np.arange(nq)[:, None] * 10 + np.arange(3))
        np.testing.assert_array_equal(dist, rows / 2)
        # Too few queries per thread, or one thread: not split (the caller searches the batch whole).
        calls.clear()
        assert search_in_chunks(search, 3 * MIN_CHUNK_QUERIES - 1, 3, lambda: pool) is None
        assert search_in_chunks(search, 10_000, 1, lambda: pool) is None
        assert calls == []


def _unit_answer(rng, n, k, first_id, crowd_c):
    """n query rows of a unit holding entries first_id..first_id + 99: k distinct ones each, nearest first, ties
    in id order (what LoadedShard.search returns), crowded to at most ``crowd_c`` per group when given; some
    rows short of k."""
    from memory.search.filters import crowd
    num = first_id + rng.random((n, 100)).argsort(axis=1)[:, :3 * k]
    dist = (rng.integers(0, 5, num.shape) / 8).astype(np.float32)  # A coarse grid: many ties.
    order = np.lexsort((num, dist), axis=-1)  # Zero-padded ids: numeric order is id order.
    num, dist = np.take_along_axis(num, order, 1), np.take_along_axis(dist, order, 1)
    groups = np.char.add("g", (num % 5).astype(str))
    if crowd_c is None:
        cols = np.tile(np.arange(k), (n, 1))
    else:
        cols, _ = crowd(groups, np.ones(num.shape, bool), k, crowd_c)
    cols[rng.random(n) < 0.2, -2:] = -1
    valid, take = cols >= 0, np.maximum(cols, 0)

    def pick(a, fill):
        return np.where(valid, np.take_along_axis(a, take, 1), fill)
    return PartialTopK(pick(np.char.add("e", np.char.zfill(num.astype(str), 4)), ""),
                       pick(num % 7, -1).astype(np.int32), pick(dist, np.inf).astype(np.float32),
                       pick(rng.random(num.shape).astype(np.float32), np.float32(1.0)), None,
                       None if crowd_c is None else pick(groups, ""))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("crowd_c", [None, 1, 2])
def test_merge_partials_with_rows_equals_merging_scattered_partials(seed, crowd_c):
    """Partials answering different queries of a batch (routing) merged with rows= equal the merge of the same
    partials scattered to the whole batch: a query one partial answers keeps its list, ties by id included."""
    rng = np.random.default_rng(seed)
    nq, k, units = 60, 5, 4
    visit = rng.random((nq, units)) < [0.9, 0.4, 0.3, 0.2]
    visit[rng.random(nq) < 0.1] = False  # Some queries searched nothing.
    rows = [np.flatnonzero(visit[:, u]) for u in range(units)]
    parts = [_unit_answer(rng, r.size, k, 100 * u, crowd_c) for u, r in enumerate(rows)]
    parts[1] = parts[1]._replace(weights=None)  # Unweighted partials count as weight 1.
    got = merge_partials(parts, k, rows=rows, num_queries=nq, max_per_group=crowd_c)
    want = merge_partials([scatter(p, r, nq) for p, r in zip(parts, rows)], k, max_per_group=crowd_c)
    for field in ("ids", "labels", "distances", "weights", "groups"):
        if getattr(want, field) is None:
            assert getattr(got, field) is None
        else:
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
    assert got.uris is None and (got.ids[~visit.any(axis=1)] == "").all()
    assert (visit.sum(axis=1) == 1).sum() > 10 and (visit.sum(axis=1) > 1).sum() > 10  # Both paths ran.
    # Rows in any order (a partial merged earlier lists its queries in first-seen order), a full one included.
    parts.append(_unit_answer(rng, nq, k, 1000, crowd_c))
    rows.append(np.arange(nq))
    want = merge_partials([scatter(p, r, nq) for p, r in zip(parts, rows)], k, max_per_group=crowd_c)
    shuffled = [rng.permutation(r.size) for r in rows]
    moved = [type(p)(*(None if a is None else a[o] for a in p)) for p, o in zip(parts, shuffled)]
    moved_rows = [r[o] for r, o in zip(rows, shuffled)]
    got = merge_partials(moved, k, rows=moved_rows, num_queries=nq, max_per_group=crowd_c)
    for field in ("ids", "labels", "distances", "weights"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
    assert got.uris is None and (want.groups is None) == (got.groups is None)
    alone = merge_partials(moved[-1:], k, rows=moved_rows[-1:], num_queries=nq, max_per_group=crowd_c)
    np.testing.assert_array_equal(alone.ids, parts[-1].ids)  # One partial, rows permuted: put back in order.
    with pytest.raises(ValueError, match="one row per query"):
        merge_partials(parts, k, rows=[r[:-1] for r in rows], num_queries=nq)


def scatter(partial: PartialTopK, rows: np.ndarray, n: int) -> PartialTopK:
    """``partial``'s rows placed at ``rows`` of an n-row partial whose other rows are all padding: the reference
    that merging by query rows is checked against (padding never wins `merge_partials`)."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.shape != (partial.ids.shape[0],):
        raise ValueError(f"scatter needs one row index per query: {rows.shape} for {partial.ids.shape[0]} queries")
    out = []
    for a, fill in zip(partial, (PAD_ID, -1, np.inf, 1.0, PAD_ID, PAD_ID)):
        if a is None:
            out.append(None)
            continue
        full = np.full((n,) + a.shape[1:], fill, dtype=a.dtype)
        full[rows] = a
        out.append(full)
    return PartialTopK(*out)


def test_scatter_places_rows_and_pads_the_rest():
    p = PartialTopK(np.array([["a", "b"], ["c", ""]]), np.array([[1, 2], [3, -1]], np.int32),
                    np.array([[0.1, 0.2], [0.3, np.inf]], np.float32), np.array([[0.5, 1.0], [0.25, 1.0]], np.float32))
    s = scatter(p, np.array([3, 0]), 4)
    assert s.ids.tolist() == [["c", ""], [PAD_ID, PAD_ID], [PAD_ID, PAD_ID], ["a", "b"]]
    assert s.labels.tolist() == [[3, -1], [-1, -1], [-1, -1], [1, 2]]
    assert np.isinf(s.distances[1:3]).all() and s.distances[3].tolist() == pytest.approx([0.1, 0.2])
    assert s.weights[1:3].tolist() == [[1.0, 1.0]] * 2 and s.uris is None and s.groups is None
    with pytest.raises(ValueError, match="one row index per query"):
        scatter(p, np.array([0]), 4)
