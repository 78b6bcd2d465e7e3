"""Bad integers and durations (beyond 64 bits, non-ASCII digits, centuries of days) in
paths, queries and bodies of the admin API are 400s or 404s naming the field, never a
500; on the CLI they are one line and a usage (2) or not-found (4) exit status."""

from __future__ import annotations

import base64
import json

import pytest
from typer.testing import CliRunner

from llmctl.cli import app

BIG = str(2**64)
SUPERSCRIPT_ONE = "\u00b9"  # str.isdigit() is true for it; int() refuses it


def _cursor(row_id: int) -> str:
    raw = json.dumps(["2026-01-01T00:00:00", row_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


API_CASES = [  # method, path, body, status, param
    ("GET", f"/v1/admin/keys/{SUPERSCRIPT_ONE}", None, 404, "key"),
    ("GET", f"/v1/admin/keys/{BIG}", None, 404, "key"),
    ("PATCH", f"/v1/admin/keys/{BIG}", {"rpm": 1}, 404, "key"),
    ("PATCH", "/v1/admin/keys/u", {"rpm": 2**64}, 400, "rpm"),
    ("POST", "/v1/admin/keys", {"name": "a", "expires_in": "99999999d"}, 400, "expires"),
    ("POST", "/v1/admin/keys", {"name": "b", "expires_in": f"{SUPERSCRIPT_ONE}d"}, 400,
     "expires"),
    ("POST", "/v1/admin/keys", {"name": "c", "monthly_token_quota": 2**63}, 400,
     "monthly_token_quota"),
    ("PATCH", "/v1/admin/quotas/u", {"monthly_token_quota": 10**30}, 400,
     "monthly_token_quota"),
    ("GET", f"/v1/admin/quotas/{BIG}", None, 404, "key"),
    ("GET", f"/v1/admin/usage?key={BIG}", None, 404, "key"),
    ("GET", f"/v1/admin/logs?key={SUPERSCRIPT_ONE}", None, 404, "key"),
    ("GET", f"/v1/admin/logs?status={SUPERSCRIPT_ONE}", None, 400, "status"),
    ("GET", f"/v1/admin/logs?status={BIG}", None, 400, "status"),
    ("GET", "/v1/admin/logs?since=99999999d", None, 400, "since"),
    ("GET", "/v1/admin/logs?since=0001-01-01T00:00:00%2B05:00", None, 400, "since"),
    ("GET", f"/v1/admin/logs?limit={BIG}", None, 400, "limit"),
    ("GET", f"/v1/admin/logs?cursor={_cursor(2**70)}", None, 400, "cursor"),
    ("GET", f"/v1/admin/logs/{BIG}", None, 404, "request_id"),
    ("GET", "/v1/admin/usage?month=\u0662\u0660\u0662\u0666-01", None, 400, "month"),
    ("GET", "/v1/admin/quotas/u?month=2026-01%0A", None, 400, "month"),
]


async def test_admin_api_answers_bad_numbers_with_4xx(gov_gateway):
    from server.services import keys

    async with gov_gateway() as gw:
        admin = keys.create_key(gw.db, name="root", role="admin").secret
        keys.create_key(gw.db, name="u")
        headers = {"Authorization": f"Bearer {admin}"}
        for method, path, body, status, param in API_CASES:
            reply = await gw.client.request(method, path, json=body, headers=headers)
            assert reply.status_code == status, (method, path, body, reply.text)
            assert reply.json()["error"]["param"] == param, (path, reply.text)
        # The largest value that fits is stored and read back as it was.
        reply = await gw.client.patch("/v1/admin/keys/u", json={"rpm": 2**63 - 1},
                                      headers=headers)
        assert reply.status_code == 200 and reply.json()["rpm"] == 2**63 - 1


CLI_CASES = [  # args, exit status, start of the message
    (("keys", "create", "--name", "x", "--rpm", BIG), 2, "error: rpm:"),
    (("keys", "create", "--name", "y", "--expires", "99999999d"), 2, "error: expires:"),
    (("keys", "show", SUPERSCRIPT_ONE), 4, "error: no key"),
    (("keys", "show", BIG), 4, "error: no key"),
    (("keys", "update", "ops", "--tpm", BIG), 2, "error: tpm:"),
    (("quotas", "set", "ops", "--monthly-tokens", BIG), 2, "error: monthly_token_quota:"),
    (("quotas", "show", BIG), 4, "error: no key"),
    (("usage", "--key", BIG), 4, "error: no key"),
    (("logs", "search", "--status", SUPERSCRIPT_ONE), 2, "error: status:"),
    (("logs", "search", "--since", "99999999d"), 2, "error: since:"),
    (("logs", "search", "--limit", BIG), 2, "error: limit:"),
    (("logs", "tail", "-n", BIG), 2, "error: lines:"),
    (("logs", "show", BIG), 4, "error: no logged request"),
    (("logs", "prune", "--older-than", "99999999d"), 2, "error: Invalid value for '--older-than'"),
    (("cache", "purge", "--older-than", "99999999d"), 2, "error: Invalid value for '--older-than'"),
]


@pytest.mark.parametrize("args,code,message", CLI_CASES, ids=lambda v: " ".join(v)
                         if isinstance(v, tuple) else None)
def test_cli_answers_bad_numbers_in_one_line(args, code, message, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCTL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LLMCTL_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(app, ["keys", "create", "--name", "ops"]).exit_code == 0
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, (result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.output
