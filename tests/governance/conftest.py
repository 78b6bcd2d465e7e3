"""Fixtures for the governance tests (limits, quotas, usage, logs, admin API)."""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import pytest


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


@dataclass
class Gw:
    app: object
    client: httpx.AsyncClient
    state: object  # AppState

    @property
    def db(self):
        return self.state.db


@pytest.fixture
def gov_gateway(tmp_path, tiny_models_yaml, monkeypatch):
    """`async with gov_gateway(db_url=None, **settings) as gw`: the real app in-process,
    on the tiny model, with LLMCTL_HOME / LLMCTL_DATABASE_URL set so the CLI sees the
    same database."""
    from server.api.app import create_app
    from server.config import Settings, load_models_config

    @asynccontextmanager
    async def make(db_url: str | None = None, **overrides):
        monkeypatch.setenv("LLMCTL_HOME", str(tmp_path / "home"))
        monkeypatch.delenv("LLMCTL_REDIS_URL", raising=False)
        if db_url and not db_url.startswith("sqlite"):
            from server.db import migrate
            from server.db.engine import Database

            db = Database(db_url)
            migrate.upgrade(db, "head")
            db.dispose()
            monkeypatch.setenv("LLMCTL_DATABASE_URL", db_url)
        else:
            monkeypatch.delenv("LLMCTL_DATABASE_URL", raising=False)
        settings = Settings(_env_file=None, models_config=tiny_models_yaml, log_prompts=True,
                            **overrides)
        app = create_app(settings, load_models_config(settings))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw",
                                         timeout=120) as client:
                yield Gw(app, client, app.state.llmctl)

    return make
