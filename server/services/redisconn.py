"""One shared Redis connection that knows whether Redis is up.

Redis is optional (shared limits, hot cache). When it goes away the gateway must
keep serving on its fallbacks, say so once in the log and in `/readyz`, and go
back to Redis by itself when it returns. `RedisHandle` owns that state so every
service using Redis behaves the same:

    handle = RedisHandle(url, fail_closed=False)
    await handle.connect()                    # at start-up; never raises
    value = await handle.run(lambda r: r.get("k"), fallback=lambda: local_get("k"))

`run` tries Redis when it is believed up (or when a retry is due); on a
connection error it marks Redis down, logs the loss once, starts a background
probe, and returns `fallback()` instead. With no fallback it raises
`Unavailable` (503), which is what fail-closed callers want.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server import metrics
from server.errors import Unavailable

log = logging.getLogger("llmctl.redis")

T = TypeVar("T")

# What "Redis is unreachable" looks like; anything else (a script bug, a wrong
# type) is a real error and propagates.
DOWN_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError,
)


def redact_redis_url(url: str) -> str:
    """The URL with any password replaced by ***."""
    return re.sub(r"(//[^:/@]*):[^@/]*@", r"\1:***@", url)


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).replace(tzinfo=None).isoformat() + "Z"


class RedisHandle:
    """A redis.asyncio client plus up/down state, loss logging and reconnection."""

    def __init__(self, url: str, fail_closed: bool = False, *, retry_interval: float = 1.0,
                 timeout: float = 0.5):
        self.url = url
        self.fail_closed = fail_closed
        self.retry_interval = retry_interval
        # Short timeouts: a dead Redis must cost a request milliseconds, not seconds.
        # One immediate retry lets a pooled connection broken by a Redis restart
        # reconnect transparently.
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1), health_check_interval=0,
        )
        self._available = False
        self._connected_once = False
        self._down_since: float | None = None
        self._last_error: str | None = None
        self._next_retry = 0.0
        self._probe: asyncio.Task | None = None
        self._closed = False

    @classmethod
    def from_settings(cls, settings) -> RedisHandle | None:
        """A handle for the configured Redis, or None when Redis is not configured."""
        url = settings.redis_active_url
        return cls(url, settings.redis_fail_closed) if url else None

    # ----- state

    @property
    def available(self) -> bool:
        return self._available

    @property
    def safe_url(self) -> str:
        return redact_redis_url(self.url)

    def status(self) -> dict:
        """For /readyz: whether Redis is up and, when not, why and since when."""
        return {
            "configured": True,
            "url": self.safe_url,
            "available": self._available,
            "fail_closed": self.fail_closed,
            "down_since": _iso(self._down_since),
            "error": None if self._available else self._last_error,
        }

    def _mark_up(self) -> None:
        if not self._available:
            if self._connected_once or self._down_since is not None:
                log.warning("redis %s is reachable again; shared state resumes", self.safe_url)
            else:
                log.info("connected to redis %s", self.safe_url)
        self._available = True
        self._connected_once = True
        self._down_since = None
        self._last_error = None

    def _mark_down(self, exc: BaseException) -> None:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self._last_error = redact_redis_url(reason)
        self._next_retry = time.monotonic() + self.retry_interval
        if self._available or self._down_since is None:
            # Logged once per outage, not once per request.
            log.warning("redis %s is unreachable (%s); %s until it returns", self.safe_url,
                        self._last_error,
                        "refusing requests that need it" if self.fail_closed
                        else "falling back to per-process state")
            self._down_since = time.time()
        self._available = False
        self._start_probe()

    # ----- connecting and probing

    async def ping(self) -> bool:
        """One PING; updates the state and returns whether Redis answered."""
        try:
            await self.client.ping()
        except DOWN_ERRORS as exc:
            metrics.REDIS_ERRORS.labels("probe").inc()
            self._mark_down(exc)
            return False
        self._mark_up()
        return True

    async def connect(self) -> bool:
        """Check Redis at start-up. Never raises: an absent Redis is a degraded mode."""
        return await self.ping()

    def _start_probe(self) -> None:
        if self._closed or (self._probe is not None and not self._probe.done()):
            return
        try:
            self._probe = asyncio.get_running_loop().create_task(self._probe_loop())
        except RuntimeError:  # no running loop: the next run() retries instead
            self._probe = None

    async def _probe_loop(self) -> None:
        # Returns to Redis without traffic too, so /readyz turns green by itself.
        while not self._closed and not self._available:
            await asyncio.sleep(self.retry_interval)
            if self._closed:
                return
            try:
                await self.client.ping()
            except DOWN_ERRORS as exc:
                metrics.REDIS_ERRORS.labels("probe").inc()
                self._last_error = redact_redis_url(str(exc).strip().splitlines()[0]
                                                    if str(exc).strip() else type(exc).__name__)
                continue
            except Exception:  # noqa: BLE001 - a probe must never kill the loop
                log.exception("redis probe failed")
                continue
            self._mark_up()

    # ----- calls

    async def run(self, fn: Callable[[aioredis.Redis], Awaitable[T]],
                  fallback: Callable[[], Any] | None = None, *, operation: str = "call") -> T:
        """`await fn(client)`, or `fallback()` (awaited if it is async) while Redis is down.

        Without a fallback, a down Redis raises Unavailable (503). `operation` labels
        llmctl_redis_errors_total when the call fails."""
        if self._available or time.monotonic() >= self._next_retry:
            try:
                result = await fn(self.client)
            except DOWN_ERRORS as exc:
                metrics.REDIS_ERRORS.labels(operation).inc()
                self._mark_down(exc)
            else:
                self._mark_up()
                return result
        if fallback is None:
            raise Unavailable(f"redis {self.safe_url} is unavailable: {self._last_error}")
        value = fallback()
        if inspect.isawaitable(value):
            value = await value
        return value

    async def close(self) -> None:
        self._closed = True
        if self._probe is not None and not self._probe.done():
            self._probe.cancel()
            try:
                await self._probe
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        try:
            await self.client.aclose()
        except DOWN_ERRORS:
            pass
