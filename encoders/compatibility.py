"""Which runtimes' embeddings of one encoder may be searched together (TensorFlow-free).

Every identity carries its runtime and its ``reference_deviation``: the largest ``1 - cosine`` between its
embeddings and the TF reference's, measured when the model was converted. The chordal distance
``sqrt(2 (1 - cos))`` between unit vectors obeys the triangle inequality, so two runtimes that deviate from
the reference by ``a`` and ``b`` differ from each other by at most ``(sqrt(a) + sqrt(b))^2`` in ``1 - cos``;
a memory built with one runtime accepts queries from another when that bound is within
``RUNTIME_TOLERANCE``.
"""

from __future__ import annotations

import math
from typing import Mapping

from encoders.base import RUNTIME_TOLERANCE, Runtime, parse_runtime


def runtime_disagreement(a: float, b: float) -> float:
    """Bound on ``1 - cos`` between two runtimes that deviate from the reference by ``a`` and ``b``."""
    return (math.sqrt(max(a, 0.0)) + math.sqrt(max(b, 0.0))) ** 2


def runtime_mismatch(memory_identity: Mapping, query_identity: Mapping) -> str | None:
    """Why queries embedded as ``query_identity`` may not search a memory of ``memory_identity`` (None: they may).

    Both are ``EncoderIdentity.to_dict()`` dicts of the same encoder (name and content hash are compared
    elsewhere); one written before runtimes were recorded ran on TF.

    Returns:
        None, or a message naming both runtimes, their disagreement and the fix.
    """
    built = parse_runtime(memory_identity.get("runtime", Runtime.TF.value))
    query = parse_runtime(query_identity.get("runtime", Runtime.TF.value))
    if built is query:
        return None
    bound = runtime_disagreement(float(memory_identity.get("reference_deviation", 0.0)),
                                 float(query_identity.get("reference_deviation", 0.0)))
    if bound <= RUNTIME_TOLERANCE:
        return None
    return (f"the memory was built with runtime {built.value!r} and the queries were embedded with runtime "
            f"{query.value!r}, whose embeddings may differ by up to {bound:.3g} in 1 - cosine (tolerance "
            f"{RUNTIME_TOLERANCE:g}). Fix: query with --runtime {built.value} (the memory's own), or rebuild the "
            f"memory with --runtime {query.value}")
