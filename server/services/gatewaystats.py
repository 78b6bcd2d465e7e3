"""Per-model figures of a running gateway, read from its /metrics (for `llmctl top`).

Two scrapes `seconds` apart give rates; gauges come from the second. Where a
window saw nothing (no first token, no cache lookup), the figure is the one since
the gateway started, so an idle gateway still shows its history. Quantiles are
interpolated within buckets the way Prometheus's histogram_quantile does.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict

import httpx
from prometheus_client.parser import text_string_to_metric_families

from server.errors import Unavailable

# (sample name, labels as a sorted tuple) -> value
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, timeout: float = 10.0) -> Samples:
    """One GET of `url`/metrics, parsed."""
    target = url.rstrip("/") + "/metrics"
    try:
        response = httpx.get(target, timeout=timeout)
    except httpx.HTTPError as exc:
        raise Unavailable(f"cannot reach {target}: {exc}") from None
    if response.status_code != 200:
        raise Unavailable(f"{target} answered HTTP {response.status_code}")
    try:
        families = list(text_string_to_metric_families(response.text))
    except ValueError as exc:
        raise Unavailable(f"{target} is not Prometheus metrics: {exc}") from None
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in families for s in f.samples}


def _by_model(samples: Samples, name: str, **match: str) -> dict[str, float]:
    """Sum of samples called `name` per model_name (labels in `match` must agree)."""
    out: dict[str, float] = defaultdict(float)
    for (sample, labels), value in samples.items():
        if sample != name:
            continue
        d = dict(labels)
        if d.get("model_name") and all(d.get(k) == v for k, v in match.items()):
            out[d["model_name"]] += value
    return out


def _buckets(samples: Samples, name: str) -> dict[str, dict[float, float]]:
    out: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for (sample, labels), value in samples.items():
        d = dict(labels)
        if sample == name + "_bucket" and d.get("model_name"):
            out[d["model_name"]][float(d["le"])] += value
    return out


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """histogram_quantile over cumulative bucket counts {upper bound: count}."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower  # Prometheus answers the highest finite bound
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def _delta(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def _ratio(hits: float, total: float) -> float | None:
    return hits / total if total > 0 else None


def figures(before: Samples, after: Samples, seconds: float) -> dict:
    """What `llmctl top` shows: per model, and the gateway-wide rejections."""
    def rate(name: str, **match) -> dict[str, float]:
        return {m: v / seconds for m, v in _delta(_by_model(after, name, **match),
                                                  _by_model(before, name, **match)).items()}

    requests = rate("llmctl_requests_total")
    generated = rate("llmctl_generation_tokens_total")
    prompt = rate("llmctl_prompt_tokens_total")
    running = _by_model(after, "llmctl_num_requests_running")
    waiting = _by_model(after, "llmctl_num_requests_waiting")
    ttft_now, ttft_then = (_buckets(after, "llmctl_time_to_first_token_seconds"),
                           _buckets(before, "llmctl_time_to_first_token_seconds"))
    hits_now = _by_model(after, "llmctl_cache_requests_total", result="hit")
    hits_then = _by_model(before, "llmctl_cache_requests_total", result="hit")
    lookups_now = _by_model(after, "llmctl_cache_requests_total")
    lookups_then = _by_model(before, "llmctl_cache_requests_total")

    models = []
    names = sorted(set(requests) | set(running) | set(lookups_now) | set(ttft_now))
    for m in names:
        window = _delta(ttft_now.get(m, {}), ttft_then.get(m, {}))
        ttft = quantile(0.5, window) if any(window.values()) else quantile(0.5, ttft_now.get(m, {}))
        window_lookups = lookups_now.get(m, 0.0) - lookups_then.get(m, 0.0)
        hit_ratio = (_ratio(hits_now.get(m, 0.0) - hits_then.get(m, 0.0), window_lookups)
                     if window_lookups > 0 else _ratio(hits_now.get(m, 0.0),
                                                       lookups_now.get(m, 0.0)))
        models.append({
            "model_name": m,
            "requests_per_s": round(requests.get(m, 0.0), 3),
            "tokens_per_s": round(generated.get(m, 0.0), 3),
            "prompt_tokens_per_s": round(prompt.get(m, 0.0), 3),
            "running": int(running[m]) if m in running else None,
            "waiting": int(waiting[m]) if m in waiting else None,
            "ttft_p50_s": None if ttft is None else round(ttft, 6),
            "cache_hit_ratio": None if hit_ratio is None else round(hit_ratio, 4),
        })

    rejections: dict[str, float] = defaultdict(float)
    rejections_then: dict[str, float] = defaultdict(float)
    for samples, into in ((after, rejections), (before, rejections_then)):
        for (name, labels), value in samples.items():
            if name == "llmctl_rejections_total":
                into[dict(labels)["reason"]] += value
    return {
        "interval_s": round(seconds, 3),
        "models": models,
        "rejections": {r: int(v) for r, v in sorted(rejections.items()) if v},
        "rejections_per_s": round(sum(_delta(rejections, rejections_then).values()) / seconds,
                                  3),
    }


def sample(url: str, seconds: float) -> dict:
    """Scrape, wait `seconds`, scrape again: the figures for that window."""
    before = scrape(url)
    started = time.monotonic()
    time.sleep(seconds)
    after = scrape(url)
    return {"url": url, **figures(before, after, time.monotonic() - started)}
