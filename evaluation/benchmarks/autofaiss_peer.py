"""autofaiss as a benchmark peer of ``vmem build``, run in its own virtualenv by `bench_build`.

autofaiss needs numpy < 2 (and so a pyarrow older than 19), which this project's environment does not have,
so it is never imported here: `bench_build` runs this file as a script with the peer's Python
(``--autofaiss-python``), which imports nothing of the project. Set the peer up once::

    python -m venv /path/af-venv && /path/af-venv/bin/pip install autofaiss 'numpy<2' 'pyarrow<19' faiss-cpu

Two commands, each printing one JSON line on stdout::

    AF_PYTHON autofaiss_peer.py build EMB_DIR INDEX_PATH INFOS_PATH MAX_INDEX_MEMORY
    AF_PYTHON autofaiss_peer.py search INDEX_PATH QUERIES.npy TRUE_IDS.npy THREADS REPEATS TOP_RECALL

``build`` runs autofaiss's ``build_index`` with its defaults (inner product, its own index choice under the
memory budget). ``search`` sweeps the index's search knob (efSearch for HNSW, nprobe for IVF) from cheap to
expensive until recall@10 reaches TOP_RECALL or stops improving, and prints every setting's recall and
queries per second (the best of REPEATS timings of the whole batch).
"""

from __future__ import annotations

import json
import sys
import time

K = 10
_EF = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048)
_NPROBE = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_PLATEAU = 0.0005


def build(emb_dir: str, index_path: str, infos_path: str, max_index_memory: str) -> dict:
    from autofaiss import build_index  # pylint: disable=g-import-not-at-top,import-error
    build_index(embeddings=emb_dir, index_path=index_path, index_infos_path=infos_path,
                max_index_memory_usage=max_index_memory, metric_type="ip")
    with open(infos_path, encoding="utf-8") as f:
        return json.load(f)


def _recall(found, true) -> float:
    import numpy as np  # pylint: disable=g-import-not-at-top
    hit = (found[:, :true.shape[1], None] == true[:, None, :]).any(axis=1)
    return float(hit.sum()) / true.size


def search(index_path: str, queries_path: str, true_path: str, threads: int, repeats: int, top: float) -> dict:
    import faiss  # pylint: disable=g-import-not-at-top,import-error
    import numpy as np  # pylint: disable=g-import-not-at-top
    faiss.omp_set_num_threads(threads)
    index = faiss.read_index(index_path)
    queries = np.ascontiguousarray(np.load(queries_path), dtype=np.float32)
    true = np.load(true_path)
    ivf = faiss.try_extract_index_ivf(index)
    knob, values = ("nprobe", _NPROBE) if ivf is not None else ("efSearch", _EF)
    space = faiss.ParameterSpace()
    trials, previous = [], -1.0
    for value in values:
        space.set_index_parameters(index, f"{knob}={value}")
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            _, found = index.search(queries, K)
            best = min(best, time.perf_counter() - start)
        recall = _recall(found, true)
        trials.append({"params": f"{knob}={value}", "recall": recall, "qps": queries.shape[0] / best})
        if recall >= top or recall - previous < _PLATEAU:
            break
        previous = recall
    return {"index": type(index).__name__, "ntotal": int(index.ntotal), "trials": trials}


def main(argv: list[str]) -> int:
    if argv[:1] == ["build"] and len(argv) == 5:
        out = build(*argv[1:])
    elif argv[:1] == ["search"] and len(argv) == 7:
        out = search(argv[1], argv[2], argv[3], int(argv[4]), int(argv[5]), float(argv[6]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
