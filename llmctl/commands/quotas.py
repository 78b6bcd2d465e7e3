"""`llmctl quotas`: set and show a key's limits and monthly token quota.

`quotas show --json` prints one object per key (a list without KEY) in the shape of
server/services/quotas.py `QuotaStatus`: key_id, key_name, key_prefix, role, month,
monthly_token_quota (0 = unlimited), used_tokens, reserved_tokens,
remaining_tokens (null when unlimited), resets_at, rpm, tpm, max_concurrency
(effective values, 0 = unlimited) and own_limits (those set on the key itself).
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.text import Text

from llmctl import context, output
from llmctl.commands.keys import Conc, KeyRef, Monthly, Rpm, Tpm
from llmctl.output import JsonOption
from server.services import quotas as svc
from server.services import usage

app = typer.Typer(help="Set and show per-key limits and monthly token quotas.",
                  no_args_is_help=True)

Month = Annotated[str | None, typer.Option("--month", help="YYYY-MM (default: this month).")]
COLUMNS = ["key", "role", "month", "quota", "used", "reserved", "remaining", "rpm", "tpm",
           "conc"]


def _n(value: int | None) -> str:
    return "∞" if not value else f"{value:,}"


def _row(q: svc.QuotaStatus) -> list:
    own = set(q.own_limits)

    def mark(field: str, value: int) -> Text:  # role defaults are shown dim
        return Text(_n(value), style="" if field in own else "dim")

    return [q.key_name, q.role, q.month, mark("monthly_token_quota", q.monthly_token_quota),
            f"{q.used_tokens:,}", f"{q.reserved_tokens:,}",
            "∞" if q.remaining_tokens is None else f"{q.remaining_tokens:,}",
            mark("rpm", q.rpm), mark("tpm", q.tpm), mark("max_concurrency", q.max_concurrency)]


@app.command("set")
def set_(ctx: typer.Context, key: KeyRef, monthly_tokens: Monthly = None, rpm: Rpm = None,
         tpm: Tpm = None, max_concurrency: Conc = None, as_json: JsonOption = False):
    """Change a key's limits (0 = unlimited; options not given are left alone)."""
    app_ctx = context.get(ctx)
    status = svc.set_limits(app_ctx.db, app_ctx.settings, key, monthly_token_quota=monthly_tokens,
                            rpm=rpm, tpm=tpm, max_concurrency=max_concurrency)
    output.emit(status.to_dict(), as_json, lambda: output.table(None, COLUMNS, [_row(status)]))


@app.command()
def show(ctx: typer.Context,
         key: Annotated[str | None, typer.Argument(help="Key id, name or prefix (default: all).")]
         = None, month: Month = None, as_json: JsonOption = False):
    """Show limits and month-to-date quota for one key or every active key."""
    app_ctx = context.get(ctx)
    month = usage.parse_month(month) or svc.current_month()
    if key is not None:
        status = svc.get_quota(app_ctx.db, app_ctx.settings, key, month)
        output.emit(status.to_dict(), as_json,
                    lambda: output.table(None, COLUMNS, [_row(status)]))
        return
    statuses = svc.list_quotas(app_ctx.db, app_ctx.settings, month)
    output.emit([s.to_dict() for s in statuses], as_json,
                lambda: output.table(f"Quotas, {month} (dim: role default)", COLUMNS,
                                     [_row(s) for s in statuses]))
