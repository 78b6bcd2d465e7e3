"""Per-key admission: requests per minute, tokens per minute, requests in flight,
and the monthly token quota.

    limiter = Limiter(settings, db, redis)          # once, in the app's lifespan
    adm = await limiter.admit(key, reserve_tokens)  # prompt + max new tokens
    ...                                             # adm.headers on the response
    await adm.settle(charged_tokens)                # done, failed (0) or disconnected

Algorithms (the same in Redis and in memory):
- requests: a sliding-window log of the last 60 s, so "30 per minute" means at
  most 30 in any 60 s, exactly, however the requests are spread over replicas;
- tokens: a token bucket of `tpm` tokens refilled at tpm/60 per second; admission
  takes the request's reservation, settling gives back what was not used (or takes
  the excess, which may leave the bucket in debt);
- in flight: a set of admission ids; in Redis each id is a lease that the owning
  process renews, so a crashed gateway cannot hold slots forever;
- monthly quota: a conditional UPDATE on the key's `quota_months` row and a leased
  reservation row (server/services/quotas.py), shared through the database. A
  request admitted with its log record is settled when that record is written
  (server/services/logstore.py), in the same transaction; this process renews the
  leases of its requests in flight and reclaims any replica's expired ones.

With Redis configured the three rate limits run as one atomic Lua script, so any
number of gateways sharing the Redis enforce one limit. While Redis is down each
process limits on its own (or refuses limited keys with 503 when
`LLMCTL_REDIS_FAIL_CLOSED=true`), and returns to Redis by itself
(server/services/redisconn.py). Headers follow OpenAI's
(https://platform.openai.com/docs/guides/rate-limits#rate-limits-in-headers);
a dimension without a limit sends no headers.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field

from server import metrics
from server.db.tables import utcnow
from server.errors import QuotaExceeded, RateLimited, Unavailable
from server.services import quotas
from server.services.keys import KeyInfo
from server.services.quotas import current_month, effective_limits, next_month_start

log = logging.getLogger("llmctl.limits")

WINDOW_MS = 60_000
LEASE_MS = 120_000  # an in-flight slot's lease in Redis; renewed every LEASE_MS / 4
NEVER = -1  # retry_ms when waiting cannot help (request larger than the whole TPM)

# KEYS: requests zset, tokens hash, in-flight zset.
# ARGV: rpm, tpm, max_concurrency, reserve, member, lease_ms.
# Returns {reason, retry_ms, req_count, req_reset_ms, tokens, tok_reset_ms, inflight};
# reason "" means admitted (and recorded); otherwise nothing changed.
ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm, tpm, conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local reserve, member, lease = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local window = 60000
local count, req_reset = 0, 0
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  count = redis.call('ZCARD', KEYS[1])
  if count > 0 then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    req_reset = tonumber(oldest[2]) + window - now
  end
end
local tokens = 0
if tpm > 0 then
  local b = redis.call('HMGET', KEYS[2], 'tokens', 'ts')
  local tk, ts = tonumber(b[1]), tonumber(b[2])
  if tk == nil or ts == nil then tk, ts = tpm, now end
  tokens = math.min(tpm, tk + math.max(0, now - ts) * tpm / window)
end
local inflight = 0
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  inflight = redis.call('ZCARD', KEYS[3])
end
local reason, retry = '', 0
if rpm > 0 and count >= rpm then
  reason, retry = 'rate', req_reset
elseif tpm > 0 and tokens < reserve then
  reason = 'tokens'
  if reserve > tpm then retry = -1 else retry = math.ceil((reserve - tokens) * window / tpm) end
elseif conc > 0 and inflight >= conc then
  reason, retry = 'concurrency', 1000
end
if reason == '' then
  if rpm > 0 then
    redis.call('ZADD', KEYS[1], now, member)
    redis.call('PEXPIRE', KEYS[1], window)
    count = count + 1
    if req_reset == 0 then req_reset = window end
  end
  if tpm > 0 then tokens = tokens - reserve end
  if conc > 0 then
    redis.call('ZADD', KEYS[3], now + lease, member)
    redis.call('PEXPIRE', KEYS[3], lease * 2)
    inflight = inflight + 1
  end
end
local tok_reset = 0
if tpm > 0 then
  redis.call('HSET', KEYS[2], 'tokens', tostring(tokens), 'ts', now)
  redis.call('PEXPIRE', KEYS[2], window * 2)
  tok_reset = math.ceil((tpm - tokens) * window / tpm)
end
return {reason, retry, count, req_reset, math.floor(tokens), tok_reset, inflight}
"""

# KEYS: requests zset, tokens hash, in-flight zset.
# ARGV: tpm, refund (reserve - charged; negative takes more), member, undo_request (0/1).
SETTLE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tpm, refund, member, undo = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
if undo == '1' then redis.call('ZREM', KEYS[1], member) end
if tpm > 0 and refund ~= 0 then
  local b = redis.call('HMGET', KEYS[2], 'tokens', 'ts')
  local tk, ts = tonumber(b[1]), tonumber(b[2])
  if tk == nil or ts == nil then tk, ts = tpm, now end
  tk = math.min(tpm, math.min(tpm, tk + math.max(0, now - ts) * tpm / 60000) + refund)
  redis.call('HSET', KEYS[2], 'tokens', tostring(tk), 'ts', now)
  redis.call('PEXPIRE', KEYS[2], 120000)
end
redis.call('ZREM', KEYS[3], member)
return 1
"""

# KEYS: in-flight zsets; ARGV: lease_ms, then one member per key.
RENEW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i, k in ipairs(KEYS) do
  redis.call('ZADD', k, 'XX', now + lease, ARGV[i + 1])
  redis.call('PEXPIRE', k, lease * 2)
end
return #KEYS
"""


def format_reset(ms: float) -> str:
    """OpenAI's reset format: 20ms, 1s, 6m0s, 1h2m3s."""
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{math.ceil(ms)}ms"
    total = math.ceil(ms / 1000)
    h, rem = divmod(total, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


def _redis_keys(key_id: int) -> list[str]:
    # One hash tag per key, so a Redis Cluster keeps a key's three structures together.
    base = f"llmctl:lim:{{{key_id}}}"
    return [f"{base}:req", f"{base}:tok", f"{base}:conc"]


@dataclass
class _Check:
    """What one admission attempt saw: the Lua script's reply, as a record."""

    reason: str
    retry_ms: float
    req_count: int
    req_reset_ms: float
    tokens: float
    tok_reset_ms: float
    inflight: int

    @classmethod
    def from_reply(cls, reply: list) -> _Check:
        reason = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        retry, count, req_reset, tokens, tok_reset, inflight = (int(v) for v in reply[1:7])
        return cls(reason, retry, count, req_reset, tokens, tok_reset, inflight)


@dataclass
class _LocalKey:
    requests: deque = field(default_factory=deque)  # (t_ms, member), oldest first
    tokens: float | None = None
    tokens_ts: float = 0.0
    inflight: set = field(default_factory=set)


class LocalLimits:
    """The same three limits for one process, in memory (no Redis, or Redis down).

    Every method is synchronous and the gateway runs on one event loop, so each
    check-and-record is atomic without locks."""

    def __init__(self):
        self._keys: dict[int, _LocalKey] = {}

    @staticmethod
    def _now() -> float:
        return time.monotonic() * 1000

    def _refill(self, st: _LocalKey, tpm: int, now: float) -> float:
        if st.tokens is None:
            st.tokens, st.tokens_ts = float(tpm), now
        st.tokens = min(tpm, st.tokens + max(0.0, now - st.tokens_ts) * tpm / WINDOW_MS)
        st.tokens_ts = now
        return st.tokens

    def admit(self, key_id: int, rpm: int, tpm: int, conc: int, reserve: int,
              member: str) -> _Check:
        now = self._now()
        st = self._keys.setdefault(key_id, _LocalKey())
        count = req_reset = 0
        if rpm:
            while st.requests and st.requests[0][0] <= now - WINDOW_MS:
                st.requests.popleft()
            count = len(st.requests)
            if count:
                req_reset = st.requests[0][0] + WINDOW_MS - now
        tokens = self._refill(st, tpm, now) if tpm else 0.0
        reason, retry = "", 0.0
        if rpm and count >= rpm:
            reason, retry = "rate", req_reset
        elif tpm and tokens < reserve:
            reason = "tokens"
            retry = NEVER if reserve > tpm else math.ceil((reserve - tokens) * WINDOW_MS / tpm)
        elif conc and len(st.inflight) >= conc:
            reason, retry = "concurrency", 1000
        if not reason:
            if rpm:
                st.requests.append((now, member))
                count += 1
                req_reset = req_reset or WINDOW_MS
            if tpm:
                st.tokens = tokens = tokens - reserve
            if conc:
                st.inflight.add(member)
        tok_reset = math.ceil((tpm - tokens) * WINDOW_MS / tpm) if tpm else 0
        return _Check(reason, retry, count, req_reset, math.floor(tokens), tok_reset,
                      len(st.inflight))

    def settle(self, key_id: int, tpm: int, refund: int, member: str, undo: bool) -> None:
        st = self._keys.get(key_id)
        if st is None:
            return
        st.inflight.discard(member)
        if undo:
            st.requests = deque(r for r in st.requests if r[1] != member)
        if tpm and refund:
            tokens = self._refill(st, tpm, self._now())
            st.tokens = min(tpm, tokens + refund)


class Admission:
    """An admitted request. `headers` go on the response; `settle` exactly once
    (later calls do nothing), even from a cancelled task."""

    def __init__(self, limiter: Limiter, key: KeyInfo, *, backend: str | None, member: str,
                 reserve: int, tpm: int, month: str, quota_held: bool, headers: dict[str, str],
                 leased: bool = False, record=None):
        self._limiter = limiter
        self.key = key
        self.backend = backend  # "redis", "local" or None (no rate limits)
        self.member = member
        self.reserve = reserve
        self.tpm = tpm
        self.leased = leased  # holds an in-flight slot in Redis
        self.month = month
        self.quota_held = quota_held
        # The request's log record (server/services/logstore.RequestRecord), if any: its
        # record_id names the quota reservation, and writing it settles the quota.
        self.record = record
        self.reservation_id = record.record_id if record is not None else member
        self.headers = headers
        self.settled = False
        self.charged: int | None = None

    async def settle(self, charged_tokens: int = 0) -> None:
        """Record the real cost: frees the in-flight slot, turns the quota reservation
        into `charged_tokens`, and gives unused tokens back to the TPM bucket."""
        if self.settled:
            return
        self.settled = True
        self.charged = max(0, int(charged_tokens))
        self._limiter._quota_leases.discard(self.reservation_id)
        if self.quota_held and self.record is not None:
            # The log writer charges this and releases the reservation in the
            # transaction that inserts the record: exactly once, also when the record
            # is replayed from the journal after a crash. The logged charge is the
            # settled one, so the quota, usage and logs cannot disagree.
            self.record.charged_tokens = self.charged
            self.quota_held = False
        if not self.quota_held and not self.redis_work(self.charged, undo_request=False):
            # Nothing to wait for (in-memory limits, or nothing Redis must change, and
            # no quota): settle here; a shield would schedule a task and a loop turn
            # for it (the cache-hit path).
            self._limiter._settle_local(self, self.charged, undo_request=False)
            return
        # Shielded: a client disconnect cancels the request task, but its slot and
        # reservation must still be given back.
        await asyncio.shield(self._limiter._settle(self, self.charged, undo_request=False))

    def redis_work(self, charged: int, *, undo_request: bool) -> bool:
        """Whether settling changes anything in Redis (SETTLE_LUA): taking the request
        back, refunding or charging the token bucket, or freeing an in-flight slot. A
        free cache hit under RPM/TPM limits changes nothing there."""
        return self.backend == "redis" and (
            undo_request or self.leased or (self.tpm > 0 and self.reserve != charged))


class Limiter:
    """Per-key admission for the gateway; see the module docstring."""

    def __init__(self, settings, db, redis=None):
        self.settings = settings
        self.db = db
        self.redis = redis
        self.local = LocalLimits()
        self._script_admit = self._script_settle = self._script_renew = None
        if redis is not None:
            self._script_admit = redis.client.register_script(ADMIT_LUA)
            self._script_settle = redis.client.register_script(SETTLE_LUA)
            self._script_renew = redis.client.register_script(RENEW_LUA)
        self._leases: dict[str, str] = {}  # member -> in-flight zset, admitted in Redis
        self._renewer: asyncio.Task | None = None
        self.quota_lease = settings.quota_lease_seconds
        self._quota_leases: set[str] = set()  # reservation ids of requests in flight here
        self._keeper: asyncio.Task | None = None

    def start(self) -> None:
        """Renew this process's quota leases and reclaim expired ones (any replica's)."""
        self._keeper = asyncio.get_running_loop().create_task(self._keep_leases())

    # ----- admission

    async def admit(self, key: KeyInfo, reserve_tokens: int, *,
                    hold_quota: bool = True, record=None) -> Admission:
        """`hold_quota=False`: rate limits only (a cache hit that is not charged).
        `record`: the request's log record, which then settles the quota when written."""
        limits = effective_limits(self.settings, key)
        rpm, tpm, conc = limits["rpm"], limits["tpm"], limits["max_concurrency"]
        quota = limits["monthly_token_quota"] if hold_quota else 0
        reserve = max(0, int(reserve_tokens))
        member = os.urandom(16).hex()  # unique across gateways sharing a Redis
        month = current_month() if quota else ""  # only the quota ledger needs it
        backend, check = None, None
        if rpm or tpm or conc:
            backend, check = await self._check(key.id, rpm, tpm, conc, reserve, member)
            if check.reason:
                self._reject(key, check, rpm, tpm, conc, reserve)
        headers = _headers(rpm, tpm, check)
        adm = Admission(self, key, backend=backend, member=member, reserve=reserve, tpm=tpm,
                        month=month, quota_held=False, headers=headers,
                        leased=backend == "redis" and conc > 0, record=record)
        if quota:
            try:
                held = await asyncio.to_thread(
                    quotas.reserve, self.db, key.id, month, reserve, quota,
                    record_id=adm.reservation_id, lease=self.quota_lease)
            except BaseException:
                await self._settle(adm, 0, undo_request=True)
                raise
            if held is None:
                await self._settle(adm, 0, undo_request=True)
                if check is not None:  # the headers should show the request undone
                    check.req_count -= 1
                    check.tokens += reserve if tpm else 0
                self._reject_quota(key, quota, reserve, month, _headers(rpm, tpm, check))
            adm.quota_held = True
            metrics.KEY_QUOTA_USED.labels(str(key.id)).set(held / quota)
            self._quota_leases.add(adm.reservation_id)
            if record is not None:
                record.reserved_month = month
        if backend == "redis" and conc:
            self._leases[member] = _redis_keys(key.id)[2]
            self._start_renewer()
        return adm

    async def _check(self, key_id: int, rpm: int, tpm: int, conc: int, reserve: int,
                     member: str) -> tuple[str, _Check]:
        def local() -> tuple[str, _Check]:
            return "local", self.local.admit(key_id, rpm, tpm, conc, reserve, member)

        if self.redis is None:
            return local()

        async def shared(_client) -> tuple[str, _Check]:
            reply = await self._script_admit(keys=_redis_keys(key_id),
                                             args=[rpm, tpm, conc, reserve, member, LEASE_MS])
            return "redis", _Check.from_reply(reply)

        fallback = None if self.redis.fail_closed else local
        try:
            return await self.redis.run(shared, fallback, operation="limits")
        except Unavailable as exc:
            raise Unavailable(
                "rate limits are unavailable: Redis is down and LLMCTL_REDIS_FAIL_CLOSED "
                f"is set ({self.redis.status()['error']})", headers={"Retry-After": "1"},
            ) from exc

    def _reject(self, key: KeyInfo, check: _Check, rpm: int, tpm: int, conc: int,
                reserve: int):
        headers = _headers(rpm, tpm, check)
        if check.retry_ms != NEVER:
            headers.update(_retry_after(check.retry_ms))
        wait = f" Try again in {format_reset(check.retry_ms)}." if check.retry_ms > 0 else ""
        if check.reason == "rate":
            msg = f"Rate limit reached for key {key.name!r}: {rpm} requests per minute.{wait}"
        elif check.reason == "tokens" and check.retry_ms == NEVER:
            msg = (f"Request too large for key {key.name!r}: it may use {reserve} tokens, more "
                   f"than the limit of {tpm} tokens per minute. Lower max_tokens or the prompt.")
            headers.update(_retry_after(WINDOW_MS))
        elif check.reason == "tokens":
            msg = (f"Rate limit reached for key {key.name!r}: {tpm} tokens per minute, this "
                   f"request may use {reserve}.{wait}")
        else:
            msg = (f"Too many requests in flight for key {key.name!r}: the limit is {conc} "
                   "at a time.")
        err = RateLimited(msg, headers=headers)
        err.reason = check.reason  # rate, tokens or concurrency (llmctl_rejections_total)
        raise err

    def _reject_quota(self, key: KeyInfo, quota: int, reserve: int, month: str,
                      headers: dict[str, str]):
        resets = next_month_start(month)
        seconds = max(1, math.ceil((resets - utcnow()).total_seconds()))
        raise QuotaExceeded(
            f"Monthly token quota exceeded for key {key.name!r}: this request may use "
            f"{reserve} tokens and the quota of {quota} for {month} does not have that many "
            f"left. It resets at {resets.isoformat()}Z.",
            headers={**headers, **_retry_after(seconds * 1000)},
        )

    # ----- settling

    def _settle_local(self, adm: Admission, charged: int, *, undo_request: bool) -> None:
        """The part of settling that never waits: the in-memory limits (a no-op for an
        admission by Redis or with no rate limits)."""
        if adm.backend != "local":
            return
        try:
            self.local.settle(adm.key.id, adm.tpm, adm.reserve - charged, adm.member,
                              undo_request)
        except Exception:  # noqa: BLE001 - settling runs in finally blocks; never mask
            log.exception("settling request limits for key %s failed", adm.key.id)

    async def _settle(self, adm: Admission, charged: int, *, undo_request: bool) -> None:
        self._settle_local(adm, charged, undo_request=undo_request)
        refund = adm.reserve - charged
        try:
            if adm.redis_work(charged, undo_request=undo_request):
                self._leases.pop(adm.member, None)

                async def shared(_client):
                    return await self._script_settle(
                        keys=_redis_keys(adm.key.id),
                        args=[adm.tpm, refund, adm.member, 1 if undo_request else 0])

                # Redis down: its lease expires by itself; nothing to do here.
                await self.redis.run(shared, lambda: None, operation="limits")
            if adm.quota_held:
                adm.quota_held = False
                await asyncio.to_thread(quotas.settle, self.db, adm.reservation_id, adm.key.id,
                                        adm.month, charged)
        except Exception:  # noqa: BLE001 - settling runs in finally blocks; never mask
            log.exception("settling request limits for key %s failed", adm.key.id)

    # ----- in-flight leases

    def _start_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_loop())

    async def _renew_loop(self) -> None:
        while self._leases:
            await asyncio.sleep(LEASE_MS / 4000)
            leases = dict(self._leases)
            if not leases or self.redis is None:
                continue
            try:
                await self.redis.run(
                    lambda _c, leases=leases: self._script_renew(keys=list(leases.values()),
                                                                  args=[LEASE_MS, *leases]),
                    lambda: None, operation="limits")
            except Exception:  # noqa: BLE001
                log.exception("renewing in-flight leases failed")

    async def _keep_leases(self) -> None:
        while True:
            await asyncio.sleep(self.quota_lease / 4)
            try:
                await asyncio.to_thread(quotas.renew, self.db, list(self._quota_leases),
                                        self.quota_lease)
                reclaimed = await asyncio.to_thread(quotas.reclaim_expired, self.db)
                if reclaimed:
                    log.warning("reclaimed %d quota reservations whose lease expired",
                                reclaimed)
            except Exception as exc:  # noqa: BLE001 - the database may be down; try again
                log.warning("quota lease upkeep failed: %s", exc)

    # ----- state

    def status(self) -> dict:
        """For /readyz: where limits are kept and whether they are shared."""
        if self.redis is None:
            return {"mode": "local", "shared": False, "redis": {"configured": False}}
        redis = self.redis.status()
        if redis["available"]:
            mode = "redis"
        else:
            mode = "closed" if self.redis.fail_closed else "local-fallback"
        return {"mode": mode, "shared": redis["available"], "redis": redis}

    async def close(self) -> None:
        for task in (self._renewer, self._keeper):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):  # noqa: BLE001
                    pass


def _retry_after(ms: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(ms / 1000))), "retry-after-ms": str(int(ms))}


def _headers(rpm: int, tpm: int, check: _Check | None) -> dict[str, str]:
    headers: dict[str, str] = {}
    if check is None:
        return headers
    if rpm:
        headers["x-ratelimit-limit-requests"] = str(rpm)
        headers["x-ratelimit-remaining-requests"] = str(max(0, rpm - check.req_count))
        headers["x-ratelimit-reset-requests"] = format_reset(check.req_reset_ms)
    if tpm:
        headers["x-ratelimit-limit-tokens"] = str(tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, int(check.tokens)))
        headers["x-ratelimit-reset-tokens"] = format_reset(check.tok_reset_ms)
    return headers
