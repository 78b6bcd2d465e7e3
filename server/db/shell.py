"""The configured database's own interactive shell: sqlite3 or psql.

Used by `llmctl db shell` (and `make db-shell`). The password of a server
database goes to psql through PGPASSWORD, never on the command line, where
`ps` would show it.
"""

from __future__ import annotations

import os
import shutil

from sqlalchemy.engine import URL, make_url

from server.errors import ConfigError

# The Debian/Ubuntu package that provides each client.
PACKAGES = {"sqlite3": "sqlite3", "psql": "postgresql-client"}


def shell_command(url: str) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that open a shell on the database at `url`."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    env = dict(os.environ)
    if backend == "sqlite":
        tool, args = "sqlite3", [parsed.database or ":memory:"]
    elif backend == "postgresql":
        if parsed.password is not None:
            env["PGPASSWORD"] = parsed.password
        # libpq's own URI form (no driver suffix, no password) as psql's dbname.
        libpq = URL.create("postgresql", username=parsed.username, host=parsed.host,
                           port=parsed.port, database=parsed.database, query=parsed.query)
        tool, args = "psql", [libpq.render_as_string(hide_password=False)]
    else:
        raise ConfigError(f"no shell for {backend} databases (sqlite and postgresql have one)")
    binary = shutil.which(tool)
    if binary is None:
        raise ConfigError(f"{tool} is not installed: apt-get install {PACKAGES[tool]}")
    return [binary, *args], env
