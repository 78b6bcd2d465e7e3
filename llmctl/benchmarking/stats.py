"""Summary statistics, computed the way vLLM's `bench serve` computes them.

vLLM reports mean, median, std and percentiles with numpy's defaults (linear
interpolation between closest ranks), and 0 for an empty sample
(vllm/benchmarks/serve.py, `calculate_metrics`). Doing the same keeps our figures
comparable to theirs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PERCENTILES = (90, 99)


def summarize_ms(name: str, seconds: Sequence[float]) -> dict[str, float]:
    """`mean_<name>_ms`, `median_…`, `std_…`, `p90_…`, `p99_…` of a sample in seconds."""
    values = np.asarray(seconds if len(seconds) else [0.0], dtype=float) * 1000.0
    out = {
        f"mean_{name}_ms": float(np.mean(values)),
        f"median_{name}_ms": float(np.median(values)),
        f"std_{name}_ms": float(np.std(values)),
    }
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = float(np.percentile(values, p))
    return out
