"""Engine fixtures: one tiny test model per session, its HF reference, engine builders."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from server.config import ModelSpec, Settings
from server.engines.base import EngineRequest, SamplingParams
from server.engines.local import LocalEngine

WORDS = ("the question model token prompt hello world number article summary answer "
         "return which their about would").split()


@pytest.fixture(scope="session")
def engine_model_dir(tmp_path_factory) -> str:
    from server.testmodel import create_test_model

    return str(create_test_model(tmp_path_factory.mktemp("engine-model") / "tiny", "tiny"))


@pytest.fixture(scope="session")
def reference(engine_model_dir):
    """(model, tokenizer) loaded straight from transformers, to compare against."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(engine_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(engine_model_dir)


def make_engine(model_dir: str, *, prefill_group_tokens: int | None = None,
                prefill_chunk_tokens: int | None = None,
                idle_prefill_tokens: int | None = None, on_queue_time=None,
                **spec) -> LocalEngine:
    spec = ModelSpec(id="test/tiny", name=spec.pop("name", "tiny"), path=model_dir,
                     device="cpu", **spec)
    return LocalEngine(spec, Settings(model_device="cpu"),
                       prefill_group_tokens=prefill_group_tokens,
                       prefill_chunk_tokens=prefill_chunk_tokens,
                       idle_prefill_tokens=idle_prefill_tokens, on_queue_time=on_queue_time)


@pytest.fixture(scope="session")
async def engine(engine_model_dir):
    """A started engine shared by tests that do not need special limits."""
    eng = make_engine(engine_model_dir)
    await eng.start()
    yield eng
    await eng.close()


def prompts(count: int, seed: int = 0) -> list[str]:
    """Distinct prompts of clearly different lengths (1 to ~4*count words)."""
    out = []
    for i in range(count):
        n = 1 + (i * 7 + seed) % (4 * count)
        out.append(" ".join(WORDS[(i + j * 3 + seed) % len(WORDS)] for j in range(n)) + f" {i}")
    return out


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kw)


def request(prompt, params: SamplingParams, **kw) -> EngineRequest:
    return EngineRequest(params=params, prompt=prompt, **kw)


def hf_greedy(reference, prompt: str, n: int) -> list[int]:
    """What `model.generate(do_sample=False)` produces for one prompt on its own."""
    model, tok = reference
    ids = tok(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, do_sample=False, max_new_tokens=n)
    return out[0, ids["input_ids"].shape[1]:].tolist()


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.002):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(interval)
