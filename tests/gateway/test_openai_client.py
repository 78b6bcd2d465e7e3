"""A live `llmctl serve` on loopback, driven by the official openai client and curl."""

import json
import subprocess

import openai
import pytest


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_models_yaml):
    from tests.plugins.live import LiveServer

    live = LiveServer(tiny_models_yaml, tmp_path_factory.mktemp("home")).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    secret = server.create_key("openai-client")
    return openai.OpenAI(base_url=server.url + "/v1", api_key=secret, max_retries=0)


def test_readme_curl_flow(server):
    secret = server.create_key("readme")
    out = subprocess.run(
        # exactly the README's call: no Content-Type header
        ["curl", "-s", "-X", "POST", server.url + "/v1/generate", "-H", f"X-API-Key: {secret}",
         "-d", '{"prompt": "Hello!", "max_new_tokens": 32}'],
        capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    assert isinstance(data["text"], str) and data["text"]
    assert data["usage"]["completion_tokens"] > 0
    assert data["usage"]["total_tokens"] == (data["usage"]["prompt_tokens"]
                                             + data["usage"]["completion_tokens"])
    assert data["finish_reason"] in ("stop", "length")


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_text_completion(client):
    result = client.completions.create(model="tiny", prompt="The answer is", max_tokens=8,
                                       temperature=0)
    assert result.object == "text_completion"
    assert result.choices[0].finish_reason in ("stop", "length")
    assert result.usage.completion_tokens == 8 or result.choices[0].finish_reason == "stop"
    again = client.completions.create(model="tiny", prompt="The answer is", max_tokens=8,
                                      temperature=0)
    assert again.choices[0].text == result.choices[0].text


def test_text_completion_stream(client):
    full = client.completions.create(model="tiny", prompt="Once upon", max_tokens=12,
                                     temperature=0, extra_headers={"Cache-Control": "no-store"})
    pieces, usage = [], None
    for chunk in client.completions.create(model="tiny", prompt="Once upon", max_tokens=12,
                                           temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == full.choices[0].text
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_completion(client):
    result = client.chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Hi there"}],
        max_tokens=10, temperature=0)
    assert result.object == "chat.completion"
    assert result.choices[0].message.role == "assistant"
    assert isinstance(result.choices[0].message.content, str)
    assert result.usage.prompt_tokens > 5


def test_chat_completion_stream(client):
    messages = [{"role": "user", "content": "Tell me a story"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                          temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_errors_reach_the_client_as_openai_errors(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, top_p=3)
