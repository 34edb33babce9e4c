"""How a region memory names its entries and records its grid (pure Python and numpy).

A region memory stores, for every image ``X``, one global entry with id ``X`` (the embedding a global memory
stores) and ``G * G`` region entries with ids ``X#r0`` .. ``X#r<G*G-1>`` (cells in row-major order, see
`memory.regions.pooling`), each with the image's label and source uri, in the same shards and shard format as
any entry. The image id is recoverable from every entry id (`image_ids_of`), so what selects images keeps
working on whole images: `whole_image_ids` expands an image id to all its entries (what forget tombstones), a
label or source-uri selection matches an image's entries together (they share both), and re-index moves rows
without looking at ids. Image ids that would read as region ids are refused when a region memory is built.

The grid is recorded in the manifest's build config under ``GRID_KEY`` (`region_grid`); a memory without it is a
global memory.
"""

from __future__ import annotations

import enum
import re
from typing import TYPE_CHECKING, Iterable, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from memory.store.manifest import Manifest

REGION_SEPARATOR = "#r"
GRID_KEY = "regions"
# The largest grid: a 7 x 7 feature map (EfficientNet-Lite0 at 224 px) has at most 7 cells a side.
MAX_GRID = 16
_REGION_ID = re.compile(r"^(?P<image>.+)#r(?P<region>0|[1-9][0-9]*)$", re.DOTALL)


class EntryKind(enum.Enum):
    """Which entries of a region memory a search may return (`memory.search.filters.QueryFilter.entries`)."""

    IMAGE = "image"  # Global entries, one per image: what a global memory holds.
    REGION = "region"  # Region entries, G * G per image.


class EntryRef(NamedTuple):
    """What an entry id names: its image and, for a region entry, the region index (None for the global one)."""
    image_id: str
    region: int | None


def check_grid(grid: int) -> int:
    """``grid`` as an int in [2, MAX_GRID].

    Raises:
      ValueError: naming the value and the allowed range.
    """
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or not 2 <= int(grid) <= MAX_GRID:
        raise ValueError(f"region grid must be an int in [2, {MAX_GRID}] (G x G regions per image), got {grid!r}; "
                         "e.g. --regions 2")
    return int(grid)


def region_id(image_id: str, region: int) -> str:
    """The id of region ``region`` of image ``image_id``: ``IMAGEID#r<region>``."""
    return f"{image_id}{REGION_SEPARATOR}{int(region)}"


def region_ids(image_ids: Iterable[str], grid: int) -> np.ndarray:
    """unicode [n, G*G]: the region entry ids of each image, regions in row-major cell order."""
    grid = check_grid(grid)
    ids = [str(i) for i in image_ids]
    return np.asarray([[region_id(i, r) for r in range(grid * grid)] for i in ids], dtype=str).reshape(
        len(ids), grid * grid)


def parse_entry_id(entry_id: str) -> EntryRef:
    """The image and region an entry id names (``"X#r3"`` -> ("X", 3); ``"X"`` -> ("X", None))."""
    match = _REGION_ID.match(entry_id)
    if match is None:
        return EntryRef(entry_id, None)
    return EntryRef(match["image"], int(match["region"]))


def is_region_id(ids: np.ndarray) -> np.ndarray:
    """bool, the shape of ``ids``: which ids are region entry ids."""
    flat = np.asarray(ids, dtype=str).ravel().tolist()
    return np.asarray([_REGION_ID.match(i) is not None for i in flat], dtype=bool).reshape(np.shape(ids))


def image_ids_of(ids: np.ndarray) -> np.ndarray:
    """unicode, the shape of ``ids``: the image id of each entry id (a global entry's id is its image id)."""
    flat = np.asarray(ids, dtype=str).ravel().tolist()
    return np.asarray([parse_entry_id(i).image_id for i in flat], dtype=str).reshape(np.shape(ids))


def check_image_ids(ids: Iterable[str]) -> None:
    """Refuses image ids a region memory could not tell from its region ids.

    Raises:
      ValueError: naming the first such ids and the fix.
    """
    bad = [i for i in ids if _REGION_ID.match(str(i))]
    if bad:
        raise ValueError(f"{len(bad)} image id(s) end like a region id ({REGION_SEPARATOR}<number>), e.g. "
                         f"{bad[:5]}; a region memory names its region entries that way, so rename those images "
                         "or build without regions")


def whole_image_ids(ids: np.ndarray, grid: int | None) -> np.ndarray:
    """Every entry id of the given images: the ids themselves, plus their region ids in a region memory.

    Args:
      ids: Image ids (unicode [n]).
      grid: The memory's grid (`region_grid`), None for a global memory (the ids are returned as they are).

    Returns:
      Sorted unique unicode ids.

    Raises:
      ValueError: a region id given in a region memory (its entries go with their image), naming it and the fix.
    """
    ids = np.unique(np.asarray(ids, dtype=str))
    if grid is None:
        return ids
    regions = ids[is_region_id(ids)]
    if regions.size:
        raise ValueError(f"{regions.size} region id(s) given, e.g. {regions[:5].tolist()}: a region memory forgets "
                         f"whole images, so pass the image id ({parse_entry_id(str(regions[0])).image_id!r}), which "
                         "removes its global and all its region entries")
    return np.unique(np.concatenate([ids, region_ids(ids.tolist(), grid).ravel()]))


def region_grid(manifest: Manifest) -> int | None:
    """The grid G of a region memory's manifest (``build_config[GRID_KEY]``), None for a global memory.

    Raises:
      ValueError: a recorded grid that is not an int in [2, MAX_GRID] (a damaged manifest).
    """
    grid = manifest.build_config.get(GRID_KEY)
    if not grid:
        return None
    return check_grid(grid)
