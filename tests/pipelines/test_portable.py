"""Every job on Beam's portable path, with workers as Dataflow Runner v2 runs them: separate processes that
have only the staged package.

One lifecycle (build -> evaluate -> add -> forget -> prune -> re-index -> evaluate) runs twice through the ``vmem``
commands: on the default in-process runner, and with ``--runner=PortableRunner --job_endpoint=embed
--environment_type=EXTERNAL --environment_config=127.0.0.1:PORT --setup_file=setup.py``. There the job
service runs in the test process and hands every bundle to SDK workers started by an external worker pool
(``apache_beam.runners.worker.worker_pool_main``) from a separate virtualenv. Each worker boots as the
container's boot does on Dataflow (tests/portable_boot.py): it fetches the job's staged artifacts and
pip-installs the ``workflow.tar.gz`` sdist that Beam's stager built from ``--setup_file``, the same staging
a Dataflow submission does; the checkout is neither on its ``sys.path`` nor its working directory. Both
runs must agree on the stored ids and labels after every step, and on every query's neighbours and the
vote tables of both evaluations.

The worker virtualenv installs only that sdist. Its requirements (Beam, TensorFlow, ScaNN, ...) are not
installed there but shared: a ``.pth`` file lists the test interpreter's site-packages directory. The tests
run offline, where pip cannot fetch them; sharing keeps the requirements identical to the submitting
process's (as a pinned worker image would) while the project itself stays invisible, because a listed
directory's own ``.pth`` files (the editable install's finder among them) are not processed.

Run with ``make test-portable`` (or ``pytest -m slow tests/pipelines/test_portable.py``).
"""

from __future__ import annotations

import glob
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
from memory.store.shard import read_shard_data
from memory.store.versions import read_manifest
from memory.visual_memory import VisualMemory
from pipelines.prune import read_bucket_counts
from vmem import main as cli

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HELD_OUT = ("bag", "sandal")
_POOL_START_TIMEOUT_S = 60
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
def worker_pool(tmp_path_factory):
    """An external worker pool on 127.0.0.1 whose workers boot from a separate virtualenv."""
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
    """fmnist_small's training images split into the memory's classes and the classes added later."""
    root = tmp_path_factory.mktemp("portable_data")
    train = os.path.join(fmnist_small, "train")
    classes = sorted(os.listdir(train))
    return types.SimpleNamespace(
        old=_copy_classes(train, str(root / "old"), [c for c in classes if c not in HELD_OUT]),
        new=_copy_classes(train, str(root / "new"), HELD_OUT),
        queries=os.path.join(fmnist_small, "test"))


def _stored(root: str) -> dict:
    """Version, live total and every shard's (ids, label names) in manifest order: what the jobs wrote."""
    m = read_manifest(root)
    shards = []
    for s in m.all_shards:
        part = read_shard_data(os.path.join(root, s.path))
        shards.append((part.ids.astype(str).tolist(), [m.class_names[i] for i in part.labels]))
    return {"version": m.version, "total": m.total, "classes": list(m.class_names), "shards": shards}


def _evaluation(out: str) -> dict:
    """Every query's neighbours (ids, labels, distances to 5 places, weights) and the report's vote tables."""
    records = read_neighbor_files(sorted(glob.glob(os.path.join(out, "neighbors-*.jsonl"))))
    report = json.load(open(os.path.join(out, "report.json")))
    return {"neighbours": {r.query_id: (list(r.neighbor_ids), list(r.neighbor_labels),
                                        np.round(r.neighbor_distances, 5).tolist(),
                                        None if r.neighbor_weights is None else list(r.neighbor_weights))
                                  for r in sorted(
                                            records, key=lambda r: r.query_id)},
            "queries": report["queries"], "failed": report["failed"], "accuracy": report["accuracy"]}


def _lifecycle(work, data, config: list[str], beam_flags: list[str]) -> dict:
    """build -> evaluate -> add -> forget -> prune -> reindex -> evaluate through ``vmem``; what each step left."""
    mem = str(work / "memory")
    steps = {}
    times = {}

    def vmem(name, *argv, beam=True):
        start = time.monotonic()
        assert cli.main([name, *argv, *(beam_flags if beam else [])]) == 0, (name, argv)
        times[name] = times.get(name, 0.0) + time.monotonic() - start

    vmem("build", "--images", data.old, "--output", mem, *config, "--shards", "3")
    steps["build"] = _stored(mem)
    vmem("evaluate", "--memory", mem, "--images", data.queries, "--output", str(work / "eval1"), "--k-max", "10")
    steps["evaluate"] = _evaluation(str(work / "eval1"))
    vmem("add", "--memory", mem, "--images", data.new, "--delta-shard-size", "15")
    steps["add"] = _stored(mem)
    # Forget entries of the build and of the add: the re-index must drop rows from main and delta shards.
    ids = sorted(i for ids, _ in steps["add"]["shards"] for i in ids)
    forgotten = [i for i in ids if i.startswith("coat/")][:4] + [i for i in ids if i.startswith("bag/")][:3]
    ids_file = work / "forget.txt"
    ids_file.write_text("\n".join(forgotten) + "\n")
    vmem("forget", "--memory", mem, "--ids", str(ids_file), beam=False)
    steps["forget"] = {**_stored(mem), "live": sorted(VisualMemory.open(mem).live_entry_ids().astype(str).tolist())}
    vmem("prune", "--memory", mem, "--mode", "soft", "--k", "5", "--count-buckets", "2")
    counts = read_bucket_counts(mem, steps["forget"]["version"], buckets=2)
    steps["prune"] = {**_stored(mem), "counts": (counts.ids.tolist(), counts.v.tolist())}
    vmem("reindex", "--memory", mem)
    steps["reindex"] = _stored(mem)
    vmem("evaluate", "--memory", mem, "--images", data.queries, "--output", str(work / "eval2"), "--k-max", "10")
    steps["evaluate_after_reindex"] = _evaluation(str(work / "eval2"))
    steps["forgotten"] = forgotten
    print(f"{beam_flags[:1] or ['default runner']}: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    return steps


def test_portable_workers_with_only_the_staged_package_equal_the_in_process_runner(
        worker_pool, data, tmp_path):
    in_process = _lifecycle(tmp_path / "in_process", data, [], [])
    portable = _lifecycle(tmp_path / "portable", data, [], [
        "--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=EXTERNAL",
        f"--environment_config=127.0.0.1:{worker_pool.port}", f"--setup_file={os.path.join(REPO, 'setup.py')}"])

    # The lifecycle did what it says (so equality below compares real work).
    assert in_process["build"]["total"] == 160 and len(in_process["build"]["shards"]) == 3
    assert in_process["add"]["total"] == 200 and len(in_process["add"]["shards"]) > 3
    assert in_process["forget"]["total"] == 193
    assert not set(in_process["forgotten"]) & set(in_process["forget"]["live"])
    reindexed = [i for ids, _ in in_process["reindex"]["shards"] for i in ids]
    assert len(reindexed) == 193 and not set(in_process["forgotten"]) & set(reindexed)
    assert in_process["evaluate"]["queries"] == 50 and in_process["evaluate"]["failed"] == 0
    assert in_process["prune"]["version"] == 4 and len(in_process["prune"]["counts"][0]) == 193
    assert any(v > 0 for v in in_process["prune"]["counts"][1])
    weights = [n[3] for n in in_process["evaluate_after_reindex"]["neighbours"].values()]
    assert any(w is not None and min(w) < 1.0 for w in weights), "the re-indexed memory lost the soft-prune weights"
    for step in ("build", "evaluate", "add", "forget", "prune", "reindex", "evaluate_after_reindex"):
        assert portable[step] == in_process[step], step

    # The workers were separate processes of the worker virtualenv, importing the installed sdist only.
    with open(worker_pool.record) as f:
        workers = [json.loads(line) for line in f]
    assert len(workers) >= 6, f"one SDK worker per portable job expected; pool log: {worker_pool.log}"
    site = os.path.join(worker_pool.venv, "lib")
    for w in workers:
        assert w["pid"] != os.getpid() and w["prefix"] == worker_pool.venv, w
        assert all(path.startswith(site) for path in w["modules"].values()), w["modules"]
        in_checkout = [p for p in (w["cwd"], *w["path"]) if p == REPO or p.startswith(REPO + os.sep)]
        assert not in_checkout, (in_checkout, w)
