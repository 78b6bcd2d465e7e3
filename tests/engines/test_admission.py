"""A request with several choices (prompts, `n`) is admitted as a whole or not at all,
and cancelled as a whole (issue 15, Done when 4)."""

from __future__ import annotations

import asyncio

import pytest

from server.engines.base import Completion, EngineRequest, ModelEngine, SamplingParams
from server.errors import InvalidRequest, Overloaded
from tests.engines.conftest import greedy, make_engine, request, wait_for


@pytest.fixture
async def small(engine_model_dir):
    """Room for 2 running and 1 waiting."""
    eng = make_engine(engine_model_dir, max_batch_size=2, max_queue=1, max_new_tokens=512)
    await eng.start()
    yield eng
    await eng.close()


def counts(eng) -> tuple[int, int]:
    return eng.stats.running, eng.stats.waiting


async def test_overloaded_multi_choice_request_queues_nothing(small):
    long = asyncio.create_task(small.generate(request("a long one", greedy(400))))
    await wait_for(lambda: small.stats.running == 1)
    before, submitted = counts(small), small.stats.submitted
    # Three parts do not fit beside the running one (room for two): none is queued.
    with pytest.raises(Overloaded):
        await small.generate_all([request(f"part {i}", greedy(400)) for i in range(3)])
    with pytest.raises(Overloaded):
        await small.stream_all([request(f"part {i}", greedy(400)) for i in range(3)])
    assert small.stats.submitted == submitted
    steps = small.stats.steps
    await wait_for(lambda: small.stats.steps >= steps + 1)
    assert counts(small) == before == (1, 0)
    # Two parts fit, and run together.
    both = await small.generate_all([request(f"fits {i}", greedy(3)) for i in range(2)])
    assert [c.completion_tokens for c in both] == [3, 3]
    long.cancel()
    await wait_for(lambda: small.stats.inflight == 0)


async def test_a_failing_part_queues_nothing(small):
    submitted = small.stats.submitted
    with pytest.raises(InvalidRequest):
        await small.generate_all([request("fine", greedy(3)),
                                  request([10**9], greedy(3))])  # a token id out of range
    assert small.stats.submitted == submitted


async def test_caller_gone_cancels_every_part(small):
    task = asyncio.create_task(small.generate_all(
        [request(f"part {i}", greedy(400)) for i in range(3)]))
    await wait_for(lambda: small.stats.inflight == 3)
    cancelled = small.stats.cancelled
    task.cancel()
    await wait_for(lambda: small.stats.inflight == 0)
    assert small.stats.cancelled == cancelled + 3


async def test_unstarted_streams_are_cancelled_when_closed(small):
    streams = await small.stream_all([request(f"part {i}", greedy(400)) for i in range(2)])
    await wait_for(lambda: small.stats.inflight == 2)
    for stream in streams:  # never iterated
        await stream.aclose()
    await wait_for(lambda: small.stats.inflight == 0)


class _OneFails(ModelEngine):
    """Engines without a queue of their own (remote): one part failing cancels the rest."""

    model_id = "fails"

    def __init__(self):
        self.cancelled = 0

    async def start(self):
        return None

    async def generate(self, req: EngineRequest) -> Completion:
        if req.prompt == "bad":
            await asyncio.sleep(0.01)
            raise Overloaded("remote busy")
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise AssertionError("not cancelled")

    def stream(self, req):
        raise NotImplementedError

    async def close(self):
        return None


async def test_default_generate_all_cancels_siblings_on_failure():
    eng = _OneFails()
    params = SamplingParams()
    with pytest.raises(Overloaded):
        await asyncio.wait_for(eng.generate_all(
            [EngineRequest(params, prompt=p) for p in ("ok", "bad", "ok")]), 10)
    assert eng.cancelled == 2
