"""A load generator for OpenAI-compatible servers, like vLLM's `vllm bench serve`.

It streams `/v1/completions` at one or more concurrency levels and reports, per
level, request / output-token / total-token throughput, TTFT, TPOT, ITL and
end-to-end latency (mean, median, std, p90, p99) and errors. The metric
definitions follow vLLM (vllm/benchmarks/serve.py `calculate_metrics` and
vllm/benchmarks/lib/endpoint_request_func.py `async_request_openai_completions`):

- TTFT: request sent → first chunk that carries a choice.
- ITL: every gap between consecutive choice chunks (the first excluded).
- E2E latency: request sent → last choice chunk.
- TPOT: (E2E - TTFT) / (output tokens - 1), only for requests with more than one
  output token.
- Output tokens come from the server's `usage` (`stream_options.include_usage`);
  when a server sends none, the text is re-tokenized as vLLM does if a tokenizer was
  given, and otherwise the number of choice chunks stands in.
- Throughputs divide by the level's wall time, from the first request sent to the
  last response finished; only successful requests count.

One deviation: a final chunk with an empty text and a `finish_reason` (how
`transformers serve` ends a stream) carries no token, so it is not an ITL sample
and does not extend E2E. vLLM's own server puts the last token in that chunk.

Concurrency is a cap on requests in flight (vLLM's `--max-concurrency`); with a
finite `request_rate`, arrivals are a Poisson process (exponential gaps, seeded,
rescaled to total exactly n/rate seconds as vLLM does), otherwise all requests
arrive at once and the cap alone shapes the load.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
import numpy as np

from llmctl.benchmarking.stats import summarize_ms
from server.errors import (
    AuthenticationError,
    InvalidRequest,
    LlmctlError,
    ModelNotFound,
    NotFound,
    PermissionDenied,
    UpstreamError,
)

ENDPOINT = "/v1/completions"

# Plain, common English words: most tokenizers make one or two tokens of each. With
# a tokenizer, prompts are cut to an exact token count; the server's usage reports
# the count it saw either way.
_WORDS = (
    "the of and to in is that it for was on are as with his they at be this from have "
    "or by one had not but what all were when we there can an your which their said if "
    "do will each about how up out them then she many some so these would other into has "
    "more her two like him see time could no make than first been its who now people my "
    "made over did down only way find use may water long little very after words called "
    "just where most know get through back much before go good new write our used me man "
    "too any day same right look think also around another came come work three word must "
    "because does part even place well such here take why things help put years different "
    "away again off went old number great tell men say small every found still between name "
    "should home big give air line set own under read last never us left end along while "
    "might next sound below saw something thought both few those always looked show large "
    "often together asked house world going want school important until form food keep "
    "children feet land side without boy once animals life enough took sometimes four head "
    "above kind began almost live page got earth need far hand high year mother light parts "
    "country father let night following picture being study second eyes soon times story "
    "boys since white days ever paper hard near sentence better best across during today "
    "others however sure means knew its try told young miles sun ways thing whole hear "
    "example heard several change answer room sea against top turned learn point city play "
    "toward five using himself usually money seen car morning question model token prompt"
).split()


def base_url(url: str) -> str:
    """The server root: `http://h:p`, `http://h:p/` and `http://h:p/v1` all give `http://h:p`."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise InvalidRequest(f"--url: expected http:// or https://, got {url!r}", param="url")
    return url.removesuffix("/v1")


def make_prompts(n: int, prompt_len: int, seed: int, salt: str = "",
                 tokenizer=None) -> list[str]:
    """`n` different prompts of random words, deterministic for a (seed, salt).

    With a tokenizer each prompt is exactly `prompt_len` of its tokens (the text of
    the first `prompt_len` tokens of a longer run of words); without one it is
    `prompt_len` words, which most tokenizers turn into about as many tokens or a few
    more. Each level gets its own salt so that no prompt repeats within a run, which
    would let a response cache answer instead of the model.
    """
    rng = random.Random(f"{seed}:{salt}")
    count = max(1, prompt_len)
    prompts = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(count)]
        if tokenizer is None:
            prompts.append(" ".join(words))
            continue
        ids = tokenizer.encode(" ".join(words), add_special_tokens=False)
        while len(ids) < count:
            words += [rng.choice(_WORDS) for _ in range(count)]
            ids = tokenizer.encode(" ".join(words), add_special_tokens=False)
        prompts.append(tokenizer.decode(ids[:count]))
    return prompts


def arrival_offsets(n: int, request_rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each request arrives (all 0 for an infinite rate)."""
    if math.isinf(request_rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    offsets = np.cumsum(rng.exponential(1.0 / request_rate, size=n))
    # vLLM rescales so that n requests take exactly n / rate seconds, which keeps
    # throughput figures from drifting with the seed.
    offsets *= (n / request_rate) / offsets[-1]
    return [float(x) for x in offsets]


@dataclass
class ServeConfig:
    url: str
    model: str
    api_key: str | None = None
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 32])
    num_prompts: int | None = None  # per level; None: see prompts_for
    request_rate: float = math.inf
    prompt_len: int = 128
    gen_len: int = 64
    temperature: float | None = None
    seed: int = 0
    timeout: float = 600.0
    min_prompts: int = 16
    prompts_per_stream: int = 2
    tokenizer: object | None = None  # exact prompt lengths in its tokens (see make_prompts)

    def prompts_for(self, concurrency: int) -> int:
        """Requests at one level: --num-prompts, else enough that every stream runs a
        few, so the first burst (all streams starting at once) is not the whole sample."""
        return self.num_prompts or max(self.min_prompts, self.prompts_per_stream * concurrency)


@dataclass
class RequestResult:
    success: bool = False
    status: int | None = None  # None: the server was never reached
    error: str = ""
    start_time: float = 0.0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    chunks: int = 0
    usage_reported: bool = False
    text: str = ""


def _error_message(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode(errors="replace").strip()[:300]
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if "detail" in data:  # FastAPI's default error body
            return str(data["detail"])
    return json.dumps(data)[:300]


def _choice_text(choice: dict) -> str | None:
    if "text" in choice:
        return choice.get("text")
    return (choice.get("delta") or {}).get("content")


async def send_request(client: httpx.AsyncClient, url: str, headers: dict[str, str],
                       payload: dict) -> RequestResult:
    """Stream one completion and time it (see the module docstring for the definitions)."""
    out = RequestResult()
    start = time.perf_counter()
    out.start_time = last = start
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            out.status = response.status_code
            if response.status_code != 200:
                out.error = f"HTTP {response.status_code}: {_error_message(await response.aread())}"
                return out
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, `:` keep-alive comments, `event:` lines
                data_text = line[5:].strip()
                if data_text == "[DONE]":
                    break
                data = json.loads(data_text)
                if data.get("error"):
                    out.error = f"stream error: {_error_message(data_text.encode())}"
                    return out
                if choices := data.get("choices"):
                    choice = choices[0]
                    text = _choice_text(choice) or ""
                    # An empty final chunk that only carries finish_reason is no token.
                    if text or choice.get("finish_reason") is None:
                        now = time.perf_counter()
                        if out.chunks == 0:
                            out.ttft = now - start
                        else:
                            out.itl.append(now - last)
                        last = now
                        out.chunks += 1
                        out.text += text
                if usage := data.get("usage"):
                    if usage.get("completion_tokens") is not None:
                        out.output_tokens = int(usage["completion_tokens"])
                        out.usage_reported = True
                    if usage.get("prompt_tokens") is not None:
                        out.prompt_tokens = int(usage["prompt_tokens"])
    except httpx.HTTPError as exc:
        out.error = f"{type(exc).__name__}: {exc}".rstrip(": ")
        return out
    except ValueError as exc:  # a data line that is not JSON
        out.error = f"bad stream chunk: {exc}"
        return out
    if out.chunks == 0:
        out.error = "the stream ended without a single token"
        return out
    out.success = True
    out.latency = last - start
    if not out.usage_reported:
        out.output_tokens = out.chunks
    return out


def calculate_metrics(results: list[RequestResult], duration: float,
                      prompt_len: int) -> dict:
    """One level's figures from its requests and its wall time (vLLM's definitions)."""
    ok = [r for r in results if r.success]
    total_input = sum(r.prompt_tokens or prompt_len for r in ok)
    total_output = sum(r.output_tokens for r in ok)
    ttfts = [r.ttft for r in ok]
    e2els = [r.latency for r in ok]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [gap for r in ok for gap in r.itl]
    duration = max(duration, 1e-9)
    metrics = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration,
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
        "max_concurrent_requests": _peak_concurrency(ok),
        "usage_reported": all(r.usage_reported for r in ok) if ok else False,
    }
    for name, sample in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        metrics.update(summarize_ms(name, sample))
    errors = Counter(r.error for r in results if not r.success)
    metrics["errors"] = [{"message": msg, "count": n} for msg, n in errors.most_common(5)]
    return metrics


def _peak_concurrency(results: list[RequestResult]) -> int:
    events = sorted([(r.start_time, 1) for r in results]
                    + [(r.start_time + r.latency, -1) for r in results])
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


class ServeBench:
    """Runs the levels of one `bench serve` against one server."""

    def __init__(self, config: ServeConfig,
                 on_level: Callable[[int, int], None] | None = None,
                 on_request: Callable[[RequestResult], None] | None = None):
        self.config = config
        self.on_level = on_level or (lambda concurrency, n: None)
        self.on_request = on_request or (lambda result: None)
        self.root = base_url(config.url)
        self.api_url = self.root + ENDPOINT
        self.headers = {"Accept": "text/event-stream",
                        # Ask caching gateways to run the model: a benchmark measures serving.
                        "Cache-Control": "no-cache"}
        if config.api_key:
            self.headers["Authorization"] = f"Bearer {config.api_key}"

    def payload(self, prompt: str) -> dict:
        body = {"model": self.config.model, "prompt": prompt, "max_tokens": self.config.gen_len,
                "stream": True, "stream_options": {"include_usage": True}}
        if self.config.temperature is not None:
            body["temperature"] = self.config.temperature
        return body

    async def run(self) -> dict:
        cfg = self.config
        if cfg.prompt_len <= 0 or cfg.gen_len <= 0:
            raise InvalidRequest("--prompt-len and --gen-len must be positive")
        if not cfg.concurrency or any(level <= 0 for level in cfg.concurrency):
            raise InvalidRequest("--concurrency: levels must be positive", param="concurrency")
        if cfg.request_rate <= 0:
            raise InvalidRequest("--request-rate must be positive (or inf)", param="request_rate")
        started = datetime.now(UTC)
        connections = max(cfg.concurrency) + 4
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        timeout = httpx.Timeout(cfg.timeout, connect=10.0)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            await self.check(client)
            levels = []
            for index, concurrency in enumerate(cfg.concurrency):
                levels.append(await self.run_level(client, concurrency, index))
        return {
            "benchmark": "serve",
            "url": cfg.url,
            "endpoint": ENDPOINT,
            "model": cfg.model,
            "prompt_len": cfg.prompt_len,
            "prompt_len_unit": "words" if cfg.tokenizer is None else "tokens",
            "gen_len": cfg.gen_len,
            "request_rate": None if math.isinf(cfg.request_rate) else cfg.request_rate,
            "temperature": cfg.temperature,
            "seed": cfg.seed,
            "started_at": started.isoformat(),
            "levels": levels,
        }

    async def check(self, client: httpx.AsyncClient) -> None:
        """One request before the levels: it warms the server up, and a server that
        cannot serve at all fails here with one clear error instead of N errors."""
        prompt = make_prompts(1, self.config.prompt_len, self.config.seed, "warmup",
                              self.config.tokenizer)[0]
        result = await send_request(client, self.api_url, self.headers, self.payload(prompt))
        if not result.success:
            raise self._probe_error(result)

    def _probe_error(self, result: RequestResult) -> LlmctlError:
        where = self.api_url
        if result.status is None:
            return UpstreamError(f"cannot reach {where}: {result.error}")
        if result.status == 401:
            return AuthenticationError(f"{where} refused the API key: {result.error}")
        if result.status == 403:
            return PermissionDenied(f"{where}: {result.error}")
        message = result.error.lower()
        if result.status == 404 and "model" in message:
            return ModelNotFound(f"model {self.config.model!r} not served at {self.root}: "
                                 f"{result.error}", param="model")
        if result.status == 404:
            return NotFound(f"{where}: {result.error}")
        if result.status in (400, 422) and "model" in message and self.config.model in message:
            return ModelNotFound(f"model {self.config.model!r} not served at {self.root}: "
                                 f"{result.error}", param="model")
        if result.status in (400, 422):
            return InvalidRequest(f"{where} rejected the request: {result.error}")
        return UpstreamError(f"{where}: {result.error}")

    async def run_level(self, client: httpx.AsyncClient, concurrency: int, index: int) -> dict:
        cfg = self.config
        n = cfg.prompts_for(concurrency)
        prompts = make_prompts(n, cfg.prompt_len, cfg.seed, f"level{index}", cfg.tokenizer)
        offsets = arrival_offsets(n, cfg.request_rate, cfg.seed + index)
        semaphore = asyncio.Semaphore(concurrency)
        self.on_level(concurrency, n)

        async def one(prompt: str) -> RequestResult:
            async with semaphore:
                result = await send_request(client, self.api_url, self.headers,
                                            self.payload(prompt))
            self.on_request(result)
            return result

        start = time.perf_counter()
        tasks = []
        for prompt, offset in zip(prompts, offsets, strict=True):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(prompt)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        if cfg.tokenizer is not None:
            for r in results:
                if r.success and not r.usage_reported:
                    r.output_tokens = len(cfg.tokenizer.encode(r.text, add_special_tokens=False))
        return {"concurrency": concurrency, "num_prompts": n,
                **calculate_metrics(results, duration, cfg.prompt_len)}


def run_serve_bench(config: ServeConfig, **callbacks) -> dict:
    """Run the benchmark to completion; the JSON document described in the README."""
    return asyncio.run(ServeBench(config, **callbacks).run())
