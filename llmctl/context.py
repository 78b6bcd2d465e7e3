"""What every command shares: settings, built once per invocation, and the database."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import typer

from server.config import Settings, load_settings


@dataclass
class AppContext:
    # load_settings: a bad LLMCTL_*/alias value is one line naming the variable.
    settings: Settings = field(default_factory=load_settings)

    @cached_property
    def db(self):
        from server.db.engine import Database

        return Database.from_settings(self.settings)


def get(ctx: typer.Context) -> AppContext:
    root = ctx.find_root()
    if root.obj is None:
        root.obj = AppContext()
    return root.obj
