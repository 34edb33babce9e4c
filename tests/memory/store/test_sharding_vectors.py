"""shard_for_id / shard_name / l2_normalize."""

import numpy as np
import pytest

from memory.store.sharding import shard_for_id, shard_name
from memory.vectors import l2_normalize


def test_shard_for_id_is_pinned():
    # Hard-coded: changing the hash would silently move entries between shards of existing memories.
    assert [shard_for_id(i, 16) for i in ("img-000000", "img-000001", "fashion/train/12345", "ünïcode-id", "")] == [
        13, 15, 11, 1, 3]
    assert [shard_for_id(i, 3) for i in ("img-000000", "img-000001", "fashion/train/12345")] == [2, 0, 1]
    assert shard_for_id("img-000000", 1000003) == 77749
    assert shard_for_id("anything", 1) == 0


def test_shard_for_id_roughly_uniform():
    counts = np.bincount([shard_for_id(f"img-{i:06d}", 16) for i in range(16000)], minlength=16)
    # Binomial(16000, 1/16): sd ~ 31; 5 sd bounds.
    assert counts.min() > 1000 - 155 and counts.max() < 1000 + 155, counts


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_shard_for_id_rejects_bad_num_shards(bad):
    with pytest.raises(ValueError, match="num_shards"):
        shard_for_id("x", bad)


def test_shard_name():
    assert shard_name(3, 16) == "shard-00003-of-00016"
    assert shard_name(0, 1) == "shard-00000-of-00001"
    with pytest.raises(ValueError, match="out of range"):
        shard_name(16, 16)


def test_l2_normalize():
    x = np.array([[3.0, 4.0], [0.0, -2.0]])
    y = l2_normalize(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, [[0.6, 0.8], [0.0, -1.0]], rtol=1e-7)
    with pytest.raises(ValueError, match="row 1"):
        l2_normalize(np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="row 0"):
        l2_normalize(np.array([[np.nan, 1.0]]))


def test_l2_normalize_keeps_unit_float32_rows():
    rng = np.random.default_rng(0)
    unit = l2_normalize(rng.normal(size=(50, 1280)).astype(np.float32))
    norms = np.linalg.norm(unit.astype(np.float64), axis=1)
    assert np.abs(norms - 1).max() < 1e-6
    # Already unit: the same array back, nothing rescaled.
    assert l2_normalize(unit) is unit
    # Mixed: only the off-unit rows are rescaled (one of them too large for a float32 sum of squares);
    # the unit rows keep their exact bits.
    mixed = unit.copy()
    mixed[[3, 17]] *= np.float32(3.0)
    mixed[40] *= np.float32(1e30)
    got = l2_normalize(mixed)
    assert got is not mixed and got.dtype == np.float32
    keep = np.setdiff1d(np.arange(50), [3, 17, 40])
    np.testing.assert_array_equal(got[keep], unit[keep])
    np.testing.assert_allclose(got[[3, 17, 40]], unit[[3, 17, 40]], rtol=0, atol=1e-6)
    assert mixed[3, 0] == unit[3, 0] * np.float32(3.0)  # The input is left alone.
    # float64 input: always rescaled, float32 out.
    np.testing.assert_allclose(l2_normalize(unit.astype(np.float64)), unit, rtol=0, atol=1e-7)


def test_l2_normalize_names_the_bad_row_among_unit_rows():
    unit = np.eye(6, 4, dtype=np.float32)[:4]
    bad = np.concatenate([unit, np.zeros((1, 4), np.float32), unit])
    with pytest.raises(ValueError, match=r"row 4: norm 0\.0 .*1 such row"):
        l2_normalize(bad)
    with pytest.raises(ValueError, match="row 12: "):  # first_row: a chunk starting at row 8 of the caller's batch.
        l2_normalize(bad, first_row=8)
    nan = unit.copy()
    nan[2, 1] = np.nan
    with pytest.raises(ValueError, match="row 2: norm nan"):
        l2_normalize(nan)
