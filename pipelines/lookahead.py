"""``LookaheadDoFn``: a DoFn whose per-element work runs on a small thread pool, results leaving in input order.

The local runner runs a fused stage's elements one after another on one thread, so everything else in the
stage waits while that thread works on one element. Work that releases the GIL (file reads, Pillow's decoding)
can instead run on a pool between and during the encoder's batches: each element is submitted as it
arrives and its result leaves, with the element's own timestamp and window, as soon as every earlier one
has left (at most ``ahead`` wait; the rest leave in ``finish_bundle``). A subclass defines ``work``
(thread-safe, no metrics: Beam counts only on the bundle's thread) and ``emit`` (on the bundle's thread).
An exception ``work`` raises (a MemoryError, say) fails the bundle as it would inline.
"""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Any

import apache_beam as beam
from apache_beam.utils.windowed_value import WindowedValue

from pipelines.runner import worker_pool_threads


class LookaheadDoFn(beam.DoFn):
    """Runs ``work(element)`` on a pool of ``threads`` (default: the worker's pool size; 0: inline, no pool) and
    outputs ``emit(result)`` in input order, keeping at most ``ahead`` results waiting."""

    def __init__(self, *, threads: int | None = None, ahead: int = 32):
        if ahead < 1:
            raise ValueError(f"ahead={ahead}: need at least 1 element in flight")
        self._threads = threads
        self._ahead = ahead

    def work(self, element: Any) -> Any:
        """The element's result, computed on a pool thread."""
        raise NotImplementedError

    def emit(self, result: Any) -> Any:
        """The output of one result, on the bundle's thread: a value, a ``beam.pvalue.TaggedOutput``, or a list of
        them."""
        raise NotImplementedError

    def setup(self):
        self._pool = None if self._threads == 0 else concurrent.futures.ThreadPoolExecutor(
            max_workers=self._threads or worker_pool_threads(), thread_name_prefix=f"vmem-{type(self).__name__}")

    def start_bundle(self):
        self._pending = collections.deque()

    def _outputs(self, result) -> list:
        outs = self.emit(result)
        return outs if isinstance(outs, list) else [outs]

    def _next(self):
        future, timestamp, window = self._pending.popleft()
        for out in self._outputs(future.result()):  # Re-raises what `work` raised on the pool.
            if isinstance(out, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(out.tag, WindowedValue(out.value, timestamp, [window]))
            else:
                yield WindowedValue(out, timestamp, [window])

    def process(self, element, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        if self._pool is None:  # threads=0: inline, where a pool would cost more than the work.
            yield from self._outputs(self.work(element))
            return
        self._pending.append((self._pool.submit(self.work, element), timestamp, window))
        while self._pending and (len(self._pending) > self._ahead or self._pending[0][0].done()):
            yield from self._next()

    def finish_bundle(self):
        while self._pending:
            yield from self._next()

    def teardown(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
