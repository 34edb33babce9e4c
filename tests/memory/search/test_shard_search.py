"""memory.search.shard_search helpers that VisualMemory.search runs its threads with."""

import concurrent.futures
import threading

import numpy as np
import pytest
from threadpoolctl import ThreadpoolController

from memory.search.shard_search import MIN_CHUNK_QUERIES, one_thread_blas, search_in_chunks


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
