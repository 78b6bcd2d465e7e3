"""`llmctl cache`: stats, clear and purge of the completion cache."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

import typer

from llmctl import context, output
from llmctl.output import JsonOption
from llmctl.params import duration
from server.services import cache as svc

app = typer.Typer(help="Inspect and empty the completion cache.", no_args_is_help=True)

Model = Annotated[str | None, typer.Option("--model", help="Only this model.")]

COLUMNS = ["model", "entries", "size", "hits", "misses", "bypasses", "hit ratio"]


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _entries(n: int) -> str:
    return f"{n} entry" if n == 1 else f"{n} entries"


def _ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.1%}"


def _row(d: dict) -> list:
    return [d["model"], d["entries"], _size(d["bytes"]), d["hits"], d["misses"], d["bypasses"],
            _ratio(d["hit_ratio"])]


def _redis_note(result: dict) -> str:
    redis = result.get("redis")
    if not redis:
        return ""
    if "error" in redis:
        return (f"\n[yellow]warning:[/yellow] {output.safe(redis['error'])}; its copies "
                "expire by TTL.")
    return f" Redis: {redis['deleted']} removed."


@app.command()
def stats(ctx: typer.Context, model: Model = None, as_json: JsonOption = False):
    """Show entries, bytes, hits, misses and hit ratio, by model."""
    data = svc.stats(context.get(ctx).db, model=model)

    def render():
        t = output.table("Completion cache", COLUMNS, [_row(d) for d in data["models"]])
        if len(data["models"]) != 1:
            t.add_row(*map(output.plain, _row({**data, "model": "total"})), style="bold")
        return t

    output.emit(data, as_json, render)


@app.command()
def clear(ctx: typer.Context, model: Model = None, as_json: JsonOption = False):
    """Delete every cached completion (or one model's)."""
    app_ctx = context.get(ctx)
    result = svc.clear(app_ctx.db, model=model, redis_url=app_ctx.settings.redis_active_url)
    what = f"model {output.safe(model)}" if model else "all models"
    output.emit(result, as_json,
                lambda: f"Cleared {_entries(result['deleted'])} ({what}).{_redis_note(result)}")


@app.command()
def purge(
    ctx: typer.Context,
    older_than: Annotated[timedelta, typer.Option(
        "--older-than", parser=duration, metavar="AGE",
        help="Age, e.g. 7d, 12h: entries created before.")],
    as_json: JsonOption = False,
):
    """Delete entries created longer ago than --older-than."""
    app_ctx = context.get(ctx)
    result = svc.purge(app_ctx.db, older_than=older_than,
                       redis_url=app_ctx.settings.redis_active_url)
    output.emit(result, as_json, lambda: (
        f"Purged {_entries(result['deleted'])} created before "
        f"{result['cutoff']:%Y-%m-%d %H:%M:%S} UTC.{_redis_note(result)}"))
