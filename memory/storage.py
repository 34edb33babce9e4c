"""One small filesystem layer so a local path and ``gs://bucket/path`` behave the same.

`memory/` must stay importable without Apache Beam (notebooks, tests, the query CLI), so it cannot use
Beam's FileSystems; this module covers the handful of operations a visual memory needs with the standard
library for local paths and google-cloud-storage for ``gs://`` paths.

GCS has no directories: a "directory" ``gs://b/x`` is the set of objects whose names start with ``x/``.
Writes of a single object are atomic on GCS; local writes go through a temporary file in the same directory
and ``os.replace`` so a reader never sees a half-written file.

When ``STORAGE_EMULATOR_HOST`` is set (tests, local development) the client talks to the emulator with
anonymous credentials and a short retry deadline, so a dead emulator fails in seconds instead of the
client's default 120 s of retries, and no credential discovery is attempted.
"""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import shutil
import tempfile
import threading
from typing import Any

GCS_PREFIX = "gs://"
_EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
# Retry deadline against an emulator: long enough for a slow CI box, short enough to fail fast when the
# emulator is not running (the client default retries connection errors for 120 s).
_EMULATOR_RETRY_DEADLINE_S = 10.0

_client_lock = threading.Lock()
# Keyed by the emulator host (or None) so a test that starts an emulator after a client was created still
# reaches the emulator and never the real service.
_clients: dict[str | None, Any] = {}


def _names_paths(fn):
    """Re-raises google-cloud errors as OSError naming the operation and its path arguments.

    The client's own messages name URLs like ``/storage/v1/b/<bucket>/o?prefix=...``; callers need the
    ``gs://`` path they passed. NotFound is converted to FileNotFoundError where it has a meaning.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # pylint: disable=broad-except  # Only google-cloud errors are rewrapped.
            if _is_google_api_error(e):
                paths = ", ".join(repr(a) for a in args if isinstance(a, str))
                raise OSError(f"{fn.__name__}({paths}) failed on GCS: {e}") from e
            raise

    return wrapper


def _is_google_api_error(e: Exception) -> bool:
    try:
        # Imported lazily: google-cloud-storage is only needed for gs:// paths.
        from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    except ImportError:
        return False
    return isinstance(e, exceptions.GoogleAPIError)


def is_gcs(path: str) -> bool:
    """Returns True for ``gs://`` paths."""
    return str(path).startswith(GCS_PREFIX)


def join(*parts: str) -> str:
    """Joins path components; ``gs://`` paths always use ``/``.

    Args:
      *parts: Path components; the first decides local vs GCS.

    Returns:
      The joined path.
    """
    if not parts:
        raise ValueError("join() needs at least one path component")
    first = str(parts[0])
    if is_gcs(first):
        return posixpath.join(first, *[str(p) for p in parts[1:]])
    return os.path.join(first, *[str(p) for p in parts[1:]])


def _split_gcs(path: str) -> tuple[str, str]:
    """Splits ``gs://bucket/name`` into (bucket, name); name has no leading slash."""
    rest = path[len(GCS_PREFIX):]
    bucket, _, name = rest.partition("/")
    if not bucket:
        raise ValueError(f"invalid GCS path (no bucket): {path!r}; expected gs://bucket/path")
    return bucket, name


def _client():
    """Returns a cached google.cloud.storage.Client, created on first use."""
    host = os.environ.get(_EMULATOR_ENV) or None
    with _client_lock:
        client = _clients.get(host)
        if client is None:
            # Imported lazily: local-only users (and Beam workers that never touch gs://) skip the import cost.
            from google.cloud import storage  # pylint: disable=g-import-not-at-top

            if host:
                from google.auth.credentials import AnonymousCredentials  # pylint: disable=g-import-not-at-top

                # Anonymous credentials + explicit project: no metadata-server or ADC probing against an emulator.
                client = storage.Client(project="test", credentials=AnonymousCredentials())
            else:
                client = storage.Client()
            _clients[host] = client
        return client


def _retry():
    """Retry policy: the library default, or a short deadline against an emulator."""
    from google.cloud.storage.retry import DEFAULT_RETRY  # pylint: disable=g-import-not-at-top

    if os.environ.get(_EMULATOR_ENV):
        return DEFAULT_RETRY.with_timeout(_EMULATOR_RETRY_DEADLINE_S)
    return DEFAULT_RETRY


def _blob(path: str):
    bucket, name = _split_gcs(path)
    if not name:
        raise ValueError(f"GCS path names a bucket, not an object: {path!r}")
    return _client().bucket(bucket).blob(name)


def _dir_prefix(name: str) -> str:
    return name if (not name or name.endswith("/")) else name + "/"


def _list_blobs(path: str, *, delimiter: str | None = None):
    bucket, name = _split_gcs(path)
    return _client().list_blobs(bucket, prefix=_dir_prefix(name), delimiter=delimiter, retry=_retry())


@_names_paths
def read_bytes(path: str) -> bytes:
    """Reads a whole file.

    Args:
      path: Local path or ``gs://`` object.

    Returns:
      The file's bytes.

    Raises:
      FileNotFoundError: naming the path, when it does not exist.
    """
    if is_gcs(path):
        from google.api_core import exceptions  # pylint: disable=g-import-not-at-top

        try:
            return _blob(path).download_as_bytes(retry=_retry())
        except exceptions.NotFound as e:
            raise FileNotFoundError(f"no such GCS object: {path}") from e
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no such file: {path}") from e


@_names_paths
def write_bytes(path: str, data: bytes) -> None:
    """Writes a whole file atomically (readers see the old or the new content, never a partial file).

    Args:
      path: Local path (parent directories are created) or ``gs://`` object.
      data: The content.
    """
    if is_gcs(path):
        # A single-request upload either creates the new generation or fails; there is no partial object.
        _blob(path).upload_from_string(bytes(data), retry=_retry())
        return
    with staged_local_file(path, data) as tmp:
        os.replace(tmp, path)


@contextlib.contextmanager
def staged_local_file(path: str, data: bytes):
    """Writes ``data`` durably (fsynced) to a temp file beside local ``path`` and yields the temp file's path.

    The caller moves it into place (os.replace to overwrite, os.link to create exclusively); whatever is left
    of the temp file is removed on exit, also on errors. The temp file lives in the target directory so the
    move is a same-filesystem atomic operation; readers never see a partial file under ``path``.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-" + os.path.basename(path) + "-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        yield tmp
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def create_exclusive(path: str, data: bytes, *, content_type: str = "application/octet-stream") -> bool:
    """Creates the file or object ``path`` holding ``data`` unless it already exists.

    Of two writers creating one path exactly one wins: locally a fully written, fsynced temp file is
    hard-linked to ``path`` (``os.link`` refuses an existing target); on GCS one upload with
    ``if_generation_match=0``. Never leaves a partial file under ``path``.

    Args:
      path: Local path or ``gs://`` object.
      data: The complete content.
      content_type: The GCS object's content type.

    Returns:
      True when this call created ``path``; False when it existed (on GCS: True also when the existing object
      holds exactly ``data``, a retried upload of our own).

    Raises:
      OSError: naming ``path``, for a GCS error other than the precondition.
    """
    if is_gcs(path):
        try:
            return _create_exclusive_gcs(path, data, content_type)
        except Exception as e:  # pylint: disable=broad-except  # Only google-cloud errors are rewrapped.
            if _is_google_api_error(e):
                raise OSError(f"creating {path} failed on GCS: {e}") from e
            raise
    return _create_exclusive_local(path, data)


def _create_exclusive_local(path: str, data: bytes) -> bool:
    with staged_local_file(path, data) as tmp:
        try:
            # link() is atomic and refuses an existing target, unlike rename()/replace().
            os.link(tmp, path)
        except FileExistsError:
            return False
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # Make the new directory entry durable before anyone relies on it.
    finally:
        os.close(dir_fd)
    return True


def _create_exclusive_gcs(path: str, data: bytes, content_type: str) -> bool:
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top

    try:
        # With a generation precondition the client's retries are safe: a retry of an upload that had in
        # fact succeeded gets 412, and the byte comparison below recognises our own object.
        _blob(path).upload_from_string(data, if_generation_match=0, retry=_retry(), content_type=content_type)
        return True
    except exceptions.PreconditionFailed:
        pass
    try:
        return read_bytes(path) == data
    except FileNotFoundError:
        return False


def read_text(path: str, *, encoding: str = "utf-8") -> str:
    """Reads a text file (see read_bytes)."""
    return read_bytes(path).decode(encoding)


def write_text(path: str, text: str, *, encoding: str = "utf-8") -> None:
    """Writes a text file atomically (see write_bytes)."""
    write_bytes(path, text.encode(encoding))


@_names_paths
def exists(path: str) -> bool:
    """True if path is an existing file or (non-empty, for GCS) directory."""
    if is_gcs(path):
        bucket, name = _split_gcs(path)
        if not name:
            return _client().bucket(bucket).exists(retry=_retry())
        if _blob(path).exists(retry=_retry()):
            return True
        # A GCS "directory" exists iff at least one object lives under it.
        return any(True for _ in _client().list_blobs(
            bucket, prefix=_dir_prefix(name), max_results=1, retry=_retry()))
    return os.path.exists(path)


@_names_paths
def list_dir(path: str) -> list[str]:
    """Lists the immediate children (file and directory names, no trailing slash), sorted.

    Raises:
      FileNotFoundError: naming the path, when the directory does not exist (or, on GCS, is empty).
    """
    if is_gcs(path):
        it = _list_blobs(path, delimiter="/")
        _, name = _split_gcs(path)
        prefix = _dir_prefix(name)
        children = {b.name[len(prefix):] for b in it}
        # Prefixes are only populated once the iterator has been consumed.
        children |= {p[len(prefix):].rstrip("/") for p in it.prefixes}
        children.discard("")
        if not children:
            raise FileNotFoundError(f"no such GCS directory (no objects under it): {path}")
        return sorted(children)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such directory: {path}")
    return sorted(os.listdir(path))


@_names_paths
def modified_time(path: str) -> float:
    """The newest modification time (POSIX seconds) of a file, or of anything in a directory tree.

    Raises:
      FileNotFoundError: naming the path, when nothing exists there.
    """
    if is_gcs(path):
        times = [b.updated.timestamp() for b in _list_blobs(path) if b.updated is not None]
        _, name = _split_gcs(path)
        blob = _blob(path) if name else None
        if blob is not None and blob.exists(retry=_retry()):
            blob.reload(retry=_retry())
            times.append(blob.updated.timestamp())
        if not times:
            raise FileNotFoundError(f"no such GCS object or directory: {path}")
        return max(times)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file or directory: {path}")
    times = [os.path.getmtime(path)]
    for directory, _, files in os.walk(path):
        times += [os.path.getmtime(directory)] + [os.path.getmtime(os.path.join(directory, f)) for f in files]
    return max(times)


def makedirs(path: str) -> None:
    """Creates a directory and its parents; a no-op on GCS, where directories are implicit."""
    if not is_gcs(path):
        os.makedirs(path, exist_ok=True)


@_names_paths
def remove_tree(path: str) -> None:
    """Deletes a directory tree (or a single file); missing paths are ignored."""
    if is_gcs(path):
        for blob in list(_list_blobs(path)):
            blob.delete(retry=_retry())
        _, name = _split_gcs(path)
        if name:
            from google.api_core import exceptions  # pylint: disable=g-import-not-at-top

            try:
                _blob(path).delete(retry=_retry())
            except exceptions.NotFound:
                pass
        return
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


@_names_paths
def upload_dir(local_dir: str, dest_dir: str) -> None:
    """Recursively copies a local directory to ``dest_dir`` (GCS or local), overwriting same-named files.

    Args:
      local_dir: An existing local directory.
      dest_dir: Destination directory, local or ``gs://``.
    """
    if is_gcs(local_dir):
        raise ValueError(f"upload_dir source must be local, got {local_dir!r}")
    if not os.path.isdir(local_dir):
        raise FileNotFoundError(f"no such directory: {local_dir}")
    if not is_gcs(dest_dir):
        shutil.copytree(local_dir, dest_dir, dirs_exist_ok=True)
        return
    for root, _, files in os.walk(local_dir):
        rel_root = os.path.relpath(root, local_dir)
        for fname in sorted(files):
            rel = fname if rel_root == "." else posixpath.join(*rel_root.split(os.sep), fname)
            _blob(join(dest_dir, rel)).upload_from_filename(os.path.join(root, fname), retry=_retry())


@_names_paths
def download_dir(src_dir: str, local_dir: str) -> None:
    """Recursively copies ``src_dir`` (GCS or local) into a local directory.

    Raises:
      FileNotFoundError: naming src_dir, when it has no files.
    """
    if is_gcs(local_dir):
        raise ValueError(f"download_dir destination must be local, got {local_dir!r}")
    if not is_gcs(src_dir):
        if not os.path.isdir(src_dir):
            raise FileNotFoundError(f"no such directory: {src_dir}")
        shutil.copytree(src_dir, local_dir, dirs_exist_ok=True)
        return
    _, name = _split_gcs(src_dir)
    if not _download_blobs(list(_list_blobs(src_dir)), _dir_prefix(name), local_dir):
        raise FileNotFoundError(f"no such GCS directory (no objects under it): {src_dir}")


@contextlib.contextmanager
def local_dir(path: str, *, prefix: str = "vmem-"):
    """A local directory with ``path``'s files: ``path`` itself when local, else a download removed on exit
    (readers that load everything into memory, like ScaNN, so copies never pile up on a worker's disk)."""
    if not is_gcs(path):
        yield path
        return
    tmp = tempfile.mkdtemp(prefix=prefix)
    try:
        download_dir(path, tmp)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download_blobs(blobs, prefix: str, local_dir: str) -> bool:
    """Downloads ``blobs`` (names under ``prefix``) into ``local_dir``; False if there was no file to copy."""
    found = False
    for blob in blobs:
        rel = blob.name[len(prefix):]
        if not rel or rel.endswith("/"):
            continue  # Zero-byte "directory marker" objects created by some tools.
        found = True
        target = os.path.join(local_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        blob.download_to_filename(target, retry=_retry())
    return found


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def list_image_folder(root: str) -> tuple[list[str], list[str]]:
    """(image paths, class names) of a local ImageFolder ``root/CLASS/IMAGE``, sorted by path.

    Raises:
      FileNotFoundError: naming ``root``, when it is not a directory or holds no CLASS/IMAGE files.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root!r} is not a directory; pass an ImageFolder (CLASS/IMAGE files), "
                                "e.g. data/fashion-mnist/test from `vmem prepare-data`")
    paths, labels = [], []
    for cls in sorted(e.name for e in os.scandir(root) if e.is_dir()):
        for name in sorted(os.listdir(os.path.join(root, cls))):
            if name.lower().endswith(IMAGE_SUFFIXES):
                paths.append(os.path.join(root, cls, name))
                labels.append(cls)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root!r}/CLASS/")
    return paths, labels
