"""An SDK worker's boot, as the Beam Python container's boot runs it on a Dataflow worker: offline, for tests.

The external worker pool (``apache_beam.runners.worker.worker_pool_main --container_executable=THIS``)
starts one of these per SDK worker with the container contract's flags (``--id``, ``--provision_endpoint``,
``--artifact_endpoint``, ``--control_endpoint``, ``--logging_endpoint``). As the container's boot does, it
asks the provision service for the job's options and staged artifacts, fetches them from the artifact
service, installs the ``--extra_package`` packages (listed in ``extra_packages.txt``) and the staged package
(``workflow.tar.gz``: the sdist Beam built from ``--setup_file``) into this interpreter's environment, and
then runs the SDK harness in a new process of that interpreter.

Differences from the real boot, because the test machine is offline: pip installs with ``--no-index
--no-deps`` (the requirements are already visible in the worker environment), and the package is installed
once per set of artifact digests (workers of later jobs reuse it, as a warm worker VM would).

Each harness records ``{"pid", "executable", "prefix", "cwd", "path", "modules": {name: __file__}}`` as one JSON line in
``$VMEM_PORTABLE_RECORD`` before it serves bundles: proof of which process and which files ran the DoFns.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import subprocess
import sys

# The harness: record where the project's packages come from, then serve bundles (sdk_worker_main).
_HARNESS = """
import importlib.util, json, os, sys
# find_spec, not import: a package missing from the sdist must fail the job in Beam, not kill the worker.
modules = {name: getattr(importlib.util.find_spec(name), "origin", None)
           for name in ("configs", "encoders", "memory", "pipelines", "vmem", "evaluation")}
record = {"pid": os.getpid(), "executable": sys.executable, "prefix": sys.prefix, "cwd": os.getcwd(),
          "path": sys.path, "modules": modules}
with open(os.environ["VMEM_PORTABLE_RECORD"], "a") as f:
    f.write(json.dumps(record) + "\\n")
from apache_beam.runners.worker import sdk_worker_main
sdk_worker_main.main(sys.argv)
"""


def _fetch_artifacts(args: argparse.Namespace, staging_dir: str):
    """(pipeline options JSON, {staged name: local path}) from the provision and artifact services."""
    import grpc
    from apache_beam.portability.api import (beam_artifact_api_pb2, beam_artifact_api_pb2_grpc,
                                             beam_provision_api_pb2, beam_provision_api_pb2_grpc,
                                             beam_runner_api_pb2)
    from google.protobuf import json_format
    metadata = [("worker_id", args.id)]
    with grpc.insecure_channel(args.provision_endpoint) as channel:
        info = beam_provision_api_pb2_grpc.ProvisionServiceStub(channel).GetProvisionInfo(
            beam_provision_api_pb2.GetProvisionInfoRequest(), metadata=metadata).info
    staged = {}
    with grpc.insecure_channel(args.artifact_endpoint, options=[("grpc.max_receive_message_length", -1)]) as channel:
        stub = beam_artifact_api_pb2_grpc.ArtifactRetrievalServiceStub(channel)
        for dep in info.dependencies:
            name = beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(dep.role_payload).staged_name
            path = os.path.join(staging_dir, name)
            with open(path, "wb") as f:
                for chunk in stub.GetArtifact(beam_artifact_api_pb2.GetArtifactRequest(artifact=dep),
                                              metadata=metadata):
                    f.write(chunk.data)
            staged[name] = path
    return json_format.MessageToJson(info.pipeline_options), staged


def _install_once(packages: list[str]) -> None:
    """pip-installs ``packages`` into this environment unless these exact files already were (digest marker)."""
    import hashlib
    digest = hashlib.sha256()
    for path in packages:
        with open(path, "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    marker = os.path.join(sys.prefix, "staged-packages.sha256")
    with open(os.path.join(sys.prefix, "staged-packages.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # Workers of one job start together; one installs.
        if os.path.exists(marker) and open(marker).read() == digest.hexdigest():
            return
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--no-index", "--force-reinstall", *packages], check=True, stdout=sys.stderr)
        with open(marker, "w") as f:
            f.write(digest.hexdigest())


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--id", "--provision_endpoint", "--artifact_endpoint", "--control_endpoint", "--logging_endpoint"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--semi_persist_dir", default=None)
    args, _ = parser.parse_known_args()
    semi_persist = args.semi_persist_dir or os.path.join(os.environ.get("TMPDIR", "/tmp"), f"beam-worker-{args.id}")
    staging_dir = os.path.join(semi_persist, "staged")
    os.makedirs(staging_dir, exist_ok=True)
    options_json, staged = _fetch_artifacts(args, staging_dir)
    if "workflow.tar.gz" not in staged:
        sys.exit(f"boot: no staged package (workflow.tar.gz) among the artifacts {sorted(staged)}: pass --setup_file")
    extra = open(staged["extra_packages.txt"]).read().split() if "extra_packages.txt" in staged else []
    _install_once([staged[name] for name in extra] + [staged["workflow.tar.gz"]])
    env = dict(os.environ, PIPELINE_OPTIONS=options_json, WORKER_ID=args.id, SEMI_PERSISTENT_DIRECTORY=semi_persist,
               CONTROL_API_SERVICE_DESCRIPTOR=f'url: "{args.control_endpoint}"',
               LOGGING_API_SERVICE_DESCRIPTOR=f'url: "{args.logging_endpoint}"')
    os.chdir(semi_persist)  # Never the submitting checkout: `python -c` puts the working directory on sys.path.
    os.execve(sys.executable, [sys.executable, "-c", _HARNESS], env)


if __name__ == "__main__":
    main()
