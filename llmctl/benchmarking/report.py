"""Rich tables for benchmark results (the JSON documents of serve.py and device.py)."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text


def _f(value: float, digits: int = 2) -> str:
    return f"{value:,.{digits}f}"


_LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT (excl. 1st token)"), ("itl", "ITL"),
              ("e2el", "E2E latency"))


def serve_table(result: dict) -> Group:
    """One column per concurrency level, rows in vLLM's order."""
    levels = result["levels"]
    rate = result["request_rate"]
    caption = (f"prompt {result['prompt_len']} {result['prompt_len_unit']}, "
               f"{result['gen_len']} new tokens; "
               f"{'no arrival rate' if rate is None else f'Poisson {rate} req/s'}")
    table = Table(title=f"bench serve · {result['model']} @ {result['url']}", caption=caption,
                  header_style="bold", title_justify="left", caption_justify="left")
    table.add_column("concurrency", style="bold")
    for level in levels:
        table.add_column(str(level["concurrency"]), justify="right")

    def row(label: str, key: str, fmt=_f) -> None:
        table.add_row(label, *[fmt(level[key]) for level in levels])

    row("requests ok", "completed", str)
    row("requests failed", "failed", str)
    row("duration (s)", "duration_s")
    row("input tokens", "total_input_tokens", str)
    row("output tokens", "total_output_tokens", str)
    row("request throughput (req/s)", "request_throughput")
    row("output throughput (tok/s)", "output_throughput")
    row("total throughput (tok/s)", "total_token_throughput")
    for key, label in _LATENCIES:
        table.add_section()
        row(f"{label} mean (ms)", f"mean_{key}_ms")
        row(f"{label} p50 (ms)", f"median_{key}_ms")
        row(f"{label} p99 (ms)", f"p99_{key}_ms")
    parts: list = [table]
    for level in levels:
        for err in level["errors"]:
            parts.append(Text(f"concurrency {level['concurrency']}: {err['count']}× "
                              f"{err['message']}", style="red"))
    if any(not level["usage_reported"] for level in levels if level["completed"]):
        parts.append(Text("note: the server sent no usage; output tokens are counted as "
                          "stream chunks", style="yellow"))
    return Group(*parts)


def device_table(result: dict) -> Table:
    title = (f"bench device · {result['model']} ({result['parameters'] / 1e6:.1f}M params) · "
             f"{result['device']} {result['dtype']}")
    table = Table(title=title, header_style="bold", title_justify="left",
                  caption_justify="left")
    for column in ("batch", "prefill tok/s", "prefill ms", "decode tok/s", "ms/step",
                   "peak MiB"):
        table.add_column(column, justify="right")
    for r in result["results"]:
        table.add_row(str(r["batch_size"]), _f(r["prefill_tokens_per_s"], 1),
                      _f(r["prefill_s"] * 1000, 1), _f(r["decode_tokens_per_s"], 1),
                      _f(r["decode_step_ms"], 1), _f(r["peak_memory_mb"], 0))
    table.caption = (f"prompt {result['prompt_len']} tokens, {result['gen_len']} decode steps; "
                     f"peak memory: {result['memory_measure'].replace('_', ' ')}")
    return table
