"""`llmctl quotas|usage|logs` on embedded SQLite: outputs and exit codes."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from llmctl.cli import app
from server.db.engine import Database
from server.services import keys
from tests.governance.test_logs import add_logs


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCTL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LLMCTL_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)

    def invoke(*args, code=0):
        result = CliRunner().invoke(app, list(args))
        assert result.exit_code == code, result.output
        return result

    return invoke


@pytest.fixture
def db(tmp_path, run):
    run("keys", "list")  # creates and migrates the embedded database
    db = Database(f"sqlite:///{tmp_path / 'home' / 'llmctl.db'}")
    yield db
    db.dispose()


def test_logs_commands(run, db, tmp_path):
    key = keys.create_key(db, name="ops").key
    add_logs(db, key.id, 5)
    tail = json.loads(run("logs", "tail", "-n", "2", "--json").output)
    assert [e["request_id"] for e in tail] == ["r3", "r4"]
    assert "r4" in run("logs", "tail").output
    assert "r0" in run("logs", "search", "--key", "ops", "--status", "ok").output
    path = tmp_path / "out.csv"
    summary = json.loads(run("logs", "export", "--format", "csv", "-o", str(path), "--json")
                         .output)
    assert summary == {"exported": 5, "format": "csv", "path": str(path)}
    assert len(path.read_text().splitlines()) == 6
    assert len(run("logs", "export").output.splitlines()) == 5
    pruned = json.loads(run("logs", "prune", "--older-than", "30m", "--dry-run", "--json").output)
    assert pruned["matched"] == 5 and pruned["dry_run"] is True
    assert "Deleted 5" in run("logs", "prune", "--older-than", "30m").output
    run("logs", "show", "r0", code=4)
    run("logs", "search", "--status", "teapot", code=2)
    run("logs", "export", "--format", "xml", code=2)


def test_quotas_and_usage_commands(run, db):
    keys.create_key(db, name="team")
    out = json.loads(run("quotas", "set", "team", "--monthly-tokens", "100", "--rpm", "5",
                         "--json").output)
    assert (out["monthly_token_quota"], out["rpm"], out["remaining_tokens"]) == (100, 5, 100)
    assert "team" in run("quotas", "show").output
    run("quotas", "show", "nobody", code=4)
    run("quotas", "set", "team", "--rpm", "-1", code=2)
    assert json.loads(run("usage", "--key", "team", "--json").output)["rows"] == []
    assert "total" in run("usage", "--by", "month", "--month", "all").output
    run("usage", "--by", "colour", code=2)
    run("usage", "--month", "May", code=2)
