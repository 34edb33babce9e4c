"""The version a server answers from, swapped for the newest one when any writer publishes.

A request takes `LiveMemory.current` once and answers from it to the end: the reference it holds is an
immutable `ServedVersion`, so it finishes on the version it started on even when a newer one is swapped in
meanwhile, and never sees a half version (`VisualMemory.open` reads one published manifest and the files it
names, and re-opens the latest when a purge removes them under it). A background thread lists the versions
every ``refresh_interval_s`` (a directory listing) and opens a newer one next to the served one before
swapping the reference; requests never wait for an open. The query encoder is loaded once and reused by
every later version built with the same encoder.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from memory.store.mutations import read_entry_weights
from memory.store.versions import latest_version
from memory.visual_memory import VisualMemory

if TYPE_CHECKING:
    from encoders.base import Encoder

__all__ = ["LiveMemory", "ServedVersion"]

_LOG = logging.getLogger("visual_memory.serve")


class ServedVersion(NamedTuple):
    """One opened version and what requests read next to it.

    Attributes:
      memory: The opened memory.
      encoder: Its query encoder (loaded once, shared by versions of the same encoder), or None for a memory
        that records no encoder (it answers embedding queries only).
      entry_weights: ``{id: weight}`` of the version's entry weights (soft pruning, a person's changes);
        entries not listed weigh 1.0.
      opened_at: ``time.time()`` when it was opened.
    """
    memory: VisualMemory
    encoder: Encoder | None
    entry_weights: dict[str, float]
    opened_at: float

    @property
    def version(self) -> int:
        return self.memory.version

    def entry_weight(self, entry_id: str) -> float:
        """The entry weight ``entry_id`` votes with (1.0 when the version lists none for it)."""
        return self.entry_weights.get(entry_id, 1.0)


def _records_encoder(memory: VisualMemory) -> bool:
    return isinstance(memory.manifest.build_config.get("encoder"), dict)


def open_served(root: str, *, verify: bool, encoder: Encoder | None = None) -> ServedVersion:
    """Opens the latest version of ``root`` for serving.

    Args:
      root: The memory.
      verify: Check shard files against the manifest (memory.store.integrity).
      encoder: An encoder already loaded for an earlier version; reused when the new version was built with
        the same one (same name and content hash), else the new version's own is loaded.

    Returns:
      The version, with its encoder warmed up (the first image query pays no model load) and its source uris
      read (explanations of this version need no later read of files a purge could remove).
    """
    memory = VisualMemory.open(root, verify=verify)
    if _records_encoder(memory):
        try:
            encoder = memory.query_encoder(encoder) if encoder is not None else None
        except ValueError:  # Built with another encoder (a rebuild at the same path): load that one.
            encoder = None
        if encoder is None:
            memory.warm_up()
            encoder = memory.query_encoder()
    else:
        encoder = None
    memory.get_uris(memory.live_entry_ids()[:1])  # Reads every shard's uris now (see `VisualMemory.get_uris`).
    weights = read_entry_weights(root, memory.manifest)
    table = {} if weights is None else dict(zip(np.asarray(weights[0]).astype(str).tolist(),
                                                np.asarray(weights[1], dtype=np.float64).tolist()))
    return ServedVersion(memory=memory, encoder=encoder, entry_weights=table, opened_at=time.time())


class LiveMemory:
    """The latest version of one memory, kept current while the server runs.

    Args:
      root: The memory (local or ``gs://``).
      verify: Check shard files against the manifest on every open.
      refresh_interval_s: How often the background thread looks for a newer version (> 0).
    """

    def __init__(self, root: str, *, verify: bool = True, refresh_interval_s: float = 0.5):
        if not refresh_interval_s > 0:
            raise ValueError(f"refresh_interval_s must be > 0 seconds, got {refresh_interval_s!r}; e.g. 0.5")
        self._root = root.rstrip("/") if len(root) > 1 else root
        self._verify = verify
        self._interval = float(refresh_interval_s)
        self._open_lock = threading.Lock()
        self._current = open_served(self._root, verify=verify)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_refresh_error: str = ""

    @property
    def root(self) -> str:
        return self._root

    @property
    def current(self) -> ServedVersion:
        """The version new requests answer from (one attribute read: the swap is atomic)."""
        return self._current

    def refresh(self) -> ServedVersion:
        """Opens and serves the latest version if it is newer than the served one; returns the served one.

        Raises:
          ManifestError, OSError, ValueError: the newer version could not be opened (the served one stays).
        """
        with self._open_lock:  # One open at a time; requests keep reading `current` meanwhile.
            if latest_version(self._root) > self._current.version:
                served = open_served(self._root, verify=self._verify, encoder=self._current.encoder)
                if served.version > self._current.version:
                    old = self._current.version
                    self._current = served
                    _LOG.info("serving version %d of %s (was %d)", served.version, self._root, old)
            return self._current

    def _poll(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.refresh()
                self.last_refresh_error = ""
            except Exception as e:  # pylint: disable=broad-except  # Keep serving the last good version.
                if str(e) != self.last_refresh_error:
                    _LOG.warning("could not open the latest version of %s (still serving version %d): %s",
                                 self._root, self._current.version, e)
                self.last_refresh_error = str(e)

    def start(self) -> None:
        """Starts the background refresh (idempotent)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll, name="vmem-serve-refresh", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stops the background refresh and waits for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
