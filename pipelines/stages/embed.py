"""Decode, preprocess and embed images: ``DecodeImages`` and ``EmbedImages`` (RunInference).

The encoder is loaded once per worker by RunInference's shared model handle; this module only adapts
``encoders`` (TensorFlow) and ``memory.vectors`` (numpy) to Beam.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Iterable, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference

from encoders.base import EncoderSpec, PreprocessSpec
from encoders.compatibility import runtime_mismatch
from memory.regions.layout import check_image_ids, region_id
from memory.regions.pooling import region_vectors
from memory.vectors import l2_normalize
from pipelines.io.readers import FAILED_TAG, failed_record
from pipelines.records import DecodedImage, EmbeddedImage, EntryMeta, ImageRecord, Stage
from pipelines.runner import worker_pool_threads

_LOG = logging.getLogger("visual_memory")
_NAMESPACE = "visual_memory"


class _DropBeamResourceWarning(logging.Filter):
    """Beam 2.77's RunInference imports `resource` in the same try-block as a torch-only ModelManager; without
    torch it concludes `resource` is missing and logs this warning after every batch. Memory is unaffected."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Resource module is not available")


logging.getLogger().addFilter(_DropBeamResourceWarning())


def exception_detail(error: BaseException) -> str:
    """A dead letter's detail: ``Type: message`` of the exception that really failed.

    Wrapping exceptions (ImageDecodeError raised ``from None`` over Pillow's UnidentifiedImageError, say)
    still carry the original as ``__cause__`` / ``__context__``; naming that type is what tells a truncated
    file from an unsupported format, so it comes first and the wrapper's message follows.
    """
    inner = error.__cause__ or error.__context__
    outer = f"{type(error).__name__}: {error}"
    return outer if inner is None else f"{type(inner).__name__}: {inner} (raised as {outer})"


def _batch_error_detail(error: Any) -> str:
    """Detail of a RunInference dead letter, whose error is ``(type, repr, formatted traceback)`` in Beam 2.77."""
    if isinstance(error, BaseException):
        return exception_detail(error)
    exc_type, exc_repr, trace = error
    last = trace[-1].strip() if trace else ""
    # The traceback's last line is "module.Type: message" (builtins unqualified); keep the message.
    message = last.split(": ", 1)[1] if ": " in last else exc_repr
    return f"{exc_type.__name__}: {message}"


def _is_memory_error(error: Any) -> bool:
    exc_type = type(error) if isinstance(error, BaseException) else error[0]
    return isinstance(exc_type, type) and issubclass(exc_type, MemoryError)


class DecodeFn(beam.DoFn):
    """ImageRecord -> DecodedImage (decoded and preprocessed by ``spec``), or a dead letter with the reason."""

    def __init__(self, spec: PreprocessSpec):
        self._spec = spec
        self._decoded = Metrics.counter(_NAMESPACE, "images_decoded")

    def setup(self):
        from encoders.preprocess import ImageDecodeError, decode_and_preprocess
        self._decode = decode_and_preprocess
        self._error_cls = ImageDecodeError

    def _decode_one(self, record: ImageRecord):
        """The DecodedImage of one record, or (record, reason, detail) when it cannot be decoded.

        Thread-safe and metric-free (Beam counts only on the bundle's thread): `_output` makes the element.
        """
        try:
            pixels = self._decode(record.data, self._spec)
        except self._error_cls as e:
            return record, e.reason, exception_detail(e)
        except MemoryError:
            # A worker out of memory is not bad data: fail the bundle so the runner retries it elsewhere.
            raise
        except Exception as e:  # Decoders raise arbitrary types on hostile bytes; one file never kills the job.
            return record, "decode_error", exception_detail(e)
        return DecodedImage(record.id, record.uri, record.label, pixels)

    def _output(self, out):
        if isinstance(out, DecodedImage):
            self._decoded.inc()
            return out
        record, reason, detail = out
        return failed_record(record.id, record.uri, reason, detail, Stage.DECODE)

    def process(self, record: ImageRecord):
        yield self._output(self._decode_one(record))


# Images a decoder keeps in flight per DoFn instance: bounds the buffered pixels (~600 KB each at 224 px).
_DECODE_AHEAD = 32


class ParallelDecodeFn(DecodeFn):
    """`DecodeFn` on a small thread pool, so decoding uses every core between the encoder's batches.

    Pillow releases the GIL while it decodes and resizes (measured: 1.74x on 2 cores for Fashion-MNIST PNGs),
    but the local runner runs a fused stage's elements one after another on one thread. Each record is
    decoded in the pool; results leave in input order, with their own element's timestamp and window, as soon
    as the oldest is done (at most ``_DECODE_AHEAD`` wait), and the rest in ``finish_bundle``. A MemoryError
    still fails the bundle.
    """

    def __init__(self, spec: PreprocessSpec, threads: int | None = None):
        super().__init__(spec)
        self._threads = threads

    def setup(self):
        super().setup()
        import concurrent.futures  # pylint: disable=g-import-not-at-top
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._threads or worker_pool_threads(), thread_name_prefix="vmem-decode")

    def start_bundle(self):
        import collections  # pylint: disable=g-import-not-at-top
        self._pending = collections.deque()

    def _emit(self):
        from apache_beam.utils.windowed_value import WindowedValue  # pylint: disable=g-import-not-at-top
        future, timestamp, window = self._pending.popleft()
        out = self._output(future.result())  # Re-raises a MemoryError from the pool thread.
        if isinstance(out, beam.pvalue.TaggedOutput):
            yield beam.pvalue.TaggedOutput(out.tag, WindowedValue(out.value, timestamp, [window]))
        else:
            yield WindowedValue(out, timestamp, [window])

    def process(self, record: ImageRecord, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        self._pending.append((self._pool.submit(self._decode_one, record), timestamp, window))
        while self._pending and (len(self._pending) > _DECODE_AHEAD or self._pending[0][0].done()):
            yield from self._emit()

    def finish_bundle(self):
        while self._pending:
            yield from self._emit()

    def teardown(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


class DecodeImages(beam.PTransform):
    """ImageRecord -> DecodedImage (main) and FailedRecord (``failed``) for undecodable files."""

    def __init__(self, spec: PreprocessSpec):
        super().__init__()
        self._spec = spec

    def expand(self, records):
        results = records | "Decode" >> beam.ParDo(ParallelDecodeFn(self._spec)).with_outputs(
            FAILED_TAG, main="images")
        return results.images, results[FAILED_TAG]


class EncoderModelHandler(ModelHandler[np.ndarray, np.ndarray, Any]):
    """RunInference handler for any ``encoders.Encoder`` (SavedModel, TF-Hub, Keras, bundled; a model file) under
    the spec's runtime.

    ``model_id`` of every PredictionResult carries the encoder identity as JSON, so the manifest records
    the identity of the model the workers actually ran.
    """

    def __init__(self, spec: EncoderSpec, *, min_batch_size: int = 16, max_batch_size: int = 64,
                 regions: int | None = None):
        super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size)
        self._spec = spec
        # G: each inference is [1 + G*G, d], the global vector then the regions, from one feature-map pass.
        self._regions = regions

    def load_model(self):
        from encoders import load_encoder
        return load_encoder(self._spec)

    def run_inference(self, batch: Sequence[np.ndarray], model, inference_args: Optional[dict] = None
                      ) -> Iterable[PredictionResult]:
        if self._regions is None:
            vectors = np.asarray(model.embed(np.stack(batch)), dtype=np.float32)
        else:
            vectors = region_vectors(model.feature_map(np.stack(batch)), self._regions)
        identity = json.dumps(model.identity.to_dict(), sort_keys=True)
        return [PredictionResult(x, v, model_id=identity) for x, v in zip(batch, vectors)]

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        # The default pickles the whole batch just to count it: ~40 MB of pixels per batch.
        return int(sum(x.nbytes for x in batch))

    def get_metrics_namespace(self) -> str:
        return "visual_memory_encoder"


class _ToEntryFn(beam.DoFn):
    """(EntryMeta, PredictionResult) -> EmbeddedImage with a unit-length embedding; logs progress."""

    IDENTITY_TAG = "identity"

    def __init__(self, progress_every: int):
        self._progress_every = max(1, progress_every)
        self._embedded = Metrics.counter(_NAMESPACE, "images_embedded")

    def setup(self):
        self._count = 0
        self._start = None
        self._identities: set[str] = set()

    def process(self, element):
        meta, result = element
        if self._start is None:
            self._start = time.monotonic()
        vector = np.asarray(result.inference, dtype=np.float32)
        # A region build's inference is [1 + G*G, d]: the global vector, then the regions (memory.regions).
        rows = vector if vector.ndim == 2 else vector[None, :]
        if vector.ndim not in (1, 2) or not np.all(np.isfinite(rows)) or not np.all(np.any(rows, axis=1)):
            yield failed_record(meta.id, meta.uri, "invalid_embedding",
                                f"encoder returned shape {vector.shape} with non-finite or all-zero values",
                                Stage.EMBED)
            return
        if vector.ndim == 2:
            try:
                check_image_ids([meta.id])
            except ValueError as e:
                yield failed_record(meta.id, meta.uri, "region_id_clash", str(e), Stage.EMBED)
                return
        if result.model_id not in self._identities:
            # One identity per worker is the norm; emitting each new one lets the manifest step check them.
            self._identities.add(result.model_id)
            yield beam.pvalue.TaggedOutput(self.IDENTITY_TAG, result.model_id)
        self._embedded.inc()
        self._count += 1
        if self._count % self._progress_every == 0:
            elapsed = time.monotonic() - self._start
            _LOG.info("embedded %d images on this worker (%.1f img/s)", self._count, self._count / max(elapsed, 1e-9))
        units = l2_normalize(rows)
        yield EmbeddedImage(meta.id, meta.uri, meta.label, units[0])
        for r in range(1, units.shape[0]):
            yield EmbeddedImage(region_id(meta.id, r - 1), meta.uri, meta.label, units[r])


class FailedBatchFn(beam.DoFn):
    """RunInference's dead letters (a failed batch and its exception) -> one FailedRecord per image."""

    def process(self, element):
        batch, error = element
        if _is_memory_error(error):
            # RunInference's exception handling catches every Exception, MemoryError included; an encoder that
            # ran out of memory says nothing about these images, so fail the bundle (the runner retries it).
            raise MemoryError(f"the encoder ran out of memory on a batch of {len(batch)} images: "
                              f"{_batch_error_detail(error)}")
        detail = _batch_error_detail(error)
        for meta, _ in batch:
            yield failed_record(meta.id, meta.uri, "encoder_error", detail, Stage.EMBED).value


class EmbedImages(beam.PTransform):
    """DecodedImage -> EmbeddedImage through RunInference.

    Returns ``(entries, failures, identities)``: unit-norm entries, FailedRecords, and the encoder identity
    JSON strings seen on the workers (deduplicated). With ``regions=G`` every image gives its global entry
    and G x G region entries (``IMAGEID#r<i>``, memory.regions.layout) from one pass over the feature map.
    """

    def __init__(self, spec: EncoderSpec, *, min_batch_size: int, max_batch_size: int, progress_every: int,
                 regions: int | None = None):
        super().__init__()
        self._handler = KeyedModelHandler(
            EncoderModelHandler(spec, min_batch_size=min_batch_size, max_batch_size=max_batch_size, regions=regions))
        self._progress_every = progress_every

    def expand(self, images):
        keyed = images | "KeyByEntry" >> beam.Map(lambda im: (EntryMeta(im.id, im.uri, im.label), im.pixels))
        inferred, dlq = keyed | "RunEncoder" >> RunInference(self._handler).with_exception_handling()
        entries = inferred | "ToEntries" >> beam.ParDo(_ToEntryFn(self._progress_every)).with_outputs(
            FAILED_TAG, _ToEntryFn.IDENTITY_TAG, main="entries")
        batch_failures = dlq.failed_inferences | "ExplodeFailedBatches" >> beam.ParDo(FailedBatchFn())
        failures = (entries[FAILED_TAG], batch_failures) | "MergeEmbedFailures" >> beam.Flatten()
        identities = entries[_ToEntryFn.IDENTITY_TAG] | "DistinctIdentities" >> beam.Distinct()
        return entries.entries, failures, identities


class EncoderMismatchError(RuntimeError):
    """Images would be (or were) embedded by an encoder other than the memory's own."""


IDENTITY_KEYS = ("name", "content_hash", "dim")


def memory_encoder_spec(manifest) -> EncoderSpec:
    """The EncoderSpec a memory was built with (its manifest's build config records it)."""
    encoder = manifest.build_config.get("encoder")
    if not encoder:
        raise EncoderMismatchError(
            "the memory's manifest records no encoder spec (build_config.encoder), so images cannot be embedded "
            "like the memory's own; rebuild the memory with `vmem build`.")
    return EncoderSpec.from_dict(encoder)


def check_same_identity(memory_identity: dict, used_identity: dict, *, what: str, fix: str) -> None:
    """Refuses embeddings made by an encoder other than the memory's (name, content hash or dim), or by a runtime
    whose embeddings may differ from the memory's beyond the tolerance (`encoders.compatibility`).

    Args:
      memory_identity: The manifest's encoder identity.
      used_identity: The identity the workers reported (EncoderModelHandler's model_id, parsed).
      what: What was embedded, for the message (e.g. "queries", "the new images").
      fix: What the user should do.
    """
    if any(memory_identity.get(k) != used_identity.get(k) for k in IDENTITY_KEYS):
        mem = {k: memory_identity.get(k) for k in IDENTITY_KEYS}
        got = {k: used_identity.get(k) for k in IDENTITY_KEYS}
        raise EncoderMismatchError(
            f"{what} were embedded by encoder {got} but the memory was built with {mem} (its files changed since "
            f"the build?); distances between different encoders are meaningless. {fix}")
    problem = runtime_mismatch(memory_identity, used_identity)
    if problem:
        raise EncoderMismatchError(f"{what}: {problem}.")
