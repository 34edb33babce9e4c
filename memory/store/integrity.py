"""Shard file integrity: what a manifest records of each shard's files, and the checks made when they are loaded.

A `memory.store.manifest.ShardInfo` records two things about the files of its shard:

* ``files``: each file's name, size and CRC-32C (``google-crc32c``, hardware-accelerated: ~15 GB/s here, a
  small fraction of what reading the bytes costs). Loading checks every file against its record
  (`ShardFiles`): a file parsed from memory is checked on the bytes it was read as (`ShardFiles.read`); ScaNN's
  files, which ScaNN's own loader reads from a local directory, are checked just before that loader runs
  (`ShardFiles.check_dir`, in 1 MiB pieces, so the loader then reads them from the page cache; an open has a
  child process sum them ahead, `summed_ahead`, since ScaNN's loader holds the GIL). A mismatch
  raises `ShardCorruptError`, naming the shard, the file and the fix, before anything of the shard is used.
* ``checksum``: sha256 over every file's name, size and bytes (`verify_shard`). A shard written before
  ``files`` were recorded has only this; loading it with verification on recomputes it (a full read of the
  shard, logged once per shard), and the next re-index records its ``files`` (`with_file_records`).

A shard never holds a pickle: ScaNN writes ``scann_docids.pkl`` when built with docids, and loading a shard
would unpickle it, so any ``*.pkl``/``*.pickle`` file is refused (`refuse_pickles`) before ScaNN sees the
directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable

import google_crc32c

from memory import storage
from memory.store.manifest import ManifestError, ShardFile, ShardInfo

_LOG = logging.getLogger(__name__)

ENTRIES_NAME = "entries.parquet"
SCANN_DIR = "scann"
LEGACY_ARRAY_NAMES = ("embeddings", "ids", "labels", "uris")  # Format 1 files, also its checksum order.
_PICKLE_SUFFIXES = (".pkl", ".pickle")
# Bytes read per piece when checking a local file: small enough to stay in cache while it is summed.
_CHUNK = 1 << 20
# Shards already reported as checked by their whole-shard sha256 (no per-file records), so each is logged once.
_whole_checked_logged: set[str] = set()
_log_lock = threading.Lock()


class ShardCorruptError(ManifestError):
    """A shard file differs from what the manifest recorded of it; nothing of that shard is served."""


def crc32c_hex(data: bytes) -> str:
    """CRC-32C of ``data`` as 8 lowercase hex digits (the format of `ShardFile.crc32c`)."""
    return f"{google_crc32c.value(data):08x}"


def _local_file_crc32c(path: str) -> tuple[int, str]:
    """(size, crc32c hex) of a local file, read in pieces (a whole-file bytes copy would double its memory);
    from a `summed_ahead` child when one has summed it."""
    with _ahead_lock:
        ahead = [a for a in _ahead if path in a.paths]
    for a in ahead:
        found = a.get(path)
        if found is not None:
            return found
    crc, size = 0, 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            crc = google_crc32c.extend(crc, chunk)
            size += len(chunk)
    return size, f"{crc:08x}"


# Index bytes from which an open sums them in a child (`summed_ahead`): below, summing here (~10 GB/s) costs less
# than starting the child (~20 ms), which the first shard's check would wait for.
SUM_AHEAD_MIN_BYTES = 256 << 20
# The program a `summed_ahead` child runs: (size, crc32c) of each file named on its command line, one line each;
# `_local_file_crc32c`'s loop, standalone: importing this package would load ScaNN and TF (seconds) in the child.
_SUM_PROGRAM = ("import sys, google_crc32c\n"
                "for p in sys.argv[1:]:\n"
                "    crc, size = 0, 0\n"
                "    with open(p, 'rb', buffering=0) as f:\n"
                f"        while c := f.read({_CHUNK}):\n"
                "            crc, size = google_crc32c.extend(crc, c), size + len(c)\n"
                "    print(size, format(crc, '08x'), flush=True)\n")


class _SumsAhead:
    """A child process summing ``paths`` in order; `get` waits for one path's line (None if the child failed)."""

    def __init__(self, paths: list[str]):
        self.paths = set(paths)
        self._order = list(paths)
        self._done: dict[str, tuple[int, str]] = {}
        self._lock = threading.Lock()
        self._proc = subprocess.Popen([sys.executable, "-c", _SUM_PROGRAM, *self._order], stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)

    def get(self, path: str) -> tuple[int, str] | None:
        with self._lock:
            while path not in self._done and len(self._done) < len(self._order):
                line = self._proc.stdout.readline().split()
                if len(line) != 2:  # The child failed (its reason is not ours to parse): sum it here instead.
                    self._order = self._order[:len(self._done)]
                    break
                self._done[self._order[len(self._done)]] = (int(line[0]), line[1])
            return self._done.get(path)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._proc.stdout.close()


_ahead: list[_SumsAhead] = []
_ahead_lock = threading.Lock()


@contextlib.contextmanager
def summed_ahead(paths: Iterable[str]):
    """While the block runs, a child process sums the local files ``paths`` in order, and the checks of those
    files (`ShardFiles.check_dir`) take its sums instead of reading them again in this process.

    ScaNN's loader holds the GIL while it loads a shard, so nothing in this process can overlap it; a child on
    another core sums the next shard's files meanwhile (the first shard's while the entry tables are read).
    Each file is still checked before its loader reads it: the check waits for the child's line. A child that
    fails leaves the remaining files to be summed here, as without it.
    """
    paths = [p for p in paths if os.path.isfile(p)]
    if (os.cpu_count() or 1) < 2 or sum(os.path.getsize(p) for p in paths) < SUM_AHEAD_MIN_BYTES:
        yield
        return
    ahead = _SumsAhead(paths)
    with _ahead_lock:
        _ahead.append(ahead)
    try:
        yield
    finally:
        with _ahead_lock:
            _ahead.remove(ahead)
        ahead.close()


def local_index_files(shard_dirs: Iterable[str], infos: Iterable[ShardInfo]) -> list[str]:
    """The recorded ScaNN files of the local shards among ``shard_dirs`` (``gs://`` shards are copied locally
    when loaded and checked there), in load order: what `summed_ahead` should sum for an open."""
    return [os.path.join(d, *f.name.split("/")) for d, info in zip(shard_dirs, infos) if not storage.is_gcs(d)
            for f in info.files if f.name.startswith(SCANN_DIR + "/")]


def refuse_pickles(names: Iterable[str], where: str) -> None:
    """Raises ManifestError when any of ``names`` is a pickle file (loading would execute it)."""
    bad = [n for n in names if n.lower().endswith(_PICKLE_SUFFIXES)]
    if bad:
        raise ManifestError(
            f"{where}: holds pickle file(s) {bad}; a memory never contains pickles (loading would execute them). "
            "Remove them or rebuild the shard.")


def local_files(local_dir: str) -> list[str]:
    """Relative (``/``-separated) names of every file under a local directory, sorted."""
    out = []
    for root, _, files in os.walk(local_dir):
        for fname in files:
            out.append(os.path.relpath(os.path.join(root, fname), local_dir).replace(os.sep, "/"))
    return sorted(out)


def record_files(read: Callable[[str], bytes], names: Iterable[str]) -> tuple[str, tuple[ShardFile, ...]]:
    """The whole-shard sha256 checksum and the per-file records of a shard's files, reading each file once.

    Args:
      read: Returns the bytes of a file given its name relative to the shard.
      names: Every file of the shard, relative names.

    Returns:
      (``sha256:<hex>`` over (name, size, bytes) of each file in sorted name order, the `ShardFile` records
      sorted by name).
    """
    h = hashlib.sha256()
    files = []
    for rel in sorted(names):
        blob = read(rel)
        h.update(rel.encode() + b"\0" + str(len(blob)).encode() + b"\0")
        h.update(blob)
        files.append(ShardFile(name=rel, size=len(blob), crc32c=crc32c_hex(blob)))
    return "sha256:" + h.hexdigest(), tuple(files)


def shard_file_names(shard_dir: str) -> list[str]:
    """Relative names of every file in the shard (scann/ included)."""
    names = [n for n in storage.list_dir(shard_dir) if n != SCANN_DIR]
    if storage.exists(storage.join(shard_dir, SCANN_DIR)):
        names += [f"{SCANN_DIR}/{n}" for n in storage.list_dir(storage.join(shard_dir, SCANN_DIR))]
    return names


def _read_rel(shard_dir: str, rel: str) -> bytes:
    return storage.read_bytes(storage.join(shard_dir, *rel.split("/")))


def _legacy_checksum(shard_dir: str, info: ShardInfo) -> str:
    h = hashlib.sha256()
    for array_name in LEGACY_ARRAY_NAMES:
        path = storage.join(shard_dir, array_name + ".npy")
        try:
            h.update(storage.read_bytes(path))
        except FileNotFoundError:
            raise ManifestError(f"shard {info.name}: file {path} missing") from None
    return "sha256:" + h.hexdigest()


def _listed_names(shard_dir: str, info: ShardInfo) -> list[str]:
    try:
        names = shard_file_names(shard_dir)
    except FileNotFoundError:
        raise ManifestError(f"shard {info.name}: directory {shard_dir} missing") from None
    refuse_pickles(names, f"shard {info.name} at {shard_dir}")
    return names


def _fix(info: ShardInfo) -> str:
    return (f"nothing of shard {info.name} is served. Restore the memory directory from a copy, or rebuild it "
            "(`vmem build`); to use it anyway, at the risk of wrong answers, pass --no-verify (verify=False)")


def verify_shard(shard_dir: str, info: ShardInfo) -> None:
    """Recomputes the whole-shard sha256 checksum over all of the shard's files (names, sizes and bytes).

    Raises:
      ManifestError: naming the shard, when files are missing or a pickle is present; `ShardCorruptError` when
        the checksum differs from the manifest.
    """
    names = _listed_names(shard_dir, info)
    if ENTRIES_NAME not in names and "ids.npy" in names:
        actual = _legacy_checksum(shard_dir, info)
    elif ENTRIES_NAME not in names:
        raise ManifestError(f"shard {info.name}: file {storage.join(shard_dir, ENTRIES_NAME)} missing")
    else:
        actual, _ = record_files(lambda rel: _read_rel(shard_dir, rel), names)
    if actual != info.checksum:
        raise ShardCorruptError(
            f"shard {info.name} at {shard_dir}: checksum mismatch (manifest {info.checksum}, files {actual}): the "
            f"shard was modified or partially written after it was built; {_fix(info)}")


def with_file_records(shard_dir: str, info: ShardInfo) -> ShardInfo:
    """``info`` with its per-file records: itself when it has them, else computed from the files after checking
    them against its whole-shard checksum (what a re-index does for shards written before records existed).

    Raises:
      ManifestError / ShardCorruptError: as `verify_shard`; a shard is never given records for altered files.
    """
    if info.files:
        return info
    names = _listed_names(shard_dir, info)
    if ENTRIES_NAME not in names:  # Format 1: its checksum covers the four arrays only, in a fixed order.
        verify_shard(shard_dir, info)
        return dataclasses.replace(info, files=record_files(lambda rel: _read_rel(shard_dir, rel), names)[1])
    checksum, files = record_files(lambda rel: _read_rel(shard_dir, rel), names)
    if checksum != info.checksum:
        raise ShardCorruptError(
            f"shard {info.name} at {shard_dir}: checksum mismatch (manifest {info.checksum}, files {checksum}): the "
            f"shard was modified after it was built; {_fix(info)}")
    return dataclasses.replace(info, files=files)


class ShardFiles:
    """One shard's files, each checked against the manifest's record of it as it is loaded.

    Args:
      shard_dir: The shard directory (local or ``gs://``).
      info: The shard's manifest entry; None reads unchecked (a bare shard directory, as tests and tools have).
      verify: Check (the default); False reads without checking, for those who accept the risk.
    """

    def __init__(self, shard_dir: str, info: ShardInfo | None, *, verify: bool = True):
        self.shard_dir = shard_dir
        self.info = info
        self.verify = bool(verify) and info is not None
        self._records = {f.name: f for f in info.files} if info is not None else {}
        self._whole_checked = False

    def path(self, rel: str) -> str:
        """The full path of the shard file ``rel`` (relative, ``/``-separated)."""
        return storage.join(self.shard_dir, *rel.split("/"))

    def _mismatch(self, rel: str, what: str) -> ShardCorruptError:
        return ShardCorruptError(f"shard {self.info.name}: file {rel} at {self.path(rel)} {what}; it was changed or "
                                 f"damaged after it was written, so {_fix(self.info)}")

    def _check(self, rel: str, size: int, crc: str) -> None:
        record = self._records.get(rel)
        if record is None:
            raise self._mismatch(rel, "is not recorded in the manifest")
        if size != record.size:
            raise self._mismatch(rel, f"has {size} bytes, the manifest says {record.size}")
        if crc != record.crc32c:
            raise self._mismatch(rel, f"has crc32c {crc}, the manifest says {record.crc32c}")

    def _check_whole_shard(self) -> None:
        """A shard without per-file records is checked once by its whole-shard sha256 (a full read)."""
        if not self.verify or self._records or self._whole_checked:
            return
        verify_shard(self.shard_dir, self.info)
        self._whole_checked = True
        with _log_lock:
            if self.shard_dir not in _whole_checked_logged:
                _whole_checked_logged.add(self.shard_dir)
                _LOG.warning("shard %s at %s has no per-file checksums (written before they were recorded): checked "
                             "by reading all of its files; `vmem reindex` records them", self.info.name,
                             self.shard_dir)

    def read(self, rel: str) -> bytes:
        """The bytes of shard file ``rel``, checked against its record.

        Raises:
          FileNotFoundError: the file is missing.
          ShardCorruptError: its size or crc32c differs from the manifest, or it is not recorded there.
        """
        self._check_whole_shard()
        blob = storage.read_bytes(self.path(rel))
        if self.verify and self._records:
            self._check(rel, len(blob), crc32c_hex(blob))
        return blob

    def check_dir(self, local_dir: str, prefix: str) -> None:
        """Checks every file of ``local_dir``, a local copy of the shard's sub-directory ``prefix`` (e.g.
        ``scann``), before a loader that reads the files itself (ScaNN): each must be recorded and match, and
        every file recorded under ``prefix`` must be there.

        Raises:
          ShardCorruptError: naming the first file that is missing, unrecorded or different.
        """
        if not self.verify:
            return
        self._check_whole_shard()
        if not self._records:
            return
        found = {f"{prefix}/{rel}" for rel in local_files(local_dir)}
        for rel in sorted(n for n in self._records if n.startswith(prefix + "/") and n not in found):
            raise self._mismatch(rel, "is missing")
        for rel in sorted(found):
            if rel not in self._records:
                raise self._mismatch(rel, "is not recorded in the manifest")
            size, crc = _local_file_crc32c(os.path.join(local_dir, *rel[len(prefix) + 1:].split("/")))
            self._check(rel, size, crc)


# The help of every command's ``--no-verify`` flag (dest ``verify``, store_false), one wording for all.
NO_VERIFY_HELP = ("do not check shard files against the manifest's checksums as they are loaded (checked by "
                  "default; a mismatch stops the command naming the shard and the file); accepts the risk of "
                  "serving altered or damaged files")
