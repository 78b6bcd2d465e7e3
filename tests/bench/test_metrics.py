"""The load generator's metric definitions, prompts and arrivals (no server)."""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest

from llmctl.benchmarking.serve import (
    RequestResult,
    arrival_offsets,
    base_url,
    calculate_metrics,
    make_prompts,
    send_request,
)
from llmctl.benchmarking.stats import summarize_ms
from server.errors import InvalidRequest


def _result(ttft, itl, output_tokens, start=0.0, usage=True):
    return RequestResult(success=True, status=200, start_time=start, ttft=ttft, itl=list(itl),
                         latency=ttft + sum(itl), output_tokens=output_tokens,
                         prompt_tokens=10, chunks=len(itl) + 1, usage_reported=usage)


def test_metrics_follow_vllm_definitions():
    a = _result(0.1, [0.02, 0.02, 0.04], 4, start=0.0)
    b = _result(0.3, [0.01], 2, start=0.05)
    c = _result(0.2, [], 1, start=0.1)  # one token: no TPOT sample, as in vLLM
    failed = RequestResult(success=False, status=500, error="HTTP 500: boom")
    m = calculate_metrics([a, b, c, failed], duration=2.0, prompt_len=99)

    assert (m["completed"], m["failed"]) == (3, 1)
    assert m["total_input_tokens"] == 30  # the server's prompt_tokens, successes only
    assert m["total_output_tokens"] == 7
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(3.5)
    assert m["total_token_throughput"] == pytest.approx(18.5)
    # TPOT excludes the first token: (e2e - ttft) / (n - 1)
    tpots = [0.08 / 3, 0.01 / 1]
    assert m["mean_tpot_ms"] == pytest.approx(np.mean(tpots) * 1000)
    # ITL pools every gap of every request
    assert m["median_itl_ms"] == pytest.approx(20.0)
    assert m["p99_itl_ms"] == pytest.approx(np.percentile([20, 20, 40, 10], 99))
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["median_e2el_ms"] == pytest.approx(200.0)  # e2e: 0.18, 0.31, 0.2
    assert m["max_concurrent_requests"] == 3
    assert m["errors"] == [{"message": "HTTP 500: boom", "count": 1}]


def test_all_failed_gives_zeros_not_errors():
    m = calculate_metrics([RequestResult(error="x")], duration=1.0, prompt_len=5)
    assert m["completed"] == 0 and m["mean_ttft_ms"] == 0.0 and m["output_throughput"] == 0


def test_summarize_uses_numpy_percentiles():
    s = summarize_ms("x", [0.001, 0.002, 0.003, 0.010])
    assert s["median_x_ms"] == pytest.approx(2.5)
    assert s["p99_x_ms"] == pytest.approx(np.percentile([1, 2, 3, 10], 99))
    assert set(s) == {"mean_x_ms", "median_x_ms", "std_x_ms", "p90_x_ms", "p99_x_ms"}


def test_prompts_are_deterministic_and_distinct():
    a = make_prompts(8, 50, seed=1, salt="level0")
    assert a == make_prompts(8, 50, seed=1, salt="level0")
    assert len(set(a)) == 8 and all(len(p.split()) == 50 for p in a)
    assert not set(a) & set(make_prompts(8, 50, seed=1, salt="level1"))
    assert a != make_prompts(8, 50, seed=2, salt="level0")


def test_poisson_arrivals_are_seeded_and_span_n_over_rate():
    offsets = arrival_offsets(20, 4.0, seed=3)
    assert offsets == arrival_offsets(20, 4.0, seed=3)
    assert offsets[-1] == pytest.approx(5.0)
    assert all(x < y for x, y in zip(offsets, offsets[1:], strict=False))
    assert arrival_offsets(3, math.inf, seed=0) == [0.0, 0.0, 0.0]


def test_base_url_accepts_v1_suffix_and_rejects_non_http():
    assert base_url("http://h:1/v1/") == "http://h:1"
    assert base_url("http://h:1") == "http://h:1"
    with pytest.raises(InvalidRequest):
        base_url("h:1")


def _sse(*events: str) -> bytes:
    return "".join(f"{e}\n\n" for e in events).encode()


async def _send(body: bytes, status: int = 200) -> RequestResult:
    transport = httpx.MockTransport(lambda request: httpx.Response(
        status, content=body, headers={"content-type": "text/event-stream"}))
    async with httpx.AsyncClient(transport=transport) as client:
        return await send_request(client, "http://x/v1/completions", {}, {"prompt": "p"})


async def test_stream_parsing_uses_usage_and_skips_empty_finish_chunk():
    body = _sse('data: {"choices":[{"index":0,"text":"a","finish_reason":null}]}',
                ": ping",
                'data: {"choices":[{"index":0,"text":"b","finish_reason":null}]}',
                'data: {"choices":[{"index":0,"text":"","finish_reason":"length"}],'
                '"usage":{"prompt_tokens":7,"completion_tokens":3}}',
                "data: [DONE]")
    r = await _send(body)
    assert r.success and r.text == "ab" and r.chunks == 2 and len(r.itl) == 1
    assert (r.output_tokens, r.prompt_tokens, r.usage_reported) == (3, 7, True)
    assert r.latency >= r.ttft > 0


async def test_stream_without_usage_counts_chunks():
    body = _sse(*['data: {"choices":[{"text":"x","finish_reason":null}]}'] * 4, "data: [DONE]")
    r = await _send(body)
    assert r.success and r.output_tokens == 4 and not r.usage_reported and len(r.itl) == 3


async def test_error_status_keeps_the_envelope_message():
    r = await _send(b'{"error":{"message":"slow down","code":"overloaded"}}', status=429)
    assert not r.success and r.status == 429 and r.error == "HTTP 429: slow down"


async def test_empty_stream_is_a_failure():
    r = await _send(_sse("data: [DONE]"))
    assert not r.success and "without a single token" in r.error


def test_prompts_with_a_tokenizer_have_exact_token_counts(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = make_prompts(5, 37, seed=0, salt="x", tokenizer=tokenizer)
    assert len(set(prompts)) == 5
    for prompt in prompts:
        assert len(tokenizer.encode(prompt, add_special_tokens=False)) == 37
