"""The OpenAI API: POST /v1/completions and POST /v1/chat/completions.

Wire formats follow https://platform.openai.com/docs/api-reference; `echo` with
`logprobs` returns prompt-token logprobs the way vLLM does (the first is null),
which is what lm-evaluation-harness's `local-completions` model reads.
"""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.api import sse
from server.api.bodies import documented
from server.api.deps import key_and_body
from server.api.disconnect import unless_disconnected
from server.api.protocol import ChatCompletionRequest, CompletionRequest
from server.api.serving import CachePolicy, Call, count_usage
from server.engines.base import Completion, SamplingParams, TokenLogprob
from server.errors import InvalidRequest

router = APIRouter()

# The routes take the Request only and read key and body through deps.key_and_body:
# the cache-hit path, where FastAPI's dependency solving was a quarter of the cost.


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _params(body, max_new_tokens: int, logprobs: int | None) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=body.temperature,
                          top_p=body.top_p, top_k=max(0, body.top_k), seed=body.seed,
                          stop=body.stops, logprobs=logprobs)


def completion_logprobs(tokens: list[TokenLogprob], first_is_prompt: bool) -> dict:
    """The legacy completions `logprobs` object: parallel lists over tokens."""
    offsets, position = [], 0
    for t in tokens:
        offsets.append(position)
        position += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [None if (i == 0 and first_is_prompt) else dict(t.top)
                         for i, t in enumerate(tokens)],
        "text_offset": offsets,
    }


def chat_logprobs(tokens: list[TokenLogprob]) -> dict:
    def entry(token: str, logprob: float | None) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [
        {**entry(t.token, t.logprob),
         "top_logprobs": [entry(tok, lp) for tok, lp in t.top.items()]} for t in tokens]}


def _headers(outcome_headers: dict, cache_status: str) -> dict:
    return {**outcome_headers, "x-llmctl-cache": cache_status}


# --- /v1/completions


@router.post("/v1/completions", openapi_extra=documented(CompletionRequest))
async def completions(request: Request):
    state, key, body = await key_and_body(request, CompletionRequest)
    record = request.state.record
    max_tokens = body.max_tokens if body.max_tokens is not None else 16
    if max_tokens == 0 and not body.echo:
        raise InvalidRequest("max_tokens: must be at least 1 (0 only with echo)",
                             param="max_tokens")
    if body.stream and body.echo:
        raise InvalidRequest("echo: not supported together with stream", param="echo")
    gateway = state.gateway
    call = await gateway.prepare(
        key, record, api="completions", model=body.model,
        params=_params(body, max_tokens, body.logprobs), prompts=body.prompts(), n=body.n,
        echo_logprobs=body.echo, policy=CachePolicy.from_headers(
            request.headers, state.settings.cache_enabled))
    if not body.stream:
        outcome = await gateway.run(key, record, call,
                                       guard=partial(unless_disconnected, request))
        choices = []
        for index, c in enumerate(outcome.choices):
            text = (c.prompt_text or "") + c.text if body.echo else c.text
            logprobs = None
            if body.logprobs is not None:
                tokens = ((c.prompt_logprobs or []) if body.echo else []) + (c.logprobs or [])
                logprobs = completion_logprobs(tokens, first_is_prompt=body.echo)
            choices.append({"index": index, "text": text, "logprobs": logprobs,
                            "finish_reason": c.finish_reason})
        content = {"id": outcome.id, "object": "text_completion", "created": outcome.created,
                   "model": call.model_name, "choices": choices,
                   "usage": _usage(*gateway.usage(call, outcome))}
        return JSONResponse(content, headers=_headers(outcome.headers, outcome.cache_status))

    headers, cache_status, events = await gateway.stream(key, record, call)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return sse.response(_completion_chunks(call, events, body, include_usage),
                        _headers(headers, cache_status))


def _chunker(call: Call, object_name: str, include_usage: bool):
    """One SSE chunk of `object_name`; with include_usage every chunk has `usage`
    (null until the last, OpenAI's framing)."""
    def chunk(choices: list, usage: dict | None = None) -> str:
        data = {"id": call.id, "object": object_name, "created": call.created,
                "model": call.model_name, "choices": choices}
        if include_usage:
            data["usage"] = usage
        return sse.event(data)

    return chunk


def _usage_chunk(chunk, call: Call, finals: dict[int, Completion]) -> str:
    return chunk([], _usage(*count_usage(call, [finals[i] for i in sorted(finals)])))


async def _completion_chunks(call: Call, events, body: CompletionRequest, include_usage: bool):
    chunk = _chunker(call, "text_completion", include_usage)
    finals: dict[int, Completion] = {}
    async for index, item in events:
        if isinstance(item, Completion):
            finals[index] = item
            yield chunk([{"index": index, "text": "", "logprobs": None,
                          "finish_reason": item.finish_reason}])
        elif item.text:
            logprobs = (completion_logprobs(item.logprobs, False)
                        if body.logprobs is not None and item.logprobs else None)
            yield chunk([{"index": index, "text": item.text, "logprobs": logprobs,
                          "finish_reason": None}])
    if include_usage:
        yield _usage_chunk(chunk, call, finals)
    yield "data: [DONE]\n\n"


# --- /v1/chat/completions


@router.post("/v1/chat/completions", openapi_extra=documented(ChatCompletionRequest))
async def chat_completions(request: Request):
    state, key, body = await key_and_body(request, ChatCompletionRequest)
    record = request.state.record
    gateway = state.gateway
    spec = gateway.manager.spec(body.model)
    asked = body.max_completion_tokens or body.max_tokens
    field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    extra, messages, policy = _forwarded(body, spec, request, state.settings.cache_enabled)
    call = await gateway.prepare(
        key, record, api="chat", model=body.model,
        params=_params(body, asked or spec.max_new_tokens, logprobs),
        messages=messages, n=body.n, max_tokens_field=field,
        prompt_field="messages", fit_context=asked is None, policy=policy, extra=extra)
    if not body.stream:
        outcome = await gateway.run(key, record, call,
                                       guard=partial(unless_disconnected, request))
        choices = [{
            "index": index,
            "message": _message(c),
            "logprobs": chat_logprobs(c.logprobs or []) if body.logprobs else None,
            "finish_reason": c.finish_reason,
        } for index, c in enumerate(outcome.choices)]
        content = {"id": outcome.id, "object": "chat.completion", "created": outcome.created,
                   "model": call.model_name, "choices": choices,
                   "usage": _usage(*gateway.usage(call, outcome))}
        return JSONResponse(content, headers=_headers(outcome.headers, outcome.cache_status))

    headers, cache_status, events = await gateway.stream(key, record, call)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return sse.response(_chat_chunks(call, events, body, include_usage),
                        _headers(headers, cache_status))


def _forwarded(body: ChatCompletionRequest, spec, request: Request, cache_enabled: bool):
    """(extra, messages, cache policy). A remote gets tools, tool_choice,
    response_format and non-text content parts unchanged; a local engine cannot honour
    them, so they are a 400 naming the field rather than silently ignored. Such
    requests bypass the cache: a tool call's answer is the client's to reuse."""
    policy = CachePolicy.from_headers(request.headers, cache_enabled)
    if spec.type != "remote":
        if (name := body.first_unsupported_by_local()) is not None:
            raise InvalidRequest(f"{name}: not supported by local model {spec.name!r} (only "
                                 "remote OpenAI-compatible models take it)", param=name)
        return None, body.plain_messages(), policy
    extra = body.passthrough() or None
    messages = body.raw_messages()
    if extra or messages != body.plain_messages():
        policy = CachePolicy(lookup=False, store=False)
    return extra, messages, policy


def _message(c: Completion) -> dict:
    if c.tool_calls:  # OpenAI: content is null when the model only calls tools
        return {"role": "assistant", "content": c.text or None, "tool_calls": c.tool_calls}
    return {"role": "assistant", "content": c.text}


async def _chat_chunks(call: Call, events, body: ChatCompletionRequest, include_usage: bool):
    chunk = _chunker(call, "chat.completion.chunk", include_usage)
    for index in range(body.n):
        yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None}])
    finals: dict[int, Completion] = {}
    async for index, item in events:
        if isinstance(item, Completion):
            finals[index] = item
            yield chunk([{"index": index, "delta": {}, "logprobs": None,
                          "finish_reason": item.finish_reason}])
        elif item.tool_calls:
            yield chunk([{"index": index, "delta": {"tool_calls": item.tool_calls},
                          "logprobs": None, "finish_reason": None}])
        elif item.text:
            logprobs = chat_logprobs(item.logprobs) if body.logprobs and item.logprobs else None
            yield chunk([{"index": index, "delta": {"content": item.text}, "logprobs": logprobs,
                          "finish_reason": None}])
    if include_usage:
        yield _usage_chunk(chunk, call, finals)
    yield "data: [DONE]\n\n"
