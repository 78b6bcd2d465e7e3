"""An eval model behind an OpenAI-compatible HTTP API: a remote server from
models.yaml (vLLM, TGI, another llmctl, ...) or a running llmctl gateway
(`--through URL --api-key KEY`, so its keys, quotas, cache and logs apply).

Requests go out concurrently (`concurrency` in flight) and come back as they finish.
- generation: POST /v1/completions, temperature 0, `stop` (the first four stop
  strings, the API's limit), every stop string cut again client-side as lm-eval
  does; models that only offer chat get POST /v1/chat/completions with the prompt
  as one user message;
- loglikelihood: POST /v1/completions with `echo: true, logprobs: 1, max_tokens: 0`
  and the prompts [context, context+continuation, ...] in one request; the
  continuation's tokens are those past the context's own token count (the split
  lm-eval's hf model makes), summed from the echoed prompt logprobs (vLLM-style,
  first null). A server that returns no prompt logprobs gets a clear error.

A generation prompt longer than the model's context minus `max_gen_toks` is
left-truncated as lm-eval's `hf` model does (its token ids, BOS included, cut from the
left, sent as a token-id prompt); this needs the model's tokenizer (`--tokenizer` or
`tokenizer:` in models.yaml) and its context (`max_context:` in models.yaml, else
`max_model_len` from `/v1/models`). A prompt the server still refuses (a 400) is
recorded as that item's error and the run goes on.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import httpx

from evalsuite.models import EvalModel, ItemError, LLResult, LoglikelihoodUnsupported
from evalsuite.tasks.base import Request
from server.errors import (
    AuthenticationError,
    ConfigError,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    QuotaExceeded,
    RateLimited,
    UpstreamError,
)

MAX_STOPS = 4  # OpenAI accepts at most four stop sequences
RETRIES = 5


def _base(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


class OpenAIModel(EvalModel):
    def __init__(self, base_url: str, model: str | None, *, api_key: str | None = None,
                 timeout: float = 120.0, concurrency: int = 8, label: str | None = None,
                 transport: httpx.BaseTransport | None = None, tokenizer: str | None = None,
                 max_context: int | None = None):
        self.base_url = _base(base_url)
        self.model = model
        self.name = label or model or "default"
        self.concurrency = max(1, int(concurrency))
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers,
                                   timeout=httpx.Timeout(timeout, connect=10.0),
                                   limits=httpx.Limits(max_connections=self.concurrency + 2),
                                   transport=transport)
        self._chat_only: bool | None = None
        self._answered = False  # the server has answered at least once
        self._ll_error: Exception | None = None
        self._lock = threading.Lock()
        self._tokenizer_source = tokenizer
        self._tokenizer = None
        self._max_context = max_context
        self._context_known = max_context is not None

    # --- HTTP ----------------------------------------------------------------------

    def _post(self, path: str, body: dict) -> dict:
        if self.model:
            body = {"model": self.model, **body}
        delay = 1.0
        for attempt in range(RETRIES + 1):
            try:
                resp = self.client.post(path, json=body)
            except httpx.HTTPError as exc:
                # Refused before the server ever answered: a wrong URL or a server that
                # is not running, which retrying for half a minute does not fix.
                if attempt == RETRIES or (isinstance(exc, httpx.ConnectError)
                                          and not self._answered):
                    raise UpstreamError(f"{self.base_url}: {type(exc).__name__}: {exc}") from None
                time.sleep(delay)
                delay = min(delay * 2, 10)
                continue
            self._answered = True
            if resp.status_code == 200:
                return resp.json()
            retry = resp.status_code >= 500 or (resp.status_code == 429
                                                and _code(resp) != "insufficient_quota")
            if retry and attempt < RETRIES:
                wait_s = float(resp.headers.get("retry-after") or delay)
                time.sleep(min(wait_s, 30))
                delay = min(delay * 2, 10)
                continue
            raise _error(resp, self.base_url + path)
        raise AssertionError("unreachable")

    # --- capabilities ---------------------------------------------------------------

    @property
    def chat_only(self) -> bool:
        """True when the server has no /v1/completions (probed once, with the same
        echo request that checks for prompt logprobs)."""
        with self._lock:
            if self._chat_only is None:
                try:
                    self._score_context("Hello", [" world"])
                    self._chat_only = False
                except LoglikelihoodUnsupported as exc:
                    self._chat_only, self._ll_error = False, exc
                except InvalidRequest as exc:
                    if getattr(exc, "status", None) not in (404, 405, 501):
                        raise
                    self._chat_only = True
            return self._chat_only

    def check_loglikelihood(self) -> None:
        if self.chat_only:
            raise LoglikelihoodUnsupported(self._no_logprobs("it only offers chat completions"))
        if self._ll_error is not None:
            raise self._ll_error

    # --- loglikelihood --------------------------------------------------------------

    def loglikelihood(self, requests: list[Request]) -> Iterator[list[tuple[int, LLResult]]]:
        by_context: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            by_context[r.context].append(i)

        def job(context: str, indices: list[int]):
            lls = self._score_context(context, [requests[i].continuation for i in indices])
            return list(zip(indices, lls, strict=True))

        yield from self._concurrently(job, list(by_context.items()))

    def _score_context(self, context: str, continuations: list[str]) -> list[LLResult]:
        pairs = [_move_spaces(context, c) for c in continuations]
        # One request: each distinct context alone (for its token count), then each
        # context+continuation.
        contexts = list(dict.fromkeys(ctx for ctx, _ in pairs))
        prompts = contexts + [ctx + cont for ctx, cont in pairs]
        if any(not p for p in contexts):
            raise InvalidRequest("loglikelihood through an API needs a non-empty context")
        data = self._post("/completions", {"prompt": prompts, "max_tokens": 0, "echo": True,
                                           "logprobs": 1, "temperature": 0})
        choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != len(prompts):
            raise LoglikelihoodUnsupported(self._no_logprobs("it did not return one choice "
                                                             "per prompt"))
        logprobs = [c.get("logprobs") or {} for c in choices]
        if any(not lp.get("tokens") or lp.get("token_logprobs") is None for lp in logprobs):
            raise LoglikelihoodUnsupported(self._no_logprobs("no prompt logprobs came back"))
        n_ctx = {ctx: len(lp["tokens"]) for ctx, lp in zip(contexts, logprobs, strict=False)}
        results = []
        for (ctx, _), lp in zip(pairs, logprobs[len(contexts):], strict=True):
            start = n_ctx[ctx]
            values = lp["token_logprobs"][start:]
            if not values or any(v is None for v in values):
                raise LoglikelihoodUnsupported(self._no_logprobs("continuation logprobs missing"))
            tops = (lp.get("top_logprobs") or [None] * len(lp["tokens"]))[start:]
            greedy = all(bool(top) and max(top, key=top.get) == tok
                         for tok, top in zip(lp["tokens"][start:], tops, strict=True))
            results.append((float(sum(values)), greedy))
        return results

    def _no_logprobs(self, why: str) -> str:
        return (f"{self.name} at {self.base_url} cannot return prompt logprobs ({why}); "
                "loglikelihood scoring needs `echo` with `logprobs` on /v1/completions "
                "(llmctl and vLLM have it). For mmlu, --generative scores the generated "
                "answer letter instead")

    # --- generation -------------------------------------------------------------------

    def generate(self, requests: list[Request]) -> Iterator[list[tuple[int, str]]]:
        def job(i: int, req: Request):
            return [(i, self._generate_or_error(req))]

        yield from self._concurrently(job, list(enumerate(requests)))

    def _generate_or_error(self, req: Request) -> str:
        """One item's generation; a prompt the server refuses is that item's error."""
        try:
            return self._generate_one(req)
        except InvalidRequest as exc:
            if getattr(exc, "status", None) not in (400, 413, 422):
                raise
            return ItemError(str(exc))

    def _fit(self, req: Request) -> str | list[int]:
        """The prompt to send: the text, or, when it does not leave room for
        `max_gen_toks` in the model's context, its token ids left-truncated as lm-eval's
        hf model does (`tokenizer(context)` with special tokens, then `[-max_ctx:]`)."""
        tok = self._load_tokenizer()
        limit = self._context_limit() if tok is not None else None
        if not limit:
            return req.context
        ids = tok(req.context)["input_ids"]
        room = limit - req.max_gen_toks
        return ids[-room:] if 0 < room < len(ids) else req.context

    def _context_limit(self) -> int | None:
        """models.yaml's max_context, else the server's `max_model_len` (asked once)."""
        with self._lock:
            if not self._context_known:
                self._context_known = True
                try:
                    path = f"/models/{self.model}" if self.model else "/models"
                    resp = self.client.get(path)
                    data = resp.json() if resp.status_code == 200 else {}
                    entry = (data.get("data") or [{}])[0] if "data" in data else data
                    value = entry.get("max_model_len")
                    self._max_context = int(value) if value else None
                except (httpx.HTTPError, ValueError, AttributeError):
                    self._max_context = None
            return self._max_context

    def _load_tokenizer(self):
        if self._tokenizer is None and self._tokenizer_source:
            with self._lock:
                if self._tokenizer is None:
                    from transformers import AutoTokenizer

                    try:
                        self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_source)
                    except (OSError, ValueError) as exc:
                        raise ConfigError(f"cannot load tokenizer {self._tokenizer_source!r}: "
                                          f"{str(exc).strip().splitlines()[0][:160]}") from None
        return self._tokenizer

    def _generate_one(self, req: Request) -> str:
        stops = [s for s in req.until if s][:MAX_STOPS]
        body = {"max_tokens": req.max_gen_toks, "temperature": 0,
                **({"stop": stops} if stops else {})}
        text = None
        if not self._chat_only:
            try:
                data = self._post("/completions", {"prompt": self._fit(req), **body})
                text = data["choices"][0].get("text") or ""
            except InvalidRequest as exc:
                if getattr(exc, "status", None) not in (404, 405, 501):
                    raise
                self._chat_only = True  # no /v1/completions: a chat-only server
        if text is None:
            data = self._post("/chat/completions", {
                "messages": [{"role": "user", "content": req.context}], **body})
            text = (data["choices"][0].get("message") or {}).get("content") or ""
        for stop in req.until:
            if stop:
                text = text.split(stop)[0]
        return text

    # --- plumbing ---------------------------------------------------------------------

    def _concurrently(self, job, work: list[tuple]) -> Iterator[list]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            pending = set()
            queue = iter(work)
            try:
                for args in queue:
                    pending.add(pool.submit(job, *args))
                    if len(pending) >= self.concurrency:
                        break
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        yield future.result()
                        nxt = next(queue, None)
                        if nxt is not None:
                            pending.add(pool.submit(job, *nxt))
            finally:
                for future in pending:
                    future.cancel()

    def describe(self) -> dict:
        return {"name": self.name, "type": "remote", "base_url": self.base_url,
                "model": self.model, "concurrency": self.concurrency}

    def identity(self) -> dict:
        return {"type": "remote", "base_url": self.base_url, "model": self.model}

    def close(self) -> None:
        self.client.close()


def _move_spaces(context: str, continuation: str) -> tuple[str, str]:
    """A context's trailing spaces belong to the continuation (lm-eval _encode_pair)."""
    n = len(context) - len(context.rstrip())
    if n:
        return context[:-n], context[-n:] + continuation
    return context, continuation


def _code(resp: httpx.Response) -> str | None:
    try:
        return (resp.json().get("error") or {}).get("code")
    except ValueError:
        return None


def _error(resp: httpx.Response, where: str):
    try:
        err = resp.json().get("error") or {}
        message = err.get("message") or resp.text[:200]
    except ValueError:
        err, message = {}, resp.text[:200] or resp.reason_phrase
    text = f"{where}: HTTP {resp.status_code}: {message}"
    status = resp.status_code
    if status == 401:
        exc = AuthenticationError(text)
    elif status == 403:
        exc = PermissionDenied(text)
    elif status == 404 and err.get("code") == "model_not_found":
        exc = ModelNotFound(text)
    elif status == 429:
        exc = (QuotaExceeded if err.get("code") == "insufficient_quota" else RateLimited)(text)
    elif 400 <= status < 500 or status == 501:
        exc = InvalidRequest(text)
    else:
        exc = UpstreamError(text)
    exc.status = status
    return exc
