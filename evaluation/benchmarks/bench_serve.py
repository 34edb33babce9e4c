"""A bounded load test of ``vmem serve``: concurrent clients over HTTP on 127.0.0.1 while a writer publishes.

The server (serving.server.serve, what ``vmem serve`` runs) runs in a process of its own on a copy of the
memory. First the same queries are classified in this process (`VisualMemory.classify`, one query per call)
and by one HTTP client, one request at a time: the ratio of the two median latencies is what serving adds to
a classify. Then ``--clients`` threads send ``--requests`` requests in all (``POST /v1/classify``, k 10) while
a writer publishes entry weights for a few random entries every ``--publish-every`` seconds (a soft prune,
`memory.store.mutations.publish_entry_weights`, the page's "apply"); the server swaps each version in
without a restart. Reports requests/s, p50/p99 latency, errors (target 0), versions published and seen in
answers, the server's peak RSS (VmHWM), and whether the run kept to its time bound.

    python -m evaluation.benchmarks.bench_serve                     # synthetic 10,000-entry memory, embeddings
    python -m evaluation.benchmarks.bench_serve --memory out/fmnist-memory --images data/fashion-mnist/test
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import socket
import tempfile
import threading
import time
from typing import NamedTuple

import httpx
import numpy as np

from evaluation.benchmarks.machine import describe
from evaluation.benchmarks.synthetic import gaussian_unit_vectors
from memory.build import build_memory_local
from memory.index.shard_index import IndexConfig, IndexKind
from memory.store.mutations import live_ids, publish_entry_weights
from memory.store.versions import ConcurrentUpdateError
from memory.visual_memory import VisualMemory
from pipelines.build import precomputed_identity
from serving.server import serve
from serving.settings import ServeSettings

__all__ = ["ServeLoadResult", "main", "run_serve_load", "synthetic_memory"]

_K = 10


class ServeLoadResult(NamedTuple):
    """What a load run measured; ``errors`` should be 0."""
    requests: int
    clients: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    first_errors: list[str]
    in_process_p50_ms: float  # VisualMemory.classify of one query, in this process.
    sequential_http_p50_ms: float  # The same queries over HTTP, one request at a time.
    http_to_in_process_ratio: float  # sequential_http_p50_ms / in_process_p50_ms.
    loaded_to_in_process_ratio: float  # p50_ms (under load) / in_process_p50_ms.
    versions_published: int
    versions_seen: list[int]
    server_peak_rss_mb: float
    within_time_bound: bool


def synthetic_memory(root: str, *, entries: int = 10_000, dim: int = 64, classes: int = 10, seed: int = 0
                     ) -> np.ndarray:
    """Builds a synthetic brute-force memory at ``root``; returns 256 query embeddings for it."""
    x = gaussian_unit_vectors(entries, dim, seed=seed)
    labels = [f"c{i % classes}" for i in range(entries)]
    build_memory_local(root, ids=[f"e{i:07d}" for i in range(entries)], labels=labels,
                       uris=[f"/synthetic/{i}" for i in range(entries)], embeddings=x, num_shards=2,
                       index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE),
                       encoder_identity=precomputed_identity("synthetic", dim, "synthetic"))
    return gaussian_unit_vectors(256, dim, seed=seed + 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _request(client: httpx.Client, query: np.ndarray | bytes) -> httpx.Response:
    if isinstance(query, bytes):
        return client.post(f"/v1/classify?k={_K}", files={"image": ("q", query, "application/octet-stream")})
    return client.post(f"/v1/classify?k={_K}", json={"embedding": query.tolist()})


def _writer(root: str, stop: threading.Event, every_s: float, published: list[int], seed: int) -> None:
    """Publishes entry weights for 5 random live entries every ``every_s`` seconds until ``stop``."""
    rng = np.random.default_rng(seed)
    ids = live_ids(root)
    while not stop.wait(every_s):
        chosen = rng.choice(ids, size=min(5, ids.size), replace=False)
        try:
            m = publish_entry_weights(root, ids=chosen.tolist(), weights=rng.uniform(0.2, 1.0, chosen.size),
                                      params={"rule": "bench_serve writer"})
            published.append(m.version)
        except ConcurrentUpdateError:  # Not expected (one writer), but never fatal to the load test.
            continue


def run_serve_load(memory: str, queries: list[bytes] | np.ndarray, *, requests: int = 1000, clients: int = 8,
                   publish_every_s: float = 0.5, baseline_queries: int = 100, time_bound_s: float | None = None,
                   workers: int = 1) -> ServeLoadResult:
    """Serves a copy of ``memory`` and loads it (see the module docstring).

    Args:
      memory: The memory (copied; the copy gets the writer's versions).
      queries: Image bytes or float [n, dim] embeddings, sent in turn.
      requests: Requests sent in all by the clients.
      clients: Concurrent client threads (one HTTP connection each).
      publish_every_s: The writer's period.
      baseline_queries: Queries classified in process and over one connection for the latency ratio.
      time_bound_s: The load phase must end within this (default: no bound).
      workers: Server worker processes.
    """
    with tempfile.TemporaryDirectory(prefix="vmem-serve-bench-") as tmp:
        root = os.path.join(tmp, "memory")
        shutil.copytree(memory, root)
        port = _free_port()
        settings = ServeSettings(memory=root, port=port, workers=workers, refresh_interval_s=0.2)
        server = multiprocessing.get_context("spawn").Process(target=serve, args=(settings,), daemon=True)
        server.start()
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            with httpx.Client(base_url=base, timeout=60) as client:
                while True:
                    if not server.is_alive():
                        raise RuntimeError(f"the server exited with status {server.exitcode} before answering")
                    try:
                        if client.get("/healthz").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline:
                        raise RuntimeError("the server did not answer within 300 s")
                    time.sleep(0.1)
                # Baseline: in process, then over HTTP one request at a time, on the same queries.
                n = min(baseline_queries, len(queries))
                local = VisualMemory.open(root, load_encoder=isinstance(queries[0], bytes))
                ask = (lambda q: local.classify([q], k=_K)) if isinstance(queries[0], bytes) else (
                    lambda q: local.classify(np.asarray(q, np.float32)[None], k=_K))
                for i in range(min(5, n)):  # Warm both paths.
                    ask(queries[i])
                    _request(client, queries[i])
                in_process, sequential = [], []
                for i in range(n):
                    t = time.perf_counter()
                    ask(queries[i])
                    in_process.append(time.perf_counter() - t)
                for i in range(n):
                    t = time.perf_counter()
                    r = _request(client, queries[i])
                    sequential.append(time.perf_counter() - t)
                    r.raise_for_status()
                del local
            # Load: clients share one request counter; a writer publishes meanwhile.
            latencies: list[float] = []
            errors: list[str] = []
            versions: set[int] = set()
            lock = threading.Lock()
            next_request = [0]
            stop, published = threading.Event(), []

            def client_loop() -> None:
                with httpx.Client(base_url=base, timeout=60) as c:
                    while True:
                        with lock:
                            i = next_request[0]
                            next_request[0] += 1
                        if i >= requests:
                            return
                        t = time.perf_counter()
                        try:
                            r = _request(c, queries[i % len(queries)])
                            ok = r.status_code == 200
                            detail = "" if ok else f"{r.status_code}: {r.text[:200]}"
                            version = r.json().get("version") if ok else None
                        except (httpx.HTTPError, ValueError) as e:
                            ok, detail, version = False, f"{type(e).__name__}: {e}", None
                        elapsed = time.perf_counter() - t
                        with lock:
                            latencies.append(elapsed)
                            if ok:
                                versions.add(int(version))
                            else:
                                errors.append(detail)

            writer = threading.Thread(target=_writer, args=(root, stop, publish_every_s, published, 0), daemon=True)
            threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
            start = time.perf_counter()
            writer.start()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.perf_counter() - start
            stop.set()
            writer.join()
            rss = _peak_rss_mb(server.pid)
        finally:
            if server.is_alive():
                server.terminate()  # SIGTERM: uvicorn's graceful shutdown.
            server.join(timeout=60)
    in_p50 = float(np.median(in_process)) * 1000
    seq_p50 = float(np.median(sequential)) * 1000
    p50, p99 = (float(np.percentile(latencies, q)) * 1000 for q in (50, 99))
    return ServeLoadResult(
        requests=len(latencies), clients=clients, seconds=round(seconds, 2),
        requests_per_s=round(len(latencies) / seconds, 1), p50_ms=round(p50, 2), p99_ms=round(p99, 2),
        errors=len(errors), first_errors=errors[:3], in_process_p50_ms=round(in_p50, 2),
        sequential_http_p50_ms=round(seq_p50, 2), http_to_in_process_ratio=round(seq_p50 / in_p50, 2),
        loaded_to_in_process_ratio=round(p50 / in_p50, 2), versions_published=len(published),
        versions_seen=sorted(versions), server_peak_rss_mb=round(rss, 1),
        within_time_bound=time_bound_s is None or seconds <= time_bound_s)


def _images(folder: str, limit: int) -> list[bytes]:
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files)[:limit]
    if not paths:
        raise FileNotFoundError(f"--images {folder!r} holds no files")
    out = []
    for p in paths:
        with open(p, "rb") as f:
            out.append(f.read())
    return out


def main(argv=None) -> int:
    """Runs the load test and prints its figures as JSON; exit status 1 when a request failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", default=None, help="a memory to serve (default: a synthetic 10,000-entry one)")
    parser.add_argument("--images", default=None, help="query images (a folder, read recursively) for --memory")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--publish-every", type=float, default=0.5, metavar="SECONDS")
    args = parser.parse_args(argv)
    if (args.memory is None) != (args.images is None):
        parser.error("--memory and --images go together")
    with tempfile.TemporaryDirectory(prefix="vmem-serve-synthetic-") as tmp:
        if args.memory is None:
            memory = os.path.join(tmp, "memory")
            queries: list[bytes] | np.ndarray = synthetic_memory(memory)
        else:
            memory, queries = args.memory, _images(args.images, 256)
        result = run_serve_load(memory, queries, requests=args.requests, clients=args.clients,
                                publish_every_s=args.publish_every, workers=args.workers)
    print(json.dumps({**result._asdict(), "machine": describe()}, indent=2))
    return 1 if result.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
