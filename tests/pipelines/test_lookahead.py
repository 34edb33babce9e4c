"""LookaheadDoFn keeps input order with or without its pool; NdarrayCoder round-trips arrays and sizes them
without pickling; the embed stage's unit_rows normalises valid images and leaves bad ones for dead letters."""

from __future__ import annotations

import time

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.coders import NdarrayCoder
from pipelines.lookahead import LookaheadDoFn
from pipelines.stages.embed import unit_rows


class _Slow(LookaheadDoFn):
    """Later elements finish first; odd ones become two outputs, multiples of 5 a tagged one."""

    def work(self, x):
        time.sleep(0.002 * (10 - x % 10))
        return x

    def emit(self, x):
        if x % 5 == 0:
            return beam.pvalue.TaggedOutput("fives", x)
        return [x, -x] if x % 2 else x


@pytest.mark.parametrize("threads", [0, 3])
def test_outputs_leave_in_input_order_with_their_tags(threads):
    with TestPipeline(runner="FnApiRunner") as p:
        out = (p | beam.Create(list(range(40))) | beam.ParDo(_Slow(threads=threads, ahead=4)).with_outputs(
            "fives", main="main"))
        expected = [y for x in range(40) if x % 5 for y in ([x, -x] if x % 2 else [x])]
        assert_that(out.main, equal_to(expected), label="main")
        assert_that(out.fives, equal_to(list(range(0, 40, 5))), label="fives")
    fn = _Slow(threads=threads, ahead=4)
    fn.setup()
    fn.start_bundle()
    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.timestamp import Timestamp
    where = dict(timestamp=Timestamp(0), window=GlobalWindow())
    got = [o for x in range(1, 12, 2) for o in fn.process(x, **where)] + list(fn.finish_bundle())
    values = [getattr(o, "value", o) for o in got]  # Pooled outputs carry their element's window.
    assert [v.value if hasattr(v, "value") else v for v in values] == [1, -1, 3, -3, 5, 7, -7, 9, -9, 11, -11]
    fn.teardown()


def test_ahead_must_be_positive():
    with pytest.raises(ValueError, match="ahead=0"):
        _Slow(ahead=0)


@pytest.mark.parametrize("array", [
    np.arange(24, dtype=np.float32).reshape(2, 3, 4),
    np.zeros((0, 5), np.float64),
    np.array([[1, -2], [3, 4]], np.int16)[:, ::-1],  # Not contiguous.
    np.array(["a", None], dtype=object),
])
def test_ndarray_coder_round_trips(array):
    coder = NdarrayCoder()
    out = coder.decode(coder.encode(array))
    assert out.dtype == array.dtype and out.shape == array.shape
    assert list(out.ravel()) == list(array.ravel())
    assert out.flags.writeable


def test_ndarray_coder_sizes_an_array_without_encoding_it(monkeypatch):
    coder = NdarrayCoder()
    array = np.zeros((224, 224, 3), np.float32)
    monkeypatch.setattr(NdarrayCoder, "encode", lambda self, value: pytest.fail("encoded to measure"))
    assert array.nbytes <= coder.get_impl().estimate_size(array) <= array.nbytes + 64
    assert beam.coders.registry.get_coder(np.ndarray) == coder


def test_unit_rows_normalises_good_images_and_keeps_bad_ones():
    vectors = np.array([[3.0, 4.0], [0.0, 0.0], [np.nan, 1.0], [0.0, 2.0]], np.float32)
    out = unit_rows(vectors)
    np.testing.assert_allclose(out[[0, 3]], [[0.6, 0.8], [0.0, 1.0]], rtol=1e-6)
    assert not out[1].any() and np.isnan(out[2, 0])  # Left for the dead-letter check.
    regions = np.array([[[2.0, 0.0], [0.0, 5.0]], [[1.0, 1.0], [0.0, 0.0]]], np.float32)  # [N, 1 + G*G, d]
    out = unit_rows(regions)
    np.testing.assert_allclose(out[0], [[1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_array_equal(out[1], regions[1])  # One zero region: the whole image is left as it is.
    assert unit_rows(np.zeros((0, 4), np.float32)).shape == (0, 4)
