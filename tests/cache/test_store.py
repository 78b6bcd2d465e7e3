"""The database layer: store, look up, count hits, expire, purge, clear, stats —
on embedded SQLite and on Postgres."""

import asyncio
import json
from datetime import timedelta

from sqlalchemy import select, update

from server.db.tables import CompletionCache as Entry
from server.db.tables import RequestLog, utcnow
from server.services import cache as svc
from server.services.cache import CompletionCache
from tests.cache.conftest import make_settings

VALUE = {"id": "cmpl-1", "created": 1700000000, "text": "héllo", "finish_reason": "stop",
         "prompt_tokens": 3, "completion_tokens": 2, "token_ids": [5, 6]}


def ck(cache, prompt="p", model="tiny", **params):
    return cache.key_for(model=model, prompt=prompt, params={"temperature": 0, **params})


async def test_put_then_get_and_overwrite(cache):
    k = ck(cache)
    assert await cache.get(k) == (None, None)
    await cache.put(k, VALUE)
    assert await cache.get(k) == (VALUE, "db")
    await cache.put(k, {**VALUE, "text": "new"})  # same key again: one row, new value
    assert (await cache.get(k))[0]["text"] == "new"
    with cache.db.session() as s:
        rows = s.scalars(select(Entry)).all()
    assert len(rows) == 1
    row = rows[0]
    assert (row.model, row.scope, row.prompt_hash, row.params_fingerprint) == (
        "tiny", "global", k.prompt_hash, k.params_fingerprint)
    assert row.expires_at is not None


async def test_hits_are_counted_in_batches_not_on_the_request(cache):
    k = ck(cache)
    await cache.put(k, VALUE)
    for _ in range(3):
        await cache.get(k)
    with cache.db.session() as s:
        assert s.scalar(select(Entry.hits)) == 0  # nothing written on the hit path
    assert await cache.flush_hits() == 1
    with cache.db.session() as s:
        row = s.scalars(select(Entry)).one()
    assert row.hits == 3 and row.last_hit_at is not None


async def test_ttl_expiry_hides_then_sweeps_only_expired(database):
    cache = CompletionCache(make_settings(cache_ttl=3600), database)
    old, fresh = ck(cache, "old"), ck(cache, "fresh")
    await cache.put(old, VALUE)
    await cache.put(fresh, VALUE)
    with database.session() as s:
        s.execute(update(Entry).where(Entry.cache_key == old.key)
                  .values(expires_at=utcnow() - timedelta(seconds=1)))
    assert await cache.get(old) == (None, None)  # expired: a miss before any sweep
    assert (await cache.get(fresh))[0] == VALUE
    assert svc.sweep_expired(database) == 1
    with database.session() as s:
        assert s.scalars(select(Entry.cache_key)).all() == [fresh.key]
    await cache.close()


async def test_ttl_zero_never_expires(database):
    cache = CompletionCache(make_settings(cache_ttl=0), database)
    k = ck(cache)
    await cache.put(k, VALUE)
    with database.session() as s:
        assert s.scalar(select(Entry.expires_at)) is None
    assert svc.sweep_expired(database, now=utcnow() + timedelta(days=3650)) == 0
    assert (await cache.get(k))[0] == VALUE


async def test_the_background_task_sweeps_and_flushes(database):
    cache = CompletionCache(make_settings(cache_ttl=1), database, flush_interval=0.05,
                            sweep_interval=0.05)
    await cache.start()
    k = ck(cache)
    await cache.put(k, VALUE)
    await cache.get(k)
    await asyncio.sleep(1.3)
    with database.session() as s:
        assert s.scalar(select(Entry.id)) is None
    await cache.close()


async def test_purge_removes_older_entries_and_nothing_else(database):
    cache = CompletionCache(make_settings(), database)
    keys = {age: ck(cache, f"p{age}") for age in (0, 3, 8, 30)}
    for age, k in keys.items():
        await cache.put(k, VALUE)
        with database.session() as s:
            s.execute(update(Entry).where(Entry.cache_key == k.key)
                      .values(created_at=utcnow() - timedelta(days=age, minutes=1)))
    result = svc.purge(database, older_than=timedelta(days=7))
    assert result["deleted"] == 2
    with database.session() as s:
        left = set(s.scalars(select(Entry.cache_key)))
    assert left == {keys[0].key, keys[3].key}
    assert svc.purge(database, older_than=timedelta(days=7))["deleted"] == 0


async def test_clear_all_or_one_model(database):
    cache = CompletionCache(make_settings(), database)
    for prompt, model in [("x", "a"), ("y", "a"), ("x", "b")]:
        await cache.put(ck(cache, prompt, model=model), VALUE)
    assert svc.clear(database, model="a")["deleted"] == 2
    with database.session() as s:
        assert s.scalars(select(Entry.model)).all() == ["b"]
    assert svc.clear(database)["deleted"] == 1


async def test_stats_by_model(database):
    cache = CompletionCache(make_settings(), database)
    await cache.put(ck(cache, "1", model="a"), VALUE)
    await cache.put(ck(cache, "2", model="a"), VALUE)
    await cache.put(ck(cache, "3", model="b"), VALUE)
    expired = ck(cache, "4", model="b")
    await cache.put(expired, VALUE)
    with database.session() as s:
        s.execute(update(Entry).where(Entry.cache_key == expired.key)
                  .values(expires_at=utcnow() - timedelta(seconds=1)))
    await cache.get(ck(cache, "1", model="a"))
    await cache.flush_hits()
    with database.session() as s:
        for i, (model, status) in enumerate([("a", "hit"), ("a", "hit"), ("a", "hit"),
                                             ("a", "miss"), ("b", "miss"), ("b", "bypass"),
                                             ("a", None)]):
            s.add(RequestLog(request_id=f"r{i}", model=model, route="completions", status=200,
                             cache_status=status, cached=status == "hit"))
    data = svc.stats(database)
    a, b = data["models"]
    size = a["bytes"] // 2
    assert a == {"model": "a", "entries": 2, "bytes": 2 * size, "stored_hits": 1, "hits": 3,
                 "misses": 1, "bypasses": 0, "hit_ratio": 0.75}
    assert b == {"model": "b", "entries": 1, "bytes": size, "stored_hits": 0, "hits": 0,
                 "misses": 1, "bypasses": 1, "hit_ratio": 0.0}
    assert (data["entries"], data["bytes"], data["expired"], data["hits"], data["misses"],
            data["bypasses"], data["hit_ratio"]) == (3, 3 * size, 1, 3, 2, 1, 0.6)
    only_b = svc.stats(database, model="b")
    assert [m["model"] for m in only_b["models"]] == ["b"] and only_b["entries"] == 1


async def test_empty_stats(database):
    data = svc.stats(database)
    assert data["entries"] == 0 and data["models"] == [] and data["hit_ratio"] is None


async def test_database_failure_is_a_miss_not_an_error(cache, monkeypatch):
    k = ck(cache)
    await cache.put(k, VALUE)

    def broken(*a, **kw):
        raise RuntimeError("db down")

    monkeypatch.setattr(svc, "_read_entry", broken)
    if cache._sqlite is not None:
        monkeypatch.setattr(cache._sqlite, "read", broken)
    assert await cache.get(k) == (None, None)
    monkeypatch.setattr(cache, "_db_write", broken)
    await cache.put(k, VALUE)  # logged, not raised


async def test_size_bytes_is_the_stored_json(cache):
    k = ck(cache)
    await cache.put(k, VALUE)
    with cache.db.session() as s:
        size = s.scalar(select(Entry.size_bytes))
    assert size == len(json.dumps(VALUE, separators=(",", ":"), ensure_ascii=False).encode())
