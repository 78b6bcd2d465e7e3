"""Everything the app builds once in its lifespan, kept on `app.state.llmctl`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.config import ModelsConfig, Settings
from server.db.engine import Database
from server.engines.manager import MultiModelManager
from server.services.logstore import LogStore


@dataclass
class AppState:
    settings: Settings
    models: ModelsConfig
    db: Database
    manager: MultiModelManager
    logstore: LogStore
    redis: Any = None  # server.services.redisconn.RedisHandle when Redis is configured
    limiter: Any = None  # server.services.limits.Limiter
    cache: Any = None  # server.services.cache.CompletionCache
    gateway: Any = None  # server.api.serving.Gateway
    # embedded SQLite: the request path's key reads (server.services.keys.KeyLookup)
    key_lookup: Any = None
    started_at: int = 0
