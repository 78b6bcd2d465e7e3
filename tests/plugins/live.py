"""Live `llmctl serve` processes on loopback, as users run them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.plugins.ports import free_port

LLMCTL = str(Path(sys.executable).with_name("llmctl"))


class LiveServer:
    """One `llmctl serve` subprocess. `env` adds LLMCTL_* settings."""

    def __init__(self, config: str | None, home: Path, env: dict | None = None,
                 port: int | None = None, args: tuple[str, ...] = ()):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.home = home
        self.env = {**os.environ, "LLMCTL_HOME": str(home), **(env or {})}
        self.args = ["serve", "--port", str(self.port), *(["--config", config] if config else []),
                     "--log-level", "warning", *args]
        self.log_path = home / f"serve-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run `llmctl ARGS` against the same home and database."""
        result = subprocess.run([LLMCTL, *args], env=self.env, capture_output=True, text=True,
                                timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"llmctl {' '.join(args)} failed: {result.stderr}")
        return result

    def start(self, timeout: float = 60, loaded: bool = True) -> LiveServer:
        """Start and wait until it answers (`loaded`: and has loaded its default model)."""
        self.home.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([LLMCTL, *self.args], env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llmctl serve exited: {self.log_path.read_text()[-3000:]}")
            try:
                # Up, and done loading the default model (`serve` starts it at once).
                if (httpx.get(self.url + "/healthz", timeout=1).status_code == 200 and (
                        not loaded or "loading" not in httpx.get(
                            self.url + "/readyz", timeout=5).json()["models"].values())):
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"llmctl serve did not start: {self.log_path.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()
        return self.proc.returncode if self.proc else None

    def create_key(self, name: str, *args: str) -> str:
        import json

        out = self.cli("keys", "create", "--name", name, "--json", *args).stdout
        return json.loads(out)["secret"]


@pytest.fixture
def live_server_factory(tmp_path):
    """Start `llmctl serve` processes; all are stopped after the test."""
    servers: list[LiveServer] = []

    def start(config: str | None = None, env: dict | None = None, home: Path | None = None,
              **kw) -> LiveServer:
        server = LiveServer(config, home or tmp_path / "home", env, **kw).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def live_server(live_server_factory, tiny_models_yaml):
    """A gateway on the tiny test model and embedded SQLite."""
    return live_server_factory(tiny_models_yaml)
