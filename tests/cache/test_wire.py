"""The cache through the whole gateway, in-process on the tiny test model: every API,
streaming, controls, single-flight, Redis loss and return, TTL and purge."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select

from server.api.app import create_app
from server.config import Settings, load_models_config
from server.db.tables import RequestLog
from server.engines.base import ModelEngine
from server.engines.manager import default_engine_factory
from server.errors import UpstreamError
from server.services import cache as cache_svc
from server.services import keys

ROUTES = {
    "generate": ("/v1/generate", {"prompt": "The cache", "max_new_tokens": 6,
                                  "temperature": 0}),
    "completions": ("/v1/completions", {"model": "tiny", "prompt": "The cache",
                                        "max_tokens": 6, "temperature": 0}),
    "chat": ("/v1/chat/completions", {"model": "tiny", "max_tokens": 6, "temperature": 0,
                                      "messages": [{"role": "user", "content": "The cache"}]}),
}
MAX_FIELD = {"generate": "max_new_tokens", "completions": "max_tokens", "chat": "max_tokens"}


class Counting(ModelEngine):
    """The real engine, counting generations; `delay` keeps them in flight a while."""

    def __init__(self, inner: ModelEngine):
        self.inner = inner
        self.model_id = inner.model_id
        self.calls = 0
        self.delay = 0.0

    async def start(self):
        await self.inner.start()

    async def generate(self, request):
        self.calls += 1
        await asyncio.sleep(self.delay)
        return await self.inner.generate(request)

    async def stream(self, request):
        self.calls += 1
        await asyncio.sleep(self.delay)
        async for item in self.inner.stream(request):
            yield item

    def count_tokens(self, text, **kw):
        return self.inner.count_tokens(text, **kw)

    def render_chat(self, messages):
        return self.inner.render_chat(messages)

    @property
    def max_context(self):
        return self.inner.max_context

    @property
    def ready(self):
        return self.inner.ready

    async def health(self):
        return await self.inner.health()

    async def close(self):
        await self.inner.close()


class Gateway:
    def __init__(self, app, client, secret, engines):
        self.app, self.client, self.secret, self.engines = app, client, secret, engines

    @property
    def state(self):
        return self.app.state.llmctl

    @property
    def calls(self) -> int:
        return sum(e.calls for e in self.engines)

    def set_delay(self, delay: float) -> None:
        for e in self.engines:
            e.delay = delay

    async def post(self, api: str, secret: str | None = None, headers: dict | None = None,
                   **changes) -> httpx.Response:
        route, body = ROUTES[api]
        return await self.client.post(
            route, json={**body, **changes},
            headers={"Authorization": f"Bearer {secret or self.secret}", **(headers or {})})

    async def stream(self, api: str, **changes) -> tuple[httpx.Response, list[dict]]:
        route, body = ROUTES[api]
        events = []
        async with self.client.stream("POST", route, json={**body, **changes, "stream": True},
                                      headers={"Authorization": f"Bearer {self.secret}"}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
        return r, events

    async def logs(self) -> list[RequestLog]:
        await self.state.logstore.flush()
        with self.state.db.session() as s:
            return list(s.scalars(select(RequestLog).order_by(RequestLog.id)))


@pytest.fixture
async def make_gateway(tmp_path, tiny_models_yaml, monkeypatch):
    """Start in-process gateways on one home; settings overrides as keyword arguments."""
    monkeypatch.setenv("LLMCTL_HOME", str(tmp_path / "home"))
    stack = []

    async def make(**overrides) -> Gateway:
        settings = Settings(_env_file=None, models_config=tiny_models_yaml, log_prompts=True,
                            **overrides)
        engines: list[Counting] = []

        def factory(spec, s):
            engine = Counting(default_engine_factory(spec, s))
            engines.append(engine)
            return engine

        app = create_app(settings, load_models_config(settings), engine_factory=factory)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw",
                                   timeout=60)
        name = f"user{len(stack)}"
        secret = keys.create_key(app.state.llmctl.db, name=name).secret
        stack.append((lifespan, client))
        return Gateway(app, client, secret, engines)

    yield make
    for lifespan, client in reversed(stack):
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


@pytest.fixture
async def gw(make_gateway):
    return await make_gateway()


def metric(layer: str, result: str) -> float:
    return REGISTRY.get_sample_value("llmctl_cache_requests_total",
                                     {"model_name": "tiny", "layer": layer, "result": result}) or 0


def text_of(api: str, body: dict) -> str:
    if api == "generate":
        return body["text"]
    choice = body["choices"][0]
    return choice["text"] if api == "completions" else choice["message"]["content"]


def streamed_text(api: str, events: list[dict]) -> str:
    if api == "generate":
        return "".join(e.get("text", "") for e in events)
    out = []
    for e in events:
        for c in e["choices"]:
            out.append(c.get("text") or (c.get("delta") or {}).get("content") or "")
    return "".join(out)


# ------------------------------------------------------------------ Done when 1


@pytest.mark.parametrize("api", list(ROUTES))
async def test_second_identical_request_is_a_byte_identical_hit(gw, api):
    first = await gw.post(api)
    second = await gw.post(api)
    assert first.status_code == second.status_code == 200, first.text
    assert first.headers["x-llmctl-cache"] == "miss"
    assert second.headers["x-llmctl-cache"] == "hit"
    if api == "generate":  # its body carries the request id, which is per request
        a, b = first.json(), second.json()
        assert a.pop("request_id") != b.pop("request_id")
        assert a == b
    else:
        assert first.content == second.content
    assert gw.calls == 1
    # A changed parameter misses.
    changed = await gw.post(api, **{MAX_FIELD[api]: 5})
    assert changed.headers["x-llmctl-cache"] == "miss" and gw.calls == 2
    rows = await gw.logs()
    assert [(r.cache_status, r.cached) for r in rows] == [("miss", False), ("hit", True),
                                                          ("miss", False)]
    # A hit is not charged against the quota by default, but is logged with its tokens.
    assert rows[1].charged_tokens == 0 and rows[0].charged_tokens > 0
    assert rows[1].completion_tokens == rows[0].completion_tokens


@pytest.mark.parametrize("api", list(ROUTES))
async def test_streaming_hits_are_replayed_as_streams(gw, api):
    r1, first = await gw.stream(api)
    r2, second = await gw.stream(api)
    assert r1.headers["x-llmctl-cache"] == "miss" and r2.headers["x-llmctl-cache"] == "hit"
    assert r2.headers["content-type"].startswith("text/event-stream")
    assert streamed_text(api, first) == streamed_text(api, second) != ""
    if api != "generate":
        assert {e["id"] for e in first} == {e["id"] for e in second}
    assert gw.calls == 1
    # The streamed miss filled the same entry a plain request reads.
    plain = await gw.post(api)
    assert plain.headers["x-llmctl-cache"] == "hit" and gw.calls == 1
    assert text_of(api, plain.json()) == streamed_text(api, first)
    rows = await gw.logs()
    assert [(r.cache_status, r.stream) for r in rows] == [("miss", True), ("hit", True),
                                                          ("hit", False)]


@pytest.mark.parametrize("api", list(ROUTES))
async def test_sampling_without_a_seed_is_never_cached(gw, api):
    for _ in range(2):
        r = await gw.post(api, temperature=0.8)
        assert r.status_code == 200 and r.headers["x-llmctl-cache"] == "bypass"
    assert gw.calls == 2
    seeded = [await gw.post(api, temperature=0.8, seed=7) for _ in range(2)]
    assert [r.headers["x-llmctl-cache"] for r in seeded] == ["miss", "hit"]
    assert text_of(api, seeded[0].json()) == text_of(api, seeded[1].json())
    assert gw.calls == 3
    rows = await gw.logs()
    assert [r.cache_status for r in rows] == ["bypass", "bypass", "miss", "hit"]


async def test_controls_no_cache_no_store_and_the_cache_field(gw):
    miss = await gw.post("completions", headers={"Cache-Control": "no-store"})
    assert miss.headers["x-llmctl-cache"] == "miss"
    assert (await gw.post("completions")).headers["x-llmctl-cache"] == "miss"  # not stored
    assert (await gw.post("completions")).headers["x-llmctl-cache"] == "hit"
    fresh = await gw.post("completions", headers={"Cache-Control": "no-cache"})
    assert fresh.headers["x-llmctl-cache"] == "bypass"
    assert gw.calls == 3
    off = await gw.post("generate", cache=False)
    assert off.headers["x-llmctl-cache"] == "bypass"
    # cache: false stored nothing
    assert (await gw.post("generate")).headers["x-llmctl-cache"] == "miss"


async def test_cache_disabled_by_setting(make_gateway):
    gw = await make_gateway(cache_enabled=False)
    for _ in range(2):
        assert (await gw.post("completions")).headers["x-llmctl-cache"] == "bypass"
    assert gw.calls == 2


async def test_scope_key_isolates_tenants(make_gateway):
    gw = await make_gateway(cache_scope="key")
    other = keys.create_key(gw.state.db, name="other").secret
    assert (await gw.post("completions")).headers["x-llmctl-cache"] == "miss"
    assert (await gw.post("completions", secret=other)).headers["x-llmctl-cache"] == "miss"
    assert (await gw.post("completions", secret=other)).headers["x-llmctl-cache"] == "hit"
    assert gw.calls == 2


# ------------------------------------------------------------------ Done when 2


async def test_twenty_concurrent_identical_requests_generate_once(gw):
    gw.set_delay(0.3)
    before = {r: metric(layer, r) for layer, r in [("db", "miss"), ("flight", "hit")]}
    plain = [gw.post("completions") for _ in range(14)]
    streams = [gw.stream("completions") for _ in range(6)]
    results = await asyncio.gather(*plain, *streams)
    assert gw.calls == 1
    bodies = [r.content for r in results[:14]]
    assert len(set(bodies)) == 1
    text = text_of("completions", json.loads(bodies[0]))
    assert all(streamed_text("completions", events) == text for _, events in results[14:])
    statuses = sorted(r.headers["x-llmctl-cache"] for r in results[:14]) + sorted(
        r.headers["x-llmctl-cache"] for r, _ in results[14:])
    assert statuses.count("miss") == 1 and statuses.count("hit") == 19
    assert metric("db", "miss") - before["miss"] == 1
    assert metric("flight", "hit") - before["hit"] == 19
    rows = await gw.logs()
    assert len(rows) == 20 and sum(r.cache_status == "miss" for r in rows) == 1


async def test_a_failing_leader_fails_its_waiters_once(gw, monkeypatch):
    gw.set_delay(0.2)
    await gw.post("completions", max_tokens=1)  # load the engine
    engine = gw.engines[0]

    async def broken(request):
        engine.calls += 1
        await asyncio.sleep(0.2)
        raise UpstreamError("engine exploded")

    monkeypatch.setattr(engine, "generate", broken)
    results = await asyncio.gather(*[gw.post("completions") for _ in range(5)])
    assert {r.status_code for r in results} == {502}
    assert engine.calls == 2  # the warm-up and one failed generation for five requests


# ------------------------------------------------------------------ Done when 3


@pytest.mark.redis
async def test_redis_stopped_database_answers_then_hot_again(make_gateway, redis_server,
                                                             redis_url):
    gw = await make_gateway(redis_url=redis_url, redis_enabled=True)
    redis = gw.state.redis
    assert (await gw.post("completions")).headers["x-llmctl-cache"] == "miss"
    before = metric("redis", "hit")
    assert (await gw.post("completions")).headers["x-llmctl-cache"] == "hit"
    assert metric("redis", "hit") == before + 1

    redis_server.stop()
    try:
        db_hits = metric("db", "hit")
        for _ in range(3):
            r = await gw.post("completions")
            assert r.status_code == 200 and r.headers["x-llmctl-cache"] == "hit"
        assert metric("db", "hit") == db_hits + 3
        # New entries still work while Redis is down (database only).
        assert (await gw.post("completions", max_tokens=4)).headers["x-llmctl-cache"] == "miss"
        assert (await gw.post("completions", max_tokens=4)).headers["x-llmctl-cache"] == "hit"
        assert gw.calls == 2
    finally:
        redis_server.start()  # empty, as after a crash
    for _ in range(100):
        if redis.available:
            break
        await asyncio.sleep(0.05)
    assert redis.available
    # The first hit comes from the database and puts the entry back into Redis.
    db_hits, redis_hits = metric("db", "hit"), metric("redis", "hit")
    await gw.post("completions")
    await asyncio.sleep(0.1)
    await gw.post("completions")
    assert (metric("db", "hit") - db_hits, metric("redis", "hit") - redis_hits) == (1, 1)
    assert gw.calls == 2


# ------------------------------------------------------------------ Done when 4


async def test_ttl_expiry_then_regenerates(make_gateway):
    gw = await make_gateway(cache_ttl=1)
    assert (await gw.post("completions")).headers["x-llmctl-cache"] == "miss"
    assert (await gw.post("completions")).headers["x-llmctl-cache"] == "hit"
    await asyncio.sleep(1.2)
    assert (await gw.post("completions")).headers["x-llmctl-cache"] == "miss"
    assert gw.calls == 2


async def test_purge_and_clear_take_effect_on_a_running_gateway(gw):
    assert (await gw.post("completions")).headers["x-llmctl-cache"] == "miss"
    assert (await gw.post("chat")).headers["x-llmctl-cache"] == "miss"
    assert cache_svc.purge(gw.state.db, older_than=timedelta(days=7))["deleted"] == 0
    assert (await gw.post("completions")).headers["x-llmctl-cache"] == "hit"
    assert cache_svc.purge(gw.state.db, older_than=timedelta(seconds=0))["deleted"] == 2
    assert (await gw.post("completions")).headers["x-llmctl-cache"] == "miss"
    assert cache_svc.clear(gw.state.db, model="other")["deleted"] == 0
    assert cache_svc.clear(gw.state.db, model="tiny")["deleted"] == 1
    assert (await gw.post("completions")).headers["x-llmctl-cache"] == "miss"


@pytest.mark.parametrize("charge", [False, True], ids=["hits-free", "hits-charged"])
async def test_hits_and_limits(make_gateway, charge):
    """A hit always counts as a request for rate limits; it holds and consumes quota only
    when LLMCTL_CACHE_HITS_CHARGE_QUOTA is set."""
    gw = await make_gateway(cache_hits_charge_quota=charge)
    assert (await gw.post("completions")).headers["x-llmctl-cache"] == "miss"
    db = gw.state.db
    spent = keys.create_key(db, name="spent", monthly_token_quota=1).secret
    hit = await gw.post("completions", secret=spent)
    if charge:
        assert hit.status_code == 429 and hit.json()["error"]["code"] == "insufficient_quota"
    else:
        assert hit.status_code == 200 and hit.headers["x-llmctl-cache"] == "hit"
    limited = keys.create_key(db, name="limited", rpm=1).secret
    assert (await gw.post("completions", secret=limited)).status_code == 200
    again = await gw.post("completions", secret=limited)
    assert again.status_code == 429 and again.json()["error"]["code"] == "rate_limit_exceeded"
    assert gw.calls == 1
