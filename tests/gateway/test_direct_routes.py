"""The completion routes are dispatched without FastAPI's routing (server/api/direct.py):
what a client sees is what FastAPI's path gave, errors and their order included."""

from __future__ import annotations

import httpx
import pytest
from fastapi import APIRouter, Depends, Request
from prometheus_client import REGISTRY

from server.api.direct import direct_routes

GOOD = {"model": "tiny", "prompt": "Hello", "max_tokens": 2, "temperature": 0}
WRONG = b'{"prompt": 5, "messages": 5, "temperature": "hot"}'  # a bad field on every route


@pytest.mark.parametrize("payload,auth,status,code", [
    # FastAPI refused a body that is not JSON before it looked at the key...
    (b"{not json", "llm_wrong", 400, "invalid_json"),
    # ...and checked the key before the fields.
    (WRONG, "llm_wrong", 401, "invalid_api_key"),
    (b"", "llm_wrong", 401, "invalid_api_key"),
    (b"", "user", 400, "invalid_json"),
    (WRONG, "user", 400, "invalid_value"),
])
async def test_errors_and_their_order(gateway, payload, auth, status, code):
    _app, client, secrets = gateway
    for route in ("/v1/completions", "/v1/generate", "/v1/chat/completions"):
        response = await client.post(route, content=payload, headers={
            "Authorization": f"Bearer {secrets.get(auth, auth)}"})
        assert response.status_code == status, (route, response.text)
        assert response.json()["error"]["code"] == code
        assert response.headers["x-request-id"].startswith("req_")


async def test_bodies_are_documented(gateway):
    _app, client, _ = gateway
    spec = (await client.get("/openapi.json")).json()
    for route, model in [("/v1/generate", "GenerateRequest"),
                         ("/v1/completions", "CompletionRequest"),
                         ("/v1/chat/completions", "ChatCompletionRequest")]:
        body = spec["paths"][route]["post"]["requestBody"]
        assert body["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{model}"}
        assert "properties" in spec["components"]["schemas"][model]
    assert "ChatMessage" in spec["components"]["schemas"]


async def test_an_unexpected_error_is_a_500_envelope_logged_and_counted(gateway, monkeypatch):
    app, _client, secrets = gateway
    state = app.state.llmctl

    async def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(state.gateway, "prepare", broken)
    before = REGISTRY.get_sample_value("llmctl_requests_total", {
        "route": "/v1/completions", "model_name": "", "status": "500", "cache": "none"}) or 0
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        response = await client.post("/v1/completions", json=GOOD,
                                     headers={"X-API-Key": secrets["user"]})
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    assert REGISTRY.get_sample_value("llmctl_requests_total", {
        "route": "/v1/completions", "model_name": "", "status": "500",
        "cache": "none"}) == before + 1
    await state.logstore.flush()
    from sqlalchemy import select

    from server.db.tables import RequestLog
    with state.db.session() as s:
        row = s.scalars(select(RequestLog).order_by(RequestLog.id.desc())).first()
    assert (row.route, row.status) == ("/v1/completions", 500)


async def test_other_methods_and_routes_are_fastapis(gateway):
    _app, client, secrets = gateway
    headers = {"X-API-Key": secrets["user"]}
    assert (await client.get("/v1/completions", headers=headers)).status_code == 405
    assert (await client.get("/v1/models", headers=headers)).status_code == 200
    ok = await client.post("/v1/completions", json=GOOD, headers=headers)
    assert ok.status_code == 200 and ok.headers["x-llmctl-cache"] in ("miss", "hit")


def test_a_direct_route_may_not_take_dependencies():
    """direct.py calls only endpoint(request): a route that grew a parameter or a
    dependency would have it skipped silently, so the app refuses to start."""
    def fine(request: Request):
        return None

    def needs(request: Request, x: int = Depends(lambda: 1)):
        return None

    for broken in ("/v1/generate", "/v1/completions"):
        router = APIRouter()
        for path in ("/v1/generate", "/v1/completions", "/v1/chat/completions"):
            router.post(path)(needs if path == broken else fine)
        with pytest.raises(RuntimeError, match="only the Request"):
            direct_routes(router)
    router = APIRouter()
    for path in ("/v1/generate", "/v1/completions", "/v1/chat/completions"):
        router.post(path)(fine)
    assert set(direct_routes(router)) == {"/v1/generate", "/v1/completions",
                                          "/v1/chat/completions"}
