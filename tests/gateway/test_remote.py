"""A `type: remote` model answered by a second live llmctl gateway."""

import time

import httpx
import pytest


@pytest.fixture
def chain(live_server_factory, tiny_models_yaml, tmp_path, monkeypatch):
    """(front, back, front_key): `front` serves `relay`, a remote model living on `back`."""
    # --preload: the remote's first answer must not include loading the model, which
    # could exceed the short timeout the front is configured with.
    back = live_server_factory(tiny_models_yaml, home=tmp_path / "back", args=("--preload",))
    back_key = back.create_key("front-gateway")
    config = tmp_path / "front.yaml"

    def write(api: str) -> None:
        config.write_text(
            "default_model: relay\n"
            "models:\n"
            f"  - id: tiny\n    name: relay\n    type: remote\n    base_url: {back.url}/v1\n"
            f"    api: {api}\n    api_key_env: BACK_KEY\n    timeout: 3\n"
            "    connect_timeout: 1\n")

    write("openai")
    front = live_server_factory(str(config), home=tmp_path / "front",
                                env={"BACK_KEY": back_key})
    return front, back, front.create_key("user")


def _post(url, key, route, body, **kw):
    return httpx.post(url + route, json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=30, **kw)


def test_remote_answers_through_the_first_gateway(chain):
    front, back, key = chain
    body = {"model": "relay", "prompt": "Hello", "max_tokens": 6, "temperature": 0}
    via_front = _post(front.url, key, "/v1/completions", body)
    assert via_front.status_code == 200, via_front.text
    direct_key = back.create_key("direct")
    direct = _post(back.url, direct_key, "/v1/completions", {**body, "model": "tiny"})
    assert via_front.json()["choices"][0]["text"] == direct.json()["choices"][0]["text"]
    assert via_front.json()["usage"] == direct.json()["usage"]

    chat = _post(front.url, key, "/v1/chat/completions",
                 {"model": "relay", "messages": [{"role": "user", "content": "hi"}],
                  "max_tokens": 5, "temperature": 0})
    assert chat.status_code == 200 and chat.json()["usage"]["prompt_tokens"] > 0


def test_remote_streaming_passes_through(chain):
    front, _back, key = chain
    body = {"model": "relay", "prompt": "Stream me", "max_tokens": 8, "temperature": 0}
    pieces = []
    with httpx.stream("POST", front.url + "/v1/completions",
                      json={**body, "stream": True}, headers={"Authorization": f"Bearer {key}",
                                                              "Cache-Control": "no-cache"},
                      timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                import json

                event = json.loads(line[6:])
                if event["choices"]:
                    pieces.append(event["choices"][0]["text"])
    # Streamed first: had the remote cached this prompt it would replay it in one piece.
    assert len([p for p in pieces if p]) > 1
    full = _post(front.url, key, "/v1/completions", body).json()["choices"][0]["text"]
    assert "".join(pieces) == full


def test_remote_down_fails_with_envelope_within_timeout(chain):
    front, back, key = chain
    back.stop()
    started = time.monotonic()
    response = _post(front.url, key, "/v1/completions",
                     {"model": "relay", "prompt": "x", "max_tokens": 2})
    elapsed = time.monotonic() - started
    assert response.status_code in (502, 503), response.text
    assert response.json()["error"]["code"].startswith("upstream")
    assert elapsed < 3 + 1  # the model's configured timeout, plus slack
