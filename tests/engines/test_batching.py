"""Continuous batching: requests join and leave at step boundaries with their own params
and KV rows; cancellation and backpressure; incremental detokenization."""

from __future__ import annotations

import asyncio
import time

import pytest

from server.engines.base import Completion, SamplingParams
from server.engines.scheduler import TextTracker, _holdback
from server.errors import Overloaded
from tests.engines.conftest import greedy, hf_greedy, make_engine, prompts, request, wait_for


async def test_requests_join_a_running_batch_and_match_generate(engine, reference):
    """Staggered arrivals merge into a batch that is already decoding (left-padding,
    trimming) and still give exactly the one-by-one greedy tokens."""
    texts = prompts(8, seed=3)
    lengths = [30, 6, 25, 3, 18, 40, 9, 14]
    ids = [f"join-{i}" for i in range(8)]

    async def later(i):
        await asyncio.sleep(0.004 * i)
        return await engine.generate(request(texts[i], greedy(lengths[i]), request_id=ids[i]))

    outs = await asyncio.gather(*(later(i) for i in range(8)))
    for i, out in enumerate(outs):
        assert out.token_ids == hf_greedy(reference, texts[i], lengths[i])
    traces = [engine.stats.trace(r) for r in ids]
    joined = [b for b in traces for a in traces
              if a is not b and a.first_token_step < b.admitted_step < a.left_step]
    assert joined, "no request joined while another was decoding"


async def test_mixed_params_in_one_batch(engine):
    """Greedy, seeded sampling and a stop string share a batch without affecting one
    another; a seeded request repeats exactly alone and in a different batch."""
    p_greedy, p_sample, p_other = prompts(3, seed=5)
    sampled = SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    alone = await engine.generate(request(p_sample, sampled))
    again = await engine.generate(request(p_sample, sampled))
    assert alone.token_ids == again.token_ids
    free = await engine.generate(request(p_greedy, greedy(30)))
    stop = next(free.text[i : i + 2] for i in range(6, len(free.text) - 2)
                if free.text[i : i + 2].isascii() and free.text[i : i + 2].isprintable()
                and free.text.find(free.text[i : i + 2]) == i)

    batch = await asyncio.gather(
        engine.generate(request(p_greedy, greedy(30, stop=(stop,)))),
        engine.generate(request(p_greedy, greedy(30))),
        engine.generate(request(p_sample, sampled)),
        engine.generate(request(p_other, greedy(30))),
        engine.generate(request(p_other, SamplingParams(max_new_tokens=30, temperature=1.0,
                                                        seed=7))),
    )
    stopped, unstopped, seeded, other, _ = batch
    assert stopped.finish_reason == "stop" and stopped.text == free.text[: free.text.find(stop)]
    assert unstopped.token_ids == free.token_ids and unstopped.text == free.text
    assert seeded.token_ids == alone.token_ids
    assert other.token_ids == (await engine.generate(request(p_other, greedy(30)))).token_ids

    # a different batch around the seeded request: same tokens
    mates = [engine.generate(request(p, greedy(12))) for p in prompts(6, seed=9)]
    results = await asyncio.gather(engine.generate(request(p_sample, sampled)), *mates)
    assert results[0].token_ids == alone.token_ids


async def test_unseeded_sampling_varies(engine):
    params = SamplingParams(max_new_tokens=16, temperature=1.5)
    outs = await asyncio.gather(*(engine.generate(request("hello", params)) for _ in range(3)))
    assert len({tuple(o.token_ids) for o in outs}) > 1


async def test_short_request_is_not_held_back_by_a_long_one(engine):
    long_task = asyncio.create_task(engine.generate(request("hello", greedy(400),
                                                            request_id="long-1")))
    await wait_for(lambda: (engine.stats.trace("long-1") or None) is not None
                   and engine.stats.trace("long-1").first_token_step is not None)
    short = await engine.generate(request("world", greedy(5), request_id="short-1"))
    assert short.completion_tokens == 5 and not long_task.done()
    t = engine.stats.trace("short-1")
    assert t.left_step - t.admitted_step <= 6
    long_task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await long_task


async def test_chunked_prefill_does_not_stall_running_decodes(engine_model_dir, reference):
    """A long newcomer is prefilled a chunk per step while the running request keeps
    getting one token every step; both still equal generate's output."""
    eng = make_engine(engine_model_dir, prefill_chunk_tokens=16, idle_prefill_tokens=16)
    try:
        long_prompt = prompts(40)[39]  # ~150 tokens: about ten chunks of 16
        _, tok = reference
        n_long = len(tok(long_prompt)["input_ids"])
        assert n_long > 100
        running = asyncio.create_task(eng.generate(request("hello world", greedy(60),
                                                           request_id="a")))
        await wait_for(lambda: eng.stats.trace("a") and eng.stats.trace("a").first_token_step
                       is not None)
        newcomer = await eng.generate(request(long_prompt, greedy(5), request_id="b"))
        first = await running
        a, b = eng.stats.trace("a"), eng.stats.trace("b")
        assert b.first_token_step - b.admitted_step >= n_long // 16 - 1  # chunked
        assert a.first_token_step < b.admitted_step and a.left_step > b.first_token_step
        # a token for "a" in every step: its first came from its prefill, and that same
        # iteration already ran its first decode, so 60 tokens took 58 more iterations
        assert a.left_step - a.first_token_step == 60 - 2
        assert first.token_ids == hf_greedy(reference, "hello world", 60)
        assert newcomer.token_ids == hf_greedy(reference, long_prompt, 5)
    finally:
        await eng.close()


async def test_burst_newcomers_are_prefilled_together(engine_model_dir):
    eng = make_engine(engine_model_dir, prefill_group_tokens=4096)
    try:
        await eng.start()
        await asyncio.gather(*(eng.generate(request(p, greedy(4))) for p in prompts(16)))
        assert eng.stats.prefill_chunks <= 8
    finally:
        await eng.close()


# ---------------------------------------------------------------- cancellation


async def test_closed_stream_leaves_the_batch_within_one_step(engine):
    other = asyncio.create_task(engine.generate(request("hello", greedy(500),
                                                        request_id="stay")))
    stream = engine.stream(request("world", greedy(500), request_id="leave"))
    seen = 0
    async for item in stream:
        assert not isinstance(item, Completion)
        seen += 1
        if seen == 3:
            break
    await wait_for(lambda: engine.stats.kv_rows == 2)
    await stream.aclose()
    trace = engine.stats.trace("leave")
    assert trace.cancel_step is not None
    await wait_for(lambda: trace.left_step is not None)
    assert trace.left_step - trace.cancel_step <= 1
    assert trace.finish_reason == "abort"
    await wait_for(lambda: engine.stats.kv_rows == 1)  # its KV rows are gone
    assert not other.done() and engine.stats.running == 1
    other.cancel()
    with pytest.raises(asyncio.CancelledError):
        await other
    await wait_for(lambda: engine.stats.running == 0 and engine.stats.kv_tokens == 0)


async def test_cancelled_generate_task_leaves_the_batch(engine):
    cancelled_before = engine.stats.cancelled
    task = asyncio.create_task(engine.generate(request("hello", greedy(500),
                                                       request_id="task-cancel")))
    await wait_for(lambda: engine.stats.trace("task-cancel")
                   and engine.stats.trace("task-cancel").first_token_step is not None)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    trace = engine.stats.trace("task-cancel")
    await wait_for(lambda: trace.left_step is not None)
    assert trace.left_step - trace.cancel_step <= 1
    assert engine.stats.cancelled == cancelled_before + 1


# ---------------------------------------------------------------- backpressure


async def test_full_queue_raises_overloaded_at_once(engine_model_dir):
    eng = make_engine(engine_model_dir, max_batch_size=1, max_queue=1)
    try:
        first = asyncio.create_task(eng.generate(request("hello", greedy(500))))
        second = asyncio.create_task(eng.generate(request("world", greedy(500))))
        await wait_for(lambda: eng.stats.running == 1 and eng.queue_depth == 1)
        started = time.perf_counter()
        with pytest.raises(Overloaded) as err:
            await eng.generate(request("again", greedy(5)))
        assert time.perf_counter() - started < 0.5
        assert err.value.headers == {"Retry-After": "1"} and err.value.status_code == 429
        assert "overloaded" in err.value.message and eng.stats.rejected == 1
        with pytest.raises(Overloaded):  # streams refuse on the first step too
            await anext(eng.stream(request("again", greedy(5))))
        first.cancel()
        await wait_for(lambda: eng.stats.inflight == 1)
        assert (await eng.generate(request("room now", greedy(0), echo_logprobs=True)))
        second.cancel()
        await asyncio.gather(first, second, return_exceptions=True)
    finally:
        await eng.close()


# ---------------------------------------------------------------- text pieces


def test_incremental_detokenizer_keeps_multibyte_characters(reference):
    _, tok = reference
    text = "naïve café — 日本語 🙂 ok ünïcödé"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    tracker = TextTracker(lambda i: tok.decode(i, skip_special_tokens=True), [])
    pieces = [tracker.push(i) for i in ids] + [tracker.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_holdback_is_the_longest_stop_prefix():
    assert _holdback("abc</", ("</s>",)) == 2
    assert _holdback("abc<", ("</s>", "<|end|>")) == 1
    assert _holdback("abc", ("</s>",)) == 0
    assert _holdback("ab", ("xyz", "bq")) == 1
