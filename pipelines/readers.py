"""Beam sources for labelled images: ImageFolder, ImageNet-style TFRecords and CSV/JSONL manifests.

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

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipelines.records import FailedRecord, ImageRecord, Stage

FAILED_TAG = "failed"
_NAMESPACE = "visual_memory"


class SourceKind(enum.Enum):
    IMAGE_FOLDER = "folder"
    TFRECORD = "tfrecord"
    MANIFEST = "manifest"


@dataclasses.dataclass(frozen=True)
class ImageSource:
    """Where images come from. ``location`` is a directory, a file pattern or a manifest file."""
    kind: SourceKind
    location: str

    def to_dict(self) -> dict:
        return {"kind": self.kind.value, "location": self.location}


_MANIFEST_SUFFIXES = (".csv", ".jsonl", ".json")


def parse_image_spec(spec: str) -> ImageSource:
    """Turns ``--images SPEC`` into an :class:`ImageSource`.

    Accepted forms: ``folder:DIR``, ``tfrecord:PATTERN``, ``manifest:FILE`` or, without a prefix, a path
    ending in .csv/.jsonl (manifest), a pattern or file whose name contains ``tfrecord`` (TFRecords), or a
    directory (ImageFolder ``DIR/<class>/<image>``).
    """
    if not spec:
        raise ValueError("--images is empty; pass an ImageFolder directory, tfrecord:PATTERN or manifest:FILE.")
    for kind in SourceKind:
        prefix = kind.value + ":"
        if spec.startswith(prefix):
            return ImageSource(kind, spec[len(prefix):])
    base = posixpath.basename(spec.rstrip("/")).lower()
    if base.endswith(_MANIFEST_SUFFIXES):
        return ImageSource(SourceKind.MANIFEST, spec)
    if "tfrecord" in base:
        return ImageSource(SourceKind.TFRECORD, spec)
    if not spec.startswith("gs://") and not os.path.isdir(spec):
        raise FileNotFoundError(
            f"--images {spec!r}: not a directory. Pass an ImageFolder (DIR/<class>/<image>), "
            "tfrecord:PATTERN or manifest:FILE.csv|.jsonl.")
    return ImageSource(SourceKind.IMAGE_FOLDER, spec.rstrip("/"))


def _failed(record_id: str, uri: str, reason: str, detail: str, stage: str = Stage.READ):
    Metrics.counter(_NAMESPACE, f"failed_{stage}_{reason}").inc()
    return beam.pvalue.TaggedOutput(FAILED_TAG, FailedRecord(record_id, uri, stage, reason, detail))


def _read_file(path: str) -> bytes:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read()


class _ReadFolderFileFn(beam.DoFn):
    """FileMetadata under an ImageFolder root -> ImageRecord (class = first directory below the root)."""

    def __init__(self, root: str):
        self._root = root.rstrip("/") + "/"
        self._read = Metrics.counter(_NAMESPACE, "images_read")

    def process(self, metadata):
        path = metadata.path
        rel = path[len(self._root):] if path.startswith(self._root) else path
        parts = rel.split("/")
        if len(parts) < 2:
            yield _failed(rel, path, "not_in_class_dir",
                          f"file lies directly in {self._root}; ImageFolder expects ROOT/<class>/<image>")
            return
        try:
            data = _read_file(path)
        except OSError as e:
            yield _failed(rel, path, "unreadable", f"{type(e).__name__}: {e}")
            return
        self._read.inc()
        yield ImageRecord(id=rel, uri=path, label=parts[0], data=data)


class _ParseTFRecordFn(beam.DoFn):
    """(filename, serialized tf.train.Example) -> ImageRecord, ImageNet-style feature keys."""

    def __init__(self):
        self._read = Metrics.counter(_NAMESPACE, "images_read")

    def setup(self):
        # Imported on the worker: the Example proto lives in TensorFlow, which the launcher need not load.
        from tensorflow.core.example import example_pb2
        self._example_cls = example_pb2.Example

    def process(self, element):
        filename, serialized = element
        digest = hashlib.sha1(serialized).hexdigest()[:16]
        fallback_id = f"{posixpath.basename(filename)}:{digest}"
        try:
            features = self._example_cls.FromString(serialized).features.feature
        except MemoryError:
            raise  # Not bad data: fail the bundle so the runner retries it.
        except Exception as e:  # protobuf raises DecodeError, a plain Exception subclass.
            yield _failed(fallback_id, filename, "bad_example", f"{type(e).__name__}: {e}")
            return
        if "image/encoded" not in features or not features["image/encoded"].bytes_list.value:
            yield _failed(fallback_id, filename, "missing_feature", "no image/encoded bytes in the Example")
            return
        data = features["image/encoded"].bytes_list.value[0]
        if "image/class/text" in features and features["image/class/text"].bytes_list.value:
            label = features["image/class/text"].bytes_list.value[0].decode("utf-8")
        elif "image/class/label" in features and features["image/class/label"].int64_list.value:
            label = str(features["image/class/label"].int64_list.value[0])
        else:
            yield _failed(fallback_id, filename, "missing_feature",
                          "no image/class/label (int64) or image/class/text in the Example")
            return
        record_id = fallback_id
        if "image/filename" in features and features["image/filename"].bytes_list.value:
            record_id = features["image/filename"].bytes_list.value[0].decode("utf-8")
        self._read.inc()
        yield ImageRecord(id=record_id, uri=f"{filename}#{record_id}", label=label, data=data)


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
            yield _failed(line[:200], self._path, "bad_manifest_row", f"{type(e).__name__}: {e}")


class _ReadManifestEntryFn(beam.DoFn):
    def __init__(self):
        self._read = Metrics.counter(_NAMESPACE, "images_read")

    def process(self, row: ManifestRow):
        try:
            data = _read_file(row.uri)
        except (OSError, ValueError) as e:  # Beam raises BeamIOError (an IOError) or ValueError for bad paths.
            yield _failed(row.id, row.uri, "unreadable", f"{type(e).__name__}: {e}")
            return
        self._read.inc()
        yield ImageRecord(id=row.id, uri=row.uri, label=row.label, data=data)


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
            results = (
                pbegin
                | "MatchImageFiles" >> fileio.MatchFiles(
                    src.location.rstrip("/") + "/**",
                    empty_match_treatment=fileio.EmptyMatchTreatment.DISALLOW)
                # Spread file reads over workers; a single match result would otherwise stay on one.
                | "SpreadFiles" >> beam.Reshuffle()
                | "ReadImageFiles" >> beam.ParDo(_ReadFolderFileFn(src.location)).with_outputs(
                    FAILED_TAG, main="records"))
            return results.records, results[FAILED_TAG]
        if src.kind is SourceKind.TFRECORD:
            from apache_beam.io.tfrecordio import ReadAllFromTFRecord
            results = (
                pbegin
                | "TFRecordPattern" >> beam.Create([src.location])
                | "ReadTFRecords" >> ReadAllFromTFRecord(with_filename=True)
                | "ParseExamples" >> beam.ParDo(_ParseTFRecordFn()).with_outputs(FAILED_TAG, main="records"))
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
