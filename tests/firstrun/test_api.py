"""OpenAI compatibility a new user expected (issue 13), HTTP against the app: fields
llmctl does not interpret go unchanged to remote models and are a 400 naming the
field on local ones; a client's X-Request-ID is kept and logged."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from server.api.app import create_app
from server.config import ModelsConfig, ModelSpec, Settings
from server.engines.manager import default_engine_factory
from server.engines.remote import HttpLLMClient
from server.services import keys, logquery

TOOLS = [{"type": "function", "function": {
    "name": "weather", "parameters": {"type": "object",
                                      "properties": {"city": {"type": "string"}}}}}]
CALL = [{"id": "call_1", "type": "function",
         "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}]
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


class Upstream:
    """An OpenAI-compatible remote that records what it was sent and calls a tool."""

    def __init__(self):
        self.bodies: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        if body.get("stream"):
            chunks = [{"choices": [{"index": 0, "delta": {"tool_calls": CALL}}]},
                      {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
                      {"choices": [], "usage": usage}]
            text = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
            return httpx.Response(200, text=text,
                                  headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json={
            "id": "x", "object": "chat.completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": None, "tool_calls": CALL}}],
            "usage": usage})


@pytest.fixture
async def gw(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("LLMCTL_HOME", str(tmp_path / "home"))
    upstream = Upstream()

    def factory(spec, settings):
        if spec.type == "remote":
            return HttpLLMClient(spec, transport=httpx.MockTransport(upstream))
        return default_engine_factory(spec, settings)

    models = ModelsConfig(default_model="tiny", models=[
        ModelSpec(id="test/tiny", name="tiny", path=tiny_model_dir, device="cpu",
                  max_context=512),
        ModelSpec(id="org/big", name="big", type="remote", base_url="http://gpu:8000")])
    app = create_app(Settings(_env_file=None), models, engine_factory=factory)
    async with app.router.lifespan_context(app):
        secret = keys.create_key(app.state.llmctl.db, name="me").secret
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw")
        client = openai.AsyncOpenAI(base_url="http://gw/v1", api_key=secret, http_client=http,
                                    max_retries=0)
        yield app, client, upstream
        await http.aclose()


async def test_tools_and_images_are_forwarded_unchanged_to_a_remote(gw):
    _, client, upstream = gw
    messages = [{"role": "user", "content": [{"type": "text", "text": "Weather here?"}, IMAGE]}]
    fmt = {"type": "json_object"}
    reply = await client.chat.completions.create(
        model="big", messages=messages, tools=TOOLS, tool_choice="auto", response_format=fmt)
    sent = upstream.bodies[-1]
    assert sent["tools"] == TOOLS and sent["tool_choice"] == "auto"
    assert sent["response_format"] == fmt and sent["messages"] == messages
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls[0].function.arguments == "{\"city\": \"Oslo\"}"

    stream = await client.chat.completions.create(model="big", messages=messages,
                                                   tools=TOOLS, stream=True)
    deltas = [c.choices[0].delta for c in [c async for c in stream] if c.choices]
    assert upstream.bodies[-1]["tools"] == TOOLS
    assert [d.tool_calls[0].function.name for d in deltas if d.tool_calls] == ["weather"]


@pytest.mark.parametrize("extra, field", [
    ({"tools": TOOLS}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, IMAGE]}]},
     "messages[0].content[1]"),
])
async def test_a_local_model_refuses_what_it_would_ignore(gw, extra, field):
    _, client, _ = gw
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **extra}
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(**body)
    assert err.value.status_code == 400
    assert err.value.body["param"] == field and field in err.value.body["message"]


async def test_a_local_model_takes_the_values_that_ask_for_nothing(gw):
    _, client, _ = gw
    reply = await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        tools=[], tool_choice="none", response_format={"type": "text"}, max_tokens=2)
    assert reply.choices[0].message.role == "assistant"


async def test_a_safe_incoming_request_id_is_kept_and_logged(gw):
    app, client, _ = gw
    state = app.state.llmctl
    for sent, kept in [("trace-42:retry.1", True), ("x" * 64, True), ("x" * 65, False),
                       ("bad id\twith\ttabs", False), ("<script>", False)]:
        response = await client.chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
            extra_headers={"X-Request-ID": sent})
        got = response.headers["x-request-id"]
        assert (got == sent) is kept, (sent, got)
        if not kept:
            assert got.startswith("req_") and len(got) == 36
        await state.logstore.flush()
        assert logquery.show(state.db, got)["status"] == 200
