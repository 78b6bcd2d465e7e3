"""Engines, sessions and schema checks.

The embedded SQLite database is created and migrated on first use, so `llmctl`
works with no set-up. A server database (Postgres) is never migrated behind the
operator's back: commands that need the schema refuse with a clear message until
`llmctl db upgrade` has run.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.orm import Session, sessionmaker

from server.errors import ConfigError, DatabaseError, SchemaOutOfDate

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def redact(url: str) -> str:
    """The URL without its password, safe for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets the log writer and readers work side by side; busy_timeout makes
    # concurrent writers wait instead of failing with "database is locked".
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        # Not echoed: an unparsable URL may still hold a password.
        raise ConfigError("database URL is not valid: expected "
                          "dialect+driver://user:password@host:port/database") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    try:
        return create_engine(
            url, pool_pre_ping=True, pool_size=10, max_overflow=20,
            connect_args={"connect_timeout": 5} if parsed.get_backend_name() == "postgresql"
            else {},
        )
    except (ArgumentError, ImportError) as exc:
        raise ConfigError(f"database URL {redact(url)}: {exc}") from None


def unreachable(exc: DBAPIError) -> bool:
    """Whether a driver error means the database is down or restarting (a retry later
    may succeed), rather than a bad statement."""
    return isinstance(exc, OperationalError | InterfaceError) or exc.connection_invalidated


class Database:
    """One engine and session factory, built once and passed down."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._schema_checked = False

    @classmethod
    def from_settings(cls, settings) -> Database:
        return cls(settings.sqlalchemy_url)

    @property
    def safe_url(self) -> str:
        return redact(self.url)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        self.ensure_schema()
        with self._sessions() as session:
            try:
                yield session
                session.commit()
            except DBAPIError as exc:
                session.rollback()
                if unreachable(exc):
                    raise DatabaseError(self._unreachable(exc)) from None
                raise
            except BaseException:
                session.rollback()
                raise

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A plain connection, for Core reads on the request path; an unreachable
        database raises DatabaseError (a 503), as in `session()`."""
        try:
            with self.engine.connect() as conn:
                yield conn
        except DBAPIError as exc:
            if unreachable(exc):
                raise DatabaseError(self._unreachable(exc)) from None
            raise

    def _unreachable(self, exc: Exception) -> str:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        # psycopg puts the DSN in some messages; never echo a password.
        reason = re.sub(r"password=\S+", "password=***", reason)
        return f"database {self.safe_url} is unreachable: {reason}"

    def ping(self) -> None:
        """Raise DatabaseError unless a trivial query succeeds."""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            raise DatabaseError(self._unreachable(exc)) from None

    def ensure_schema(self) -> None:
        """Migrate embedded SQLite to head; refuse to run on a server DB that is behind."""
        if self._schema_checked:
            return
        from server.db import migrate

        try:
            current, head = migrate.current_revision(self), migrate.head_revision()
        except SQLAlchemyError as exc:
            raise DatabaseError(self._unreachable(exc)) from None
        if current != head:
            if self.is_sqlite:
                migrate.upgrade(self, "head")
            else:
                raise SchemaOutOfDate(
                    f"database schema is at {current or 'nothing'}, this llmctl needs {head}: "
                    "run `llmctl db upgrade`"
                )
        self._schema_checked = True

    def dispose(self) -> None:
        self.engine.dispose()
