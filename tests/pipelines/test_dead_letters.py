"""Dead letters: details name the exception that really failed; MemoryError is never turned into one."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from encoders.base import PreprocessSpec, ResizeMode
from pipelines.stages.embed import DecodeImages, DecodeFn, InferAheadFn
from pipelines.io.readers import FAILED_TAG, ReadImages, ParseTFRecordFn, parse_image_spec
from pipelines.records import EntryMeta, ImageRecord

SPEC = PreprocessSpec(image_size=16, resize=ResizeMode.RESIZE_SQUARE)


def test_undecodable_image_detail_names_pillows_exception():
    with TestPipeline(runner="FnApiRunner") as p:
        _, failures = (p | beam.Create([ImageRecord("a", "/x/a.png", "cat", b"this is not an image\n")])
                       | DecodeImages(SPEC))
        got = failures | beam.Map(lambda f: (f.reason, f.detail.split(" (raised as ")[0].split(" <")[0],
                                             "ImageDecodeError: not_an_image" in f.detail))
        assert_that(got, equal_to([("not_an_image", "UnidentifiedImageError: cannot identify image file", True)]))


class _Model:
    """Any weak-referenceable object (the model is shared through apache_beam.utils.shared)."""


class _FailingHandler(ModelHandler):
    def load_model(self):
        return _Model()

    def run_inference(self, batch, model, inference_args=None):
        raise ValueError(f"boom on {len(batch)} image(s)")


def _infer(keyed, handler):
    return (keyed | beam.BatchElements(min_batch_size=1, max_batch_size=4)
            | beam.ParDo(InferAheadFn(KeyedModelHandler(handler))).with_outputs(FAILED_TAG, main="inferred"))


def test_encoder_failure_detail_is_the_encoders_exception():
    # A failed batch gives one dead letter per image whose detail reads "ValueError: boom ...".
    with TestPipeline(runner="FnApiRunner") as p:
        keyed = p | beam.Create([(EntryMeta(i, f"/x/{i}.png", "cat"), np.zeros((2, 2, 3), np.float32))
                                 for i in ("a", "b")])
        out = _infer(keyed, _FailingHandler())
        assert_that(out[FAILED_TAG] | beam.Map(lambda f: (f.id, f.reason, f.stage, f.detail.split(" on ")[0])),
                    equal_to([(i, "encoder_error", "embed", "ValueError: boom") for i in ("a", "b")]),
                    label="failed")
        assert_that(out.inferred, equal_to([]), label="inferred")


def test_bad_manifest_row_detail_names_the_exception_type(tmp_path):
    (tmp_path / "m.jsonl").write_text("not json\n")
    with TestPipeline(runner="FnApiRunner") as p:
        _, failures = p | ReadImages(parse_image_spec(str(tmp_path / "m.jsonl")))
        assert_that(failures | beam.Map(lambda f: f.detail.split(":")[0]), equal_to(["JSONDecodeError"]))


class _OutOfMemoryHandler(_FailingHandler):
    def run_inference(self, batch, model, inference_args=None):
        raise MemoryError("encoder out of memory")


def test_memory_error_in_the_encoder_fails_the_job_instead_of_dead_letters():
    p = TestPipeline(runner="FnApiRunner")
    keyed = p | beam.Create([(EntryMeta("a", "/x/a.png", "cat"), np.zeros((2, 2, 3), np.float32))])
    _ = _infer(keyed, _OutOfMemoryHandler())
    with pytest.raises(Exception, match="encoder out of memory"):
        p.run().wait_until_finish()


def test_memory_error_while_decoding_propagates():
    fn = DecodeFn(SPEC)
    fn.setup()

    def out_of_memory(data, spec):
        raise MemoryError("no room for pixels")

    fn._decode = out_of_memory
    with pytest.raises(MemoryError, match="no room"):
        fn.work(ImageRecord("a", "/x/a.png", "cat", b"whatever"))
    fn._decode = lambda data, spec: (_ for _ in ()).throw(RuntimeError("hostile bytes"))
    failed = fn.emit(fn.work(ImageRecord("a", "/x/a.png", "cat", b"whatever")))
    assert failed.value.detail == "RuntimeError: hostile bytes"  # Other errors still become dead letters.
    fn.teardown()


def test_memory_error_while_parsing_a_tfrecord_propagates():
    fn = ParseTFRecordFn()
    fn.setup()

    class _Example:
        @staticmethod
        def FromString(data):  # noqa: N802  (protobuf's name)
            raise MemoryError("huge example")

    fn._example_cls = _Example
    with pytest.raises(MemoryError, match="huge example"):
        list(fn.process(("/x/train.tfrecord", b"serialized")))


def test_parallel_decode_keeps_order_dead_letters_and_memory_errors(tmp_path):
    """DecodeFn (the DecodeImages stage) emits every record once, in input order, bad files as dead
    letters, and fails the bundle on a MemoryError from its pool."""
    import io

    from PIL import Image

    from pipelines.stages.embed import DecodeFn
    from pipelines.records import DecodedImage

    def png(v):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (v, v, v)).save(buf, format="PNG")
        return buf.getvalue()
    records = [ImageRecord(f"r{i:03d}", f"/x/{i}.png", "cat", png(i) if i % 7 else b"broken") for i in range(100)]
    with TestPipeline(runner="FnApiRunner") as p:
        images, failed = p | beam.Create(records) | DecodeImages(SPEC)
        assert_that(images | beam.Map(lambda d: d.id), equal_to([r.id for r in records if r.data != b"broken"]),
                    label="images")
        assert_that(failed | beam.Map(lambda f: (f.id, f.stage)),
                    equal_to([(r.id, "decode") for r in records if r.data == b"broken"]), label="failed")
    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.timestamp import Timestamp
    fn = DecodeFn(SPEC, threads=2)
    fn.setup()
    fn.start_bundle()
    where = dict(timestamp=Timestamp(0), window=GlobalWindow())
    out = [o for r in records[:20] for o in fn.process(r, **where)] + list(fn.finish_bundle())
    ids = [(o.value.value.id if isinstance(o, beam.pvalue.TaggedOutput) else o.value.id) for o in out]
    assert ids == [r.id for r in records[:20]]  # Input order.
    assert all(isinstance(o.value, DecodedImage) for o in out if not isinstance(o, beam.pvalue.TaggedOutput))

    def out_of_memory(data, spec):
        raise MemoryError("no room for pixels")
    fn._decode = out_of_memory
    fn.start_bundle()
    with pytest.raises(MemoryError, match="no room"):
        [o for r in records[:3] for o in fn.process(r, **where)] + list(fn.finish_bundle())
    fn.teardown()
