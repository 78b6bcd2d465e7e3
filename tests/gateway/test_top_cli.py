"""`llmctl top` against a live gateway (issue 11, done-when 5)."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import httpx
from typer.testing import CliRunner

from llmctl.cli import app
from tests.plugins.live import LLMCTL
from tests.plugins.ports import free_port

HIT = {"model": "tiny", "prompt": "observe me", "max_tokens": 8, "temperature": 0}


def test_top_once_json_reports_the_figures(operated):
    gw = operated.gateway
    stop = threading.Event()
    sent = []

    def hits():
        with httpx.Client(base_url=gw.url, timeout=30,
                          headers={"Authorization": f"Bearer {operated.keys['user']}"}) as c:
            while not stop.is_set():
                assert c.post("/v1/completions", json=HIT).headers["x-llmctl-cache"] == "hit"
                sent.append(1)

    thread = threading.Thread(target=hits)
    thread.start()
    try:
        time.sleep(0.5)
        result = subprocess.run([LLMCTL, "top", "--once", "--json", "--url", gw.url,
                                 "--interval", "2"], capture_output=True, text=True, timeout=60,
                                env=gw.env)
    finally:
        stop.set()
        thread.join()
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["url"] == gw.url and data["interval_s"] >= 2
    tiny = next(m for m in data["models"] if m["model_name"] == "tiny")
    # Only cache hits in the window: requests, no generation, every lookup a hit.
    assert 0 < tiny["requests_per_s"] <= len(sent) / 2 + 1
    assert tiny["tokens_per_s"] == 0 and tiny["cache_hit_ratio"] == 1.0
    assert (tiny["running"], tiny["waiting"]) == (0, 0)
    # No first token in the window: the median since start, as Prometheus computes it.
    prom = httpx.get(operated.prometheus_url + "/api/v1/query", params={
        "query": 'histogram_quantile(0.5, sum by (le) '
                 '(llmctl_time_to_first_token_seconds_bucket{model_name="tiny"}))'}).json()
    assert tiny["ttft_p50_s"] > 0
    assert abs(tiny["ttft_p50_s"] - float(prom["data"]["result"][0]["value"][1])) < 1e-4
    # Rejections since start, by reason, as /metrics has them.
    for reason in ("auth", "rate", "overloaded", "bad_request", "unavailable"):
        assert data["rejections"][reason] >= 1
    relay = next(m for m in data["models"] if m["model_name"] == "relay")
    assert relay["running"] is None  # a remote model has no batch here


def test_top_on_a_gateway_that_is_not_there_is_one_line_and_exit_1():
    url = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(app, ["top", "--once", "--url", url, "--interval", "0.1"])
    assert result.exit_code == 1
    assert f"cannot reach {url}/metrics" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(app, ["top", "--once", "--url", url, "--interval", "0"])
    assert result.exit_code == 2
