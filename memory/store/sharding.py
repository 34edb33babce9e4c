"""Deterministic assignment of memory entries to shards."""

from __future__ import annotations

import enum
import hashlib

_SHARD_NAME_DIGITS = 5


class Sharding(enum.Enum):
    """How a build assigns entries to main shards.

    HASH: a stable hash of the id (`shard_for_id`); shards are statistically alike and every query visits
      every shard. Exact across shards with brute-force shards; the default.
    PARTITION: the shard owning the entry's nearest router centroid (memory.search.routing); each shard holds one
      region of the embedding space and a query visits only the shards its nearest centroids route it to.
      For large tree+AH memories, where searching every shard costs each shard's fixed per-query cost.
    """
    HASH = "hash"
    PARTITION = "partition"


def parse_sharding(value: "Sharding | str") -> Sharding:
    """Sharding from its enum or string value; ValueError naming the allowed values otherwise."""
    if isinstance(value, Sharding):
        return value
    try:
        return Sharding(value)
    except ValueError:
        raise ValueError(f"unknown sharding {value!r}; allowed: {[m.value for m in Sharding]}") from None


def shard_for_id(entry_id: str, num_shards: int) -> int:
    """Returns the shard index of an entry.

    Uses blake2b (default 64-byte digest) of the UTF-8 id: the first 8 digest bytes, big-endian, modulo
    ``num_shards``. Python's ``hash()`` is salted per process (PYTHONHASHSEED), so it would scatter the same
    id to different shards on different Beam workers; a cryptographic digest is stable across processes,
    machines and versions.

    Args:
      entry_id: The entry's unique id.
      num_shards: Number of shards, >= 1.

    Returns:
      An int in [0, num_shards).
    """
    if not isinstance(entry_id, str):
        raise TypeError(f"entry_id must be str, got {type(entry_id).__name__}: {entry_id!r}")
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be an int >= 1, got {num_shards!r}")
    digest = hashlib.blake2b(entry_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def shard_name(index: int, num_shards: int) -> str:
    """Returns the directory name of a shard, e.g. ``shard-00003-of-00016``."""
    if not 0 <= index < num_shards:
        raise ValueError(f"shard index {index} out of range for {num_shards} shards (allowed 0..{num_shards - 1})")
    return f"shard-{index:0{_SHARD_NAME_DIGITS}d}-of-{num_shards:0{_SHARD_NAME_DIGITS}d}"
