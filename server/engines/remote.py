"""HttpLLMClient: a model served by another process over HTTP.

Speaks the OpenAI API (vLLM, TGI, Ollama, `transformers serve`, another llmctl) and,
with `api: llmctl`, llmctl's own /v1/generate for plain text prompts. Connection
errors are retried (httpx transport retries cover connect failures only, never a
request the remote may have started). Timeouts come from the model's (or backend's)
entry: `connect_timeout`, `first_byte_timeout` (until the response starts: for a
non-streamed request that is the whole generation on most servers), `total_timeout`
(the whole request), and `timeout`, the longest silence between two reads.
Token counts are the ones the remote reports (the gateway caps them to each request's
bound, server/api/bounds.py); with `tokenizer:` in the model's entry the gateway counts
prompts itself with that tokenizer. Usage that is not a non-negative integer is a
malformed response (502), never a number to charge.
Every request is counted in the llmctl_backend_* metrics (requests, errors by reason,
duration), under the backend's name when the model has replicas (server/engines/router.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import httpx

from server import metrics
from server.config import ModelSpec
from server.engines.base import (
    Completion,
    EngineRequest,
    ModelEngine,
    StreamDelta,
    TokenLogprob,
)
from server.engines.tokenizer import Counter
from server.errors import (
    InvalidRequest,
    LlmctlError,
    RateLimited,
    Unavailable,
    UpstreamError,
)


def _base(url: str) -> str:
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def _logprobs(lp: dict | None, start: int = 0, stop: int | None = None) -> list[TokenLogprob]:
    """OpenAI completions `logprobs` object → TokenLogprob list (a slice of it)."""
    if not lp:
        return []
    tokens = lp.get("tokens") or []
    values = lp.get("token_logprobs") or [None] * len(tokens)
    tops = lp.get("top_logprobs") or [None] * len(tokens)
    offsets = lp.get("text_offset") or [0] * len(tokens)
    return [TokenLogprob(token=t, token_id=None, logprob=v, top=top or {}, offset=o)
            for t, v, top, o in list(zip(tokens, values, tops, offsets, strict=False))[start:stop]]


def _malformed(what: str) -> UpstreamError:
    err = UpstreamError(what)
    err.backend_reason = "malformed"
    return err


def backend_reason(exc: LlmctlError) -> str:
    """The llmctl_backend_errors_total reason for an error this client raised."""
    if isinstance(exc, RateLimited):
        return "rate_limited"
    if exc.code == "upstream_unreachable":
        return "unreachable"
    if exc.code == "upstream_timeout":
        return "timeout"
    if exc.status_code < 500:
        return "client_error"
    return getattr(exc, "backend_reason", "server_error")


def _usage(usage, default_completion: int = 0) -> tuple[int, int]:
    """(prompt, completion) tokens the remote reported; ValueError unless each is a
    non-negative integer (a bool is not one)."""
    counts = []
    for name, default in (("prompt_tokens", 0), ("completion_tokens", default_completion)):
        value = usage.get(name, default) if isinstance(usage, dict) else default
        if type(value) is not int or value < 0:
            raise ValueError(f"usage.{name} is {value!r}")
        counts.append(value)
    return counts[0], counts[1]


def _reason(exc: Exception) -> str:
    """What was wrong, in a few words: our own usage message, else the error's kind."""
    return str(exc) if str(exc).startswith("usage.") else exc.__class__.__name__


class HttpLLMClient(ModelEngine):
    def __init__(self, spec: ModelSpec, transport: httpx.AsyncBaseTransport | None = None):
        self.spec = spec
        self.model_id = spec.id
        self.base_url = _base(spec.base_url or "")
        headers = {}
        secret = spec.api_key
        if secret:
            headers["Authorization"] = f"Bearer {secret}"
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(spec.timeout, connect=spec.connect_timeout),
            transport=transport or httpx.AsyncHTTPTransport(retries=2),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )
        self._tokenizer = Counter(spec.tokenizer, spec.name) if spec.tokenizer else None
        # The backend label: host and port (bounded, no credentials), as the router
        # names an unnamed backend, unless the router gives its name (meter_as).
        self.backend = ""
        self.meter_as(httpx.URL(self.base_url).netloc.decode())

    def meter_as(self, backend: str) -> None:
        """Record this client's llmctl_backend_* series under `backend`. They are
        created now, at 0, so that rate() sees the first requests; the previous
        name's series go."""
        families = (metrics.BACKEND_REQUESTS, metrics.BACKEND_LATENCY)
        if self.backend and self.backend != backend:
            with contextlib.suppress(KeyError):  # another client may have removed them
                for family in families:
                    family.remove(self.spec.name, self.backend)
                for reason in metrics.BACKEND_ERROR_REASONS:
                    metrics.BACKEND_ERRORS.remove(self.spec.name, self.backend, reason)
        self.backend = backend
        for reason in metrics.BACKEND_ERROR_REASONS:
            metrics.BACKEND_ERRORS.labels(self.spec.name, backend, reason)
        self._requests, self._duration = (f.labels(self.spec.name, backend) for f in families)

    @contextmanager
    def _observed(self) -> Iterator[None]:
        """Count one request to the backend, its duration and its error, if any."""
        self._requests.inc()
        start = time.perf_counter()
        try:
            yield
        except LlmctlError as exc:
            metrics.BACKEND_ERRORS.labels(self.spec.name, self.backend,
                                          backend_reason(exc)).inc()
            raise
        finally:
            self._duration.observe(time.perf_counter() - start)

    async def start(self) -> None:
        if self._tokenizer is not None:
            await asyncio.to_thread(self._tokenizer.load)

    @property
    def max_context(self) -> int | None:
        return self.spec.max_context

    @property
    def longest_token(self) -> int | None:
        return self._tokenizer.longest if self._tokenizer is not None else None

    def count_tokens(self, text: str, *, add_special_tokens: bool = True) -> int | None:
        if self._tokenizer is None:
            return None
        return self._tokenizer.count(text, add_special_tokens=add_special_tokens)

    def render_chat(self, messages: list[dict]) -> str | None:
        return self._tokenizer.render_chat(messages) if self._tokenizer is not None else None

    # --- request building

    def _route_and_body(self, request: EngineRequest, stream: bool) -> tuple[str, dict]:
        p = request.params
        common = {"model": self.model_id, "temperature": p.temperature, "top_p": p.top_p,
                  "stream": stream}
        if p.top_k > 0:
            common["top_k"] = p.top_k
        if p.seed is not None:
            common["seed"] = p.seed
        if p.stop:
            common["stop"] = list(p.stop)
        if stream:
            common["stream_options"] = {"include_usage": True}
        if request.messages is not None:
            body = {**common, "messages": request.messages, "max_tokens": p.max_new_tokens,
                    **(request.extra or {})}
            if p.logprobs is not None:
                body |= {"logprobs": True, "top_logprobs": p.logprobs}
            return "/v1/chat/completions", body
        if (self.spec.api == "llmctl" and isinstance(request.prompt, str)
                and p.logprobs is None and not request.echo_logprobs):
            body = {k: v for k, v in common.items() if k != "stream_options"}
            return "/v1/generate", {**body, "prompt": request.prompt,
                                    "max_new_tokens": p.max_new_tokens}
        body = {**common, "prompt": request.prompt, "max_tokens": p.max_new_tokens}
        if p.logprobs is not None or request.echo_logprobs:
            body["logprobs"] = p.logprobs or (1 if request.echo_logprobs else None)
        if request.echo_logprobs:
            body["echo"] = True
        return "/v1/completions", body

    def _timed_out(self, what: str, seconds: float) -> UpstreamError:
        return UpstreamError(f"remote model {self.spec.name!r} at {self.base_url} {what} "
                             f"({seconds:g}s)", code="upstream_timeout")

    async def _send(self, route: str, body: dict) -> httpx.Response:
        """POST, and wait for the response to start within the first-byte timeout.
        The caller reads and closes the response."""
        request = self._client.build_request("POST", route, json=body)
        limit = self.spec.first_byte_timeout
        try:
            async with asyncio.timeout(limit):
                return await self._client.send(request, stream=True)
        except TimeoutError:
            raise self._timed_out("sent nothing within its first-byte timeout",
                                  limit) from None

    def _error(self, exc: Exception) -> LlmctlError:
        where = f"remote model {self.spec.name!r} at {self.base_url}"
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return Unavailable(f"{where} is unreachable", code="upstream_unreachable")
        if isinstance(exc, httpx.TimeoutException):
            return UpstreamError(f"{where} timed out after {self.spec.timeout:g}s",
                                 code="upstream_timeout")
        err = UpstreamError(f"{where} failed: {exc.__class__.__name__}")
        err.backend_reason = "transport"
        return err

    async def _raise_for(self, response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        await response.aread()
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:300] or response.reason_phrase
        text = f"remote model {self.spec.name!r}: {message}"
        if response.status_code == 429:
            raise RateLimited(text, headers={"Retry-After": response.headers.get(
                "retry-after", "1")})
        if 400 <= response.status_code < 500:
            err = InvalidRequest(text)
            err.status_code = response.status_code
            raise err
        raise UpstreamError(text)

    # --- results

    def _completion(self, route: str, data: dict, request: EngineRequest,
                    elapsed: float) -> Completion:
        prompt_tokens, completion_tokens = _usage(data.get("usage") or {})
        if route == "/v1/generate":
            return Completion(text=data["text"], finish_reason=data.get("finish_reason", "stop"),
                              prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        choice = data["choices"][0]
        if route == "/v1/chat/completions":
            content = choice.get("logprobs", {}) or {}
            lps = [TokenLogprob(token=c["token"], token_id=None, logprob=c["logprob"],
                                top={t["token"]: t["logprob"] for t in c.get("top_logprobs", [])})
                   for c in content.get("content") or []] or None
            return Completion(text=choice["message"].get("content") or "",
                              finish_reason=choice.get("finish_reason") or "stop",
                              prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                              logprobs=lps, tool_calls=choice["message"].get("tool_calls"))
        text = choice["text"]
        result = Completion(text=text, finish_reason=choice.get("finish_reason") or "stop",
                            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        lp = choice.get("logprobs")
        if request.echo_logprobs:
            if not lp or not lp.get("token_logprobs"):
                raise UpstreamError(f"remote model {self.spec.name!r} does not return prompt "
                                    "logprobs (echo with logprobs), needed for loglikelihood")
            result.prompt_logprobs = _logprobs(lp, 0, prompt_tokens)
            result.logprobs = _logprobs(lp, prompt_tokens)
            prompt_chars = result.logprobs[0].offset if result.logprobs else len(text)
            result.prompt_text, result.text = text[:prompt_chars], text[prompt_chars:]
        elif lp:
            result.logprobs = _logprobs(lp)
        return result

    async def generate(self, request: EngineRequest) -> Completion:
        route, body = self._route_and_body(request, stream=False)
        start = time.perf_counter()
        with self._observed():
            try:
                async with asyncio.timeout(self.spec.total_timeout):
                    response = await self._send(route, body)
                    try:
                        await self._raise_for(response)
                        await response.aread()
                    finally:
                        await response.aclose()
            except httpx.HTTPError as exc:
                raise self._error(exc) from None
            except TimeoutError:
                raise self._timed_out("did not finish within its total timeout",
                                      self.spec.total_timeout) from None
            try:
                return self._completion(route, response.json(), request,
                                        time.perf_counter() - start)
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise _malformed(f"remote model {self.spec.name!r} sent a malformed "
                                 f"response ({_reason(exc)})") from None

    async def stream(self, request: EngineRequest) -> AsyncIterator[StreamDelta | Completion]:
        route, body = self._route_and_body(request, stream=True)
        start = time.perf_counter()
        text, finish, usage, ttft = [], "stop", {}, None
        # Checked between events: a stream's consumer may change tasks, which
        # asyncio.timeout does not allow; a silent remote is caught by `timeout`.
        deadline = start + (self.spec.total_timeout or float("inf"))
        with self._observed():
            try:
                response = await self._send(route, body)
                async with contextlib.aclosing(response):
                    await self._raise_for(response)
                    async for line in response.aiter_lines():
                        if time.perf_counter() > deadline:
                            raise self._timed_out("did not finish within its total timeout",
                                                  self.spec.total_timeout)
                        if not line.startswith("data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == "[DONE]":
                            break
                        event = json.loads(payload)
                        if "error" in event:
                            raise UpstreamError(f"remote model {self.spec.name!r}: "
                                                f"{event['error'].get('message')}")
                        usage = event.get("usage") or usage
                        piece, reason = self._piece(route, event)
                        finish = reason or finish
                        calls = self._tool_calls(event)
                        if calls:
                            yield StreamDelta(text="", tool_calls=calls)
                        if piece:
                            ttft = ttft if ttft is not None else time.perf_counter() - start
                            text.append(piece)
                            yield StreamDelta(text=piece)
            except httpx.HTTPError as exc:
                raise self._error(exc) from None
            except (ValueError, KeyError, TypeError) as exc:
                raise _malformed(f"remote model {self.spec.name!r} sent a malformed "
                                 f"stream ({_reason(exc)})") from None
            try:
                prompt_tokens, completion_tokens = _usage(usage, len(text))
            except ValueError as exc:
                raise _malformed(f"remote model {self.spec.name!r} sent a malformed "
                                 f"stream ({_reason(exc)})") from None
        yield Completion(text="".join(text), finish_reason=finish, prompt_tokens=prompt_tokens,
                         completion_tokens=completion_tokens, ttft_s=ttft)

    @staticmethod
    def _piece(route: str, event: dict) -> tuple[str, str | None]:
        if route == "/v1/generate":
            return event.get("text", ""), event.get("finish_reason")
        choices = event.get("choices") or []
        if not choices:
            return "", None
        choice = choices[0]
        if route == "/v1/chat/completions":
            return (choice.get("delta") or {}).get("content") or "", choice.get("finish_reason")
        return choice.get("text") or "", choice.get("finish_reason")

    @staticmethod
    def _tool_calls(event: dict) -> list[dict] | None:
        choices = event.get("choices") or []
        return (choices[0].get("delta") or {}).get("tool_calls") if choices else None

    async def health(self) -> tuple[bool, str]:
        try:
            response = await self._client.get("/v1/models", timeout=self.spec.connect_timeout)
            return response.status_code < 500, f"remote HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            return False, str(self._error(exc))

    async def close(self) -> None:
        await self._client.aclose()
