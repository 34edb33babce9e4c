"""Decode, preprocess and embed images: ``DecodeImages`` and ``EmbedImages`` (a Beam ModelHandler, run a batch ahead).

The encoder is loaded once per worker through Beam's shared model handle, as RunInference does; this module
only adapts ``encoders`` and ``memory.vectors`` (numpy) to Beam.
"""

from __future__ import annotations

import json
import logging
import time
import typing
from typing import Any, Iterable, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult
from apache_beam.utils import shared

from encoders.base import EncoderSpec, PreprocessSpec
from encoders.compatibility import runtime_mismatch
from memory.regions.layout import check_image_ids, region_id
from memory.regions.pooling import region_vectors
from memory.vectors import l2_normalize
from pipelines.coders import NdarrayCoder  # noqa: F401  (registers the numpy coder)
from pipelines.io.readers import FAILED_TAG, failed_record
from pipelines.lookahead import LookaheadDoFn
from pipelines.records import DecodedImage, EmbeddedImage, EntryMeta, ImageRecord, Stage
from pipelines.stages.progress import Progress

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


class DecodeFn(LookaheadDoFn):
    """ImageRecord -> DecodedImage (decoded and preprocessed by ``spec``), or a dead letter with the reason.

    Decoding runs on the worker's pool (`pipelines.lookahead`): Pillow releases the GIL while it decodes and
    resizes (measured: 1.74x on 2 cores for Fashion-MNIST PNGs), so it overlaps the encoder's batches. A
    MemoryError still fails the bundle.
    """

    def __init__(self, spec: PreprocessSpec, threads: int | None = None):
        super().__init__(threads=threads)
        self._spec = spec
        self._decoded = Metrics.counter(_NAMESPACE, "images_decoded")

    def setup(self):
        super().setup()
        from encoders.preprocess import ImageDecodeError, decode_and_preprocess
        self._decode = decode_and_preprocess
        self._error_cls = ImageDecodeError

    def work(self, record: ImageRecord):
        """The DecodedImage of one record, or (record, reason, detail) when it cannot be decoded."""
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

    def emit(self, out):
        if isinstance(out, DecodedImage):
            self._decoded.inc()
            return out
        record, reason, detail = out
        return failed_record(record.id, record.uri, reason, detail, Stage.DECODE)


class DecodeImages(beam.PTransform):
    """ImageRecord -> DecodedImage (main) and FailedRecord (``failed``) for undecodable files."""

    def __init__(self, spec: PreprocessSpec):
        super().__init__()
        self._spec = spec

    def expand(self, records):
        results = records | "Decode" >> beam.ParDo(DecodeFn(self._spec)).with_outputs(
            FAILED_TAG, main="images")
        return results.images, results[FAILED_TAG]


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """A batch's embeddings (``[N, d]``, or ``[N, r, d]`` for regions) with every image's rows L2-normalised in one
    pass; an image with a non-finite or all-zero row keeps its values, for ``_ToEntryFn`` to dead-letter."""
    if vectors.ndim not in (2, 3) or not vectors.size:
        return vectors
    rows = vectors.reshape(vectors.shape[0], -1, vectors.shape[-1])
    good = np.all(np.isfinite(rows), axis=(1, 2)) & np.all(np.any(rows, axis=2), axis=1)
    out = rows.copy()
    if good.any():
        out[good] = l2_normalize(rows[good].reshape(-1, rows.shape[-1])).reshape(rows[good].shape)
    return out.reshape(vectors.shape)


class EncoderModelHandler(ModelHandler[np.ndarray, np.ndarray, Any]):
    """Model handler for any ``encoders.Encoder`` (SavedModel, TF-Hub, Keras, bundled; a model file) under the
    spec's runtime: Beam's ModelHandler API, so ``RunInference`` can run it too.

    Each inference is the image's unit-length embedding (``unit_rows``). ``model_id`` of every PredictionResult
    carries the encoder identity as JSON, so the manifest records the identity of the model the workers ran.
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
        # The batch goes as a list: an encoder that runs chunks on several threads stacks them there.
        if self._regions is None:
            vectors = np.asarray(model.embed(list(batch)), dtype=np.float32)
        else:
            vectors = region_vectors(model.feature_map(list(batch)), self._regions)
        vectors = unit_rows(vectors)
        identity = json.dumps(model.identity.to_dict(), sort_keys=True)
        return [PredictionResult(x, v, model_id=identity) for x, v in zip(batch, vectors)]

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        # The default pickles the whole batch just to count it: ~40 MB of pixels per batch.
        return int(sum(x.nbytes for x in batch))

    def get_metrics_namespace(self) -> str:
        return "visual_memory_encoder"


class _ToEntryFn(beam.DoFn):
    """(EntryMeta, PredictionResult) -> EmbeddedImage (the handler's unit-length rows); logs progress."""

    IDENTITY_TAG = "identity"

    def __init__(self, progress_every: int):
        self._progress_every = max(1, progress_every)
        self._embedded = Metrics.counter(_NAMESPACE, "images_embedded")

    def setup(self):
        self._progress = None
        self._identities: set[str] = set()

    def process(self, element):
        meta, result = element
        if self._progress is None:  # The clock starts with the first image embedded.
            self._progress = Progress("embedded on this worker", every_n=self._progress_every, unit="images")
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
        self._progress.add(1)
        yield EmbeddedImage(meta.id, meta.uri, meta.label, rows[0])
        for r in range(1, rows.shape[0]):
            yield EmbeddedImage(region_id(meta.id, r - 1), meta.uri, meta.label, rows[r])


class InferAheadFn(LookaheadDoFn):
    """Batches of (EntryMeta, pixels) -> (EntryMeta, PredictionResult), the batch run one step ahead.

    What RunInference does with a keyed model handler (the model loaded once per worker process through
    Beam's Shared handle, its metrics under the handler's namespace), except that a batch runs on a thread
    of its own while the bundle's thread reads, decodes and batches the next images and hands on the last
    batch's results: under RunInference the encoder's cores wait for that work between batches (measured:
    0.2-0.3 ms per image on 2 cores, a tenth of the encoder's time). At most one batch runs and one waits.

    A batch the model fails on becomes one ``encoder_error`` dead letter per image naming the exception; a
    MemoryError fails the bundle instead (an encoder out of memory says nothing about the images).
    """

    def __init__(self, handler: KeyedModelHandler):
        super().__init__(threads=1, ahead=1)
        self._handler = handler
        self._shared = shared.Shared()
        namespace = handler.get_metrics_namespace()
        # RunInference's metric names, so dashboards read either.
        self._inferences = Metrics.counter(namespace, "num_inferences")
        self._failed_batches = Metrics.counter(namespace, "failed_batches_counter")
        self._latency = Metrics.distribution(namespace, "inference_batch_latency_micro_secs")

    def setup(self):
        super().setup()
        self._model = self._shared.acquire(self._handler.load_model)

    def work(self, batch):
        start = time.perf_counter()
        try:
            return batch, list(self._handler.run_inference(batch, self._model)), None, time.perf_counter() - start
        except MemoryError:
            raise
        except Exception as e:  # One bad batch never kills the job: its images become dead letters.
            return batch, None, e, time.perf_counter() - start

    def emit(self, result):
        batch, predictions, error, seconds = result
        if error is not None:
            self._failed_batches.inc()
            detail = exception_detail(error)
            return [failed_record(meta.id, meta.uri, "encoder_error", detail, Stage.EMBED) for meta, _ in batch]
        self._inferences.inc(len(batch))
        self._latency.update(int(seconds * 1e6))
        return predictions


class EmbedImages(beam.PTransform):
    """DecodedImage -> EmbeddedImage: batched, embedded by `InferAheadFn` with `EncoderModelHandler`.

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
        # Typed, so batches of pixels get NdarrayCoder's size estimate instead of being pickled to measure them.
        keyed = images | "KeyByEntry" >> beam.Map(lambda im: (EntryMeta(im.id, im.uri, im.label), im.pixels)
                                                  ).with_output_types(typing.Tuple[EntryMeta, np.ndarray])
        inferred = (keyed
                    | "Batch" >> beam.BatchElements(**self._handler.batch_elements_kwargs())
                    | "RunEncoder" >> beam.ParDo(InferAheadFn(self._handler)).with_outputs(
                        FAILED_TAG, main="inferred"))
        entries = inferred.inferred | "ToEntries" >> beam.ParDo(_ToEntryFn(self._progress_every)).with_outputs(
            FAILED_TAG, _ToEntryFn.IDENTITY_TAG, main="entries")
        failures = (entries[FAILED_TAG], inferred[FAILED_TAG]) | "MergeEmbedFailures" >> beam.Flatten()
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
