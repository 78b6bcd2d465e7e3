"""Usage reports from the per key, month and model aggregates (`usage_monthly`).

The log writer updates the aggregates in the same transaction that inserts the
request logs, so a report always equals the sum over the logs flushed so far.
One report shape serves `llmctl usage --json`, `GET /v1/me/usage` and
`GET /v1/admin/usage`:

    {"month": "2026-11" | null (all months), "key": {"id", "name", "prefix"} | null,
     "model": str | null, "by": "key" | "model" | "month",
     "rows": [{"key_id", "key_name", "month", "model", "requests", "cached_requests",
               "prompt_tokens", "completion_tokens", "total_tokens", "charged_tokens"}],
     "totals": {"requests", "cached_requests", "prompt_tokens", "completion_tokens",
                "total_tokens", "charged_tokens"}}

`by` picks the rows: "key" one per key and month, "model" one per key, month and
model, "month" one per month over all keys. A field that is not grouped on is null.
"""

from __future__ import annotations

import re

from sqlalchemy import func, select

from server.db.tables import ApiKey, UsageMonthly
from server.errors import InvalidRequest
from server.services import keys as keysvc
from server.services.quotas import current_month

GROUPINGS = ("key", "model", "month")
COUNTERS = ("requests", "cached_requests", "prompt_tokens", "completion_tokens",
            "charged_tokens")
_MONTH = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])", re.ASCII)


def parse_month(month: str | None) -> str | None:
    """'YYYY-MM' as given, None → this month, 'all' → None (every month)."""
    if month is None or month == "":
        return current_month()
    if month == "all":
        return None
    if not _MONTH.fullmatch(month):
        raise InvalidRequest(f"month: {month!r} is not YYYY-MM (or 'all')", param="month")
    return month


def _totals(rows: list[dict]) -> dict:
    totals = {c: sum(r[c] for r in rows) for c in COUNTERS}
    totals["total_tokens"] = totals["prompt_tokens"] + totals["completion_tokens"]
    return {c: totals[c] for c in (*COUNTERS[:4], "total_tokens", "charged_tokens")}


def usage_report(db, *, key: str | int | None = None, month: str | None = None,
                 model: str | None = None, by: str = "key") -> dict:
    """Usage for one key (id, name or prefix) or all keys, one month or all ('all')."""
    if by not in GROUPINGS:
        raise InvalidRequest(f"by: {by!r} is not one of {', '.join(GROUPINGS)}", param="by")
    month_filter = parse_month(month)
    with db.session() as s:
        key_info = keysvc.KeyInfo.from_row(keysvc._find_row(s, key)) if key is not None else None
        dims = {"key": [UsageMonthly.key_id, UsageMonthly.month],
                "model": [UsageMonthly.key_id, UsageMonthly.month, UsageMonthly.model],
                "month": [UsageMonthly.month]}[by]
        query = select(*dims, *(func.sum(getattr(UsageMonthly, c)).label(c) for c in COUNTERS))
        if key_info is not None:
            query = query.where(UsageMonthly.key_id == key_info.id)
        if month_filter is not None:
            query = query.where(UsageMonthly.month == month_filter)
        if model is not None:
            query = query.where(UsageMonthly.model == model)
        query = query.group_by(*dims).order_by(UsageMonthly.month.desc(), *dims[:1])
        if by == "model":
            query = query.order_by(UsageMonthly.model)
        result = s.execute(query).mappings().all()
        key_ids = {r["key_id"] for r in result if "key_id" in r}
        names = dict(s.execute(select(ApiKey.id, ApiKey.name).where(ApiKey.id.in_(key_ids)))
                     .tuples().all()) if key_ids else {}
    rows = []
    for r in result:
        row = {"key_id": r.get("key_id"), "key_name": names.get(r.get("key_id")),
               "month": r["month"], "model": r.get("model")}
        row.update({c: int(r[c] or 0) for c in COUNTERS})
        row["total_tokens"] = row["prompt_tokens"] + row["completion_tokens"]
        rows.append({k: row[k] for k in ("key_id", "key_name", "month", "model", *COUNTERS[:4],
                                         "total_tokens", "charged_tokens")})
    return {
        "month": month_filter,
        "key": ({"id": key_info.id, "name": key_info.name, "prefix": key_info.prefix}
                if key_info else None),
        "model": model,
        "by": by,
        "rows": rows,
        "totals": _totals(rows),
    }
