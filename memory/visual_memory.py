"""A visual memory opened for querying: manifest + every shard's index, ids and labels.

A memory is opened at one version (the latest, or a pinned one): its main shards and delta shards are
searched together, each search unit by the shard searcher the evaluate job runs too
(memory.search.shard_search.LoadedShard, partial answers merged by `merge_partials`), so both return the same
lists. Tombstoned (forgotten) rows are skipped exactly: a shard holding forgotten rows is asked for a bounded
over-fetch (memory.search.shard_search.overfetch: at most 2k + 64 neighbours, however many rows were
forgotten), forgotten ones are dropped, and a query left with fewer than k live hits (its whole class
forgotten, say) is searched by brute force over that shard's live rows. For brute-force shards that is the
same answer as a memory built from scratch without the forgotten entries.

A partition-routed memory (built with ``sharding="partition"``, see memory.search.routing) sends each query only
to the main shards owning its ``route_probes`` nearest router centroids (plus every delta shard); probing
every centroid searches every shard.
"""

from __future__ import annotations

import concurrent.futures
import copy
import functools
import threading
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import numpy as np

from memory import storage
from memory.decide.classify import ClassifyOptions, classify_neighbors
from memory.decide.confidence import memory_calibration
from memory.decide.explain import Prediction
from memory.search.filters import Crowding, QueryFilter, as_filters
from memory.index.shard_index import ShardIndex
from memory.store.integrity import local_index_files, summed_ahead
from memory.store.manifest import Manifest, ManifestError
from memory.store.mutations import read_entry_weights, read_forgotten, row_weights
from memory.search.routing import Router, read_router, search_mask
from memory.search.setting import check_search_params, default_setting, resolve_search_threads, tuned_index
from memory.search.shard_search import (LoadedShard, PartialTopK, empty_partial, merge_partials, one_thread_blas,
                                        search_in_chunks)
from memory.store.metadata import parse_metadata, read_metadata_file
from memory.store.packed import PackedStrings
from memory.store.shard import load_unit_index, read_entry_tables, read_shard_embeddings, search_units
from memory.enums import parse_enum
from memory.queries import (OnUnreadable, UnreadableQuery, check_query_encoder, embed_pixels, load_query_encoder,
                            preprocess_queries, query_preprocess, split_queries)
from memory.vectors import l2_normalize
from memory.store.versions import read_through_purges, reads_of_version
from memory.decide.voting import VotingParams, VotingRule

if TYPE_CHECKING:
    from encoders.base import Encoder, Runtime
    from memory.rerank.base import Reranker, ResponseCache

_PAD_ID = ""


class SearchResult(NamedTuple):
    """Neighbours of each query, nearest first.

    Attributes:
      ids: unicode [nq, k] entry ids, k capped at the memory's live entries ("" for padding where fewer than
        k are found: filters, crowding, routing).
      labels: int32 [nq, k] indices into class_names (-1 for padding).
      distances: float32 [nq, k] cosine distances 1 - dot (+inf for padding).
      weights: float32 [nq, k] entry weight of each neighbour (soft pruning; 1.0 for entries without a
        weight and for padding), or None when the memory has no entry weights. Unpack the first three
        fields with ``ids, labels, distances, _ = result`` or use attributes.
    """
    ids: np.ndarray
    labels: np.ndarray
    distances: np.ndarray
    weights: np.ndarray | None = None


class VisualMemory:
    """A read-only visual memory (local directory or ``gs://``), searched across its shards.

    Open with `VisualMemory.open(path)`. All shards are loaded eagerly (ScaNN index, ids, labels, uris, the
    metadata file) so that search latency does not include I/O and a purge of the opened version's files cannot
    fail a search; embeddings are read lazily, only for `get_embeddings` and brute-force searches over live rows.
    """

    def __init__(self, root: str, manifest: Manifest, indices: Sequence[ShardIndex | None],
                 ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray, *, uris: PackedStrings,
                 metadata_file: bytes | None = None, forgotten: np.ndarray | None = None,
                 entry_weights: tuple[np.ndarray, np.ndarray] | None = None,
                 search_threads: int | None = None, router: Router | None = None,
                 units: Sequence[tuple[int, ...]] | None = None, verify: bool = True):
        self._root = root
        # Shard files read after opening (embeddings) are checked against the manifest like those at open.
        self._verify = verify
        # Partition-routed memories send each query only to the main shards its nearest centroids route it to.
        self._router = router
        self._route_probes: int | None = None
        self._route_ratio: float | None = None
        self._manifest = manifest
        self._ids = ids
        self._labels = labels
        # Rows (of main and delta shards alike) that are tombstoned.
        forgotten = np.zeros((0,), "<U1") if forgotten is None else forgotten
        self._dead = np.isin(ids, forgotten) if forgotten.size else np.zeros(ids.shape, dtype=bool)
        weights = None if entry_weights is None else row_weights(entry_weights, ids)
        self._weighted = weights is not None
        # One searcher per search unit: a shard, or a run of shards built from one index template and searched as
        # one (memory.index.template); units[u] lists unit u's manifest shards, offsets[u] its first row. Each
        # holds views of this memory's rows; the metadata file, read at open, is parsed on the first metadata
        # filter or crowding, and a unit's uris are unpacked on the first uri filter or crowding.
        units = [(u,) for u in range(len(indices))] if units is None else [tuple(u) for u in units]
        infos = manifest.all_shards
        metadata = functools.cache(lambda: parse_metadata(root, manifest, metadata_file))
        self._units: list[LoadedShard] = []
        bounds = np.asarray(offsets).tolist()
        for lo, hi, unit, index in zip(bounds[:-1], bounds[1:], units, indices):
            self._units.append(LoadedShard.of_rows(
                "+".join(infos[s].name for s in unit), index, ids[lo:hi], labels[lo:hi], dead=self._dead[lo:hi],
                weights=None if weights is None else weights[lo:hi],
                shard_dirs=[storage.join(root, infos[s].path) for s in unit], class_names=manifest.class_names,
                metadata=metadata, shard_infos=[infos[s] for s in unit], verify=verify,
                read_uris=lambda lo=lo, hi=hi: uris.take(np.arange(lo, hi))))
        self._unit_shards = units
        self._row_of_id: dict[str, int] | None = None
        self._embeddings: np.ndarray | None = None
        self._uris = uris
        # The query encoder is loaded on the first image query only: vector queries and search never need
        # TensorFlow, and loading a model takes seconds.
        self._encoder: Encoder | None = None
        self._runtime = None  # `open`'s.
        self._search_threads = resolve_search_threads(search_threads, self._searchable_shards())
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    @classmethod
    def open(cls, path: str, *, version: int | None = None, verify: bool = True,
             search_threads: int | None = None, search_defaults: bool = True,
             load_encoder: bool = False, merge_shards: bool = True,
             runtime: Runtime | str | None = None) -> VisualMemory:
        """Opens a memory at its latest version, or at a pinned one.

        Args:
          path: Memory root (the directory holding versions/ and manifest.json), local or ``gs://``.
          version: A version number to open instead of the latest (see `memory.store.versions.history`).
          verify: Check every shard file as it is loaded against its size and crc32c in the manifest
            (memory.store.integrity; an older shard without them by its whole-shard sha256, a full read).
            False skips the check, accepting the risk of serving altered or damaged files.
          search_threads: Threads `search` uses (ScaNN releases the GIL): a batch of at least 64 queries per
            thread is split into that many query chunks, each routed, searched and merged on its own thread;
            a smaller one has its shards searched in parallel. None -> one per CPU, at most one per shard;
            1 -> one thread.
          search_defaults: Search with the setting `vmem tune` recorded in the manifest, if any (False: the
            build's own setting).
          load_encoder: Load the query encoder now and run it once (serving: the first image query then pays
            no model load or tracing); by default it loads on the first image query.
          merge_shards: Search consecutive tree+AH shards built from one index template (hash builds of
            tree+AH memories, `memory.index.template`) as one ScaNN index: the same neighbours' quality at one
            index's speed instead of one search per shard (their per-row files are concatenated into a
            temporary directory once, at open). False searches every shard on its own.
          runtime: What runs the query encoder (tf, litert, onnx, litert-int8; None: the build's), accepted where its
            embeddings agree with the build's (`encoders.compatibility`).

        Returns:
          The opened memory.

        Raises:
          ManifestError: no manifest ("not a visual memory: ..."), no such version, unsupported
            format_version, malformed manifest, missing shard/tombstone/weights/metadata files or (with verify)
            a shard file that differs from the manifest (`memory.store.integrity.ShardCorruptError`, naming
            the shard and the file; nothing is served). When a purge removes the version being opened (its
            files go missing), an unpinned open re-opens the new latest version instead
            (`memory.store.versions.read_through_purges`); a pinned ``version`` raises VersionPurgedError (a
            ManifestError). Once open, the memory answers `search`, `classify` (explanations included), filters
            and crowding from what it read at open, whatever a purge deletes later; only the embeddings
            (`get_embeddings`, and a brute-force search over a shard's live rows when forgotten or filtered-out
            rows leave a query short) are read later, and raise VersionPurgedError if a purge deleted them.
        """
        root = path.rstrip("/") if len(path) > 1 else path
        memory = read_through_purges(root, functools.partial(cls._open_version, root, verify=verify,
                                                             search_threads=search_threads, merge_shards=merge_shards),
                                     version=version)
        memory._runtime = runtime
        setting = default_setting(memory.manifest) if search_defaults else None
        if setting is not None:
            memory = memory.with_search_params(**setting.search_params())
        if load_encoder:
            memory.warm_up()
        return memory

    @classmethod
    def _open_version(cls, root: str, manifest: Manifest, *, verify: bool, search_threads: int | None,
                      merge_shards: bool) -> VisualMemory:
        infos = manifest.all_shards
        dirs = [storage.join(root, info.path) for info in infos]
        with summed_ahead(local_index_files(dirs, infos) if verify else ()):
            tables = read_entry_tables(dirs, infos, num_classes=len(manifest.class_names), verify=verify)
            # Hash shards built from one index template are searched as one index (memory.index.template).
            units = search_units(root, manifest, merge=merge_shards, verify=verify)
            indices = [load_unit_index([dirs[s] for s in unit], [infos[s] for s in unit], verify=verify)
                       for unit in units]
        ids, labels = tables.ids, tables.labels
        row_offsets = np.cumsum([0] + [info.count for info in infos])
        for unit, index in zip(units, indices):
            if index is not None and index.dim != manifest.dim:
                raise ManifestError(f"shard {infos[unit[0]].name}: index of dim {index.dim}, manifest says "
                                    f"{manifest.dim}")
        offsets = [0] + [row_offsets[unit[-1] + 1] for unit in units]
        all_ids = np.concatenate(ids) if ids else np.zeros((0,), dtype="<U1")
        all_labels = np.concatenate(labels) if labels else np.zeros((0,), dtype=np.int32)
        forgotten = read_forgotten(root, manifest)
        if forgotten.size and int(np.isin(all_ids, forgotten).sum()) != forgotten.size:
            raise ManifestError(f"version {manifest.version}: {forgotten.size} tombstoned ids but only "
                                f"{int(np.isin(all_ids, forgotten).sum())} of them are in its shards")
        memory = cls(root, manifest, indices, all_ids, all_labels, np.asarray(offsets, dtype=np.int64),
                     uris=tables.uris, metadata_file=read_metadata_file(root, manifest), forgotten=forgotten,
                     entry_weights=read_entry_weights(root, manifest),
                     search_threads=search_threads, router=read_router(root, manifest), units=units, verify=verify)
        return memory

    def warm_up(self) -> None:
        """Loads the query encoder and runs it on one blank image, so the next image query pays neither."""
        self.embed_images([np.zeros((32, 32, 3), dtype=np.uint8)])  # Preprocessing resizes it.

    def with_search_params(self, *, leaves_fraction: float | None = None, reorder: int | None = None,
                           threads: int | None = None, route_probes: int | None = None,
                           route_ratio: float | None = None) -> VisualMemory:
        """A view of this memory whose tree+AH shards probe another fraction of their leaves / re-rank more.

        Shares every loaded index (nothing is copied or rebuilt); brute-force shards are unaffected. Use it to
        trade recall for speed on a built memory (see evaluation/benchmarks/bench_search.py). ``threads``
        sets how many threads search (see `open`); None keeps this memory's setting.
        ``route_probes`` (partition-routed memories only) sets how many nearest router centroids pick the
        main shards a query visits; None keeps the current setting (the router's default at first).
        ``route_ratio`` switches a routed memory to distance-ratio routing instead (`memory.search.routing.Router.route`:
        a query visits every main shard whose nearest centroid is at most that many times as far as its nearest
        centroid); passing ``route_probes`` switches back.
        """
        route_probes, route_ratio = check_search_params(leaves_fraction=leaves_fraction, route_probes=route_probes,
                                                        route_ratio=route_ratio, routed=self._router is not None)
        view = copy.copy(self)
        if route_probes is not None:
            view._route_probes, view._route_ratio = route_probes, None
        if route_ratio is not None:
            view._route_ratio = route_ratio
        view._units = [u if u.index is None else u.with_index(tuned_index(u.index, leaves_fraction, reorder))
                       for u in self._units]
        if threads is not None:
            view._search_threads = resolve_search_threads(threads, self._searchable_shards())
            view._pool, view._pool_lock = None, threading.Lock()
        return view

    def _searchable_shards(self) -> int:
        return sum(len(shards) for shards, u in zip(self._unit_shards, self._units) if u.index is not None)

    @property
    def searched_as(self) -> list[tuple[str, ...]]:
        """The shard names of each searched index: one name per shard, or several for shards searched as one
        index (built from one index template, see `memory.index.template`)."""
        names = [info.name for info in self._manifest.all_shards]
        return [tuple(names[s] for s in shards) for shards, u in zip(self._unit_shards, self._units)
                if u.index is not None]

    @property
    def router(self) -> Router | None:
        """The router of a partition-routed memory, None for a hash-sharded one."""
        return self._router

    @property
    def route_probes(self) -> int | None:
        """Router centroids per query that pick its main shards (None for a hash-sharded memory)."""
        if self._router is None:
            return None
        return self._router.probes if self._route_probes is None else self._route_probes

    @property
    def route_ratio(self) -> float | None:
        """The distance ratio of distance-ratio routing, or None (probes routing, or a hash-sharded memory)."""
        return self._route_ratio

    @property
    def search_threads(self) -> int:
        """How many threads `search` uses (see `open`)."""
        return self._search_threads

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self._search_threads, thread_name_prefix="vmem-search")
            return self._pool

    def __len__(self) -> int:
        """Number of live entries (forgotten ones excluded)."""
        return int(self._ids.shape[0] - self._dead.sum())

    @property
    def version(self) -> int:
        """The version this memory was opened at."""
        return self._manifest.version

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def class_names(self) -> tuple[str, ...]:
        return self._manifest.class_names

    @property
    def encoder_identity(self) -> dict:
        """The encoder that built the memory; queries must be embedded with the same one."""
        return dict(self._manifest.encoder)

    @property
    def dim(self) -> int:
        return self._manifest.dim

    def search(self, queries: np.ndarray, k: int, *,
               filters: QueryFilter | Sequence[QueryFilter | None] | None = None,
               crowding: Crowding | None = None) -> SearchResult:
        """Finds the k nearest memory entries of each query across all shards.

        Args:
          queries: [nq, dim] query embeddings (L2-normalised here).
          k: Neighbours per query, >= 1; capped at the live entry count (``len(self)``, at least 1), before
            anything is allocated: a larger k returns every live entry, ``[nq, len(self)]``. Fewer than k
            found (filters, crowding, routing) are padded.
          filters: Only entries a `memory.search.filters.QueryFilter` admits (labels, uri prefix, metadata values),
            one filter for every query or one (or None) per query. Applied before the top-k cut, like
            forgetting: k admitted neighbours whenever k exist.
          crowding: At most ``crowding.max_per_group`` neighbours per group (memory.search.filters.Crowding); the
            list is the greedy walk down the distance order, exact (more is fetched until k are kept).

        Returns:
          SearchResult, nearest first, forgotten entries never included; equal distances ordered by
          ascending id, so the answer does not depend on the number of shards (nor on whether entries sit
          in main or delta shards). A partition-routed memory answers from the shards each query is routed
          to (`route_probes`), so there it can miss neighbours held by other shards.
        """
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        # Every [nq, k] array below is sized by k: past the live entries it would only hold padding (a k of
        # 1e9 on a 150-entry memory asked for 7.45 GiB).
        k = min(int(k), max(len(self), 1))
        q = np.asarray(queries)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(
                f"queries must have shape [nq, {self.dim}] (this memory's encoder "
                f"{self._manifest.encoder.get('name')!r} has dim {self.dim}), got {q.shape}; embed queries with "
                "the memory's encoder")
        per_query = as_filters(filters, q.shape[0])
        filtered = any(f is not None for f in per_query)
        # search_threads bounds every thread the search runs, numpy's BLAS (the router's matmul) included: a
        # one-thread search uses one core, and OpenBLAS workers woken by a matmul keep spinning for a while
        # after it, on the cores the search threads (and the next search) need: a 2-thread search right after
        # a 1-thread one whose matmul ran on two BLAS threads took 25 ms per 1,000 queries instead of 14.
        # Each chunk scales its own rows to unit length on its search thread (`l2_normalize`: 2.2 ms per 1,000
        # x 1280 queries in float64, 0.25 ms to check rows that are unit already), row by row, so a chunk's
        # rows equal the whole batch's; a bad row is named by its index in the batch.
        # A search may read embeddings (brute force over a shard's live rows): a purge may have deleted them.
        with one_thread_blas, reads_of_version(self._root, self.version):
            found = search_in_chunks(
                lambda a, b: self._search_units(l2_normalize(q[a:b], first_row=a), int(k),
                                                per_query[a:b] if filtered else None, crowding, parallel=False),
                q.shape[0], self._search_threads, self._executor)
            if found is None:
                found = self._search_units(l2_normalize(q), int(k), per_query if filtered else None, crowding)
        return SearchResult(ids=found.ids, labels=found.labels, distances=found.distances, weights=found.weights)

    def _search_units(self, q: np.ndarray, k: int, filters: list[QueryFilter | None] | None,
                      crowding: Crowding | None, *, parallel: bool = True) -> PartialTopK:
        """Top-k of unit queries over the units each is routed to (searched in parallel when ``parallel``)."""
        # Which units each query visits: all of them, or (partition-routed) the routed main shards + deltas.
        visit = search_mask(self._router, q, [u.index is not None for u in self._units], probes=self._route_probes,
                            ratio=self._route_ratio)
        nq = q.shape[0]

        def search_unit(u: int) -> tuple[np.ndarray, PartialTopK]:
            rows = np.flatnonzero(visit[:, u])
            sub = q if rows.size == nq else q[rows]
            return rows, self._units[u].search(sub, k, filters=None if filters is None else
                                               [filters[i] for i in rows.tolist()], crowding=crowding)

        searched = [u for u, unit in enumerate(self._units) if unit.index is not None and visit[:, u].any()]
        if parallel and self._search_threads > 1 and len(searched) > 1 and nq:
            found = list(self._executor().map(search_unit, searched))
        else:
            found = [search_unit(u) for u in searched]
        if not found:
            return empty_partial(nq, k, weighted=self._weighted)
        return merge_partials([p for _, p in found], k, rows=[rows for rows, _ in found], num_queries=nq,
                              max_per_group=None if crowding is None else crowding.max_per_group)

    def live_entry_ids(self) -> np.ndarray:
        """Every live (not forgotten) entry id, sorted."""
        return np.sort(self._ids[~self._dead])

    def labels_of(self, ids: np.ndarray) -> np.ndarray:
        """int32 label index of each live entry id (any shape; "" padding -> -1)."""
        rows_of = self._id_rows()
        flat = [self._labels[rows_of[i]] if i != _PAD_ID else -1 for i in np.asarray(ids).ravel().tolist()]
        return np.asarray(flat, dtype=np.int32).reshape(np.shape(ids))

    def has_tree_shards(self) -> bool:
        """Whether any shard has a tree+AH index (whose leaves and re-rank depth can be tuned)."""
        return any(u.index is not None and u.index.num_leaves_to_search is not None for u in self._units)

    def _id_rows(self) -> dict[str, int]:
        if self._row_of_id is None:
            live = np.flatnonzero(~self._dead)
            self._row_of_id = dict(zip(self._ids[live].tolist(), live.tolist()))
        return self._row_of_id

    def get_embeddings(self, ids: Sequence[str]) -> np.ndarray:
        """Returns the stored float32 [len(ids), dim] embeddings of the given entries.

        Raises:
          KeyError: listing the unknown ids (forgotten ones included).
        """
        ids = [str(i) for i in (ids.tolist() if isinstance(ids, np.ndarray) else ids)]
        rows_of = self._id_rows()
        unknown = [i for i in ids if i not in rows_of]
        if unknown:
            raise KeyError(f"{len(unknown)} unknown id(s) (not in this memory): {unknown[:20]}")
        if self._embeddings is None:
            with reads_of_version(self._root, self.version):
                parts = [read_shard_embeddings(storage.join(self._root, info.path), info,
                                               verify=self._verify).reshape(-1, self.dim)
                         for info in self._manifest.all_shards]
            self._embeddings = (np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)).astype(
                np.float32, copy=False)
        return self._embeddings[[rows_of[i] for i in ids]].reshape(len(ids), self.dim)

    def label_names(self, labels: np.ndarray) -> np.ndarray:
        """Maps label indices (any shape; -1 = padding) to class-name strings ("" for padding)."""
        labels = np.asarray(labels)
        names = np.asarray(self.class_names + ("",), dtype=str)
        # -1 indexes the trailing "" entry, which is exactly the padding name.
        if labels.size and (labels.max() >= len(self.class_names) or labels.min() < -1):
            raise ValueError(f"labels must be in [-1, {len(self.class_names) - 1}], got range "
                             f"[{labels.min()}, {labels.max()}]")
        return names[labels]

    def get_uris(self, ids: Sequence[str]) -> np.ndarray:
        """Returns the source uri (as recorded at build time) of each given entry, as a unicode [len(ids)] array.

        The uris were read with the entry tables at open.

        Raises:
          KeyError: listing the unknown ids.
        """
        ids = [str(i) for i in (ids.tolist() if isinstance(ids, np.ndarray) else ids)]
        rows_of = self._id_rows()
        unknown = [i for i in ids if i not in rows_of]
        if unknown:
            raise KeyError(f"{len(unknown)} unknown id(s) (not in this memory): {unknown[:20]}")
        return self._uris.take([rows_of[i] for i in ids]) if ids else np.zeros((0,), dtype="<U1")

    def uris_of_results(self, ids: np.ndarray) -> np.ndarray:
        """Uris of a SearchResult.ids array (any shape); padding ids map to ""."""
        rows_of = self._id_rows()
        rows = np.asarray([rows_of[i] if i != _PAD_ID else -1 for i in ids.ravel().tolist()], dtype=np.int64)
        if not rows.size:
            return np.zeros(ids.shape, dtype="<U1")
        flat = np.full(rows.shape, "", dtype=object)
        flat[rows >= 0] = self._uris.take(rows[rows >= 0])
        return flat.astype(str).reshape(ids.shape)

    def query_encoder(self, encoder: Encoder | None = None) -> Encoder:
        """Returns the encoder that image queries are embedded with.

        Args:
          encoder: An already loaded encoder to use instead of loading one; its identity (name and content
            hash) must equal the manifest's.

        Returns:
          ``encoder`` if given, else the memory's own encoder, loaded from the ``EncoderSpec`` the manifest's
          build_config records (``build_config["encoder"]``) on the first call and cached on this object.

        Raises:
          ValueError: ``encoder``'s identity differs from the manifest's, the model at the recorded uri no
            longer has the recorded identity, or the manifest records no encoder spec.
        """
        if encoder is not None:
            return check_query_encoder(encoder, self._manifest, self._root)
        if self._encoder is None:
            self._encoder = load_query_encoder(self._manifest, self._root, runtime=self._runtime)
        return self._encoder

    def embed_images(self, images: Sequence[Any], *, encoder: Encoder | None = None) -> np.ndarray:
        """Embeds query images exactly as the build embedded the memory's entries.

        Args:
          images: Encoded image bytes, file paths (local, ``file://`` or ``gs://``) and/or uint8 [H, W, 3]
            (or [H, W] greyscale) arrays, mixed freely.
          encoder: See `query_encoder`.

        Returns:
          float32 [len(images), dim] unit-length embeddings.

        Raises:
          FileNotFoundError: naming the query and path, for a missing file.
          ValueError: naming the query, for an undecodable image or an unsupported item type; or see
            `query_encoder`.
        """
        return self._embed(images, encoder, OnUnreadable.RAISE)[0]

    def _embed(self, images: Sequence[Any], encoder: Encoder | None,
               on_unreadable: OnUnreadable) -> tuple[np.ndarray, list[UnreadableQuery]]:
        """Embeddings of the readable images (in batches), and the unreadable ones (see `preprocess_queries`)."""
        # Every image is decoded before the encoder loads, so a bad query fails in milliseconds, not after
        # the seconds a model load takes.
        pixels, unreadable = preprocess_queries(images, query_preprocess(self._manifest, self._root),
                                                on_unreadable=on_unreadable)
        if not pixels:
            return np.zeros((0, self.dim), np.float32), unreadable
        return embed_pixels(self.query_encoder(encoder), pixels), unreadable

    def classify(self, queries: np.ndarray | Sequence[Any], *, rule: VotingRule | str = VotingRule.RANK,
                 k: int = 10, params: VotingParams = VotingParams(),
                 encoder: Encoder | None = None, abstain_below: float | None = None,
                 filters: QueryFilter | Sequence[QueryFilter | None] | None = None,
                 crowding: Crowding | None = None, rerank: Reranker | None = None,
                 rerank_below: float | None = None, rerank_top_n: int = 10,
                 rerank_cache: ResponseCache | None = None,
                 on_unreadable: OnUnreadable | str = OnUnreadable.RAISE) -> list[Prediction | UnreadableQuery]:
        """Classifies queries by their k nearest memory entries and explains each decision.

        Args:
          queries: Either a float [n, dim] array of embeddings (L2-normalised here, otherwise used as is), or
            a sequence of images (encoded bytes, file paths, uint8 [H, W, 3] arrays; a uint8 [n, H, W, 3]
            array also works), which are decoded and preprocessed with the manifest's preprocess spec and
            embedded with the memory's own encoder (see `embed_images`).
          rule: Voting rule (enum or name).
          k: Neighbours that vote, >= 1; beyond the memory size the missing neighbours simply do not vote (the
            search is capped at the live entries, so a huge k costs no more than k = len(self)).
          params: Voting hyper-parameters.
          encoder: For image queries: an already loaded encoder, which must have the manifest's identity.
          abstain_below: Abstain (label -1, label_name None, with the reason) for every query whose confidence is
            below this value in [0, 1]. The confidence is calibrated when the memory carries a calibration
            for this rule, k and params (`vmem calibrate`), else it is the raw share of the winner's score.
          filters: Only entries a filter admits may vote (memory.search.filters.QueryFilter: labels, uri prefix,
            metadata values), one for all queries or one per query; k admitted neighbours whenever k exist.
          crowding: At most c voters per group (memory.search.filters.Crowding).
          rerank: A second opinion (memory.rerank.base: memory.rerank.gemini.GeminiReranker, memory.rerank.second_opinion.
            EncoderReranker) asked for every query whose vote margin is below ``rerank_below``; it sees the
            query image and its top ``rerank_top_n`` neighbours. Its answer replaces the vote only when it
            is one of those neighbours' labels; otherwise the vote stands and ``rerank_reason`` says why.
          rerank_cache: Answers already paid for (memory.rerank.base.ResponseCache): never asked twice.
          on_unreadable: For image queries (`memory.queries.OnUnreadable`): RAISE fails the call on the first
            image that cannot be read or decoded, before anything is embedded; REPORT answers every readable
            image (embedded in batches as usual) and returns a `memory.queries.UnreadableQuery` (its index
            and the reason) in the place of each unreadable one.

        Returns:
          One `memory.decide.explain.Prediction` per query (or, with REPORT, an UnreadableQuery in the place of
          each unreadable image): label, per-class scores, confidence and the neighbours
          with their ids, labels, distances, weights and source uris. The label is `memory.decide.voting.vote`'s,
          with the memory's entry weights (soft pruning), if any, multiplied into the rule's weights, unless
          the memory abstained or a re-ranker answered.

        Raises:
          ValueError: bad rule, k, filter or gate, wrong vector dimension, undecodable image or encoder
            identity mismatch, each naming the bad value and the fix.
        """
        options = ClassifyOptions(rule=rule, k=k, params=params, abstain_below=abstain_below, rerank=rerank,
                                  rerank_below=rerank_below, rerank_top_n=rerank_top_n, rerank_cache=rerank_cache)
        calibration = memory_calibration(self._manifest, root=self._root)
        on_unreadable = parse_enum(OnUnreadable, on_unreadable, "on_unreadable")
        vectors, images = split_queries(queries, self.dim)
        unreadable: list[UnreadableQuery] = []
        if images is not None:
            vectors, unreadable = self._embed(images, encoder, on_unreadable)
            if unreadable:
                bad = {u.index for u in unreadable}
                keep = [i for i in range(len(images)) if i not in bad]
                if filters is not None and not isinstance(filters, QueryFilter):  # One filter per query.
                    per_query = as_filters(filters, len(images))
                    filters = [per_query[i] for i in keep]
                images = [images[i] for i in keep]
        predictions: list[Prediction] = []
        if not (vectors.ndim == 2 and vectors.shape[0] == 0):
            result = self.search(vectors, options.fetch, filters=filters, crowding=crowding)
            predictions = classify_neighbors(result.ids, result.labels, result.distances, result.weights,
                                             self.uris_of_results(result.ids), class_names=self.class_names,
                                             calibration=calibration, options=options, images=images)
        if not unreadable:
            return predictions
        # Back in the callers' order: each unreadable query in its own place.
        answered = iter(predictions)
        by_index = {u.index: u for u in unreadable}
        return [by_index[i] if i in by_index else next(answered) for i in range(len(predictions) + len(unreadable))]
