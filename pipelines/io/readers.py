"""Beam sources for labelled images: ImageFolder, ImageNet-style TFRecords, CSV/JSONL manifests and WebDataset.

Every reader yields :class:`ImageRecord` (stable id, uri, class name, encoded bytes) on its main output
and :class:`FailedRecord` for what it cannot read, so nothing is dropped silently. Local paths and
``gs://`` go through Beam FileSystems alike.
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import hashlib
import io
import json
import os
import posixpath
import tarfile

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipelines.lookahead import LookaheadDoFn
from pipelines.records import FailedRecord, ImageRecord, Stage

FAILED_TAG = "failed"
_NAMESPACE = "visual_memory"


class SourceKind(enum.Enum):
    IMAGE_FOLDER = "folder"
    TFRECORD = "tfrecord"
    MANIFEST = "manifest"
    WEBDATASET = "webdataset"


@dataclasses.dataclass(frozen=True)
class ImageSource:
    """Where images come from. ``location`` is a directory, a file pattern or a manifest file.

    ``options`` holds the spec's ``key=value`` options as sorted pairs (a tuple, so the source stays hashable).
    """
    kind: SourceKind
    location: str
    options: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        # Uris are recorded in the memory and read back later by other processes (workers, `vmem classify`
        # elsewhere): a relative local path would mean "relative to whichever directory the build ran in".
        # Resolve it once, here; gs:// and other URLs stay as they are.
        if self.location and "://" not in self.location:
            object.__setattr__(self, "location", os.path.abspath(self.location))

    def option(self, name: str, default: str | None = None) -> str | None:
        return dict(self.options).get(name, default)

    def to_dict(self) -> dict:
        # Options only when present: manifests of existing builds record {"kind", "location"} exactly.
        out = {"kind": self.kind.value, "location": self.location}
        if self.options:
            out["options"] = dict(self.options)
        return out


_MANIFEST_SUFFIXES = (".csv", ".jsonl", ".json")
# WebDataset options -> allowed values (None: any non-empty value).
_WEBDATASET_OPTIONS = {"label_field": None, "uri_from": ("member", "url")}


def parse_spec_options(rest: str, *, allowed: dict, flag: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Splits ``LOCATION[,key=value...]`` into the location and sorted option pairs.

    Args:
      rest: the spec after its ``kind:`` prefix.
      allowed: option name -> tuple of allowed values, or None for any non-empty value.
      flag: how the spec was given (``--images webdataset:...``), for error messages.

    Raises:
      ValueError: naming the bad option, the allowed ones and the form. Locations cannot contain commas.
    """
    location, *parts = rest.split(",")
    if not location:
        raise ValueError(f"{flag}: empty location; the form is KIND:LOCATION[,key=value...].")
    options = {}
    for part in parts:
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in allowed or not value:
            raise ValueError(
                f"{flag}: bad option {part!r}; options are key=value after the location, separated by commas, "
                f"with keys {sorted(allowed)} (a location itself cannot contain a comma).")
        if allowed[key] is not None and value not in allowed[key]:
            raise ValueError(f"{flag}: option {key}={value!r} is not one of {list(allowed[key])}.")
        if key in options:
            raise ValueError(f"{flag}: option {key!r} given twice.")
        options[key] = value
    return location, tuple(sorted(options.items()))


def parse_image_spec(spec: str) -> ImageSource:
    """Turns ``--images SPEC`` into an :class:`ImageSource`.

    Accepted forms: ``folder:DIR``, ``tfrecord:PATTERN``, ``manifest:FILE``,
    ``webdataset:PATTERN[,label_field=NAME][,uri_from=member|url]`` or, without a prefix, a path ending in
    .csv/.jsonl (manifest), a pattern or file ending in ``.tar`` (WebDataset), a pattern or file whose name
    contains ``tfrecord`` (TFRecords), or a directory (ImageFolder ``DIR/<class>/<image>``).
    """
    if not spec:
        raise ValueError("--images is empty; pass an ImageFolder directory, tfrecord:PATTERN, manifest:FILE "
                         "or webdataset:PATTERN.")
    wds_prefix = SourceKind.WEBDATASET.value + ":"
    if spec.startswith(wds_prefix):
        location, options = parse_spec_options(spec[len(wds_prefix):], allowed=_WEBDATASET_OPTIONS,
                                               flag=f"--images {spec}")
        return ImageSource(SourceKind.WEBDATASET, location, options)
    for kind in SourceKind:
        prefix = kind.value + ":"
        if spec.startswith(prefix):
            return ImageSource(kind, spec[len(prefix):])
    base = posixpath.basename(spec.rstrip("/")).lower()
    if base.endswith(_MANIFEST_SUFFIXES):
        return ImageSource(SourceKind.MANIFEST, spec)
    if base.endswith(".tar"):
        return ImageSource(SourceKind.WEBDATASET, spec)
    if "tfrecord" in base:
        return ImageSource(SourceKind.TFRECORD, spec)
    if not spec.startswith("gs://") and not os.path.isdir(spec):
        raise FileNotFoundError(
            f"--images {spec!r}: not a directory. Pass an ImageFolder (DIR/<class>/<image>), "
            "tfrecord:PATTERN or manifest:FILE.csv|.jsonl.")
    return ImageSource(SourceKind.IMAGE_FOLDER, spec.rstrip("/"))


class CountAll(beam.PTransform):
    """A tuple of PCollections -> a singleton PCollection of how many elements they hold together.

    Each part is counted where it is made and only the counts meet: a Flatten of the elements themselves
    would copy every one (an ImageRecord with its image bytes) through the runner to count it.
    """

    def expand(self, parts):
        counts = [part | f"Count{i}" >> beam.combiners.Count.Globally() for i, part in enumerate(parts)]
        return tuple(counts) | "Parts" >> beam.Flatten() | "Sum" >> beam.CombineGlobally(sum)


def failed_record(record_id: str, uri: str, reason: str, detail: str, stage: str = Stage.READ
                  ) -> beam.pvalue.TaggedOutput:
    """A bad record's `FailedRecord` on the ``FAILED_TAG`` output, counted in ``failed_<stage>_<reason>``.

    Every stage that rejects a record (unreadable, undecodable, duplicate id) yields this instead of dropping
    it, so the job's dead-letter file and its counters list every rejected record with the reason.
    """
    Metrics.counter(_NAMESPACE, f"failed_{stage}_{reason}").inc()
    return beam.pvalue.TaggedOutput(FAILED_TAG, FailedRecord(record_id, uri, stage, reason, detail))


def parse_example(example_cls, filename: str, serialized: bytes):
    """(fallback id, features, None) for one serialized tf.train.Example, or (fallback id, None, failure).

    The fallback id (``file:sha1``) names a record whose own id cannot be read. MemoryError propagates: it is
    not bad data, and the runner should retry the bundle.
    """
    fallback_id = f"{posixpath.basename(filename)}:{hashlib.sha1(serialized).hexdigest()[:16]}"
    try:
        return fallback_id, example_cls.FromString(serialized).features.feature, None
    except MemoryError:
        raise
    except Exception as e:  # pylint: disable=broad-except  # protobuf raises DecodeError, a plain Exception.
        return fallback_id, None, failed_record(fallback_id, filename, "bad_example", f"{type(e).__name__}: {e}")


# Files a reader fetches at once per DoFn instance. A read waits on the store (a GCS object: tens of ms)
# far longer than it holds the GIL, so more threads than cores pay off; at most 32 files wait in order.
READ_THREADS = 8


def read_threads(location: str) -> int:
    """Pool threads for reading files under ``location``: ``READ_THREADS`` on a remote store, none (inline)
    on local disk, where a read takes ~10 us and a pool's hand-off costs more than it saves."""
    return READ_THREADS if "://" in location else 0


def _read_file(path: str) -> bytes:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read()


def list_one_level(root: str) -> tuple[list[str], list[str]]:
    """(sub-directories, files) directly under ``root``, without listing anything deeper.

    Beam FileSystems has no one-level listing (``match(root/*)`` walks or lists every object below ``root``),
    so this asks the store itself: a ``/``-delimited object listing on GCS, ``os.scandir`` locally.
    """
    root = root.rstrip("/")
    if root.startswith("gs://"):
        from apache_beam.io.gcp import gcsio
        bucket, prefix = gcsio.parse_gcs_path(root + "/", object_optional=True)
        blobs = gcsio.GcsIO().client.list_blobs(bucket, prefix=prefix, delimiter="/")
        # Directory placeholder objects ("root/") some tools create are not files.
        files = [f"gs://{bucket}/{b.name}" for b in blobs if b.name != prefix]
        # ``prefixes`` fills in while the pages are consumed, so read it after the loop above.
        dirs = [f"gs://{bucket}/{p.rstrip('/')}" for p in sorted(blobs.prefixes)]
        return dirs, files
    if not os.path.isdir(root):
        raise FileNotFoundError(f"ImageFolder root {root!r} is not a directory.")
    dirs, files = [], []
    with os.scandir(root) as entries:
        for entry in entries:
            (dirs if entry.is_dir() else files).append(posixpath.join(root, entry.name))
    return sorted(dirs), sorted(files)


def _emit_read(result, counter):
    """A read's output on the bundle's thread: the ImageRecord (counted), or the (id, uri, reason, detail) of a
    file that could not be read as a dead letter."""
    if isinstance(result, ImageRecord):
        counter.inc()
        return result
    return failed_record(*result)


class _ListClassDirsFn(beam.DoFn):
    """ImageFolder root -> one element per class directory; loose files at the root are dead letters."""

    def process(self, root: str):
        dirs, files = list_one_level(root)
        if not dirs and not files:
            raise FileNotFoundError(f"ImageFolder root {root!r} is empty or missing; expected ROOT/<class>/<image>.")
        prefix = root.rstrip("/") + "/"
        for path in files:
            yield failed_record(path[len(prefix):], path, "not_in_class_dir",
                                f"file lies directly in {prefix}; ImageFolder expects ROOT/<class>/<image>")
        yield from dirs


class _MatchClassDirFn(beam.DoFn):
    """Class directory -> FileMetadata of every file below it (one class's listing per element, not all)."""

    def process(self, class_dir: str):
        for result in FileSystems.match([class_dir.rstrip("/") + "/**"]):
            yield from result.metadata_list


class _ReadFolderFileFn(LookaheadDoFn):
    """FileMetadata under an ImageFolder root -> ImageRecord (class = first directory below the root)."""

    def __init__(self, root: str):
        super().__init__(threads=read_threads(root))
        self._root = root.rstrip("/") + "/"
        self._read = Metrics.counter(_NAMESPACE, "images_read")

    def work(self, metadata):
        path = metadata.path
        rel = path[len(self._root):] if path.startswith(self._root) else path
        parts = rel.split("/")
        if len(parts) < 2:
            return rel, path, "not_in_class_dir", (
                f"file lies directly in {self._root}; ImageFolder expects ROOT/<class>/<image>")
        try:
            data = _read_file(path)
        except OSError as e:
            return rel, path, "unreadable", f"{type(e).__name__}: {e}"
        return ImageRecord(id=rel, uri=path, label=parts[0], data=data)

    def emit(self, result):
        return _emit_read(result, self._read)


class ParseTFRecordFn(beam.DoFn):
    """(filename, serialized tf.train.Example) -> ImageRecord, ImageNet-style feature keys."""

    def __init__(self):
        self._read = Metrics.counter(_NAMESPACE, "images_read")

    def setup(self):
        # Imported on the worker: the Example proto lives in TensorFlow, which the launcher need not load.
        from tensorflow.core.example import example_pb2
        self._example_cls = example_pb2.Example

    def process(self, element):
        filename, serialized = element
        fallback_id, features, failure = parse_example(self._example_cls, filename, serialized)
        if failure is not None:
            yield failure
            return
        if "image/encoded" not in features or not features["image/encoded"].bytes_list.value:
            yield failed_record(fallback_id, filename, "missing_feature", "no image/encoded bytes in the Example")
            return
        data = features["image/encoded"].bytes_list.value[0]
        if "image/class/text" in features and features["image/class/text"].bytes_list.value:
            label = features["image/class/text"].bytes_list.value[0].decode("utf-8")
        elif "image/class/label" in features and features["image/class/label"].int64_list.value:
            label = str(features["image/class/label"].int64_list.value[0])
        else:
            yield failed_record(fallback_id, filename, "missing_feature",
                                "no image/class/label (int64) or image/class/text in the Example")
            return
        record_id = fallback_id
        if "image/filename" in features and features["image/filename"].bytes_list.value:
            record_id = features["image/filename"].bytes_list.value[0].decode("utf-8")
        self._read.inc()
        yield ImageRecord(id=record_id, uri=f"{filename}#{record_id}", label=label, data=data)


_WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def _split_wds_member(name: str) -> tuple[str, str]:
    """WebDataset naming: the key is the member path up to the first dot of its basename, the rest the field."""
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem), ext.lower()


class _ReadWebDatasetShardFn(beam.DoFn):
    """FileMetadata of a WebDataset tar shard -> ImageRecord per sample (img2dataset layout).

    The tar is streamed (``r|*`` over a FileSystems handle): members of one sample are consecutive, so only
    the current sample is held, never the shard, and nothing is extracted to disk.
    """

    def __init__(self, *, label_field: str | None, uri_from: str):
        self._label_field = label_field
        self._uri_from = uri_from
        self._read = Metrics.counter(_NAMESPACE, "images_read")

    def process(self, metadata):
        path = metadata.path
        key, fields = None, {}
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f, \
                    tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    member_key, ext = _split_wds_member(member.name)
                    if member_key != key and key is not None:
                        yield from self._sample(path, key, fields)
                        fields = {}
                    key = member_key
                    # Read now: in streaming mode a member's bytes are gone once the next member is reached.
                    fields[ext] = (member.name, tar.extractfile(member).read())
        except (OSError, tarfile.TarError, EOFError) as e:
            # A truncated or corrupt shard: samples already emitted stand, the rest cannot be enumerated.
            yield failed_record(posixpath.basename(path), path, "unreadable_tar", f"{type(e).__name__}: {e}")
            return
        if key is not None:
            yield from self._sample(path, key, fields)

    def _sample(self, path: str, key: str, fields: dict):
        meta = {}
        if "json" in fields:
            try:
                meta = json.loads(fields["json"][1].decode("utf-8"))
                if not isinstance(meta, dict):
                    raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
            except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError.
                yield failed_record(key, f"{path}#{fields['json'][0]}", "bad_json", f"{type(e).__name__}: {e}")
                return
        record_id = str(meta.get("key") or key)
        image = next((fields[ext] for ext in _WDS_IMAGE_EXTENSIONS if ext in fields), None)
        if image is None:
            yield failed_record(record_id, f"{path}#{key}", "missing_image",
                                f"sample has {sorted(fields)} but no {'/'.join(_WDS_IMAGE_EXTENSIONS)} member")
            return
        member_uri = f"{path}#{image[0]}"
        if self._label_field is not None:
            value = meta.get(self._label_field)
            label = "" if value is None else str(value).strip()
            where = f"JSON field {self._label_field!r}"
        else:
            label = fields["cls"][1].decode("utf-8", "replace").strip() if "cls" in fields else ""
            where = "a .cls member"
        if not label:
            yield failed_record(record_id, member_uri, "missing_label", f"sample has no label: expected {where}")
            return
        uri = str(meta["url"]) if self._uri_from == "url" and meta.get("url") else member_uri
        self._read.inc()
        yield ImageRecord(id=record_id, uri=uri, label=label, data=image[1])


@dataclasses.dataclass(frozen=True)
class ManifestRow:
    uri: str
    label: str
    id: str


def parse_manifest_line(line: str, *, fmt: str, base_dir: str) -> ManifestRow:
    """Parses one manifest line (``fmt`` 'csv' or 'jsonl'); relative uris resolve against ``base_dir``."""
    if fmt == "jsonl":
        obj = json.loads(line)
        if not isinstance(obj, dict) or "uri" not in obj or "label" not in obj:
            raise ValueError("JSONL manifest rows need 'uri' and 'label' keys (and optionally 'id')")
        uri, label, rid = str(obj["uri"]), str(obj["label"]), obj.get("id")
    else:
        row = next(csv.reader(io.StringIO(line)))
        if len(row) not in (2, 3):
            raise ValueError(f"CSV manifest rows are uri,label[,id]; got {len(row)} fields")
        uri, label = row[0].strip(), row[1].strip()
        rid = row[2].strip() if len(row) == 3 and row[2].strip() else None
    if not uri or not label:
        raise ValueError("empty uri or label")
    if not (uri.startswith("gs://") or uri.startswith("/")):
        uri = posixpath.join(base_dir, uri) if base_dir else uri
    return ManifestRow(uri=uri, label=label, id=rid or uri)


class _ParseManifestLineFn(beam.DoFn):
    def __init__(self, manifest_path: str, fmt: str):
        self._path = manifest_path
        self._fmt = fmt
        self._base = posixpath.dirname(manifest_path)

    def process(self, line):
        if not line.strip():
            return  # Blank lines carry no record; nothing to report.
        try:
            yield parse_manifest_line(line, fmt=self._fmt, base_dir=self._base)
        except (ValueError, json.JSONDecodeError, StopIteration) as e:
            yield failed_record(line[:200], self._path, "bad_manifest_row", f"{type(e).__name__}: {e}")


class _ReadManifestEntryFn(LookaheadDoFn):
    """ManifestRow -> ImageRecord; on a pool always, as a manifest's rows may name files on any store."""

    def __init__(self):
        super().__init__(threads=READ_THREADS)
        self._read = Metrics.counter(_NAMESPACE, "images_read")

    def work(self, row: ManifestRow):
        try:
            data = _read_file(row.uri)
        except (OSError, ValueError) as e:  # Beam raises BeamIOError (an IOError) or ValueError for bad paths.
            return row.id, row.uri, "unreadable", f"{type(e).__name__}: {e}"
        return ImageRecord(id=row.id, uri=row.uri, label=row.label, data=data)

    def emit(self, result):
        return _emit_read(result, self._read)


def _manifest_format_and_header(path: str) -> tuple[str, bool]:
    fmt = "jsonl" if path.lower().endswith((".jsonl", ".json")) else "csv"
    if fmt == "jsonl":
        return fmt, False
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            first = f.readline().decode("utf-8").strip().lower()
    except OSError as e:
        raise FileNotFoundError(f"manifest {path!r} cannot be read: {e}") from e
    return fmt, first.replace(" ", "") in ("uri,label", "uri,label,id")


class ReadImages(beam.PTransform):
    """Reads labelled images from an :class:`ImageSource`.

    Returns a ``(records, failures)`` pair of PCollections: :class:`ImageRecord` and :class:`FailedRecord`.
    """

    def __init__(self, source: ImageSource):
        super().__init__()
        self._source = source

    def expand(self, pbegin):
        src = self._source
        if src.kind is SourceKind.IMAGE_FOLDER:
            # Listing is bounded: the root is listed one level deep (the class directories), then each class
            # directory is matched on its own worker, so no element or worker holds every path of the folder.
            classes = (
                pbegin
                | "FolderRoot" >> beam.Create([src.location.rstrip("/")])
                | "ListClassDirs" >> beam.ParDo(_ListClassDirsFn()).with_outputs(FAILED_TAG, main="dirs"))
            results = (
                classes.dirs
                | "SpreadClassDirs" >> beam.Reshuffle()
                | "MatchClassFiles" >> beam.ParDo(_MatchClassDirFn())
                # Spread file reads over workers; one class's match result would otherwise stay on one.
                | "SpreadFiles" >> beam.Reshuffle()
                | "ReadImageFiles" >> beam.ParDo(_ReadFolderFileFn(src.location)).with_outputs(
                    FAILED_TAG, main="records"))
            failures = (classes[FAILED_TAG], results[FAILED_TAG]) | "MergeFolderFailures" >> beam.Flatten()
            return results.records, failures
        if src.kind is SourceKind.WEBDATASET:
            results = (
                pbegin
                | "MatchShards" >> fileio.MatchFiles(
                    src.location, empty_match_treatment=fileio.EmptyMatchTreatment.DISALLOW)
                | "SpreadShards" >> beam.Reshuffle()
                | "ReadShards" >> beam.ParDo(_ReadWebDatasetShardFn(
                    label_field=src.option("label_field"), uri_from=src.option("uri_from", "member")))
                .with_outputs(FAILED_TAG, main="records"))
            return results.records, results[FAILED_TAG]
        if src.kind is SourceKind.TFRECORD:
            from apache_beam.io.tfrecordio import ReadAllFromTFRecord
            results = (
                pbegin
                | "TFRecordPattern" >> beam.Create([src.location])
                | "ReadTFRecords" >> ReadAllFromTFRecord(with_filename=True)
                | "ParseExamples" >> beam.ParDo(ParseTFRecordFn()).with_outputs(FAILED_TAG, main="records"))
            return results.records, results[FAILED_TAG]
        fmt, header = _manifest_format_and_header(src.location)
        rows = (
            pbegin
            | "ReadManifest" >> beam.io.ReadFromText(src.location, skip_header_lines=1 if header else 0)
            | "ParseManifest" >> beam.ParDo(_ParseManifestLineFn(src.location, fmt)).with_outputs(
                FAILED_TAG, main="rows"))
        fetched = (
            rows.rows
            | "SpreadManifestRows" >> beam.Reshuffle()
            | "ReadManifestImages" >> beam.ParDo(_ReadManifestEntryFn()).with_outputs(FAILED_TAG, main="records"))
        failures = (rows[FAILED_TAG], fetched[FAILED_TAG]) | "MergeReadFailures" >> beam.Flatten()
        return fetched.records, failures
