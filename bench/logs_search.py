"""`logs search` over a million request-log rows: how long does one page take?

    python bench/logs_search.py                       # embedded SQLite in a temp dir
    python bench/logs_search.py --database-url postgresql+psycopg://...   # an empty DB
    python bench/logs_search.py --rows 200000 --json

Fills `request_logs` with synthetic rows (200 keys, 12 models, 90 days, a realistic
mix of statuses), then times `server.services.logquery.search` — the function
behind `llmctl logs search` and `GET /v1/admin/logs` — for typical filters, for a
deep page reached through cursors, and reports the median and worst of 5 runs
per query. The issue's bar: every query answers in under a second.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.db import migrate  # noqa: E402
from server.db.engine import Database  # noqa: E402
from server.services import logquery  # noqa: E402

N_KEYS, MODELS = 200, [f"model-{i}" for i in range(12)]
STATUSES = [200] * 85 + [429] * 8 + [400] * 3 + [500] * 2 + [503] * 2
COLUMNS = ["request_id", "created_at", "key_id", "model", "route", "status", "stream",
           "prompt_tokens", "completion_tokens", "charged_tokens", "latency_ms", "ttft_ms",
           "cached", "cache_status", "finish_reason", "error_type", "error_message"]


def synthetic_rows(n: int, end: datetime, seed: int = 7):
    rng = random.Random(seed)
    span = 90 * 24 * 3600
    # Written in time order, as a gateway writes them.
    offsets = sorted(rng.random() * span for _ in range(n))
    for i, off in enumerate(offsets):
        status = rng.choice(STATUSES)
        ok = status < 400
        prompt = rng.randint(5, 400) if ok else 0
        completion = rng.randint(1, 256) if ok else 0
        yield (f"req-{i:08d}", end - timedelta(seconds=span - off), rng.randint(1, N_KEYS),
               rng.choice(MODELS), "/v1/chat/completions", status, rng.random() < 0.3,
               prompt, completion, prompt + completion, rng.uniform(5, 3000),
               rng.uniform(1, 200) if ok else None, False, "miss" if ok else None,
               "stop" if ok else None, None if ok else "rate_limit_error",
               None if ok else "Rate limit reached")


def add_keys(db: Database) -> None:
    from server.db.tables import ApiKey

    with db.session() as s:
        s.add_all(ApiKey(id=i, name=f"key-{i}", prefix=f"llm_k{i:07d}", key_hash=f"{i:064x}",
                         role="user") for i in range(1, N_KEYS + 1))


def fill_sqlite(db: Database, rows) -> None:
    raw = db.engine.raw_connection()
    try:
        cur = raw.cursor()
        sql = (f"INSERT INTO request_logs ({', '.join(COLUMNS)}) "
               f"VALUES ({', '.join('?' * len(COLUMNS))})")
        batch = []
        for row in rows:
            batch.append(row)
            if len(batch) == 50_000:
                cur.executemany(sql, batch)
                batch.clear()
        if batch:
            cur.executemany(sql, batch)
        raw.commit()
        cur.execute("ANALYZE")
        raw.commit()
    finally:
        raw.close()


def fill_postgres(db: Database, rows) -> None:
    raw = db.engine.raw_connection()
    try:
        cur = raw.cursor()
        with cur.copy(f"COPY request_logs ({', '.join(COLUMNS)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        raw.commit()
        cur.execute("ANALYZE request_logs")
        raw.commit()
    finally:
        raw.close()


def queries(now: datetime) -> list[tuple[str, dict]]:
    day = timedelta(days=1)
    return [
        ("newest page, no filter", {}),
        ("by key", {"key": "key-17"}),
        ("by model", {"model": "model-3"}),
        ("status 500", {"status": "500"}),
        ("status 4xx", {"status": "4xx"}),
        ("errors (>= 400)", {"status": "error"}),
        ("last 24h", {"since": (now - day).isoformat()}),
        ("one day, 30 days ago", {"since": (now - 31 * day).isoformat(),
                                  "until": (now - 30 * day).isoformat()}),
        ("key + model + 7d", {"key": "key-17", "model": "model-3",
                              "since": (now - 7 * day).isoformat()}),
        ("key + status 429", {"key": "key-42", "status": "429"}),
        ("model + status 5xx + 30d", {"model": "model-5", "status": "5xx",
                                      "since": (now - 30 * day).isoformat()}),
        ("rare model (no rows)", {"model": "model-unknown"}),
        ("key + model + status 500 (rare)", {"key": "key-99", "model": "model-7",
                                             "status": "500"}),
        ("model + 4xx, old range", {"model": "model-2", "status": "4xx",
                                    "until": (now - 80 * day).isoformat()}),
    ]


def timed(fn, repeat: int = 5) -> tuple[float, float, object]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), max(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--database-url", help="an empty database (default: temp SQLite)")
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="llmctl-bench-")
    url = args.database_url or f"sqlite:///{tmp}/bench.db"
    db = Database(url)
    migrate.upgrade(db, "head")
    now = datetime(2026, 11, 27, 12, 0, 0)
    t0 = time.perf_counter()
    add_keys(db)
    (fill_sqlite if db.is_sqlite else fill_postgres)(db, synthetic_rows(args.rows, now))
    fill_s = time.perf_counter() - t0

    results = []
    for label, filters in queries(now):
        med, worst, page = timed(lambda f=filters: logquery.search(db, limit=args.limit, **f))
        results.append({"query": label, "median_ms": round(med, 2), "max_ms": round(worst, 2),
                        "rows": len(page["items"])})
    # Deep pagination: follow cursors 200 pages down the unfiltered list, then time one more.
    cursor = None
    for _ in range(200):
        cursor = logquery.search(db, limit=args.limit, cursor=cursor)["next_cursor"]
    med, worst, page = timed(lambda: logquery.search(db, limit=args.limit, cursor=cursor))
    results.append({"query": "page 201 via cursor", "median_ms": round(med, 2),
                    "max_ms": round(worst, 2), "rows": len(page["items"])})
    cursor = None
    for _ in range(20):
        cursor = logquery.search(db, key="key-17", limit=args.limit, cursor=cursor)["next_cursor"]
    med, worst, page = timed(lambda: logquery.search(db, key="key-17", limit=args.limit,
                                                     cursor=cursor))
    results.append({"query": "by key, page 21 via cursor", "median_ms": round(med, 2),
                    "max_ms": round(worst, 2), "rows": len(page["items"])})
    med, worst, _ = timed(lambda: logquery.export(db, io.StringIO(), "jsonl", key="key-17",
                                                  since=(now - timedelta(days=7)).isoformat()),
                          repeat=3)
    results.append({"query": "export jsonl: key, 7d", "median_ms": round(med, 2),
                    "max_ms": round(worst, 2), "rows": None})

    report = {"database": db.engine.dialect.name, "rows": args.rows, "limit": args.limit,
              "fill_s": round(fill_s, 1), "results": results,
              "worst_ms": max(r["max_ms"] for r in results if r["rows"] is not None)}
    db.dispose()
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['database']}: {args.rows:,} rows (filled in {fill_s:.1f}s), "
          f"page size {args.limit}")
    for r in results:
        print(f"  {r['query']:<30} median {r['median_ms']:>8.2f} ms   max {r['max_ms']:>8.2f} ms"
              f"   rows {r['rows']}")
    print(f"  worst search: {report['worst_ms']:.1f} ms "
          f"({'under' if report['worst_ms'] < 1000 else 'OVER'} one second)")


if __name__ == "__main__":
    main()
