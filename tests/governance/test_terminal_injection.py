"""Text that API users control (model names, key names, prompts and outputs stored with
LLMCTL_LOG_PROMPTS, error messages quoting input) reaches the terminal literally: Rich
markup is not interpreted (`"model": "x[/]"` used to crash `logs show`) and control
characters (escape sequences, bell, carriage return, bidi overrides) are replaced."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from llmctl import output
from llmctl.cli import app
from server.db.engine import Database
from server.db.tables import RequestLog, utcnow
from server.services import keys

MODEL = "x[/]"
KEY_NAME = "[bold red]ops[/]\x1b[31m"
PROMPT = "hi \x1b]0;owned\x07\x1b[2J[link=http://evil]click[/link]\rover\u202eevil"
OUTPUT = "[/bold]\x9b31m done"
CONTROLS = ("\x1b", "\x07", "\r", "\x9b", "\u202e")


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCTL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LLMCTL_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(output.console, "width", 400)  # no cell is cut short

    def invoke(*args, code=0):
        result = CliRunner().invoke(app, list(args))
        assert result.exit_code == code, (result.output, result.exception)
        return result.output

    invoke("keys", "list")  # creates the database
    db = Database(f"sqlite:///{tmp_path / 'home' / 'llmctl.db'}")
    key = keys.create_key(db, name=KEY_NAME, models=[MODEL]).key
    with db.session() as s:
        s.add(RequestLog(request_id="r1", created_at=utcnow(), key_id=key.id, model=MODEL,
                         route="/v1/completions", status=200, prompt_tokens=3,
                         completion_tokens=4, charged_tokens=7, latency_ms=1.0, prompt=PROMPT,
                         output=OUTPUT, error_message="[red]fake[/red]"))
    db.dispose()
    return invoke


def _literal(text: str, *expected: str) -> None:
    for char in CONTROLS:
        assert char not in text, repr(text)
    for piece in expected:
        assert piece in text, (piece, text)


def test_logs_show_search_and_tail_print_stored_text_literally(run):
    shown = run("logs", "show", "r1")
    _literal(shown, MODEL, "[link=http://evil]click[/link]", "[/bold]", "[red]fake[/red]",
             "[bold red]ops[/]")
    _literal(run("logs", "search"), MODEL, "[bold red]ops[/]")
    _literal(run("logs", "tail"), MODEL)
    # --json keeps the stored text exactly (JSON escapes the control characters).
    entry = json.loads(run("logs", "show", "r1", "--json"))
    assert entry["prompt"] == PROMPT and entry["model"] == MODEL


def test_key_and_quota_tables_print_names_literally(run):
    for args in (("keys", "list"), ("keys", "show", "1"), ("quotas", "show")):
        _literal(run(*args), "[bold red]ops[/]")
    assert MODEL in run("keys", "list")


def test_error_messages_quoting_input_are_literal(run):
    result = CliRunner().invoke(app, ["keys", "show", "[/]\x1b[2J"])
    assert result.exit_code == 4
    _literal(result.output, "error: no key with id, name or prefix '[/]")
