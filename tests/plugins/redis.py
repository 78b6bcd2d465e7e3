"""A real `redis-server` for the test session, on a free loopback port in a temp dir.

`redis_server` (session) is the server object: `.url`, `.port`, `.stop()`,
`.start()` / `.restart()` on the same port (for the "Redis went away" tests),
`.running`, `.flush()`. `redis_url` (function) gives a URL to a running, empty
server. Without `redis-server` on PATH the tests that need it fail, naming
the install line (CI installs it: `apt-get install -y redis-server`).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from tests.plugins.ports import free_port

INSTALL = "apt-get install -y redis-server"


class RedisServer:
    def __init__(self):
        self.binary = shutil.which("redis-server")
        self.dir = tempfile.mkdtemp(prefix="llmctl-redis-")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _command(self, line: str, timeout: float = 0.5) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(line.encode() + b"\r\n")
            return s.recv(64)

    def start(self, timeout: float = 10) -> RedisServer:
        if self.running:
            return self
        # No persistence: a restart is a fresh, empty Redis, as after a crash.
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--save", "", "--appendonly", "no", "--protected-mode", "no",
             "--logfile", f"{self.dir}/redis.log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; "
                                   f"see {self.dir}/redis.log")
            try:
                if self._command("PING").startswith(b"+PONG"):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.running:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()

    def flush(self) -> None:
        self._command("FLUSHALL")

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


_server: RedisServer | None = None  # one per session even if the fixture is imported twice


@pytest.fixture(scope="session")
def redis_server():
    """The session's redis-server (started on first use, stopped at the end)."""
    global _server
    if shutil.which("redis-server") is None:
        pytest.fail(f"redis-server is not installed: {INSTALL}")
    if _server is None:
        _server = RedisServer().start()
    yield _server
    _server.cleanup()


@pytest.fixture
def redis_url(redis_server) -> str:
    """A running, empty redis-server for one test."""
    redis_server.start()
    redis_server.flush()
    return redis_server.url
