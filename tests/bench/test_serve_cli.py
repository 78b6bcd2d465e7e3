"""`llmctl bench serve` end to end against servers on loopback."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from tests.bench.conftest import API_KEY, MODEL

LEVEL_FIELDS = {
    "concurrency", "num_prompts", "completed", "failed", "duration_s", "total_input_tokens",
    "total_output_tokens", "request_throughput", "output_throughput", "total_token_throughput",
    "max_concurrent_requests", "usage_reported", "errors",
    *(f"{stat}_{metric}_ms" for stat in ("mean", "median", "std", "p90", "p99")
      for metric in ("ttft", "tpot", "itl", "e2el")),
}


def _bench(cli_app, url, *extra, key=API_KEY, model=MODEL):
    args = ["bench", "serve", "--url", url, "--model", model, "--api-key", key, *extra]
    return CliRunner().invoke(cli_app, args)


def test_serve_writes_json_and_plot(cli_app, fake_server, tmp_path):
    out, png = tmp_path / "serve.json", tmp_path / "serve.png"
    result = _bench(cli_app, fake_server.url + "/v1", "--concurrency", "1,4",
                    "--num-prompts", "8", "--prompt-len", "12", "--gen-len", "5",
                    "--output", str(out), "--plot", str(png))
    assert result.exit_code == 0, result.output
    assert "TTFT" in result.output and "output throughput" in result.output
    data = json.loads(out.read_text())
    assert data["benchmark"] == "serve" and data["model"] == MODEL
    assert [lv["concurrency"] for lv in data["levels"]] == [1, 4]
    for level in data["levels"]:
        assert LEVEL_FIELDS <= set(level)
        assert level["completed"] == 8 and level["failed"] == 0
        assert level["total_output_tokens"] == 8 * 5 and level["usage_reported"]
        assert level["total_input_tokens"] == 8 * 12
        assert level["median_ttft_ms"] > 0 and level["median_itl_ms"] > 0
    assert data["levels"][0]["max_concurrent_requests"] == 1
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every request of the run had a different prompt (a response cache cannot answer)
    prompts = [body["prompt"] for body in fake_server.app.state.requests]
    assert len(prompts) == len(set(prompts))
    assert all(b["stream"] and b["stream_options"] == {"include_usage": True}
               and b["max_tokens"] == 5 for b in fake_server.app.state.requests)


def test_serve_json_to_stdout_with_poisson_arrivals(cli_app, fake_server):
    result = _bench(cli_app, fake_server.url, "--concurrency", "2", "--num-prompts", "6",
                    "--request-rate", "50", "--gen-len", "3", "--prompt-len", "4", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["request_rate"] == 50 and data["levels"][0]["completed"] == 6


def test_serve_counts_chunks_without_usage(cli_app, fake_server_no_usage):
    result = _bench(cli_app, fake_server_no_usage.url, "--concurrency", "1", "--num-prompts",
                    "2", "--gen-len", "4", "--prompt-len", "4", "--json")
    assert result.exit_code == 0, result.output
    level = json.loads(result.stdout)["levels"][0]
    assert level["total_output_tokens"] == 8 and not level["usage_reported"]


def test_bad_input_is_one_line_and_an_exit_code(cli_app, fake_server):
    unreachable = _bench(cli_app, "http://127.0.0.1:9", "--concurrency", "1")
    assert unreachable.exit_code == 1 and "cannot reach" in unreachable.output
    bad_levels = _bench(cli_app, fake_server.url, "--concurrency", "1,x")
    assert bad_levels.exit_code == 2 and "--concurrency" in bad_levels.output
    zero = _bench(cli_app, fake_server.url, "--concurrency", "0")
    assert zero.exit_code == 2
    wrong_key = _bench(cli_app, fake_server.url, "--concurrency", "1", key="nope")
    assert wrong_key.exit_code == 5 and "API key" in wrong_key.output
    unknown = _bench(cli_app, fake_server.url, "--concurrency", "1", model="nope")
    assert unknown.exit_code == 4 and "'nope'" in unknown.output
    for r in (unreachable, bad_levels, wrong_key, unknown):
        assert len(r.output.strip().splitlines()) == 1, r.output


def test_serve_against_the_live_gateway(cli_app, live_server, tmp_path):
    """Done when 5: `bench serve` on a live `llmctl serve` with the tiny test model."""
    key = live_server.create_key("bench")
    out, png = tmp_path / "gw.json", tmp_path / "gw.png"
    result = _bench(cli_app, live_server.url, "--concurrency", "1,4", "--num-prompts", "4",
                    "--prompt-len", "8", "--gen-len", "6", "--temperature", "0",
                    "--output", str(out), "--plot", str(png), key=key, model="tiny")
    assert result.exit_code == 0, result.output
    assert "TTFT" in result.output
    data = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in data["levels"]] == [1, 4]
    for level in data["levels"]:
        assert LEVEL_FIELDS <= set(level)
        assert level["completed"] == 4 and level["failed"] == 0, level["errors"]
        assert level["usage_reported"] and 0 < level["total_output_tokens"] <= 4 * 6
        assert level["total_input_tokens"] > 0 and level["median_ttft_ms"] > 0
    assert png.stat().st_size > 10_000
    # the gateway's own errors become the CLI's exit codes
    wrong_key = _bench(cli_app, live_server.url, "--concurrency", "1", key="sk-wrong",
                       model="tiny")
    assert wrong_key.exit_code == 5, wrong_key.output
    unknown = _bench(cli_app, live_server.url, "--concurrency", "1", key=key, model="nope")
    assert unknown.exit_code == 4 and "'nope'" in unknown.output, unknown.output
