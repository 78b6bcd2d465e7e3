"""The serving path, top to bottom: check model → cache → admit (limits, quota) →
engine → settle and log. A free cache hit is admitted for rate limits only.

Routes translate their API's request into `prepare(...)` and render what `run` or
`stream` return; everything they have in common lives here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from server import metrics
from server.api.bounds import Usage, byte_bound, capped_usage, hopeless
from server.api.tokencounts import TokenCounts
from server.config import ModelSpec
from server.engines.base import (
    Completion,
    EngineRequest,
    ModelEngine,
    SamplingParams,
    StreamDelta,
    TokenLogprob,
)
from server.errors import InvalidRequest, LlmctlError, PermissionDenied
from server.services.keys import KeyInfo
from server.services.logstore import RequestRecord

log = logging.getLogger("llmctl.api")


@dataclass
class CachePolicy:
    """Per-request cache controls (Cache-Control header, /v1/generate `cache`)."""

    lookup: bool = True
    store: bool = True

    @classmethod
    def from_headers(cls, headers, enabled: bool = True) -> CachePolicy:
        directives = {d.strip().lower() for d in headers.get("cache-control", "").split(",")}
        return cls(lookup=enabled and "no-cache" not in directives,
                   store=enabled and "no-store" not in directives)


@dataclass
class Call:
    """One API request, validated: its model, engine and one EngineRequest per choice."""

    api: str  # generate | completions | chat
    spec: ModelSpec
    engine: ModelEngine
    requests: list[EngineRequest]
    prompt_texts: list[str]  # exact text each prompt shows the model (cache key, logs)
    prompt_tokens: int  # over all prompts, each counted once (OpenAI's usage); 0: unknown
    prompt_bounds: list[int]  # per prompt, the most tokens it can be (server/api/bounds.py)
    reserve_tokens: int  # what admission holds against the quota: the request's bound
    cache_params: dict
    policy: CachePolicy = field(default_factory=CachePolicy)
    id: str = ""
    created: int = 0
    # Time to first token counts from here: the request is validated and its model loaded.
    started: float = field(default_factory=time.perf_counter)
    answered_by: str | None = None  # a fallback model that answered (from a shared flight)

    @property
    def model_name(self) -> str:
        """The model that answered: a fallback's name when this model's backends could
        not (the `model` field of the response)."""
        served = next((r.served_model for r in self.requests if r.served_model), None)
        return self.answered_by or served or self.spec.name

    @property
    def fell_back(self) -> bool:
        return self.model_name != self.spec.name

    def route_headers(self, record: RequestRecord | None) -> dict[str, str]:
        """`x-llmctl-backend` and the log's backend and attempts, from the router's
        notes on the requests (models with replicas or fallbacks only)."""
        served = ",".join(dict.fromkeys(r.served_by for r in self.requests if r.served_by))
        attempts = sum(r.attempts for r in self.requests)
        if record is not None and attempts:
            record.backend, record.attempts = served[:128] or None, attempts
        return {"x-llmctl-backend": served} if served else {}


def completion_from_dict(data: dict) -> Completion:
    data = dict(data)
    for key in ("logprobs", "prompt_logprobs"):
        if data.get(key) is not None:
            data[key] = [TokenLogprob(**lp) for lp in data[key]]
    return Completion(**data)


@dataclass
class Outcome:
    """A finished call: what the route renders, and how it was obtained."""

    id: str
    created: int
    choices: list[Completion]
    cache_status: str  # hit | miss | bypass
    headers: dict[str, str]

    def cache_value(self, model: str | None = None) -> dict:
        """What the cache stores, and what a shared flight hands its waiters (`model`:
        the fallback that answered, never stored)."""
        value = {"id": self.id, "created": self.created,
                 "choices": [dataclasses.asdict(c) for c in self.choices]}
        if model is not None:
            value["model"] = model
        return value


_ID_PREFIX = {"generate": "gen-", "completions": "cmpl-", "chat": "chatcmpl-"}
_PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def _fields(params: SamplingParams) -> dict:
    """dataclasses.asdict without its deep copy (the fields are immutable values)."""
    return {name: getattr(params, name) for name in _PARAM_FIELDS}


class Gateway:
    def __init__(self, settings, manager, limiter=None, cache=None):
        self.settings = settings
        self.manager = manager
        self.limiter = limiter
        self.cache = cache
        self.counts = TokenCounts()

    # --- preparation: everything that can be refused before any work is done

    async def prepare(
        self, key: KeyInfo, record: RequestRecord | None, *, api: str, model: str | None,
        params: SamplingParams, prompts: list[str | list[int]] | None = None,
        messages: list[dict] | None = None, n: int = 1, echo_logprobs: bool = False,
        max_tokens_field: str = "max_tokens", prompt_field: str = "prompt",
        policy: CachePolicy | None = None, fit_context: bool = False, extra: dict | None = None,
    ) -> Call:
        """Resolve and check everything. `fit_context` lowers a default max_new_tokens to
        what the context leaves (OpenAI chat's behaviour when max_tokens is not given).
        `extra`: fields forwarded unchanged to a remote engine (EngineRequest.extra)."""
        spec = self.manager.spec(model)
        if record is not None:
            record.model = spec.name
        if not key.allows({spec.name, spec.id}):
            raise PermissionDenied(f"this key may not use model {spec.name!r}", param="model")
        if params.max_new_tokens > spec.max_new_tokens:
            raise InvalidRequest(
                f"{max_tokens_field}: {params.max_new_tokens} is more than model "
                f"{spec.name!r} allows ({spec.max_new_tokens})", param=max_tokens_field)
        engine = await self.manager.get(spec)

        if messages is not None:
            rendered = engine.render_chat(messages)
            inputs: list[str | list[int] | None] = [None]
            texts = [rendered if rendered is not None else repr(messages)]
        else:
            inputs, texts = list(prompts or []), []
            for p in inputs:
                texts.append(p if isinstance(p, str) else " ".join(map(str, p)))
        limit = engine.max_context
        for text in texts:
            if hopeless(text, limit, engine.longest_token):
                raise InvalidRequest(
                    f"{prompt_field}: {len(text)} characters cannot fit the context of model "
                    f"{spec.name!r} ({limit} tokens)", param=prompt_field,
                    code="context_length_exceeded")
        counts = [await self._count(engine, p, t, messages is not None) for p, t in zip(
            inputs, texts, strict=True)]
        if fit_context and limit is not None:
            room = min(limit - (c or 0) for c in counts)
            if 0 < room < params.max_new_tokens:
                params = dataclasses.replace(params, max_new_tokens=room)
        for count in counts:
            if limit is not None and count is not None and count + params.max_new_tokens > limit:
                raise InvalidRequest(
                    f"{prompt_field}: {count} tokens plus {max_tokens_field} "
                    f"{params.max_new_tokens} exceeds the context of model {spec.name!r} "
                    f"({limit} tokens)", param=prompt_field, code="context_length_exceeded")

        requests = [
            EngineRequest(params=params, prompt=p, messages=messages, echo_logprobs=echo_logprobs,
                          extra=extra)
            for p in inputs for _ in range(n)
        ]
        # Forwarded fields (tools, response_format) are prompt tokens at the remote too.
        forwarded = byte_bound(json.dumps(extra)) if extra else 0
        bounds = [(c if c is not None else byte_bound(t)) + forwarded
                  for c, t in zip(counts, texts, strict=True)]
        call = Call(
            api=api, spec=spec, engine=engine, requests=requests, prompt_texts=texts,
            prompt_tokens=sum(c or 0 for c in counts), prompt_bounds=bounds,
            reserve_tokens=sum(bounds) + params.max_new_tokens * len(requests),
            cache_params={**_fields(params), "n": n, "echo": echo_logprobs, "api": api},
            policy=policy or CachePolicy(),
            id=_ID_PREFIX[api] + os.urandom(16).hex(), created=int(time.time()),
        )
        if record is not None:
            record.prompt = "\n".join(texts)
        return call

    async def _count(self, engine: ModelEngine, prompt, text: str, chat: bool) -> int | None:
        if isinstance(prompt, list):
            return len(prompt)
        # A rendered chat template already holds its special tokens (a BOS, say).
        return await self.counts.count(engine, text, add_special_tokens=not chat)

    # --- admission, cache and settlement

    def _cache_key(self, key: KeyInfo, call: Call):
        """The CacheKey, or None when the request is not cacheable (sampling without a
        seed, or the cache is off). The prompt is what the model sees: token ids stay
        ids (never their text form), chat is the rendered template."""
        if self.cache is None:
            return None
        n = max(1, len(call.requests) // max(1, len(call.prompt_texts)))
        prompts = [r.prompt if r.messages is None else text
                   for r, text in zip(call.requests[::n], call.prompt_texts, strict=True)]
        # Without a pinned revision, the fingerprint of the loaded weights: weights
        # changed in place must not be answered from the old ones' entries.
        return self.cache.key_for(
            model=call.spec.name, model_id=call.spec.id,
            revision=call.spec.revision or call.engine.fingerprint,
            prompt=prompts, params=call.cache_params, key_id=key.id)

    async def _cached_or_generated(self, call: Call, cache_key) -> tuple[dict, str]:
        """(value, hit|miss|bypass): the cache answers, or one identical request in
        flight generates for all (single-flight), or — with no-cache or an uncacheable
        request — the engine answers and the cache is only written."""
        if cache_key is None or not call.policy.lookup:
            if self.cache is not None:
                self.cache.record_bypass(call.spec.name)
            value = await self._generate_all(call)
            if cache_key is not None and call.policy.store and not call.fell_back:
                await self.cache.put(cache_key, value)
            return value, "bypass"
        async with self.cache.flight(cache_key, store=call.policy.store) as flight:
            if flight.hit:
                return flight.value, "hit"
            value = await self._generate_all(call)
            # A fallback model's answer is not this model's: never stored under its key.
            flight.store = flight.store and not call.fell_back
            await flight.fulfil(value)
            return value, "miss"

    async def _admit(self, key: KeyInfo, call: Call, record: RequestRecord | None):
        if self.limiter is None:
            return None
        return await self.limiter.admit(key, reserve_tokens=call.reserve_tokens, record=record)

    @staticmethod
    def usage(call: Call, outcome: Outcome) -> tuple[int, int]:
        return count_usage(call, outcome.choices)

    def _charge(self, call: Call, outcome: Outcome) -> int:
        if outcome.cache_status == "hit" and not self.settings.cache_hits_charge_quota:
            return 0
        return capped(call, outcome.choices).total

    def _finish(self, record: RequestRecord | None, call: Call, outcome: Outcome,
                charged: int) -> None:
        usage = capped(call, outcome.choices)
        prompt_tokens, completion_tokens = usage.prompt_tokens, usage.completion_tokens
        if usage.overreported and outcome.cache_status != "hit":
            self._overreported(record, call, usage.overreported)
        if record is not None:
            record.prompt_tokens = prompt_tokens
            record.completion_tokens = completion_tokens
            record.charged_tokens = charged
            record.cached = outcome.cache_status == "hit"
            record.cache_status = outcome.cache_status
            record.finish_reason = outcome.choices[0].finish_reason if outcome.choices else None
            record.output = "\n".join(c.text for c in outcome.choices)
        if outcome.cache_status != "hit":
            series = metrics.model_series(call.spec.name)
            series.prompt_tokens.inc(prompt_tokens)
            series.generation_tokens.inc(completion_tokens)
        if self.settings.metrics_per_key and record is not None and record.key_id is not None:
            metrics.observe_key_tokens(record.key_id, call.spec.name, prompt_tokens,
                                       completion_tokens)

    @staticmethod
    def _overreported(record: RequestRecord | None, call: Call, tokens: int) -> None:
        metrics.USAGE_OVERREPORTED.labels(call.spec.name).inc(tokens)
        message = (f"model {call.spec.name!r} reported {tokens} tokens more than the "
                   "request's bound; they were not charged")
        log.warning("%s (request %s)", message, call.id)
        if record is not None and record.error_type is None:
            record.error_type, record.error_message = "usage_overreported", message

    async def _generate_all(self, call: Call) -> dict:
        # Admitted as a whole by the engine, and cancelled as a whole when one fails.
        choices = await call.engine.generate_all(call.requests)
        series = metrics.model_series(call.spec.name)
        done = time.perf_counter() - call.started
        for choice in choices:
            # The engine's TTFT counts from its own start (local: the submit); the rest
            # of the time until the batch returned is decoding.
            ttft = choice.ttft_s
            series.generated(ttft, None if ttft is None else done - ttft,
                             choice.completion_tokens, choice.finish_reason)
        return Outcome(call.id, call.created, list(choices), "miss", {}).cache_value(
            call.model_name if call.fell_back else None)

    async def _cached(self, call: Call, cache_key) -> dict | None:
        """A plain lookup before admission: the hit path holds no quota and writes
        nothing to the database."""
        if cache_key is None or not call.policy.lookup:
            return None
        value, _layer = await self.cache.lookup(cache_key)
        return value

    async def _admit_hit(self, key: KeyInfo, call: Call, record: RequestRecord | None):
        """A hit counts as a request for rate limits; it reserves tokens and quota only
        when hits are charged (LLMCTL_CACHE_HITS_CHARGE_QUOTA)."""
        if self.limiter is None:
            return None
        charge = self.settings.cache_hits_charge_quota
        return await self.limiter.admit(key, reserve_tokens=call.reserve_tokens if charge else 0,
                                        hold_quota=charge, record=record)

    async def run(self, key: KeyInfo, record: RequestRecord | None, call: Call,
                  guard=None) -> Outcome:
        """A non-streaming call. `guard(awaitable)` wraps the generation (not a cache
        hit): the routes' stops it when the client disconnects (api/disconnect.py)."""
        cache_key = self._cache_key(key, call)
        hit = await self._cached(call, cache_key)
        admission = await (self._admit_hit(key, call, record) if hit is not None
                           else self._admit(key, call, record))
        charged = 0
        try:
            if hit is not None:
                value, status = hit, "hit"
            else:
                work = self._cached_or_generated(call, cache_key)
                value, status = await (guard(work) if guard is not None else work)
            call.answered_by = value.get("model")
            headers = dict(admission.headers) if admission else {}
            outcome = Outcome(value["id"], value["created"],
                              [completion_from_dict(c) for c in value["choices"]], status,
                              {**headers, **call.route_headers(record)})
            charged = self._charge(call, outcome)
            self._finish(record, call, outcome, charged)
            return outcome
        except BaseException:
            call.route_headers(record)  # a failed request's log shows its attempts too
            raise
        finally:
            if admission is not None:
                await admission.settle(charged)

    async def stream(self, key: KeyInfo, record: RequestRecord | None,
                     call: Call) -> tuple[dict[str, str], str, AsyncIterator]:
        """A streaming call: (headers, cache status, events). Errors that can refuse the
        request (limits, a full queue) are raised here, before the response starts.
        Events are (choice index, StreamDelta | Completion)."""
        cache_key = self._cache_key(key, call)
        hit = await self._cached(call, cache_key)
        if hit is not None:
            admission = await self._admit_hit(key, call, record)
            headers = dict(admission.headers) if admission else {}
            outcome = Outcome(hit["id"], hit["created"],
                              [completion_from_dict(c) for c in hit["choices"]], "hit", headers)
            call.id, call.created = outcome.id, outcome.created
            return headers, "hit", self._replay(record, call, outcome, admission)
        admission = await self._admit(key, call, record)
        headers = dict(admission.headers) if admission else {}
        flight = None
        try:
            status = "bypass"
            if cache_key is not None and call.policy.lookup:
                # A hit, or a wait for an identical request in flight, is replayed as a
                # stream; otherwise this request leads and streams as it generates.
                flight = await self.cache.join(cache_key, store=call.policy.store)
                if flight.hit:
                    value = flight.value
                    call.answered_by = value.get("model")
                    outcome = Outcome(value["id"], value["created"],
                                      [completion_from_dict(c) for c in value["choices"]], "hit",
                                      headers)
                    call.id, call.created = outcome.id, outcome.created
                    return headers, "hit", self._replay(record, call, outcome, admission)
                status = "miss"
            elif self.cache is not None:
                self.cache.record_bypass(call.spec.name)
            merged = _merge(await call.engine.stream_all(call.requests))
            first = await anext(merged)  # surfaces Overloaded etc. before the response
            headers.update(call.route_headers(record))
        except BaseException as exc:
            call.route_headers(record)
            if flight is not None:
                await flight.release(exc)
            if admission is not None:
                await admission.settle(0)
            raise
        return headers, status, self._relay(record, call, merged, first, cache_key, status,
                                            admission, key, flight)

    async def _replay(self, record, call: Call, outcome: Outcome, admission):
        charged = self._charge(call, outcome)
        if record is not None:
            record.stream = True
        try:
            for i, choice in enumerate(outcome.choices):
                if choice.text:
                    yield i, StreamDelta(text=choice.text, logprobs=choice.logprobs or [])
                yield i, choice
            self._finish(record, call, outcome, charged)
        finally:
            if admission is not None:
                await admission.settle(charged)

    async def _relay(self, record, call: Call, merged, first, cache_key, status, admission,
                     key, flight=None):
        finals: dict[int, Completion] = {}
        produced = 0
        ttft = None
        # Per choice: (time of its first token, of its latest token, tokens so far).
        timing: dict[int, list] = {}
        charged = 0
        series = metrics.model_series(call.spec.name)
        try:
            event = first
            while True:
                index, item = event
                if isinstance(item, Completion):
                    finals[index] = item
                elif item.text or item.token_ids:
                    tokens = max(1, len(item.token_ids))
                    produced += tokens
                    now = time.perf_counter()
                    if ttft is None:
                        ttft = now - call.started
                    t = timing.get(index)
                    if t is None:
                        timing[index] = [now, now, tokens]
                    else:
                        t[1] = now
                        t[2] += tokens
                yield event
                try:
                    event = await anext(merged)
                except StopAsyncIteration:
                    break
            outcome = Outcome(call.id, call.created, [finals[i] for i in sorted(finals)], status,
                              {})
            for i, final in finals.items():
                first_at, last_at, tokens = timing.get(i) or (None, None, 0)
                series.generated(None if first_at is None else first_at - call.started,
                                 None if first_at is None else last_at - first_at,
                                 tokens, final.finish_reason)
            if record is not None:
                record.stream = True
                record.ttft_ms = ttft * 1000 if ttft is not None else None
            charged = self._charge(call, outcome)
            self._finish(record, call, outcome, charged)
            if flight is not None:
                # Waiters get the answer; a fallback model's is never stored as this one's.
                flight.store = flight.store and not call.fell_back
                await flight.fulfil(outcome.cache_value(
                    call.model_name if call.fell_back else None))
            elif cache_key is not None and call.policy.store and not call.fell_back:
                await self.cache.put(cache_key, outcome.cache_value())
        except (GeneratorExit, asyncio.CancelledError) as exc:
            if flight is not None:
                await flight.release(exc)  # a waiting identical request takes over
            # The client went away: generation stops (engine streams are closed below)
            # and what was produced is still charged (never past the reservation) and
            # logged.
            charged = _cut_short(record, call, produced, 499, "client_disconnected", None)
            series.finished("abort", len(call.requests) - len(finals))
            raise
        except LlmctlError as exc:
            if flight is not None:
                await flight.release(exc)
            # A stream that has started is never retried: it ends with an error event
            # (sse.guarded), and the key is charged the tokens it was sent.
            charged = _cut_short(record, call, produced, exc.status_code,
                                 exc.code or exc.error_type, exc.message)
            raise
        except BaseException as exc:
            if flight is not None:
                await flight.release(exc)
            raise
        finally:
            with contextlib.suppress(Exception):
                await merged.aclose()
            if admission is not None:
                await admission.settle(charged)


def capped(call: Call, choices: list[Completion]) -> Usage:
    """Usage of choices in index order, capped to the request's bounds (bounds.py)."""
    return capped_usage(
        choices, counted_prompt=call.prompt_tokens, prompt_bounds=call.prompt_bounds,
        per_prompt=max(1, len(call.requests) // max(1, len(call.prompt_texts))),
        max_new_tokens=call.requests[0].params.max_new_tokens if call.requests else 0)


def _cut_short(record: RequestRecord | None, call: Call, produced: int, status: int,
               error_type: str, message: str | None) -> int:
    """Log a stream that ended early; what it delivered is what it is charged, never
    more than was reserved."""
    charged = min(call.prompt_tokens + produced, call.reserve_tokens)
    if record is not None:
        record.stream = True
        record.prompt_tokens, record.completion_tokens = call.prompt_tokens, produced
        record.charged_tokens = charged
        record.error_type, record.error_message = error_type, message
        record.finish_reason = "abort" if status == 499 else "error"
        record.status = status
    return charged


def count_usage(call: Call, choices: list[Completion]) -> tuple[int, int]:
    """(prompt, completion) tokens of choices in index order: each prompt once however
    many choices it has (OpenAI's convention); remote models report their own counts,
    capped to what the request could cost."""
    usage = capped(call, choices)
    return usage.prompt_tokens, usage.completion_tokens


async def _merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Interleave several engine streams as (index, event); closing this closes them all."""
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, s):
        try:
            async for item in s:
                await queue.put((i, item))
        except BaseException as exc:  # hand errors to the consumer
            await queue.put((i, exc))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            with contextlib.suppress(Exception):
                await s.aclose()
