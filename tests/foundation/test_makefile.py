"""The Makefile's targets, run through real `make`.

Targets that need the virtualenv run against the one running these tests
(VENV=sys.prefix) with its install stamp marked old (`-o`): make then never
reinstalls into it, whatever pyproject.toml's timestamp says. PYTHONPATH points
at this checkout, so its code is what runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from server.db import migrate
from server.db.engine import Database
from server.db.shell import shell_command
from tests.plugins.postgres import pg_tool

ROOT = Path(__file__).resolve().parents[2]
MAKE = shutil.which("make")
LIFECYCLE = ["up", "down", "restart", "logs", "db-shell", "nuke"]

pytestmark = pytest.mark.skipif(MAKE is None, reason="make is not installed")


def make(*args: str, cwd: Path = ROOT, input: str | None = None, venv: str = sys.prefix,
         **env: str):
    base = {k: v for k, v in os.environ.items()
            if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "LLMCTL_DATABASE_URL")}
    base["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [MAKE, "--no-print-directory", f"VENV={venv}", "-o", f"{venv}/.installed", *args],
        cwd=cwd, input=input, capture_output=True, text=True, timeout=120,
        env={**base, **env})


def test_lifecycle_targets_are_in_help_and_readme():
    listed = dict(re.findall(r"^  (\S+)\s+(.+)$", make("help").stdout, re.M))
    readme = (ROOT / "README.md").read_text()
    for target in LIFECYCLE + ["upgrade", "downgrade", "clean"]:
        assert target in listed, target
        assert f"`make {target}" in readme, target
    dry = make("-n", "up", "GPU=1").stdout
    assert ("docker compose -f compose/docker-compose.yml -f compose/docker-compose.gpu.yml "
            "up --build --detach --wait") in dry or "compose/.env is missing" in dry


def test_db_shell_on_the_embedded_default_answers_piped_sql(tmp_path):
    home = tmp_path / "home"
    done = make("db-shell", input="select version_num from alembic_version;\n"
                "select count(*) from api_keys;\n", LLMCTL_HOME=str(home))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-2:] == [migrate.head_revision(), "0"]
    assert (home / "llmctl.db").exists()  # the configured database, created on first use


@pytest.mark.postgres
def test_db_shell_opens_psql_on_a_postgres_url(pg_url):
    db = Database(pg_url)
    migrate.upgrade(db, "head")
    db.dispose()
    done = make("db-shell", input="select current_database();\n",
                LLMCTL_DATABASE_URL=pg_url)
    assert done.returncode == 0, done.stderr
    assert pg_url.rsplit("/", 1)[1] in done.stdout


def test_downgrade_and_upgrade_round_trip_on_the_embedded_database(tmp_path):
    home = tmp_path / "home"
    db = Database(f"sqlite:///{home / 'llmctl.db'}")
    head = migrate.head_revision()
    previous = migrate.history()[-1]["down_revision"]
    assert make("upgrade", LLMCTL_HOME=str(home)).returncode == 0
    assert migrate.current_revision(db) == head
    down = make("downgrade", LLMCTL_HOME=str(home))
    assert down.returncode == 0, down.stderr
    assert migrate.current_revision(db) == previous
    assert make("upgrade", LLMCTL_HOME=str(home)).returncode == 0
    assert migrate.current_revision(db) == head
    db.dispose()


def test_nuke_asks_before_deleting_volumes_unless_forced():
    fake = "COMPOSE=echo COMPOSE"
    refused = make(fake, "nuke", input="n\n")
    assert refused.returncode != 0 and "COMPOSE down" not in refused.stdout
    assert "[y/N]" in refused.stdout and "nothing deleted" in refused.stdout
    no_tty = make(fake, "nuke", input="")
    assert no_tty.returncode != 0 and "COMPOSE down" not in no_tty.stdout
    for answer, flags in (("y\n", ()), (None, ("FORCE=1",))):
        done = make(fake, "nuke", *flags, input=answer)
        assert done.returncode == 0
        assert "COMPOSE down --volumes --remove-orphans" in done.stdout


def test_clean_removes_built_models(tmp_path):
    """In a copy, with its own VENV: `make clean` deletes the virtualenv it is given."""
    shutil.copy(ROOT / "Makefile", tmp_path)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "small" / "x").mkdir(parents=True)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / "keep.txt").write_text("source")
    assert make("clean", cwd=tmp_path, venv=".venv").returncode == 0
    assert not (tmp_path / "models").exists() and not (tmp_path / ".venv").exists()
    assert (tmp_path / "keep.txt").exists()


def test_make_test_names_the_missing_package(tmp_path):
    """`make test` stops before pytest with one line naming the package to install."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = {"PATH": str(bin_dir), "PG_BIN_GLOB": str(tmp_path / "none")}
    done = make("test", **env)
    assert done.returncode != 0
    assert done.stdout.splitlines()[-1] == (
        "make test needs redis-server: apt-get install redis-server")
    (bin_dir / "redis-server").symlink_to("/bin/true")
    done = make("test", **env)
    assert done.returncode != 0
    assert done.stdout.splitlines()[-1] == (
        "make test needs PostgreSQL's initdb and pg_ctl: apt-get install postgresql")


def test_the_postgres_plugin_finds_debians_tools_off_path(tmp_path, monkeypatch):
    for version, tools in (("9.6", ["initdb"]), ("15", ["initdb", "pg_ctl"]), ("16", [])):
        bin_dir = tmp_path / version / "bin"
        bin_dir.mkdir(parents=True)
        for tool in tools:
            (bin_dir / tool).symlink_to("/bin/true")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    pattern = str(tmp_path / "*" / "bin")
    assert pg_tool("initdb", pattern) == str(tmp_path / "15" / "bin" / "initdb")
    with pytest.raises(ValueError, match=r"^PostgreSQL's postgres is not installed: "
                                         r"apt-get install -y postgresql$"):
        pg_tool("postgres", pattern)


def test_psql_gets_the_password_from_the_environment_never_argv():
    argv, env = shell_command("postgresql+psycopg://llmctl:s3cret@db:5433/llmctl?sslmode=require")
    assert argv[0].endswith("psql")
    assert argv[1:] == ["postgresql://llmctl@db:5433/llmctl?sslmode=require"]
    assert env["PGPASSWORD"] == "s3cret"
