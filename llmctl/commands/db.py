"""`llmctl db`: schema migrations (Alembic) and the database's own shell."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from llmctl import context, output
from llmctl.output import JsonOption
from server.db import migrate
from server.db import shell as db_shell

app = typer.Typer(help="Database migrations and shell.", no_args_is_help=True)


def _db(ctx: typer.Context):
    db = context.get(ctx).db
    db.ping()
    return db


@app.command()
def upgrade(ctx: typer.Context,
            revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
            as_json: JsonOption = False):
    """Upgrade the schema (to head by default)."""
    db = _db(ctx)
    migrate.upgrade(db, revision)
    current = migrate.current_revision(db)
    output.emit({"database": db.safe_url, "revision": current}, as_json,
                lambda: f"{db.safe_url} is at revision {current}")


@app.command()
def downgrade(ctx: typer.Context,
              revision: Annotated[str, typer.Argument(help="Target revision, or base.")],
              as_json: JsonOption = False):
    """Downgrade the schema to REVISION."""
    db = _db(ctx)
    migrate.downgrade(db, revision)
    current = migrate.current_revision(db)
    output.emit({"database": db.safe_url, "revision": current}, as_json,
                lambda: f"{db.safe_url} is at revision {current or 'base'}")


@app.command()
def current(ctx: typer.Context, as_json: JsonOption = False):
    """Show the database's revision and the code's head."""
    db = _db(ctx)
    data = {"database": db.safe_url, "revision": migrate.current_revision(db),
            "head": migrate.head_revision()}
    data["up_to_date"] = data["revision"] == data["head"]
    output.emit(data, as_json, lambda: (
        f"{db.safe_url}: revision {data['revision'] or 'base'} (head {data['head']})"))


@app.command()
def history(as_json: JsonOption = False):
    """List the migrations."""
    revs = migrate.history()
    output.emit(revs, as_json, lambda: output.table(
        "Migrations", ["revision", "down", "message"],
        [[r["revision"], r["down_revision"], r["message"]] for r in revs]))


@app.command()
def revision(ctx: typer.Context,
             message: Annotated[str, typer.Option("-m", "--message", help="What it changes.")],
             as_json: JsonOption = False):
    """Autogenerate a migration from the ORM tables (database must be at head)."""
    db = _db(ctx)
    db.ensure_schema()  # autogenerate compares against a database at head
    rev = migrate.revision(db, message)
    output.emit({"revision": rev}, as_json, lambda: f"wrote migrations/versions/{rev}_*.py")


@app.command()
def shell(ctx: typer.Context):
    """Open the configured database in sqlite3 or psql (reads SQL from stdin when piped)."""
    db = context.get(ctx).db
    if db.is_sqlite:
        db.ensure_schema()  # the embedded default is created and migrated on first use
    argv, env = db_shell.shell_command(db.url)
    db.dispose()
    os.execve(argv[0], argv, env)
