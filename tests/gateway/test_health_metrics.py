"""/metrics parses with prometheus-client; /readyz follows the database."""

import json
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.plugins.live import LiveServer
from tests.plugins.postgres import PostgresServer


def test_metrics_parse_and_count(live_server):
    key = live_server.create_key("metrics")
    generated = 0
    for stream in (False, True):
        r = httpx.post(live_server.url + "/v1/generate", headers={"X-API-Key": key},
                       json={"prompt": f"metrics {stream}", "max_new_tokens": 4,
                             "stream": stream, "temperature": 0}, timeout=60)
        assert r.status_code == 200
        final = json.loads(r.text.strip().splitlines()[-1].removeprefix("data: "))
        generated += final["usage"]["completion_tokens"]
    text = httpx.get(live_server.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = {(s.labels["route"], s.labels["status"]): s.value
                for s in families["llmctl_requests"].samples if s.name.endswith("_total")}
    assert requests[("/v1/generate", "200")] == 2
    tokens = [s for s in families["llmctl_generation_tokens"].samples
              if s.name.endswith("_total") and s.labels["model_name"] == "tiny"]
    assert tokens and tokens[0].value == generated
    ttft = [s for s in families["llmctl_time_to_first_token_seconds"].samples
            if s.name.endswith("_count")]
    assert ttft and ttft[0].value == 2  # streamed or not
    assert "llmctl_e2e_request_latency_seconds" in families
    queued = [s for s in families["llmctl_request_queue_time_seconds"].samples
              if s.name.endswith("_count") and s.labels["model_name"] == "tiny"]
    assert queued and queued[0].value == 2
    assert "llmctl_num_requests_running" in families


def test_readyz_follows_the_database(live_server_factory, tiny_models_yaml, tmp_path):
    pg = PostgresServer()
    pg.start()
    try:
        env = {"LLMCTL_DATABASE_URL": pg.create_database()}
        LiveServer(tiny_models_yaml, tmp_path / "h", env).cli("db", "upgrade")
        server = live_server_factory(tiny_models_yaml, env=env, home=tmp_path / "h")
        assert httpx.get(server.url + "/readyz").status_code == 200
        pg.stop()
        response = httpx.get(server.url + "/readyz", timeout=10)
        assert response.status_code == 503
        assert "database" in response.json()["checks"]
        assert response.json()["checks"]["database"]["ok"] is False
        assert httpx.get(server.url + "/healthz").status_code == 200
        pg.start()
        deadline = time.monotonic() + 20
        while httpx.get(server.url + "/readyz", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "readyz did not recover"
            time.sleep(0.2)
    finally:
        pg.cleanup()

