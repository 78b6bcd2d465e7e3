"""The request path's key reads (KeyLookup: plain sqlite3, remembered until the database
changes) agree with the ORM's, and never serve a key that has changed."""

from __future__ import annotations

import sqlite3
from datetime import timedelta

import pytest

from server.db.tables import ApiKey, utcnow
from server.errors import AuthenticationError
from server.services import keys
from server.services.keys import KeyLookup, verify_key
from server.services.sqlitereader import SqliteReader


@pytest.fixture
def lookup(sqlite_db):
    found = KeyLookup(SqliteReader(sqlite_db))
    yield found
    found.close()


def both(db, lookup, secret):
    """verify_key through the ORM and through the lookup: the same key or the same error."""
    results = []
    for kw in ({}, {"lookup": lookup}):
        try:
            results.append(verify_key(db, secret, **kw))
        except AuthenticationError as exc:
            results.append((exc.code, exc.message))
    assert results[0] == results[1]
    return results[1]


def test_same_key_as_the_orm(sqlite_db, lookup):
    plain = keys.create_key(sqlite_db, name="plain")
    rich = keys.create_key(sqlite_db, name="rich", role="admin", models=["tiny", "small"],
                           expires_in="30d", rpm=10, tpm=1000, max_concurrency=2,
                           monthly_token_quota=10**6)
    for created in (plain, rich):
        info = both(sqlite_db, lookup, created.secret)
        assert info == created.key
    assert both(sqlite_db, lookup, "llm_nothing")[0] == "invalid_api_key"
    assert both(sqlite_db, lookup, None)[0] == "invalid_api_key"


def test_changes_show_on_the_next_request(sqlite_db, lookup):
    created = keys.create_key(sqlite_db, name="k", rpm=10)
    assert both(sqlite_db, lookup, created.secret).rpm == 10
    keys.update_key(sqlite_db, "k", rpm=20)
    assert both(sqlite_db, lookup, created.secret).rpm == 20
    rotated = keys.rotate_key(sqlite_db, "k")
    assert both(sqlite_db, lookup, created.secret)[0] == "invalid_api_key"
    assert both(sqlite_db, lookup, rotated.secret).id == created.key.id
    keys.revoke_key(sqlite_db, "k")
    assert both(sqlite_db, lookup, rotated.secret)[0] == "key_revoked"


def test_a_write_from_another_process_is_seen(sqlite_db, lookup):
    """Another process's connection (the CLI, a second gateway) is what data_version
    tracks; a separate sqlite3 connection stands in for it."""
    created = keys.create_key(sqlite_db, name="k")
    assert both(sqlite_db, lookup, created.secret).revoked_at is None
    other = sqlite3.connect(sqlite_db.engine.url.database)
    with other:
        other.execute("UPDATE api_keys SET revoked_at = ? WHERE name = 'k'",
                      (utcnow().isoformat(" ", "microseconds"),))
    other.close()
    assert both(sqlite_db, lookup, created.secret)[0] == "key_revoked"


def test_a_miss_is_not_remembered_past_a_change(sqlite_db, lookup):
    secret = keys.new_secret()
    assert both(sqlite_db, lookup, secret)[0] == "invalid_api_key"
    keys.create_key(sqlite_db, name="late", value=secret)
    assert both(sqlite_db, lookup, secret).name == "late"


def test_expiry_is_checked_on_every_request(sqlite_db, lookup, monkeypatch):
    created = keys.create_key(sqlite_db, name="k", expires_in="1h")
    assert both(sqlite_db, lookup, created.secret).state == "active"
    later = utcnow() + timedelta(hours=2)
    monkeypatch.setattr("server.services.keys.utcnow", lambda: later)
    assert both(sqlite_db, lookup, created.secret)[0] == "key_expired"


def test_reads_are_remembered_until_the_database_changes(sqlite_db, lookup, monkeypatch):
    created = keys.create_key(sqlite_db, name="k")
    reads = []
    real = keys._find_sqlite
    monkeypatch.setattr(keys, "_find_sqlite", lambda r, d: reads.append(d) or real(r, d))
    for _ in range(3):
        verify_key(sqlite_db, created.secret, lookup=lookup)
    assert len(reads) == 1
    with sqlite_db.session() as s:  # any commit, by any connection
        s.query(ApiKey).filter_by(name="k").update({"rpm": 5})
    assert verify_key(sqlite_db, created.secret, lookup=lookup).rpm == 5
    assert len(reads) == 2
