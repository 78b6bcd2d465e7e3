"""The request-log writer's metrics: rows written, write errors, and rows dropped when
the database never comes back before shutdown."""

from __future__ import annotations

from prometheus_client import REGISTRY

from server.db.engine import Database
from server.services.logstore import LogStore, RequestRecord
from tests.plugins.ports import free_port


def value(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def rows(n: int) -> list[RequestRecord]:
    return [RequestRecord(request_id=f"m_{i}", route="/v1/completions", status=200)
            for i in range(n)]


async def test_rows_written_are_counted(sqlite_db):
    store = LogStore(sqlite_db, interval=60)
    before = value("llmctl_request_log_rows_written_total")
    for r in rows(7):
        store.submit(r)
    await store.flush()
    assert value("llmctl_request_log_rows_written_total") == before + 7


async def test_rows_the_writer_gives_up_on_are_dropped_and_counted():
    # A Postgres that is not there: every write fails to connect.
    db = Database(f"postgresql+psycopg://llmctl@127.0.0.1:{free_port()}/gone")
    store = LogStore(db, interval=0.05)
    dropped = value("llmctl_request_log_rows_dropped_total")
    errors = value("llmctl_database_errors_total", operation="log_write")
    store.start()
    for r in rows(5):
        store.submit(r)
    await store.close()
    assert value("llmctl_request_log_rows_dropped_total") == dropped + 5
    assert value("llmctl_database_errors_total", operation="log_write") >= errors + 3
    db.dispose()
