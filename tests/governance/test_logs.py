"""Request-log queries: filters, keyset pages, follow, export, prune (SQLite and Postgres)."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta

import pytest

from server.db.tables import RequestLog, utcnow
from server.errors import InvalidRequest, NotFound
from server.services import keys, logquery


def add_logs(db, key_id, n, *, start=None, status=200, model="m1", step=timedelta(seconds=1)):
    start = start or utcnow() - timedelta(hours=1)
    with db.session() as s:
        base = s.query(RequestLog).count()
        s.add_all(RequestLog(
            request_id=f"r{base + i}", created_at=start + i * step, key_id=key_id, model=model,
            route="/v1/completions", status=status, prompt_tokens=3, completion_tokens=4,
            charged_tokens=7, latency_ms=1.0) for i in range(n))


def test_search_filters_and_pages(database):
    a = keys.create_key(database, name="a").key
    b = keys.create_key(database, name="b").key
    add_logs(database, a.id, 25)
    add_logs(database, b.id, 5, status=429, model="m2")
    add_logs(database, a.id, 3, status=500, start=utcnow() - timedelta(days=10))

    seen, cursor = [], None
    while True:
        page = logquery.search(database, key="a", limit=7, cursor=cursor)
        seen += [e["request_id"] for e in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 28
    stamps = [e["created_at"] for e in logquery.search(database, key="a", limit=28)["items"]]
    assert stamps == sorted(stamps, reverse=True)

    assert len(logquery.search(database, status="4xx")["items"]) == 5
    assert len(logquery.search(database, status="error")["items"]) == 8
    assert len(logquery.search(database, status="ok")["items"]) == 25
    assert len(logquery.search(database, since="2d")["items"]) == 30
    assert len(logquery.search(database, until="2d", key=a.prefix)["items"]) == 3
    assert len(logquery.search(database, model="m2", status=429)["items"]) == 5
    entry = logquery.search(database, model="m2", limit=1)["items"][0]
    assert entry["key_name"] == "b" and entry["total_tokens"] == 7
    assert logquery.show(database, entry["request_id"])["prompt"] is None
    with pytest.raises(NotFound):
        logquery.show(database, "nope")
    for bad in ({"status": "teapot"}, {"since": "yesterday"}, {"cursor": "!!"},
                {"limit": 0}):
        with pytest.raises(InvalidRequest):
            logquery.search(database, **bad)


def test_tail_follow_export_prune(database):
    k = keys.create_key(database, name="k").key
    add_logs(database, k.id, 3, start=utcnow() - timedelta(days=100))
    add_logs(database, k.id, 4)
    assert [e["request_id"] for e in logquery.tail(database, 2)] == ["r5", "r6"]
    follower = logquery.Follower.from_end(database)
    assert follower.poll() == []
    add_logs(database, k.id, 2)
    assert [e["request_id"] for e in follower.poll()] == ["r7", "r8"]
    assert follower.poll() == []

    out = io.StringIO()
    assert logquery.export(database, out, "jsonl", since="1d") == 6
    assert [json.loads(line)["request_id"] for line in out.getvalue().splitlines()][:2] == \
        ["r3", "r4"]
    out = io.StringIO()
    assert logquery.export(database, out, "csv", key="k") == 9
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert len(rows) == 9 and rows[0]["request_id"] == "r0"

    assert logquery.prune(database, "90d", dry_run=True)["matched"] == 3
    assert logquery.prune(database, "90d", batch=2)["deleted"] == 3
    assert logquery.prune(database, "90d")["deleted"] == 0
    assert len(logquery.search(database, limit=100)["items"]) == 6


def test_bench_script_runs(tmp_path):
    """bench/logs_search.py works end to end (on a small table here)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bench" / "logs_search.py"
    out = subprocess.run([sys.executable, str(script), "--rows", "3000", "--json"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    report = json.loads(out)
    assert report["rows"] == 3000 and report["worst_ms"] < 1000
    assert {r["query"] for r in report["results"]} >= {"by key", "page 201 via cursor"}
