"""Every job on Beam's portable path, with workers as Dataflow Runner v2 runs them: separate processes that
have only the staged package.

One lifecycle (build -> add -> forget -> prune -> evaluate twice -> re-index) of a partition-routed memory
with ScaNN tree+AH shards (the jobs' richest path: router, index template, approximate search), with a
corrupt image in each input (dead letters), runs twice through the ``vmem`` commands: locally on the
default in-process runner, and on ``gs://`` (a GCS emulator) with ``--runner=PortableRunner
--job_endpoint=embed --environment_type=EXTERNAL --environment_config=127.0.0.1:PORT --setup_file=setup.py``.
There the job service runs in the test's subprocess and hands every bundle to SDK workers that an external
worker pool (``apache_beam.runners.worker.worker_pool_main``) starts from a separate virtualenv. Each worker
boots as the container's boot does on Dataflow (tests/portable_boot.py): it fetches the job's staged
artifacts and pip-installs the ``workflow.tar.gz`` sdist that Beam's stager built from ``--setup_file``
(and the ``--extra_package`` packages), the staging a Dataflow submission does; the checkout is neither on
its ``sys.path`` nor its working directory, and its home and encoder cache are its own. The evaluations
re-rank on the workers: once with the offline second encoder, which reads the candidates' images there,
and once with a re-ranker kind that the launcher registered at run time and the workers only have as an
installed module. Both runs must agree on the stored ids and labels after every step, the dead letters,
the prune counts, and every query's neighbours (ids, labels, distances, weights), re-ranked labels and
vote tables.

The worker virtualenv installs only the staged packages. Their requirements (Beam, TensorFlow, ScaNN, ...)
are not installed there but shared: a ``.pth`` file lists the test interpreter's site-packages directory.
The tests run offline, where pip cannot fetch them; sharing keeps the requirements identical to the
submitting process's (as a pinned worker image would) while the project itself stays invisible, because a
listed directory's own ``.pth`` files (the editable install's finder among them) are not processed.

Run with ``make test-portable`` (or ``pytest -m slow tests/pipelines/test_portable.py``).
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import types

import numpy as np
import pytest

from evaluation.neighbors_io import read_neighbor_files
from memory import storage
from memory.store.shard import read_shard_data
from memory.store.versions import read_manifest
from memory.visual_memory import VisualMemory
from pipelines.prune import read_bucket_counts
from pipelines.records import FailedRecord
from vmem import main as cli

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HELD_OUT = ("bag", "sandal")
CORRUPT = b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10  # PNG signature, broken body: a dead letter.
_POOL_START_TIMEOUT_S = 60
# The portable lifecycle takes about 2 minutes on 2 busy cores. A worker that dies before it connects leaves the job
# service waiting for it forever, so the lifecycle runs in a subprocess with this limit.
_PORTABLE_TIMEOUT_S = 600
# Runs in that subprocess: the portable lifecycle, its result as JSON.
_PORTABLE_SCRIPT = """
import importlib, json, sys, types
from memory import rerank
from tests.pipelines.test_portable import _lifecycle
base, data, flags, plugin, out = json.loads(sys.argv[1])
rerank.register(importlib.import_module(plugin).KIND)
json.dump(_lifecycle(base, types.SimpleNamespace(**data), flags), open(out, "w"))
"""
# A re-ranker kind that is not built in: tests/fake_reranker.py as a package of its own, which the launcher
# registers at run time and Dataflow workers get through --extra_package.
_PLUGIN = "vmem_last_reranker"
_RECORD_ENV = "VMEM_PORTABLE_RECORD"  # Where tests/portable_boot.py's harnesses record themselves.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_worker_venv(path: str) -> str:
    """A virtualenv from the test interpreter's base Python: the requirements shared by a .pth, no project.

    Returns the boot executable (tests/portable_boot.py with this venv's interpreter).
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", path], check=True)
    python = os.path.join(path, "bin", "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(site, "shared-requirements.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    boot = os.path.join(path, "bin", "vmem-boot")
    with open(os.path.join(REPO, "tests", "portable_boot.py")) as src, open(boot, "w") as f:
        f.write(f"#!{python}\n" + src.read())
    os.chmod(boot, 0o755)
    return boot


@pytest.fixture(scope="module")
def worker_pool(gcs_bucket, tmp_path_factory):
    """An external worker pool on 127.0.0.1 whose workers boot from a separate virtualenv.

    Started after ``gcs_bucket``: the workers inherit its emulator and credentials variables, so they reach
    ``gs://`` as Dataflow workers reach GCS, with their own clients.
    """
    work = tmp_path_factory.mktemp("portable_workers")
    venv = str(work / "venv")
    boot = _make_worker_venv(venv)
    python = os.path.join(venv, "bin", "python")
    probe = subprocess.run([python, "-c", "import pipelines"], cwd=str(work), capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'pipelines'" in probe.stderr, (
        f"the worker virtualenv must not see the project before the sdist is installed: {probe.stderr[-500:]}")
    port = _free_port()
    record = str(work / "workers.jsonl")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    # A home and cache of their own: nothing the submitting process derived on disk (encoder caches) is reused.
    env.update({_RECORD_ENV: record, "TMPDIR": str(work), "HOME": str(work / "home"),
                "VMEM_CACHE_DIR": str(work / "home" / "cache")})
    log_path = str(work / "pool.log")
    with open(log_path, "wb") as log:
        # Not the checkout as working directory: `python -m` puts it first on sys.path.
        pool = subprocess.Popen([python, "-m", "apache_beam.runners.worker.worker_pool_main",
                                 f"--service_port={port}", f"--container_executable={boot}"],
                                cwd=str(work), env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + _POOL_START_TIMEOUT_S
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if pool.poll() is not None or time.monotonic() > deadline:
            pool.kill()
            pytest.fail(f"worker pool did not start; log:\n{open(log_path).read()[-3000:]}", pytrace=False)
        time.sleep(0.2)
    egg_info = os.path.join(REPO, "visual_memory.egg-info")
    had_egg_info = os.path.exists(egg_info)
    yield types.SimpleNamespace(port=port, venv=venv, python=python, record=record, log=log_path)
    pool.send_signal(signal.SIGINT)  # Its atexit hook stops any worker still running.
    try:
        pool.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pool.kill()
    if not had_egg_info:  # Beam's stager builds the sdist next to setup.py.
        shutil.rmtree(egg_info, ignore_errors=True)


def _copy_classes(src: str, dst: str, classes) -> str:
    for c in classes:
        shutil.copytree(os.path.join(src, c), os.path.join(dst, c))
    return dst


@pytest.fixture(scope="module")
def data(fmnist_small, tmp_path_factory):
    """fmnist_small's training images split into the memory's classes and the classes added later, each with
    one corrupt PNG."""
    root = tmp_path_factory.mktemp("portable_data")
    train = os.path.join(fmnist_small, "train")
    classes = sorted(os.listdir(train))
    old = _copy_classes(train, str(root / "old"), [c for c in classes if c not in HELD_OUT])
    new = _copy_classes(train, str(root / "new"), HELD_OUT)
    (root / "old" / "coat" / "corrupt.png").write_bytes(CORRUPT)
    (root / "new" / "bag" / "corrupt.png").write_bytes(CORRUPT)
    return types.SimpleNamespace(old=old, new=new, queries=os.path.join(fmnist_small, "test"))


@pytest.fixture(scope="module")
def gcs_data(data, gcs_bucket):
    """``data`` uploaded to the emulator bucket: what Dataflow workers read."""
    base = storage.join(gcs_bucket, "portable")
    storage.remove_tree(base)  # Session-scoped bucket: start clean.
    uploaded = {}
    for name in ("old", "new", "queries"):
        uploaded[name] = storage.join(base, "images", name)
        storage.upload_dir(getattr(data, name), uploaded[name])
    return types.SimpleNamespace(base=base, **uploaded)


def _stored(root: str) -> dict:
    """Version, live total and every shard's (ids, label names) in manifest order: what the jobs wrote."""
    m = read_manifest(root)
    shards = []
    for s in m.all_shards:
        part = read_shard_data(storage.join(root, s.path))
        shards.append((part.ids.astype(str).tolist(), [m.class_names[i] for i in part.labels]))
    return {"version": m.version, "total": m.total, "classes": list(m.class_names), "shards": shards,
            "kinds": [s.index_kind for s in m.all_shards], "routed": m.router is not None}


def _dead_letters(root: str) -> list[tuple[str, str, str, str]]:
    """(folder, id, stage, reason) of every dead letter under ``root``/dead_letter (build's, then each add's)."""
    out = []
    base = storage.join(root, "dead_letter")
    for name in storage.list_dir(base):
        inner = [] if name.endswith(".jsonl") else storage.list_dir(storage.join(base, name))
        files = [f"{name}/{f}" for f in inner] if inner else [name]
        for rel in files:
            out += [(os.path.dirname(rel), r.id, r.stage, r.reason) for r in map(
                FailedRecord.from_json, storage.read_text(storage.join(base, rel)).splitlines())]
    return sorted(out)


def _evaluation(out: str) -> dict:
    """Every query's neighbours (ids, labels, distances to 5 places, weights) and the report's vote tables."""
    records = read_neighbor_files([storage.join(out, name) for name in sorted(storage.list_dir(out))
                                   if name.startswith("neighbors-")])
    report = json.loads(storage.read_text(storage.join(out, "report.json")))
    reranked = {}
    for name in sorted(storage.list_dir(out)):
        if name.startswith("rerank-"):
            rows = map(json.loads, storage.read_text(storage.join(out, name)).splitlines())
            reranked.update({r["query_id"]: (r["vote_label"], round(r["margin"], 5), r["label"], r["reason"])
                             for r in rows})
    neighbours = {r.query_id: (list(r.neighbor_ids), list(r.neighbor_labels),
                               np.round(r.neighbor_distances, 5).tolist(),
                               None if r.neighbor_weights is None else list(r.neighbor_weights)) for r in records}
    return {"neighbours": dict(sorted(neighbours.items())), "queries": report["queries"],
            "failed": report["failed"], "accuracy": report["accuracy"], "reranked": dict(sorted(reranked.items()))}


def _lifecycle(base: str, data, beam_flags: list[str]) -> dict:
    """build -> add -> forget -> prune -> evaluate twice -> reindex through ``vmem`` on the memory
    ``base``/memory (local or gs://) from ``data``'s images with the bundled encoder; what each step left.

    The evaluations run before the re-index, where a search reads the most: main and delta shards,
    tombstones and the soft-prune weights. The ``last`` re-ranker kind must be registered (`_PLUGIN`).
    """
    mem = storage.join(base, "memory")
    steps = {}
    times = {}

    def vmem(name, *argv, beam=True):
        start = time.monotonic()
        assert cli.main([name, *argv, *(beam_flags if beam else [])]) == 0, (name, argv)
        times[name] = times.get(name, 0.0) + time.monotonic() - start

    vmem("build", "--images", data.old, "--output", mem, "--shards", "3", "--sharding", "partition",
         "--config", "configs.fashion_mnist:tree_ah")
    steps["build"] = _stored(mem)
    vmem("add", "--memory", mem, "--images", data.new, "--delta-shard-size", "15")
    steps["add"] = {**_stored(mem), "dead_letters": _dead_letters(mem)}
    # Forget entries of the build and of the add: the re-index must drop rows from main and delta shards.
    ids = sorted(i for ids, _ in steps["add"]["shards"] for i in ids)
    forgotten = [i for i in ids if i.startswith("coat/")][:4] + [i for i in ids if i.startswith("bag/")][:3]
    ids_file = storage.join(base, "forget.txt")
    storage.write_text(ids_file, "\n".join(forgotten) + "\n")
    vmem("forget", "--memory", mem, "--ids", ids_file, beam=False)
    steps["forget"] = {**_stored(mem), "live": sorted(VisualMemory.open(mem).live_entry_ids().astype(str).tolist())}
    vmem("prune", "--memory", mem, "--mode", "soft", "--k", "5", "--count-buckets", "2")
    counts = read_bucket_counts(mem, steps["forget"]["version"], buckets=2)
    steps["prune"] = {**_stored(mem), "counts": (counts.ids.tolist(), counts.v.tolist())}
    # A re-ranker kind the launcher registered at run time; on workers only its module is installed.
    out = storage.join(base, "evaluation-plugin")
    vmem("evaluate", "--memory", mem, "--images", data.queries, "--output", out, "--k-max", "10", "--rerank", "last:x",
         "--rerank-below", "1.01", "--rerank-top-n", "5")
    steps["evaluate_plugin_reranker"] = _evaluation(out)
    out = storage.join(base, "evaluation")
    # The offline second opinion (a second bundled encoder) reads the candidates' images on the workers.
    vmem("evaluate", "--memory", mem, "--images", data.queries, "--output", out, "--k-max", "10", "--route-probes", "2",
         "--rerank", "encoder:efficientnet-lite1", "--rerank-below", "0.5", "--rerank-top-n", "6")
    steps["evaluate"] = _evaluation(out)
    vmem("reindex", "--memory", mem)
    steps["reindex"] = _stored(mem)
    steps["forgotten"] = forgotten
    print(f"{beam_flags[:1] or ['default runner']}: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    return steps


@pytest.fixture(scope="module")
def rerank_plugin(tmp_path_factory) -> types.SimpleNamespace:
    """`_PLUGIN`'s source folder (for the launcher) and its sdist (for ``--extra_package``)."""
    root = tmp_path_factory.mktemp("rerank_plugin")
    shutil.copy(os.path.join(REPO, "tests", "fake_reranker.py"), root / f"{_PLUGIN}.py")
    (root / "setup.py").write_text(f"import setuptools\nsetuptools.setup(name={_PLUGIN!r}, version='0.1', "
                                   f"py_modules=[{_PLUGIN!r}])\n")
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", "dist"], cwd=root, check=True,
                   capture_output=True)
    (sdist,) = glob.glob(str(root / "dist" / "*.tar.gz"))
    return types.SimpleNamespace(source=str(root), sdist=sdist)


def _portable_lifecycle(worker_pool, gcs_data, rerank_plugin, tmp_path) -> dict:
    """`_lifecycle` on gs:// with the portable runner's flags, in a subprocess limited to _PORTABLE_TIMEOUT_S."""
    flags = ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=EXTERNAL",
             f"--environment_config=127.0.0.1:{worker_pool.port}", f"--setup_file={os.path.join(REPO, 'setup.py')}",
             f"--extra_package={rerank_plugin.sdist}"]
    out, log_path = str(tmp_path / "portable.json"), str(tmp_path / "portable.log")
    data = {name: getattr(gcs_data, name) for name in ("old", "new", "queries")}
    argv = json.dumps([storage.join(gcs_data.base, "jobs"), data, flags, _PLUGIN, out])
    env = dict(os.environ, PYTHONPATH=rerank_plugin.source)
    with open(log_path, "wb") as log:
        try:
            rc = subprocess.run([sys.executable, "-c", _PORTABLE_SCRIPT, argv], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, timeout=_PORTABLE_TIMEOUT_S, check=False).returncode
        except subprocess.TimeoutExpired:
            rc = f"timed out after {_PORTABLE_TIMEOUT_S}s"
    with open(log_path, encoding="utf-8", errors="replace") as f:
        log_text = f.read()
    print(log_text[-400:])
    if rc != 0:
        with open(worker_pool.log, encoding="utf-8", errors="replace") as f:
            pool_text = f.read()
        pytest.fail(f"portable lifecycle: {rc}; log tail:\n{log_text[-6000:]}\nworker pool log tail:\n"
                    f"{pool_text[-3000:]}", pytrace=False)
    with open(out) as f:
        return json.load(f)


def test_portable_workers_with_only_the_staged_package_equal_the_in_process_runner(
        worker_pool, data, gcs_data, rerank_plugin, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(rerank_plugin.source)
    importlib.import_module(_PLUGIN).registered(monkeypatch)
    # Through JSON, as the portable run's result is (tuples become lists).
    in_process = json.loads(json.dumps(_lifecycle(str(tmp_path / "in_process"), data, [])))
    portable = _portable_lifecycle(worker_pool, gcs_data, rerank_plugin, tmp_path)

    # The lifecycle did what it says (so equality below compares real work).
    assert in_process["build"]["total"] == 160 and len(in_process["build"]["shards"]) == 3
    assert in_process["build"]["kinds"] == ["tree_ah"] * 3 and in_process["build"]["routed"]
    assert in_process["add"]["total"] == 200 and len(in_process["add"]["shards"]) > 3
    assert [d[:2] for d in in_process["add"]["dead_letters"]] == [["", "coat/corrupt.png"],
                                                                    ["add-v000002", "bag/corrupt.png"]]
    assert in_process["forget"]["total"] == 193
    assert not set(in_process["forgotten"]) & set(in_process["forget"]["live"])
    assert set(in_process["reindex"]["kinds"]) == {"tree_ah"} and in_process["reindex"]["routed"]
    reindexed = [i for ids, _ in in_process["reindex"]["shards"] for i in ids]
    assert len(reindexed) == 193 and not set(in_process["forgotten"]) & set(reindexed)
    assert in_process["prune"]["version"] == 4 and len(in_process["prune"]["counts"][0]) == 193
    assert any(v > 0 for v in in_process["prune"]["counts"][1])
    evaluation = in_process["evaluate"]
    assert evaluation["queries"] == 50 and evaluation["failed"] == 0
    neighbours = [i for ids, *_ in evaluation["neighbours"].values() for i in ids]
    assert {i.split("/")[0] for i in neighbours} >= set(HELD_OUT) and not set(in_process["forgotten"]) & set(neighbours)
    assert any(w is not None and min(w) < 1.0 for *_, w in evaluation["neighbours"].values())
    assert len(evaluation["reranked"]) == 50 and any(r[3] == "answered" for r in evaluation["reranked"].values())
    plugin = in_process["evaluate_plugin_reranker"]["reranked"]
    assert len(plugin) == 50 and sum(r[3] == "answered" for r in plugin.values()) > 25
    for step in ("build", "add", "forget", "prune", "evaluate_plugin_reranker", "evaluate", "reindex"):
        assert portable[step] == in_process[step], step

    # The workers were separate processes of the worker virtualenv, importing the installed sdist only.
    with open(worker_pool.record) as f:
        workers = [json.loads(line) for line in f]
    assert len(workers) >= 6, f"one SDK worker per portable job expected; pool log: {worker_pool.log}"
    site = os.path.join(worker_pool.venv, "lib")
    for w in workers:
        assert w["pid"] != os.getpid() and w["prefix"] == worker_pool.venv, w
        assert all(path and path.startswith(site) for path in w["modules"].values()), w["modules"]
        # The shared requirements (the test interpreter's site-packages) may live inside the checkout (a
        # `.venv` there): they hold no project module (checked above), so only other paths count.
        in_checkout = [p for p in (w["cwd"], *w["path"]) if (p == REPO or p.startswith(REPO + os.sep))
                       and p != sysconfig.get_paths()["purelib"]]
        assert not in_checkout, (in_checkout, w)
