"""Live `llmctl serve` processes: shared limits through one redis-server and one
Postgres, in-flight limits with real streams, and Redis going away and coming back.
(Done when 1, 3 and 4 of the usage-governance issue.)"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from server.db import migrate
from server.db.engine import Database

pytestmark = [pytest.mark.redis, pytest.mark.slow]

RATE_HEADERS = ["x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests", "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"]


def body(prompt="Hello", max_tokens=1, stream=False) -> dict:
    return {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": stream}


def auth(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


async def fire(urls: list[str], secret: str, n: int, concurrency: int = 16) -> list:
    """n completions spread round-robin over the gateways, `concurrency` at a time."""
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120) as client:
        async def one(i):
            async with gate:
                return await client.post(urls[i % len(urls)] + "/v1/completions",
                                         headers=auth(secret), json=body(f"Hello {i}"))
        return await asyncio.gather(*(one(i) for i in range(n)))


def shared_env(pg_url: str, redis_url: str, **extra) -> dict:
    db = Database(pg_url)
    migrate.upgrade(db, "head")
    db.dispose()
    return {"LLMCTL_DATABASE_URL": pg_url, "LLMCTL_REDIS_URL": redis_url,
            "LLMCTL_CACHE_ENABLED": "false", **extra}


def readyz(server) -> tuple[int, dict]:
    r = httpx.get(server.url + "/readyz", timeout=10)
    return r.status_code, r.json()


def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


async def test_two_gateways_share_one_rpm_limit(live_server_factory, tiny_models_yaml, pg_url,
                                                redis_url, tmp_path):
    """Done when 1: 100 requests over two gateways, rpm=30 → exactly 30 succeed."""
    env = shared_env(pg_url, redis_url)
    a = live_server_factory(tiny_models_yaml, env=env, home=tmp_path / "a", args=("--preload",))
    b = live_server_factory(tiny_models_yaml, env=env, home=tmp_path / "b", args=("--preload",))
    secret = a.create_key("shared", "--rpm", "30", "--tpm", "1000000")

    responses = await fire([a.url, b.url], secret, 100)
    ok = [r for r in responses if r.status_code == 200]
    limited = [r for r in responses if r.status_code == 429]
    assert (len(ok), len(limited)) == (30, 70), [r.status_code for r in responses]
    for r in responses:
        missing = [h for h in RATE_HEADERS if h not in r.headers]
        assert not missing, (r.status_code, missing)
        assert r.headers["x-ratelimit-limit-requests"] == "30"
    for r in limited:
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        assert 1 <= int(r.headers["Retry-After"]) <= 60
    remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok)
    assert remaining == list(range(30))  # one shared window, counted down once


async def test_concurrency_limit_with_open_streams(live_server_factory, tiny_models_yaml):
    """Done when 3: the third request is refused while two streams are open; a slot
    frees when a stream's client disconnects and when a stream ends."""
    server = live_server_factory(tiny_models_yaml, env={"LLMCTL_CACHE_ENABLED": "false"},
                                 args=("--preload",))
    secret = server.create_key("streamer", "--max-concurrency", "2")
    url = server.url + "/v1/completions"
    client = httpx.Client(timeout=120, headers=auth(secret))

    def open_stream(prompt):
        cm = client.stream("POST", url, json=body(prompt, max_tokens=256, stream=True))
        response = cm.__enter__()
        assert response.status_code == 200, response.read()
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        return cm, response, lines

    def third():
        return client.post(url, json=body("third"))

    s1, s2 = open_stream("first stream"), open_stream("second stream")
    refused = third()
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert "in flight" in refused.json()["error"]["message"]

    s1[0].__exit__(None, None, None)  # the client goes away mid-stream
    wait_for(lambda: third().status_code == 200, 30, "a slot after the disconnect")

    # s2 may have run to its end while the slot was awaited: two fresh streams hold
    # both slots again (each has just started its 256 tokens when the third is tried).
    s2[0].__exit__(None, None, None)
    wait_for(lambda: third().status_code == 200, 30, "both slots free")
    s3, s4 = open_stream("third stream"), open_stream("fourth stream")
    assert third().status_code == 429
    assert sum(1 for _ in s3[2]) > 0  # s3 runs to its end
    s3[0].__exit__(None, None, None)
    wait_for(lambda: third().status_code == 200, 30, "a slot after the stream ended")
    s4[0].__exit__(None, None, None)
    client.close()


async def test_redis_outage_and_return(live_server_factory, tiny_models_yaml, pg_url,
                                       redis_server, redis_url, tmp_path):
    """Done when 4: Redis stops mid-run → served on per-process limits (503 where
    fail-closed), /readyz says why; Redis back → shared limits again, no restarts."""
    env = shared_env(pg_url, redis_url)
    a = live_server_factory(tiny_models_yaml, env=env, home=tmp_path / "a", args=("--preload",))
    b = live_server_factory(tiny_models_yaml, env=env, home=tmp_path / "b", args=("--preload",))
    closed = live_server_factory(tiny_models_yaml, env={**env, "LLMCTL_REDIS_FAIL_CLOSED": "true"},
                                 home=tmp_path / "c", args=("--preload",))
    first = a.create_key("before", "--rpm", "6")
    free = a.create_key("free")  # no limits: needs no Redis
    assert [r.status_code for r in await fire([a.url, b.url], first, 4)] == [200] * 4

    redis_server.stop()
    try:
        # fail-open: served, each process on its own window of 6
        codes = [r.status_code for r in await fire([a.url, b.url], first, 10)]
        assert codes.count(200) >= 4, codes  # the shared window had 2 left; locally 6 each
        for server in (a, b):
            status, ready = readyz(server)
            assert status == 200 and ready["status"] == "ready"
            redis = ready["checks"]["redis"]
            assert redis["available"] is False and redis["error"] and redis["down_since"]
        # fail-closed: limited keys get 503, unlimited keys are still served
        refused = httpx.post(closed.url + "/v1/completions", headers=auth(first), json=body(),
                             timeout=60)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "service_unavailable"
        assert "Redis" in refused.json()["error"]["message"]
        assert httpx.post(closed.url + "/v1/completions", headers=auth(free), json=body(),
                          timeout=60).status_code == 200
        status, ready = readyz(closed)
        assert status == 503 and ready["checks"]["redis"]["ok"] is False
    finally:
        redis_server.start()

    for server in (a, b, closed):
        wait_for(lambda s=server: readyz(s)[1]["checks"]["redis"]["available"], 30,
                 "redis to be seen again")
    # shared again: a fresh key, 12 requests over three gateways, rpm 4 → exactly 4
    after = a.create_key("after", "--rpm", "4", "--tpm", "1000000")
    codes = [r.status_code for r in await fire([a.url, b.url, closed.url], after, 12)]
    assert codes.count(200) == 4 and codes.count(429) == 8, codes
    # the loss was logged once per process, not once per request
    a.stop()
    log_text = a.log_path.read_text()
    assert log_text.count("is unreachable") == 1, log_text[-2000:]
    assert "reachable again" in log_text
