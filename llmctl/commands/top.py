"""`llmctl top`: a live view of a running gateway, read from its /metrics.

Per model: requests/s, generated tokens/s, running and waiting requests, median time
to first token and cache hit ratio; and the gateway's rejections by reason.
`--once --json` prints one window's figures (server/services/gatewaystats.py) for
scripts, and `--json` alone one such line per window: {url, interval_s, models:
[{model_name, requests_per_s, tokens_per_s, prompt_tokens_per_s, running, waiting,
ttft_p50_s, cache_hit_ratio}], rejections: {reason: count}, rejections_per_s}.
"""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.console import Group
from rich.live import Live

from llmctl import context, output
from llmctl.output import JsonOption
from server.errors import InvalidRequest
from server.services import gatewaystats

COLUMNS = ["model", "req/s", "tok/s", "running", "waiting", "TTFT p50", "cache hits"]


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render(data: dict):
    rows = [[m["model_name"], _cell(m["requests_per_s"], ".2f"), _cell(m["tokens_per_s"], ".1f"),
             _cell(m["running"], "d"), _cell(m["waiting"], "d"),
             "-" if m["ttft_p50_s"] is None else f"{m['ttft_p50_s'] * 1000:.0f} ms",
             "-" if m["cache_hit_ratio"] is None else f"{m['cache_hit_ratio']:.0%}"]
            for m in data["models"]]
    rejected = ", ".join(f"{r} {n}" for r, n in data["rejections"].items()) or "none"
    return Group(output.table(f"llmctl at {data['url']} (every {data['interval_s']:g}s)",
                              COLUMNS, rows),
                 f"rejections: {data['rejections_per_s']:.2f}/s; since start: {rejected}")


def top(
    ctx: typer.Context,
    url: Annotated[str | None, typer.Option(
        "--url", help="The gateway (default: http://LLMCTL_HOST:LLMCTL_PORT).")] = None,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between scrapes.")]
    = 2.0,
    once: Annotated[bool, typer.Option("--once", help="One window, then exit.")] = False,
    as_json: JsonOption = False,
):
    """Show a running gateway's live figures per model (from its /metrics)."""
    if interval <= 0:
        raise InvalidRequest("--interval must be more than 0", param="interval")
    if url is None:
        settings = context.get(ctx).settings
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        url = f"http://{host}:{settings.port}"
    if once:
        data = gatewaystats.sample(url, interval)
        output.emit(data, as_json, lambda: render(data))
        return
    try:
        if as_json:  # one JSON object per line, per window
            for data in _windows(url, interval):
                print(json.dumps(data), flush=True)
        else:
            with Live(console=output.console, auto_refresh=False) as live:
                for data in _windows(url, interval):
                    live.update(render(data), refresh=True)
    except KeyboardInterrupt:
        return


def _windows(url: str, interval: float):
    """Figures for each window of `interval` seconds, forever."""
    before, then = gatewaystats.scrape(url), time.monotonic()
    while True:
        time.sleep(interval)
        after, now = gatewaystats.scrape(url), time.monotonic()
        yield {"url": url, **gatewaystats.figures(before, after, now - then)}
        before, then = after, now
