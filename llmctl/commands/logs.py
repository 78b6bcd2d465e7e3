"""`llmctl logs`: tail, search, show, export and prune the request log.

`search --json` prints {items: [entry, ...], next_cursor, limit}; pass
`--cursor NEXT_CURSOR` for the next page. An entry is documented in
server/services/logquery.py. `tail --json` prints a list of entries, and with
`-f` one entry per line (JSON lines) as they are written.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Group
from rich.text import Text

from llmctl import context, output
from llmctl.output import JsonOption
from llmctl.params import ExportFormat, duration
from server.services import logquery as svc

app = typer.Typer(help="Search, follow, export and prune request logs.", no_args_is_help=True)

Key = Annotated[str | None, typer.Option("--key", help="Key id, name or prefix.")]
Model = Annotated[str | None, typer.Option("--model", help="Model name.")]
Status = Annotated[str | None, typer.Option(
    "--status", help="A code (429), a class (4xx), 'ok' or 'error'.")]
Since = Annotated[str | None, typer.Option(
    "--since", help="ISO date-time or an age: 15m, 24h, 7d.")]
Until = Annotated[str | None, typer.Option("--until", help="ISO date-time or an age.")]

COLUMNS = ["time", "request id", "key", "model", "route", "status", "prompt", "completion",
           "charged", "ms", "cache", "error"]


def _row(e: dict) -> list:
    status = e["status"]
    colour = "green" if status < 400 else "yellow" if status < 500 else "red"
    return [e["created_at"][:19].replace("T", " "), e["request_id"], e["key_name"] or e["key_id"],
            e["model"], e["route"], Text(str(status), style=colour), e["prompt_tokens"],
            e["completion_tokens"], e["charged_tokens"], f"{e['latency_ms']:.0f}",
            e["cache_status"], e["error_type"]]


def _table(entries: list[dict]):
    # Request ids are what people copy into `logs show`: never cut them.
    return output.table(None, COLUMNS, [_row(e) for e in entries], whole=("request id",))


@app.command()
def search(ctx: typer.Context, key: Key = None, model: Model = None, status: Status = None,
           since: Since = None, until: Until = None,
           limit: Annotated[int, typer.Option("--limit", help="Entries per page.")] = 50,
           cursor: Annotated[str | None, typer.Option("--cursor",
                                                      help="next_cursor of the page before.")]
           = None, as_json: JsonOption = False):
    """Find request-log entries, newest first, one page at a time."""
    page = svc.search(context.get(ctx).db, key=key, model=model, status=status, since=since,
                      until=until, limit=limit, cursor=cursor)

    def render():
        table = _table(page["items"])
        more = f"\nMore: --cursor {page['next_cursor']}" if page["next_cursor"] else ""
        return table if not more else Group(table, more)

    output.emit(page, as_json, render)


@app.command()
def show(ctx: typer.Context,
         request_id: Annotated[str, typer.Argument(
             help="The x-request-id of the request, or a unique prefix of it.")],
         as_json: JsonOption = False):
    """Show one logged request in full."""
    entry = svc.show(context.get(ctx).db, request_id)
    output.emit(entry, as_json, lambda: Text("\n").join(
        Text.assemble((f"{k:>17}", "bold"), "  ", output.plain(v)) for k, v in entry.items()))


@app.command()
def tail(ctx: typer.Context,
         n: Annotated[int, typer.Option("-n", "--lines", help="How many to show.")] = 20,
         follow: Annotated[bool, typer.Option("-f", "--follow",
                                              help="Keep printing new entries.")] = False,
         interval: Annotated[float, typer.Option("--interval",
                                                 help="Seconds between polls with -f.")] = 1.0,
         as_json: JsonOption = False):
    """Show the latest entries; with -f, follow new ones until interrupted."""
    db = context.get(ctx).db
    entries = svc.tail(db, n)
    if not follow:
        output.emit(entries, as_json, lambda: _table(entries))
        return
    follower = svc.Follower(db, entries[-1]["id"] if entries else 0)
    try:
        while True:
            for e in entries:
                if as_json:
                    print(json.dumps(e), flush=True)
                else:
                    output.console.print(Text(" ").join(map(output.plain, _row(e))),
                                         highlight=False)
            time.sleep(interval)
            entries = follower.poll()
    except KeyboardInterrupt:
        pass


@app.command()
def export(ctx: typer.Context,
           fmt: Annotated[ExportFormat | None, typer.Option(
               "--format", help="jsonl (one entry a line), json (one array) or csv. "
               "Default: json with --json to stdout, else jsonl.")] = None,
           out: Annotated[Path | None, typer.Option("--output", "-o",
                                                    help="File (default: stdout).")] = None,
           key: Key = None, model: Model = None, status: Status = None, since: Since = None,
           until: Until = None, as_json: JsonOption = False):
    """Write matching entries, oldest first, as JSON lines, one JSON document or CSV.

    With --output, --json prints a summary of what was written."""
    db = context.get(ctx).db
    filters = dict(key=key, model=model, status=status, since=since, until=until)
    # A script that asks for --json on stdout gets one JSON document.
    fmt = (fmt or (ExportFormat.json if as_json and out is None else ExportFormat.jsonl)).value
    if out is None:
        svc.export(db, sys.stdout, fmt, **filters)
        return
    with open(out, "w", newline="") as fh:
        count = svc.export(db, fh, fmt, **filters)
    output.emit({"exported": count, "format": fmt, "path": str(out)}, as_json,
                lambda: f"Exported {count:,} entries to {output.safe(out)}.")


@app.command()
def prune(ctx: typer.Context,
          older_than: Annotated[timedelta, typer.Option(
              "--older-than", parser=duration, metavar="AGE", help="Age, e.g. 90d, 12w.")],
          dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count.")] = False,
          as_json: JsonOption = False):
    """Delete entries older than an age (usage totals are kept)."""
    result = svc.prune(context.get(ctx).db, older_than, dry_run=dry_run)
    output.emit(result, as_json, lambda: (
        f"Would delete {result['matched']:,} entries" if dry_run
        else f"Deleted {result['deleted']:,} entries") + f" from before {result['before']}.")
