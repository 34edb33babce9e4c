"""shard_for_id / shard_name / l2_normalize."""

import numpy as np
import pytest

from memory.sharding import shard_for_id, shard_name
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
