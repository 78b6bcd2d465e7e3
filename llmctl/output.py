"""Rendering for people (rich tables) and scripts (`--json`), in one place."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.table import Table

# Wide enough that no table or line is ever cut when output goes to a pipe or file.
_PIPE_WIDTH = 10_000


class _Console(Console):
    """A console that renders at full width when not writing to a terminal: cron, CI
    and `make list-keys | grep` get whole values, not 80-column ellipses. An explicit
    COLUMNS still wins."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self.is_terminal or self._width is not None:
            return size
        return ConsoleDimensions(_PIPE_WIDTH, size.height)


console = _Console()
err_console = _Console(stderr=True)

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


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]],
          whole: Sequence[str] = ()) -> Table:
    """A rich table; columns named in `whole` (ids people copy) are never shortened,
    the others give way on a narrow terminal."""
    cells = [["" if v is None else str(v) for v in row] for row in rows]
    t = Table(title=title, header_style="bold")
    for i, column in enumerate(columns):
        if column in whole:
            widest = max((len(row[i]) for row in cells), default=0)
            t.add_column(column, no_wrap=True, min_width=max(widest, len(column)))
        else:
            t.add_column(column)
    for row in cells:
        t.add_row(*row)
    return t


def emit(data: Any, as_json: bool, render: Callable[[], Any] | None = None) -> None:
    """`data` as JSON, or what `render()` returns (a rich renderable or str) for people."""
    if as_json or render is None:
        print_json(data)
    else:
        console.print(render())


def fail(message: str, *, as_json: bool = False, error_type: str = "error",
         code: str | None = None, param: str | None = None, exit_code: int = 1) -> None:
    """One line on stderr; under `--json`, one JSON object a script can parse:
    {"error": {"message", "type", "code", "param", "exit_code"}}."""
    if as_json:
        print(json.dumps({"error": {"message": message, "type": error_type, "code": code,
                                    "param": param, "exit_code": exit_code}}),
              file=sys.stderr)
        return
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
