"""In-process gateway fixtures: the real app on the tiny test model, over ASGI."""

from __future__ import annotations

import httpx
import pytest

from server.api.app import create_app
from server.config import Settings, load_models_config
from server.services import keys


@pytest.fixture
async def gateway(tmp_path, tiny_models_yaml, monkeypatch):
    """(app, client, secrets): an app on embedded SQLite with a user and an admin key."""
    monkeypatch.setenv("LLMCTL_HOME", str(tmp_path / "home"))
    settings = Settings(models_config=tiny_models_yaml, log_prompts=True)
    app = create_app(settings, load_models_config(settings))
    async with app.router.lifespan_context(app):
        db = app.state.llmctl.db
        secrets = {
            "user": keys.create_key(db, name="user").secret,
            "admin": keys.create_key(db, name="admin", role="admin").secret,
        }
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield app, client, secrets
