"""evaluation.vote_report.count_votes over streamed neighbour files: bounded memory, the answer of one vote."""

import tracemalloc

import numpy as np
import pytest

from evaluation import neighbors_io
from evaluation.metrics import CorrectCounts
from evaluation.neighbors_io import NeighborRecord, write_records
from evaluation.vote_report import NoRecordsError, count_votes
from memory.decide.voting import predict_all_k


def random_records(n: int, *, seed: int, longest: int = 30, weighted: bool = False, offset: int = 0
                   ) -> list[NeighborRecord]:
    """Lists of 0..longest neighbours (most of full length), with tied distances here and there."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        m = int(rng.integers(0, longest + 1)) if rng.random() < 0.4 else longest
        d = np.sort(rng.random(m)).round(3).tolist()
        labels = rng.integers(0, 6, m).tolist()
        out.append(NeighborRecord(f"q{offset + i}", int(rng.integers(0, 7)), [f"e{j}" for j in range(m)], labels, d,
                                  rng.random(m).round(3).tolist() if weighted else None))
    return out


def _one_vote(records, k_max, **kw):
    labels, distances, true, weights = neighbors_io.to_arrays(records, k_max)
    return CorrectCounts.of(predict_all_k(labels, distances, k_max=k_max, entry_weights=weights, **kw), true)


@pytest.mark.parametrize("k_max", [None, 1, 7, 30, 10 ** 9])
@pytest.mark.parametrize("weighted", [False, True])
def test_chunks_of_any_width_count_what_one_padded_vote_counts(k_max, weighted):
    # Sorted by length, so later chunks are wider than earlier ones: the earlier counts are widened.
    records = sorted(random_records(300, seed=1, weighted=weighted), key=lambda r: len(r.neighbor_labels))
    votes = count_votes(records, k_max=k_max, chunk_records=16, unpruned=True)
    width = 30 if k_max is None else min(k_max, 30)  # Capped at the longest list.
    assert votes.counts.k_max == width and votes.weighted == weighted
    assert votes.counts.table() == _one_vote(records, width).table()
    if weighted:
        labels, distances, true, _ = neighbors_io.to_arrays(records, width)
        assert votes.unpruned.table() == CorrectCounts.of(predict_all_k(labels, distances, k_max=width), true).table()
    with pytest.raises(NoRecordsError, match="no neighbour records to vote on"):
        count_votes([], k_max=k_max)


def test_widened_counts_repeat_the_last_k_and_never_narrow():
    c = CorrectCounts(queries=3, correct={"rank": np.array([1, 2], dtype=np.int64)})
    assert c.widened(4).correct["rank"].tolist() == [1, 2, 2, 2] and c.widened(2).k_max == 2
    with pytest.raises(ValueError, match="cannot widen counts for k up to 2 to k_max 1"):
        c.widened(1)


def _peak_bytes(path) -> int:
    tracemalloc.start()
    try:
        votes = count_votes(neighbors_io.iter_neighbor_files([path]), chunk_records=256)
        return tracemalloc.get_traced_memory()[1], votes.counts.queries
    finally:
        tracemalloc.stop()


def test_memory_of_a_streamed_vote_does_not_grow_with_the_file(tmp_path):
    small, large = tmp_path / "n.jsonl", tmp_path / "4n.jsonl"
    write_records(small, random_records(1500, seed=2))
    write_records(large, [r for part in range(4) for r in random_records(1500, seed=2, offset=1500 * part)])
    (peak_small, n_small), (peak_large, n_large) = _peak_bytes(small), _peak_bytes(large)
    assert (n_small, n_large) == (1500, 6000)
    # A list of every record would take 4x; the chunk's records and arrays are the same for both files, and
    # only the 8-byte hash of each query id (the repeat check) grows.
    assert peak_large < 1.25 * peak_small, (peak_small, peak_large)


def test_a_repeated_query_id_is_named_after_the_stream_ends(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_records(a, random_records(50, seed=3))
    write_records(b, random_records(5, seed=4, offset=48))  # q48 and q49 again.
    stream = neighbors_io.iter_neighbor_files([a, b])
    with pytest.raises(neighbors_io.NeighborFormatError, match=rf"^query id 'q48' occurs twice: in {a} and {b}$"):
        count_votes(stream, chunk_records=8)
