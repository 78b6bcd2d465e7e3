"""Alembic, driven from code: the `llmctl db` commands and auto-migration use this."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from server.db.engine import MIGRATIONS_DIR
from server.errors import InvalidRequest


def alembic_config(db) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["engine"] = db.engine
    return cfg


def head_revision() -> str:
    return ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()


def current_revision(db) -> str | None:
    with db.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _move(step, db, revision: str) -> None:
    # Alembic reports an unknown or unreachable target as a CommandError: that is
    # the user's input, not a crash ("Can't locate revision identified by 'zzz'").
    try:
        step(alembic_config(db), revision)
    except CommandError as exc:
        raise InvalidRequest(f"revision {revision!r}: {exc}", param="revision") from None


def upgrade(db, revision: str = "head") -> None:
    _move(command.upgrade, db, revision)


def downgrade(db, revision: str) -> None:
    _move(command.downgrade, db, revision)


def history() -> list[dict]:
    script = ScriptDirectory(str(MIGRATIONS_DIR))
    return [
        {"revision": s.revision, "down_revision": s.down_revision, "message": s.doc}
        for s in script.walk_revisions()
    ][::-1]


def revision(db, message: str) -> str:
    """Autogenerate a revision from the ORM, named with the next sequential number."""
    script = ScriptDirectory(str(MIGRATIONS_DIR))
    number = len(list(script.walk_revisions())) + 1
    rev_id = f"{number:04d}"
    slug = "_".join(message.lower().split())[:40]
    cfg = alembic_config(db)
    cfg.set_main_option("file_template", f"{rev_id}_{slug}")
    command.revision(cfg, message=message, autogenerate=True, rev_id=rev_id)
    return rev_id
