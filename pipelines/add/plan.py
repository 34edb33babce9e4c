"""The add job's launch-time plan and its publish of version n+1 (no Beam graph here).

`plan_add` reads the memory's latest version n once and fixes what the graph needs (`AddPlan`);
`check_precomputed_identity` and `check_worker_identity` refuse entries of another encoder; after the delta
shards are written, `check_counts` and `publish_add_version` publish version n+1 (idempotent under a retried
step) and `remove_add_leftovers` deletes the attempts it does not name (`abandon_add` after a failed publish).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import secrets
from typing import NamedTuple, Optional, Sequence

from encoders.base import EncoderSpec
from memory import storage
from memory.regions.layout import region_grid
from memory.store.manifest import Manifest, ShardInfo
from memory.store.mutations import DELTAS_DIR, add_manifest, rebase_add
from memory.store.purge import DEAD_LETTER_DIR
from memory.store.versions import (ConcurrentUpdateError, latest_version, list_versions, publish_rebasing,
                                   read_version)
from pipelines.build import is_precomputed, precomputed_identity
from pipelines.stages.embed import EncoderMismatchError, check_same_identity, memory_encoder_spec

_LOG = logging.getLogger("visual_memory")
DEFAULT_DELTA_SHARD_SIZE = 50_000

# Every attempt at a delta shard writes its own directory: delta-IIIII-of-CCCCC-<attempt>.
_ATTEMPT_RE = re.compile(r"^delta-\d{5}-of-\d{5}-[0-9a-f]{8}$")
SPILL_DIR = ".spill"

__all__ = ["AddCounts", "AddError", "AddPlan", "DEFAULT_DELTA_SHARD_SIZE", "SPILL_DIR", "abandon_add",
           "check_counts", "check_precomputed_identity", "check_worker_identity", "plan_add", "published_add",
           "publish_add_version", "remove_add_leftovers"]


class AddError(RuntimeError):
    """The add cannot publish a meaningful version (the message says why and what to do)."""


@dataclasses.dataclass(frozen=True)
class AddPlan:
    """What the launcher decided once, before the graph runs (plain picklable values).

    Attributes:
      root: Memory root.
      base_version: The version n read at launch; the add publishes n + 1 or fails.
      job_id: Random token making this add's file paths unique (two racing adds never share a path).
      encoder: The memory's own EncoderSpec (None for a memory built from precomputed embeddings).
      encoder_identity: The memory's recorded encoder identity (what the workers must reproduce).
      class_names: Class names of version n (new names are appended after them).
      regions: The grid G of a region memory (memory.regions): new images get their region entries too; None
        for a global memory.
    """
    root: str
    base_version: int
    job_id: str
    encoder: Optional[EncoderSpec]
    encoder_identity: dict
    class_names: tuple[str, ...]
    regions: Optional[int] = None

    @property
    def new_version(self) -> int:
        return self.base_version + 1

    @property
    def version_tag(self) -> str:
        """Directory of this add's delta shards under ``deltas/``."""
        return f"v{self.new_version:06d}-{self.job_id}"

    @property
    def delta_dir(self) -> str:
        """This add's directory, relative to the root: delta shard attempts and spill files."""
        return f"{DELTAS_DIR}/{self.version_tag}"

    @property
    def spill_dir(self) -> str:
        return storage.join(self.root, self.delta_dir, SPILL_DIR)

    @property
    def dead_letter_dir(self) -> str:
        return storage.join(self.root, DEAD_LETTER_DIR, f"add-v{self.new_version:06d}")


def plan_add(root: str, *, job_id: str | None = None, images: bool = True) -> AddPlan:
    """Reads the memory's latest version once and fixes everything the graph needs.

    ``images``: the add embeds images, so the memory's encoder spec is needed (unless the memory holds
    precomputed embeddings, which the launcher then refuses).
    """
    root = root.rstrip("/") or root
    n = latest_version(root)
    manifest = read_version(root, n)
    embeds = images and not is_precomputed(manifest.encoder)
    return AddPlan(root=root, base_version=n, job_id=job_id or secrets.token_hex(4),
                   encoder=memory_encoder_spec(manifest) if embeds else None,
                   encoder_identity=dict(manifest.encoder), class_names=tuple(manifest.class_names),
                   regions=region_grid(manifest))


def check_precomputed_identity(plan: AddPlan, encoder_id: str | None, source, *, memory_dim: int) -> dict:
    """Refuses precomputed embeddings the memory cannot hold meaningfully; returns their encoder identity.

    The memory must have been built from precomputed embeddings of the encoder named ``encoder_id``, and the
    source's dim (its first file's header: nothing else is read) must be the memory's.

    Raises:
      AddError: naming both encoders (or dims) and the fix.
    """
    from pipelines.io.embedding_sources import embedding_dim  # pylint: disable=g-import-not-at-top

    memory_name = plan.encoder_identity.get("name")
    if not is_precomputed(plan.encoder_identity):
        raise AddError(
            f"{plan.root} was built from images with encoder {memory_name!r} (content hash "
            f"{plan.encoder_identity.get('content_hash')}); precomputed embeddings"
            + (f" of {encoder_id!r}" if encoder_id else "") + " cannot be shown to come from it. Add the images "
            "with --images instead (they are embedded with the memory's own encoder), or build a new memory with "
            "`vmem build --embeddings`. Nothing was published.")
    if not encoder_id:
        raise AddError(f"--embeddings needs --encoder-id: {plan.root} holds embeddings of encoder {memory_name!r}; "
                       f"pass --encoder-id {memory_name} if the new embeddings come from that encoder. Nothing was "
                       "published.")
    if encoder_id != memory_name:
        raise AddError(
            f"--encoder-id {encoder_id!r} differs from the encoder {memory_name!r} that {plan.root} was built "
            "with; distances between embeddings of different encoders are meaningless. Pass --encoder-id "
            f"{memory_name} if these embeddings come from that encoder, or build a new memory from them with "
            "`vmem build --embeddings`. Nothing was published.")
    dim = embedding_dim(source)
    if dim != memory_dim:
        raise AddError(f"--embeddings {source.location}: embeddings of dim {dim}, but {plan.root} holds dim "
                       f"{memory_dim} ({memory_name!r}); add embeddings of the memory's encoder. Nothing was "
                       "published.")
    identity = precomputed_identity(encoder_id, dim, source.to_dict().get("location", ""))
    check_worker_identity(plan.encoder_identity, json.dumps(identity, sort_keys=True))  # Name, hash and dim.
    return identity


def check_worker_identity(memory_identity: dict, worker_identity_json: str) -> None:
    """Refuses entries embedded by an encoder other than the memory's."""
    try:
        check_same_identity(memory_identity, json.loads(worker_identity_json), what="the new images",
                            fix="Restore the memory's encoder files or build a new memory. Nothing was published.")
    except EncoderMismatchError as e:
        raise AddError(str(e)) from None


class AddCounts(NamedTuple):
    read: int
    added: int
    failed: int


def check_counts(*, infos: Sequence[ShardInfo], records_read: int, failed: int, dead_letter_dir: str,
                 regions: int | None = None) -> AddCounts:
    """read == added + failed, and something to add; raises AddError otherwise (nothing is published).

    ``regions``: a region memory's grid G, whose images each add 1 + G*G entries (the counts count images).
    """
    added = sum(info.count for info in infos) // (1 + regions * regions if regions else 1)
    if records_read != added + failed:
        raise AddError(f"bookkeeping mismatch: read {records_read} != added {added} + failed {failed}; nothing "
                       "was published.")
    if not added:
        raise AddError(f"nothing to add: all {records_read} record(s) failed or were rejected; see the reasons in "
                       f"{dead_letter_dir}/. Nothing was published.")
    return AddCounts(read=records_read, added=added, failed=failed)


def published_add(plan: AddPlan) -> Manifest | None:
    """The version this add published (its change records the add's job id), or None.

    An add publishes version n+1, or a later one when it re-based after losing a race.
    """
    try:
        numbers = [n for n in list_versions(plan.root) if n > plan.base_version]
    except Exception:  # pylint: disable=broad-except  # Unreadable: nothing of ours is known to be live.
        return None
    for n in numbers:
        try:
            m = read_version(plan.root, n)
        except Exception:  # pylint: disable=broad-except  # Purged or unreadable: not ours.
            continue
        if m.change.get("kind") == "add" and m.change.get("job") == plan.job_id:
            return m
    return None


def publish_add_version(plan: AddPlan, *, delta_infos: Sequence[ShardInfo], new_class_names: Sequence[str],
                        counts: dict) -> Manifest:
    """Publishes the delta shards (attempts named by ``delta_infos``) as version n+1; idempotent under retries.

    The ids were checked by the job (`RejectKnownIds` against version n, one delta shard per id hash), so no
    id of the memory is read here. When another writer published first, the add re-bases on the new latest
    version (memory.store.mutations.rebase_add: a conflict is an add of the same ids, a re-index, or new class
    names on both sides) and publishes after it, up to versions.MAX_REBASES times. A retried publish step
    (its bundle failed after the version was created, say) finds the version recording this add's job: if it
    holds the same delta shards, classes and counts that is success; anything else raises
    ConcurrentUpdateError (re-run the add).
    """
    base = read_version(plan.root, plan.base_version)
    infos = tuple(delta_infos)
    ours = _recorded(plan, add_manifest(base, delta_infos=infos, new_class_names=new_class_names, counts=counts,
                                        job=plan.job_id))
    existing = published_add(plan)
    if existing is not None:
        same = (tuple(existing.delta_shards[len(existing.delta_shards) - len(infos):]) == infos
                and {**existing.change, "at": None} == {**ours.change, "at": None})
        if not same:
            raise ConcurrentUpdateError(
                f"version {existing.version} of {plan.root} was published by this add's job {plan.job_id} with "
                "other delta shards or counts than this attempt's; nothing more was published, re-run the add.")
        _LOG.info("version %d of %s was already published by an earlier attempt of this step", existing.version,
                  plan.root)
        return existing
    return publish_rebasing(plan.root, ours, base=plan.base_version, rebase=lambda latest: _recorded(plan, rebase_add(
        plan.root, base, latest, delta_infos=infos, new_class_names=new_class_names, counts=counts, job=plan.job_id)))


def _recorded(plan: AddPlan, manifest: Manifest) -> Manifest:
    """The add's change also names its dead-letter directory (add-v<n+1>/ even when it re-based to a later n)."""
    return dataclasses.replace(manifest, change={**manifest.change,
                                                 "dead_letter": f"{DEAD_LETTER_DIR}/add-v{plan.new_version:06d}"})


def remove_add_leftovers(plan: AddPlan, manifest: Manifest) -> list[str]:
    """Deletes this add's spill files and the delta shard attempts ``manifest`` does not name.

    Only add-made names (``deltas/<tag>/delta-IIIII-of-CCCCC-<attempt>``) of this add's directory are touched.
    Returns what was deleted (root-relative).
    """
    referenced = {s.path for s in manifest.delta_shards}
    directory = storage.join(plan.root, plan.delta_dir)
    children = storage.list_dir(directory) if storage.exists(directory) else []
    removed = []
    for child in children:
        rel = f"{plan.delta_dir}/{child}"
        if _ATTEMPT_RE.match(child) and rel not in referenced:
            storage.remove_tree(storage.join(plan.root, rel))
            removed.append(rel)
    storage.remove_tree(plan.spill_dir)
    return removed


def abandon_add(plan: AddPlan, *, dead_letters: bool = False) -> None:
    """Best effort after a failed publish: deletes this add's directory, unless a version records this add.

    ``dead_letters``: also delete its dead-letter files (after a lost race, which they do not explain; an
    add refused for its records keeps them, since its message points to them).
    """
    if published_add(plan) is not None:
        return
    try:
        storage.remove_tree(storage.join(plan.root, plan.delta_dir))
        if not dead_letters:
            return
        prefix = f"failed-{plan.job_id}"
        names = storage.list_dir(plan.dead_letter_dir) if storage.exists(plan.dead_letter_dir) else []
        for name in names:
            if name.startswith(prefix):
                storage.remove_tree(storage.join(plan.dead_letter_dir, name))
        if names and all(name.startswith(prefix) for name in names) and not storage.is_gcs(plan.dead_letter_dir):
            os.rmdir(plan.dead_letter_dir)  # Locally: no empty add-vNNNNNN/ directory either.
    except Exception:  # pylint: disable=broad-except  # Never hide the publish error behind a cleanup error.
        _LOG.warning("could not delete the files of the failed add %s", plan.job_id, exc_info=True)
