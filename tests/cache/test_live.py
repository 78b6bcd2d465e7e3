"""Two live `llmctl serve` processes sharing Redis and a database: identical requests
in flight on both generate once between them."""

from __future__ import annotations

import concurrent.futures
import sqlite3

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.redis, pytest.mark.slow]

# Long enough (the tiny model never stops early) that all 20 requests, half of them to
# the other process, arrive while the first one is still generating.
BODY = {"model": "tiny", "prompt": "Two gateways, one generation:", "max_tokens": 240,
        "temperature": 0}


def cache_metrics(url: str) -> dict[tuple[str, str], float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name == "llmctl_cache_requests":
            for s in family.samples:
                if s.name.endswith("_total"):
                    out[(s.labels["layer"], s.labels["result"])] = s.value
    return out


def test_twenty_requests_across_two_processes_generate_once(live_server_factory,
                                                            tiny_models_yaml, redis_url,
                                                            tmp_path):
    home = tmp_path / "shared-home"
    env = {"LLMCTL_REDIS_URL": redis_url, "LLMCTL_LOG_PROMPTS": "true"}
    a = live_server_factory(tiny_models_yaml, env=env, home=home, args=("--preload",))
    b = live_server_factory(tiny_models_yaml, env=env, home=home, args=("--preload",))
    key = a.create_key("both")
    # Warm both engines on another prompt so the measured requests overlap in generation.
    for name, server in (("a", a), ("b", b)):
        r = httpx.post(server.url + "/v1/completions", json={**BODY, "prompt": f"warm {name}"},
                       headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert r.status_code == 200, r.text

    def one(i: int) -> httpx.Response:
        server = (a, b)[i % 2]
        return httpx.post(server.url + "/v1/completions", json=BODY,
                          headers={"Authorization": f"Bearer {key}"}, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(one, range(20)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert len({r.content for r in responses}) == 1, "20 identical answers"
    statuses = [r.headers["x-llmctl-cache"] for r in responses]
    assert statuses.count("miss") == 1 and statuses.count("hit") == 19

    # One generation between the two processes, by their own metrics...
    seen = [cache_metrics(s.url) for s in (a, b)]
    assert sum(m.get(("db", "miss"), 0) for m in seen) == 1 + 2  # two warm-ups, and one
    # Both processes had requests waiting on the one in flight (not later cache reads).
    assert all(m.get(("flight", "hit"), 0) >= 1 for m in seen), seen
    # ...and by the request log both write to.
    a.stop()
    b.stop()
    conn = sqlite3.connect(home / "llmctl.db")
    rows = conn.execute("select cache_status, cached from request_logs where prompt = ?",
                        (BODY["prompt"],)).fetchall()
    assert sorted(rows) == [("hit", 1)] * 19 + [("miss", 0)]
    entries = conn.execute("select count(*) from completion_cache").fetchone()[0]
    assert entries == 3  # the two warm-up prompts and the measured one
