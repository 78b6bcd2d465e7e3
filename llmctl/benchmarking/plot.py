"""PNG plots of a `bench serve` run: throughput and latency against concurrency."""

from __future__ import annotations

from pathlib import Path

from server.extras import require


def plot_serve(result: dict, path: str | Path) -> Path:
    """Two panels: output tok/s and requests/s (left), TTFT/TPOT/ITL/E2E p50 and p99 (right)."""
    matplotlib = require("matplotlib", "bench", "--plot")
    matplotlib.use("Agg")  # no display; safe in CI and over SSH
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter

    levels = sorted(result["levels"], key=lambda level: level["concurrency"])
    x = [level["concurrency"] for level in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    try:
        left.plot(x, [lv["output_throughput"] for lv in levels], "o-", label="output tok/s")
        left.set_ylabel("output tokens / s")
        left.set_ylim(bottom=0)
        rps = left.twinx()
        rps.plot(x, [lv["request_throughput"] for lv in levels], "^:", color="tab:green",
                 label="requests/s")
        rps.set_ylabel("requests / s")
        rps.set_ylim(bottom=0)
        handles = left.get_legend_handles_labels()
        extra = rps.get_legend_handles_labels()
        left.legend(handles[0] + extra[0], handles[1] + extra[1], loc="upper left")
        left.set_title("Throughput")

        for name, label, color in (("ttft", "TTFT", "tab:blue"), ("tpot", "TPOT", "tab:orange"),
                                   ("itl", "ITL", "tab:purple"), ("e2el", "E2E", "tab:red")):
            right.plot(x, [lv[f"median_{name}_ms"] for lv in levels], "o-", color=color,
                       label=f"{label} p50")
            right.plot(x, [lv[f"p99_{name}_ms"] for lv in levels], "x--", color=color,
                       alpha=0.6, label=f"{label} p99")
        right.set_ylabel("ms")
        right.set_yscale("log")
        # plain numbers (5, 20, 300) instead of 2×10^1
        right.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        right.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False,
                                                     minor_thresholds=(2, 0.5)))
        right.set_title("Latency")
        right.legend(fontsize="small", ncol=2)

        for ax in (left, right):
            ax.set_xlabel("concurrent requests")
            if len(x) > 1 and x[-1] / max(x[0], 1) >= 8:
                ax.set_xscale("log", base=2)
            ax.set_xticks(x, [str(v) for v in x])
            ax.grid(True, alpha=0.3)
        fig.suptitle(f"{result['model']} @ {result['url']}  "
                     f"(prompt {result['prompt_len']}, gen {result['gen_len']} tokens)",
                     fontsize="medium")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path
