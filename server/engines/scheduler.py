"""Continuous (iteration-level) batching for the local engine.

One background thread owns the model and runs this loop under `torch.inference_mode()`:

1. take in newly submitted sequences, drop cancelled ones wherever they are;
2. admit waiting sequences, oldest first, into a *prefill group* of at most
   `prefill_group_tokens` prompt tokens (but at least two requests, so a backlog
   drains) while the running batch has room (`max_batch_size` counts running and
   prefilling rows);
3. run one bounded chunk of the group's prefill (at most `prefill_chunk_tokens`
   rows x columns while others are decoding, `idle_prefill_tokens` when nothing is), so
   a long prompt never stalls running decodes for more than one chunk; when the group's
   prompts are done, sample each row's first token, hand it out at once (that is the
   TTFT), and merge the group into the running batch;
4. run one decode step for every running row, sample each row with its own params and
   generator, and drop the rows that finished.

Requests thus join and leave at step boundaries, each with its own sampling params and
KV rows, so a long request never holds back a short one (Orca, OSDI'22:
https://www.usenix.org/conference/osdi22/presentation/yu).

KV layout: one `BatchCache` (server/engines/kvcache.py: a `DynamicCache` reshaped in
place, never rebuilt) holds the batch, rows right-aligned and left-padded, with a
boolean padding mask. Every row's newest token sits in the last column, so a decode
step is a single forward of `[B, 1]` tokens with per-row `position_ids`; newcomers are
written into spare rows; a row that leaves is filled from the tail; columns that are
padding in every row are trimmed. While no row is
padded (the single-request case) the mask is `None`, which lets SDPA run its causal
fast path and keeps per-step work minimal. Because rows are contiguous and
right-aligned, column distance equals position distance, so sliding-window masks built
on columns stay right too.

Results cross to asyncio with one `loop.call_soon_threadsafe` per step and event loop,
into each request's own `asyncio.Queue`.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from server.engines.base import SamplingParams, StreamDelta, TokenLogprob
from server.engines.kvcache import BatchCache
from server.errors import LlmctlError, Unavailable

log = logging.getLogger(__name__)

# Incremental detokenization keeps this many prompt tokens as context, so the first
# generated token decodes the way it would inside the full text (the vLLM/TGI approach).
_DETOK_CONTEXT = 5
_TRACE_HISTORY = 2048
_REPLACEMENT_WAIT_MIN_S = 0.002
_REPLACEMENT_WAIT_MAX_S = 0.025
_REPLACEMENT_HORIZON_S = 0.020


# --------------------------------------------------------------------------- counters


@dataclass
class RequestTrace:
    """Where one request was, in scheduler steps: what a test asserts "left within one
    decode step" on, and what an operator reads when a request seems stuck."""

    request_id: str
    submitted_step: int
    admitted_step: int | None = None
    first_token_step: int | None = None
    cancel_step: int | None = None  # the step counter when cancel() was called
    left_step: int | None = None  # the step counter when its rows left the batch
    finish_reason: str | None = None
    queue_s: float | None = None


@dataclass(eq=False)
class EngineStats(Mapping):
    """Live counters of one scheduler; ints are written by the loop thread only.

    It is also a read-only mapping of the numbers (`dict(stats)`, `stats["running"]`),
    which is what the metrics collector reads; `requests` holds the recent per-request
    traces (by request id) and is not part of the mapping.
    """

    running: int = 0  # rows in the decode batch plus rows being prefilled
    prefilling: int = 0
    inflight: int = 0  # accepted and not finished (waiting + running)
    steps: int = 0  # loop iterations that ran the model
    decode_steps: int = 0
    prefill_chunks: int = 0
    submitted: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected: int = 0  # refused by backpressure (Overloaded)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    kv_rows: int = 0  # batch rows held in the KV cache
    kv_columns: int = 0  # cache length (padded) of the decode batch
    prefill_s: float = 0.0  # wall time in prefill chunks (forward, sampling, hand-off)
    decode_s: float = 0.0  # wall time in decode steps
    requests: OrderedDict[str, RequestTrace] = field(default_factory=OrderedDict, repr=False)

    @property
    def waiting(self) -> int:
        """Accepted requests not yet admitted to the batch (the queue depth)."""
        return max(0, self.inflight - self.running)

    @property
    def kv_tokens(self) -> int:
        """Token slots the decode batch's KV cache holds (rows x columns)."""
        return self.kv_rows * self.kv_columns

    def trace(self, request_id: str) -> RequestTrace | None:
        return self.requests.get(request_id)

    def snapshot(self) -> dict[str, int | float]:
        return dict(self)

    def __getitem__(self, key: str) -> int | float:
        if key in _STAT_KEYS:
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self):
        return iter(_STAT_KEYS)

    def __len__(self) -> int:
        return len(_STAT_KEYS)


_STAT_KEYS = ("running", "waiting") + tuple(
    f for f in EngineStats.__dataclass_fields__ if f not in ("requests", "running")) + (
    "kv_tokens",)


# --------------------------------------------------------------------------- sequences


class TextTracker:
    """Incremental detokenizer for one sequence, with stop strings.

    Decoding a window of recent tokens and emitting only what grew (and never a trailing
    U+FFFD, i.e. half a UTF-8 character) keeps multi-byte and BPE pieces intact: the
    concatenated deltas equal the decoded text.
    """

    __slots__ = ("_decode", "_ids", "_prefix", "_read")

    def __init__(self, decode: Callable[[list[int]], str], context: Seq[int]):
        self._decode = decode
        self._ids = list(context)
        self._prefix = 0
        self._read = len(self._ids)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character) at the end."""
        return self._advance(final=True) if self._read < len(self._ids) else ""

    def _advance(self, final: bool) -> str:
        ids = self._ids
        before = self._decode(ids[self._prefix : self._read])
        after = self._decode(ids[self._prefix :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(ids)
            return after[len(before) :]
        return ""


def _holdback(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop string:
    streaming must not hand that out yet."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


class Sequence:
    """One request's state, shared by the asyncio side and the loop thread.

    The asyncio side creates it and reads it only after the loop put it on its queue as
    finished; the loop thread owns everything else. `cancel_requested` is the one field
    the asyncio side writes afterwards (an atomic attribute store).
    """

    _ids = itertools.count(1)

    def __init__(self, prompt_ids: list[int], params: SamplingParams, *, request_id: str = "",
                 echo: bool = False, stream: bool = False,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.request_id = request_id or f"seq-{next(self._ids)}"
        self.prompt_ids = prompt_ids
        self.params = params
        self.echo = echo
        self.stream = stream
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancel_requested = False
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.trace: RequestTrace | None = None
        # loop-thread state
        self.generator: torch.Generator | None = None
        self.out_ids: list[int] = []
        self.text = ""
        self.text_tracker: TextTracker | None = None
        self.emitted = 0  # characters of `text` already streamed
        self.pending_ids: list[int] = []
        self.pending_lps: list[TokenLogprob] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.prompt_lps: list[float] | None = None  # prompt tokens 1..n-1 (echo)
        self.prompt_tops: list[tuple[list[int], list[float]]] | None = None
        self.finish_reason: str | None = None
        self.prompt_text: str | None = None  # set by the engine, for the Completion
        self.done = False

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.submitted_at


# --------------------------------------------------------------------------- sampling


def _sample_row(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """Temperature, then top-k, then top-p (the order HF's logits processors use), then
    inverse-CDF sampling with the request's own generator. One uniform draw per token
    makes a seeded request repeat exactly, alone or in any batch."""
    x = logits.float()
    if params.temperature != 1.0:
        x = x / params.temperature
    vocab = x.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = sorted_x.softmax(-1)
        # drop a token when the mass before it already reaches top_p (keeps at least one)
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        x = x.scatter(0, order[drop], float("-inf"))
    cdf = x.softmax(-1).cumsum(-1)
    u = torch.rand((), generator=gen, device=gen.device).to(cdf.device)
    u = u.clamp_min(1e-12) * cdf[-1]
    return int(torch.searchsorted(cdf, u.reshape(1)).clamp_max(vocab - 1))


# --------------------------------------------------------------------------- batches


def _pad_mask(mask: torch.Tensor | None, rows: int, length: int, total: int,
              device: torch.device) -> torch.Tensor:
    """A [rows, total] padding mask from `mask` ([rows, length] or None = all real)."""
    if mask is None:
        mask = torch.ones(rows, length, dtype=torch.bool, device=device)
    if total > length:
        mask = F.pad(mask, (total - length, 0), value=False)
    return mask


class _Batch:
    """Rows decoding together: cache, mask, the next input token and position per row."""

    def __init__(self, rows: list[Sequence], cache: BatchCache, mask: torch.Tensor | None,
                 length: int, positions: torch.Tensor, next_tokens: torch.Tensor):
        self.rows = rows
        self.cache = cache
        self.mask = mask  # [B, length] bool, None while no row is padded
        self.length = length
        self.positions = positions  # [B, 1] position of next_tokens
        self.next_tokens = next_tokens  # [B, 1]

    def select(self, keep: list[int]) -> None:
        """Keep rows `keep` (ascending); the cache fills holes from the tail in place,
        so the rows' order changes with it."""
        order = self.cache.keep_rows(keep, len(self.rows))
        index = torch.tensor(order, device=self.next_tokens.device)
        self.rows = [self.rows[i] for i in order]
        self.positions = self.positions.index_select(0, index)
        self.next_tokens = self.next_tokens.index_select(0, index)
        if self.mask is not None:
            self.mask = self.mask.index_select(0, index)
            self._trim()

    def _trim(self) -> None:
        """Drop leading columns that are padding in every row; forget an all-real mask."""
        used = self.mask.any(0)
        lead = int(used.int().argmax()) if bool(used.any()) else 0
        if lead:
            self.cache.trim_left(lead)
            self.mask = self.mask[:, lead:]
            self.length -= lead
        if bool(self.mask.all()):
            self.mask = None

    def merge(self, other: _Batch) -> None:
        device = self.next_tokens.device
        total = max(self.length, other.length)
        if self.mask is None and other.mask is None and self.length == other.length:
            mask = None
        else:
            mask = torch.cat([
                _pad_mask(self.mask, len(self.rows), self.length, total, device),
                _pad_mask(other.mask, len(other.rows), other.length, total, device),
            ])
        self.cache.append(other.cache)
        self.rows = self.rows + other.rows
        self.mask = mask
        self.length = total
        self.positions = torch.cat([self.positions, other.positions])
        self.next_tokens = torch.cat([self.next_tokens, other.next_tokens])


class _PrefillGroup:
    """Newcomers whose prompts are being run, left-padded to a common length and
    processed a chunk of columns per loop iteration."""

    def __init__(self, rows: list[Sequence], pad_id: int, device: torch.device):
        self.rows = rows
        lengths = [len(s.prompt_ids) for s in rows]
        self.length = max(lengths)
        ids = [[pad_id] * (self.length - len(s.prompt_ids)) + s.prompt_ids for s in rows]
        self.ids = torch.tensor(ids, dtype=torch.long, device=device)
        if min(lengths) == self.length:
            self.mask = None
            self.positions = torch.arange(self.length, device=device).expand(len(rows), -1)
        else:
            real = [[False] * (self.length - n) + [True] * n for n in lengths]
            self.mask = torch.tensor(real, dtype=torch.bool, device=device)
            self.positions = (self.mask.long().cumsum(-1) - 1).clamp_min(0)
        self.cursor = 0
        self.cache = BatchCache()

    def select(self, keep: list[int]) -> None:
        """Keep rows `keep` (ascending), in the order the cache leaves them."""
        order = self.cache.keep_rows(keep, len(self.rows)) if self.cursor else keep
        index = torch.tensor(order, device=self.ids.device)
        self.rows = [self.rows[i] for i in order]
        self.ids = self.ids.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        if self.mask is not None:
            self.mask = self.mask.index_select(0, index)


# --------------------------------------------------------------------------- scheduler


class Scheduler:
    """The loop thread and its queues. `submit_all` and `cancel` are thread-safe."""

    def __init__(self, model, tokenizer, *, device: torch.device, max_batch_size: int,
                 max_queue: int, eos_ids: set[int], pad_id: int,
                 prefill_group_tokens: int = 32, prefill_chunk_tokens: int = 256,
                 idle_prefill_tokens: int = 1024,
                 on_queue_time: Callable[[float], None] | None = None,
                 name: str = "model"):
        self.model = model
        self.tokenizer = tokenizer  # this thread's own instance (fast tokenizers are not
        # safe to share across threads while another thread encodes)
        self.device = device
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        # Prefill budgets, in prompt tokens. Where prefill is compute-bound (a CPU), one
        # big group would make every newcomer of a burst wait for all the others'
        # prompts: small groups (`prefill_group_tokens`, about what one forward's fixed
        # cost buys) hand first tokens out in arrival order, and the staggered finishes
        # keep later arrivals from bunching up. On a GPU a large group costs about what
        # a small one does, so the engine passes large budgets there. A group's chunk
        # (rows x columns per iteration) is `prefill_chunk_tokens` while other rows
        # decode (it bounds their stall) and `idle_prefill_tokens` when none do.
        self.prefill_group_tokens = max(1, prefill_group_tokens)
        self.prefill_group_min = 2
        self.prefill_chunk_tokens = max(1, prefill_chunk_tokens)
        self.idle_prefill_tokens = max(self.prefill_chunk_tokens, idle_prefill_tokens)
        self.on_queue_time = on_queue_time
        self.name = name
        self.stats = EngineStats()

        params = _forward_params(model)
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in params
        self._piece_cache: dict[int, str] = {}

        self._lock = threading.Lock()  # admission accounting (stats.inflight)
        self._incoming: deque[Sequence] = deque()
        self._cancels: deque[Sequence] = deque()
        self._waiting: deque[Sequence] = deque()
        self._group: _PrefillGroup | None = None
        self._batch: _Batch | None = None
        self._outbox: list[tuple[Sequence, object]] = []
        self._wake = threading.Event()
        self._finished = 0  # sequences that left during the current iteration
        self._pauses = 0
        self._last_finish_at: float | None = None
        self._replaced = False  # a request came within the horizon of the last finish
        self._replacement_rate = 1.0  # share of recent finishes answered that way
        self._replacement_latency = _REPLACEMENT_WAIT_MIN_S  # EWMA, seconds
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # ---- control (any thread)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"llmctl-engine-{self.name}",
                                        daemon=True)
        self._thread.start()
        # An engine nobody closed must still stop before the interpreter tears torch
        # down under its thread (that aborts the process).
        atexit.register(self.stop, 5.0)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float | None = 30.0) -> None:
        self._stopping = True
        self._wake.set()
        atexit.unregister(self.stop)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def submit_all(self, seqs: list[Sequence]) -> bool:
        """Queue all of `seqs` (the choices of one API request) or none: False, and
        nothing queued, when they do not all fit in the batch and queue. Admitting them
        one by one let the first parts run on, free of charge, after a later part was
        refused (issue 15)."""
        with self._lock:
            if (self._stopping or self.stats.inflight + len(seqs)
                    > self.max_batch_size + self.max_queue):
                self.stats.rejected += len(seqs)
                return False
            for seq in seqs:
                self.stats.inflight += 1
                self.stats.submitted += 1
                seq.trace = RequestTrace(seq.request_id, submitted_step=self.stats.steps)
                self._remember(seq.trace)
                self._note_arrival()
            self._incoming.extend(seqs)
        self._wake.set()
        return True

    def cancel(self, seq: Sequence) -> None:
        """Ask the loop to drop `seq` at the next step boundary (client gone)."""
        if seq.done or seq.cancel_requested:
            return
        seq.cancel_requested = True
        if seq.trace is not None:
            seq.trace.cancel_step = self.stats.steps
        self._cancels.append(seq)
        self._wake.set()

    @property
    def inflight(self) -> int:
        return self.stats.inflight

    # ---- the loop (its own thread)

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopping:
                if not (self._incoming or self._cancels or self._group or self._batch
                        or (self._waiting and self._room() > 0)):
                    self._wake.wait()
                self._wake.clear()
                if self._stopping:
                    break
                try:
                    self._iterate()
                except Exception as exc:  # a bug outside the forward: keep serving
                    log.exception("engine loop iteration failed for model %s", self.name)
                    self._fail_active(exc)
                    self._flush()
                self._await_replacements()
            self._shutdown()

    def _await_replacements(self) -> None:
        """After rows finished, give callers a moment to send the requests that replace
        them, then take those in at once.

        Closed-loop callers (a benchmark, an eval run, a client with a fixed number of
        streams) send the next request a few ms after one finishes: about 1 ms in this
        process, 5-10 ms over HTTP. That is just after the loop took in newcomers, so
        without a pause each such request waits a whole iteration (a prefill plus a
        decode step, ~90 ms at 16 rows on a small CPU) before its own prefill starts.
        The pause lasts twice the observed finish-to-replacement latency (2-25 ms)
        and ends once as many new requests as finished have come in (a simulation of
        16 closed-loop streams over HTTP: TTFT p50 130 -> 56 ms for 2% throughput;
        the pause also locks onto that phase, where without it each finish is
        answered one iteration late). Where callers do not
        replace finished requests (open-loop traffic) it only costs time, so it is
        skipped unless recent finishes were mostly followed by a request within 20 ms
        (one in eight still pauses, to notice a change).
        """
        finished, self._finished = self._finished, 0
        if not finished:
            return
        previous, self._replaced = self._replaced, False
        if self._last_finish_at is not None:  # was the previous finish answered?
            hit = 1.0 if previous else 0.0  # weight 1/2: one answered finish turns it on
            self._replacement_rate = 0.5 * self._replacement_rate + 0.5 * hit
        self._last_finish_at = time.perf_counter()
        if not (self._batch is not None and self._room() > 0 and not self._waiting):
            return
        self._pauses += 1
        if self._replacement_rate < 0.5 and self._pauses % 8:
            return
        window = min(_REPLACEMENT_WAIT_MAX_S,
                     max(_REPLACEMENT_WAIT_MIN_S, 2.0 * self._replacement_latency))
        deadline = self._last_finish_at + window
        before = self.stats.submitted  # count only requests sent after this finish
        while self.stats.submitted - before < finished and not self._stopping:
            left = deadline - time.perf_counter()
            if left <= 0 or not self._wake.wait(left):
                break
            self._wake.clear()  # the loop re-checks its queues itself before sleeping

    def _note_arrival(self) -> None:
        """Called on submit: time since the last finish, to learn how fast (and
        whether) callers replace finished requests."""
        finished_at = self._last_finish_at
        if finished_at is None:
            return
        gap = time.perf_counter() - finished_at
        if gap < _REPLACEMENT_HORIZON_S and not self._replaced:
            self._replaced = True
            self._replacement_latency = 0.8 * self._replacement_latency + 0.2 * gap

    def _iterate(self) -> None:
        self._intake()
        self._apply_cancels()
        self._admit()
        ran = False
        try:
            if self._group is not None:
                started = time.perf_counter()
                self._prefill_chunk()
                ran = True
                self._flush()  # first tokens go out before the decode step: TTFT
                self.stats.prefill_s += time.perf_counter() - started
            if self._batch is not None:
                started = time.perf_counter()
                self._decode_step()
                ran = True
                self.stats.decode_s += time.perf_counter() - started
        except Exception as exc:  # a failed forward fails its rows, not the server
            log.exception("engine step failed for model %s", self.name)
            self._fail_active(exc)
        if ran:
            self.stats.steps += 1
        self._update_gauges()
        self._flush()

    def _room(self) -> int:
        running = (len(self._batch.rows) if self._batch else 0) + (
            len(self._group.rows) if self._group else 0)
        return self.max_batch_size - running

    def _intake(self) -> None:
        while self._incoming:
            self._waiting.append(self._incoming.popleft())

    def _apply_cancels(self) -> None:
        if not self._cancels:
            return
        gone: set[int] = set()
        while self._cancels:
            gone.add(id(self._cancels.popleft()))
        if any(id(s) in gone for s in self._waiting):
            for seq in [s for s in self._waiting if id(s) in gone]:
                self._leave(seq, "abort")
            self._waiting = deque(s for s in self._waiting if id(s) not in gone)
        for holder in (self._group, self._batch):
            if holder is None:
                continue
            keep = [i for i, s in enumerate(holder.rows) if id(s) not in gone]
            if len(keep) < len(holder.rows):
                for seq in holder.rows:
                    if id(seq) in gone:
                        self._leave(seq, "abort")
                self._shrink(holder, keep)

    def _shrink(self, holder: _Batch | _PrefillGroup, keep: list[int]) -> None:
        if not keep:
            if holder is self._group:
                self._group = None
            else:
                self._batch = None
        else:
            holder.select(keep)

    def _budget(self) -> int:
        return self.prefill_chunk_tokens if self._batch is not None else self.idle_prefill_tokens

    def _admit(self) -> None:
        """Start a prefill group from the waiting queue, oldest first.

        Waiting newcomers go in one group while their prompts fit
        `prefill_group_tokens`, and the first two always go: with one per iteration,
        arrivals at one per iteration (clients replacing finished requests) would keep
        any backlog forever. A row is not added when padding it and the others to a
        common length would more than double the group's work; a long prompt is
        chunked."""
        if self._group is not None or not self._waiting:
            return
        room = self._room()
        if room <= 0:
            return
        budget = self.prefill_group_tokens
        rows: list[Sequence] = []
        real = longest = 0
        now = time.perf_counter()
        while self._waiting and len(rows) < room:
            seq = self._waiting[0]
            n = len(seq.prompt_ids)
            padded = (len(rows) + 1) * max(longest, n)
            if rows and ((len(rows) >= self.prefill_group_min and real + n > budget)
                         or padded > 2 * (real + n)):
                break
            self._waiting.popleft()
            rows.append(seq)
            real += n
            longest = max(longest, n)
            seq.trace.admitted_step = self.stats.steps
            seq.trace.queue_s = now - seq.submitted_at
            self._observe_queue_time(seq.trace.queue_s)
        try:
            for seq in rows:
                self._prepare(seq)
            self._group = _PrefillGroup(rows, self.pad_id, self.device)
        except Exception as exc:  # never strand an admitted request
            log.exception("admitting requests failed for model %s", self.name)
            self._fail(rows, exc)

    def _prepare(self, seq: Sequence) -> None:
        p = seq.params
        if not p.greedy:
            gen_device = self.device if self.device.type == "cuda" else torch.device("cpu")
            seed = p.seed if p.seed is not None else random.SystemRandom().getrandbits(63)
            seq.generator = torch.Generator(device=gen_device).manual_seed(seed % (1 << 63))
        if seq.stream or p.stop or p.logprobs is not None:
            seq.text_tracker = TextTracker(self._decode_text, seq.prompt_ids[-_DETOK_CONTEXT:])
        if seq.echo:
            seq.prompt_lps = []
            seq.prompt_tops = [] if p.logprobs else None
        self.stats.prompt_tokens += len(seq.prompt_ids)

    def _observe_queue_time(self, seconds: float) -> None:
        hook = self.on_queue_time
        if hook is not None:
            try:
                hook(seconds)
            except Exception:
                log.exception("on_queue_time hook failed")

    # ---- model calls

    def _forward(self, ids, mask, positions, cache, logits_to_keep: int | None = None):
        kwargs = {self._cache_kw: cache}
        if logits_to_keep is not None and self._has_logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, **kwargs)
        return out.logits

    def _prefill_chunk(self) -> None:
        g = self._group
        rows = len(g.rows)
        width = max(1, self._budget() // rows)
        start, end = g.cursor, min(g.length, g.cursor + width)
        echo = any(s.echo for s in g.rows)
        last = end == g.length
        logits = self._forward(
            g.ids[:, start:end],
            None if g.mask is None else g.mask[:, :end],
            g.positions[:, start:end],
            g.cache,
            logits_to_keep=0 if echo else 1,
        )
        g.cursor = end
        self.stats.prefill_chunks += 1
        if echo:
            self._score_prompt_chunk(g, logits, start, end)
        if last:
            self._finish_prefill(g, logits[:, -1, :])

    def _score_prompt_chunk(self, g: _PrefillGroup, logits: torch.Tensor, start: int,
                            end: int) -> None:
        """Prompt logprobs of echo rows: logits at column c score the token at c + 1."""
        for r, seq in enumerate(g.rows):
            if not seq.echo:
                continue
            first = max(start, g.length - len(seq.prompt_ids))  # first real column
            stop = min(end, g.length - 1)
            if first >= stop:
                continue
            lp = torch.log_softmax(logits[r, first - start : stop - start].float(), -1)
            targets = g.ids[r, first + 1 : stop + 1]
            seq.prompt_lps.extend(lp.gather(-1, targets[:, None]).squeeze(-1).tolist())
            if seq.prompt_tops is not None:
                top = torch.topk(lp, min(seq.params.logprobs, lp.shape[-1]), dim=-1)
                seq.prompt_tops.extend(zip(top.indices.tolist(), top.values.tolist(),
                                           strict=True))

    def _finish_prefill(self, g: _PrefillGroup, last_logits: torch.Tensor) -> None:
        self._group = None
        n = len(g.rows)
        tokens = [0] * n
        sample_rows = [i for i, s in enumerate(g.rows) if s.params.max_new_tokens > 0]
        if sample_rows:
            sampled = self._sample(last_logits, g.rows)
            for i in sample_rows:
                tokens[i] = sampled[i]
        now = time.perf_counter()
        keep = []
        for i, seq in enumerate(g.rows):
            seq.trace.first_token_step = self.stats.steps
            if seq.params.max_new_tokens == 0:  # score only (echo)
                seq.first_token_at = now
                self._finish(seq, "length")
                continue
            seq.first_token_at = now
            if not self._accept(seq, tokens[i], self._row_logprob(last_logits, i, seq,
                                                                   tokens[i])):
                keep.append(i)
        if not keep:
            return
        order = g.cache.keep_rows(keep, n) if len(keep) < n else keep
        rows = [g.rows[i] for i in order]
        mask = None if g.mask is None else g.mask.index_select(
            0, torch.tensor(order, device=self.device))
        positions = torch.tensor([[len(s.prompt_ids)] for s in rows], device=self.device)
        next_tokens = torch.tensor([[tokens[i]] for i in order], device=self.device)
        newcomers = _Batch(rows, g.cache, mask, g.length, positions, next_tokens)
        if mask is not None:
            newcomers._trim()
        if self._batch is None:
            self._batch = newcomers
        else:
            self._batch.merge(newcomers)

    def _decode_step(self) -> None:
        b = self._batch
        if b.mask is not None:
            ones = torch.ones(len(b.rows), 1, dtype=torch.bool, device=self.device)
            b.mask = torch.cat([b.mask, ones], 1)
        logits = self._forward(b.next_tokens, b.mask, b.positions, b.cache)[:, -1, :]
        b.length += 1
        b.positions = b.positions + 1
        self.stats.decode_steps += 1
        rows = b.rows
        if all(s.params.greedy for s in rows):
            next_tokens = logits.argmax(-1, keepdim=True)
            tokens = next_tokens.squeeze(-1).tolist()
        else:
            tokens = self._sample(logits, rows)
            next_tokens = torch.tensor(tokens, device=self.device).unsqueeze(-1)
        b.next_tokens = next_tokens
        keep = []
        for i, seq in enumerate(rows):
            lp = self._row_logprob(logits, i, seq, tokens[i]) if seq.logprobs is not None \
                else None
            if not self._accept(seq, tokens[i], lp):
                keep.append(i)
        if len(keep) < len(rows):
            self._shrink(b, keep)

    # ---- per-row token handling

    def _sample(self, logits: torch.Tensor, rows: list[Sequence]) -> list[int]:
        tokens = logits.argmax(-1).tolist()
        for i, seq in enumerate(rows):
            if not seq.params.greedy and seq.params.max_new_tokens > 0:
                tokens[i] = _sample_row(logits[i], seq.params, seq.generator)
        return tokens

    def _row_logprob(self, logits: torch.Tensor, i: int, seq: Sequence, token: int):
        if seq.logprobs is None:
            return None
        lp = torch.log_softmax(logits[i].float(), -1)
        value = float(lp[token])
        top: dict[str, float] = {}
        if seq.params.logprobs:
            t = torch.topk(lp, min(seq.params.logprobs, lp.shape[-1]))
            for tid, v in zip(t.indices.tolist(), t.values.tolist(), strict=True):
                top.setdefault(self.piece(tid), v)
        return value, top

    def _accept(self, seq: Sequence, token: int, lp) -> bool:
        """Add one generated token to `seq`; True when that finished it."""
        seq.out_ids.append(token)
        self.stats.generated_tokens += 1
        reason = None
        offset = len(seq.text)
        if token in self.eos_ids:
            reason = "stop"
        elif seq.text_tracker is not None:
            delta = seq.text_tracker.push(token)
            if delta:
                reason = self._append_text(seq, delta)
        if lp is not None:
            entry = TokenLogprob(self.piece(token), token, lp[0], lp[1], offset)
            seq.logprobs.append(entry)
            if seq.stream:
                seq.pending_lps.append(entry)
        if seq.stream:
            seq.pending_ids.append(token)
        if reason is None and len(seq.out_ids) >= seq.params.max_new_tokens:
            reason = "length"
        if reason is not None:
            self._finish(seq, reason)
            return True
        if seq.stream:
            self._emit(seq, final=False)
        return False

    def _append_text(self, seq: Sequence, delta: str) -> str | None:
        """Append decoded text; on a stop string cut the text before it and say "stop"."""
        stops = seq.params.stop
        start = len(seq.text)
        seq.text += delta
        if not stops:
            return None
        window = max(len(s) for s in stops) - 1
        hits = [i for s in stops if s and (i := seq.text.find(s, max(0, start - window))) >= 0]
        if hits:
            seq.text = seq.text[: min(hits)]
            return "stop"
        return None

    def _emit(self, seq: Sequence, final: bool) -> None:
        """Queue a StreamDelta for the new tokens, with the text that is safe to show:
        not half a character, not what may be the start of a stop string. A token whose
        text is held back still goes out (empty text, its id), so consumers see every
        token as it is produced and the texts still add up to the final text."""
        upto = len(seq.text)
        if not final and seq.params.stop:
            upto -= _holdback(seq.text, seq.params.stop)
        if upto > seq.emitted or seq.pending_ids or seq.pending_lps:
            delta = StreamDelta(seq.text[seq.emitted : upto], seq.pending_ids, seq.pending_lps)
            seq.emitted = max(seq.emitted, upto)
            seq.pending_ids, seq.pending_lps = [], []
            self._outbox.append((seq, delta))

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.text_tracker is not None:
            if reason != "stop" or seq.out_ids[-1:] and seq.out_ids[-1] in self.eos_ids:
                tail = seq.text_tracker.flush()
                if tail and self._append_text(seq, tail) == "stop":
                    reason = "stop"
        else:  # decoded once at the end; an EOS adds no text (as in the streamed path)
            ids = seq.out_ids
            seq.text = self._decode_text(ids[:-1] if ids and ids[-1] in self.eos_ids else ids)
        seq.finish_reason = reason
        if seq.stream:
            self._emit(seq, final=True)
        self._leave(seq, reason)
        self._outbox.append((seq, seq))

    def _leave(self, seq: Sequence, reason: str) -> None:
        """Bookkeeping when a sequence is no longer the loop's: counters, trace, room."""
        seq.done = True
        self._finished += 1
        if seq.finish_reason is None:
            seq.finish_reason = reason
        if reason == "abort":
            self.stats.cancelled += 1
        elif reason == "error":
            self.stats.failed += 1
        else:
            self.stats.completed += 1
        if seq.trace is not None:
            seq.trace.left_step = self.stats.steps
            seq.trace.finish_reason = reason
        with self._lock:
            self.stats.inflight -= 1

    def _fail_active(self, exc: BaseException) -> None:
        """A forward raised: fail the rows it ran on and start over with empty state."""
        rows = [s for h in (self._group, self._batch) if h is not None for s in h.rows]
        self._group = self._batch = None
        self._fail(rows, exc)

    def _fail(self, rows: list[Sequence], exc: BaseException) -> None:
        message = f"generation failed on model {self.name}: {exc}"
        for seq in rows:
            if not seq.done:
                self._leave(seq, "error")
                self._outbox.append((seq, LlmctlError(message)))

    def _shutdown(self) -> None:
        message = f"model {self.name} is shutting down"
        pending = list(self._waiting) + list(self._incoming)
        for holder in (self._group, self._batch):
            if holder is not None:
                pending.extend(holder.rows)
        for seq in pending:
            if not seq.done:
                self._leave(seq, "abort")
                self._outbox.append((seq, Unavailable(message)))
        self._waiting.clear()
        self._incoming.clear()
        self._group = self._batch = None
        self._update_gauges()
        self._flush()

    # ---- output

    def _flush(self) -> None:
        """Hand queued items to their event loops: one wake-up per loop per step."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for seq, item in self._outbox:
            if seq.loop is not None:
                by_loop.setdefault(seq.loop, []).append((seq.queue, item))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is closed: nobody is listening
                pass

    def _update_gauges(self) -> None:
        s = self.stats
        s.prefilling = len(self._group.rows) if self._group else 0
        batch = self._batch
        s.running = (len(batch.rows) if batch else 0) + s.prefilling
        s.kv_rows = len(batch.rows) if batch else 0
        s.kv_columns = batch.length if batch else 0

    def _remember(self, trace: RequestTrace) -> None:
        requests = self.stats.requests
        requests[trace.request_id] = trace
        while len(requests) > _TRACE_HISTORY:
            requests.popitem(last=False)

    # ---- text

    def _decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def piece(self, token_id: int) -> str:
        """The text of one token on its own (for logprob entries), memoised."""
        text = self._piece_cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._piece_cache[token_id] = text
        return text


def _deliver(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _forward_params(model) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return {"cache", "logits_to_keep"}


def prompt_logprobs(seq: Sequence, piece: Callable[[int], str],
                    decode: Callable[[list[int]], str]) -> list[TokenLogprob]:
    """The echo entries for a finished sequence: one per prompt token, the first with
    logprob None, offsets into the decoded prompt text."""
    ids = seq.prompt_ids
    tracker = TextTracker(decode, ())
    out: list[TokenLogprob] = []
    offset = 0
    tops = seq.prompt_tops
    for j, tid in enumerate(ids):
        lp = None if j == 0 else seq.prompt_lps[j - 1]
        top: dict[str, float] = {}
        if j and tops is not None:
            for t, v in zip(*tops[j - 1], strict=True):
                top.setdefault(piece(t), v)
        out.append(TokenLogprob(piece(tid), tid, lp, top, offset))
        offset += len(tracker.push(tid))
    return out
