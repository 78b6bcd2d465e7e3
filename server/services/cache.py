"""The completion cache: deterministic completions kept in the database, with Redis
as an optional hot layer in front of it, and single-flight so that identical
requests generate once.

Lookup order is Redis, then the database, then the model; a result is written to
both. Redis is never required: when it is down (or not configured) every call
falls back to the database, and a database hit puts the entry back into Redis.

    cache = CompletionCache(settings, db, redis)       # once, in the lifespan
    await cache.start()                                # hit-counter flush + expiry sweep
    ck = cache.key_for(model=..., revision=..., prompt=..., params=..., key_id=...)
    if ck is None: ...                                 # not cacheable: bypass
    async with cache.flight(ck, store=ctl.store) as f:
        if f.hit:
            ... render f.value                         # f.layer: redis | db | flight
        else:
            value = ... generate ...
            await f.fulfil(value)                      # wakes waiters, writes Redis + DB
    await cache.close()

Only deterministic requests are cacheable: greedy (temperature 0) or sampling
with an explicit seed. The hit path does no database write: hit counters are
kept in memory and flushed in batches.

The module also holds the operator queries behind `llmctl cache stats|clear|purge`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, func, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from server import metrics
from server.db.tables import CompletionCache as Entry
from server.db.tables import RequestLog, utcnow
from server.errors import InvalidRequest
from server.services import sqlitereader
from server.services.memo import MISSING, Memo
from server.services.sqlitereader import SqliteReader

log = logging.getLogger("llmctl.cache")

def _count(model: str, layer: str, result: str) -> None:
    """One llmctl_cache_requests_total increment (see server/metrics.py)."""
    metrics.cache_series(model, layer, result).inc()


REDIS_PREFIX = "llmctl:cache:"
LOCK_PREFIX = "llmctl:cache-lock:"
_REDIS_DOWN = object()


# --------------------------------------------------------------------- keys


@dataclass(frozen=True)
class CacheKey:
    """Identifies one cached completion; `key` is the sha256 stored as cache_key."""

    key: str
    scope: str
    model: str
    revision: str | None
    prompt_hash: str
    params_fingerprint: str

    def __str__(self) -> str:
        return self.key

    @property
    def redis_key(self) -> str:
        return redis_key(self.model, self.key)


def redis_key(model: str, key: str) -> str:
    # The model's digest in the name lets `cache clear --model` find its Redis
    # entries with SCAN without escaping glob characters in model names.
    return f"{REDIS_PREFIX}{_model_tag(model)}:{key}"


def _model_tag(model: str) -> str:
    return hashlib.sha256(model.encode()).hexdigest()[:12]


def _canon(value: Any) -> Any:
    """JSON-stable form: 1.0 and 1 agree, tuples are lists, dict keys are sorted later."""
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {str(k): _canon(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canon(v) for v in value]
    return str(value)


# What json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False) uses,
# built once: json.dumps builds a new encoder for every call with non-default options.
_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _digest(value: Any) -> str:
    return hashlib.sha256(_CANONICAL_JSON.encode(value).encode()).hexdigest()


def prompt_hash(prompt: str | Sequence[int] | Sequence[str] | Sequence[dict]) -> str:
    """sha256 of what the model sees: the exact text (for chat, the rendered template),
    token ids, several prompts (a batch), or — where a remote renders the template —
    the messages themselves. Each form is tagged, so none collides with another."""
    if isinstance(prompt, str):
        return _digest(["text", prompt])
    items = list(prompt)
    if all(isinstance(t, int) and not isinstance(t, bool) for t in items):
        return _digest(["ids", items])
    return _digest(["items", _canon(items)])


_SCALARS = (str, int, float, bool, type(None))


def _exact(prompt, params: dict) -> tuple | None:
    """A hashable stand-in for (prompt, params) that is equal only for inputs that are
    the same values of the same types (1, 1.0 and True are equal in Python but not to
    the digests); None for inputs outside the common shapes (text prompts, scalar and
    string-tuple parameters), which are simply not remembered."""
    if isinstance(prompt, str):
        prompts: tuple = (prompt,)
    elif all(type(p) is str for p in prompt):
        prompts = tuple(prompt)
    else:
        return None
    items = []
    for name, value in params.items():
        kind = type(value)
        if kind in _SCALARS or (kind is tuple and all(type(v) is str for v in value)):
            items.append((name, kind, value))
        else:
            return None
    return type(prompt), prompts, tuple(items)


def params_fingerprint(params: dict) -> str:
    """sha256 over every parameter that can change the output. `None` values are
    dropped, so leaving a parameter out and sending its null agree."""
    clean = {k: _canon(v) for k, v in params.items() if v is not None}
    if isinstance(clean.get("stop"), str):
        clean["stop"] = [clean["stop"]]
    return _digest(clean)


def is_deterministic(temperature: float | None, seed: int | None) -> bool:
    """Greedy decoding, or sampling with an explicit seed. A missing temperature is
    the OpenAI default of 1 (sampling)."""
    return (temperature is not None and float(temperature) == 0.0) or seed is not None


@dataclass(frozen=True)
class CacheControl:
    """What one request allows: `lookup` (read the cache) and `store` (write it)."""

    lookup: bool = True
    store: bool = True


def parse_controls(cache_control: str | None = None, field_value: Any = None) -> CacheControl:
    """From the `Cache-Control` header and `/v1/generate`'s `cache` field.

    Header directives (RFC 9111 §5.2.1): `no-cache` skips the lookup, `no-store`
    skips the write; others are ignored. The `cache` field is `true` (default),
    `false` (neither), or a string of the same directives."""
    directives: set[str] = set()
    if cache_control:
        directives |= {d.strip().lower().split("=")[0] for d in cache_control.split(",")}
    if field_value is False:
        directives |= {"no-cache", "no-store"}
    elif isinstance(field_value, str):
        directives |= {d.strip().lower() for d in field_value.split(",")}
    elif field_value not in (None, True):
        raise InvalidRequest("cache: expected true, false, 'no-cache' or 'no-store'",
                             param="cache")
    return CacheControl(lookup="no-cache" not in directives, store="no-store" not in directives)


# --------------------------------------------------------------------- single-flight


class _Abandoned(Exception):
    """The leader went away without a result (client gone): a waiter takes over."""


@dataclass
class Flight:
    """One request's place in a flight: a hit (`value` set), or the leader that must
    generate and then `fulfil`."""

    cache: CompletionCache
    ck: CacheKey
    store: bool
    value: dict | None = None
    layer: str | None = None  # redis | db | flight, when a hit
    leader: bool = False
    _future: asyncio.Future | None = None
    _lock_token: str | None = None
    _refresher: asyncio.Task | None = None
    _done: bool = field(default=False, repr=False)

    @property
    def hit(self) -> bool:
        return self.value is not None and not self.leader

    async def fulfil(self, value: dict, **_: Any) -> None:
        """Hand the generated value to the waiters and store it (unless no-store)."""
        if not self.leader or self._done:
            return
        self._done = True
        self.value = value
        try:
            await self.cache._finish(self, value)
        finally:
            self._release_local(value=value)

    async def release(self, exc: BaseException | None = None) -> None:
        """End a flight that produced nothing (an error, the client gone): waiters
        get the error, or take over when the leader was cancelled. A no-op after
        `fulfil` and for hits."""
        if not self.leader or self._done:
            return
        self._done = True
        try:
            await self.cache._release_lock(self)
        finally:
            self._release_local(exc=exc)

    def _release_local(self, value: dict | None = None, exc: BaseException | None = None):
        fut = self._future
        if self._refresher is not None:
            self._refresher.cancel()
        if fut is not None and not fut.done():
            if value is not None:
                fut.set_result(value)
            elif exc is None or isinstance(exc, asyncio.CancelledError | GeneratorExit):
                fut.set_exception(_Abandoned())
            else:
                fut.set_exception(exc)
            if fut.exception() is not None:
                pass  # retrieved: no "exception never retrieved" warning without waiters
        if self.cache._inflight.get(self.ck.key) is fut:
            del self.cache._inflight[self.ck.key]


# --------------------------------------------------------------------- the service


class CompletionCache:
    """The cache service; one per process, built in the lifespan."""

    def __init__(self, settings, db, redis=None, *, flush_interval: float = 1.0,
                 sweep_interval: float = 60.0, lock_ttl: float = 10.0,
                 wait_timeout: float = 600.0):
        self.settings = settings
        self.db = db
        self.redis = redis  # server.services.redisconn.RedisHandle | None
        self.enabled = bool(settings.cache_enabled)
        self.ttl = int(settings.cache_ttl)
        self.scope = settings.cache_scope
        self.flush_interval = flush_interval
        self.sweep_interval = sweep_interval
        self.lock_ttl = lock_ttl  # the leader refreshes its lock every lock_ttl/3
        self.wait_timeout = wait_timeout
        self._keys = Memo()  # key_for's results: (scope, model, prompt, params) -> CacheKey
        self._inflight: dict[str, asyncio.Future] = {}
        self._pending_hits: dict[str, list] = {}  # key -> [count, last_hit_at]
        self._background: set[asyncio.Task] = set()
        self._repopulating: set[str] = set()
        self._task: asyncio.Task | None = None
        # SQLite reads are microseconds and never wait on writers (WAL): run them
        # inline, on a read-only connection of the cache's own (the hit path's
        # biggest cost after the web framework). Server databases go through a thread.
        self._sqlite: _SqliteEntries | None = (
            _SqliteEntries(SqliteReader(db)) if sqlitereader.usable(db) else None)

    # ----- lifecycle

    async def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._maintain())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.flush_hits()
        if self._sqlite is not None:
            self._sqlite.close()

    async def _maintain(self) -> None:
        next_sweep = time.monotonic() + self.sweep_interval
        while True:
            await asyncio.sleep(self.flush_interval)
            try:
                await self.flush_hits()
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self.sweep_interval
                    await asyncio.to_thread(sweep_expired, self.db)
            except Exception:  # noqa: BLE001 - maintenance must never stop
                log.exception("cache maintenance failed")

    # ----- keys and controls

    def key_for(self, *, prompt: str | Sequence[int] | Sequence[str] | Sequence[dict],
                params: dict, model: str | None = None, model_id: str | None = None,
                revision: str | None = None, key_id: int | None = None) -> CacheKey | None:
        """The cache key for a request, or None when it is not cacheable (the cache is
        off, or the request samples without a seed).

        `model` is the name stored with the entry (what stats and `clear --model`
        use: the name request logs carry); `model_id` and `revision` identify the
        weights and go into the key (`model_id` defaults to `model`). `prompt` is
        what the model sees: text, token ids, a list of prompts, or messages.
        `params` holds every parameter that can change the output (max_tokens, stop,
        temperature, top_p, top_k, seed, logprobs, echo, n, …) plus the API route, so
        that each API's cached value keeps its own shape."""
        if not self.enabled or not is_deterministic(params.get("temperature"),
                                                     params.get("seed")):
            return None
        name = model or model_id
        if name is None:
            raise TypeError("key_for needs model or model_id")
        scope = "global" if self.scope == "global" else f"key:{key_id if key_id else '-'}"
        # Three canonical-JSON digests were a tenth of a cache hit's cost: remember them
        # for inputs seen recently, where the inputs can be compared exactly.
        exact = _exact(prompt, params)
        memo_key = None if exact is None else (scope, name, model_id, revision, *exact)
        if memo_key is not None:
            known = self._keys.get(memo_key)
            if known is not MISSING:
                return known
        ph, pf = prompt_hash(prompt), params_fingerprint(params)
        key = _digest([scope, model_id or name, revision, ph, pf])
        ck = CacheKey(key=key, scope=scope, model=name, revision=revision, prompt_hash=ph,
                      params_fingerprint=pf)
        if memo_key is not None:
            self._keys.put(memo_key, ck, sum(len(p) for p in exact[1]))
        return ck

    @staticmethod
    def controls(cache_control: str | None = None, field_value: Any = None) -> CacheControl:
        return parse_controls(cache_control, field_value)

    @staticmethod
    def record_bypass(model: str) -> None:
        _count(model, "none", "bypass")

    # ----- lookups

    async def get(self, ck: CacheKey, *, record: bool = True) -> tuple[dict | None, str | None]:
        """(value, layer) with layer "redis" or "db", or (None, None) on a miss."""
        if self._redis_usable:
            raw = await self._redis(lambda r: r.get(ck.redis_key))
            if raw is not _REDIS_DOWN and raw is not None:
                value = json.loads(raw)
                self._note_hit(ck.key)
                if record:
                    _count(ck.model, "redis", "hit")
                return value, "redis"
        row = await self._db_read(ck.key)
        if row is None:
            if record:
                _count(ck.model, "db", "miss")
            return None, None
        value, expires_at = row
        self._note_hit(ck.key)
        if record:
            _count(ck.model, "db", "hit")
        if self._redis_usable:
            self._repopulate(ck, value, expires_at)
        return value, "db"

    async def lookup(self, ck: CacheKey) -> tuple[dict | None, str | None]:
        """`get` for a fast path ahead of `flight`: a hit is counted in the metrics, a
        miss is not (the flight that follows counts it)."""
        value, layer = await self.get(ck, record=False)
        if value is not None:
            _count(ck.model, layer, "hit")
        return value, layer

    @asynccontextmanager
    async def flight(self, ck: CacheKey, *, store: bool = True) -> AsyncIterator[Flight]:
        """Look `ck` up; on a miss, either wait for an identical request in flight
        (in this process, or in another one through a Redis lock) or lead it.

        The leader must `await flight.fulfil(value)`; leaving the block without it
        (an error, a client gone) hands leadership to a waiter."""
        f = await self.join(ck, store=store)
        try:
            yield f
        except BaseException as exc:
            await asyncio.shield(f.release(exc))
            raise
        else:
            await f.release()

    async def single_flight(self, ck: CacheKey, produce: Callable[[], Awaitable[dict]], *,
                            store: bool = True) -> tuple[dict, str | None]:
        """(value, layer): layer is None when this call generated it with `produce()`."""
        async with self.flight(ck, store=store) as f:
            if f.hit:
                return f.value, f.layer
            value = await produce()
            await f.fulfil(value)
            return value, None

    async def join(self, ck: CacheKey, *, store: bool = True) -> Flight:
        """`flight()` without the block, for callers whose generation outlives a
        `with` (a streaming response): a leader must end with `fulfil(value)` or
        `release(exc)`."""
        deadline = time.monotonic() + self.wait_timeout
        while True:
            value, layer = await self.get(ck, record=False)
            if value is not None:
                _count(ck.model, layer, "hit")
                return Flight(self, ck, store, value=value, layer=layer)
            fut = self._inflight.get(ck.key)
            if fut is not None:
                try:
                    value = await asyncio.shield(fut)
                except _Abandoned:
                    continue
                _count(ck.model, "flight", "hit")
                return Flight(self, ck, store, value=value, layer="flight")
            fut = asyncio.get_running_loop().create_future()
            self._inflight[ck.key] = fut
            f = Flight(self, ck, store, leader=True, _future=fut)
            try:
                got = await self._acquire_lock(f, deadline)
            except BaseException as exc:
                f._release_local(exc=exc)
                raise
            if got is True:
                # Double-check: an identical request may have finished and left the
                # flight between our lookup and our taking the lead.
                value, layer = await self.get(ck, record=False)
                if value is None:
                    _count(ck.model, "db", "miss")
                    return f
                await self._release_lock(f)
                got = value
            # Another process finished it (value) or gave it up (retry the lookup).
            if got is not None:
                f.leader, f._done = False, True
                f.value, f.layer = got, "flight"
                f._release_local(value=got)
                _count(ck.model, "flight", "hit")
                return f
            f._done = True
            f._release_local()

    # ----- cross-process lock (Redis)

    async def _acquire_lock(self, f: Flight, deadline: float) -> dict | bool | None:
        """True: we lead (holding the Redis lock, or Redis is unusable). A dict: another
        process produced the value while we waited. None: it gave up; look again."""
        if not self._redis_usable:
            return True
        token = secrets.token_hex(8)
        lock = LOCK_PREFIX + f.ck.key
        ttl_ms = int(self.lock_ttl * 1000)
        got = await self._redis(lambda r: r.set(lock, token, nx=True, px=ttl_ms))
        if got is _REDIS_DOWN:
            return True  # Redis just went down: lead locally
        if got:
            # Double-check: another process may have stored it between our lookup
            # and the lock.
            raw = await self._redis(lambda r: r.get(f.ck.redis_key))
            if isinstance(raw, bytes | str):
                await self._redis(lambda r: _release(r, lock, token))
                return json.loads(raw)
            f._lock_token = token
            f._refresher = asyncio.get_running_loop().create_task(self._refresh_lock(lock, token))
            return True
        return await self._wait_remote(f.ck, lock, deadline)

    async def _wait_remote(self, ck: CacheKey, lock: str, deadline: float) -> dict | bool | None:
        delay = 0.005
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.05)

            async def poll(r):
                async with r.pipeline(transaction=False) as p:
                    return await p.get(ck.redis_key).exists(lock).execute()

            res = await self._redis(poll)
            if res is _REDIS_DOWN:
                return True  # Redis went down while we waited: generate here
            raw, locked = res
            if raw is not None:
                return json.loads(raw)
            if not locked:
                return None
        return True

    async def _refresh_lock(self, lock: str, token: str) -> None:
        ttl_ms = int(self.lock_ttl * 1000)
        try:
            while True:
                await asyncio.sleep(self.lock_ttl / 3)
                await self._redis(lambda r: _refresh(r, lock, token, ttl_ms))
        except asyncio.CancelledError:
            pass

    async def _release_lock(self, f: Flight) -> None:
        if f._refresher is not None:
            f._refresher.cancel()
        if f._lock_token is not None:
            token, f._lock_token = f._lock_token, None
            await self._redis(lambda r: _release(r, LOCK_PREFIX + f.ck.key, token))

    async def _finish(self, f: Flight, value: dict) -> None:
        """Leader done: wake local waiters, then Redis (waking other processes), then
        the database. The flight stays registered until the database has it, so a
        request arriving meanwhile waits instead of generating again."""
        fut = f._future
        if fut is not None and not fut.done():
            fut.set_result(value)
        try:
            if f.store:
                await self.put(f.ck, value)
        finally:
            await self._release_lock(f)

    # ----- writes

    def _expires_at(self) -> datetime | None:
        return utcnow() + timedelta(seconds=self.ttl) if self.ttl > 0 else None

    async def put(self, ck: CacheKey, value: dict, **_: Any) -> None:
        """Store `value` in Redis (when usable) and the database. Errors are logged,
        never raised: a failed write only costs a future miss. (The model and revision
        come from `ck`; other keyword arguments are accepted and ignored.)"""
        raw = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        expires_at = self._expires_at()
        if self._redis_usable:
            await self._redis_set(ck.redis_key, raw, expires_at)
        try:
            await asyncio.to_thread(self._db_write, ck, value, len(raw.encode()), expires_at)
        except (SQLAlchemyError, Exception):  # noqa: BLE001
            metrics.DATABASE_ERRORS.labels("cache_write").inc()
            log.exception("cache: could not store an entry for %s", ck.model)

    def _db_write(self, ck: CacheKey, value: dict, size: int, expires_at) -> None:
        now = utcnow()
        row = dict(cache_key=ck.key, scope=ck.scope, model=ck.model,
                   model_revision=ck.revision, prompt_hash=ck.prompt_hash,
                   params_fingerprint=ck.params_fingerprint, response=value, size_bytes=size,
                   hits=0, created_at=now, last_hit_at=None, expires_at=expires_at)
        fresh = dict(response=value, size_bytes=size, created_at=now, expires_at=expires_at)
        self.db.ensure_schema()
        dialect = self.db.engine.dialect.name
        with self.db.engine.begin() as conn:
            if dialect in ("sqlite", "postgresql"):
                if dialect == "sqlite":
                    from sqlalchemy.dialects.sqlite import insert
                else:
                    from sqlalchemy.dialects.postgresql import insert
                stmt = insert(Entry).values(**row)
                conn.execute(stmt.on_conflict_do_update(index_elements=["cache_key"],
                                                        set_=fresh))
                return
        try:
            with self.db.engine.begin() as conn:
                conn.execute(Entry.__table__.insert().values(**row))
        except IntegrityError:
            with self.db.engine.begin() as conn:
                conn.execute(update(Entry).where(Entry.cache_key == ck.key).values(**fresh))

    async def _redis_set(self, rkey: str, raw: str, expires_at: datetime | None) -> None:
        if expires_at is None:
            await self._redis(lambda r: r.set(rkey, raw))
            return
        ms = int((expires_at - utcnow()).total_seconds() * 1000)
        if ms > 0:
            await self._redis(lambda r: r.set(rkey, raw, px=ms))

    def _repopulate(self, ck: CacheKey, value: dict, expires_at: datetime | None) -> None:
        """A database hit while Redis is up: put the entry back in the hot layer
        (after a Redis restart, or an entry written while Redis was down)."""
        if ck.key in self._repopulating:
            return
        self._repopulating.add(ck.key)
        raw = json.dumps(value, separators=(",", ":"), ensure_ascii=False)

        async def run():
            try:
                await self._redis_set(ck.redis_key, raw, expires_at)
            finally:
                self._repopulating.discard(ck.key)

        self._spawn(run())

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ----- hit counters

    def _note_hit(self, key: str) -> None:
        pending = self._pending_hits.get(key)
        if pending is None:
            self._pending_hits[key] = [1, utcnow()]
        else:
            pending[0] += 1
            pending[1] = utcnow()

    async def flush_hits(self) -> int:
        """Write the hit counters gathered since the last flush; returns the entries touched."""
        if not self._pending_hits:
            return 0
        pending, self._pending_hits = self._pending_hits, {}
        rows = [{"k": k, "n": n, "t": t} for k, (n, t) in pending.items()]
        try:
            await asyncio.to_thread(_write_hits, self.db, rows)
        except Exception:  # noqa: BLE001 - counters are best effort
            log.exception("cache: could not write hit counters")
        return len(rows)

    # ----- database reads

    async def _db_read(self, key: str) -> tuple[dict, datetime | None] | None:
        try:
            if self._sqlite is not None:
                return self._sqlite.read(key)
            return await asyncio.to_thread(_read_entry, self.db, key)
        except Exception:  # noqa: BLE001 - a cache read never fails a request
            metrics.DATABASE_ERRORS.labels("cache_read").inc()
            log.exception("cache: database lookup failed")
            return None

    # ----- Redis

    @property
    def _redis_usable(self) -> bool:
        return self.redis is not None

    async def _redis(self, fn: Callable) -> Any:
        """`fn(client)` through the handle; _REDIS_DOWN when Redis is down or errs."""
        try:
            return await self.redis.run(fn, fallback=lambda: _REDIS_DOWN, operation="cache")
        except Exception:  # noqa: BLE001 - a Redis failure never fails a request
            log.exception("cache: redis call failed")
            return _REDIS_DOWN


_RELEASE = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
            "return redis.call('del', KEYS[1]) else return 0 end")
_REFRESH = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
            "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end")


def _release(r, lock: str, token: str):
    return r.eval(_RELEASE, 1, lock, token)


def _refresh(r, lock: str, token: str, ttl_ms: int):
    return r.eval(_REFRESH, 1, lock, token, ttl_ms)


_READ = (select(Entry.response, Entry.expires_at)
         .where(Entry.cache_key == bindparam("k")))


def _read_entry(db, key: str) -> tuple[dict, datetime | None] | None:
    db.ensure_schema()
    with db.engine.connect() as conn:
        row = conn.execute(_READ, {"k": key}).first()
    if row is None:
        return None
    if row.expires_at is not None and row.expires_at <= utcnow():
        return None
    return row.response, row.expires_at


class _SqliteEntries:
    """Entry lookups on the event loop, through the cache's own read-only connection
    (WAL: readers never wait for the log writer or the cache's own writes)."""

    SQL = "SELECT response, expires_at FROM completion_cache WHERE cache_key = ?"

    def __init__(self, reader: SqliteReader):
        self.reader = reader

    def read(self, key: str) -> tuple[dict, datetime | None] | None:
        row = self.reader.one(self.SQL, (key,))
        if row is None:
            return None
        raw, expires = row
        expires_at = datetime.fromisoformat(expires) if expires else None
        if expires_at is not None and expires_at <= utcnow():
            return None
        return (json.loads(raw) if isinstance(raw, str | bytes) else raw), expires_at

    def close(self) -> None:
        self.reader.close()


_HITS = (update(Entry).where(Entry.cache_key == bindparam("k"))
         .values(hits=Entry.hits + bindparam("n"), last_hit_at=bindparam("t")))


def _write_hits(db, rows: list[dict]) -> None:
    db.ensure_schema()
    with db.engine.begin() as conn:
        conn.execute(_HITS, rows)


# --------------------------------------------------------------------- operator queries


def sweep_expired(db, now: datetime | None = None) -> int:
    """Delete entries whose TTL has passed; returns how many. Redis expires its own."""
    now = now or utcnow()
    with db.session() as s:
        result = s.execute(delete(Entry).where(Entry.expires_at.is_not(None),
                                               Entry.expires_at <= now))
        return result.rowcount or 0


def stats(db, *, model: str | None = None) -> dict:
    """Entries, bytes and hits of the live entries; hit/miss/bypass counts and the hit
    ratio from the request log; both by model."""
    now = utcnow()
    live = (Entry.expires_at.is_(None)) | (Entry.expires_at > now)
    with db.session() as s:
        q = (select(Entry.model, func.count(), func.coalesce(func.sum(Entry.size_bytes), 0),
                    func.coalesce(func.sum(Entry.hits), 0))
             .where(live).group_by(Entry.model))
        lq = (select(RequestLog.model, RequestLog.cache_status, func.count())
              .where(RequestLog.cache_status.is_not(None))
              .group_by(RequestLog.model, RequestLog.cache_status))
        expired_q = select(func.count()).select_from(Entry).where(~live)
        if model is not None:
            q, lq = q.where(Entry.model == model), lq.where(RequestLog.model == model)
            expired_q = expired_q.where(Entry.model == model)
        entries = s.execute(q).all()
        logs = s.execute(lq).all()
        expired = s.scalar(expired_q) or 0
    by_model: dict[str, dict] = {}

    def slot(name: str | None) -> dict:
        name = name or "-"
        return by_model.setdefault(name, {"model": name, "entries": 0, "bytes": 0,
                                          "stored_hits": 0, "hits": 0, "misses": 0,
                                          "bypasses": 0})

    for name, count, size, hits in entries:
        d = slot(name)
        d["entries"], d["bytes"], d["stored_hits"] = int(count), int(size), int(hits)
    names = {"hit": "hits", "miss": "misses", "bypass": "bypasses"}
    for name, status, count in logs:
        if status in names:
            slot(name)[names[status]] += int(count)
    rows = sorted(by_model.values(), key=lambda d: d["model"])
    for d in rows:
        d["hit_ratio"] = _ratio(d["hits"], d["misses"])
    total = {k: sum(d[k] for d in rows)
             for k in ("entries", "bytes", "stored_hits", "hits", "misses", "bypasses")}
    return {**total, "expired": int(expired), "hit_ratio": _ratio(total["hits"], total["misses"]),
            "models": rows}


def _ratio(hits: int, misses: int) -> float | None:
    return round(hits / (hits + misses), 4) if hits + misses else None


def clear(db, *, model: str | None = None, redis_url: str | None = None) -> dict:
    """Delete every entry (or one model's) from the database and from Redis."""
    with db.session() as s:
        stmt = delete(Entry)
        if model is not None:
            stmt = stmt.where(Entry.model == model)
        deleted = s.execute(stmt).rowcount or 0
    result = {"deleted": deleted, "model": model}
    if redis_url:
        pattern = f"{REDIS_PREFIX}{_model_tag(model)}:*" if model else f"{REDIS_PREFIX}*"
        result["redis"] = _redis_sync(redis_url, lambda r: _scan_delete(r, pattern))
    return result


def purge(db, *, older_than: timedelta, redis_url: str | None = None) -> dict:
    """Delete entries created more than `older_than` ago (and their Redis copies)."""
    cutoff = utcnow() - older_than
    with db.session() as s:
        victims = s.execute(select(Entry.id, Entry.model, Entry.cache_key)
                            .where(Entry.created_at < cutoff)).all()
        ids = [v.id for v in victims]
        for i in range(0, len(ids), 500):
            s.execute(delete(Entry).where(Entry.id.in_(ids[i:i + 500])))
    result = {"deleted": len(victims), "older_than_s": int(older_than.total_seconds()),
              "cutoff": cutoff}
    if redis_url and victims:
        keys = [redis_key(v.model, v.cache_key) for v in victims]
        result["redis"] = _redis_sync(redis_url, lambda r: _delete_keys(r, keys))
    return result


def _scan_delete(r, pattern: str) -> int:
    n, batch = 0, []
    for key in r.scan_iter(match=pattern, count=500):
        batch.append(key)
        if len(batch) >= 500:
            n += r.delete(*batch)
            batch = []
    if batch:
        n += r.delete(*batch)
    return n


def _delete_keys(r, keys: list[str]) -> int:
    return sum(r.delete(*keys[i:i + 500]) for i in range(0, len(keys), 500))


def _redis_sync(url: str, fn: Callable) -> dict:
    """Run `fn` on a short-lived sync client; report, never raise, when Redis is down
    (its entries then expire by TTL)."""
    import redis as redis_lib

    from server.services.redisconn import redact_redis_url

    client = redis_lib.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        return {"deleted": fn(client)}
    except (redis_lib.RedisError, OSError) as exc:
        return {"error": f"redis {redact_redis_url(url)} unreachable: {exc}"}
    finally:
        client.close()
