"""Rendering for people (rich tables) and scripts (`--json`), in one place.

Stored text (key and model names, prompts, outputs, error messages that quote input)
is what API users control: it is never read as Rich markup and never reaches the
terminal with control characters (`plain`, `safe`; every table cell and `fail`)."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.table import Table
from rich.text import Text

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


# C0 and C1 controls but tab and newline, DEL, and the bidirectional overrides: they
# could move the cursor, retitle or reprogram the terminal, or reorder what is shown.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e"
                      "\u2066-\u2069]")


def clean(value: Any) -> str:
    """`value` as text, each control character shown as U+FFFD."""
    return _CONTROL.sub("\ufffd", "" if value is None else str(value))


def plain(value: Any) -> Text:
    """Stored text for a rich renderable: literal (no markup) and clean. A `Text` (styled
    by our own code) is kept as it is."""
    return value if isinstance(value, Text) else Text(clean(value))


def safe(value: Any) -> str:
    """Stored text to put inside a markup string of our own."""
    return escape(clean(value))


def print_json(data: Any) -> None:
    # Plain print: rich would wrap long lines and break the JSON for parsers.
    print(json.dumps(data, indent=2, default=_default, sort_keys=False))


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]],
          whole: Sequence[str] = ()) -> Table:
    """A rich table, every cell and the title literal (see `plain`; style a cell by
    passing a `Text`). Columns named in `whole` (ids people copy) are never shortened,
    the others give way on a narrow terminal."""
    cells = [[plain(v) for v in row] for row in rows]
    t = Table(title=None if title is None else plain(title), header_style="bold")
    for i, column in enumerate(columns):
        if column in whole:
            widest = max((row[i].cell_len for row in cells), default=0)
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
    """One line on stderr, printed literally (`safe`); under `--json`, one JSON object a
    script can parse: {"error": {"message", "type", "code", "param", "exit_code"}}."""
    if as_json:
        print(json.dumps({"error": {"message": message, "type": error_type, "code": code,
                                    "param": param, "exit_code": exit_code}}),
              file=sys.stderr)
        return
    err_console.print(f"[red]error:[/red] {safe(message)}", highlight=False, soft_wrap=True)
