"""`llmctl eval --through` a live gateway gives the same per-item results as the
direct run, and the gateway's request logs and usage show the eval's requests."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def gateway(live_server_factory, eval_models_yaml):
    server = live_server_factory(eval_models_yaml)
    return server, server.create_key("evals")


def _pair(cli, eval_models_yaml, server, secret, *args):
    direct = cli.json("eval", *args, "--config", eval_models_yaml, "--log-samples")
    through = cli.json("eval", *args, "--through", server.url, "--api-key", secret,
                       "--model", "tiny", "--log-samples")
    return direct, through


def test_through_gateway_matches_direct_run(cli, eval_models_yaml, fixtures, gateway):
    server, secret = gateway
    # mmlu: loglikelihoods from the gateway's echoed prompt logprobs.
    direct, through = _pair(cli, eval_models_yaml, server, secret, "mmlu", "--data",
                            fixtures / "mmlu", "--limit", 2)
    assert through["model"]["type"] == "remote"
    assert through["metrics"] == direct["metrics"]
    assert through["breakdown"] == direct["breakdown"]
    for a, b in zip(direct["samples"], through["samples"], strict=True):
        assert (a["prompt"], a["extracted"], a["scores"]) == (b["prompt"], b["extracted"],
                                                              b["scores"])
        assert b["extra"]["loglikelihoods"] == pytest.approx(a["extra"]["loglikelihoods"],
                                                             abs=1e-4)
    mmlu_items = len(direct["samples"])
    # gsm8k: greedy generations with stop strings.
    direct, through = _pair(cli, eval_models_yaml, server, secret, "gsm8k", "--data",
                            fixtures / "gsm8k", "--limit", 3, "--max-gen-tokens", 32)
    assert through["metrics"] == direct["metrics"]
    for a, b in zip(direct["samples"], through["samples"], strict=True):
        assert (a["prompt"], a["output"], a["extracted"], a["scores"]) == (
            b["prompt"], b["output"], b["extracted"], b["scores"])

    # The gateway saw, logged and metered every request under the eval's key.
    logs = json.loads(server.cli("logs", "search", "--key", "evals", "--limit", "200",
                                 "--json").stdout)["items"]
    completions = [x for x in logs if x["route"] == "/v1/completions" and x["status"] == 200]
    # mmlu: one echo request per item plus the capability probe; gsm8k: one per item.
    assert len(completions) == mmlu_items + 1 + 3
    assert all(x["model"] == "tiny" for x in completions)
    usage = json.loads(server.cli("usage", "--key", "evals", "--json").stdout)["totals"]
    assert usage["requests"] == len(completions)
    assert usage["prompt_tokens"] == sum(x["prompt_tokens"] for x in completions)


def test_through_with_a_bad_key_is_one_line(cli, fixtures, gateway):
    server, _ = gateway
    result = cli("eval", "mmlu", "--data", fixtures / "mmlu", "--limit", 1, "--through",
                 server.url, "--api-key", "sk-wrong", "--model", "tiny")
    assert result.exit_code == 5, result.output
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert lines[-1].startswith("error:") and "401" in lines[-1]
    assert "Traceback" not in result.output
