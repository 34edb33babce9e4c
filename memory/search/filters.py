"""Filtered search and crowding: which entries may answer a query, and how many votes one group may cast.

**Filters** restrict a query's neighbours to entries with one of some labels, a source uri under a prefix,
and/or given values in metadata columns (memory.store.metadata). They are applied *before* the top-k cut, the way
forgetting is: inside each shard, the rows a filter excludes are treated exactly like tombstoned rows by
`memory.search.shard_search.search_live_rows` (bounded over-fetch, then a brute-force search over the allowed live
rows for any query left short). So a filtered query gets k allowed neighbours whenever k exist, and for
brute-force shards exactly the top-k a memory holding only the allowed entries would return.

**Crowding** (Vertex AI Vector Search's crowding tags): among a query's k neighbours at most ``max_per_group``
come from one group -- entries sharing a source-uri prefix, or a metadata column value such as a
near-duplicate group id (`memory.search.duplicates.near_duplicate_groups`). The crowded list is the greedy walk down
the distance order keeping an entry while its group has fewer than c kept, cut at k. That walk is exact under
sharding: an entry of the global crowded top-k is also in its own shard's crowded top-k, so shards crowd
their lists, the merge keeps every shard's list and crowds the union (`crowd`), in any merge order.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import re
import threading
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from memory.enums import parse_enum
from memory.regions.layout import EntryKind, is_region_id

_META = re.compile(r"^meta[.:](?P<col>[^=]+)$")


@dataclasses.dataclass(frozen=True)
class QueryFilter:
    """Which entries may be a query's neighbours (all given conditions must hold).

    Attributes:
      labels: Class names allowed (None: any).
      uri_prefix: Source-uri prefix the entry's recorded uri must start with (None: any).
      metadata: ``((column, (allowed values...)), ...)``: the entry's value in each column must be one of
        those values (an entry without metadata has no value and never matches).
      entries: In a region memory (memory.regions), only its global (IMAGE) or only its region (REGION) entries;
        None: any.
    """
    labels: tuple[str, ...] | None = None
    uri_prefix: str | None = None
    metadata: tuple[tuple[str, tuple[str, ...]], ...] = ()
    entries: EntryKind | None = None

    def __post_init__(self):
        if self.entries is not None:
            object.__setattr__(self, "entries", parse_enum(EntryKind, self.entries, "filter entries"))
        if self.labels is not None and not self.labels:
            raise ValueError("a filter's labels must name at least one class (or be None for any)")
        for col, values in self.metadata:
            if not col or not values:
                raise ValueError(f"metadata filter {col!r}: needs a column name and at least one value")

    @property
    def is_empty(self) -> bool:
        return self.labels is None and self.uri_prefix is None and not self.metadata and self.entries is None

    def key(self) -> str:
        """Canonical text of the filter: equal filters have equal keys."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.labels is not None:
            d["labels"] = sorted(self.labels)
        if self.uri_prefix is not None:
            d["uri_prefix"] = self.uri_prefix
        if self.metadata:
            d["metadata"] = {c: sorted(v) for c, v in sorted(self.metadata)}
        if self.entries is not None:
            d["entries"] = self.entries.value
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QueryFilter:
        unknown = set(d) - {"labels", "uri_prefix", "metadata", "entries"}
        if unknown:
            raise ValueError(f"unknown filter field(s) {sorted(unknown)}; allowed: labels (list of class names), "
                             "uri_prefix (string), metadata ({column: value or [values]}), entries (image or "
                             "region)")
        labels = d.get("labels")
        if isinstance(labels, str):
            labels = [labels]
        meta = d.get("metadata") or {}
        if not isinstance(meta, Mapping):
            raise ValueError(f"filter metadata must be an object {{column: value or [values]}}, got {meta!r}")
        return cls(labels=None if labels is None else tuple(str(x) for x in labels),
                   uri_prefix=None if d.get("uri_prefix") is None else str(d["uri_prefix"]),
                   metadata=tuple((str(c), tuple(str(x) for x in ([v] if isinstance(v, str) else v)))
                                  for c, v in sorted(meta.items())),
                   entries=d.get("entries"))

    @classmethod
    def parse(cls, spec: str) -> QueryFilter:
        """A filter from CLI text: ``;``-separated conditions, ``|`` between alternative values.

        ``label=shirt|coat``, ``uri=gs://bucket/web/``, ``meta:source=web|flickr`` (or ``meta.source=...``),
        combined as ``label=shirt|coat;meta:source=web``. A JSON object (``{"labels": [...], ...}``) works too.
        """
        spec = spec.strip()
        if spec.startswith("{"):
            try:
                return cls.from_dict(json.loads(spec))
            except json.JSONDecodeError as e:
                raise ValueError(f"filter {spec!r}: not valid JSON ({e})") from None
        labels, prefix, meta = None, None, []
        for cond in filter(None, (c.strip() for c in spec.split(";"))):
            name, sep, value = cond.partition("=")
            name = name.strip()
            if not sep or not value:
                raise ValueError(f"filter condition {cond!r}: expected NAME=VALUE (label=a|b, uri=PREFIX, "
                                 "meta:COLUMN=v1|v2)")
            if name in ("label", "labels"):
                labels = tuple(v for v in value.split("|") if v)
            elif name in ("uri", "uri_prefix"):
                prefix = value
            elif _META.match(name):
                meta.append((_META.match(name)["col"], tuple(v for v in value.split("|") if v)))
            else:
                raise ValueError(f"filter condition {cond!r}: unknown name {name!r}; use label=, uri= or "
                                 "meta:COLUMN=")
        if labels is None and prefix is None and not meta:
            raise ValueError(f"filter {spec!r} has no condition; e.g. 'label=shirt|coat' or 'uri=gs://b/web/'")
        return cls(labels=labels, uri_prefix=prefix, metadata=tuple(sorted(meta)))


def as_filters(filters: QueryFilter | Sequence[QueryFilter | None] | None, nq: int) -> list[QueryFilter | None]:
    """One filter (or None) per query from a single filter, a per-query sequence or None."""
    if filters is None or isinstance(filters, QueryFilter):
        return [None if filters is None or filters.is_empty else filters] * nq
    out = list(filters)
    if len(out) != nq:
        raise ValueError(f"{len(out)} filters for {nq} queries: give one filter for all or one per query")
    bad = [i for i, f in enumerate(out) if f is not None and not isinstance(f, QueryFilter)]
    if bad:
        raise ValueError(f"filter {bad[0]} is a {type(out[bad[0]]).__name__}, not a QueryFilter or None")
    return [None if f is None or f.is_empty else f for f in out]


class RowAttributes:
    """What filters and crowding read of a block of entry rows: labels, class names, uris, metadata values.

    ``uris`` and ``metadata`` are callables so that they are read only when a filter or crowding needs them.
    ``metadata(column)`` returns unicode [n] values ("" = no value). Keep one instance per block of rows: it
    memoises what it reads and derives (uris, metadata columns, each filter's admitted rows for the last
    `MASK_CACHE` filters, crowding groups), which every query batch would otherwise recompute over all rows.
    Safe to share between threads: each value is computed once, under a lock.
    """

    MASK_CACHE = 8

    def __init__(self, labels: np.ndarray, class_names: Sequence[str], uris: Callable[[], np.ndarray],
                 metadata: Callable[[str], np.ndarray], *, ids: np.ndarray | None = None):
        self.labels = np.asarray(labels)
        # Entry ids, for the region-memory entry filter (memory.regions.layout); None: that filter is refused.
        self.ids = None if ids is None else np.asarray(ids)
        self.class_names = tuple(class_names)
        self._uris = uris
        self._metadata = metadata
        self._memo: dict[Any, np.ndarray] = {}
        self._masks: dict[str, np.ndarray] = {}
        # Re-entrant: a value may derive from another (groups from uris, a filter's mask from a column).
        self._lock = threading.RLock()

    def memo(self, key: Any, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """``compute()``, once per key for this block of rows."""
        with self._lock:
            if key not in self._memo:
                self._memo[key] = compute()
            return self._memo[key]

    def uris(self) -> np.ndarray:
        return self.memo("uris", self._uris)

    def metadata(self, column: str) -> np.ndarray:
        return self.memo(("metadata", column), lambda: self._metadata(column))

    def allowed(self, f: QueryFilter) -> np.ndarray:
        """bool [n]: rows ``f`` admits."""
        key = f.key()
        with self._lock:
            if key not in self._masks:
                if len(self._masks) >= self.MASK_CACHE:
                    del self._masks[next(iter(self._masks))]
                self._masks[key] = self._allowed(f)
            return self._masks[key]

    def _allowed(self, f: QueryFilter) -> np.ndarray:
        ok = np.ones(self.labels.shape, dtype=bool)
        if f.labels is not None:
            unknown = sorted(set(f.labels) - set(self.class_names))
            if len(unknown) == len(set(f.labels)):
                raise ValueError(f"filter labels {unknown} are not classes of this memory; known: "
                                 f"{list(self.class_names)[:20]}")
            wanted = [i for i, c in enumerate(self.class_names) if c in set(f.labels)]
            ok &= np.isin(self.labels, wanted)
        if f.uri_prefix is not None:
            ok &= np.char.startswith(self.uris().astype(str), f.uri_prefix)
        for col, values in f.metadata:
            ok &= np.isin(self.metadata(col), np.asarray(values, dtype=str))
        if f.entries is not None:
            if self.ids is None:
                raise ValueError(f"an entries={f.entries.value} filter needs the rows' ids; build RowAttributes "
                                 "with ids=")
            ok &= self.memo("region rows", lambda: is_region_id(self.ids)) == (f.entries is EntryKind.REGION)
        return ok


def search_filtered(search: Callable[[np.ndarray, np.ndarray | None, str], tuple[np.ndarray, np.ndarray]],
                    queries: np.ndarray, k: int, dead: np.ndarray | None, filters: Sequence[QueryFilter | None],
                    attributes: RowAttributes) -> tuple[np.ndarray, np.ndarray]:
    """One shard's top-k per query under per-query filters: each distinct filter is searched once.

    Args:
      search: ``search(query_rows, excluded, key)`` -> (local rows, distances) of the shard's top-k live
        rows outside ``excluded`` (bool [n] or None) for those queries: `search_live_rows` with ``excluded``
        as its dead mask; ``key`` names the exclusion so the caller can cache its brute-force index.
      queries: float32 [nq, d] unit rows. k: neighbours. dead: the shard's forgotten rows (or None).
      filters: One per query (None = unfiltered).
      attributes: The shard's rows, for `RowAttributes.allowed`.

    Returns:
      (local rows int64 [nq, k], distances float32 [nq, k]), padding -1 / +inf.
    """
    nq = queries.shape[0]
    local = np.full((nq, k), -1, dtype=np.int64)
    dist = np.full((nq, k), np.inf, dtype=np.float32)
    groups: dict[str, list[int]] = {}
    by_key: dict[str, QueryFilter | None] = {}
    for q, f in enumerate(filters):
        key = "" if f is None else f.key()
        groups.setdefault(key, []).append(q)
        by_key[key] = f
    for key, rows in groups.items():
        f = by_key[key]
        excluded = dead
        if f is not None:
            excluded = ~attributes.allowed(f) if dead is None else (dead | ~attributes.allowed(f))
            excluded = excluded if excluded.any() else None
        rows_arr = np.asarray(rows)
        found, found_dist = search(queries if rows_arr.size == nq else queries[rows_arr], excluded,
                                   "dead" if f is None else key)
        width = min(k, found.shape[1])
        local[rows_arr, :width], dist[rows_arr, :width] = found[:, :width], found_dist[:, :width]
    return local, dist


# ---------------------------------------------------------------------------------------------- crowding


@dataclasses.dataclass(frozen=True)
class Crowding:
    """At most ``max_per_group`` of a query's neighbours from one group.

    Attributes:
      max_per_group: c >= 1.
      by: ``"uri"`` (the parent folder of the source uri), ``"uri:N"`` (its first N path components after
        the scheme) or ``"meta:COLUMN"`` (a metadata column, e.g. a near-duplicate group id). Entries
        without a group (no metadata value) are each a group of their own.
    """
    max_per_group: int
    by: str = "uri"

    def __post_init__(self):
        if isinstance(self.max_per_group, bool) or not isinstance(self.max_per_group, (int, np.integer)) \
                or self.max_per_group < 1:
            raise ValueError(f"crowding max_per_group must be an int >= 1, got {self.max_per_group!r}")
        if not (self.by == "uri" or re.fullmatch(r"uri:[1-9][0-9]*", self.by) or
                (self.by.startswith("meta:") and len(self.by) > 5)):
            raise ValueError(f"crowding by {self.by!r}: use 'uri' (parent folder), 'uri:N' (first N path "
                             "components) or 'meta:COLUMN' (a metadata column, e.g. meta:near_dup)")

    @classmethod
    def parse(cls, spec: str) -> Crowding:
        """``C`` or ``C:BY`` (e.g. ``1:meta:near_dup``, ``2:uri:3``)."""
        head, _, by = spec.partition(":")
        try:
            c = int(head)
        except ValueError:
            raise ValueError(f"crowding {spec!r}: expected C or C:BY with an integer C >= 1, e.g. 2 or "
                             "1:meta:near_dup") from None
        return cls(c, by or "uri")

    def groups(self, attributes: RowAttributes) -> np.ndarray:
        """unicode [n] group key of each row ("" = a group of its own); computed once per block of rows."""
        return attributes.memo(("groups", self.by), lambda: self._groups(attributes))

    def _groups(self, attributes: RowAttributes) -> np.ndarray:
        if self.by.startswith("meta:"):
            return attributes.metadata(self.by[5:]).astype(str)
        uris = attributes.uris().astype(str)
        if self.by == "uri":
            return np.asarray([posixpath.dirname(u) for u in uris.tolist()], dtype=str).reshape(uris.shape)
        depth = int(self.by[4:])
        return np.asarray([uri_prefix(u, depth) for u in uris.tolist()], dtype=str).reshape(uris.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"max_per_group": int(self.max_per_group), "by": self.by}


def uri_prefix(uri: str, depth: int) -> str:
    """The scheme plus the first ``depth`` path components of ``uri`` (``gs://b/x/y.png``, 1 -> ``gs://b``)."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        scheme, rest = "", uri
    parts = rest.lstrip("/").split("/")
    lead = "/" if not sep and uri.startswith("/") else ""
    return (scheme + sep if sep else "") + lead + "/".join(parts[:depth])


def crowd(groups: np.ndarray, valid: np.ndarray, k: int, max_per_group: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy crowding of neighbour lists.

    Args:
      groups: unicode [nq, K] group key of each neighbour ("" = its own group), nearest first.
      valid: bool [nq, K] real neighbours (False = padding).
      k: Neighbours to keep. max_per_group: c.

    Returns:
      (cols int64 [nq, k] positions kept, -1 padding; short bool [nq]: fewer than k kept although the list
      was full, i.e. the list was too short to tell -- the caller fetches more).
    """
    nq, width = groups.shape
    cols = np.full((nq, k), -1, dtype=np.int64)
    short = np.zeros(nq, dtype=bool)
    for q in range(nq):
        seen: dict[str, int] = {}
        n = 0
        for j in range(width):
            if not valid[q, j]:
                continue
            g = groups[q, j]
            if g:
                if seen.get(g, 0) >= max_per_group:
                    continue
                seen[g] = seen.get(g, 0) + 1
            cols[q, n] = j
            n += 1
            if n == k:
                break
        short[q] = n < k and bool(valid[q].all())
    return cols, short


def crowded_search(search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], nq: int, k: int,
                   group_of: Callable[[np.ndarray], np.ndarray], max_per_group: int, available: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Exact crowded top-k: fetch 4k (at least k + 64), crowd, and fetch 4x more for queries left short.

    Args:
      search: ``search(query_indices, n)`` -> (rows [m, n], distances [m, n]) of those queries, nearest
        first, padding -1 / inf (filters, forgetting and routing are the callee's business).
      nq: Queries. k: neighbours kept. group_of: rows -> unicode group keys (same shape).
      max_per_group: c. available: rows that can be returned at all (the fetch never exceeds it).

    Returns:
      (rows int64 [nq, k], distances float32 [nq, k]), padding -1 / +inf.
    """
    out_rows = np.full((nq, k), -1, dtype=np.int64)
    out_dist = np.full((nq, k), np.inf, dtype=np.float32)
    todo = np.arange(nq)
    available = max(int(available), 1)
    fetch = min(max(4 * k, k + 64), available)
    while todo.size:
        rows, dist = search(todo, fetch)
        valid = rows >= 0
        groups = np.where(valid, group_of(np.maximum(rows, 0)), "")
        cols, short = crowd(groups, valid, k, max_per_group)
        take = np.maximum(cols, 0)
        ok = ~short | (fetch >= available)
        sel = todo[ok]
        r = np.take_along_axis(rows, take, axis=1)[ok]
        d = np.take_along_axis(dist, take, axis=1)[ok]
        out_rows[sel] = np.where(cols[ok] >= 0, r, -1)
        out_dist[sel] = np.where(cols[ok] >= 0, d, np.inf)
        todo = todo[~ok]
        fetch = min(fetch * 4, available)
    return out_rows, out_dist
