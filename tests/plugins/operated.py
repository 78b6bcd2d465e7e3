"""A gateway under mixed traffic, scraped by a real Prometheus (session-scoped).

One scenario serves the observability tests (metric families, dashboard queries,
`llmctl top`): a live `llmctl serve` on a real Postgres, with a Redis that is down,
a remote model served by a second live llmctl, and one whose server is gone. It
sends cache hits, misses and bypasses, streams, a 401, a 429, a 400, an
`overloaded`, and takes a /metrics snapshot while two long streams hold the model's
batch and queue and Postgres is stopped. Prometheus scrapes every second throughout.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.plugins.live import LiveServer
from tests.plugins.ports import free_port
from tests.plugins.postgres import PostgresServer

ALERTS = Path(__file__).resolve().parents[2] / "compose" / "prometheus" / "alerts.yml"


@dataclass
class Operated:
    gateway: LiveServer
    prometheus_url: str
    snapshot: str  # /metrics while streams ran and Postgres was down
    statuses: dict[str, int]  # what each kind of request answered
    keys: dict[str, str]
    end: float  # unix time when the load ended (and Prometheus had scraped it)


class Prometheus:
    """A real Prometheus on loopback scraping `target` every second."""

    def __init__(self, target: str, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{json.dumps(str(ALERTS))}]\n"
            "scrape_configs:\n"
            "  - job_name: llmctl\n"
            f"    static_configs: [{{targets: [{json.dumps(target)}]}}]\n")
        self.log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, (workdir / "prometheus.log").read_text()[-2000:]
            try:
                if httpx.get(self.url + "/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prometheus did not start"
            time.sleep(0.1)

    def query(self, expr: str, at: float) -> dict:
        return httpx.get(self.url + "/api/v1/query", params={"query": expr, "time": at},
                         timeout=10).json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _models_yaml(path: Path, model_dir: str, upstream: str, dead_port: int) -> str:
    path.write_text(
        "default_model: tiny\n"
        "models:\n"
        f"  - id: test/tiny\n    name: tiny\n    type: local\n    path: {model_dir}\n"
        "    device: cpu\n    max_context: 2048\n    max_new_tokens: 1500\n"
        "    max_batch_size: 1\n    max_queue: 1\n"
        "  - id: test/tiny-upstream\n    name: relay\n    type: remote\n"
        f"    base_url: {upstream}/v1\n    api_key_env: UPSTREAM_KEY\n"
        "  - id: gone\n    name: gone\n    type: remote\n"
        f"    base_url: http://127.0.0.1:{dead_port}/v1\n    connect_timeout: 1\n")
    return str(path)


def _sample_sum(text: str, name: str, **labels) -> float:
    """The sum of the samples called `name` with these labels."""
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


class _HeldStream(threading.Thread):
    """A long stream kept open until `release` is set; then the client leaves."""

    def __init__(self, url: str, key: str, release: threading.Event):
        super().__init__(daemon=True)
        self.url, self.key, self.release = url, key, release
        self.started = threading.Event()

    def run(self) -> None:
        body = {"model": "tiny", "prompt": "hold the batch", "max_tokens": 1500,
                "temperature": 0, "stream": True}
        with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {self.key}",
                                   "Cache-Control": "no-cache"}) as r:
            for _line in r.iter_lines():
                self.started.set()
                if self.release.is_set():
                    return


def _wait_for(predicate, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _traffic(gw: LiveServer, keys: dict[str, str], pg: PostgresServer) -> tuple[str, dict]:
    def post(path: str, body: dict, key: str = keys["user"], **headers) -> httpx.Response:
        return httpx.post(gw.url + path, json=body, timeout=120,
                          headers={"Authorization": f"Bearer {key}", **headers})

    statuses: dict[str, int] = {}
    completion = {"model": "tiny", "prompt": "observe me", "max_tokens": 8, "temperature": 0}
    statuses["miss"] = post("/v1/completions", completion).status_code
    statuses["hit"] = post("/v1/completions", completion).status_code
    statuses["bypass"] = post("/v1/completions", completion,
                              **{"Cache-Control": "no-cache"}).status_code
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "stream"}],
            "max_tokens": 8, "temperature": 0, "stream": True}
    statuses["stream_miss"] = post("/v1/chat/completions", chat).status_code
    statuses["stream_hit"] = post("/v1/chat/completions", chat).status_code
    statuses["generate_stream"] = post("/v1/generate", {
        "prompt": "generate", "max_new_tokens": 6, "stream": True}).status_code
    statuses["relay"] = post("/v1/completions", {**completion, "model": "relay",
                                                 "prompt": "relayed"}).status_code
    # The relay's engine (and its backend series) came with its first request: let a
    # scrape see them before the next one, or rate() has no increase to show.
    time.sleep(2.5)
    statuses["relay_stream"] = post("/v1/completions", {
        **completion, "model": "relay", "prompt": "relayed stream", "stream": True}).status_code
    statuses["gone"] = post("/v1/completions", {**completion, "model": "gone"}).status_code
    statuses["quota"] = post("/v1/completions", {**completion, "prompt": "quota"},
                             key=keys["quota"]).status_code
    statuses["bad_request"] = post("/v1/completions", {**completion, "max_tokens": -1}).status_code
    statuses["unauthorized"] = post("/v1/completions", completion,
                                    key="sk-llmctl-not-a-key").status_code
    post("/v1/completions", completion, key=keys["limited"])
    statuses["rate_limited"] = post("/v1/completions", completion, key=keys["limited"]).status_code
    for probe in ("/healthz", "/readyz", "/metrics"):
        httpx.get(gw.url + probe, timeout=10)

    # One stream holds the batch (max_batch_size 1), one waits (max_queue 1), a third is
    # refused as overloaded; then Postgres goes away under them.
    release = threading.Event()
    running = _HeldStream(gw.url, keys["user"], release)
    running.start()
    assert running.started.wait(60), "the first long stream did not start"
    waiting = _HeldStream(gw.url, keys["user"], release)
    waiting.start()
    _wait_for(lambda: _sample_sum(httpx.get(gw.url + "/metrics").text,
                                    "llmctl_num_requests_waiting") == 1, "a queued request")
    statuses["overloaded"] = post("/v1/completions", {**completion, "prompt": "one too many"},
                                  **{"Cache-Control": "no-cache"}).status_code
    pg.stop()
    try:
        statuses["database_down"] = post("/v1/completions", completion,
                                         key="sk-llmctl-" + "x" * 40).status_code
        _wait_for(lambda: _sample_sum(httpx.get(gw.url + "/metrics").text,
                                        "llmctl_database_errors_total",
                                        operation="log_write") > 0, "a failed log write")
        snapshot = httpx.get(gw.url + "/metrics", timeout=10).text
    finally:
        release.set()
        pg.start()
    running.join(60)
    waiting.join(60)
    _wait_for(lambda: _sample_sum(httpx.get(gw.url + "/metrics").text,
                                    "llmctl_request_log_backlog") == 0, "the log backlog to drain")
    return snapshot, statuses


@pytest.fixture(scope="session")
def operated(tiny_model_dir) -> Operated:
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed (apt-get install prometheus; .ci/run does)")
    work = Path(tempfile.mkdtemp(prefix="llmctl-operated-"))
    pg = PostgresServer()
    pg.start()
    database = pg.create_database()
    # The remote model's server: a second llmctl on the same database (so the key the
    # gateway sends exists there), serving the tiny model as `test/tiny-upstream`.
    (work / "upstream.yaml").write_text(
        f"models:\n  - id: test/tiny-upstream\n    type: local\n    path: {tiny_model_dir}\n"
        "    device: cpu\n    max_context: 512\n    max_new_tokens: 64\n")
    upstream = LiveServer(str(work / "upstream.yaml"), work / "upstream",
                          {"LLMCTL_DATABASE_URL": database})
    config = _models_yaml(work / "models.yaml", tiny_model_dir, upstream.url, free_port())
    env = {"LLMCTL_DATABASE_URL": database,
           "LLMCTL_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
           "LLMCTL_METRICS_PER_KEY": "true"}
    gw = LiveServer(config, work / "home", env)
    prometheus = None
    try:
        gw.cli("db", "upgrade")
        keys = {"user": gw.create_key("user"), "limited": gw.create_key("limited", "--rpm", "1"),
                "quota": gw.create_key("quota", "--monthly-tokens", "100000"),
                "upstream": gw.create_key("upstream")}
        gw.env["UPSTREAM_KEY"] = keys["upstream"]
        prometheus = Prometheus(f"127.0.0.1:{gw.port}", work)
        upstream.start()
        gw.start()
        snapshot, statuses = _traffic(gw, keys, pg)
        end = time.time()
        time.sleep(2.5)  # Prometheus's next scrapes see the end of the load
        yield Operated(gw, prometheus.url, snapshot, statuses, keys, end)
    finally:
        gw.stop()
        upstream.stop()
        if prometheus is not None:
            prometheus.stop()
        pg.cleanup()
        shutil.rmtree(work, ignore_errors=True)
