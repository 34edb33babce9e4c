"""``vmem serve``: flags (exit 2, named), a missing memory (exit 1), and a real server with two worker processes
that answers, logs each request as JSON and shuts down cleanly on SIGTERM (exit 0)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from vmem import main as cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("flags, words", [
    (["--workers", "0"], "workers must be >= 1, got 0"),
    (["--port", "70000"], "port must be in 1..65535"),
    (["--refresh-interval", "0"], "--refresh-interval must be > 0"),
    (["--max-upload-bytes", "10"], "max_upload_bytes must be >= 1024"),
    (["--rerank-below", "0.3"], "--rerank-below needs --rerank"),
    (["--frobnicate"], "--frobnicate"),
])
def test_bad_flags_exit_2_naming_them(tmp_path, capsys, flags, words):
    assert cli.main(["serve", "--memory", str(tmp_path), *flags]) == 2
    assert words in capsys.readouterr().err


def test_write_tokens_are_checked(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert cli.main(["serve", "--memory", str(tmp_path), "--write-token-file", str(empty)]) == 2
    assert "is empty" in capsys.readouterr().err
    monkeypatch.setenv("VMEM_WRITE_TOKEN", "short")
    assert cli.main(["serve", "--memory", str(tmp_path)]) == 2
    assert "at least 16" in capsys.readouterr().err
    monkeypatch.delenv("VMEM_WRITE_TOKEN")
    assert cli.main(["serve", "--memory", str(tmp_path / "nope")]) == 1
    assert "not a visual memory" in capsys.readouterr().err


def test_two_workers_answer_log_and_shut_down_cleanly(tiny_memory, fmnist_small, tmp_path):
    port = _free_port()
    token = tmp_path / "token.txt"
    token.write_text("0123456789abcdef0123\n")
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "vmem", "serve", "--memory", tiny_memory, "--port", str(port),
                             "--workers", "2", "--write-token-file", str(token)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VMEM_WRITE_TOKEN": ""})
    try:
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            while True:
                assert proc.poll() is None, open(tmp_path / "serve.log").read()
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the server did not answer"
                time.sleep(0.2)
            folder = os.path.join(fmnist_small, "train", "bag")
            with open(os.path.join(folder, sorted(os.listdir(folder))[0]), "rb") as f:
                data = f.read()
            for i in range(6):  # Both workers (each with its own memory) answer alike.
                r = client.post("/v1/classify?k=3", files={"image": ("q.png", data, "image/png")},
                                headers={"X-Request-ID": f"cli-{i}"})
                assert r.status_code == 200 and r.headers["x-request-id"] == f"cli-{i}", r.text
                assert r.json()["neighbors"][0]["id"].startswith("bag/")
            assert client.get("/v1/info").json()["serving"]["write_enabled"] is True
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    output = open(tmp_path / "serve.log").read()
    assert code == 0, output
    lines = [json.loads(line.split(": ", 1)[1]) for line in output.splitlines()
             if "visual_memory.serve.access: " in line]
    assert {f"cli-{i}" for i in range(6)} <= {line["request_id"] for line in lines}
    assert all(line["status"] == 200 and line["version"] == 1 for line in lines if line["request_id"].startswith("cli-"))
    assert "version 1 of" in output and "http://127.0.0.1:" in output


def test_worker_settings_travel_in_the_environment(monkeypatch, tmp_path):
    from serving.settings import SETTINGS_ENV, ServeSettings
    monkeypatch.delenv(SETTINGS_ENV, raising=False)
    with pytest.raises(RuntimeError, match="VMEM_SERVE_SETTINGS is not set"):
        ServeSettings.from_env()
    settings = ServeSettings(memory=str(tmp_path), port=9999, workers=3, write_token="k" * 20)
    monkeypatch.setenv(SETTINGS_ENV, settings.to_env())
    assert ServeSettings.from_env() == settings
    assert "k" * 20 not in repr(settings)  # The token is never logged with the settings.
