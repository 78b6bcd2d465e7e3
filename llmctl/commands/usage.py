"""`llmctl usage`: token usage per key, month and model.

`--json` prints the report of server/services/usage.py: {month, key, model, by,
rows: [{key_id, key_name, month, model, requests, cached_requests, prompt_tokens,
completion_tokens, total_tokens, charged_tokens}], totals: {...}}.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.text import Text

from llmctl import context, output
from llmctl.output import JsonOption
from server.services import usage as svc

COLUMNS = ["key", "month", "model", "requests", "cached", "prompt", "completion", "total",
           "charged"]


def usage(
    ctx: typer.Context,
    key: Annotated[str | None, typer.Option("--key", help="Key id, name or prefix.")] = None,
    month: Annotated[str | None, typer.Option(
        "--month", help="YYYY-MM, or 'all' (default: this month).")] = None,
    by: Annotated[str, typer.Option("--by", help="Rows per key, model or month.")] = "key",
    model: Annotated[str | None, typer.Option("--model", help="Only this model.")] = None,
    as_json: JsonOption = False,
):
    """Show token usage per key, month and model."""
    report = svc.usage_report(context.get(ctx).db, key=key, month=month, model=model, by=by)

    def render():
        rows = [[r["key_name"] or ("*" if by == "month" else r["key_id"]), r["month"],
                 r["model"] or "*", *(f"{r[c]:,}" for c in (
                     "requests", "cached_requests", "prompt_tokens", "completion_tokens",
                     "total_tokens", "charged_tokens"))] for r in report["rows"]]
        t = report["totals"]
        rows.append([Text("total", style="bold"), report["month"] or "all", "",
                     *(f"{t[c]:,}" for c in ("requests", "cached_requests", "prompt_tokens",
                                             "completion_tokens", "total_tokens",
                                             "charged_tokens"))])
        return output.table(f"Usage, {report['month'] or 'all months'}", COLUMNS, rows)

    output.emit(report, as_json, render)
