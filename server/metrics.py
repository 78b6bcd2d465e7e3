"""Prometheus metrics: every family is defined once here, on prometheus-client's
default registry, below every layer that records them (api, services, engines).

Names and labels follow vLLM's (`vllm:` → `llmctl_`, `model_name`) where vLLM has
the same metric, so a vLLM dashboard query carries over with a prefix rename. Every
label is bounded: model names come from models.yaml, routes from the route table,
reasons from fixed sets; a key appears only by its id, and only when
LLMCTL_METRICS_PER_KEY is on (or, for the quota gauge, when it has a quota).

The hot paths (a cache hit) pre-bind their labelled children once per label set:
`labels()` validates and takes a lock on every call.
"""

from __future__ import annotations

import platform
from importlib import metadata

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector
from sqlalchemy.exc import SQLAlchemyError

from server.errors import (
    AuthenticationError,
    DatabaseError,
    InvalidRequest,
    LlmctlError,
    NotFound,
    Overloaded,
    PermissionDenied,
    QuotaExceeded,
    RateLimited,
    Unavailable,
)

# Buckets, in seconds. End to end spans a cache hit (~1 ms) to a long generation.
E2E_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
               20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# vLLM's TTFT buckets up to 160 s; queue time shares them.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
# vLLM's time-per-output-token buckets, with finer steps below 10 ms for fast GPUs.
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0)

# ----------------------------------------------------------------- requests (api)

REQUESTS = Counter(
    "llmctl_requests_total",
    "Client requests by route, model, HTTP status and cache result (hit, miss, bypass, "
    "none). Probes and /metrics scrapes are not counted.",
    ["route", "model_name", "status", "cache"])
E2E_LATENCY = Histogram(
    "llmctl_e2e_request_latency_seconds", "End-to-end request latency, as the gateway saw it.",
    ["route", "model_name"], buckets=E2E_BUCKETS)
REJECTIONS = Counter(
    "llmctl_rejections_total",
    "Requests refused before they were served, by reason (auth, permission, rate, tokens, "
    "concurrency, quota, overloaded, bad_request, not_found, unavailable).", ["reason"])

# ----------------------------------------------------------------- models (serving)

PROMPT_TOKENS = Counter("llmctl_prompt_tokens_total",
                        "Prompt tokens the model processed (cache hits excluded).",
                        ["model_name"])
GENERATION_TOKENS = Counter("llmctl_generation_tokens_total",
                            "Tokens the model generated (cache hits excluded).", ["model_name"])
REQUEST_SUCCESS = Counter(
    "llmctl_request_success_total",
    "Generated choices by finish reason (stop, length, abort when the client left).",
    ["model_name", "finished_reason"])
TTFT = Histogram("llmctl_time_to_first_token_seconds",
                 "Time to the first generated token, streamed or not (cache hits excluded).",
                 ["model_name"], buckets=TTFT_BUCKETS)
TPOT = Histogram("llmctl_time_per_output_token_seconds",
                 "Mean time per output token after the first, per request (decode speed).",
                 ["model_name"], buckets=TPOT_BUCKETS)
QUEUE_TIME = Histogram("llmctl_request_queue_time_seconds",
                       "Time a request waited for a batch slot (local models).",
                       ["model_name"], buckets=TTFT_BUCKETS)
USAGE_OVERREPORTED = Counter(
    "llmctl_usage_overreported_tokens_total",
    "Tokens a backend reported beyond a request's bound (prompt bound plus max tokens); "
    "capped, never charged.", ["model_name"])
KEY_TOKENS = Counter(
    "llmctl_key_tokens_total",
    "Tokens served per API key id, cache hits included (LLMCTL_METRICS_PER_KEY only).",
    ["key_id", "model_name", "type"])
KEY_QUOTA_USED = Gauge(
    "llmctl_key_quota_used_ratio",
    "Share of its monthly token quota a key has used, as of its last charged request "
    "(keys with a quota only).", ["key_id"])

# ----------------------------------------------------------------- cache

# One increment per request, so that summing by `result` gives what the
# `x-llmctl-cache` headers said. `layer` is what answered a hit: redis, db, or
# flight (it waited for an identical request in flight); a miss is counted at db
# (the last layer asked); a bypass at none (nothing was asked).
CACHE_REQUESTS = Counter("llmctl_cache_requests_total",
                         "Completion cache lookups by model, layer and result.",
                         ["model_name", "layer", "result"])

# ----------------------------------------------------------------- backends

# One count per backend attempt: a remote backend's client records its own requests,
# errors and duration (server/engines/remote.py); the router records them for its
# other (local) replicas, and in-flight and health for all (server/engines/router.py).
# A request retried elsewhere counts once at each backend it reached.
BACKEND_REQUESTS = Counter("llmctl_backend_requests_total",
                           "Requests sent to a backend (a remote model server or a local "
                           "replica), one per attempt.", ["model_name", "backend"])
BACKEND_ERRORS = Counter(
    "llmctl_backend_errors_total",
    "Failed backend attempts, by reason: a remote server's unreachable, timeout, "
    "rate_limited, client_error, server_error, malformed, transport; a local replica's "
    "overloaded, stream, client, other.",
    ["model_name", "backend", "reason"])
BACKEND_LATENCY = Histogram("llmctl_backend_request_duration_seconds",
                            "Duration of backend attempts (a stream: to its end).",
                            ["model_name", "backend"], buckets=E2E_BUCKETS)
BACKEND_IN_FLIGHT = Gauge("llmctl_backend_in_flight",
                          "Requests outstanding at a backend of a model with replicas.",
                          ["model_name", "backend"])
BACKEND_HEALTHY = Gauge("llmctl_backend_healthy", "1 while a backend of a model with "
                        "replicas is in rotation, 0 while it is ejected.",
                        ["model_name", "backend"])

# ----------------------------------------------------------------- storage

DATABASE_ERRORS = Counter(
    "llmctl_database_errors_total",
    "Database operations that failed (request, log_write, cache_read, cache_write, ping, "
    "eval_scores).",
    ["operation"])
REDIS_ERRORS = Counter("llmctl_redis_errors_total",
                       "Redis calls that failed to reach Redis (limits, cache, probe).",
                       ["operation"])
LOG_ROWS_WRITTEN = Counter("llmctl_request_log_rows_written_total",
                           "Request-log rows committed to the database.")
LOG_ROWS_DROPPED = Counter("llmctl_request_log_rows_dropped_total",
                           "Request-log rows given up on (never written).")
LOG_BACKLOG = Gauge("llmctl_request_log_backlog",
                    "Request-log rows waiting in memory to be written.")
LOG_SPILLED = Counter("llmctl_request_log_spilled_rows_total",
                      "Request-log rows kept only in the journal because the in-memory "
                      "backlog was full.")
LOG_SPILL_PENDING = Gauge("llmctl_request_log_spill_pending_rows",
                          "Spilled request-log rows not yet replayed from the journal.")

BUILD_INFO = Gauge("llmctl_build_info", "llmctl's version and runtime (always 1).",
                   ["version", "python_version"])


def _version() -> str:
    try:
        return metadata.version("llmctl")
    except metadata.PackageNotFoundError:
        return "unknown"


BUILD_INFO.labels(_version(), platform.python_version()).set(1)
# Known label values start at 0, so that rate() and the dashboard see them before the
# first error (https://prometheus.io/docs/practices/instrumentation/#avoid-missing-metrics).
for _reason in ("auth", "rate", "tokens", "concurrency", "quota", "overloaded", "bad_request"):
    REJECTIONS.labels(_reason)
for _operation in ("request", "log_write", "cache_read", "cache_write", "ping"):
    DATABASE_ERRORS.labels(_operation)
for _operation in ("limits", "cache", "probe"):
    REDIS_ERRORS.labels(_operation)
BACKEND_ERROR_REASONS = ("unreachable", "timeout", "rate_limited", "client_error",
                         "server_error", "malformed", "transport")

# ----------------------------------------------------------------- recording


class _Series:
    """Labelled children looked up once (per label set) and kept."""

    def __init__(self, bind):
        self._bind = bind
        self._children: dict = {}

    def __call__(self, *labels):
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._bind(*labels)
        return child


_request_series = _Series(lambda route, model, status, cache: (
    REQUESTS.labels(route, model, str(status), cache), E2E_LATENCY.labels(route, model)))
cache_series = _Series(CACHE_REQUESTS.labels)
_rejection_series = _Series(REJECTIONS.labels)
_success_series = _Series(REQUEST_SUCCESS.labels)


def observe_request(route: str, model: str, status: int, cache: str, seconds: float) -> None:
    """REQUESTS and E2E_LATENCY for one finished client request."""
    requests, latency = _request_series(route, model, status, cache)
    requests.inc()
    latency.observe(seconds)


class ModelSeries:
    """One model's token and latency children, bound once."""

    def __init__(self, model: str):
        self.model = model
        self.prompt_tokens = PROMPT_TOKENS.labels(model)
        self.generation_tokens = GENERATION_TOKENS.labels(model)
        self.ttft = TTFT.labels(model)
        self.tpot = TPOT.labels(model)

    def finished(self, reason: str | None, n: int = 1) -> None:
        _success_series(self.model, reason or "unknown").inc(n)

    def generated(self, ttft: float | None, decode_s: float | None, tokens: int,
                  reason: str | None) -> None:
        """One generated choice: its time to first token, its decode speed (the time
        after the first token over the tokens after it) and its finish reason."""
        if ttft is not None:
            self.ttft.observe(ttft)
            if decode_s is not None and tokens > 1:
                self.tpot.observe(max(0.0, decode_s) / (tokens - 1))
        self.finished(reason)


model_series = _Series(ModelSeries)


def rejection_reason(exc: LlmctlError) -> str | None:
    """The one place errors map to rejection reasons; None for errors that are not a
    refusal (a failed backend, a bug)."""
    reason = getattr(exc, "reason", None)
    if reason:
        return reason
    for kind, name in _REASONS:
        if isinstance(exc, kind):
            return name
    if 400 <= exc.status_code < 500:
        return "bad_request"
    return None


# Most specific first. A limiter refusal carries its own reason (rate, tokens,
# concurrency) on the error; a remote server's 429 has none and counts as rate.
_REASONS: tuple[tuple[type[LlmctlError], str], ...] = (
    (AuthenticationError, "auth"), (PermissionDenied, "permission"), (QuotaExceeded, "quota"),
    (Overloaded, "overloaded"), (RateLimited, "rate"), (NotFound, "not_found"),
    (InvalidRequest, "bad_request"), (Unavailable, "unavailable"),
)


def observe_error(exc: LlmctlError) -> None:
    """Count an error that reached a client: a rejection by its reason, and a database
    that failed the request."""
    reason = rejection_reason(exc)
    if reason is not None:
        _rejection_series(reason).inc()
    if isinstance(exc, DatabaseError):
        DATABASE_ERRORS.labels("request").inc()


def observe_key_tokens(key_id: int, model: str, prompt: int, generation: int) -> None:
    KEY_TOKENS.labels(str(key_id), model, "prompt").inc(prompt)
    KEY_TOKENS.labels(str(key_id), model, "generation").inc(generation)


# ----------------------------------------------------------------- scrape-time gauges


class EngineCollector(Collector):
    """Reads queue depth, batch size and KV-cache use from the local engines at scrape
    time (remote models have none of these)."""

    def __init__(self, manager):
        self.manager = manager

    def collect(self):
        families = {
            "running": GaugeMetricFamily("llmctl_num_requests_running",
                                         "Requests in the model's batch (decoding or in "
                                         "prefill).", labels=["model_name"]),
            "waiting": GaugeMetricFamily("llmctl_num_requests_waiting",
                                         "Requests waiting for a batch slot.",
                                         labels=["model_name"]),
            "kv_rows": GaugeMetricFamily("llmctl_batch_size",
                                         "Rows in the model's decode batch.",
                                         labels=["model_name"]),
            "kv_tokens": GaugeMetricFamily("llmctl_kv_cache_tokens",
                                           "Token slots the decode batch's KV cache holds "
                                           "(rows x padded length).", labels=["model_name"]),
        }
        max_queue = GaugeMetricFamily("llmctl_max_queue",
                                      "Requests a model queues at most before refusing "
                                      "(overloaded).", labels=["model_name"])
        for name, stats in self.manager.engine_stats().items():
            if not stats:
                continue
            for field, family in families.items():
                family.add_metric([name], stats.get(field, 0))
            max_queue.add_metric([name], self.manager.spec(name).max_queue)
        yield from families.values()
        yield max_queue


def observe_engine(spec, engine) -> None:
    """Feed an engine's queue times into QUEUE_TIME (engines that have a queue)."""
    if hasattr(engine, "on_queue_time"):
        engine.on_queue_time = QUEUE_TIME.labels(spec.name).observe


_collector: EngineCollector | None = None


def watch(manager) -> None:
    """Point the scrape-time engine gauges at this app's engines (the latest app wins).
    The log writer sets its own gauges (LOG_BACKLOG, LOG_SPILL_PENDING) as they change."""
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
            DATABASE_ERRORS.labels("eval_scores").inc()
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
