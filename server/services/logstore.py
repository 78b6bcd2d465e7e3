"""Request logs: one row per API request, written in batches off the request path.

Requests hand a finished `RequestRecord` to `LogStore.submit()`, or `commit()` just
before the response's last byte. Either first appends it to the journal
(server/services/journal.py), so a record survives the process being killed. A
background task writes batches every `log_flush_interval` seconds; in the same
transaction it adds each row's tokens to `usage_monthly` and settles the request's
quota reservation (server/services/quotas.py), so usage and the quota always equal
the sum of the logs. A record that holds a quota reservation is written at once by
`commit()`, so the next request of the same key sees its quota settled.

Every write inserts under the record's unique `record_id` and settles only the rows it
inserted, so writing a record twice (a retry whose first attempt did commit, a
journal replay after a crash) changes nothing: each request counts exactly once.

While the database is down, records wait in memory up to `log_backlog_max`; past it
they are kept only in the journal ("spilled") and replayed from there when the
database is back. A failed write is retried with the same rows. `close()` writes
everything still queued; whatever it cannot write stays in the journal for the next
start.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime
from operator import attrgetter
from pathlib import Path

from sqlalchemy import bindparam, update
from sqlalchemy.dialects import postgresql, sqlite

from server import metrics
from server.db.tables import ApiKey, RequestLog, UsageMonthly, utcnow
from server.services import journal as journals
from server.services import quotas
from server.services.journal import Journal, Segment

log = logging.getLogger("llmctl.logs")


@dataclass
class RequestRecord:
    """What one request did; filled in along the serving path."""

    request_id: str
    route: str
    # Unique per record, unlike request_id (a client may choose that): what makes
    # writing a record twice insert it once.
    record_id: str = field(default_factory=lambda: os.urandom(16).hex())
    created_at: datetime = field(default_factory=utcnow)
    key_id: int | None = None
    model: str | None = None
    status: int = 0
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    charged_tokens: int = 0
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    cached: bool = False
    cache_status: str | None = None
    finish_reason: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    backend: str | None = None  # "model/backend" that answered (models with replicas)
    attempts: int | None = None  # backend attempts it took (models with replicas)
    prompt: str | None = None
    output: str | None = None
    # Set when the request holds a quota reservation (named by record_id) for this
    # month: writing the record charges charged_tokens and releases it.
    reserved_month: str | None = None


# The created_at column last, so that SQLite's copy of a row is the row plus its stamp.
_COLUMNS = (*(k for k in RequestLog.__table__.columns.keys() if k not in ("id", "created_at")),
            "created_at")
_FIELDS = attrgetter(*_COLUMNS[:-1])


_USAGE = ("requests", "cached_requests", "prompt_tokens", "completion_tokens",
          "charged_tokens")


@functools.lru_cache(maxsize=4)
def _usage_upsert(dialect: str):
    """One row's upsert into usage_monthly, with bound parameters: built once, so a
    batch runs it as an executemany without compiling a statement each time."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(UsageMonthly).values(
        {c: bindparam(c) for c in ("key_id", "month", "model", *_USAGE)})
    added = {c: getattr(UsageMonthly, c) + getattr(stmt.excluded, c) for c in _USAGE}
    return stmt.on_conflict_do_update(index_elements=["key_id", "month", "model"], set_=added)


_TOUCH_KEY = (update(ApiKey).where(ApiKey.id == bindparam("k"))
              .values(last_used_at=bindparam("t")))


# Rows per INSERT statement: 21 columns x 200 rows stays far below SQLite's (32,766)
# and Postgres's (65,535) limits on bound parameters.
_ROWS_PER_INSERT = 200


@functools.lru_cache(maxsize=16)
def _insert_sql(paramstyle: str, rows: int) -> str:
    mark = "?" if paramstyle == "qmark" else "%s"
    row = f"({', '.join(mark for _ in _COLUMNS)})"
    return (f"INSERT INTO {RequestLog.__tablename__} ({', '.join(_COLUMNS)}) "
            f"VALUES {', '.join(row for _ in range(rows))} "
            "ON CONFLICT (record_id) DO NOTHING RETURNING record_id")


def _insert_rows(conn, dialect, records: list[RequestRecord]) -> set[str]:
    """The rows, as multi-row INSERTs of plain driver parameters.

    This runs in a thread beside the event loop, so what matters is how long it holds
    the GIL and how often it hands it over. SQLAlchemy's per-row bind processing held
    it ~3x longer than the insert itself; a driver executemany gives it up and takes
    it back around every row, which is a thread switch for the event loop each time.
    One statement per 200 rows binds in C and releases the GIL once. The only value
    that needs converting is the timestamp on SQLite, stored as SQLAlchemy stores it
    (ISO, microseconds). Returns the record ids inserted: those not already there."""
    sqlite_dates = dialect.name == "sqlite"
    inserted: set[str] = set()
    for i in range(0, len(records), _ROWS_PER_INSERT):
        chunk = records[i:i + _ROWS_PER_INSERT]
        params: list = []
        for r in chunk:
            params += _FIELDS(r)
            params.append(r.created_at.isoformat(" ", "microseconds") if sqlite_dates
                          else r.created_at)
        inserted.update(row[0] for row in conn.exec_driver_sql(
            _insert_sql(dialect.paramstyle, len(chunk)), tuple(params)))
    return inserted


def write_batch(db, records: list[RequestRecord]) -> int:
    """Insert the rows that are not there yet and, for those only, add them to monthly
    usage, settle their quota reservations and touch keys' last use: one transaction.
    Returns how many were new."""
    dialect = db.engine.dialect
    with db.session() as s:
        conn = s.connection()  # Core executemany; the ORM would treat these as bulk ops
        inserted = _insert_rows(conn, dialect, records)
        if len(inserted) < len(records):  # some were written before (or twice in this batch)
            records = [r for r in records if r.record_id in inserted
                       and not inserted.discard(r.record_id)]
        _account(conn, dialect, records)
    return len(records)


def _account(conn, dialect, records: list[RequestRecord]) -> None:
    """Usage, quota settlement and last use for newly inserted rows. Rows are updated in
    key order, so two writers (replicas, a replay) cannot deadlock each other."""
    usage: dict[tuple, list[int]] = {}
    last_used: dict[int, datetime] = {}
    for r in records:
        if r.key_id is None:
            continue
        if r.key_id not in last_used or last_used[r.key_id] < r.created_at:
            last_used[r.key_id] = r.created_at
        # Failed requests add nothing, except a client that left mid-stream: what it
        # was charged for must show in usage too.
        if r.model is None or (r.status >= 400 and not r.charged_tokens):
            continue
        when = r.created_at
        slot = (r.key_id, when.year, when.month, r.model)
        u = usage.get(slot)
        if u is None:
            u = usage[slot] = [0, 0, 0, 0, 0]
        u[0] += 1
        u[1] += r.cached
        u[2] += r.prompt_tokens
        u[3] += r.completion_tokens
        u[4] += r.charged_tokens
    if usage:
        conn.execute(_usage_upsert(dialect.name), [
            {"key_id": k, "month": f"{y:04d}-{m:02d}", "model": model,
             **dict(zip(_USAGE, v, strict=True))} for (k, y, m, model), v in sorted(usage.items())])
    quotas.settle_in(conn, [(r.record_id, r.key_id, r.reserved_month, r.charged_tokens)
                            for r in records if r.reserved_month and r.key_id is not None])
    if last_used:
        conn.execute(_TOUCH_KEY, [{"k": k, "t": t} for k, t in sorted(last_used.items())])


class LogStore:
    def __init__(self, db, *, interval: float = 0.25, batch_size: int = 500,
                 keep_text: bool = False, journal_dir: Path | None = None,
                 max_backlog: int = 20_000):
        self.db = db
        self.interval = interval
        self.batch_size = batch_size
        self.keep_text = keep_text
        self.max_backlog = max_backlog
        self.journal = Journal(journal_dir) if journal_dir is not None else None
        # Records waiting in memory, each with the journal segment that holds it.
        self._pending: list[tuple[RequestRecord, Segment | None]] = []
        self._submitted = self._written = 0  # running counts: what flush() has to reach
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._stopping = False
        self._db_down = False  # the last write failed: commit() queues instead of writing

    def start(self) -> None:
        if self.journal is not None:
            adopted = self.journal.open()
            if adopted:
                log.warning("replaying %d request-log records left by a gateway that stopped "
                            "before writing them", sum(s.on_disk_only for s in adopted))
            self._gauges()
        self._task = asyncio.create_task(self._run(), name="llmctl-logstore")

    def _journaled(self, record: RequestRecord) -> Segment | None:
        if not self.keep_text:
            record.prompt = record.output = None
        if self.journal is None:
            return None
        try:
            return self.journal.append(record)
        except OSError as exc:  # a full disk must not fail the request: keep it in memory
            log.error("request journal write failed, record %s kept in memory only: %s",
                      record.request_id, exc)
            return None

    def submit(self, record: RequestRecord) -> None:
        """Journal the record and queue it for the next batch (no waiting)."""
        self._enqueue(record, self._journaled(record))

    def _enqueue(self, record: RequestRecord, seg: Segment | None) -> None:
        if seg is not None and len(self._pending) >= self.max_backlog:
            seg.on_disk_only += 1  # spilled: the journal holds it until the replay
            metrics.LOG_SPILLED.inc()
        else:
            self._pending.append((record, seg))
            self._submitted += 1
            if len(self._pending) >= self.batch_size:
                self._wake.set()
        self._gauges()

    async def commit(self, record: RequestRecord) -> None:
        """Journal the record and, when it settles a quota reservation and the database
        is up, write it now (before the response completes); otherwise queue it."""
        seg = self._journaled(record)
        if record.reserved_month is None or self._db_down:
            self._enqueue(record, seg)
            return
        # Shielded: the write and its bookkeeping finish even if the request is cancelled.
        await asyncio.shield(asyncio.ensure_future(self._write_now(record, seg)))

    async def _write_now(self, record: RequestRecord, seg: Segment | None) -> None:
        try:
            await asyncio.to_thread(write_batch, self.db, [record])
        except Exception as exc:  # noqa: BLE001 - the writer retries it with the rest
            self._db_down = True
            log.warning("request-log write failed, record queued for retry: %s", exc)
            self._enqueue(record, seg)
            return
        metrics.LOG_ROWS_WRITTEN.inc()
        if seg is not None:
            self.journal.done(seg)

    @property
    def pending(self) -> int:
        """Records not yet written: in memory and spilled to the journal."""
        return len(self._pending) + self.spilled

    @property
    def spilled(self) -> int:
        if self.journal is None:
            return 0
        return sum(s.on_disk_only for s in self.journal.sealed) + (
            self.journal.active.on_disk_only if self.journal.active else 0)

    def _gauges(self) -> None:
        metrics.LOG_BACKLOG.set(len(self._pending))
        metrics.LOG_SPILL_PENDING.set(self.spilled)

    async def flush(self) -> None:
        """Write everything submitted before this call (also used by tests and usage
        queries), then replay what was spilled. Rows submitted while it writes wait for
        the next one: under steady load a writer that chased them would commit a few
        rows at a time, paying a transaction's fixed cost per handful of requests (and
        holding the GIL the event loop needs)."""
        upto = self._submitted
        async with self._lock:
            while self._written < upto and self._pending:
                batch = self._pending[: min(self.batch_size, upto - self._written)]
                await asyncio.to_thread(write_batch, self.db, [r for r, _ in batch])
                del self._pending[: len(batch)]
                self._written += len(batch)
                metrics.LOG_ROWS_WRITTEN.inc(len(batch))
                for _, seg in batch:
                    if seg is not None:
                        self.journal.done(seg)
                self._gauges()
            await self._replay()
            self._db_down = False

    async def _replay(self) -> None:
        """Write the spilled records (and those of adopted segments) from the journal."""
        if self.journal is None:
            return
        if self.journal.active is not None and self.journal.active.on_disk_only:
            self.journal.seal()
        for seg in self.journal.to_replay():
            records = await asyncio.to_thread(journals.read, seg.path, RequestRecord)
            for i in range(0, len(records), self.batch_size):
                new = await asyncio.to_thread(write_batch, self.db,
                                              records[i:i + self.batch_size])
                metrics.LOG_ROWS_WRITTEN.inc(new)
            replayed, seg.on_disk_only = seg.on_disk_only, 0
            self.journal.done(seg, replayed)
            self._gauges()

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:  # keep the rows; try again next tick
                self._db_down = True
                metrics.DATABASE_ERRORS.labels("log_write").inc()
                log.warning("request-log write failed (%d rows kept for retry): %s",
                            self.pending, exc)
                await asyncio.sleep(min(5.0, self.interval * 4))
                continue
            active = self.journal.active if self.journal is not None else None
            if active is not None and active.outstanding <= 0:
                self.journal.seal()  # all of it is written: the file goes

    async def close(self) -> None:
        # Never cancel a write in progress: its thread would commit anyway and the
        # final flush would insert the same rows twice. Ask the loop to stop instead.
        self._stopping = True
        self._wake.set()
        if self._task:
            await self._task
        try:
            for attempt in range(3):
                try:
                    await self.flush()
                    return
                except Exception as exc:
                    metrics.DATABASE_ERRORS.labels("log_write").inc()
                    log.error("request-log final flush failed (attempt %d): %s",
                              attempt + 1, exc)
                    await asyncio.sleep(0.5)
            if self.journal is None:  # nowhere else to keep them
                metrics.LOG_ROWS_DROPPED.inc(self.pending)
                log.error("request-log: %d rows could not be written and are lost",
                          self.pending)
        finally:
            if self.journal is not None:
                self.journal.close()  # what is left is replayed by the next start
