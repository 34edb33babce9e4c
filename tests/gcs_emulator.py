"""Pytest fixture: a local GCS emulator (gcp-storage-emulator), so gs:// code runs without the cloud.

Use it from a conftest.py::

  from tests.gcs_emulator import gcs_bucket  # noqa: F401  (re-exported fixture)

and in a test::

  def test_x(gcs_bucket):  # "gs://<bucket>", with STORAGE_EMULATOR_HOST pointing at the emulator
    ...

The emulator runs in memory for the whole session and is killed at teardown. If it cannot be started (not
installed, port problem) the fixture fails within seconds: a test must never fall through to real GCS,
where an offline client retries for 120 s.

Both gs:// clients reach the emulator through ``STORAGE_EMULATOR_HOST``: memory.storage's own client and
Beam's GcsIO (google-cloud-storage under the hood, which switches its endpoint on that variable). Beam asks
``google.auth.default()`` for credentials first and, offline, retries that for ~25 s per process before
going anonymous; an authorized_user credentials file with a valid token and a far-future expiry answers it
at once and is never refreshed (the emulator ignores the Authorization header). The fixture sets these
variables for the session and restores the previous environment at teardown.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Iterator

import pytest

BUCKET = "vmem-test-bucket"
_START_TIMEOUT_S = 20.0
_ENV = "STORAGE_EMULATOR_HOST"
# An authorized_user credential that google.auth accepts without a refresh: token present, expiry far away.
# Fake values only; nothing here is valid anywhere but the emulator, which does not check them.
FAKE_CREDENTIALS = {
    "type": "authorized_user",
    "client_id": "emulator-client-id",
    "client_secret": "emulator-client-secret",
    "refresh_token": "emulator-refresh-token",
    "token": "emulator-token",
    "expiry": "2999-01-01T00:00:00Z",
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _emulator_executable() -> str:
    """The emulator script next to this interpreter (the venv's bin dir), else on PATH."""
    candidate = os.path.join(os.path.dirname(sys.executable), "gcp-storage-emulator")
    if os.path.exists(candidate):
        return candidate
    found = shutil.which("gcp-storage-emulator")
    if found is None:
        pytest.fail("gcp-storage-emulator not found next to the Python interpreter or on PATH; "
                    "install it with `pip install gcp-storage-emulator`", pytrace=False)
    return found


def _wait_ready(proc: subprocess.Popen, url: str, bucket: str, log_path: str) -> None:
    """Polls the bucket's JSON-API URL until it answers 200; fails fast if the process exits."""
    deadline = time.monotonic() + _START_TIMEOUT_S
    last_error = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log_path, encoding="utf-8", errors="replace") as f:
                log = f.read()[-2000:]
            pytest.fail(f"gcp-storage-emulator exited with code {proc.returncode}:\n{log}", pytrace=False)
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}", timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            last_error = e
        time.sleep(0.1)
    pytest.fail(f"gcp-storage-emulator at {url} not ready after {_START_TIMEOUT_S:.0f}s (last error: "
                f"{last_error!r})", pytrace=False)


@pytest.fixture(scope="session")
def gcs_bucket() -> Iterator[str]:
    """Starts an in-memory GCS emulator with one bucket and yields ``gs://<bucket>``."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_dir = tempfile.mkdtemp(prefix="gcs-emulator-")
    log_path = os.path.join(log_dir, "emulator.log")
    with open(log_path, "wb") as log:
        # cwd=log_dir: the emulator may create a storage directory in its working directory.
        proc = subprocess.Popen(
            [_emulator_executable(), "start", "--host", "127.0.0.1", "--port", str(port),
             f"--default-bucket={BUCKET}", "--in-memory"],
            stdout=log, stderr=subprocess.STDOUT, cwd=log_dir)
    credentials_path = os.path.join(log_dir, "emulator-credentials.json")
    with open(credentials_path, "w", encoding="utf-8") as f:
        json.dump(FAKE_CREDENTIALS, f)
    env = {
        _ENV: url,
        "GOOGLE_APPLICATION_CREDENTIALS": credentials_path,
        # Both clients need a project; with one set nothing asks the metadata server for it.
        "GOOGLE_CLOUD_PROJECT": "test",
    }
    # Session scope rules out monkeypatch; restore by hand at teardown.
    previous = {name: os.environ.get(name) for name in env}
    try:
        _wait_ready(proc, url, BUCKET, log_path)
        os.environ.update(env)
        yield f"gs://{BUCKET}"
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        stop_process(proc)
        shutil.rmtree(log_dir, ignore_errors=True)


def stop_process(proc: subprocess.Popen) -> None:
    """Stops a server started by a fixture: terminate, then kill if it ignores that for 5 s."""
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
