"""A model over several backends: timeouts, retries and their budget, a stream cut
short, fallbacks. Real backends on loopback (tests/plugins/fakebackend.py), the
real gateway app in front of them."""

from __future__ import annotations

import json
import time
from contextlib import asynccontextmanager

import httpx
import pytest
from sqlalchemy import select

from server.api.app import create_app
from server.config import Settings, load_models_config
from server.db.tables import RequestLog, UsageMonthly
from server.services import keys
from tests.plugins.ports import free_port


@asynccontextmanager
async def gateway(tmp_path, monkeypatch, models_yaml: str, **settings):
    """(app, client, user key) on embedded SQLite, for `models_yaml`."""
    monkeypatch.setenv("LLMCTL_HOME", str(tmp_path / "home"))
    path = tmp_path / "models.yaml"
    path.write_text(models_yaml)
    s = Settings(models_config=path, cache_enabled=False, **settings)
    app = create_app(s, load_models_config(s))
    async with app.router.lifespan_context(app):
        secret = keys.create_key(app.state.llmctl.db, name="user").secret
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw",
                                     headers={"Authorization": f"Bearer {secret}"},
                                     timeout=30) as client:
            yield app, client


def backend(url: str, name: str, weight: float = 1, **extra) -> str:
    lines = [f"      - name: {name}", f"        base_url: {url}/v1", f"        weight: {weight}"]
    lines += [f"        {k}: {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def model(name: str, backends: str, routing: str = "", fallbacks: str = "") -> str:
    return (f"  - id: fake\n    name: {name}\n    type: remote\n    connect_timeout: 1\n"
            f"    timeout: 30\n{fallbacks}{routing}    backends:\n{backends}")


async def rows(app) -> list[RequestLog]:
    state = app.state.llmctl
    await state.logstore.flush()
    with state.db.session() as s:
        return list(s.scalars(select(RequestLog).order_by(RequestLog.id)))


BODY = {"model": "m", "prompt": "hello", "max_tokens": 2}


async def test_a_hung_backend_costs_at_most_its_first_byte_timeout(
        tmp_path, monkeypatch, fake_backend_factory):
    hung, ok = fake_backend_factory("hang"), fake_backend_factory("ok")
    # The hung backend weighs 1000 times more: the first pick is (almost surely) it.
    config = "models:\n" + model("m", backend(hung.url, "hung", 1000, first_byte_timeout=1)
                                 + backend(ok.url, "ok", 1, first_byte_timeout=1))
    async with gateway(tmp_path, monkeypatch, config) as (app, client):
        for _ in range(3):
            started = time.monotonic()
            response = await client.post("/v1/completions", json=BODY)
            elapsed = time.monotonic() - started
            assert response.status_code == 200, response.text
            assert response.headers["x-llmctl-backend"] == "m/ok"
            assert elapsed < 1 + 2.5  # the first-byte timeout, plus slack for a busy machine
        logged = await rows(app)
    # The first request waited out the hung backend once, then went to the other one.
    assert logged[0].attempts == 2 and logged[0].backend == "m/ok"
    assert hung.stats()["requests"] >= 1 and ok.stats()["requests"] == 3


async def test_a_backend_dying_mid_stream_ends_the_stream_with_an_error(
        tmp_path, monkeypatch, fake_backend_factory):
    from tests.plugins.fakebackend import TOKENS_BEFORE_DYING

    dying, ok = fake_backend_factory("die"), fake_backend_factory("ok")
    config = "models:\n" + model("m", backend(dying.url, "dying", 1000)
                                 + backend(ok.url, "ok", 1))
    async with gateway(tmp_path, monkeypatch, config) as (app, client):
        texts, errors, done = [], [], False
        async with client.stream("POST", "/v1/completions",
                                 json={**BODY, "max_tokens": 50, "stream": True}) as response:
            assert response.status_code == 200
            assert response.headers["x-llmctl-backend"] == "m/dying"
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        errors.append(event["error"])
                    elif event["choices"] and event["choices"][0]["text"]:
                        texts.append(event["choices"][0]["text"])
        # Not retried silently elsewhere: the tokens the client saw, then an error event.
        assert len(texts) == TOKENS_BEFORE_DYING and not done
        assert len(errors) == 1 and errors[0]["code"] == "upstream_stream_broken"
        assert ok.stats()["requests"] == 0
        [row] = await rows(app)
        assert (row.status, row.error_type, row.finish_reason) == (
            502, "upstream_stream_broken", "error")
        assert row.completion_tokens == TOKENS_BEFORE_DYING
        assert row.charged_tokens == TOKENS_BEFORE_DYING  # only what was delivered
        assert row.backend == "m/dying" and row.attempts == 1
        with app.state.llmctl.db.session() as s:
            usage = s.scalars(select(UsageMonthly)).one()
        assert usage.charged_tokens == TOKENS_BEFORE_DYING


async def test_all_backends_down_answers_from_the_fallback_or_503(
        tmp_path, monkeypatch, fake_backend_factory):
    spare = fake_backend_factory("ok")
    down = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]  # nothing listens there
    config = (
        "models:\n"
        + model("m", backend(down[0], "a") + backend(down[1], "b"),
                fallbacks="    fallbacks: [spare]\n")
        + model("lonely", backend(down[0], "a") + backend(down[1], "b")).replace(
            "id: fake", "id: fake-lonely")
        + model("spare", backend(spare.url, "s1")).replace("id: fake", "id: fake-spare"))
    async with gateway(tmp_path, monkeypatch, config) as (app, client):
        for _ in range(4):
            response = await client.post("/v1/completions", json=BODY)
            assert response.status_code == 200, response.text
            assert response.json()["model"] == "spare"
            assert response.headers["x-llmctl-backend"] == "spare/s1"
        started = time.monotonic()
        response = await client.post("/v1/completions", json={**BODY, "model": "lonely"})
        assert time.monotonic() - started < 1 + 2  # its connect timeout, plus slack
        assert response.status_code == 503
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        logged = await rows(app)
        ready = (await client.get("/readyz")).json()
    first = logged[0]
    assert first.model == "m" and first.backend == "spare/s1" and first.attempts == 3
    assert all(r.backend == "spare/s1" for r in logged[:4])
    assert logged[4].status == 503 and logged[4].backend is None
    # /readyz says which backends are out once they have been ejected.
    assert ready["checks"]["model:m"]["ok"] is False
    assert [b["healthy"] for b in ready["checks"]["model:m"]["backends"]] == [False, False]


async def test_retries_stay_within_the_attempt_budget_and_the_global_cap(
        tmp_path, monkeypatch, fake_backend_factory):
    failing = [fake_backend_factory("500") for _ in range(3)]
    config = "models:\n" + model(
        "m", "".join(backend(b.url, f"b{i}") for i, b in enumerate(failing)),
        routing="    routing: {attempts: 3, eject_after: 1000}\n")
    n = 40
    async with gateway(tmp_path, monkeypatch, config, retry_budget_ratio=0.1,
                       retry_budget_min=2) as (app, client):
        for _ in range(n):
            response = await client.post("/v1/completions", json=BODY)
            assert response.status_code == 502
            assert response.json()["error"]["type"] == "upstream_error"
        logged = await rows(app)
    attempts = sum(b.stats()["requests"] for b in failing)
    # Without a cap: 3 x 40 = 120 attempts. With it: one each, plus at most
    # max(2, 10% of 40) retries in the 10-second window.
    assert n <= attempts <= n + max(2, 0.1 * n)
    assert sum(r.attempts for r in logged) == attempts
    assert max(r.attempts for r in logged) == 3  # the attempt budget, reached while allowed


def test_a_client_that_leaves_cancels_the_backend_request(
        live_server_factory, fake_backend_factory, tmp_path):
    hung = fake_backend_factory("hang")
    config = tmp_path / "gw.yaml"
    config.write_text("models:\n" + model("m", backend(hung.url, "h1", first_byte_timeout=60)))
    gw = live_server_factory(str(config), home=tmp_path / "gw")
    key = gw.create_key("leaver")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gw.url + "/v1/completions", json=BODY, timeout=1.5,
                   headers={"Authorization": f"Bearer {key}"})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and hung.stats()["abandoned"] == 0:
        time.sleep(0.1)
    # The gateway closed its backend connection long before the 60 s first-byte timeout.
    assert hung.stats() == {"requests": 1, "abandoned": 1}
    logged = json.loads(gw.cli("logs", "search", "--json").stdout)["items"]
    assert [(e["status"], e["error_type"]) for e in logged] == [(499, "client_disconnected")]


def test_models_status_without_a_gateway_is_one_line():
    from typer.testing import CliRunner

    from llmctl.cli import app

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = CliRunner().invoke(app, ["models", "status", "--url", url, "--api-key", "k"])
    assert result.exit_code == 1
    assert result.output.strip() == f"error: cannot reach the gateway at {url}: ConnectError"
