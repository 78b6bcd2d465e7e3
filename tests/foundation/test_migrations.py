"""`upgrade head` gives exactly the ORM's schema, and migrations round-trip."""

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from server.db import migrate
from server.db.engine import Database
from server.db.tables import Base


def _diff(db: Database) -> list:
    with db.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(ctx, Base.metadata)


def test_upgrade_head_matches_orm(db_url):
    db = Database(db_url)
    assert migrate.current_revision(db) is None
    migrate.upgrade(db, "head")
    assert migrate.current_revision(db) == migrate.head_revision()
    assert _diff(db) == []


def test_downgrade_base_then_upgrade_round_trips(db_url):
    db = Database(db_url)
    migrate.upgrade(db, "head")
    migrate.downgrade(db, "base")
    tables = set(inspect(db.engine).get_table_names()) - {"alembic_version"}
    assert tables == set()
    migrate.upgrade(db, "head")
    assert _diff(db) == []
    assert set(inspect(db.engine).get_table_names()) >= set(Base.metadata.tables)


def test_embedded_sqlite_migrates_itself(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'x' / 'llmctl.db'}")
    with db.session():
        pass
    assert migrate.current_revision(db) == migrate.head_revision()


def test_postgres_behind_is_refused_with_a_clear_message(cli, pg_url):
    result = cli("keys", "list", env={"LLMCTL_DATABASE_URL": pg_url})
    assert result.exit_code == 1
    assert "llmctl db upgrade" in result.output
    assert "Traceback" not in result.output
    assert cli("db", "upgrade", env={"LLMCTL_DATABASE_URL": pg_url}).exit_code == 0
    assert cli("keys", "list", "--json", env={"LLMCTL_DATABASE_URL": pg_url}).exit_code == 0


def test_db_commands(cli):
    assert cli("db", "upgrade").exit_code == 0
    result = cli("db", "current", "--json")
    assert '"up_to_date": true' in result.output
    assert "0001" in cli("db", "history").output
    assert cli("db", "downgrade", "base").exit_code == 0
    assert '"revision": null' in cli("db", "current", "--json").output
