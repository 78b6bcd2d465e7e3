"""The Limiter on its own: in memory, in a real Redis shared by two limiters, and
with Redis going away and coming back."""

from __future__ import annotations

import asyncio

import pytest

from server.errors import QuotaExceeded, RateLimited, Unavailable
from server.metrics import rejection_reason
from server.services.limits import Limiter, format_reset
from server.services.redisconn import RedisHandle

HEADERS = ["x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
           "x-ratelimit-reset-requests", "x-ratelimit-limit-tokens",
           "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"]


async def admit_many(limiter, key, n, reserve=1):
    ok, rejected = [], []
    for _ in range(n):
        try:
            ok.append(await limiter.admit(key, reserve))
        except RateLimited as exc:
            rejected.append(exc)
    return ok, rejected


def test_format_reset():
    assert [format_reset(x) for x in (0, 20, 999.2, 1000, 59_001, 360_000, 3_723_000)] == [
        "0s", "20ms", "1000ms", "1s", "1m0s", "6m0s", "1h2m3s"]


async def test_local_rpm_exact_with_headers(sqlite_db, make_settings, make_key):
    limiter = Limiter(make_settings(), sqlite_db, None)
    key = make_key(sqlite_db, rpm=3, tpm=1000)
    ok, rejected = await admit_many(limiter, key, 5, reserve=10)
    assert len(ok) == 3 and len(rejected) == 2
    assert [a.headers["x-ratelimit-remaining-requests"] for a in ok] == ["2", "1", "0"]
    exc = rejected[0]
    assert exc.status_code == 429 and exc.code == "rate_limit_exceeded"
    assert set(HEADERS) <= set(exc.headers) and int(exc.headers["Retry-After"]) >= 59
    assert ok[0].headers["x-ratelimit-remaining-tokens"] == "990"
    assert limiter.status()["mode"] == "local"


async def test_role_defaults_and_unlimited(sqlite_db, make_settings, make_key):
    limiter = Limiter(make_settings(default_rpm=2), sqlite_db, None)
    user = make_key(sqlite_db, name="u")
    admin = make_key(sqlite_db, name="a", role="admin")
    own = make_key(sqlite_db, name="o", rpm=0)  # 0 on the key: unlimited despite the default
    assert len((await admit_many(limiter, user, 4))[0]) == 2
    ok, _ = await admit_many(limiter, admin, 4)
    assert len(ok) == 4 and ok[0].headers == {}
    assert len((await admit_many(limiter, own, 4))[0]) == 4


async def test_tokens_bucket_refunds_on_settle(sqlite_db, make_settings, make_key):
    limiter = Limiter(make_settings(), sqlite_db, None)
    key = make_key(sqlite_db, tpm=100)
    a = await limiter.admit(key, 60)
    with pytest.raises(RateLimited) as exc:
        await limiter.admit(key, 60)
    assert "tokens per minute" in exc.value.message
    await a.settle(10)  # 50 unused tokens come back
    b = await limiter.admit(key, 60)
    assert int(b.headers["x-ratelimit-remaining-tokens"]) in range(28, 32)
    with pytest.raises(RateLimited) as exc:
        await limiter.admit(key, 101)
    assert "too large" in exc.value.message


async def test_concurrency_slot_frees_on_settle_and_cancel(sqlite_db, make_settings, make_key):
    limiter = Limiter(make_settings(), sqlite_db, None)
    # A quota makes settling wait for its ledger (a thread): a cancel can land mid-settle.
    key = make_key(sqlite_db, max_concurrency=2, monthly_token_quota=10**6)
    a, b = await limiter.admit(key, 1), await limiter.admit(key, 1)
    with pytest.raises(RateLimited, match="in flight") as refused:
        await limiter.admit(key, 1)
    assert rejection_reason(refused.value) == "concurrency"  # llmctl_rejections_total
    await a.settle(1)
    await a.settle(1)  # idempotent
    c = await limiter.admit(key, 1)

    task = asyncio.ensure_future(b.settle(0))
    await asyncio.sleep(0)  # the settle is under way...
    task.cancel()  # ...when its request is cancelled (a client disconnect)
    for _ in range(3):
        await asyncio.sleep(0)
    assert task.cancelled()
    d = await limiter.admit(key, 1)  # b's slot came back even though its task was cancelled
    for adm in (c, d):
        await adm.settle(0)


async def test_settle_without_remote_state_does_not_yield(sqlite_db, make_settings, make_key):
    """In-memory limits and no quota: settling is done before the first suspension, so
    neither a cancel nor another task can come between a request and its slot."""
    limiter = Limiter(make_settings(), sqlite_db, None)
    key = make_key(sqlite_db, max_concurrency=1)
    a = await limiter.admit(key, 1)
    task = asyncio.ensure_future(a.settle(0))
    await asyncio.sleep(0)
    assert task.done()
    await (await limiter.admit(key, 1)).settle(0)


@pytest.mark.redis
async def test_two_limiters_share_one_redis(sqlite_db, make_settings, make_key, redis_url):
    settings = make_settings(redis_url=redis_url, redis_enabled=True)
    key = make_key(sqlite_db, rpm=30, tpm=10**6, max_concurrency=100)
    handles = [RedisHandle(redis_url), RedisHandle(redis_url)]
    limiters = [Limiter(settings, sqlite_db, h) for h in handles]
    for h in handles:
        assert await h.connect()

    async def one(i):
        try:
            return await limiters[i % 2].admit(key, 5)
        except RateLimited as exc:
            return exc

    results = await asyncio.gather(*(one(i) for i in range(100)))
    ok = [r for r in results if not isinstance(r, Exception)]
    assert len(ok) == 30
    assert all(set(HEADERS) <= set(r.headers) for r in results if isinstance(r, Exception))
    assert sorted(int(a.headers["x-ratelimit-remaining-requests"]) for a in ok) == list(range(30))
    assert all(a.backend == "redis" for a in ok)
    # concurrency is shared too: 30 in flight against 100 allowed; settle frees the leases
    await asyncio.gather(*(a.settle(5) for a in ok))
    assert await handles[0].client.zcard(f"llmctl:lim:{{{key.id}}}:conc") == 0
    for lim, h in zip(limiters, handles, strict=True):
        await lim.close()
        await h.close()


@pytest.mark.redis
async def test_redis_down_falls_back_and_returns(sqlite_db, make_settings, make_key,
                                                redis_server, redis_url):
    settings = make_settings(redis_url=redis_url, redis_enabled=True)
    key = make_key(sqlite_db, rpm=4)
    handles = [RedisHandle(redis_url, retry_interval=0.2) for _ in range(2)]
    limiters = [Limiter(settings, sqlite_db, h) for h in handles]
    for h in handles:
        await h.connect()
    try:
        assert len((await admit_many(limiters[0], key, 2))[0]) == 2
        redis_server.stop()
        # per-process limits: each limiter admits 4 of its own
        for lim in limiters:
            ok, _ = await admit_many(lim, key, 6)
            assert len(ok) == 4 and all(a.backend == "local" for a in ok)
            st = lim.status()
            assert st["mode"] == "local-fallback" and not st["shared"]
            assert st["redis"]["error"] and st["redis"]["down_since"]
        redis_server.start()
        for _ in range(50):
            if all(h.available for h in handles):
                break
            await asyncio.sleep(0.1)
        assert all(lim.status()["mode"] == "redis" for lim in limiters)
        # shared again (a fresh Redis): 4 in total across both
        ok0, _ = await admit_many(limiters[0], key, 3)
        ok1, _ = await admit_many(limiters[1], key, 3)
        assert len(ok0) + len(ok1) == 4 and all(a.backend == "redis" for a in ok0 + ok1)
    finally:
        redis_server.start()
        for lim, h in zip(limiters, handles, strict=True):
            await lim.close()
            await h.close()


@pytest.mark.redis
async def test_fail_closed_refuses_limited_keys(sqlite_db, make_settings, make_key,
                                               redis_server, redis_url):
    settings = make_settings(redis_url=redis_url, redis_enabled=True, redis_fail_closed=True)
    limited, free = make_key(sqlite_db, name="l", rpm=100), make_key(sqlite_db, name="f")
    handle = RedisHandle(redis_url, fail_closed=True, retry_interval=0.2)
    limiter = Limiter(settings, sqlite_db, handle)
    await handle.connect()
    try:
        redis_server.stop()
        with pytest.raises(Unavailable) as exc:
            await limiter.admit(limited, 1)
        assert exc.value.status_code == 503 and exc.value.headers["Retry-After"] == "1"
        assert limiter.status()["mode"] == "closed"
        await (await limiter.admit(free, 1)).settle(1)  # no limits: no Redis needed
    finally:
        redis_server.start()
        await limiter.close()
        await handle.close()


async def test_quota_rejection_undoes_rate_admission(sqlite_db, make_settings, make_key):
    limiter = Limiter(make_settings(), sqlite_db, None)
    key = make_key(sqlite_db, rpm=10, monthly_token_quota=100)
    a = await limiter.admit(key, 80)
    with pytest.raises(QuotaExceeded) as exc:
        await limiter.admit(key, 30)
    assert exc.value.code == "insufficient_quota" and exc.value.status_code == 429
    assert exc.value.headers["x-ratelimit-remaining-requests"] == "9"
    assert int(exc.value.headers["Retry-After"]) >= 1
    await a.settle(50)
    b = await limiter.admit(key, 50)
    assert b.headers["x-ratelimit-remaining-requests"] == "8"
    await b.settle(50)
    with pytest.raises(QuotaExceeded):
        await limiter.admit(key, 1)
