import pytest
from typer.testing import CliRunner

from llmctl.cli import app


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """Invoke `llmctl` in-process against a fresh home (embedded SQLite) by default."""
    monkeypatch.setenv("LLMCTL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LLMCTL_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def invoke(*args: str, env: dict | None = None):
        return runner.invoke(app, list(args), env=env)

    return invoke
