"""Fixtures for the completion-cache tests: a cache on a fresh database, with or
without a real Redis in front."""

from __future__ import annotations

import pytest

from server.config import Settings
from server.services.cache import CompletionCache
from server.services.redisconn import RedisHandle
from tests.plugins.redis import redis_server, redis_url  # noqa: F401 - fixtures


def make_settings(**kw) -> Settings:
    return Settings(_env_file=None, **kw)


@pytest.fixture
def settings():
    return make_settings()


@pytest.fixture
async def cache(database, settings):
    c = CompletionCache(settings, database)
    yield c
    await c.close()


@pytest.fixture
async def redis_handle(redis_url):  # noqa: F811
    handle = RedisHandle(redis_url, retry_interval=0.1)
    await handle.connect()
    yield handle
    await handle.close()


@pytest.fixture
async def rcache(sqlite_db, settings, redis_handle):
    c = CompletionCache(settings, sqlite_db, redis_handle)
    yield c
    await c.close()
