"""Monthly quotas: reservation by conditional UPDATE, on SQLite and Postgres."""

from __future__ import annotations

import asyncio
import random

from server.errors import QuotaExceeded
from server.services import quotas
from server.services.limits import Limiter


async def test_concurrent_requests_never_overshoot(database, make_settings, make_key):
    """50 requests at once against a quota that fits 10 reservations."""
    limiter = Limiter(make_settings(), database, None)
    key = make_key(database, monthly_token_quota=1000)
    month = quotas.current_month()
    rng = random.Random(4)
    peak = 0

    async def one(i):
        nonlocal peak
        try:
            adm = await limiter.admit(key, 100)
        except QuotaExceeded:
            return None
        used, reserved = quotas.ledger(database, key.id, month)
        peak = max(peak, used + reserved)
        await asyncio.sleep(rng.random() / 50)
        charged = rng.randint(40, 100)
        await adm.settle(charged)
        return charged

    results = await asyncio.gather(*(one(i) for i in range(50)))
    charged = [c for c in results if c is not None]
    used, reserved = quotas.ledger(database, key.id, month)
    assert reserved == 0 and peak <= 1000
    assert used == sum(charged) <= 1000
    assert 10 <= len(charged) < 50
    status = quotas.get_quota(database, make_settings(), key.name)
    assert status.used_tokens == used and status.remaining_tokens == 1000 - used


def test_reserve_is_conditional(database):
    from server.services import keys

    key = keys.create_key(database, name="q").key
    month = "2031-01"

    def reserve(rid, n):
        return quotas.reserve(database, key.id, month, n, 100, record_id=rid, lease=60)

    assert reserve("a", 60)
    assert not reserve("b", 41)
    assert reserve("c", 40)
    quotas.settle(database, "a", key.id, month, 10)
    assert quotas.ledger(database, key.id, month) == (10, 40)
    quotas.settle(database, "a", key.id, month, 0)  # settled already: nothing to release
    assert quotas.ledger(database, key.id, month) == (10, 40)
    assert reserve("d", 50)
    assert quotas.ledger(database, key.id, month) == (10, 90)


def test_status_shape_and_resync(sqlite_db, make_settings, make_key):
    from server.db.tables import UsageMonthly

    settings = make_settings(default_rpm=60)
    key = make_key(sqlite_db, name="s", tpm=500)
    month = quotas.current_month()
    with sqlite_db.session() as s:  # usage already logged while the key had no quota
        s.add(UsageMonthly(key_id=key.id, month=month, model="m", requests=3, cached_requests=0,
                           prompt_tokens=20, completion_tokens=10, charged_tokens=30))
    status = quotas.get_quota(sqlite_db, settings, "s").to_dict()
    assert status == {
        "key_id": key.id, "key_name": "s", "key_prefix": key.prefix, "role": "user",
        "month": month, "monthly_token_quota": 0, "used_tokens": 30, "reserved_tokens": 0,
        "remaining_tokens": None, "resets_at": status["resets_at"], "rpm": 60, "tpm": 500,
        "max_concurrency": 0, "own_limits": ["tpm"],
    }
    assert status["resets_at"].endswith("-01T00:00:00Z")
    after = quotas.set_limits(sqlite_db, settings, key.prefix, monthly_token_quota=100, rpm=5)
    assert (after.used_tokens, after.remaining_tokens, after.rpm) == (30, 70, 5)
    assert quotas.ledger(sqlite_db, key.id, month) == (30, 0)
    assert [q.key_name for q in quotas.list_quotas(sqlite_db, settings)] == ["s"]


def test_next_month_start():
    assert quotas.next_month_start("2026-12").isoformat() == "2027-01-01T00:00:00"
    assert quotas.next_month_start("2026-02").isoformat() == "2026-03-01T00:00:00"
