"""Telling a query unlike anything in memory, fitted without out-of-memory examples (pure numpy).

A vote's calibrated confidence (memory.decide.confidence) is fitted on held-out queries of the memory's own
classes, so it says how often such a vote is right; it cannot say that a query is of a class the memory has
never seen. Deep-kNN out-of-distribution detection (Sun et al. 2022, "Out-of-distribution detection with deep
nearest neighbors") can, with no such class at hand: a query whose neighbours are farther than the memory's
neighbours usually are is unlike anything in memory. "Usually" is measured on the same calibration split --
queries the memory never saw, of classes it holds -- by one similarity ``s`` of each (an
:class:`OutOfMemoryStatistic`: the nearest neighbour's, the default, or the k-th's, k being the calibrated
vote's, so a classification needs no extra neighbours):

  p(s) = (1 + #{calibration queries with similarity <= s}) / (n + 1)

is a conformal p-value of "this query is as close to the memory as an in-memory one": for an in-memory query
(exchangeable with the calibration split) ``P(p <= a) <= a`` for every ``a``. An :class:`OutOfMemoryTest` stores
the calibration similarities (as at most ``MAX_KNOTS`` order statistics) and a level (default
``DEFAULT_LEVEL``); a query with ``p < level`` is unlike anything in memory.

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
from typing import Any

import numpy as np

from memory.enums import parse_enum

__all__ = ["DEFAULT_LEVEL", "MAX_KNOTS", "AbstainReason", "OutOfMemoryStatistic", "OutOfMemoryTest",
           "fit_out_of_memory_test"]

DEFAULT_LEVEL = 0.05
# Order statistics kept of the calibration similarities: p-values to about 0.001, a few kB in the manifest.
MAX_KNOTS = 1001


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
    """Which neighbour's similarity the test compares: the nearest (deep-kNN's k = 1) or the vote's k-th.

    Neither is better everywhere: on the bundled datasets the k-th separates unseen Fashion-MNIST classes
    better and the nearest unseen MNIST digits (docs/paper.md, abstain); the nearest is the default.
    """
    NEAREST = "nearest"
    KTH = "kth"

    @classmethod
    def parse(cls, name: str | OutOfMemoryStatistic) -> OutOfMemoryStatistic:
        return parse_enum(cls, name, "out-of-memory statistic")

    def of(self, vc: Any) -> np.ndarray:
        """This statistic of each query of a ``memory.decide.confidence.VoteConfidence``."""
        return vc.similarity if self is OutOfMemoryStatistic.NEAREST else vc.kth_similarity


@dataclasses.dataclass(frozen=True)
class OutOfMemoryTest:
    """A calibration split's neighbour similarities and the level below which a query is out of memory.

    Attributes:
      level: Flag a query when its p-value is below this, in (0, 1); at most this fraction of in-memory
        queries is flagged.
      knots: Non-decreasing similarities in [-1, 1]: the calibration queries' statistic, or ``MAX_KNOTS``
        evenly spaced order statistics of it.
      queries: Calibration queries they come from (``>= len(knots)``).
      statistic: Which neighbour's similarity.
    """
    level: float
    knots: tuple[float, ...]
    queries: int
    statistic: OutOfMemoryStatistic = OutOfMemoryStatistic.NEAREST

    def __post_init__(self):
        if not (isinstance(self.level, (int, float)) and 0.0 < float(self.level) < 1.0):
            raise ValueError(f"out-of-memory level must be a probability in (0, 1) (e.g. {DEFAULT_LEVEL}), "
                             f"got {self.level!r}")
        knots = np.asarray(self.knots, dtype=np.float64)
        if knots.ndim != 1 or knots.size == 0 or not np.isfinite(knots).all() or (np.diff(knots) < 0).any() \
                or knots[0] < -1.0 - 1e-9 or knots[-1] > 1.0 + 1e-9:
            raise ValueError(f"out-of-memory knots must be non-empty, non-decreasing similarities in [-1, 1]; got "
                             f"{len(self.knots)} knots")
        if not isinstance(self.queries, int) or self.queries < knots.size:
            raise ValueError(f"out-of-memory queries must be an int >= the {knots.size} knots, got {self.queries!r}")
        object.__setattr__(self, "statistic", OutOfMemoryStatistic.parse(self.statistic))

    def similarity_of(self, vc: Any) -> np.ndarray:
        """The statistic of each query of a ``memory.decide.confidence.VoteConfidence``."""
        return self.statistic.of(vc)

    def p_value(self, similarity: np.ndarray) -> np.ndarray:
        """Conformal p-value of each similarity (any shape), in ``[1 / (n + 1), 1]``."""
        s = np.asarray(similarity, dtype=np.float64)
        knots = np.asarray(self.knots, dtype=np.float64)
        below = np.searchsorted(knots, s, side="right") / knots.size  # Fraction of the split at or below s.
        return (1.0 + self.queries * below) / (self.queries + 1.0)

    def flags(self, similarity: np.ndarray) -> np.ndarray:
        """Whether each query is unlike anything in memory (``p < level``)."""
        return self.p_value(similarity) < self.level

    def describe(self) -> str:
        which = "nearest" if self.statistic is OutOfMemoryStatistic.NEAREST else "k-th"
        return (f"out of memory below the {100 * self.level:g}th percentile of {self.queries} held-out queries' "
                f"{which} neighbour similarity")

    def to_dict(self) -> dict[str, Any]:
        return {"level": float(self.level), "knots": [float(v) for v in self.knots], "queries": int(self.queries),
                "statistic": self.statistic.value}

    @classmethod
    def from_dict(cls, d: Any) -> OutOfMemoryTest:
        """Parses :meth:`to_dict` output; ValueError names a missing or bad field."""
        if not isinstance(d, dict):
            raise ValueError(f"out_of_memory must be an object, got {type(d).__name__}")
        allowed = ["knots", "level", "queries", "statistic"]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"out_of_memory has unknown field(s) {unknown}; allowed: {allowed}")
        try:
            return cls(level=float(d["level"]), knots=tuple(float(v) for v in d["knots"]), queries=d["queries"],
                       statistic=OutOfMemoryStatistic.parse(d["statistic"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed out_of_memory ({type(e).__name__}: {e})") from None


def fit_out_of_memory_test(similarity: np.ndarray, *, level: float = DEFAULT_LEVEL,
                           statistic: OutOfMemoryStatistic | str = OutOfMemoryStatistic.NEAREST,
                           max_knots: int = MAX_KNOTS) -> OutOfMemoryTest:
    """The test from the neighbour similarities of a calibration split (in-memory queries only).

    Args:
      similarity: ``[n]`` the statistic of each calibration query (-1 for a query without neighbours).
      level, statistic: See :class:`OutOfMemoryTest`.
      max_knots: Order statistics kept at most (>= 2).

    Raises:
      ValueError: on an empty or non-finite split, or a bad level.
    """
    s = np.sort(np.asarray(similarity, dtype=np.float64).reshape(-1))
    s = np.clip(s, -1.0, 1.0)  # Cosine distances of unit vectors may overshoot [0, 2] by rounding.
    if s.size == 0 or not np.isfinite(s).all():
        raise ValueError(f"the out-of-memory test needs a non-empty, finite calibration split, got {s.size} "
                         "similarities" + ("" if s.size == 0 else " with NaN or inf"))
    if max_knots < 2:
        raise ValueError(f"max_knots must be >= 2, got {max_knots}")
    n = s.size
    if n > max_knots:
        s = s[np.round(np.linspace(0, s.size - 1, max_knots)).astype(np.int64)]
    return OutOfMemoryTest(level=float(level), knots=tuple(s.tolist()), queries=int(n),
                           statistic=OutOfMemoryStatistic.parse(statistic))
