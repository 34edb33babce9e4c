"""The re-index launcher's plan: what it decides from the latest version's manifest alone (`ReindexJob`).

`prepare_job` reads the manifest (and the small version files) and fixes the target shard count, the
``--if-needed`` verdict and this run's directory; it reads no shard, tombstone, router or weights file.
`finish_pending_purge` completes the purge of a re-index that crashed after its publish.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets

from memory import storage
from memory.index.shard_index import IndexConfig
from memory.store import compaction
from memory.store.manifest import Manifest
from memory.store.purge import purge_history, purge_requested_since_reindex
from memory.store.versions import latest_version, list_versions, read_version
from pipelines.runner import FlagError
from pipelines.stages.write import SPILL_DIR, SPILL_ROWS

_LOG = logging.getLogger("visual_memory")

__all__ = ["ReindexError", "ReindexJob", "finish_pending_purge", "prepare_job", "published_by"]


class ReindexError(RuntimeError):
    """The re-index cannot produce a faithful new version (nothing was published)."""


@dataclasses.dataclass(frozen=True)
class ReindexJob:
    """What the launcher decides from version ``manifest.version`` alone (small: no ids, no arrays).

    The per-shard work -- which rows are live, which target shard each goes to -- and the plan built from it
    (which targets are rebuilt, which reused) happen on workers (see the module docstring); the DoFns get
    this job and read what they need from ``root``.

    Attributes:
      root: Memory root.
      manifest: The version being re-indexed (n); version n+1 is published with it as parent.
      num_shards: Main shards after the re-index (compaction.target_shard_count from the manifest's counts).
      job_token: Random token naming this run's directory (two runs never share a path).
      index_config: IndexConfig for rebuilt shards (the memory's own).
      needed: Whether --if-needed would run it; reason says why (not).
      purge: Whether a forget since the last re-index asked for --purge-history.
      spill_rows: Rows per spill file (pipelines.stages.write.SPILL_ROWS; smaller in tests).
      verify: Check every shard file read against the manifest (memory.store.integrity), and record the per-file
        checksums of reused shards written before those were recorded (after checking their whole-shard
        checksum); False reads unchecked and leaves such shards as they are.
    """
    root: str
    manifest: Manifest
    num_shards: int
    job_token: str
    index_config: IndexConfig
    needed: bool
    reason: str
    purge: bool
    spill_rows: int = SPILL_ROWS
    verify: bool = True

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def new_version(self) -> int:
        return self.manifest.version + 1

    @property
    def job_dir(self) -> str:
        return compaction.reindex_dir(self.new_version, self.job_token)

    @property
    def spill_dir(self) -> str:
        """Where rows bound for rebuilt shards are spilled (inside job_dir: a crashed run's orphan holds them)."""
        return storage.join(self.root, self.job_dir, SPILL_DIR)

    def target_path(self, plan: compaction.ReindexPlan, index: int) -> tuple[str, str]:
        """(name, root-relative path) of a rebuilt target shard."""
        name = plan.targets[index].name
        return name, f"{self.job_dir}/{name}"


def prepare_job(root: str, *, target_shard_size: int | None = None, delta_threshold: float = 0.1,
                forgotten_threshold: float = 0.1, job_token: str | None = None,
                spill_rows: int = SPILL_ROWS, verify: bool = True) -> ReindexJob:
    """Reads the latest version's manifest (and the small version files) and decides what it can from them.

    Launcher side: reads no shard and no tombstone, router or weights file. The shard count comes from the
    manifest's live count (ShardInfo counts minus the tombstone count); the thresholds from the same counts.

    Raises:
      ManifestError: no memory at ``root``.
      FlagError: a shard count change of a partition-routed memory (a bad --target-shard-size).
    """
    root = root.rstrip("/") or root
    n = latest_version(root)
    manifest = read_version(root, n)
    target_n = compaction.target_shard_count(manifest.total, target_shard_size=target_shard_size,
                                             current=len(manifest.shards))
    try:
        compaction.check_shard_count(manifest, target_n)
    except ValueError as e:
        raise FlagError(f"--target-shard-size: {e}") from None
    purge = purge_requested_since_reindex(root)
    needed, reason = compaction.needs_reindex(manifest, delta_threshold=delta_threshold,
                                              forgotten_threshold=forgotten_threshold, target_shards=target_n,
                                              purge_requested=purge)
    token = job_token or secrets.token_hex(4)
    job = ReindexJob(root=root, manifest=manifest, num_shards=target_n, job_token=token,
                     index_config=manifest.index_config, needed=needed, reason=reason, purge=purge,
                     spill_rows=spill_rows, verify=verify)
    if storage.exists(storage.join(root, job.job_dir)):
        raise ReindexError(f"{storage.join(root, job.job_dir)} already exists; pick another job token")
    return job


def published_by(root: str, n: int, job_token: str) -> Manifest | None:
    """Version n if it exists and this job published it (a retried publish step), else None."""
    if n not in list_versions(root):
        return None
    m = read_version(root, n)
    return m if m.change.get("kind") == "reindex" and m.change.get("job") == job_token else None


def finish_pending_purge(root: str) -> list[int]:
    """Completes the purge of a re-index that published but crashed before purging (see publish).

    The latest version being a re-index whose change says ``purge_requested`` means its purge never
    published (a purge publishes a version of its own first), and purge_requested_since_reindex no longer
    sees the request behind that re-index.

    Returns:
      The purged versions ([] when no purge was pending).
    """
    root = root.rstrip("/") or root
    change = read_version(root, latest_version(root)).change
    if change.get("kind") != "reindex" or not change.get("purge_requested"):
        return []
    purged = purge_history(root)
    _LOG.info("reindex: finished the purge of an earlier re-index: purged versions %s", purged)
    return purged
