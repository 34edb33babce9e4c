"""Telling a query unlike anything in memory, fitted without out-of-memory examples (pure numpy).

A vote's calibrated confidence (memory.decide.confidence) is fitted on held-out queries of the memory's own
classes, so it says how often such a vote is right; it cannot say that a query is of a class the memory has
never seen. Deep-kNN out-of-distribution detection (Sun et al. 2022, "Out-of-distribution detection with deep
nearest neighbors") can, with no such class at hand: a query whose neighbours are farther than the memory's
neighbours usually are is unlike anything in memory. "Usually" is measured on the same calibration split --
queries the memory never saw, of classes it holds -- by a statistic ``t`` of each (an
:class:`OutOfMemoryStatistic`):

  p(t) = (1 + #{calibration queries with statistic <= t}) / (n + 1)

is a conformal p-value of "this query is as close to the memory as an in-memory one": for an in-memory query
(exchangeable with the calibration split) ``P(p <= a) <= a`` for every ``a``. An :class:`OutOfMemoryTest` stores
the calibration statistics (as at most ``MAX_KNOTS`` order statistics) and a level (default
``DEFAULT_LEVEL``); a query with ``p < level`` is unlike anything in memory.

The statistic is a neighbour similarity -- the nearest's, or the k-th's, k being the calibrated vote's, so a
classification needs no extra neighbours -- or (``kth_relative``) the k-th similarity both as it is and
relative to the memory's own: minus the mean of the k neighbours' own k-th neighbour similarities among the
memory's entries (:func:`relative_similarity`; a self-search of the memory at calibration time stores each
entry's, :class:`EntrySimilarities`, next to the calibration), so that a query in a sparse region is judged
against that region. Its two conformal p-values are combined by Fisher's method (``log p1 + log p2``), whose
own conformal p-value on the split is the test's.

It is combined with the calibrated in-memory confidence ``p_in`` by abstaining when either says so: a query
the test flags is abstained on as unlike anything in memory (:class:`AbstainReason` ``UNLIKE_MEMORY``), and
one whose ``p_in`` is below the asked threshold as a split vote (``SPLIT_VOTE``). The two answer different
questions: ``p_in`` is the probability that the vote is right *given* the query's class is in memory, and the
test is evidence against that premise. Folding them into one probability, ``p_in * P(in memory | query)``,
needs ``P(in memory | query)``, which takes out-of-memory examples or a prior the memory does not have; and a
product of ``p_in`` with the p-value (or with ``min(1, p / level)``) both separates in- from out-of-memory
queries worse than the p-value alone and breaks ``p_in``'s calibration, since among in-memory queries a far
neighbour does not make the vote less often right (docs/paper.md, abstain). Kept apart, the confidence
stays calibrated and the test separates as well as its statistic does.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import io
from typing import Any, NamedTuple

import numpy as np

from memory.enums import parse_enum

__all__ = ["DEFAULT_LEVEL", "DEFAULT_STATISTIC", "ENTRY_SIMILARITY_DIR", "MAX_KNOTS", "AbstainReason", "EntrySimilarities",
           "EntrySimilarityRef", "OutOfMemoryStatistic", "OutOfMemoryTest", "conformal_p_value",
           "fit_out_of_memory_test", "relative_similarity"]

DEFAULT_LEVEL = 0.05
# Order statistics kept of the calibration similarities: p-values to about 0.001, a few kB in the manifest.
MAX_KNOTS = 1001
# Where a memory keeps its entries' own k-th neighbour similarities (content-addressed .npz files).
ENTRY_SIMILARITY_DIR = "calibration"


class AbstainReason(enum.Enum):
    """Why a memory abstained."""
    UNLIKE_MEMORY = "unlike_memory"
    SPLIT_VOTE = "split_vote"

    @classmethod
    def parse(cls, name: str | AbstainReason) -> AbstainReason:
        return parse_enum(cls, name, "abstain reason")

    @property
    def text(self) -> str:
        """The reason in words."""
        return {AbstainReason.UNLIKE_MEMORY: "unlike anything in memory",
                AbstainReason.SPLIT_VOTE: "the vote is split"}[self]


class OutOfMemoryStatistic(enum.Enum):
    """What the test compares with the calibration split.

    ``nearest``: the nearest neighbour's similarity (deep-kNN's k = 1). ``kth``: the vote's k-th neighbour's.
    ``kth_relative`` (the default): the k-th neighbour's similarity both as it is and relative to the memory's
    own, the two conformal p-values combined by Fisher's method (:func:`relative_similarity`). The raw
    similarities disagree between the bundled datasets (the k-th separates unseen Fashion-MNIST classes
    better, the nearest unseen MNIST digits); the combination separates better than either on both
    (docs/paper.md, abstain).
    """
    NEAREST = "nearest"
    KTH = "kth"
    KTH_RELATIVE = "kth_relative"

    @classmethod
    def parse(cls, name: str | OutOfMemoryStatistic) -> OutOfMemoryStatistic:
        return parse_enum(cls, name, "out-of-memory statistic")

    @property
    def needs_entries(self) -> bool:
        """Whether the test reads the memory's entries' own k-th neighbour similarities (`EntrySimilarities`)."""
        return self is OutOfMemoryStatistic.KTH_RELATIVE

    def of(self, vc: Any) -> np.ndarray:
        """The neighbour similarity this statistic reads of each query of a
        ``memory.decide.confidence.VoteConfidence``: the nearest's, or the k-th's."""
        return vc.similarity if self is OutOfMemoryStatistic.NEAREST else vc.kth_similarity


# What `vmem calibrate` fits by default (docs/paper.md, abstain, has the comparison).
DEFAULT_STATISTIC = OutOfMemoryStatistic.KTH_RELATIVE


def conformal_p_value(knots: np.ndarray, queries: int, x: np.ndarray) -> np.ndarray:
    """``(1 + #{calibration values <= x}) / (n + 1)`` for each ``x`` (any shape), in ``[1 / (n + 1), 1]``.

    Args:
      knots: Non-decreasing calibration values, or evenly spaced order statistics of ``queries`` of them.
      queries: ``n``, the calibration values they stand for.
      x: Values to test; NaN (nothing to test) gives 1.
    """
    x = np.asarray(x, dtype=np.float64)
    knots = np.asarray(knots, dtype=np.float64)
    below = np.searchsorted(knots, np.nan_to_num(x, nan=np.inf), side="right") / knots.size
    return np.where(np.isnan(x), 1.0, (1.0 + queries * below) / (queries + 1.0))


def relative_similarity(kth_similarity: np.ndarray, neighbor_kth: np.ndarray) -> np.ndarray:
    """A query's k-th neighbour similarity relative to the memory's own around it (a local-density correction).

    ``s_k(q) - mean_j s_k(j)`` over the query's first k neighbours j, where ``s_k(j)`` is entry j's own k-th
    neighbour similarity among the other entries (`EntrySimilarities`). A query in a sparse part of the memory
    is not unlike it for being as far from its neighbours as they are from theirs (local outlier factor's
    idea, on similarities); one much farther is.

    Args:
      kth_similarity: ``[nq]`` each query's k-th neighbour similarity.
      neighbor_kth: ``[nq, k]`` each neighbour's own k-th similarity; NaN for one without (padding, an entry
        added after the calibration), left out of the mean.

    Returns:
      ``[nq]`` float64; NaN for a query none of whose neighbours has one.
    """
    s = np.asarray(kth_similarity, dtype=np.float64)
    nb = np.asarray(neighbor_kth, dtype=np.float64)
    if nb.ndim != 2 or nb.shape[0] != s.shape[0]:
        raise ValueError(f"neighbor_kth must be [{s.shape[0]}, k] (one row per query), got shape {nb.shape}")
    known = ~np.isnan(nb)
    counts = known.sum(axis=1)
    mean = np.where(known, nb, 0.0).sum(axis=1) / np.maximum(counts, 1)
    return np.where(counts > 0, s - mean, np.nan)


class EntrySimilarityRef(NamedTuple):
    """Where a test's `EntrySimilarities` are stored: a root-relative path, its sha256, entries and k."""
    path: str
    sha256: str
    count: int
    k: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self._asdict())

    @classmethod
    def from_dict(cls, d: Any) -> EntrySimilarityRef:
        if not isinstance(d, dict) or sorted(d) != sorted(cls._fields):
            raise ValueError(f"out_of_memory entries must be an object with fields {list(cls._fields)}, got {d!r}")
        return cls(path=str(d["path"]), sha256=str(d["sha256"]), count=int(d["count"]), k=int(d["k"]))


@dataclasses.dataclass(frozen=True)
class EntrySimilarities:
    """Each memory entry's own k-th neighbour similarity among the other entries (a self-search, leave-one-out).

    Attributes:
      ids: ``[n]`` entry ids, sorted.
      similarity: ``[n]`` float32, each entry's k-th neighbour similarity.
      k: The k.
    """
    ids: np.ndarray
    similarity: np.ndarray
    k: int

    def __post_init__(self):
        ids, sim = np.asarray(self.ids, dtype=str), np.asarray(self.similarity, dtype=np.float32)
        if ids.ndim != 1 or sim.shape != ids.shape or ids.size == 0:
            raise ValueError(f"entry similarities need as many similarities as ids (>= 1), got {sim.shape} and "
                             f"{ids.shape}")
        if (ids[1:] <= ids[:-1]).any():
            raise ValueError("entry similarity ids must be sorted and unique")
        if not np.isfinite(sim).all():
            raise ValueError("entry similarities contain NaN or inf")
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "similarity", sim)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """float64 of ``ids``'s shape: each id's similarity, NaN for an id not listed (padding "" included)."""
        ids = np.asarray(ids, dtype=str)
        out = np.full(ids.shape, np.nan)
        pos = np.clip(np.searchsorted(self.ids, ids), 0, self.ids.size - 1)
        hit = self.ids[pos] == ids
        out[hit] = self.similarity[pos[hit]]
        return out

    def to_bytes(self) -> bytes:
        """A ``.npy`` of (id, similarity) records: deterministic bytes, no pickle."""
        width = max(1, max(len(i) for i in self.ids.tolist()))
        table = np.empty(self.ids.size, dtype=[("id", f"<U{width}"), ("similarity", "<f4")])
        table["id"], table["similarity"] = self.ids, self.similarity
        buf = io.BytesIO()
        np.save(buf, table, allow_pickle=False)
        return buf.getvalue()

    def ref(self) -> EntrySimilarityRef:
        """Where `to_bytes` is stored: named by its content."""
        digest = hashlib.sha256(self.to_bytes()).hexdigest()
        return EntrySimilarityRef(path=f"{ENTRY_SIMILARITY_DIR}/entry-similarity-k{self.k}-{digest[:16]}.npy",
                                  sha256=digest, count=int(self.ids.size), k=int(self.k))

    @classmethod
    def from_bytes(cls, blob: bytes, ref: EntrySimilarityRef) -> EntrySimilarities:
        """Parses `to_bytes` output, checked against its ``ref``.

        Raises:
          ValueError: naming the file, when its sha256 or entry count differs from the ref's.
        """
        digest = hashlib.sha256(blob).hexdigest()
        if digest != ref.sha256:
            raise ValueError(f"entry similarity file {ref.path} has sha256 {digest[:16]}..., the calibration "
                             f"recorded {ref.sha256[:16]}...; re-run `vmem calibrate`")
        table = np.load(io.BytesIO(blob), allow_pickle=False)
        if table.shape != (ref.count,):
            raise ValueError(f"entry similarity file {ref.path} holds {table.shape} entries, the calibration "
                             f"recorded {ref.count}; re-run `vmem calibrate`")
        return cls(ids=table["id"], similarity=table["similarity"], k=ref.k)


@dataclasses.dataclass(frozen=True)
class OutOfMemoryTest:
    """A calibration split's neighbour statistic and the level below which a query is out of memory.

    Attributes:
      level: Flag a query when its p-value is below this, in (0, 1); at most this fraction of in-memory
        queries is flagged.
      knots: Non-decreasing values of the statistic on the calibration queries, or ``MAX_KNOTS`` evenly spaced
        order statistics of them: similarities in [-1, 1] (``nearest``, ``kth``), or for ``kth_relative`` the
        sum of the two log p-values (<= 0).
      queries: Calibration queries they come from (``>= len(knots)``).
      statistic: What is compared.
      parts: ``kth_relative`` only: the calibration queries' k-th similarities and relative similarities (as
        knots), the two p-values Fisher's method combines; empty otherwise.
      entries: ``kth_relative`` only: where the memory's `EntrySimilarities` are stored.
      entry_table: Those similarities, once read (`with_entries`); never serialized.
    """
    level: float
    knots: tuple[float, ...]
    queries: int
    statistic: OutOfMemoryStatistic = OutOfMemoryStatistic.NEAREST
    parts: tuple[tuple[float, ...], ...] = ()
    entries: EntrySimilarityRef | None = None
    entry_table: EntrySimilarities | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not (isinstance(self.level, (int, float)) and 0.0 < float(self.level) < 1.0):
            raise ValueError(f"out-of-memory level must be a probability in (0, 1) (e.g. {DEFAULT_LEVEL}), "
                             f"got {self.level!r}")
        object.__setattr__(self, "statistic", OutOfMemoryStatistic.parse(self.statistic))
        relative = self.statistic.needs_entries
        lo, hi = (-np.inf, 0.0) if relative else (-1.0, 1.0)
        _check_knots("knots", self.knots, lo, hi, "sums of log p-values <= 0" if relative else "similarities in [-1, 1]")
        if not isinstance(self.queries, int) or self.queries < len(self.knots):
            raise ValueError(f"out-of-memory queries must be an int >= the {len(self.knots)} knots, got "
                             f"{self.queries!r}")
        if relative:
            if len(self.parts) != 2 or self.entries is None:
                raise ValueError(f"the {self.statistic.value} test needs parts (the k-th and relative similarities' "
                                 "knots) and entries (the memory's entry similarities); re-run `vmem calibrate`")
            for name, part, bound in zip(("k-th similarity", "relative similarity"), self.parts, (1.0, 2.0)):
                _check_knots(f"{name} knots", part, -bound, bound, f"values in [{-bound:g}, {bound:g}]")
                if len(part) > self.queries:
                    raise ValueError(f"out-of-memory {name} knots ({len(part)}) exceed the {self.queries} queries")
        elif self.parts or self.entries is not None:
            raise ValueError(f"parts and entries belong to the kth_relative test, not {self.statistic.value}")
        if self.entry_table is not None and (self.entries is None or self.entry_table.k != self.entries.k):
            raise ValueError("entry_table must be the test's own entries (same k)")

    def similarity_of(self, vc: Any) -> np.ndarray:
        """The neighbour similarity the statistic reads, of each query of a ``VoteConfidence``."""
        return self.statistic.of(vc)

    def with_entries(self, table: EntrySimilarities) -> OutOfMemoryTest:
        """This test with its entry similarities read (`memory.decide.confidence.memory_calibration` does it)."""
        return dataclasses.replace(self, entry_table=table)

    def statistic_of(self, vc: Any, neighbor_ids: np.ndarray | None = None) -> np.ndarray:
        """The statistic of each query of a ``VoteConfidence`` (higher: more like the memory).

        Args:
          vc: The queries' votes.
          neighbor_ids: ``[nq, >= k]`` their neighbours' entry ids, nearest first ("" padding); needed by
            ``kth_relative`` only.

        Raises:
          ValueError: ``kth_relative`` without neighbour ids or without its entry similarities read.
        """
        s = self.similarity_of(vc)
        if not self.statistic.needs_entries:
            return np.asarray(s, dtype=np.float64)
        if neighbor_ids is None or self.entry_table is None:
            raise ValueError("the kth_relative out-of-memory test needs the neighbours' ids and the memory's entry "
                             "similarities (memory_calibration(manifest, root=...) reads them)")
        neighbor_kth = self.entry_table.lookup(np.asarray(neighbor_ids)[:, :self.entries.k])
        return _fisher(self.parts, self.queries, s, relative_similarity(s, neighbor_kth))

    def p_value(self, statistic: np.ndarray) -> np.ndarray:
        """Conformal p-value of each value of the statistic (any shape), in ``[1 / (n + 1), 1]``."""
        return conformal_p_value(np.asarray(self.knots), self.queries, statistic)

    def p_values(self, vc: Any, neighbor_ids: np.ndarray | None = None) -> np.ndarray:
        """`p_value` of `statistic_of`."""
        return self.p_value(self.statistic_of(vc, neighbor_ids))

    def flags(self, statistic: np.ndarray) -> np.ndarray:
        """Whether each query is unlike anything in memory (``p < level``)."""
        return self.p_value(statistic) < self.level

    def describe(self) -> str:
        which = {OutOfMemoryStatistic.NEAREST: "nearest neighbour similarity",
                 OutOfMemoryStatistic.KTH: "k-th neighbour similarity",
                 OutOfMemoryStatistic.KTH_RELATIVE: "k-th neighbour similarity, as it is and relative to its "
                                                    "neighbours' own (Fisher's method)"}[self.statistic]
        return f"out of memory below the {100 * self.level:g}th percentile of {self.queries} held-out queries' {which}"

    def to_dict(self) -> dict[str, Any]:
        d = {"level": float(self.level), "knots": [float(v) for v in self.knots], "queries": int(self.queries),
             "statistic": self.statistic.value}
        # Tests without parts store what they always stored.
        if self.parts:
            d["parts"] = [[float(v) for v in part] for part in self.parts]
        if self.entries is not None:
            d["entries"] = self.entries.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Any) -> OutOfMemoryTest:
        """Parses :meth:`to_dict` output; ValueError names a missing or bad field."""
        if not isinstance(d, dict):
            raise ValueError(f"out_of_memory must be an object, got {type(d).__name__}")
        allowed = ["entries", "knots", "level", "parts", "queries", "statistic"]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"out_of_memory has unknown field(s) {unknown}; allowed: {allowed}")
        try:
            return cls(level=float(d["level"]), knots=tuple(float(v) for v in d["knots"]), queries=d["queries"],
                       statistic=OutOfMemoryStatistic.parse(d["statistic"]),
                       parts=tuple(tuple(float(v) for v in part) for part in d.get("parts", ())),
                       entries=None if d.get("entries") is None else EntrySimilarityRef.from_dict(d["entries"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed out_of_memory ({type(e).__name__}: {e})") from None


def _check_knots(name: str, knots: Any, lo: float, hi: float, what: str) -> None:
    k = np.asarray(knots, dtype=np.float64)
    if k.ndim != 1 or k.size == 0 or not np.isfinite(k).all() or (np.diff(k) < 0).any() \
            or k[0] < lo - 1e-9 or k[-1] > hi + 1e-9:
        raise ValueError(f"out-of-memory {name} must be non-empty, non-decreasing {what}; got {len(knots)} knots")


def _fisher(parts: tuple[tuple[float, ...], ...], queries: int, kth: np.ndarray, relative: np.ndarray) -> np.ndarray:
    # Fisher's statistic up to its factor -2 (higher: more like the memory). Its own conformal p-value (the
    # test's knots) makes the combination a level-a test however dependent the two p-values are.
    p_kth = conformal_p_value(np.asarray(parts[0]), queries, kth)
    p_rel = conformal_p_value(np.asarray(parts[1]), queries, relative)
    return np.log(p_kth) + np.log(p_rel)


def _order_statistics(values: np.ndarray, max_knots: int) -> np.ndarray:
    s = np.sort(values)
    if s.size > max_knots:
        s = s[np.round(np.linspace(0, s.size - 1, max_knots)).astype(np.int64)]
    return s


def fit_out_of_memory_test(similarity: np.ndarray, *, level: float = DEFAULT_LEVEL,
                           statistic: OutOfMemoryStatistic | str = OutOfMemoryStatistic.NEAREST,
                           max_knots: int = MAX_KNOTS, neighbor_kth: np.ndarray | None = None,
                           entries: EntrySimilarities | None = None) -> OutOfMemoryTest:
    """The test from the neighbour similarities of a calibration split (in-memory queries only).

    Args:
      similarity: ``[n]`` the similarity the statistic reads of each calibration query (-1 for a query without
        neighbours).
      level, statistic: See :class:`OutOfMemoryTest`.
      max_knots: Order statistics kept at most (>= 2).
      neighbor_kth: ``kth_relative`` only: ``[n, k]`` the calibration queries' neighbours' own k-th
        similarities (``entries.lookup`` of their ids; NaN where unknown).
      entries: ``kth_relative`` only: the memory's entry similarities, stored with the test.

    Raises:
      ValueError: on an empty or non-finite split, a bad level, or ``kth_relative`` without its inputs.
    """
    statistic = OutOfMemoryStatistic.parse(statistic)
    s = np.clip(np.asarray(similarity, dtype=np.float64).reshape(-1), -1.0, 1.0)  # Unit vectors' rounding.
    if s.size == 0 or not np.isfinite(s).all():
        raise ValueError(f"the out-of-memory test needs a non-empty, finite calibration split, got {s.size} "
                         "similarities" + ("" if s.size == 0 else " with NaN or inf"))
    if max_knots < 2:
        raise ValueError(f"max_knots must be >= 2, got {max_knots}")
    n = int(s.size)
    if not statistic.needs_entries:
        return OutOfMemoryTest(level=float(level), knots=tuple(_order_statistics(s, max_knots).tolist()), queries=n,
                               statistic=statistic)
    if neighbor_kth is None or entries is None:
        raise ValueError("the kth_relative test needs neighbor_kth and entries (the memory's entry similarities)")
    relative = relative_similarity(s, neighbor_kth)
    known = relative[~np.isnan(relative)]
    if known.size == 0:
        raise ValueError("no calibration query has a neighbour with an entry similarity; the entry similarities "
                         "are of another memory")
    parts = (tuple(_order_statistics(s, max_knots).tolist()), tuple(_order_statistics(known, max_knots).tolist()))
    # Each calibration query's p-values against the whole split (itself included): the statistic's exact
    # conformal law up to O(1 / n).
    combined = _fisher(parts, n, s, relative)
    return OutOfMemoryTest(level=float(level), knots=tuple(_order_statistics(combined, max_knots).tolist()),
                           queries=n, statistic=statistic, parts=parts, entries=entries.ref(), entry_table=entries)
