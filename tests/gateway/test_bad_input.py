"""Bad input, table-driven: every case gets the OpenAI envelope and never a 500."""

from datetime import timedelta

import pytest

from server.db.tables import ApiKey, utcnow
from server.services import keys

GOOD = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
GEN = {"prompt": "Hello", "max_new_tokens": 4, "temperature": 0}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
LONG = "hello world " * 400  # far more than the tiny model's 512-token context

CASES = [
    # (name, route, body, auth, status, code, param)
    ("no key", "/v1/completions", GOOD, None, 401, "invalid_api_key", None),
    ("unknown key", "/v1/completions", GOOD, "llm_not-a-real-key", 401, "invalid_api_key", None),
    ("revoked", "/v1/completions", GOOD, "revoked", 401, "key_revoked", None),
    ("expired", "/v1/generate", GEN, "expired", 401, "key_expired", None),
    ("model not allowed", "/v1/completions", GOOD, "restricted", 403, "permission_denied",
     "model"),
    ("unknown model", "/v1/completions", {**GOOD, "model": "gpt-9"}, "user", 404,
     "model_not_found", "model"),
    ("negative max_tokens", "/v1/completions", {**GOOD, "max_tokens": -1}, "user", 400,
     "invalid_value", "max_tokens"),
    ("max_tokens above the model's limit", "/v1/completions", {**GOOD, "max_tokens": 100000},
     "user", 400, None, "max_tokens"),
    ("negative max_new_tokens", "/v1/generate", {**GEN, "max_new_tokens": -5}, "user", 400,
     "invalid_value", "max_new_tokens"),
    ("max_new_tokens above the limit", "/v1/generate", {**GEN, "max_new_tokens": 9999}, "user",
     400, None, "max_new_tokens"),
    ("negative temperature", "/v1/completions", {**GOOD, "temperature": -0.5}, "user", 400,
     "invalid_value", "temperature"),
    ("top_p zero", "/v1/completions", {**GOOD, "top_p": 0}, "user", 400, "invalid_value",
     "top_p"),
    ("top_p above one", "/v1/generate", {**GEN, "top_p": 1.5}, "user", 400, "invalid_value",
     "top_p"),
    ("prompt longer than context", "/v1/completions", {**GOOD, "prompt": LONG}, "user", 400,
     "context_length_exceeded", "prompt"),
    ("chat longer than context", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": LONG}]}, "user", 400,
     "context_length_exceeded", "messages"),
    ("wrong type", "/v1/completions", {**GOOD, "max_tokens": "many"}, "user", 400,
     "invalid_value", "max_tokens"),
    ("wrong type in chat", "/v1/chat/completions", {**CHAT, "messages": "hi"}, "user", 400,
     "invalid_value", "messages"),
    ("missing prompt", "/v1/generate", {"max_new_tokens": 3}, "user", 400, "invalid_value",
     "prompt"),
    ("bad role", "/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard",
                                                              "content": "x"}]},
     "user", 400, "invalid_value", "messages.0.role"),
    ("too many stops", "/v1/completions", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, "user",
     400, "invalid_value", "stop"),
    ("max_tokens 0 without echo", "/v1/completions", {**GOOD, "max_tokens": 0}, "user", 400,
     None, "max_tokens"),
]


@pytest.fixture
async def secrets(gateway):
    app, _client, base = gateway
    db = app.state.llmctl.db
    extra = {
        "revoked": keys.create_key(db, name="revoked").secret,
        "expired": keys.create_key(db, name="expired", expires_in="1d").secret,
        "restricted": keys.create_key(db, name="restricted", models=["other"]).secret,
    }
    keys.revoke_key(db, "revoked")
    with db.session() as s:
        row = s.query(ApiKey).filter_by(name="expired").one()
        row.expires_at = utcnow() - timedelta(minutes=1)
    return {**base, **extra}


@pytest.mark.parametrize("name,route,body,auth,status,code,param", CASES,
                         ids=[c[0] for c in CASES])
async def test_bad_input(gateway, secrets, name, route, body, auth, status, code, param):
    _app, client, _ = gateway
    headers = {}
    if auth:
        headers["Authorization"] = f"Bearer {secrets.get(auth, auth)}"
    response = await client.post(route, json=body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code:
        assert error["code"] == code
    if param:
        assert error["param"] == param
        assert param.split(".")[0] in error["message"]


async def test_unknown_model_lists_available(gateway):
    _app, client, secrets = gateway
    response = await client.post("/v1/completions", json={**GOOD, "model": "gpt-9"},
                                 headers={"X-API-Key": secrets["user"]})
    assert "available models: tiny" in response.json()["error"]["message"]


@pytest.mark.parametrize("payload", [b"{not json", b"[1, 2]", b"", b"\xff\xfe"])
async def test_malformed_json(gateway, payload):
    _app, client, secrets = gateway
    response = await client.post("/v1/completions", content=payload, headers={
        "X-API-Key": secrets["user"], "content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_json"


async def test_unknown_route_and_method(gateway):
    _app, client, secrets = gateway
    assert (await client.get("/v1/nothing")).status_code == 404
    response = await client.get("/v1/completions", headers={"X-API-Key": secrets["user"]})
    assert response.status_code == 405
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded",
                                          "text/plain"])
async def test_json_body_is_read_whatever_the_declared_type(gateway, content_type):
    """`curl -d '{...}'` without -H 'Content-Type: application/json' works."""
    _app, client, secrets = gateway
    headers = {"X-API-Key": secrets["user"]}
    if content_type:
        headers["content-type"] = content_type
    response = await client.post("/v1/generate", headers=headers,
                                 content=b'{"prompt": "Hello!", "max_new_tokens": 4}')
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] > 0
