"""The local engine: a transformers causal LM on this process's device, continuously batched.

`LocalEngine` is the asyncio face of one model: it loads weights once, turns requests
into token ids (checking them against the model's context), enforces backpressure,
and waits on the `Scheduler` (server/engines/scheduler.py), whose thread owns the model.

Prompt tokenization, decided once here so counts agree everywhere:

- text prompts are tokenized as `tokenizer(text)` with special tokens, i.e. exactly
  what `model.generate(**tokenizer(text, return_tensors="pt"))` sees (a BOS where the
  tokenizer adds one; the OpenAI completions behaviour of vLLM and TGI);
- chat messages are rendered with the model's chat template
  (`apply_chat_template(add_generation_prompt=True)`, see `render_chat`) and that text is
  tokenized *without* special tokens, because the template already wrote them (what
  `apply_chat_template(tokenize=True)` does);
- token-id prompts are used as given (lm-evaluation-harness sends these).

`Completion.prompt_tokens` is the length of that id list: the real count the model ran,
and `count_tokens(text)` agrees with it for a text prompt (`add_special_tokens=False`
counts rendered chat text or output text the same way the engine does).

Generated text is decoded with `skip_special_tokens=True`; an EOS token counts as a
generated token (it is in `token_ids` and `completion_tokens`) but adds no text. Token
logprobs (generated and echoed) are the model's raw distribution (log_softmax of the
float32 logits, before temperature/top-k/top-p), which is what lm-evaluation-harness
scoring and the OpenAI API expect.

Metrics: `stats` (EngineStats: running, waiting, steps, completed, cancelled, ... and
per-request traces), `queue_depth`, `batch_size`, and the `on_queue_time(seconds)` hook
called once per request when it leaves the queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import hashlib
import math
import os
import threading
from collections.abc import AsyncIterator, Callable

from server.config import ModelSpec, Settings
from server.engines import hub
from server.engines.base import Completion, EngineRequest, ModelEngine, SamplingParams, StreamDelta
from server.engines.device import configure_threads, release_memory, resolve_device, resolve_dtype
from server.engines.scheduler import EngineStats, Scheduler, Sequence, prompt_logprobs
from server.engines.tokenizer import count, longest_token
from server.errors import ConfigError, InvalidRequest, Overloaded, Unavailable

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs
INLINE_ENCODE_CHARS = 4096  # longer prompts are tokenized in a worker thread


class LocalEngine(ModelEngine):
    """One local model served with continuous batching.

    Safe under concurrent calls from any number of tasks (and event loops). Loading is
    lazy and happens once: `start()` or the first request loads weights and starts the
    loop thread; `close()` stops it and frees the memory.
    """

    def __init__(self, spec: ModelSpec, settings: Settings | None = None, *,
                 prefill_group_tokens: int | None = None,
                 prefill_chunk_tokens: int | None = None,
                 idle_prefill_tokens: int | None = None,
                 on_queue_time: Callable[[float], None] | None = None):
        self.spec = spec
        self.settings = settings if settings is not None else Settings()
        self.model_id = spec.name or spec.id
        # prefill budgets in prompt tokens, None picks by device (see Scheduler): how
        # many newcomers' prompts one group takes, and how much of a group runs per loop
        # iteration while other requests decode (bounds their stall) and while none do
        self.prefill_group_tokens = prefill_group_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.idle_prefill_tokens = idle_prefill_tokens
        self._on_queue_time = on_queue_time
        self.model = None
        self.tokenizer = None
        self.device = None
        self.dtype = None
        self._scheduler: Scheduler | None = None
        self._context: int | None = spec.max_context
        self._vocab: int | None = None
        self._resolved: hub.Source | None = None
        self._load_lock = threading.Lock()
        self._tok_lock = threading.Lock()  # this side's tokenizer (the loop has its own)
        self._pieces: dict[int, str] = {}
        self._idle_stats = EngineStats()
        self._longest: int | None = None
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def ready(self) -> bool:
        return self._scheduler is not None and self._scheduler.alive

    async def start(self) -> None:
        if self._scheduler is None:
            await asyncio.to_thread(self.load)

    def load(self) -> None:
        """Load tokenizer and weights and start the loop thread (blocking, once)."""
        with self._load_lock:
            if self._scheduler is not None:
                return
            from transformers import AutoModelForCausalLM

            device = resolve_device(self.spec.device or self.settings.model_device)
            dtype = resolve_dtype(self.spec.dtype, device)
            configure_threads(self.settings.torch_threads)
            self._ensure_tokenizer()
            loop_tokenizer = self._load_tokenizer()
            source = self._source()
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    source.name_or_path, revision=self.spec.revision, dtype=dtype,
                    **source.kwargs())
            except (OSError, ValueError) as exc:
                self._resolved = None  # a later request probes again (the network may be back)
                raise ConfigError(f"cannot load model {self.model_id!r}: "
                                  f"{source.explain() or exc}") from None
            model.to(device).eval()
            self.model, self.device, self.dtype = model, device, dtype
            if self.spec.revision is None:
                self._fingerprint = weights_fingerprint(source.name_or_path)
            self._vocab = model.get_input_embeddings().num_embeddings
            if self.spec.max_context is None:
                self._context = _model_context(model.config, self.tokenizer)
            cpu = device.type == "cpu"
            group = self.prefill_group_tokens or (32 if cpu else 4096)
            chunk = self.prefill_chunk_tokens or (256 if cpu else 4096)
            idle = self.idle_prefill_tokens or max(chunk, 1024 if cpu else 16384)
            self._scheduler = Scheduler(
                model, loop_tokenizer, device=device,
                max_batch_size=self.spec.max_batch_size, max_queue=self.spec.max_queue,
                eos_ids=_eos_ids(model, self.tokenizer), pad_id=_pad_id(self.tokenizer),
                prefill_group_tokens=group, prefill_chunk_tokens=chunk,
                idle_prefill_tokens=idle,
                on_queue_time=self._on_queue_time, name=self.model_id,
            )
            self._scheduler.start()
            _freeze_gc()

    async def close(self) -> None:
        scheduler = self._scheduler
        if scheduler is None:
            return
        await asyncio.to_thread(scheduler.stop)
        with self._load_lock:
            self._idle_stats = scheduler.stats
            self._scheduler = None
            device = self.device
            self.model = None
            scheduler.model = None
        gc.unfreeze()  # let the collector reach the model's cycles again (see _freeze_gc)
        release_memory(device)
        gc.freeze()

    async def health(self) -> tuple[bool, str]:
        if self._scheduler is None:
            return False, "not loaded"
        if not self._scheduler.alive:
            return False, "engine loop stopped"
        return True, "ready"

    # ------------------------------------------------------------------ metrics

    @property
    def stats(self) -> EngineStats:
        """Live counters (see EngineStats); the last ones after close()."""
        return self._scheduler.stats if self._scheduler is not None else self._idle_stats

    @property
    def queue_depth(self) -> int:
        """Requests accepted but not yet running."""
        return self.stats.waiting

    @property
    def batch_size(self) -> int:
        """Requests running (decoding or being prefilled)."""
        return self.stats.running

    @property
    def on_queue_time(self) -> Callable[[float], None] | None:
        """Called with each request's queue time in seconds (from the loop thread)."""
        return self._on_queue_time

    @on_queue_time.setter
    def on_queue_time(self, hook: Callable[[float], None] | None) -> None:
        self._on_queue_time = hook
        if self._scheduler is not None:
            self._scheduler.on_queue_time = hook

    # ------------------------------------------------------------------ tokenizer

    @property
    def max_context(self) -> int | None:
        return self._context

    @property
    def longest_token(self) -> int | None:
        return self._longest

    @property
    def fingerprint(self) -> str | None:
        return self._fingerprint

    def count_tokens(self, text: str, *, add_special_tokens: bool = True) -> int | None:
        """Tokens the model runs for `prompt=text` (special tokens such as a BOS
        included, as for a text prompt). For text that already carries them (a rendered
        chat template) or a piece of output, pass `add_special_tokens=False`."""
        tok = self._ensure_tokenizer()
        with self._tok_lock:
            return count(tok, text, add_special_tokens=add_special_tokens)

    def render_chat(self, messages: list[dict]) -> str | None:
        tok = self._ensure_tokenizer()
        if not getattr(tok, "chat_template", None):
            raise InvalidRequest(f"model {self.model_id!r} has no chat template; send a "
                                 "prompt instead of messages", param="messages")
        try:
            with self._tok_lock:
                return tok.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=True)
        except Exception as exc:  # jinja errors, wrong message shapes
            raise InvalidRequest(f"cannot render messages with the chat template: {exc}",
                                 param="messages") from None

    def _source(self) -> hub.Source:
        if self._resolved is None:  # probed once, not once per file
            self._resolved = hub.resolve(self.spec)
        return self._resolved

    def _load_tokenizer(self):
        from transformers import AutoTokenizer

        source = self._source()
        try:
            return AutoTokenizer.from_pretrained(source.name_or_path,
                                                 revision=self.spec.revision, **source.kwargs())
        except (OSError, ValueError) as exc:
            self._resolved = None  # a later request probes again (the network may be back)
            raise ConfigError(f"cannot load the tokenizer of model {self.model_id!r}: "
                              f"{source.explain() or exc}") from None

    def _ensure_tokenizer(self):
        if self.tokenizer is None:
            with self._tok_lock:
                if self.tokenizer is None:
                    tok = self._load_tokenizer()
                    self._longest = longest_token(tok)
                    self.tokenizer = tok
        return self.tokenizer

    def _piece(self, token_id: int) -> str:
        """One token's text (for logprob entries); call with `_tok_lock` held."""
        text = self._pieces.get(token_id)
        if text is None:
            text = self._pieces[token_id] = self.tokenizer.decode([token_id],
                                                                  skip_special_tokens=False)
        return text

    async def _encode_off_loop(self, request: EngineRequest) -> tuple[list[int], str | None]:
        """`_encode`, in a worker thread when the prompt is long (see INLINE_ENCODE_CHARS)."""
        size = (len(request.prompt) if isinstance(request.prompt, str)
                else sum(len(m.get("content") or "") for m in request.messages or []))
        if size <= INLINE_ENCODE_CHARS:
            return self._encode(request)
        return await asyncio.to_thread(self._encode, request)

    def _encode(self, request: EngineRequest) -> tuple[list[int], str | None]:
        """Prompt token ids and the prompt's text (None for ids until needed)."""
        if (request.prompt is None) == (request.messages is None):
            raise InvalidRequest("exactly one of prompt or messages must be given",
                                 param="prompt")
        tok = self._ensure_tokenizer()
        param = "prompt"
        if request.messages is not None:
            param = "messages"
            text = self.render_chat(request.messages)
            with self._tok_lock:
                ids = tok(text, add_special_tokens=False)["input_ids"]
        elif isinstance(request.prompt, str):
            text = request.prompt
            with self._tok_lock:
                ids = tok(text)["input_ids"]
        else:
            text = None
            ids = list(request.prompt)
            vocab = self._vocab or len(tok)
            if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
                raise InvalidRequest(f"prompt token ids must be integers in [0, {vocab})",
                                     param="prompt")
        if not ids:
            raise InvalidRequest("the prompt is empty", param=param)
        return ids, text

    # ------------------------------------------------------------------ requests

    async def generate(self, request: EngineRequest) -> Completion:
        return (await self.generate_all([request]))[0]

    async def generate_all(self, requests: list[EngineRequest]) -> list[Completion]:
        """All of `requests` queued at once or none (Overloaded); when one fails or the
        caller goes, every one still running leaves the batch."""
        items = await self._submit_all(requests, stream=False)
        try:
            results = []
            for item in items:
                if isinstance(item, Sequence):
                    got = await item.queue.get()
                    if isinstance(got, BaseException):
                        raise got
                    item = self._completion(item)
                results.append(item)
            return results
        except BaseException:
            self._cancel(items)
            raise

    async def stream(self, request: EngineRequest) -> AsyncIterator[StreamDelta | Completion]:
        (follow,) = await self.stream_all([request])
        try:
            async for item in follow:
                yield item
        finally:  # aclose(), client gone, task cancelled: the request leaves the batch
            await follow.aclose()

    async def stream_all(self, requests: list[EngineRequest]) -> list[AsyncIterator]:
        return [_Follow(self, item) for item in await self._submit_all(requests, stream=True)]

    def _cancel(self, items: list[Sequence | Completion]) -> None:
        scheduler = self._scheduler
        for item in items:
            if isinstance(item, Sequence) and not item.done and scheduler is not None:
                scheduler.cancel(item)

    async def _submit_all(self, requests: list[EngineRequest], *,
                          stream: bool) -> list[Sequence | Completion]:
        """Each request's Sequence (or its Completion, when nothing is to generate),
        all queued together: checked first, then admitted as a whole or not at all."""
        await self.start()
        items = [await self._prepare(r, stream) for r in requests]
        scheduler = self._scheduler
        if scheduler is None:
            raise Unavailable(f"model {self.model_id} was closed")
        seqs = [item for item in items if isinstance(item, Sequence)]
        if seqs and not scheduler.submit_all(seqs):
            raise Overloaded(
                f"model {self.model_id} is overloaded: {self.spec.max_batch_size} requests "
                f"running and {self.spec.max_queue} queued at most; retry shortly",
                headers={"Retry-After": "1"})
        return items

    async def _prepare(self, request: EngineRequest, stream: bool) -> Sequence | Completion:
        params = _normalize(request.params)
        ids, text = await self._encode_off_loop(request)
        self._check(params, len(ids), "messages" if request.messages is not None else "prompt")
        if params.max_new_tokens == 0 and not request.echo_logprobs:
            return Completion(text="", finish_reason="length", prompt_tokens=len(ids),
                              completion_tokens=0, prompt_text=text,
                              logprobs=[] if params.logprobs is not None else None, ttft_s=0.0)
        seq = Sequence(ids, params, request_id=request.request_id,
                       echo=request.echo_logprobs, stream=stream,
                       loop=asyncio.get_running_loop())
        seq.prompt_text = text
        return seq

    def _check(self, p: SamplingParams, prompt_tokens: int, prompt_param: str) -> None:
        if p.max_new_tokens < 0:
            raise InvalidRequest("max_tokens must be >= 0", param="max_tokens")
        if p.max_new_tokens > self.spec.max_new_tokens:
            raise InvalidRequest(
                f"max_tokens is {p.max_new_tokens}, above this model's limit of "
                f"{self.spec.max_new_tokens}", param="max_tokens")
        if math.isnan(p.temperature) or p.temperature < 0:
            raise InvalidRequest("temperature must be >= 0", param="temperature")
        if not 0 < p.top_p <= 1:
            raise InvalidRequest("top_p must be in (0, 1]", param="top_p")
        if p.top_k < 0:
            raise InvalidRequest("top_k must be >= 0", param="top_k")
        if p.logprobs is not None and not 0 <= p.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}",
                                 param="logprobs")
        if any(not isinstance(s, str) or not s for s in p.stop):
            raise InvalidRequest("stop strings must be non-empty strings", param="stop")
        limit = self._context
        if limit is None:
            return
        if prompt_tokens > limit:
            raise InvalidRequest(
                f"this model's maximum context length is {limit} tokens, but the "
                f"{prompt_param} has {prompt_tokens} tokens", param=prompt_param,
                code="context_length_exceeded")
        if prompt_tokens + p.max_new_tokens > limit:
            raise InvalidRequest(
                f"this model's maximum context length is {limit} tokens, but "
                f"{prompt_tokens} prompt tokens + max_tokens {p.max_new_tokens} = "
                f"{prompt_tokens + p.max_new_tokens}; reduce max_tokens or the {prompt_param}",
                param="max_tokens", code="context_length_exceeded")

    def _completion(self, seq: Sequence) -> Completion:
        prompt_lps = None
        text = seq.prompt_text
        if seq.echo:
            tok = self.tokenizer
            with self._tok_lock:
                if text is None:
                    text = tok.decode(seq.prompt_ids)
                prompt_lps = prompt_logprobs(seq, self._piece, tok.decode)
        return Completion(
            text=seq.text,
            finish_reason=seq.finish_reason,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.out_ids),
            token_ids=list(seq.out_ids),
            logprobs=seq.logprobs,
            prompt_text=text,
            prompt_logprobs=prompt_lps,
            ttft_s=seq.ttft_s,
        )


class _Follow:
    """One admitted request's stream. `aclose()` cancels the request even when the
    stream was never iterated (an async generator that never started would skip its
    `finally`, and the request would run on unseen)."""

    def __init__(self, engine: LocalEngine, item: Sequence | Completion):
        self.engine = engine
        self.item = item
        self.finished = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> StreamDelta | Completion:
        item = self.item
        if self.finished:
            raise StopAsyncIteration
        if isinstance(item, Completion):
            self.finished = True
            return item
        got = await item.queue.get()
        if isinstance(got, BaseException):
            self.finished = True
            raise got
        if got is item:
            self.finished = True
            return self.engine._completion(item)
        return got

    async def aclose(self) -> None:
        self.finished = True
        self.engine._cancel([self.item])


def weights_fingerprint(source: str) -> str | None:
    """A digest of the model directory's files (names, sizes, modification times), or
    of the hub cache snapshot it resolves to; None when neither is on disk. Taken once
    at load: cache keys of a model without a `revision` change when its weights are
    replaced in place."""
    directory = source if os.path.isdir(source) else None
    if directory is None:
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(source, "config.json")
        except Exception:  # not a repo id, or no cache: nothing to fingerprint
            return None
        if not isinstance(found, str):
            return None
        directory = os.path.dirname(found)
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            stat = os.stat(path)  # follows the hub cache's symlinks to the blobs
            digest.update(f"{os.path.relpath(path, directory)}\0{stat.st_size}\0"
                          f"{stat.st_mtime_ns}\n".encode())
    return "weights:" + digest.hexdigest()[:32]


def _freeze_gc() -> None:
    """Move everything alive now (the model, tokenizers, transformers' modules: some
    400k objects) out of the collector's reach. Otherwise each full collection walks
    them all for ~0.25 s while holding the GIL, and the engine loop stalls with it;
    vLLM does the same after start-up. Process-wide, and harmless to repeat."""
    gc.collect()
    gc.freeze()


def _normalize(p: SamplingParams) -> SamplingParams:
    """Accept a list of stop strings (JSON gives lists) where the dataclass wants a tuple."""
    if isinstance(p.stop, str):
        return dataclasses.replace(p, stop=(p.stop,))
    if not isinstance(p.stop, tuple):
        return dataclasses.replace(p, stop=tuple(p.stop or ()))
    return p


def _model_context(config, tokenizer) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10**8 else None


def _eos_ids(model, tokenizer) -> set[int]:
    """EOS as `generate` sees it: the generation config's (int or list), else the
    tokenizer's."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    if ids is None:
        ids = model.config.eos_token_id
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return set()
    return {ids} if isinstance(ids, int) else set(ids)


def _pad_id(tokenizer) -> int:
    """Any valid id works for padding columns (they are masked); prefer the pad token."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(value, int):
            return value
    return 0


