"""The ledger's exactly-once rules: concurrent first reservations of a month, a log
record written twice, leases that expire, the journal spilled during a real Postgres
outage and left behind by a process that died."""

from __future__ import annotations

import os
import threading

from sqlalchemy import func, select

from server.db import migrate
from server.db.engine import Database
from server.db.tables import QuotaReservation, RequestLog, UsageMonthly
from server.services import keys, quotas
from server.services.logstore import LogStore, RequestRecord, write_batch


def test_first_requests_of_a_month_never_refuse_each_other(pg_url):
    """Issue 15, done when 5: 30 concurrent first requests of a fresh key on Postgres,
    no refusal, over 20 repetitions."""
    db = Database(pg_url)
    migrate.upgrade(db, "head")
    month = quotas.current_month()
    for rep in range(20):
        key = keys.create_key(db, name=f"fresh{rep}").key
        barrier = threading.Barrier(30)
        held: list[int | None] = []

        def first(i, key=key, barrier=barrier, held=held, rep=rep):
            barrier.wait()
            held.append(quotas.reserve(db, key.id, month, 100, 10**8,
                                       record_id=f"{rep}-{i}", lease=60))

        threads = [threading.Thread(target=first, args=(i,)) for i in range(30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # Each reservation sees the month's committed tokens with its own 100 added:
        # all 30 held, each exactly once.
        assert sorted(held, key=lambda h: -1 if h is None else h) == \
            list(range(100, 3001, 100)), f"repetition {rep}: {held.count(None)} refused"
        assert quotas.ledger(db, key.id, month) == (0, 3000)
    db.dispose()


def record(rid: str, key_id: int, month: str | None, charged: int) -> RequestRecord:
    return RequestRecord(request_id=rid, record_id=rid, route="/v1/completions", key_id=key_id,
                         model="tiny",
                         status=200, prompt_tokens=charged // 2,
                         completion_tokens=charged - charged // 2, charged_tokens=charged,
                         reserved_month=month)


def totals(db, key_id: int) -> tuple[int, int, int]:
    """(log rows, their charged tokens, usage's charged tokens) for a key."""
    with db.session() as s:
        rows, logged = s.execute(select(func.count(), func.coalesce(func.sum(
            RequestLog.charged_tokens), 0)).where(RequestLog.key_id == key_id)).one()
        usage = s.scalar(select(func.coalesce(func.sum(UsageMonthly.charged_tokens), 0))
                         .where(UsageMonthly.key_id == key_id))
    return rows, logged, usage


def test_a_record_settles_once_however_often_it_is_written(database):
    key = keys.create_key(database, name="q").key
    month = quotas.current_month()
    assert quotas.reserve(database, key.id, month, 100, 1000, record_id="r1", lease=60)
    r1 = record("r1", key.id, month, 40)
    assert write_batch(database, [r1, r1]) == 1  # twice in one batch
    assert write_batch(database, [r1]) == 0  # a retry, a replay
    assert quotas.ledger(database, key.id, month) == (40, 0)
    assert totals(database, key.id) == (1, 40, 40)

    # A lease that ran out (its gateway died) is reclaimed by anyone; the record,
    # replayed later, still charges what was served and releases nothing twice.
    assert quotas.reserve(database, key.id, month, 100, 1000, record_id="r2", lease=-1)
    assert quotas.reserve(database, key.id, month, 100, 1000, record_id="r3", lease=60)
    assert quotas.ledger(database, key.id, month) == (40, 200)
    assert quotas.reclaim_expired(database) == 1
    assert quotas.ledger(database, key.id, month) == (40, 100)
    assert write_batch(database, [record("r2", key.id, month, 30)]) == 1
    assert quotas.ledger(database, key.id, month) == (70, 100)
    quotas.renew(database, ["r3"], 60)
    assert quotas.reclaim_expired(database) == 0
    with database.session() as s:
        assert s.scalars(select(QuotaReservation.record_id)).all() == ["r3"]
    assert totals(database, key.id) == (2, 70, 70)


async def test_spill_during_a_postgres_outage_and_replay(postgres_server, tmp_path):
    """Past the in-memory bound, records wait only in the journal while Postgres is
    stopped, and each lands once when it is back."""
    url = postgres_server.create_database()
    db = Database(url)
    migrate.upgrade(db, "head")
    key = keys.create_key(db, name="k").key
    month = quotas.current_month()
    for i in range(4):
        assert quotas.reserve(db, key.id, month, 50, 10**6, record_id=f"q{i}", lease=60)
    store = LogStore(db, interval=3600, max_backlog=3, journal_dir=tmp_path / "journal")
    store.start()
    try:
        postgres_server.stop()
        for i in range(4):  # hold reservations: commit() tries to write them at once
            await store.commit(record(f"q{i}", key.id, month, 10 + i))
        for i in range(6):
            store.submit(record(f"p{i}", key.id, None, 5))
        assert (len(store._pending), store.spilled) == (3, 7)
        try:
            await store.flush()
            raise AssertionError("the flush should have failed: Postgres is down")
        except Exception as exc:  # noqa: BLE001
            assert "unreachable" in str(exc)
    finally:
        postgres_server.start()
    await store.flush()
    assert store.pending == 0
    assert totals(db, key.id) == (10, 4 * 10 + 6 + 30, 76)
    assert quotas.ledger(db, key.id, month) == (46, 0)
    await store.close()
    assert os.listdir(tmp_path / "journal") == []
    db.dispose()


async def test_a_dead_writers_journal_is_replayed_once(sqlite_db, tmp_path):
    key = keys.create_key(sqlite_db, name="k").key
    journal = tmp_path / "journal"
    dead = LogStore(sqlite_db, interval=3600, journal_dir=journal)
    dead.start()
    recs = [record(f"r{i}", key.id, None, 7) for i in range(5)]
    for r in recs:
        dead.submit(r)
    write_batch(sqlite_db, recs[:2])  # these reached the database before the "crash"
    segment = dead.journal.active.path
    with open(segment, "ab") as f:
        f.write(b'{"request_id": "cut sh')  # the line being written when it died
    dead._task.cancel()
    os.close(dead.journal._lock_fd)  # what the kernel does when the process dies

    heir = LogStore(sqlite_db, interval=3600, journal_dir=journal)
    heir.start()
    assert heir.spilled == 5  # every complete line; the one cut short is skipped
    await heir.flush()
    assert totals(sqlite_db, key.id) == (5, 35, 35)
    await heir.close()
    assert os.listdir(journal) == []
