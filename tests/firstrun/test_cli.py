"""What a new user tripped over on the command line (issue 13), through CliRunner
on embedded SQLite: errors are one line (or one JSON object under --json) with a
stable exit code, bad settings name the variable as set, piped output is whole."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from llmctl import output
from llmctl.cli import app
from server.db.engine import Database
from server.services.logstore import RequestRecord, write_batch


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCTL_HOME", str(tmp_path / "home"))
    for var in ("LLMCTL_DATABASE_URL", "DATABASE_URL", "LLMCTL_REDIS_URL", "REDIS_URL",
                "REDIS_ENABLED", "LLMCTL_MODEL", "LLMCTL_MODELS_CONFIG", "MODEL_DEVICE",
                "LLMCTL_MODEL_DEVICE", "LLMCTL_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)  # no .env, no models.yaml
    return tmp_path / "home"


@pytest.fixture
def db(home):
    home.mkdir(parents=True, exist_ok=True)
    db = Database(f"sqlite:///{home / 'llmctl.db'}")
    db.ensure_schema()
    yield db
    db.dispose()


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def one_error_line(result) -> str:
    assert "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["upgrade", "downgrade"])
def test_unknown_revision_is_one_line_exit_2(db, command):
    result = run("db", command, "zzz")
    assert result.exit_code == 2
    assert "'zzz'" in one_error_line(result)


@pytest.mark.parametrize("variable, value, other", [
    ("MODEL_DEVICE", "bogus", "LLMCTL_MODEL_DEVICE"),
    ("LLMCTL_MODEL_DEVICE", "bogus", "MODEL_DEVICE="),
    ("LLMCTL_PORT", "notaport", None),
])
def test_bad_environment_names_the_variable_set(home, monkeypatch, variable, value, other):
    monkeypatch.setenv(variable, value)
    result = run("keys", "list")
    assert result.exit_code == 2
    line = one_error_line(result)
    assert f"{variable}='{value}'" in line
    if other:
        assert not line.startswith(f"error: {other}")


def test_bad_setting_in_dotenv_names_it(home, tmp_path):
    (tmp_path / ".env").write_text("MODEL_DEVICE=gpu\n")
    result = run("keys", "list")
    assert result.exit_code == 2 and "MODEL_DEVICE='gpu'" in one_error_line(result)


def test_errors_under_json_are_one_json_object_with_the_same_exit_code(db, monkeypatch):
    cases = [
        (("db", "upgrade", "zzz", "--json"), 2, "invalid_request_error"),
        (("keys", "show", "nobody", "--json"), 4, "not_found_error"),
        (("keys", "create", "--json"), 2, "usage_error"),  # --name missing
        (("keys", "create", "--name", "x", "--role", "root", "--json"), 2, "usage_error"),
    ]
    for args, code, kind in cases:
        result = run(*args)
        assert result.exit_code == code, (args, result.output)
        error = json.loads(result.stderr)["error"]
        assert error["type"] == kind and error["exit_code"] == code and error["message"]
        assert result.stdout == ""
    monkeypatch.setenv("MODEL_DEVICE", "bogus")
    error = json.loads(run("keys", "list", "--json").stderr)["error"]
    assert error["type"] == "invalid_configuration" and "MODEL_DEVICE" in error["message"]


def test_version_completion_and_choices(home):
    result = run("--version")
    assert result.exit_code == 0 and result.stdout.startswith("llmctl ")
    assert "--install-completion" in run("--help").stdout
    bad_role = run("keys", "create", "--name", "x", "--role", "root")
    assert bad_role.exit_code == 2 and "admin" in bad_role.output and "user" in bad_role.output
    bad_format = run("logs", "export", "--format", "xml")
    assert bad_format.exit_code == 2 and "jsonl" in bad_format.output


@pytest.mark.parametrize("args", [("cache", "purge"), ("logs", "prune")])
def test_older_than_is_spelled_as_the_option(db, args):
    result = run(*args, "--older-than", "soon")
    assert result.exit_code == 2
    assert "'--older-than'" in result.output and "older_than" not in result.output


def _log(db, *request_ids: str) -> None:
    write_batch(db, [RequestRecord(request_id=r, route="/v1/chat/completions", status=200,
                                   model="tiny") for r in request_ids])


def test_logs_show_takes_a_unique_prefix_and_says_when_ambiguous(db):
    _log(db, "req_aaaa1111", "req_aaaa2222", "req_bbbb3333")
    shown = json.loads(run("logs", "show", "req_bbbb", "--json").stdout)
    assert shown["request_id"] == "req_bbbb3333"
    ambiguous = run("logs", "show", "req_aaaa")
    assert ambiguous.exit_code == 2 and "ambiguous" in one_error_line(ambiguous)
    assert run("logs", "show", "req_cccc").exit_code == 4
    assert run("logs", "show", "req_%").exit_code == 4  # LIKE wildcards are literal


def test_a_reused_client_request_id_is_logged_twice(db):
    _log(db, "client-retry-7")
    _log(db, "client-retry-7")  # was an IntegrityError: request_id was unique
    assert len(json.loads(run("logs", "tail", "--json").stdout)) == 2
    assert json.loads(run("logs", "show", "client-retry-7", "--json").stdout)["id"] == 2


def test_logs_export_json_is_one_document(db):
    _log(db, "req_1", "req_2")
    document = json.loads(run("logs", "export", "--json").stdout)
    assert [e["request_id"] for e in document] == ["req_1", "req_2"]
    lines = run("logs", "export", "--format", "jsonl").stdout.splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == ["req_1", "req_2"]
    assert json.loads(run("logs", "export", "--format", "json", "--model", "none").stdout) == []


def test_request_ids_are_whole_on_a_narrow_terminal(db, monkeypatch):
    ids = ["req_" + "0123456789abcdef" * 2, "req_" + "fedcba9876543210" * 2]
    _log(db, *ids)
    for command in (("logs", "tail"), ("logs", "search")):
        screen = io.StringIO()
        monkeypatch.setattr(output, "console", output._Console(
            file=screen, width=100, force_terminal=True, color_system=None))
        assert run(*command).exit_code == 0
        assert all(i in screen.getvalue() for i in ids), screen.getvalue()


def test_piped_output_prints_whole_values(db):
    name = "a-rather-long-key-name-for-the-nightly-ci-job-that-rotates-credentials-weekly"
    assert run("keys", "create", "--name", name).exit_code == 0
    listed = run("keys", "list")  # CliRunner's stdout is not a terminal, like a pipe
    assert name in listed.stdout


def test_cache_clear_counts_one_entry_in_the_singular(db):
    from tests.cache.test_cli import fill

    fill(db, [("a", "1", 0)])
    assert "Cleared 1 entry (all models)." in run("cache", "clear").stdout


def test_eval_through_a_refused_url_fails_on_the_first_attempt(home):
    from evalsuite.remote_model import OpenAIModel
    from server.errors import UpstreamError

    attempts = []

    def refuse(request):
        attempts.append(request.url.path)
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    model = OpenAIModel("http://127.0.0.1:1", "tiny", transport=httpx.MockTransport(refuse))
    with pytest.raises(UpstreamError, match="Connection refused"):
        model._post("/completions", {"prompt": "hi"})
    assert len(attempts) == 1  # was 6, with 1+2+4+8+10 s between them

    fixtures = Path(__file__).resolve().parents[2] / "evalsuite" / "fixtures" / "gsm8k"
    result = run("eval", "gsm8k", "--model", "tiny", "--through", "http://127.0.0.1:1",
                 "--api-key", "k", "--limit", "1", "--data", str(fixtures))
    assert result.exit_code == 1 and "Connection refused" in result.stderr
