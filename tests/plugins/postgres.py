"""A real PostgreSQL server for the test session, on a temporary directory and port.

Postgres refuses to run as root, and CI runs as root: its tools run as the
`postgres` system user on a directory that user owns. `initdb` and `pg_ctl` come
from PATH or, where Debian's postgresql package keeps them off PATH, from the
newest /usr/lib/postgresql/N/bin.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile
import uuid

import pytest
from sqlalchemy import create_engine, text

from tests.plugins.ports import free_port

DEBIAN_BINS = "/usr/lib/postgresql/*/bin"
INSTALL = "apt-get install -y postgresql"


def pg_tool(name: str, debian_bins: str = DEBIAN_BINS) -> str:
    """The path of a PostgreSQL server tool; ValueError naming the package when missing."""
    found = shutil.which(name)
    if found:
        return found
    by_version = sorted(glob.glob(debian_bins),
                        key=lambda d: [int(n) for n in re.findall(r"\d+", d)], reverse=True)
    for bin_dir in by_version:
        path = os.path.join(bin_dir, name)
        if os.access(path, os.X_OK):
            return path
    raise ValueError(f"PostgreSQL's {name} is not installed: {INSTALL}")


def _as_postgres(tool: str, *args: str) -> list[str]:
    cmd = [pg_tool(tool), *args]
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class PostgresServer:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="llmctl-pg-")
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")

    def start(self) -> None:
        if not os.path.exists(self.data):
            subprocess.run(_as_postgres("initdb", "-D", self.data, "-A", "trust", "-U", "llmctl",
                                        "--no-sync"),
                           check=True, capture_output=True)
        subprocess.run(_as_postgres(
            "pg_ctl", "-D", self.data, "-w", "-l", os.path.join(self.dir, "log"),
            "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                  "-c max_connections=300", "start"), check=True, capture_output=True)

    def stop(self) -> None:
        subprocess.run(_as_postgres("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop"),
                       capture_output=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://llmctl@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        name = "t_" + uuid.uuid4().hex[:12]
        engine = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return self.url(name)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    try:
        pg_tool("initdb"), pg_tool("pg_ctl")
    except ValueError as exc:
        pytest.fail(str(exc), pytrace=False)
    server = PostgresServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def pg_url(postgres_server) -> str:
    """A fresh, empty Postgres database for one test."""
    return postgres_server.create_database()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path) -> str:
    """Run a test on embedded SQLite and on a fresh Postgres database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'llmctl.db'}"
    return request.getfixturevalue("postgres_server").create_database()


@pytest.fixture
def database(db_url):
    """A `Database` at schema head, on SQLite and on Postgres (parametrized via db_url)."""
    from server.db import migrate
    from server.db.engine import Database

    db = Database(db_url)
    migrate.upgrade(db, "head")
    yield db
    db.dispose()


@pytest.fixture
def sqlite_db(tmp_path):
    """Embedded SQLite at head, for tests whose subject is not the database."""
    from server.db import migrate
    from server.db.engine import Database

    db = Database(f"sqlite:///{tmp_path / 'llmctl.db'}")
    migrate.upgrade(db, "head")
    yield db
    db.dispose()
