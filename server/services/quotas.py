"""Monthly token quotas: reserve on admission, settle to the real count, report.

A key's ledger for a calendar month (UTC) is one `quota_months` row:
`used_tokens` is settled usage, `reserved_tokens` is held by requests in flight.
Admission is a single conditional UPDATE

    UPDATE quota_months SET reserved_tokens = reserved_tokens + :n
     WHERE key_id = :k AND month = :m AND used_tokens + reserved_tokens + :n <= :quota

so any number of concurrent requests, in any number of replicas sharing the
database, can never hold or spend more than the quota together (Postgres re-checks
the WHERE on the locked row; SQLite serializes writers). The first request of a
month creates the row with one INSERT ... ON CONFLICT DO UPDATE that carries the
same check, so concurrent first requests neither race nor refuse each other.

Each reservation is also a `quota_reservations` row, named by the request's log
record (its `record_id`), with a
lease (`LLMCTL_QUOTA_LEASE_SECONDS`) that its gateway renews while the request runs.
Settling deletes that row and moves its tokens from reserved to used, in the same
transaction as the request's log row (server/services/logstore.py), so a request is
charged exactly once and usage always equals the sum of the logs. A reservation whose
lease ran out (its gateway was killed, or lost the database) is reclaimed by any
replica (`reclaim_expired`); a log row replayed after that still charges what was
served, and finds nothing left to release.

Keys without a quota skip the ledger (no writes on their hot path); their "used"
figure comes from the usage aggregates. When a month's row is first created, or a
quota is set on a key that had none, `used_tokens` starts from those aggregates.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, delete, func, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite

from server.db.tables import ApiKey, QuotaMonth, QuotaReservation, UsageMonthly, utcnow
from server.services import keys as keysvc
from server.services.keys import KeyInfo

LIMITS = ("rpm", "tpm", "max_concurrency", "monthly_token_quota")


def current_month(now: datetime | None = None) -> str:
    return (now or utcnow()).strftime("%Y-%m")


def next_month_start(month: str) -> datetime:
    year, mon = (int(p) for p in month.split("-"))
    return datetime(year + mon // 12, mon % 12 + 1, 1)


def effective_limits(settings, key: KeyInfo) -> dict[str, int]:
    """A key's own limits, or its role's defaults where unset. 0 means unlimited."""
    if key.is_admin:
        defaults = (settings.admin_rpm, settings.admin_tpm, settings.admin_max_concurrency,
                    settings.admin_monthly_tokens)
    else:
        defaults = (settings.default_rpm, settings.default_tpm,
                    settings.default_max_concurrency, settings.default_monthly_tokens)
    own = (key.rpm, key.tpm, key.max_concurrency, key.monthly_token_quota)
    return {f: (mine if mine is not None else default)
            for f, mine, default in zip(LIMITS, own, defaults, strict=True)}


def _usage_charged(s, key_id: int, month: str) -> int:
    return int(s.scalar(select(func.coalesce(func.sum(UsageMonthly.charged_tokens), 0)).where(
        UsageMonthly.key_id == key_id, UsageMonthly.month == month)) or 0)


def _insert(db):
    return (sqlite.insert if db.is_sqlite else postgresql.insert)(QuotaMonth)


def _ensure_row(db, s, key_id: int, month: str) -> None:
    stmt = _insert(db).values(key_id=key_id, month=month,
                              used_tokens=_usage_charged(s, key_id, month), reserved_tokens=0)
    s.execute(stmt.on_conflict_do_nothing(index_elements=["key_id", "month"]))


def _first_reserve(db, key_id: int, month: str, tokens: int, quota: int):
    """Create the month's row holding `tokens`, or add them to a row a concurrent
    request just created: one statement, checked against the quota either way
    (https://www.postgresql.org/docs/15/sql-insert.html#SQL-ON-CONFLICT)."""
    used = select(func.coalesce(func.sum(UsageMonthly.charged_tokens), 0)).where(
        UsageMonthly.key_id == key_id, UsageMonthly.month == month).scalar_subquery()
    fresh = select(literal(key_id), literal(month), used, literal(tokens)).where(
        used + tokens <= quota)
    stmt = _insert(db).from_select(["key_id", "month", "used_tokens", "reserved_tokens"], fresh)
    return stmt.on_conflict_do_update(
        index_elements=["key_id", "month"],
        set_={"reserved_tokens": QuotaMonth.reserved_tokens + stmt.excluded.reserved_tokens},
        where=QuotaMonth.used_tokens + QuotaMonth.reserved_tokens
        + stmt.excluded.reserved_tokens <= quota,
    ).returning(QuotaMonth.used_tokens + QuotaMonth.reserved_tokens)


def reserve(db, key_id: int, month: str, tokens: int, quota: int, *, record_id: str,
            lease: float) -> int | None:
    """Hold `tokens` of the month's `quota` for the request logged as `record_id`, leased
    for `lease` seconds: the month's committed tokens (used + reserved) with them, or
    None (nothing held) if they do not fit."""
    cond = update(QuotaMonth).where(
        QuotaMonth.key_id == key_id, QuotaMonth.month == month,
        QuotaMonth.used_tokens + QuotaMonth.reserved_tokens + tokens <= quota,
    ).values(reserved_tokens=QuotaMonth.reserved_tokens + tokens).returning(
        QuotaMonth.used_tokens + QuotaMonth.reserved_tokens).execution_options(
        synchronize_session=False)
    with db.session() as s:
        held = s.execute(cond).scalar()
        if held is None:
            held = s.execute(_first_reserve(db, key_id, month, tokens, quota)).scalar()
        if held is not None:
            s.add(QuotaReservation(record_id=record_id, key_id=key_id, month=month,
                                   tokens=tokens, expires_at=utcnow() + timedelta(seconds=lease)))
        return held


_SETTLE = (update(QuotaMonth).where(QuotaMonth.key_id == bindparam("k"),
                                    QuotaMonth.month == bindparam("m"))
           .values(used_tokens=QuotaMonth.used_tokens + bindparam("used"),
                   reserved_tokens=QuotaMonth.reserved_tokens - bindparam("released")))


def settle_in(conn, charges: Iterable[tuple[str, int, str, int]]) -> None:
    """In the caller's transaction: for each (record id, key id, month, charged),
    release the request's reservation if it is still there and add `charged` to used.
    Rows are updated in key order, so concurrent settlers cannot deadlock."""
    charges = list(charges)
    if not charges:
        return
    held = dict(conn.execute(delete(QuotaReservation).where(
        QuotaReservation.record_id.in_([c[0] for c in charges]))
        .returning(QuotaReservation.record_id, QuotaReservation.tokens)).all())
    _apply(conn, ((k, m, charged, held.get(rid, 0)) for rid, k, m, charged in charges))


def _apply(conn, deltas: Iterable[tuple[int, str, int, int]]) -> None:
    """(key, month, used +, reserved -) summed per row, applied in key order."""
    rows: dict[tuple[int, str], list[int]] = {}
    for k, m, used, released in deltas:
        row = rows.setdefault((k, m), [0, 0])
        row[0] += used
        row[1] += released
    if rows:
        conn.execute(_SETTLE, [{"k": k, "m": m, "used": u, "released": r}
                               for (k, m), (u, r) in sorted(rows.items())])


def settle(db, record_id: str, key_id: int, month: str, charged: int) -> None:
    """Turn reservation `record_id` into `charged` used tokens (0 releases it) on its
    own, for a caller that writes no log row."""
    with db.session() as s:
        settle_in(s.connection(), [(record_id, key_id, month, charged)])


def renew(db, record_ids: Iterable[str], lease: float) -> None:
    """Extend the leases of requests still running here."""
    ids = sorted(record_ids)
    if ids:
        with db.session() as s:
            s.execute(update(QuotaReservation).where(QuotaReservation.record_id.in_(ids))
                      .values(expires_at=utcnow() + timedelta(seconds=lease))
                      .execution_options(synchronize_session=False))


def reclaim_expired(db) -> int:
    """Give back the tokens of reservations whose lease ran out; the number reclaimed."""
    with db.session() as s:
        conn = s.connection()
        gone = conn.execute(delete(QuotaReservation).where(
            QuotaReservation.expires_at < utcnow()).returning(
            QuotaReservation.key_id, QuotaReservation.month, QuotaReservation.tokens)).all()
        _apply(conn, ((k, m, 0, tokens) for k, m, tokens in gone))
        return len(gone)


def ledger(db, key_id: int, month: str) -> tuple[int, int] | None:
    """(used, reserved) from the month's row, or None when there is none."""
    with db.session() as s:
        row = s.get(QuotaMonth, (key_id, month))
        return (row.used_tokens, row.reserved_tokens) if row else None


@dataclass(frozen=True)
class QuotaStatus:
    """One key's limits and month-to-date quota. `to_dict` is the documented JSON shape."""

    key_id: int
    key_name: str
    key_prefix: str
    role: str
    month: str
    monthly_token_quota: int  # effective; 0 = unlimited
    used_tokens: int
    reserved_tokens: int
    remaining_tokens: int | None  # None when unlimited
    resets_at: str
    rpm: int
    tpm: int
    max_concurrency: int
    # Which of the four come from the key itself (the rest are role defaults).
    own_limits: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def _status(s, settings, key: KeyInfo, month: str) -> QuotaStatus:
    limits = effective_limits(settings, key)
    quota = limits["monthly_token_quota"]
    row = s.get(QuotaMonth, (key.id, month))
    if quota and row is not None:
        used, reserved = row.used_tokens, row.reserved_tokens
    else:
        used, reserved = _usage_charged(s, key.id, month), (row.reserved_tokens if row else 0)
    return QuotaStatus(
        key_id=key.id, key_name=key.name, key_prefix=key.prefix, role=key.role, month=month,
        monthly_token_quota=quota, used_tokens=used, reserved_tokens=reserved,
        remaining_tokens=max(0, quota - used - reserved) if quota else None,
        resets_at=next_month_start(month).isoformat() + "Z",
        rpm=limits["rpm"], tpm=limits["tpm"], max_concurrency=limits["max_concurrency"],
        own_limits=[f for f in LIMITS if getattr(key, f) is not None],
    )


def get_quota(db, settings, ref: str | int, month: str | None = None) -> QuotaStatus:
    """A key's (by id, name or prefix) limits and quota for `month` (default: now)."""
    month = month or current_month()
    with db.session() as s:
        key = KeyInfo.from_row(keysvc._find_row(s, ref))
        return _status(s, settings, key, month)


def list_quotas(db, settings, month: str | None = None, *,
                include_revoked: bool = False) -> list[QuotaStatus]:
    month = month or current_month()
    with db.session() as s:
        query = select(ApiKey).order_by(ApiKey.id)
        if not include_revoked:
            query = query.where(ApiKey.revoked_at.is_(None))
        return [_status(s, settings, KeyInfo.from_row(r), month) for r in s.scalars(query)]


def set_limits(db, settings, ref: str | int, *, monthly_token_quota: int | None = None,
               rpm: int | None = None, tpm: int | None = None,
               max_concurrency: int | None = None) -> QuotaStatus:
    """Change a key's limits (None leaves one alone, 0 = unlimited) and return its status.

    A key that had no quota has no up-to-date ledger; giving it one re-reads this
    month's usage so the quota counts what was already spent."""
    before = keysvc.get_key(db, ref)
    had_quota = effective_limits(settings, before)["monthly_token_quota"] > 0
    after = keysvc.update_key(db, before.id, monthly_token_quota=monthly_token_quota, rpm=rpm,
                              tpm=tpm, max_concurrency=max_concurrency)
    month = current_month()
    if not had_quota and effective_limits(settings, after)["monthly_token_quota"] > 0:
        with db.session() as s:
            _ensure_row(db, s, after.id, month)
            s.execute(update(QuotaMonth).where(
                QuotaMonth.key_id == after.id, QuotaMonth.month == month,
            ).values(used_tokens=_usage_charged(s, after.id, month)).execution_options(
                synchronize_session=False))
    return get_quota(db, settings, after.id, month)
