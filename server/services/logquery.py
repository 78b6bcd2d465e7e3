"""Reading the request log: search, show, tail/follow, export, prune.

Searches are keyset-paginated, newest first, on (created_at, id): each page is one
index range scan that stops after `limit` rows, so page 1 and page 10,000 cost
the same on a million rows. The filters map onto the table's indexes
(key_id+created_at, model+created_at, status+created_at, created_at).

A log entry as returned (`search` leaves out `prompt` and `output`):

    {"id", "request_id", "created_at", "key_id", "key_name", "model", "route",
     "status", "stream", "prompt_tokens", "completion_tokens", "total_tokens",
     "charged_tokens", "latency_ms", "ttft_ms", "cached", "cache_status",
     "finish_reason", "error_type", "error_message"[, "backend", "attempts", "prompt",
     "output"]}

`show` and `export` add the backend that answered and the attempts it took (models
with replicas) to the prompt and output.

A search result: {"items": [entry, ...], "next_cursor": str | null, "limit": int}.
"""

from __future__ import annotations

import base64
import csv
import json
import re
from collections import deque
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import IO

from sqlalchemy import and_, delete, func, or_, select

from server.db.tables import ApiKey, RequestLog, utcnow
from server.errors import InvalidRequest, NotFound
from server.services import keys as keysvc
from server.validation import INT64_MAX, check_int, is_int, parse_duration

MAX_LIMIT = 1000
FIELDS = ("id", "request_id", "created_at", "key_id", "key_name", "model", "route", "status",
          "stream", "prompt_tokens", "completion_tokens", "total_tokens", "charged_tokens",
          "latency_ms", "ttft_ms", "cached", "cache_status", "finish_reason", "error_type",
          "error_message")
FULL_FIELDS = (*FIELDS, "backend", "attempts", "prompt", "output")
_STATUS_CLASS = re.compile(r"^([1-5])xx$")


# ----- parsing filters

def parse_time(value: str | datetime | None, param: str) -> datetime | None:
    """ISO 8601 (date or date-time, any offset → naive UTC) or a relative age like 15m, 7d."""
    if value is None or isinstance(value, datetime):
        return value.astimezone(UTC).replace(tzinfo=None) if value and value.tzinfo else value
    text = value.strip()
    if re.fullmatch(r"[0-9]+\s*[smhdw]", text, re.ASCII):
        return utcnow() - parse_duration(text, param=param)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"{param}: {value!r} is not an ISO date-time or an age like 15m, "
                             "24h, 7d", param=param) from None
    try:
        return parsed.astimezone(UTC).replace(tzinfo=None) if parsed.tzinfo else parsed
    except OverflowError:  # year 1 with a positive offset, year 9999 with a negative one
        raise InvalidRequest(f"{param}: {value!r} is out of range in UTC", param=param) from None


def status_condition(status: str | int | None):
    """'200', '4xx', 'error' (>= 400) or 'ok' (< 400) → a WHERE clause, or None."""
    if status is None or status == "":
        return None
    text = str(status).strip().lower()
    if is_int(text):
        return RequestLog.status == int(text)
    if match := _STATUS_CLASS.match(text):
        low = int(match.group(1)) * 100
        return RequestLog.status.between(low, low + 99)
    if text in ("error", "errors"):
        return RequestLog.status >= 400
    if text == "ok":
        return RequestLog.status < 400
    raise InvalidRequest(f"status: {status!r} is not a code (429), a class (4xx), 'ok' or "
                         "'error'", param="status")


def _encode_cursor(created_at: datetime, row_id: int) -> str:
    raw = json.dumps([created_at.isoformat(), row_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, row_id = json.loads(raw)
        if not isinstance(row_id, int) or not 0 <= row_id <= INT64_MAX:
            raise ValueError(row_id)
        return datetime.fromisoformat(created), row_id
    except (ValueError, TypeError):
        raise InvalidRequest("cursor: not a cursor returned by a previous page",
                             param="cursor") from None


def _filters(s, *, key=None, model=None, status=None, since=None, until=None) -> list:
    conds = []
    if key is not None:
        conds.append(RequestLog.key_id == keysvc._find_row(s, key).id)
    if model is not None:
        conds.append(RequestLog.model == model)
    if (cond := status_condition(status)) is not None:
        conds.append(cond)
    if (start := parse_time(since, "since")) is not None:
        conds.append(RequestLog.created_at >= start)
    if (end := parse_time(until, "until")) is not None:
        conds.append(RequestLog.created_at < end)
    return conds


# ----- rendering

def _names(s, rows) -> dict[int, str]:
    ids = {r.key_id for r in rows if r.key_id is not None}
    if not ids:
        return {}
    return dict(s.execute(select(ApiKey.id, ApiKey.name).where(ApiKey.id.in_(ids))).tuples().all())


def _entry(row: RequestLog, names: dict[int, str], full: bool = False) -> dict:
    data = {f: getattr(row, f) for f in FIELDS if hasattr(RequestLog, f)}
    data["created_at"] = row.created_at.isoformat() + "Z"
    data["key_name"] = names.get(row.key_id)
    data["total_tokens"] = (row.prompt_tokens or 0) + (row.completion_tokens or 0)
    ordered = {f: data[f] for f in FIELDS}
    if full:
        ordered.update(backend=row.backend, attempts=row.attempts, prompt=row.prompt,
                       output=row.output)
    return ordered


# ----- queries

def search(db, *, key: str | int | None = None, model: str | None = None,
           status: str | int | None = None, since=None, until=None, limit: int = 50,
           cursor: str | None = None) -> dict:
    """One page of matching log entries, newest first; pass `next_cursor` for the next."""
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest(f"limit: must be between 1 and {MAX_LIMIT}", param="limit")
    with db.session() as s:
        conds = _filters(s, key=key, model=model, status=status, since=since, until=until)
        if cursor:
            at, row_id = _decode_cursor(cursor)
            # The redundant `<=` gives both databases an index range bound.
            conds.append(and_(RequestLog.created_at <= at, or_(
                RequestLog.created_at < at, RequestLog.id < row_id)))
        query = (select(RequestLog).where(*conds)
                 .order_by(RequestLog.created_at.desc(), RequestLog.id.desc()).limit(limit + 1))
        rows = list(s.scalars(query))
        more = len(rows) > limit
        rows = rows[:limit]
        names = _names(s, rows)
        items = [_entry(r, names) for r in rows]
    last = rows[-1] if rows else None
    return {"items": items,
            "next_cursor": _encode_cursor(last.created_at, last.id) if more and last else None,
            "limit": limit}


def show(db, request_id: str) -> dict:
    """One entry, prompt and output included (stored only with LLMCTL_LOG_PROMPTS).
    `request_id` may be a unique prefix of the id."""
    with db.session() as s:
        # Clients may reuse their X-Request-ID: the newest request with it.
        row = s.scalars(select(RequestLog).where(RequestLog.request_id == request_id)
                        .order_by(RequestLog.id.desc())).first()
        if row is None and request_id:
            # A prefix scan on the request_id index; two rows are enough to tell.
            pattern = request_id.replace("\\", "\\\\").replace("%", "\\%").replace(
                "_", "\\_") + "%"
            rows = list(s.scalars(select(RequestLog).where(
                RequestLog.request_id.like(pattern, escape="\\")).limit(2)))
            if len(rows) > 1:
                raise InvalidRequest(f"request id prefix {request_id!r} is ambiguous: it "
                                     f"matches {rows[0].request_id}, {rows[1].request_id}, ...",
                                     param="request_id")
            row = rows[0] if rows else None
        if row is None:
            raise NotFound(f"no logged request with id {request_id!r}", param="request_id")
        return _entry(row, _names(s, [row]), full=True)


def tail(db, n: int = 20) -> list[dict]:
    """The last `n` entries written, oldest first."""
    check_int(n, param="lines", minimum=1)
    with db.session() as s:
        rows = list(s.scalars(select(RequestLog).order_by(RequestLog.id.desc()).limit(n)))[::-1]
        names = _names(s, rows)
        return [_entry(r, names) for r in rows]


class Follower:
    """New entries as they are written (`llmctl logs tail -f`).

    Ids are allocated before commit, so with several writers a smaller id can
    become visible after a larger one; each poll looks back `overlap` ids and
    skips those already seen, rather than trusting `id > last`."""

    def __init__(self, db, after_id: int = 0, overlap: int = 1000):
        self.db = db
        self.start = self.last = after_id
        self.overlap = overlap
        self._seen: deque[int] = deque(maxlen=overlap * 4)
        self._seen_set: set[int] = set()

    @classmethod
    def from_end(cls, db, **kw) -> Follower:
        with db.session() as s:
            last = s.scalar(select(func.max(RequestLog.id))) or 0
        return cls(db, last, **kw)

    def poll(self, limit: int = 1000) -> list[dict]:
        with self.db.session() as s:
            rows = list(s.scalars(select(RequestLog)
                                  .where(RequestLog.id > self.last - self.overlap)
                                  .order_by(RequestLog.id).limit(limit + self.overlap)))
            fresh = [r for r in rows if r.id > self.start and r.id not in self._seen_set]
            names = _names(s, fresh)
            out = [_entry(r, names) for r in fresh]
        for r in fresh:
            if len(self._seen) == self._seen.maxlen:
                self._seen_set.discard(self._seen[0])
            self._seen.append(r.id)
            self._seen_set.add(r.id)
            self.last = max(self.last, r.id)
        return out


def iter_entries(db, *, batch: int = 1000, **filters) -> Iterator[dict]:
    """Every matching entry, oldest first, in keyset batches (constant memory)."""
    last_id = 0
    while True:
        with db.session() as s:
            conds = _filters(s, **filters)
            rows = list(s.scalars(select(RequestLog).where(*conds, RequestLog.id > last_id)
                                  .order_by(RequestLog.id).limit(batch)))
            names = _names(s, rows)
            entries = [_entry(r, names, full=True) for r in rows]
        yield from entries
        if len(rows) < batch:
            return
        last_id = rows[-1].id


def export(db, out: IO[str], fmt: str = "jsonl", **filters) -> int:
    """Write matching entries to `out` as JSON lines, one JSON array, or CSV; returns
    how many. Entries are streamed in every format."""
    if fmt not in ("jsonl", "json", "csv"):
        raise InvalidRequest(f"format: {fmt!r} is not jsonl, json or csv", param="format")
    count = 0
    writer = None
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=list(FULL_FIELDS))
        writer.writeheader()
    for entry in iter_entries(db, **filters):
        if writer:
            writer.writerow(entry)
        elif fmt == "json":
            out.write(("[\n" if count == 0 else ",\n") + json.dumps(entry))
        else:
            out.write(json.dumps(entry) + "\n")
        count += 1
    if fmt == "json":
        out.write("\n]\n" if count else "[]\n")
    return count


def prune(db, older_than: str | timedelta, *, dry_run: bool = False,
          batch: int = 5000) -> dict:
    """Delete entries older than `older_than` (e.g. '90d'), in batches so writers are
    never blocked for long. Usage aggregates are kept."""
    age = older_than if isinstance(older_than, timedelta) else parse_duration(
        older_than, param="older_than")
    cutoff = utcnow() - age
    old = RequestLog.created_at < cutoff
    if dry_run:
        with db.session() as s:
            n = s.scalar(select(func.count()).select_from(RequestLog).where(old))
        return {"deleted": 0, "matched": int(n or 0), "before": cutoff.isoformat() + "Z",
                "dry_run": True}
    deleted = 0
    while True:
        with db.session() as s:
            ids = list(s.scalars(select(RequestLog.id).where(old).order_by(RequestLog.id)
                                 .limit(batch)))
            if ids:
                s.execute(delete(RequestLog).where(RequestLog.id.in_(ids))
                          .execution_options(synchronize_session=False))
        deleted += len(ids)
        if len(ids) < batch:
            break
    return {"deleted": deleted, "matched": deleted, "before": cutoff.isoformat() + "Z",
            "dry_run": False}
