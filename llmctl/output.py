"""Rendering for people (rich tables) and scripts (`--json`), in one place."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()
err_console = Console(stderr=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat() + ("Z" if value.tzinfo is None else "")
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)


def print_json(data: Any) -> None:
    # Plain print: rich would wrap long lines and break the JSON for parsers.
    print(json.dumps(data, indent=2, default=_default, sort_keys=False))


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    t = Table(title=title, header_style="bold")
    for column in columns:
        t.add_column(column)
    for row in rows:
        t.add_row(*["" if v is None else str(v) for v in row])
    return t


def emit(data: Any, as_json: bool, render: Callable[[], Any] | None = None) -> None:
    """`data` as JSON, or what `render()` returns (a rich renderable or str) for people."""
    if as_json or render is None:
        print_json(data)
    else:
        console.print(render())


def fail(message: str) -> None:
    # escape: a message's own brackets (`llmctl[eval]`, `models[1]`) are text, not markup.
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
