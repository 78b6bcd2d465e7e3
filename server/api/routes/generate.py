"""POST /v1/generate: llmctl's own API (the original design)."""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.api import sse
from server.api.bodies import documented
from server.api.deps import key_and_body
from server.api.disconnect import unless_disconnected
from server.api.protocol import GenerateRequest
from server.api.serving import CachePolicy
from server.engines.base import Completion, SamplingParams

router = APIRouter()


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


@router.post("/v1/generate", openapi_extra=documented(GenerateRequest))
async def generate(request: Request):
    # Key and body through deps.key_and_body, not parameters: see routes/openai.py.
    state, key, body = await key_and_body(request, GenerateRequest)
    record = request.state.record
    policy = CachePolicy.from_headers(request.headers, state.settings.cache_enabled and body.cache)
    params = SamplingParams(
        max_new_tokens=body.max_new_tokens, temperature=body.temperature, top_p=body.top_p,
        top_k=max(0, body.top_k), seed=body.seed, stop=body.stops)
    gateway = state.gateway
    call = await gateway.prepare(key, record, api="generate", model=body.model, params=params,
                                 prompts=[body.prompt], max_tokens_field="max_new_tokens",
                                 policy=policy)
    request_id = request.state.request_id
    if not body.stream:
        outcome = await gateway.run(key, record, call,
                                       guard=partial(unless_disconnected, request))
        choice = outcome.choices[0]
        content = {
            "id": outcome.id, "object": "generation", "created": outcome.created,
            "model": call.model_name, "text": choice.text, "finish_reason": choice.finish_reason,
            "usage": _usage(*gateway.usage(call, outcome)), "request_id": request_id,
        }
        return JSONResponse(content, headers={**outcome.headers,
                                              "x-llmctl-cache": outcome.cache_status})

    headers, cache_status, events = await gateway.stream(key, record, call)

    async def body_events():
        async for _, item in events:
            if isinstance(item, Completion):
                prompt = call.prompt_tokens or item.prompt_tokens
                yield sse.event({"id": call.id, "object": "generation", "model": call.model_name,
                                 "text": "", "done": True, "finish_reason": item.finish_reason,
                                 "usage": _usage(prompt, item.completion_tokens),
                                 "request_id": request_id})
            elif item.text:
                yield sse.event({"id": call.id, "object": "generation.delta", "text": item.text})

    return sse.response(body_events(), {**headers, "x-llmctl-cache": cache_status})
