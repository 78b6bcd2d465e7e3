"""Fixtures for the governance tests (limits, quotas, usage, logs, admin API)."""

from __future__ import annotations

import pytest

# Until tests/conftest.py lists "tests.plugins.redis" in pytest_plugins; the plugin
# keeps one server per session either way.
from tests.plugins.redis import redis_server, redis_url  # noqa: F401


@pytest.fixture
def sqlite_db(tmp_path):
    """A migrated embedded SQLite database."""
    from server.db import migrate
    from server.db.engine import Database

    db = Database(f"sqlite:///{tmp_path / 'gov.db'}")
    migrate.upgrade(db, "head")
    yield db
    db.dispose()


@pytest.fixture
def make_settings(tmp_path):
    """Settings that ignore the developer's .env and environment for limit defaults."""
    from server.config import Settings

    def make(**kw):
        return Settings(_env_file=None, home=tmp_path / "home", **kw)

    return make


@pytest.fixture
def make_key():
    from server.services import keys

    def make(db, name="k", role="user", **limits):
        return keys.create_key(db, name=name, role=role, **limits).key

    return make
