"""RouterEngine: one model served by several backends (replicas) and its fallbacks,
behind the ordinary ModelEngine interface.

The cache, limits, quotas and request logs sit in front of it unchanged: to them a
model with replicas is one engine. For each request it

- picks, among the backends in rotation, one with the fewest outstanding requests;
  ties go to a random one in proportion to `weight`. A slow replica holds its
  requests longer, so it receives fewer;
- retries on another backend a request that failed before its first byte (connect
  error, timeout, 5xx, 429), within the model's `routing.attempts` and the gateway's
  RetryBudget. A stream that has started is never retried: it ends with an error;
- ejects a backend after `routing.eject_after` consecutive failures, for a cooldown
  that doubles while it keeps failing. A background probe brings an ejected remote
  backend back as soon as it answers; any backend gets one trial request when its
  cooldown ends;
- when none of its own backends could answer, asks its fallback models in order.

It notes on the EngineRequest who answered and how many attempts it took (the
`x-llmctl-backend` header and the request log read them).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from server import metrics
from server.config import ModelSpec, RoutingSpec
from server.engines.base import Completion, EngineRequest, ModelEngine, StreamDelta
from server.engines.retrybudget import RetryBudget
from server.errors import LlmctlError, RateLimited, Unavailable, UpstreamError

# Failures that count against a backend's health; with "overloaded" (a busy backend,
# not a broken one) they are also the ones retried elsewhere.
FAILURES = frozenset({"connect", "timeout", "upstream", "unavailable"})
RETRYABLE = FAILURES | {"overloaded"}
RECENT = 60.0  # seconds of errors that `status()` reports


def reason(exc: BaseException) -> str:
    """The metrics and health label for a failed attempt."""
    if isinstance(exc, RateLimited):
        return "overloaded"
    if isinstance(exc, Unavailable):
        return "connect" if exc.code == "upstream_unreachable" else "unavailable"
    if isinstance(exc, UpstreamError):
        return "timeout" if exc.code == "upstream_timeout" else "upstream"
    return "client" if isinstance(exc, LlmctlError) and exc.status_code < 500 else "other"


@dataclass
class Backend:
    """One replica and its health: in rotation, or ejected until `ejected_until`."""

    model: str
    name: str
    engine: ModelEngine
    weight: float
    spec: ModelSpec
    routing: RoutingSpec
    in_flight: int = 0
    failures: int = 0  # consecutive
    ejected: bool = False
    ejected_until: float = 0.0
    ejections: int = 0
    cooldown: float = 0.0  # the next ejection's length
    requests: int = 0
    errors: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=1000))  # (time, reason)

    def __post_init__(self):
        self.cooldown = self.routing.cooldown
        labels = (self.model, self.name)
        self._in_flight = metrics.BACKEND_IN_FLIGHT.labels(*labels)
        self._healthy = metrics.BACKEND_HEALTHY.labels(*labels)
        # A remote client counts its own attempts, duration and errors (with finer
        # reasons); it only takes this backend's name. The router counts the others,
        # so that each attempt is counted once.
        meter_as = getattr(self.engine, "meter_as", None)
        self._metered = meter_as is None
        if meter_as is not None:
            meter_as(self.name)
        else:
            self._requests = metrics.BACKEND_REQUESTS.labels(*labels)
            self._duration = metrics.BACKEND_LATENCY.labels(*labels)
        self._healthy.set(1)

    @property
    def remote(self) -> bool:
        return self.spec.type == "remote"

    def available(self, now: float) -> bool:
        """In rotation; an ejected backend whose cooldown is over takes one trial."""
        return not self.ejected or (now >= self.ejected_until and self.in_flight == 0)

    def begin(self) -> float:
        self.in_flight += 1
        self.requests += 1
        self._in_flight.inc()
        if self._metered:
            self._requests.inc()
        return time.perf_counter()

    def end(self, started: float, outcome: str) -> None:
        """`outcome`: ok, cancelled (the client left: says nothing about the backend),
        or a failure reason."""
        self.in_flight -= 1
        self._in_flight.dec()
        if self._metered:
            self._duration.observe(time.perf_counter() - started)
        if outcome == "ok":
            self.failures, self.cooldown = 0, self.routing.cooldown
            self._set_ejected(False)
        elif outcome != "cancelled":
            self.errors += 1
            self.recent.append((time.monotonic(), outcome))
            if self._metered:
                metrics.BACKEND_ERRORS.labels(self.model, self.name, outcome).inc()
            if outcome in FAILURES or outcome == "stream":
                self._failed()

    def _failed(self) -> None:
        self.failures += 1
        now = time.monotonic()
        # A failure of a request sent before the ejection does not extend it.
        if self.failures >= self.routing.eject_after and (not self.ejected
                                                          or now >= self.ejected_until):
            self.ejected_until = now + self.cooldown
            self.cooldown = min(self.cooldown * 2, self.routing.max_cooldown)
            self.ejections += 1
            self._set_ejected(True)

    def restore(self) -> None:
        """A probe got an answer: back in rotation, one failure from ejection again
        (its cooldown keeps growing until a request succeeds)."""
        self.failures = self.routing.eject_after - 1
        self._set_ejected(False)

    def _set_ejected(self, ejected: bool) -> None:
        if ejected != self.ejected:
            self.ejected = ejected
            self._healthy.set(0 if ejected else 1)

    def status(self) -> dict:
        now = time.monotonic()
        recent = Counter(r for t, r in self.recent if t > now - RECENT)
        return {"name": self.name, "type": self.spec.type, "url": self.spec.base_url,
                "weight": self.weight, "healthy": not self.ejected,
                "ejected_for_s": round(max(0.0, self.ejected_until - now), 3)
                if self.ejected else 0.0,
                "in_flight": self.in_flight, "consecutive_failures": self.failures,
                "ejections": self.ejections, "requests": self.requests,
                "errors": self.errors, "recent_errors": dict(recent)}


class _NoBackend(Exception):
    """Every attempt this model may make failed (or none could be made)."""

    def __init__(self, last: LlmctlError | None):
        self.last = last


Resolver = Callable[[str], Awaitable[ModelEngine]]


class RouterEngine(ModelEngine):
    def __init__(self, spec: ModelSpec, backends: list[Backend], budget: RetryBudget,
                 resolve: Resolver):
        self.spec = spec
        self.model_id = spec.id
        self.routing = spec.routing
        self.backends = backends
        self.budget = budget
        self._resolve = resolve  # a fallback's name → its (routed) engine
        self._prober: asyncio.Task | None = None

    # --- lifecycle and what the gateway asks before a request

    async def start(self) -> None:
        await asyncio.gather(*(b.engine.start() for b in self.backends))
        if self._prober is None and any(b.remote for b in self.backends):
            self._prober = asyncio.create_task(self._probe_loop(),
                                               name=f"llmctl-probe-{self.spec.name}")

    @property
    def ready(self) -> bool:
        return all(b.engine.ready for b in self.backends)

    def count_tokens(self, text: str, *, add_special_tokens: bool = True) -> int | None:
        # Replicas serve one model: the first that knows its tokenizer answers.
        for b in self.backends:
            n = b.engine.count_tokens(text, add_special_tokens=add_special_tokens)
            if n is not None:
                return n
        return None

    def render_chat(self, messages: list[dict]) -> str | None:
        return next((t for b in self.backends
                     if (t := b.engine.render_chat(messages)) is not None), None)

    @property
    def max_context(self) -> int | None:
        return self.spec.max_context or next(
            (b.engine.max_context for b in self.backends if b.engine.max_context), None)

    @property
    def stats(self) -> dict:
        total: Counter = Counter()
        for b in self.backends:
            total.update(getattr(b.engine, "stats", None) or {})
        return dict(total)

    async def health(self) -> tuple[bool, str]:
        down = [b.name for b in self.backends if b.ejected]
        if len(down) == len(self.backends):
            return False, "no healthy backend"
        return True, f"ejected: {', '.join(down)}" if down else "ready"

    def status(self) -> list[dict]:
        return [b.status() for b in self.backends]

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
        for b in self.backends:
            await b.engine.close()

    # --- serving

    async def generate(self, request: EngineRequest) -> Completion:
        async def call(engine: ModelEngine) -> Completion:
            return await engine.generate(request)

        try:
            backend, result, started = await self._attempt(request, call)
        except _NoBackend as exc:
            return await self._fall_back(request, exc.last, call)
        backend.end(started, "ok")
        return result

    async def stream(self, request: EngineRequest) -> AsyncIterator[StreamDelta | Completion]:
        async def open_(engine: ModelEngine):
            # A stream has "started" once its first event is here: until then it fails
            # like any request and can be retried.
            events = engine.stream(request)
            try:
                first = await anext(events)
            except StopAsyncIteration:
                raise UpstreamError(f"model {self.spec.name!r}: a backend ended its stream "
                                    "before any event") from None
            except BaseException:
                await events.aclose()
                raise
            return events, first

        backend = None
        try:
            backend, (events, first), started = await self._attempt(request, open_)
        except _NoBackend as exc:
            events, first = await self._fall_back(request, exc.last, open_)
        outcome = "ok"
        try:
            yield first
            async for item in events:
                yield item
        except LlmctlError as exc:
            if backend is None:  # a fallback's stream, already reported by its router
                raise
            outcome = "stream"
            raise UpstreamError(f"model {self.spec.name!r}: backend {backend.name!r} failed "
                                f"mid-stream: {exc.message}",
                                code="upstream_stream_broken") from None
        except (GeneratorExit, asyncio.CancelledError):
            outcome = "cancelled"
            raise
        except Exception:
            outcome = "other"
            raise
        finally:
            with contextlib.suppress(Exception):
                await events.aclose()
            if backend is not None:
                backend.end(started, outcome)

    # --- routing

    def _pick(self, tried: set[str]) -> Backend | None:
        """Fewest outstanding requests; ties at random, weighted."""
        now = time.monotonic()
        candidates = [b for b in self.backends if b.name not in tried and b.available(now)]
        if not candidates:
            return None
        least = min(b.in_flight for b in candidates)
        tied = [b for b in candidates if b.in_flight == least]
        return random.choices(tied, weights=[b.weight for b in tied])[0]

    async def _attempt(self, request: EngineRequest, call):
        """(backend, result, started) from the first backend that answers `call`. The
        backend stays counted in flight until the caller ends it."""
        tried: set[str] = set()
        last: LlmctlError | None = None
        for _ in range(self.routing.attempts):
            backend = self._pick(tried)
            if backend is None:
                break
            if request.attempts == 0:
                self.budget.record_request()
            elif not self.budget.try_retry():
                break
            tried.add(backend.name)
            request.attempts += 1
            started = backend.begin()
            try:
                result = await call(backend.engine)
            except Exception as exc:
                why = reason(exc)
                backend.end(started, why)
                if why not in RETRYABLE:
                    raise
                last = exc
                continue
            except BaseException:
                backend.end(started, "cancelled")
                raise
            request.served_model = self.spec.name
            request.served_by = f"{self.spec.name}/{backend.name}"
            return backend, result, started
        raise _NoBackend(last)

    async def _fall_back(self, request: EngineRequest, last: LlmctlError | None, call):
        """`call` on each fallback model in turn (each routes, retries and spends the
        retry budget itself); the last error when none answers."""
        for name in self.spec.fallbacks:
            engine = await self._resolve(name)
            try:
                return await call(engine)
            except Exception as exc:
                if reason(exc) not in RETRYABLE:
                    raise
                last = exc
        if last is None:
            raise Unavailable(f"model {self.spec.name!r} has no healthy backend",
                              code="no_healthy_backend")
        raise last

    # --- active health

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.routing.probe_interval)
            ejected = [b for b in self.backends if b.ejected and b.remote]
            await asyncio.gather(*(self._probe(b) for b in ejected))

    @staticmethod
    async def _probe(backend: Backend) -> None:
        try:
            ok, _why = await backend.engine.health()
        except Exception:  # noqa: BLE001 - a probe that cannot run says "not yet"
            ok = False
        if ok and backend.ejected:
            backend.restore()
