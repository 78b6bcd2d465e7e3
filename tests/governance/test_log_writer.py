"""The request-log writer: rows land exactly as recorded (SQLite and Postgres), usage
adds up, and a flush writes what was submitted before it, not what arrives during it."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from sqlalchemy import select

from server.db.tables import ApiKey, RequestLog, UsageMonthly
from server.services import keys, logstore
from server.services.logstore import LogStore, RequestRecord, write_batch


def records(key_ids: list[int], n: int, tag: str = "req") -> list[RequestRecord]:
    start = datetime(2026, 10, 31, 23, 59, 0, 123456)
    out = []
    for i in range(n):
        failed = i % 7 == 0
        out.append(RequestRecord(
            request_id=f"{tag}_{i:05d}", route="/v1/completions", key_id=key_ids[i % 2],
            created_at=start + timedelta(seconds=i, microseconds=i),  # spans two months
            model=None if i % 11 == 0 else ("tiny" if i % 3 else "small"),
            status=500 if failed else 200, stream=i % 5 == 0, prompt_tokens=i % 13,
            completion_tokens=i % 17, charged_tokens=0 if failed else i % 19,
            latency_ms=i / 7, ttft_ms=None if i % 2 else i / 3, cached=i % 4 == 0,
            cache_status=("hit", "miss", "bypass", None)[i % 4],
            finish_reason="length" if i % 2 else None,
            error_type="server_error" if failed else None,
            error_message="boom ünïcode" if failed else None, prompt=None,
            output="out" if i % 9 == 0 else None))
    return out


def test_rows_land_as_recorded(database):
    a = keys.create_key(database, name="a").key.id
    b = keys.create_key(database, name="b").key.id
    recs = records([a, b], 450)  # more than one multi-row INSERT
    write_batch(database, recs)
    with database.session() as s:
        rows = {r.request_id: r for r in s.scalars(select(RequestLog))}
        usage = {(u.key_id, u.month, u.model): u for u in s.scalars(select(UsageMonthly))}
        last_used = dict(s.execute(select(ApiKey.id, ApiKey.last_used_at)).all())
    assert len(rows) == len(recs)
    columns = [c for c in RequestLog.__table__.columns.keys() if c != "id"]
    for r in recs:
        row = rows[r.request_id]
        assert {c: getattr(row, c) for c in columns} == {c: getattr(r, c) for c in columns}

    want: dict[tuple, list[int]] = {}
    for r in recs:
        if r.model is None or (r.status >= 400 and not r.charged_tokens):
            continue
        u = want.setdefault((r.key_id, r.created_at.strftime("%Y-%m"), r.model), [0] * 5)
        for i, v in enumerate((1, int(r.cached), r.prompt_tokens, r.completion_tokens,
                               r.charged_tokens)):
            u[i] += v
    assert {k: [u.requests, u.cached_requests, u.prompt_tokens, u.completion_tokens,
                u.charged_tokens] for k, u in usage.items()} == want
    assert {k[1] for k in want} == {"2026-10", "2026-11"}
    assert last_used == {k: max(r.created_at for r in recs if r.key_id == k) for k in (a, b)}

    write_batch(database, records([a, b], 3, "more")[1:])  # more usage for the same rows adds up
    with database.session() as s:
        assert s.scalar(select(UsageMonthly.requests).where(
            UsageMonthly.key_id == b, UsageMonthly.model == "tiny",
            UsageMonthly.month == "2026-10")) == want[(b, "2026-10", "tiny")][0] + 1


async def test_a_flush_does_not_chase_rows_submitted_while_it_writes(sqlite_db, monkeypatch):
    store = LogStore(sqlite_db, interval=3600)
    written: list[list[str]] = []
    late = RequestRecord(request_id="late", route="/v1/x")

    def write(db, batch):
        written.append([r.request_id for r in batch])
        if len(written) == 1:
            store.submit(late)  # arrives while the first flush is writing

    monkeypatch.setattr(logstore, "write_batch", write)
    for i in range(3):
        store.submit(RequestRecord(request_id=f"r{i}", route="/v1/x"))
    await store.flush()
    assert written == [["r0", "r1", "r2"]] and store.pending == 1
    await store.flush()
    assert written[1] == ["late"] and store.pending == 0
    await asyncio.sleep(0)
