"""The Redis hot layer: read Redis then the database, write both; survive Redis going
away; repopulate when it returns; single-flight across processes through Redis."""

import asyncio
import json

import pytest
import redis as redis_lib
from prometheus_client import REGISTRY

from server.services import cache as svc
from server.services.cache import CompletionCache
from server.services.redisconn import RedisHandle
from tests.cache.conftest import make_settings

pytestmark = pytest.mark.redis

VALUE = {"id": "cmpl-1", "created": 1, "text": "out"}


def ck(cache, prompt="p", model="tiny"):
    return cache.key_for(model=model, prompt=prompt, params={"temperature": 0})


def metric(layer, result):
    return REGISTRY.get_sample_value("llmctl_cache_requests_total",
                                     {"model_name": "tiny", "layer": layer, "result": result}) or 0


async def test_writes_both_layers_and_reads_redis_first(rcache, redis_url):
    k = ck(rcache)
    await rcache.put(k, VALUE)
    raw = redis_lib.Redis.from_url(redis_url).get(k.redis_key)
    assert json.loads(raw) == VALUE
    ttl = redis_lib.Redis.from_url(redis_url).pttl(k.redis_key)
    assert 0 < ttl <= rcache.ttl * 1000
    assert await rcache.get(k) == (VALUE, "redis")
    # A database-only entry (say, written while Redis was down) is found and promoted.
    redis_lib.Redis.from_url(redis_url).delete(k.redis_key)
    assert await rcache.get(k) == (VALUE, "db")
    await asyncio.sleep(0.05)
    assert await rcache.get(k) == (VALUE, "redis")


async def test_redis_stopped_database_answers_restart_repopulates(rcache, redis_server):
    k1, k2 = ck(rcache, "one"), ck(rcache, "two")
    await rcache.put(k1, VALUE)
    redis_server.stop()
    try:
        # Reads and writes keep working on the database, and never raise.
        assert await rcache.get(k1) == (VALUE, "db")
        await rcache.put(k2, {**VALUE, "text": "two"})
        assert await rcache.get(k2) == ({**VALUE, "text": "two"}, "db")
        value, layer = await rcache.single_flight(ck(rcache, "three"),
                                                  lambda: asyncio.sleep(0, VALUE))
        assert (value, layer) == (VALUE, None)
        assert not rcache.redis.available
    finally:
        redis_server.start()  # a fresh, empty Redis, as after a crash
    for _ in range(50):
        if rcache.redis.available:
            break
        await asyncio.sleep(0.05)
    assert rcache.redis.available
    # Hot entries come back: the first read is the database's, and puts it in Redis.
    assert await rcache.get(k1) == (VALUE, "db")
    await asyncio.sleep(0.05)
    assert await rcache.get(k1) == (VALUE, "redis")
    assert (await rcache.get(k2))[1] == "db"
    await asyncio.sleep(0.05)
    assert (await rcache.get(k2))[1] == "redis"


async def test_metrics_count_once_per_request_by_layer(rcache, redis_url):
    k = ck(rcache, "metrics")
    before = {lr: metric(*lr) for lr in [("redis", "hit"), ("db", "hit"), ("db", "miss"),
                                         ("flight", "hit"), ("none", "bypass")]}

    async def produce():
        await asyncio.sleep(0.1)
        return VALUE

    await asyncio.gather(*[rcache.single_flight(k, produce) for _ in range(3)])
    await rcache.single_flight(k, produce)
    redis_lib.Redis.from_url(redis_url).delete(k.redis_key)
    await rcache.single_flight(k, produce)
    rcache.record_bypass("tiny")
    delta = {lr: metric(*lr) - v for lr, v in before.items()}
    assert delta == {("db", "miss"): 1, ("flight", "hit"): 2, ("redis", "hit"): 1,
                     ("db", "hit"): 1, ("none", "bypass"): 1}


async def _two_processes(sqlite_db, redis_url, n=20, delay=0.3, **kw):
    """Two caches with their own Redis connections and flights: two gateways."""
    handles = [RedisHandle(redis_url, retry_interval=0.1) for _ in range(2)]
    caches = [CompletionCache(make_settings(), sqlite_db, h, **kw) for h in handles]
    for h in handles:
        await h.connect()
    calls = []

    def producer(i):
        async def produce():
            calls.append(i)
            await asyncio.sleep(delay)
            return {**VALUE, "by": i}
        return produce

    return caches, handles, calls, producer


async def test_single_flight_across_processes_through_redis(sqlite_db, redis_url):
    caches, handles, calls, producer = await _two_processes(sqlite_db, redis_url)
    k = ck(caches[0])
    results = await asyncio.gather(*[caches[i % 2].single_flight(k, producer(i % 2))
                                     for i in range(20)])
    assert len(calls) == 1
    assert len({json.dumps(r[0]) for r in results}) == 1
    assert sorted(str(r[1]) for r in results).count("None") == 1
    for c in caches:
        await c.close()
    for h in handles:
        await h.close()


async def test_a_crashed_leader_process_is_replaced_after_its_lock_lapses(sqlite_db, redis_url):
    caches, handles, calls, producer = await _two_processes(sqlite_db, redis_url, delay=0.05,
                                                            lock_ttl=0.3)
    k = ck(caches[0])
    # Process A takes the lead, then dies without releasing (no refresher either).
    async with caches[0].flight(k) as f:
        assert f.leader
        f._refresher.cancel()
        f._lock_token = None  # so leaving the block does not release it: a crash
        task = asyncio.create_task(caches[1].single_flight(k, producer(1)))
        await asyncio.sleep(0.1)
        assert not task.done()
        f._future.cancel()
        f._done = True
    value, layer = await asyncio.wait_for(task, 3)
    assert layer is None and calls == [1] and value["by"] == 1
    for c in caches:
        await c.close()
    for h in handles:
        await h.close()


async def test_a_waiting_process_gets_the_value_or_takes_over(sqlite_db, redis_url):
    caches, handles, calls, producer = await _two_processes(sqlite_db, redis_url, delay=0.05)
    k = ck(caches[0])
    async with caches[0].flight(k) as f:
        assert f.leader
        waiter = asyncio.create_task(caches[1].single_flight(k, producer(1)))
        await asyncio.sleep(0.1)
        # Leaving without a value (the client went away): the other process leads.
    value, layer = await asyncio.wait_for(waiter, 3)
    assert layer is None and calls == [1]
    for c in caches:
        await c.close()
    for h in handles:
        await h.close()


async def test_clear_and_purge_remove_redis_copies(rcache, redis_url):
    from datetime import timedelta

    from sqlalchemy import update

    from server.db.tables import CompletionCache as Entry
    from server.db.tables import utcnow

    r = redis_lib.Redis.from_url(redis_url)
    a1, a2, b1 = ck(rcache, "1", "a"), ck(rcache, "2", "a"), ck(rcache, "1", "b")
    for k in (a1, a2, b1):
        await rcache.put(k, VALUE)
    r.set("unrelated", "1")
    result = svc.clear(rcache.db, model="a", redis_url=redis_url)
    assert result["deleted"] == 2 and result["redis"] == {"deleted": 2}
    assert r.exists(b1.redis_key) and not r.exists(a1.redis_key)

    old = ck(rcache, "old", "b")
    await rcache.put(old, VALUE)
    with rcache.db.session() as s:
        s.execute(update(Entry).where(Entry.cache_key == old.key)
                  .values(created_at=utcnow() - timedelta(days=9)))
    result = svc.purge(rcache.db, older_than=timedelta(days=7), redis_url=redis_url)
    assert result["deleted"] == 1 and result["redis"] == {"deleted": 1}
    assert r.exists(b1.redis_key) and not r.exists(old.redis_key)

    result = svc.clear(rcache.db, redis_url=redis_url)
    assert result["deleted"] == 1 and result["redis"] == {"deleted": 1}
    assert r.exists("unrelated")


async def test_clear_with_redis_down_still_clears_the_database(cache):
    await cache.put(ck(cache), VALUE)
    result = svc.clear(cache.db, redis_url="redis://127.0.0.1:1/0")
    assert result["deleted"] == 1 and "unreachable" in result["redis"]["error"]
