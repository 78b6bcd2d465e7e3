"""Prometheus metrics: defined once here, on prometheus-client's default registry.

Names follow vLLM's (`vllm:` → `llmctl_`) where one exists, so existing dashboards
map over with a rename.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector
from sqlalchemy.exc import SQLAlchemyError

from server.errors import LlmctlError

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                   60, 120)

REQUESTS = Counter("llmctl_requests_total", "API requests by route, model and HTTP status.",
                   ["route", "model", "status"])
LATENCY = Histogram("llmctl_request_latency_seconds", "End-to-end request latency.",
                    ["route", "model"], buckets=LATENCY_BUCKETS)
PROMPT_TOKENS = Counter("llmctl_prompt_tokens_total", "Prompt tokens processed.", ["model"])
GENERATION_TOKENS = Counter("llmctl_generation_tokens_total", "Tokens generated.", ["model"])
TTFT = Histogram("llmctl_time_to_first_token_seconds", "Time to first token of streamed "
                 "responses.", ["model"], buckets=LATENCY_BUCKETS)
QUEUE_TIME = Histogram("llmctl_request_queue_time_seconds", "Time a request waited for a "
                       "batch slot.", ["model"], buckets=LATENCY_BUCKETS)
USAGE_OVERREPORTED = Counter("llmctl_usage_overreported_tokens_total", "Tokens a backend "
                             "reported beyond a request's bound (prompt bound plus max "
                             "tokens); capped, never charged.", ["model_name"])
LOG_WRITE_ERRORS = Counter("llmctl_request_log_write_errors_total", "Failed request-log "
                           "flushes (retried).")
LOG_BACKLOG = Gauge("llmctl_request_log_backlog", "Request-log rows waiting in memory to be "
                    "written.")
LOG_ROWS_WRITTEN = Counter("llmctl_request_log_rows_written_total", "Request-log rows "
                           "written to the database (each request once).")
LOG_SPILLED = Counter("llmctl_request_log_spilled_rows_total", "Request-log rows kept only "
                      "in the journal because the in-memory backlog was full.")
LOG_SPILL_PENDING = Gauge("llmctl_request_log_spill_pending_rows", "Spilled request-log rows "
                          "not yet replayed from the journal.")

# Per backend of a model with replicas (server/engines/router.py). An attempt that is
# retried elsewhere counts here once per backend it reached.
BACKEND_REQUESTS = Counter("llmctl_backend_requests_total", "Backend attempts, by model and "
                           "backend.", ["model_name", "backend"])
BACKEND_ERRORS = Counter("llmctl_backend_errors_total", "Failed backend attempts by reason "
                         "(connect, timeout, upstream, overloaded, stream, other).",
                         ["model_name", "backend", "reason"])
BACKEND_DURATION = Histogram("llmctl_backend_request_duration_seconds", "Backend attempt "
                             "duration (a stream's until it ends).", ["model_name", "backend"],
                             buckets=LATENCY_BUCKETS)
BACKEND_IN_FLIGHT = Gauge("llmctl_backend_in_flight", "Requests outstanding at a backend.",
                          ["model_name", "backend"])
BACKEND_HEALTHY = Gauge("llmctl_backend_healthy", "1 while a backend is in rotation, 0 while "
                        "it is ejected.", ["model_name", "backend"])

_REQUEST_SERIES: dict[tuple[str, str, int], tuple] = {}


def observe_request(route: str, model: str, status: int, seconds: float) -> None:
    """REQUESTS and LATENCY for one finished request. The labelled children are looked
    up once per label set: `labels()` validates and takes a lock on every call."""
    series = _REQUEST_SERIES.get((route, model, status))
    if series is None:
        series = _REQUEST_SERIES[(route, model, status)] = (
            REQUESTS.labels(route, model, str(status)), LATENCY.labels(route, model))
    series[0].inc()
    series[1].observe(seconds)


class EngineCollector(Collector):
    """Reads queue depth and batch size from the engines at scrape time."""

    def __init__(self, manager):
        self.manager = manager

    def collect(self):
        running = GaugeMetricFamily("llmctl_num_requests_running",
                                    "Requests in the running batch.", labels=["model"])
        waiting = GaugeMetricFamily("llmctl_num_requests_waiting",
                                    "Requests waiting for a batch slot.", labels=["model"])
        for name, stats in self.manager.engine_stats().items():
            running.add_metric([name], stats.get("running", 0))
            waiting.add_metric([name], stats.get("waiting", 0))
        yield running
        yield waiting


def observe_engine(spec, engine) -> None:
    """Feed an engine's queue times into QUEUE_TIME (engines that have a queue)."""
    if hasattr(engine, "on_queue_time"):
        engine.on_queue_time = QUEUE_TIME.labels(spec.name).observe


_collector: EngineCollector | None = None


def watch_engines(manager) -> None:
    """Point the engine gauges at this app's manager (the latest app wins)."""
    global _collector
    if _collector is not None:
        REGISTRY.unregister(_collector)
    _collector = EngineCollector(manager)
    REGISTRY.register(_collector)


class EvalScoreCollector(Collector):
    """The latest stored eval score per (task, model, metric) and its run's finish time,
    read from the database at scrape time by `read` (server/services/evalscores.py)."""

    def __init__(self, read):
        self.read = read

    def collect(self):
        score = GaugeMetricFamily("llmctl_eval_score", "Latest stored eval score (llmctl "
                                  "eval) per task, model and metric.",
                                  labels=["task", "model_name", "metric"])
        when = GaugeMetricFamily("llmctl_eval_run_timestamp_seconds", "When the run behind "
                                 "llmctl_eval_score finished (Unix time).",
                                 labels=["task", "model_name"])
        try:
            rows = self.read()
        except (SQLAlchemyError, LlmctlError):  # a scrape never fails on the database
            rows = []
        for row in rows:
            for metric, value in row["metrics"].items():
                score.add_metric([row["task"], row["model"], metric], value)
            when.add_metric([row["task"], row["model"]], row["timestamp"])
        yield score
        yield when


_eval_collector: EvalScoreCollector | None = None


def watch_evals(read) -> None:
    """Export the eval scores `read()` returns at each scrape (the latest app wins)."""
    global _eval_collector
    if _eval_collector is not None:
        REGISTRY.unregister(_eval_collector)
    _eval_collector = EvalScoreCollector(read)
    REGISTRY.register(_eval_collector)
