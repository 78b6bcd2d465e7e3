"""/metrics after mixed traffic: valid for promtool, and every family an operator
needs has a non-zero sample (issue 11, done-when 1)."""

from __future__ import annotations

import subprocess

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        out.setdefault(family.name, []).extend(family.samples)
    return out


def nonzero(fams: dict, family: str, suffix: str = "", **labels) -> float:
    """The sum of a family's samples (those named family+suffix, matching labels)."""
    return sum(s.value for s in fams.get(family, ())
               if s.name == family + suffix and all(s.labels.get(k) == v
                                                    for k, v in labels.items()))


# Every family the issue lists: (family, sample suffix, labels the sample must have).
FAMILIES = [
    ("llmctl_requests", "_total", {"model_name": "tiny", "cache": "hit"}),
    ("llmctl_requests", "_total", {"model_name": "tiny", "cache": "miss"}),
    ("llmctl_requests", "_total", {"model_name": "tiny", "cache": "bypass"}),
    ("llmctl_e2e_request_latency_seconds", "_count", {"model_name": "tiny"}),
    ("llmctl_time_to_first_token_seconds", "_count", {"model_name": "tiny"}),
    ("llmctl_time_per_output_token_seconds", "_count", {"model_name": "tiny"}),
    ("llmctl_request_queue_time_seconds", "_count", {"model_name": "tiny"}),
    ("llmctl_prompt_tokens", "_total", {"model_name": "tiny"}),
    ("llmctl_generation_tokens", "_total", {"model_name": "tiny"}),
    ("llmctl_request_success", "_total", {"model_name": "tiny", "finished_reason": "length"}),
    ("llmctl_num_requests_running", "", {"model_name": "tiny"}),
    ("llmctl_num_requests_waiting", "", {"model_name": "tiny"}),
    ("llmctl_batch_size", "", {"model_name": "tiny"}),
    ("llmctl_kv_cache_tokens", "", {"model_name": "tiny"}),
    ("llmctl_max_queue", "", {"model_name": "tiny"}),
    ("llmctl_rejections", "_total", {"reason": "auth"}),
    ("llmctl_rejections", "_total", {"reason": "rate"}),
    ("llmctl_rejections", "_total", {"reason": "overloaded"}),
    ("llmctl_rejections", "_total", {"reason": "bad_request"}),
    ("llmctl_rejections", "_total", {"reason": "unavailable"}),
    ("llmctl_cache_requests", "_total", {"model_name": "tiny", "layer": "db", "result": "hit"}),
    ("llmctl_cache_requests", "_total", {"model_name": "tiny", "result": "miss"}),
    ("llmctl_cache_requests", "_total", {"model_name": "tiny", "result": "bypass"}),
    ("llmctl_backend_requests", "_total", {"model_name": "relay"}),
    ("llmctl_backend_request_duration_seconds", "_count", {"model_name": "relay"}),
    ("llmctl_backend_errors", "_total", {"model_name": "gone", "reason": "unreachable"}),
    ("llmctl_database_errors", "_total", {"operation": "request"}),
    ("llmctl_database_errors", "_total", {"operation": "log_write"}),
    ("llmctl_redis_errors", "_total", {}),
    ("llmctl_request_log_backlog", "", {}),
    ("llmctl_request_log_rows_written", "_total", {}),
    ("llmctl_key_tokens", "_total", {"type": "generation"}),
    ("llmctl_key_quota_used_ratio", "", {}),
    ("llmctl_build_info", "", {}),
]


def test_metrics_pass_promtool_after_mixed_traffic(operated):
    check = subprocess.run(["promtool", "check", "metrics"], input=operated.snapshot,
                           capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout + check.stderr == "", check.stdout + check.stderr


def test_every_family_has_a_nonzero_sample(operated):
    s = operated.statuses
    assert (s["miss"], s["hit"], s["stream_hit"], s["relay"], s["relay_stream"]) == (200,) * 5
    assert (s["unauthorized"], s["rate_limited"], s["overloaded"]) == (401, 429, 429)
    assert (s["gone"], s["database_down"], s["bad_request"]) == (503, 503, 400)
    fams = samples(operated.snapshot)
    missing = [(f, labels) for f, suffix, labels in FAMILIES
               if not nonzero(fams, f, suffix, **labels)]
    assert not missing
    # Rows are only dropped when the writer gives up (at shutdown): present, at 0.
    assert nonzero(fams, "llmctl_request_log_rows_dropped", "_total") == 0
    assert "llmctl_request_log_rows_dropped" in fams


def test_probes_and_scrapes_are_not_client_traffic(operated):
    fams = samples(operated.snapshot)
    routes = {s.labels["route"] for s in fams["llmctl_requests"]}
    assert "/v1/completions" in routes
    assert not routes & {"/metrics", "/healthz", "/readyz"}


def test_labels_are_bounded(operated):
    """No label carries a prompt, a secret or a client's free text: the values of every
    label come from the configuration, the route table or a fixed set."""
    fams = samples(operated.snapshot)
    models = {"tiny", "relay", "gone", ""}
    for name, family in fams.items():
        for sample in family:
            assert sample.labels.get("model_name", "") in models, (name, sample.labels)
            assert not any(secret in str(sample.labels.values())
                           for secret in operated.keys.values())
            assert "observe me" not in str(sample.labels)


def test_errors_map_to_rejection_reasons_in_one_place():
    from server.errors import (
        AuthenticationError,
        DatabaseError,
        InvalidRequest,
        ModelNotFound,
        Overloaded,
        PermissionDenied,
        QuotaExceeded,
        RateLimited,
        UpstreamError,
    )
    from server.metrics import rejection_reason

    tokens = RateLimited("too many tokens")
    tokens.reason = "tokens"  # what the limiter sets
    conflict = InvalidRequest("x")
    conflict.status_code = 409
    cases = [(AuthenticationError("x"), "auth"), (PermissionDenied("x"), "permission"),
             (QuotaExceeded("x"), "quota"), (Overloaded("x"), "overloaded"),
             (RateLimited("x"), "rate"), (tokens, "tokens"), (ModelNotFound("x"), "not_found"),
             (InvalidRequest("x"), "bad_request"), (conflict, "bad_request"),
             (DatabaseError("x"), "unavailable"), (UpstreamError("x"), None)]
    assert [rejection_reason(e) for e, _ in cases] == [r for _, r in cases]
