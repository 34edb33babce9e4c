"""The visual memory: shard layout, manifest, per-shard ScaNN index, cross-shard top-k merge.

Pure Python + numpy + ScaNN (+ google-cloud-storage for gs://); no Apache Beam import, so it is usable
from notebooks and from inside Beam DoFns alike.
"""

from memory.index.shard_index import IndexConfig, IndexKind
from memory.visual_memory import SearchResult, VisualMemory

__all__ = ["IndexConfig", "IndexKind", "SearchResult", "VisualMemory"]
