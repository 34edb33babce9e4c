"""Near-duplicate groups of a memory's entries, found with the memory's own search.

Entries within a cosine distance of each other, joined transitively, share a group id; attached as a
metadata column (memory.store.metadata, ``vmem metadata --near-duplicates``) it is what crowding
(``meta:COLUMN``, memory.search.filters.Crowding) limits per query.
"""

from __future__ import annotations

import numpy as np

from memory.visual_memory import VisualMemory


def near_duplicate_groups(memory: VisualMemory, max_distance: float, *, k: int = 10,
                          batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """A near-duplicate group id for every live entry, with the memory's own search.

    Two entries are near-duplicates when one is among the other's ``k`` nearest neighbours at cosine
    distance <= ``max_distance``; groups are the transitive closure (union-find). The group id is the
    smallest member id, so it does not depend on search order.

    Returns:
      (ids unicode [n], group ids unicode [n]) over the memory's live entries.
    """
    if not 0.0 <= float(max_distance) < 2.0:
        raise ValueError(f"max_distance must be a cosine distance in [0, 2), e.g. 0.02, got {max_distance!r}")
    ids = memory.live_entry_ids()
    parent = np.arange(ids.size)
    pos = {i: n for n, i in enumerate(ids.tolist())}

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for start in range(0, ids.size, batch):
        chunk = ids[start:start + batch]
        found = memory.search(memory.get_embeddings(chunk), min(k + 1, max(len(memory), 1)))
        close = (found.distances <= max_distance) & (found.ids != "")
        for q, j in zip(*np.nonzero(close)):
            a, b = find(start + int(q)), find(pos[str(found.ids[q, j])])
            if a != b:
                parent[max(a, b)] = min(a, b)  # ids are sorted, so the root is the smallest member id.
    roots = np.asarray([find(i) for i in range(ids.size)], dtype=np.int64)
    return ids, ids[roots] if ids.size else ids
