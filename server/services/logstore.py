"""Request logs: one row per API request, written in batches off the request path.

Requests hand a finished `RequestRecord` to `LogStore.submit()` (no I/O). A
background task writes batches every `log_flush_interval` seconds; in the same
transaction it adds each row's tokens to `usage_monthly`, so usage always equals
the sum of the logs. `close()` writes everything still queued: a graceful shutdown
loses nothing. A failed write is retried with the same rows.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass, field
from datetime import datetime
from operator import attrgetter

from sqlalchemy import bindparam, update
from sqlalchemy.dialects import postgresql, sqlite

from server import metrics
from server.db.tables import ApiKey, RequestLog, UsageMonthly, utcnow

log = logging.getLogger("llmctl.logs")


@dataclass
class RequestRecord:
    """What one request did; filled in along the serving path."""

    request_id: str
    route: str
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
            f"VALUES {', '.join(row for _ in range(rows))}")


def _insert_rows(conn, dialect, records: list[RequestRecord]) -> None:
    """The rows, as multi-row INSERTs of plain driver parameters.

    This runs in a thread beside the event loop, so what matters is how long it holds
    the GIL and how often it hands it over. SQLAlchemy's per-row bind processing held
    it ~3x longer than the insert itself; a driver executemany gives it up and takes
    it back around every row, which is a thread switch for the event loop each time.
    One statement per 200 rows binds in C and releases the GIL once. The only value
    that needs converting is the timestamp on SQLite, stored as SQLAlchemy stores it
    (ISO, microseconds)."""
    sqlite_dates = dialect.name == "sqlite"
    for i in range(0, len(records), _ROWS_PER_INSERT):
        chunk = records[i:i + _ROWS_PER_INSERT]
        params: list = []
        for r in chunk:
            params += _FIELDS(r)
            params.append(r.created_at.isoformat(" ", "microseconds") if sqlite_dates
                          else r.created_at)
        conn.exec_driver_sql(_insert_sql(dialect.paramstyle, len(chunk)), tuple(params))


def write_batch(db, records: list[RequestRecord]) -> None:
    """Insert the rows, add them to monthly usage and touch keys' last use: one transaction."""
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
    dialect = db.engine.dialect
    with db.session() as s:
        conn = s.connection()  # Core executemany; the ORM would treat these as bulk ops
        _insert_rows(conn, dialect, records)
        if usage:
            conn.execute(_usage_upsert(dialect.name), [
                {"key_id": k, "month": f"{y:04d}-{m:02d}", "model": model,
                 **dict(zip(_USAGE, v, strict=True))} for (k, y, m, model), v in usage.items()])
        if last_used:
            conn.execute(_TOUCH_KEY, [{"k": k, "t": t} for k, t in last_used.items()])


class LogStore:
    def __init__(self, db, *, interval: float = 0.25, batch_size: int = 500,
                 keep_text: bool = False):
        self.db = db
        self.interval = interval
        self.batch_size = batch_size
        self.keep_text = keep_text
        self._pending: list[RequestRecord] = []
        self._submitted = self._written = 0  # running counts: what flush() has to reach
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="llmctl-logstore")

    def submit(self, record: RequestRecord) -> None:
        if not self.keep_text:
            record.prompt = record.output = None
        self._pending.append(record)
        self._submitted += 1
        if len(self._pending) >= self.batch_size:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush(self) -> None:
        """Write everything submitted before this call (also used by tests and usage
        queries). Rows submitted while it writes wait for the next one: under steady
        load a writer that chased them would commit a few rows at a time, paying a
        transaction's fixed cost per handful of requests (and holding the GIL the
        event loop needs)."""
        upto = self._submitted
        async with self._lock:
            while self._written < upto and self._pending:
                batch = self._pending[: min(self.batch_size, upto - self._written)]
                await asyncio.to_thread(write_batch, self.db, batch)
                del self._pending[: len(batch)]
                self._written += len(batch)
                metrics.LOG_ROWS_WRITTEN.inc(len(batch))

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
                metrics.DATABASE_ERRORS.labels("log_write").inc()
                log.warning("request-log write failed (%d rows kept for retry): %s",
                            len(self._pending), exc)
                await asyncio.sleep(min(5.0, self.interval * 4))

    async def close(self) -> None:
        # Never cancel a write in progress: its thread would commit anyway and the
        # final flush would insert the same rows twice. Ask the loop to stop instead.
        self._stopping = True
        self._wake.set()
        if self._task:
            await self._task
        for attempt in range(3):
            try:
                await self.flush()
                return
            except Exception as exc:
                metrics.DATABASE_ERRORS.labels("log_write").inc()
                log.error("request-log final flush failed (attempt %d): %s", attempt + 1, exc)
                await asyncio.sleep(0.5)
        metrics.LOG_ROWS_DROPPED.inc(len(self._pending))
        log.error("request-log: %d rows could not be written and are lost", len(self._pending))
