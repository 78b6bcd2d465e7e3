"""LocalEngine: results equal transformers', text/stream/stop/logprob contracts, inputs,
lifecycle."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from server.engines.base import Completion, EngineRequest, SamplingParams, StreamDelta
from server.errors import InvalidRequest
from tests.engines.conftest import (
    greedy,
    hf_greedy,
    make_engine,
    prompts,
    request,
)


def forward_logprobs(reference, ids: list[int]) -> torch.Tensor:
    model, _ = reference
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)


# ---------------------------------------------------------------- greedy == generate


async def test_concurrent_greedy_equals_sequential_generate(engine, reference):
    """16 prompts of different lengths and max_new_tokens, submitted at once, give
    exactly what one-by-one `generate(do_sample=False)` gives."""
    _, tok = reference
    texts = prompts(16)
    lengths = [4 + 3 * i for i in range(16)]
    outs = await asyncio.gather(*(engine.generate(request(p, greedy(n)))
                                  for p, n in zip(texts, lengths, strict=True)))
    for p, n, out in zip(texts, lengths, outs, strict=True):
        expected = hf_greedy(reference, p, n)
        assert out.token_ids == expected, p
        assert out.completion_tokens == len(expected)
        assert out.prompt_tokens == len(tok(p)["input_ids"])
        assert out.finish_reason == ("length" if len(expected) == n else "stop")
        assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)
        assert out.prompt_text == p and out.ttft_s is not None and out.ttft_s >= 0
    assert engine.stats.kv_rows == 0 and engine.stats.running == 0


async def test_token_id_prompt_equals_text_prompt(engine, reference):
    _, tok = reference
    text = prompts(3)[2]
    by_text = await engine.generate(request(text, greedy(12)))
    by_ids = await engine.generate(request(tok(text)["input_ids"], greedy(12)))
    assert by_ids.token_ids == by_text.token_ids and by_ids.text == by_text.text


# ---------------------------------------------------------------- streaming and text


async def test_stream_deltas_add_up_to_the_final_text(engine, reference):
    _, tok = reference
    pieces: list[StreamDelta] = []
    final = None
    async for item in engine.stream(request(prompts(4)[3], greedy(40))):
        if isinstance(item, Completion):
            final = item
        else:
            assert final is None and len(item.token_ids) == 1  # one delta per token
            pieces.append(item)
    assert final is not None and final.finish_reason in ("length", "stop")
    assert "".join(p.text for p in pieces) == final.text
    assert [t for p in pieces for t in p.token_ids] == final.token_ids
    assert final.text == tok.decode(final.token_ids, skip_special_tokens=True)


async def test_multibyte_prompt_and_sampled_output_stream_cleanly(engine, reference):
    """Sampled output from a random model is full of partial UTF-8 byte tokens; the
    streamed text must still add up to the final text."""
    params = SamplingParams(max_new_tokens=60, temperature=1.5, seed=11)
    text = ""
    async for item in engine.stream(request("naïve café — 日本語 🙂", params)):
        if isinstance(item, Completion):
            assert text == item.text
        else:
            text += item.text


async def test_stop_string_truncates_and_says_stop(engine):
    full = await engine.generate(request(prompts(5)[4], greedy(40)))
    stop = _pick_stop(full.text)
    cut = full.text.index(stop)
    out = await engine.generate(request(prompts(5)[4], greedy(40, stop=(stop,))))
    assert out.finish_reason == "stop" and out.text == full.text[:cut]
    assert out.token_ids == full.token_ids[: out.completion_tokens]

    streamed = ""
    async for item in engine.stream(request(prompts(5)[4], greedy(40, stop=("zzqq", stop)))):
        if isinstance(item, Completion):
            assert item.text == streamed == full.text[:cut] and item.finish_reason == "stop"
        else:
            streamed += item.text
            assert stop not in streamed


def _pick_stop(text: str) -> str:
    """Three printable ASCII characters from the middle of `text`, first seen there."""
    for i in range(4, len(text) - 3):
        cand = text[i : i + 3]
        if cand.isascii() and cand.isprintable() and text.find(cand) == i:
            return cand
    raise AssertionError(f"no usable stop string in {text!r}")


async def test_eos_stops_with_reason_stop(engine_model_dir, reference):
    eng = make_engine(engine_model_dir)
    try:
        base = await eng.generate(request(prompts(2)[1], greedy(20)))
        k = next(i for i, t in enumerate(base.token_ids) if base.token_ids.index(t) == i and i >= 3)
        eos = base.token_ids[k]
        eng._scheduler.eos_ids = {eos}  # pretend that token is the model's EOS
        out = await eng.generate(request(prompts(2)[1], greedy(20)))
        assert out.finish_reason == "stop" and out.token_ids == base.token_ids[: k + 1]
        assert out.completion_tokens == k + 1
        _, tok = reference
        assert out.text == tok.decode(base.token_ids[:k], skip_special_tokens=True)
    finally:
        await eng.close()


async def test_max_new_tokens_zero_without_echo(engine):
    out = await engine.generate(request("hello", greedy(0)))
    assert out.text == "" and out.completion_tokens == 0 and out.finish_reason == "length"
    assert out.prompt_tokens == engine.count_tokens("hello")


# ---------------------------------------------------------------- logprobs


async def test_echo_logprobs_equal_a_forward_pass(engine, reference):
    """lm-eval loglikelihood: prompt logprobs of several prompts, batched and padded
    together, equal an unbatched forward pass; the continuation sum within 1e-4."""
    _, tok = reference
    texts = [p + " answer" for p in prompts(6)]
    outs = await asyncio.gather(*(
        engine.generate(request(t, SamplingParams(max_new_tokens=i % 2, temperature=0,
                                                  logprobs=1), echo_logprobs=True))
        for i, t in enumerate(texts)))
    for text, out in zip(texts, outs, strict=True):
        ids = tok(text)["input_ids"]
        ref = forward_logprobs(reference, ids)
        lps = out.prompt_logprobs
        assert [e.token_id for e in lps] == ids and lps[0].logprob is None and lps[0].top == {}
        for j in range(1, len(ids)):
            assert lps[j].logprob == pytest.approx(ref[j - 1, ids[j]].item(), abs=1e-4)
            best = int(ref[j - 1].argmax())
            assert list(lps[j].top.values()) == pytest.approx([ref[j - 1, best].item()],
                                                              abs=1e-4)
        ctx = len(tok(text.rsplit(" ", 1)[0])["input_ids"])
        got = sum(e.logprob for e in lps[ctx:])
        assert got == pytest.approx(sum(ref[j - 1, ids[j]].item()
                                        for j in range(ctx, len(ids))), abs=1e-4)
        assert out.prompt_text == text
        assert [e.offset for e in lps] == [len(tok.decode(ids[:j])) for j in range(len(ids))]


async def test_echo_logprobs_with_chunked_prefill(engine_model_dir, reference):
    _, tok = reference
    eng = make_engine(engine_model_dir, prefill_group_tokens=4096, prefill_chunk_tokens=8,
                      idle_prefill_tokens=8)
    try:
        texts = [prompts(8)[7], prompts(8)[2]]  # long enough for several chunks
        outs = await asyncio.gather(*(eng.generate(request(
            tok(t)["input_ids"], greedy(0), echo_logprobs=True)) for t in texts))
        for text, out in zip(texts, outs, strict=True):
            ids = tok(text)["input_ids"]
            ref = forward_logprobs(reference, ids)
            assert [e.logprob for e in out.prompt_logprobs[1:]] == pytest.approx(
                [ref[j - 1, ids[j]].item() for j in range(1, len(ids))], abs=1e-4)
            assert out.prompt_text == tok.decode(ids) and out.completion_tokens == 0
        assert eng.stats.prefill_chunks >= 4
    finally:
        await eng.close()


async def test_generated_token_logprobs(engine, reference):
    _, tok = reference
    text = prompts(3)[1]
    out = await engine.generate(request(text, greedy(10, logprobs=3)))
    assert len(out.logprobs) == out.completion_tokens
    ids = tok(text)["input_ids"] + out.token_ids
    ref = forward_logprobs(reference, ids)
    n = len(ids) - out.completion_tokens
    offset = 0
    for i, entry in enumerate(out.logprobs):
        assert entry.token_id == out.token_ids[i]
        assert entry.logprob == pytest.approx(ref[n + i - 1, entry.token_id].item(), abs=1e-4)
        assert len(entry.top) <= 3 and max(entry.top.values()) == pytest.approx(entry.logprob)
        assert entry.offset >= offset
        offset = entry.offset


# ---------------------------------------------------------------- inputs


async def test_chat_messages_use_the_template(engine, reference):
    _, tok = reference
    messages = [{"role": "user", "content": "hello world"}]
    rendered = engine.render_chat(messages)
    assert rendered == "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    out = await engine.generate(EngineRequest(params=greedy(8), messages=messages))
    assert out.prompt_text == rendered
    assert out.prompt_tokens == engine.count_tokens(rendered, add_special_tokens=False)
    assert out.prompt_tokens == len(tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    direct = await engine.generate(request(tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False), greedy(8)))
    assert out.token_ids == direct.token_ids


async def test_count_tokens_uses_the_tokenizer(engine, reference):
    _, tok = reference
    assert engine.count_tokens("hello world number") == len(tok("hello world number")["input_ids"])


async def test_context_limits_name_the_field(engine_model_dir):
    eng = make_engine(engine_model_dir, max_context=32, max_new_tokens=64)
    try:
        long_prompt = " ".join(["hello world"] * 40)
        with pytest.raises(InvalidRequest) as err:
            await eng.generate(request(long_prompt, greedy(1)))
        assert err.value.param == "prompt" and "32" in err.value.message
        with pytest.raises(InvalidRequest) as err:
            await eng.generate(request("hello world", greedy(40)))
        assert err.value.param == "max_tokens"
        with pytest.raises(InvalidRequest) as err:
            await eng.generate(EngineRequest(params=greedy(2), messages=[
                {"role": "user", "content": long_prompt}]))
        assert err.value.param == "messages"
        assert eng.max_context == 32
    finally:
        await eng.close()


@pytest.mark.parametrize(("req", "param"), [
    (EngineRequest(params=greedy(2)), "prompt"),
    (EngineRequest(params=greedy(2), prompt="a", messages=[{"role": "user", "content": "a"}]),
     "prompt"),
    (EngineRequest(params=greedy(2), prompt=[1, 10**9]), "prompt"),
    (EngineRequest(params=greedy(2), prompt=""), "prompt"),
    (EngineRequest(params=greedy(10**6), prompt="a"), "max_tokens"),
    (EngineRequest(params=SamplingParams(top_p=0.0), prompt="a"), "top_p"),
    (EngineRequest(params=SamplingParams(temperature=-1.0), prompt="a"), "temperature"),
    (EngineRequest(params=SamplingParams(logprobs=99), prompt="a"), "logprobs"),
    (EngineRequest(params=SamplingParams(stop=("",)), prompt="a"), "stop"),
])
async def test_bad_requests_are_invalid(engine, req, param):
    with pytest.raises(InvalidRequest) as err:
        await engine.generate(req)
    assert err.value.param == param


# ---------------------------------------------------------------- lifecycle


async def test_start_is_lazy_once_and_close_frees(engine_model_dir):
    seen: list[float] = []
    eng = make_engine(engine_model_dir, name="lifecycle", on_queue_time=seen.append)
    assert not eng.ready and (await eng.health()) == (False, "not loaded")

    def threads():
        return [t for t in threading.enumerate() if t.name == "llmctl-engine-lifecycle"]

    await asyncio.gather(eng.start(), eng.start(), eng.start())
    assert eng.ready and len(threads()) == 1 and (await eng.health())[0]
    model = eng.model
    await eng.start()
    assert eng.model is model
    out = await eng.generate(request("hello", greedy(3)))
    assert out.completion_tokens == 3 and len(seen) == 1 and seen[0] >= 0
    await eng.close()
    assert not eng.ready and eng.model is None and threads() == []
    assert (await eng.health()) == (False, "not loaded")
    assert eng.stats["completed"] == 1  # the last counters stay readable


async def test_first_request_loads_the_model(engine_model_dir):
    eng = make_engine(engine_model_dir)
    try:
        out = await eng.generate(request("hello", greedy(2)))
        assert eng.ready and out.completion_tokens == 2
    finally:
        await eng.close()


async def test_stats_are_a_mapping(engine):
    stats = dict(engine.stats)
    for key in ("running", "waiting", "steps", "completed", "cancelled"):
        assert isinstance(stats[key], int)
    assert engine.queue_depth == stats["waiting"] and engine.batch_size == stats["running"]


async def test_close_fails_requests_in_flight(engine_model_dir):
    from server.errors import Unavailable

    eng = make_engine(engine_model_dir)
    await eng.start()
    task = asyncio.create_task(eng.generate(request("hello", greedy(500))))
    while eng.stats.running == 0:
        await asyncio.sleep(0.002)
    await eng.close()
    with pytest.raises(Unavailable):
        await task


async def test_a_failed_step_fails_its_rows_and_the_engine_goes_on(engine_model_dir):
    eng = make_engine(engine_model_dir)
    try:
        await eng.start()
        scheduler = eng._scheduler
        real = scheduler._forward
        calls = {"n": 0}

        def flaky(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("out of memory (simulated)")
            return real(*args, **kwargs)

        scheduler._forward = flaky
        with pytest.raises(Exception, match="simulated"):
            await eng.generate(request("hello", greedy(20)))
        out = await eng.generate(request("hello", greedy(5)))
        assert out.completion_tokens == 5 and eng.stats["failed"] == 1
        assert (await eng.health())[0] and eng.stats.running == 0
    finally:
        await eng.close()


async def test_close_releases_the_model(engine_model_dir):
    import gc
    import weakref

    eng = make_engine(engine_model_dir)
    await eng.start()
    await eng.generate(request("hello", greedy(3)))
    ref = weakref.ref(eng.model)
    await eng.close()
    gc.collect()
    assert ref() is None
