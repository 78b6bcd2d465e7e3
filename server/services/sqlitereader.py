"""A read-only sqlite3 connection for point reads on the event loop.

The request path reads embedded SQLite twice per request (the API key, the cache
entry). Each is one indexed read that takes microseconds and, in WAL mode, never
waits for a writer; through SQLAlchemy (a pooled connection, statement compile and
result processing) the same read costs several times that. So the hot reads use a
plain connection of their own, opened lazily (after the schema is migrated) and
used only on the event loop's thread. Server databases never come here: their
reads are network round trips and go through SQLAlchemy in a thread.
"""

from __future__ import annotations

import sqlite3
from typing import Any


def usable(db) -> bool:
    """Whether `db` is an embedded SQLite file (an in-memory database lives in its own
    connection and cannot be read from another)."""
    return bool(getattr(db, "is_sqlite", False)) and db.engine.url.database not in (
        None, "", ":memory:")


class SqliteReader:
    """One lazily opened, read-only connection to `db`'s SQLite file."""

    def __init__(self, db):
        self.db = db
        self.path = db.engine.url.database
        self._conn: sqlite3.Connection | None = None

    def one(self, sql: str, params: tuple) -> tuple[Any, ...] | None:
        """The first row of `sql` (a point read), or None."""
        if self._conn is None:
            self.db.ensure_schema()
            self._conn = sqlite3.connect(self.path, check_same_thread=False,
                                         isolation_level=None)
            self._conn.execute("PRAGMA query_only=ON")
        return self._conn.execute(sql, params).fetchone()

    def data_version(self) -> int:
        """A number that changes whenever another connection, in any process, commits
        to the database (https://sqlite.org/pragma.html#pragma_data_version): what a
        memo of earlier reads stays valid for. This connection never writes."""
        return self.one("PRAGMA data_version", ())[0]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
