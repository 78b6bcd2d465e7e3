"""`llmctl serve` as a new user runs it (issue 13): from another directory, with no
network, with no models, on a bad or busy port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from llmctl.cli import app
from tests.plugins.live import LLMCTL, LiveServer
from tests.plugins.ports import free_port

CLONE = Path(__file__).resolve().parents[2]


@pytest.fixture
def clone(tmp_path, tiny_model_dir) -> Path:
    """The clone's own models.yaml next to a models/tiny, as `make serve` leaves it."""
    root = tmp_path / "clone"
    (root / "models").mkdir(parents=True)
    shutil.copy(CLONE / "models.yaml", root / "models.yaml")
    (root / "models" / "tiny").symlink_to(tiny_model_dir)
    return root


def offline_env(tmp_path) -> dict:
    """No hub settings that would short-circuit the lookup: the Hub endpoint refuses
    connections (as no network does, fast and deterministic) and the cache is empty."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    return {**env, "HF_ENDPOINT": "http://127.0.0.1:1", "HF_HOME": str(tmp_path / "hf")}


def test_serve_from_elsewhere_loads_first_and_a_missing_model_fails_fast(
        tmp_path, clone, monkeypatch):
    config = clone / "models.yaml"
    config.write_text(config.read_text() + (
        "\n  - id: nobody/exists-nowhere\n    name: nowhere\n    type: local\n"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative `path: models/tiny` must not mean ./models
    server = LiveServer(str(config), tmp_path / "home")
    server.env = offline_env(tmp_path) | {"LLMCTL_HOME": str(tmp_path / "home")}
    server.start(loaded=False)
    try:
        # Never ready before the default model is loaded; it loads without a request.
        deadline = time.monotonic() + 60
        while True:
            ready = httpx.get(server.url + "/readyz", timeout=10)
            state = ready.json()["models"]
            if ready.status_code == 200:
                assert state == {"tiny": "loaded", "nowhere": "not loaded"}
                break
            assert state["tiny"] == "loading", ready.text
            assert time.monotonic() < deadline, "the default model did not load"
            time.sleep(0.1)

        key = server.create_key("me")
        headers = {"Authorization": f"Bearer {key}"}
        answer = httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=60,
                            json={"messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": 4})
        assert answer.status_code == 200 and answer.json()["model"] == "tiny"

        started = time.monotonic()
        missing = httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=60,
                             json={"model": "nowhere", "max_tokens": 4,
                                   "messages": [{"role": "user", "content": "hi"}]})
        took = time.monotonic() - started
        message = missing.json()["error"]["message"]
        assert missing.status_code >= 500
        assert "nobody/exists-nowhere" in message and "not a local directory" in message
        assert "http://127.0.0.1:1 is unreachable" in message
        assert took < 5, f"the first request of a missing model took {took:.1f}s"
        ready = httpx.get(server.url + "/readyz", timeout=10).json()
        assert ready["models"]["nowhere"] == "failed" and ready["status"] == "ready"
    finally:
        server.stop()


def test_serve_lazy_loads_nothing_at_start(tmp_path, tiny_models_yaml):
    server = LiveServer(tiny_models_yaml, tmp_path / "home", args=("--lazy",)).start()
    try:
        ready = httpx.get(server.url + "/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["models"] == {"tiny": "not loaded"}
    finally:
        server.stop()


def test_serve_refuses_no_models_bad_port_database_down_and_busy_port(tmp_path, monkeypatch,
                                                        tiny_models_yaml):
    monkeypatch.chdir(tmp_path)  # no models.yaml here
    monkeypatch.setenv("LLMCTL_HOME", str(tmp_path / "home"))
    for var in ("LLMCTL_MODEL", "LLMCTL_MODELS_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    runner = CliRunner()
    none = runner.invoke(app, ["serve"])
    assert none.exit_code == 2 and "no models configured" in none.stderr
    assert "LLMCTL_MODEL" in none.stderr and "--config" in none.stderr

    bad = runner.invoke(app, ["serve", "--config", tiny_models_yaml, "--port", "99999"])
    assert bad.exit_code == 2 and "'--port'" in bad.output
    monkeypatch.setenv("LLMCTL_PORT", "70000")
    env_bad = runner.invoke(app, ["serve", "--config", tiny_models_yaml])
    assert env_bad.exit_code == 2 and "LLMCTL_PORT='70000'" in env_bad.stderr
    monkeypatch.delenv("LLMCTL_PORT")
    monkeypatch.setenv("LLMCTL_DATABASE_URL", "postgresql+psycopg://x@127.0.0.1:1/db")
    down = runner.invoke(app, ["serve", "--config", tiny_models_yaml])
    assert down.exit_code == 1 and "is unreachable" in down.stderr  # not uvicorn's 3
    monkeypatch.delenv("LLMCTL_DATABASE_URL")

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # A subprocess, as users run it: the exit code is the process's own.
        result = subprocess.run([LLMCTL, "serve", "--config", tiny_models_yaml, "--port",
                                 str(port)], capture_output=True, text=True, timeout=60,
                                env={**os.environ, "LLMCTL_HOME": str(tmp_path / "home")})
    assert result.returncode == 1  # not 3, which means "limit reached"
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in result.stderr
    assert "Traceback" not in result.stderr
    assert free_port()  # the port plugin still works after the busy socket closed
