"""The governance API in-process: quotas under concurrency (SQLite and Postgres),
/v1/me/usage, admin access control, and admin API ≡ CLI."""

from __future__ import annotations

import asyncio
import json

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from llmctl.cli import app as cli_app
from server.db.tables import RequestLog
from server.services import keys, quotas

PROMPT = "The quick brown fox jumps over the lazy dog"
USAGE_ROW = {"key_id", "key_name", "month", "model", "requests", "cached_requests",
             "prompt_tokens", "completion_tokens", "total_tokens", "charged_tokens"}
TOTALS = USAGE_ROW - {"key_id", "key_name", "month", "model"}
LOG_ENTRY = {"id", "request_id", "created_at", "key_id", "key_name", "model", "route", "status",
             "stream", "prompt_tokens", "completion_tokens", "total_tokens", "charged_tokens",
             "latency_ms", "ttft_ms", "cached", "cache_status", "finish_reason", "error_type",
             "error_message"}
QUOTA = {"key_id", "key_name", "key_prefix", "role", "month", "monthly_token_quota",
         "used_tokens", "reserved_tokens", "remaining_tokens", "resets_at", "rpm", "tpm",
         "max_concurrency", "own_limits"}


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


async def complete(client, secret, prompt=PROMPT, max_tokens=8):
    return await client.post("/v1/completions", headers=bearer(secret), json={
        "model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


def unused(data):
    """Key dicts without last_used_at: the admin key's own API calls move it."""
    if isinstance(data, list):
        return [unused(d) for d in data]
    return {k: v for k, v in data.items() if k != "last_used_at"}


def cli(*args: str):
    result = CliRunner().invoke(cli_app, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


async def test_quota_holds_under_concurrency(gov_gateway, db_url):
    """Done when 2: 50 concurrent requests against a quota that fits 10."""
    async with gov_gateway(db_url, cache_enabled=False) as gw:
        admin = keys.create_key(gw.db, name="admin", role="admin").secret
        probe = await complete(gw.client, admin)
        assert probe.status_code == 200, probe.text
        reserve = probe.json()["usage"]["prompt_tokens"] + 8
        quota = 10 * reserve
        user = keys.create_key(gw.db, name="u", monthly_token_quota=quota)
        responses = await asyncio.gather(*(complete(gw.client, user.secret) for _ in range(50)))
        ok = [r for r in responses if r.status_code == 200]
        refused = [r for r in responses if r.status_code == 429]
        assert len(ok) + len(refused) == 50 and len(ok) >= 10 and refused
        assert {r.json()["error"]["code"] for r in refused} == {"insufficient_quota"}
        assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)

        await gw.state.logstore.flush()
        used, reserved = quotas.ledger(gw.db, user.key.id, quotas.current_month())
        me = (await gw.client.get("/v1/me/usage", headers=bearer(user.secret))).json()
        with gw.db.session() as s:
            logged = s.scalar(select(func.sum(RequestLog.charged_tokens))
                              .where(RequestLog.key_id == user.key.id))
        charged = sum(r.json()["usage"]["total_tokens"] for r in ok)
        assert reserved == 0 and used <= quota
        assert used == me["totals"]["charged_tokens"] == logged == charged
        assert me["quota"]["used_tokens"] == used
        assert me["quota"]["remaining_tokens"] == quota - used
        assert me["totals"]["requests"] == len(ok)


async def test_admin_routes_need_an_admin_key(gov_gateway):
    """Done when 5: every admin route is 401 without a key and 403 with a user key."""
    async with gov_gateway() as gw:
        user = keys.create_key(gw.db, name="user").secret
        admin = keys.create_key(gw.db, name="admin", role="admin").secret
        from server.api.routes import admin as admin_routes

        routes = [(m, r.path) for r in admin_routes.router.routes for m in r.methods]
        assert len(routes) >= 12
        for method, path in routes:
            url = path.replace("{key}", "user").replace("{request_id}", "x")
            body = {"name": "x"} if method in ("POST", "PATCH") else None
            none = await gw.client.request(method, url, json=body)
            assert none.status_code == 401, (method, path)
            assert none.json()["error"]["type"] == "authentication_error"
            denied = await gw.client.request(method, url, json=body, headers=bearer(user))
            assert denied.status_code == 403, (method, path)
            assert denied.json()["error"]["code"] == "permission_denied"
        assert (await gw.client.get("/v1/admin/keys", headers=bearer(admin))).status_code == 200
        assert (await gw.client.get("/v1/me/usage")).status_code == 401


async def test_admin_api_and_cli_agree(gov_gateway, tmp_path, monkeypatch):
    """Done when 5: the same operation through the API and the CLI gives the same JSON."""
    monkeypatch.chdir(tmp_path)
    async with gov_gateway() as gw:
        h = bearer(keys.create_key(gw.db, name="root", role="admin").secret)
        c = gw.client
        created = (await c.post("/v1/admin/keys", headers=h, json={"name": "bob", "rpm": 50,
                                                                     "monthly_token_quota": 10**6}))
        assert created.status_code == 201 and created.json()["secret"].startswith("llm_")
        bob = created.json()["secret"]
        for prompt in ("one", "two two", "three three three"):
            assert (await complete(c, bob, prompt)).status_code == 200
        assert (await c.get("/v1/models", headers=bearer(bob))).status_code == 200
        await gw.state.logstore.flush()

        async def api(path):
            r = await c.get(path, headers=h)
            assert r.status_code == 200, r.text
            return r.json()

        assert cli("keys", "show", "bob", "--json") == await api("/v1/admin/keys/bob")
        assert unused(cli("keys", "list", "--json")) == unused(await api("/v1/admin/keys"))
        assert cli("quotas", "show", "--json") == await api("/v1/admin/quotas")
        assert cli("quotas", "show", "bob", "--json") == await api("/v1/admin/quotas/bob")
        assert cli("usage", "--json") == await api("/v1/admin/usage")
        assert cli("usage", "--key", "bob", "--by", "model", "--month", "all", "--json") == \
            await api("/v1/admin/usage?key=bob&by=model&month=all")
        page = cli("logs", "search", "--key", "bob", "--limit", "2", "--json")
        assert page == await api("/v1/admin/logs?key=bob&limit=2")
        assert len(page["items"]) == 2 and page["next_cursor"]
        rest = cli("logs", "search", "--key", "bob", "--limit", "2", "--cursor",
                   page["next_cursor"], "--json")
        assert rest == await api(f"/v1/admin/logs?key=bob&limit=2&cursor={page['next_cursor']}")
        assert len(rest["items"]) == 2 and rest["next_cursor"] is None  # 3 completions + models
        rid = next(e["request_id"] for e in page["items"] + rest["items"]
                   if e["route"] == "/v1/completions")
        shown = cli("logs", "show", rid, "--json")
        assert shown == await api(f"/v1/admin/logs/{rid}") and shown["prompt"]

        # writes: quotas set (CLI) ≡ PATCH /v1/admin/quotas (API)
        set_cli = cli("quotas", "set", "bob", "--monthly-tokens", "5000", "--tpm", "900",
                      "--json")
        assert set_cli == await api("/v1/admin/quotas/bob")
        patched = (await c.patch("/v1/admin/quotas/bob", headers=h,
                                 json={"max_concurrency": 3})).json()
        assert patched == cli("quotas", "show", "bob", "--json")
        assert patched["max_concurrency"] == 3 and patched["tpm"] == 900
        upd = (await c.patch("/v1/admin/keys/bob", headers=h, json={"rpm": 7})).json()
        assert upd == cli("keys", "show", "bob", "--json") and upd["rpm"] == 7
        rotated = (await c.post("/v1/admin/keys/bob/rotate", headers=h)).json()
        assert (await complete(c, bob)).status_code == 401  # the old secret is dead
        assert (await complete(c, rotated["secret"])).status_code == 200
        # that request's log write moves bob's last_used_at: let it land first
        await gw.state.logstore.flush()
        revoked = cli("keys", "revoke", "bob", "--json")
        assert revoked == await api("/v1/admin/keys/bob") and revoked["state"] == "revoked"
        again = (await c.post("/v1/admin/keys/bob/revoke", headers=h)).json()
        assert again == revoked
        missing = await c.get("/v1/admin/keys/nobody", headers=h)
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "key"
        bad = await c.get("/v1/admin/logs?status=teapot", headers=h)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "status"


async def test_json_shapes_are_stable(gov_gateway, tmp_path, monkeypatch):
    """Done when 6: what a cron script parses."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMCTL_DEFAULT_MONTHLY_TOKENS", str(10**6))  # the CLI's settings too
    async with gov_gateway() as gw:
        k = keys.create_key(gw.db, name="cron", rpm=100)
        assert (await complete(gw.client, k.secret)).status_code == 200
        refused = keys.create_key(gw.db, name="tight", monthly_token_quota=1)
        # A prompt of its own: a cache hit is free and would be served despite the quota.
        assert (await complete(gw.client, refused.secret, prompt="not cached")).status_code == 429
        await gw.state.logstore.flush()
    report = cli("usage", "--by", "model", "--json")
    assert list(report) == ["month", "key", "model", "by", "rows", "totals"]
    assert set(report["rows"][0]) == USAGE_ROW and set(report["totals"]) == TOTALS
    assert report["rows"][0]["key_name"] == "cron" and report["rows"][0]["model"] == "tiny"
    page = cli("logs", "search", "--json")
    assert list(page) == ["items", "next_cursor", "limit"]
    assert all(set(e) == LOG_ENTRY for e in page["items"])
    assert {e["status"] for e in page["items"]} == {200, 429}
    errors = cli("logs", "search", "--status", "4xx", "--since", "1h", "--json")["items"]
    assert [e["error_type"] for e in errors] == ["insufficient_quota"]
    quotas_all = cli("quotas", "show", "--json")
    assert isinstance(quotas_all, list) and all(set(q) == QUOTA for q in quotas_all)
    one = cli("quotas", "show", "cron", "--json")
    assert one["monthly_token_quota"] == 10**6 and one["own_limits"] == ["rpm"]
    assert one["used_tokens"] == report["totals"]["charged_tokens"]


@pytest.mark.redis
async def test_readyz_and_metrics_show_governance(gov_gateway, redis_server, redis_url):
    async with gov_gateway(redis_url=redis_url, redis_enabled=True) as gw:
        k = keys.create_key(gw.db, name="r", rpm=1).secret
        assert (await complete(gw.client, k)).status_code == 200
        over = await complete(gw.client, k)
        assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limit_exceeded"
        metrics = (await gw.client.get("/metrics")).text
        assert 'llmctl_rejections_total{reason="rate"}' in metrics
        assert gw.state.limiter.status()["mode"] == "redis"
