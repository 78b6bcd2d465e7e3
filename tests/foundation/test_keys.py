"""API keys: the secret is shown once, stored only as a hash, and dies when it should."""

import json
import sqlite3
from datetime import timedelta

import pytest

from server.db.engine import Database
from server.db.tables import ApiKey, utcnow
from server.errors import AuthenticationError
from server.services import keys


def test_create_prints_secret_once_and_stores_only_a_hash(cli, tmp_path):
    result = cli("keys", "create", "--name", "ci", "--json")
    assert result.exit_code == 0, result.output
    created = json.loads(result.output)
    secret = created["secret"]
    assert secret.startswith("llm_") and len(secret) >= 4 + 43  # 256 bits, base64url
    assert created["prefix"] == secret[:12]

    for args in (["keys", "list"], ["keys", "list", "--json"], ["keys", "show", "ci"],
                 ["keys", "show", "ci", "--json"], ["keys", "update", "ci", "--rpm", "5"]):
        out = cli(*args).output
        assert secret not in out and secret[12:20] not in out

    raw = (tmp_path / "home" / "llmctl.db").read_bytes()
    assert secret.encode() not in raw and secret[12:].encode() not in raw
    rows = sqlite3.connect(tmp_path / "home" / "llmctl.db").execute(
        "select * from api_keys").fetchall()
    assert not any(secret in str(v) for row in rows for v in row)


@pytest.fixture
def db(database):
    return database


def test_verification_states(db):
    live = keys.create_key(db, name="live")
    assert keys.verify_key(db, live.secret).name == "live"

    revoked = keys.create_key(db, name="revoked")
    keys.revoke_key(db, "revoked")
    with pytest.raises(AuthenticationError, match="revoked"):
        keys.verify_key(db, revoked.secret)

    expired = keys.create_key(db, name="expired", expires_in="1d")
    with db.session() as s:
        s.get(ApiKey, expired.key.id).expires_at = utcnow() - timedelta(seconds=1)
    with pytest.raises(AuthenticationError, match="expired"):
        keys.verify_key(db, expired.secret)

    rotated = keys.rotate_key(db, "live")
    with pytest.raises(AuthenticationError):
        keys.verify_key(db, live.secret)
    assert keys.verify_key(db, rotated.secret).id == live.key.id

    with pytest.raises(AuthenticationError):
        keys.verify_key(db, live.secret + "x")
    with pytest.raises(AuthenticationError):
        keys.verify_key(db, None)


def test_rotate_keeps_settings(db):
    keys.create_key(db, name="k", role="admin", rpm=7, models=["tiny"], monthly_token_quota=99)
    rotated = keys.rotate_key(db, "k").key
    assert (rotated.role, rotated.rpm, rotated.allowed_models, rotated.monthly_token_quota) == (
        "admin", 7, ["tiny"], 99)


def test_key_lookup_by_id_name_prefix(db):
    created = keys.create_key(db, name="lookup")
    for ref in (str(created.key.id), "lookup", created.key.prefix, created.key.prefix[:8]):
        assert keys.get_key(db, ref).id == created.key.id


def test_value_imports_a_given_secret(cli):
    value = "sk-imported-0123456789abcdef"
    assert cli("keys", "create", "--name", "seed", "--value", value).exit_code == 0
    db = Database.from_settings(__import__("server.config").config.Settings())
    assert keys.verify_key(db, value).name == "seed"


def test_update_revoke_rotate_cli(cli):
    cli("keys", "create", "--name", "u")
    shown = json.loads(cli("keys", "update", "u", "--tpm", "100", "--max-concurrency", "2",
                           "--models", "a,b", "--json").output)
    assert (shown["tpm"], shown["max_concurrency"], shown["allowed_models"]) == (100, 2, ["a", "b"])
    rotated = json.loads(cli("keys", "rotate", "u", "--json").output)
    assert rotated["secret"].startswith("llm_")
    assert json.loads(cli("keys", "revoke", "u", "--json").output)["state"] == "revoked"
