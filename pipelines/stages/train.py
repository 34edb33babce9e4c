"""What a build trains on a sample of its entries before writing shards: ``TrainRouter`` (partition
sharding's router) and ``TrainIndexTemplate`` (the index template hash shards are built from).

Both samples are the entries with the smallest `memory.search.routing.router_sample_key` (a digest of the
id), so the local build and every runner sample the same entries, drawn from the blocks as they stream
past, a block at a time (`SmallestKeysFn`): no step holds every entry.
"""

from __future__ import annotations

import io
import logging
import math
import secrets
import time

import apache_beam as beam
import numpy as np

from memory import storage
from memory.index.shard_index import IndexConfig
from memory.index.template import train_template, uses_template, write_template
from memory.search.routing import RouterConfig, router_sample_key, train_router, write_router
from pipelines.stages.write import SPILL_DIR, count_rows

_LOG = logging.getLogger("visual_memory")
# Most entries a hash build's index template trains on (IndexConfig.training_sample_size's default).
TEMPLATE_SAMPLE_MAX = 250_000
# A sample accumulator is cut back to its size once it holds this many times as many rows (SmallestKeysFn).
_SAMPLE_SLACK = 1.3


def _train_and_write_router(sample, num_shards: int, *, output: str, config: RouterConfig):
    """Router sample (keys, embeddings) -> (Router, RouterRef) after writing the router file."""
    _, embeddings = sample
    # EmbedImages and ReadEmbeddings yield unit embeddings, as train_router expects; rows are in key order,
    # the same on every runner: a deterministic router.
    router = train_router(embeddings, num_shards=num_shards, config=config)
    ref = write_router(output, router)
    _LOG.info("router: %d centroids trained on %d entries, shard shares %s", ref.count, len(embeddings),
              np.bincount(router.assign(embeddings), minlength=num_shards).tolist())
    return router, ref


def _train_and_write_template(sample_paths, count: int, num_shards: int, *, output: str, config: IndexConfig,
                              size: int) -> dict:
    """Template sample files -> {"path", "id"} of the written index template, or {} when no shard of this
    build will be tree+AH (memory.index.template.uses_template)."""
    _, embeddings = read_sample(sample_paths, size)
    if not uses_template(config, [math.ceil(count / num_shards)]) or len(embeddings) < 16:
        return {}
    start = time.perf_counter()
    ref = write_template(output, train_template(embeddings, config, count))
    _LOG.info("index template for %d entries in %d shards trained on %d entries in %.1f s", count, num_shards,
              len(embeddings), time.perf_counter() - start)
    return ref


class TrainIndexTemplate(beam.PTransform):
    """EntryBlock -> one {"path", "id"} (or {}): a hash build's memory-wide index template, trained and written.

    Its sample is the ``index_config.training_sample_size`` entries (at most TEMPLATE_SAMPLE_MAX) with the
    smallest `memory.routing.router_sample_key`, the router's rule; every tree+AH shard is then built from it
    (memory.index.template) so an opened memory searches its shards as one index. ``num_shards``: a singleton.
    """

    def __init__(self, output: str, *, num_shards, config: IndexConfig):
        super().__init__()
        self._output = output
        self._num_shards = num_shards
        self._config = config

    def expand(self, blocks):
        size = min(self._config.training_sample_size or TEMPLATE_SAMPLE_MAX, TEMPLATE_SAMPLE_MAX)
        count = count_rows(blocks, "CountForTemplate")
        spill = storage.join(self._output, SPILL_DIR, "template-sample")
        return (blocks
                | "Sample" >> beam.ParDo(_SpillSampleFn(spill, size))
                | "SamplePaths" >> beam.combiners.ToList()
                | "Train" >> beam.Map(_train_and_write_template, beam.pvalue.AsSingleton(count),
                                      beam.pvalue.AsSingleton(self._num_shards), output=self._output,
                                      config=self._config, size=size))


class _SpillSampleFn(beam.DoFn):
    """EntryBlock -> the path of a file holding the bundle's ``size`` rows with the smallest
    `router_sample_key` (`SmallestKeysFn`), written at the end of the bundle.

    The sample moves between steps as files, like the shards' rows (`SpillBlocks`): a runner that keeps
    the elements it passes between steps in memory (the local one) never holds a copy of it.
    """

    def __init__(self, spill_dir: str, size: int):
        self._spill_dir = spill_dir
        self._fn = SmallestKeysFn(size)

    def start_bundle(self):
        self._acc = self._fn.create_accumulator()

    def process(self, block):
        self._acc = self._fn.add_input(self._acc, block)

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindow  # pylint: disable=g-import-not-at-top
        from apache_beam.utils.timestamp import MIN_TIMESTAMP  # pylint: disable=g-import-not-at-top
        from apache_beam.utils.windowed_value import WindowedValue  # pylint: disable=g-import-not-at-top

        if not self._acc:
            return
        ((keys, embeddings),) = self._fn.compact(self._acc)
        self._acc = None
        path = storage.join(self._spill_dir, f"{secrets.token_hex(8)}.npz")
        buf = io.BytesIO()
        np.savez(buf, keys=keys, embeddings=embeddings)
        del keys, embeddings
        storage.write_bytes(path, buf.getvalue())
        yield WindowedValue(path, MIN_TIMESTAMP, [GlobalWindow()])


def read_sample(paths, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``size`` smallest-key rows (keys, embeddings) over the sample files `_SpillSampleFn` wrote."""
    fn = SmallestKeysFn(size)
    accs = []
    for path in sorted(paths):
        with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as z:
            accs.append([(z["keys"], z["embeddings"])])
    return fn.extract_output(fn.merge_accumulators(accs))


class SmallestKeysFn(beam.CombineFn):
    """EntryBlock -> (keys, embeddings) of the ``size`` rows with the smallest `router_sample_key`, key order.

    Blocks are combined as arrays (not one element per entry). An accumulator is a list of (keys, embeddings)
    pieces, arrival order, whose first piece, once full, holds the ``size`` smallest keys so far: a block's
    rows with larger keys can never be sampled and are dropped on arrival, and the pieces are cut back to
    ``size`` rows once they pass ``size * _SAMPLE_SLACK``, so a worker holds at most ~2.3 x size sample rows
    (the pieces and the cut), whatever the memory size. Copies of one id count once (the first to arrive).
    """

    def __init__(self, size: int):
        self._size = size

    def create_accumulator(self):
        return []

    def _cut(self, pieces):
        keys = np.concatenate([k for k, _ in pieces])
        keys, uniq = np.unique(keys, return_index=True)  # Sorted; the first copy of an id is kept.
        uniq = uniq[:self._size]
        # Rows gathered piece by piece: no concatenated copy of every piece's rows.
        piece_of = np.repeat(np.arange(len(pieces)), [len(k) for k, _ in pieces])[uniq]
        starts = np.cumsum([0] + [len(k) for k, _ in pieces])
        emb = np.empty((len(uniq), pieces[0][1].shape[1]), dtype=pieces[0][1].dtype)
        for i, (_, piece) in enumerate(pieces):
            at = np.flatnonzero(piece_of == i)
            if len(at):
                emb[at] = piece[uniq[at] - starts[i]]
        return [(keys[:self._size], emb)]

    def add_input(self, acc, block):
        keys = np.array([router_sample_key(i) for i in block.ids.tolist()], dtype="S16")
        emb = block.embeddings
        if not acc:  # The first piece is always a cut one: sorted, at most ``size`` rows.
            return self._cut([(keys, emb)]) if len(keys) else []
        if len(acc[0][0]) >= self._size:
            keep = keys < acc[0][0][-1]
            keys, emb = keys[keep], emb[keep]
        if len(keys):
            acc.append((keys, emb))
        if len(acc) > 1 and sum(len(k) for k, _ in acc) >= self._size * _SAMPLE_SLACK:
            acc = self._cut(acc)
        return acc

    def merge_accumulators(self, accs):
        pieces = [p for a in accs for p in a if len(p[0])]
        return self._cut(pieces) if pieces else []

    def compact(self, acc):
        return self._cut(acc) if len(acc) > 1 else acc

    def extract_output(self, acc):
        if not acc:
            return np.zeros(0, "S16"), np.zeros((0, 1), np.float32)
        return self._cut(acc)[0]


class TrainRouter(beam.PTransform):
    """EntryBlock -> one (Router, RouterRef): a partition-routed memory's router, trained and written.

    The training sample is the ``config.training_sample_size`` entries with the smallest
    `memory.routing.router_sample_key` (a digest of the id), so the local build and every runner train on
    the same entries. ``num_shards``: a singleton PCollection.
    """

    def __init__(self, output: str, *, num_shards, config: RouterConfig):
        super().__init__()
        self._output = output
        self._num_shards = num_shards
        self._config = config

    def expand(self, blocks):
        return (blocks
                | "Sample" >> beam.CombineGlobally(SmallestKeysFn(self._config.training_sample_size))
                | "Train" >> beam.Map(_train_and_write_router, beam.pvalue.AsSingleton(self._num_shards),
                                      output=self._output, config=self._config))
