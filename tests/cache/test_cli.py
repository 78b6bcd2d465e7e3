"""`llmctl cache stats|clear|purge`, in-process with CliRunner on embedded SQLite."""

import asyncio
import json
from datetime import timedelta

import pytest
from sqlalchemy import update
from typer.testing import CliRunner

from llmctl.cli import app
from server.db.engine import Database
from server.db.tables import CompletionCache as Entry
from server.db.tables import RequestLog, utcnow
from server.services.cache import CompletionCache
from tests.cache.conftest import make_settings

VALUE = {"id": "cmpl-1", "created": 1, "text": "out"}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCTL_HOME", str(tmp_path / "home"))
    for var in ("LLMCTL_DATABASE_URL", "LLMCTL_REDIS_URL", "REDIS_URL", "REDIS_ENABLED",
                "LLMCTL_REDIS_ENABLED"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "home"


@pytest.fixture
def db(home):
    db = Database(f"sqlite:///{home / 'llmctl.db'}")
    yield db
    db.dispose()


def run(*args):
    result = CliRunner().invoke(app, list(args))
    return result


def fill(db, entries):
    """entries: (model, prompt, age_days)."""
    cache = CompletionCache(make_settings(), db)

    async def go():
        for model, prompt, age in entries:
            k = cache.key_for(model=model, prompt=prompt, params={"temperature": 0})
            await cache.put(k, VALUE)
            with db.session() as s:
                s.execute(update(Entry).where(Entry.cache_key == k.key)
                          .values(created_at=utcnow() - timedelta(days=age)))

    asyncio.run(go())


def test_stats_json_and_table(db):
    fill(db, [("a", "1", 0), ("a", "2", 0), ("b", "1", 0)])
    with db.session() as s:
        s.add_all([RequestLog(request_id="1", model="a", route="c", status=200,
                              cache_status="hit", cached=True),
                   RequestLog(request_id="2", model="a", route="c", status=200,
                              cache_status="miss")])
    result = run("cache", "stats", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["entries"] == 3 and data["hits"] == 1 and data["misses"] == 1
    assert data["hit_ratio"] == 0.5
    assert [m["model"] for m in data["models"]] == ["a", "b"]
    table = run("cache", "stats")
    assert table.exit_code == 0 and "50.0%" in table.output and "total" in table.output
    one = json.loads(run("cache", "stats", "--model", "b", "--json").output)
    assert one["entries"] == 1


def test_stats_on_an_empty_cache(db):
    result = run("cache", "stats")
    assert result.exit_code == 0, result.output


def test_clear_one_model_then_all(db):
    fill(db, [("a", "1", 0), ("a", "2", 0), ("b", "1", 0)])
    out = json.loads(run("cache", "clear", "--model", "a", "--json").output)
    assert out == {"deleted": 2, "model": "a"}
    result = run("cache", "clear")
    assert result.exit_code == 0 and "Cleared 1 entry (" in result.output
    assert json.loads(run("cache", "stats", "--json").output)["entries"] == 0


def test_purge_older_than(db):
    fill(db, [("a", "new", 1), ("a", "old", 8), ("b", "older", 40)])
    out = json.loads(run("cache", "purge", "--older-than", "7d", "--json").output)
    assert out["deleted"] == 2 and out["older_than_s"] == 7 * 86400
    assert json.loads(run("cache", "stats", "--json").output)["entries"] == 1


def test_purge_needs_a_valid_age(db):
    assert run("cache", "purge", "--older-than", "soon").exit_code == 2
    assert run("cache", "purge").exit_code == 2
