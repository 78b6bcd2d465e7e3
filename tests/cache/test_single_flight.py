"""Single-flight in one process: identical requests in flight generate once."""

import asyncio

import pytest

from server.services.cache import CompletionCache
from tests.cache.conftest import make_settings

VALUE = {"id": "cmpl-1", "created": 1, "text": "out"}


def ck(cache, prompt="p"):
    return cache.key_for(model="tiny", prompt=prompt, params={"temperature": 0})


class Engine:
    """Counts generations; each takes `delay` seconds."""

    def __init__(self, delay=0.2, fail: BaseException | None = None):
        self.calls = 0
        self.delay = delay
        self.fail = fail

    async def produce(self):
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        return {**VALUE, "n": self.calls}


@pytest.fixture
async def cache(sqlite_db):
    c = CompletionCache(make_settings(), sqlite_db)
    yield c
    await c.close()


async def test_twenty_identical_requests_generate_once(cache):
    engine = Engine()
    k = ck(cache)
    results = await asyncio.gather(*[cache.single_flight(k, engine.produce) for _ in range(20)])
    assert engine.calls == 1
    assert {r[0]["n"] for r in results} == {1}
    layers = sorted(str(r[1]) for r in results)
    assert layers == ["None"] + ["flight"] * 19
    assert not cache._inflight
    # And afterwards it is a plain hit from the database.
    assert await cache.single_flight(k, engine.produce) == ({**VALUE, "n": 1}, "db")


async def test_different_requests_do_not_wait_for_each_other(cache):
    engine = Engine(delay=0.05)
    await asyncio.gather(*[cache.single_flight(ck(cache, str(i)), engine.produce)
                           for i in range(5)])
    assert engine.calls == 5


async def test_a_leader_that_goes_away_hands_over_to_a_waiter(cache):
    engine = Engine(delay=0.3)
    k = ck(cache)
    leader = asyncio.create_task(cache.single_flight(k, engine.produce))
    await asyncio.sleep(0.05)
    waiters = [asyncio.create_task(cache.single_flight(k, engine.produce)) for _ in range(3)]
    await asyncio.sleep(0.05)
    leader.cancel()  # the client disconnected
    results = await asyncio.gather(*waiters)
    assert engine.calls == 2  # the abandoned one and one waiter's
    assert {r[0]["n"] for r in results} == {2}
    assert sorted(str(r[1]) for r in results) == ["None", "flight", "flight"]


async def test_an_engine_error_reaches_every_waiter_and_nothing_is_stored(cache):
    engine = Engine(fail=ValueError("boom"))
    k = ck(cache)
    results = await asyncio.gather(*[cache.single_flight(k, engine.produce) for _ in range(5)],
                                   return_exceptions=True)
    assert engine.calls == 1
    assert all(isinstance(r, ValueError) for r in results)
    assert await cache.get(k) == (None, None)
    assert not cache._inflight


async def test_no_store_shares_with_waiters_but_writes_nothing(cache):
    engine = Engine()
    k = ck(cache)
    results = await asyncio.gather(*[cache.single_flight(k, engine.produce, store=False)
                                     for _ in range(4)])
    assert engine.calls == 1 and len({r[0]["n"] for r in results}) == 1
    assert await cache.get(k) == (None, None)


async def test_the_flight_block_for_streaming_leaders(cache):
    """The serving path's form: lead, stream, then fulfil."""
    k = ck(cache)
    async with cache.flight(k) as f:
        assert f.leader and not f.hit
        waiter = asyncio.create_task(cache.single_flight(k, Engine().produce))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await f.fulfil(VALUE)
    assert await waiter == (VALUE, "flight")
    async with cache.flight(k) as f:
        assert f.hit and f.value == VALUE and f.layer == "db"


async def test_leaving_the_block_without_a_value_hands_over(cache):
    k = ck(cache)
    engine = Engine(delay=0.01)
    async with cache.flight(k):
        waiter = asyncio.create_task(cache.single_flight(k, engine.produce))
        await asyncio.sleep(0.02)
    value, layer = await waiter
    assert layer is None and engine.calls == 1


async def test_lookup_counts_hits_only(cache):
    from prometheus_client import REGISTRY

    def sample(layer, result):
        return REGISTRY.get_sample_value("llmctl_cache_requests_total", {
            "model_name": "tiny", "layer": layer, "result": result}) or 0

    k = ck(cache, "lookup")
    misses, hits = sample("db", "miss"), sample("db", "hit")
    assert await cache.lookup(k) == (None, None)
    assert sample("db", "miss") == misses  # the flight that follows counts the miss
    await cache.put(k, VALUE)
    assert await cache.lookup(k) == (VALUE, "db")
    assert sample("db", "hit") == hits + 1
