"""A remote that over-reports usage cannot take a key past its quota (issue 15, Done
when 2): admission holds each request's bound, the charge never exceeds it, and the
excess is counted in a metric and the request log. A live gateway in front of a real
second HTTP server on loopback (tests/plugins/fakeremote.py)."""

from __future__ import annotations

import asyncio
import json
import re

import httpx

from server.api.bounds import SPECIAL_TOKENS

QUOTA = 2000
MAX_TOKENS = 50
PROMPT = "Hello there"  # 11 bytes


def config(tmp_path, remote, tokenizer_dir) -> str:
    path = tmp_path / "liar.yaml"
    path.write_text(
        "default_model: liar\n"
        "models:\n"
        f"  - id: fake\n    name: liar\n    type: remote\n    base_url: {remote.url}/v1\n"
        f"  - id: fake-tok\n    name: liar-tok\n    type: remote\n    base_url: {remote.url}\n"
        f"    tokenizer: {tokenizer_dir}\n")
    return str(path)


def overreported(metrics_text: str, model: str) -> float:
    pattern = ("^" + re.escape(f'llmctl_usage_overreported_tokens_total{{model_name="{model}"}}')
               + r" (\S+)$")
    found = re.search(pattern, metrics_text, re.M)
    return float(found.group(1)) if found else 0.0


async def test_over_reporting_remote_cannot_pass_the_quota(live_server_factory, fake_remote,
                                                         tmp_path, tiny_model_dir):
    fake_remote.usage = {"prompt_tokens": 900, "completion_tokens": 3 * MAX_TOKENS}
    fake_remote.delay = 0.2  # all 30 are in flight together
    gw = live_server_factory(config(tmp_path, fake_remote, tiny_model_dir),
                             env={"LLMCTL_CACHE_ENABLED": "false"})
    secret = gw.create_key("capped", "--monthly-tokens", str(QUOTA))
    bound = len(PROMPT.encode()) + SPECIAL_TOKENS + MAX_TOKENS

    async with httpx.AsyncClient(base_url=gw.url, timeout=60,
                                 headers={"Authorization": f"Bearer {secret}"}) as client:
        replies = await asyncio.gather(*(client.post("/v1/completions", json={
            "model": "liar", "prompt": PROMPT, "max_tokens": MAX_TOKENS}) for _ in range(30)))
        ok = [r for r in replies if r.status_code == 200]
        refused = [r for r in replies if r.status_code == 429]
        assert len(ok) + len(refused) == 30, [r.text for r in replies]
        assert len(ok) == QUOTA // bound  # every reservation that fits, and no more
        assert {r.json()["error"]["code"] for r in refused} == {"insufficient_quota"}
        # What the client is told is capped the same way.
        assert ok[0].json()["usage"] == {"prompt_tokens": bound - MAX_TOKENS,
                                         "completion_tokens": MAX_TOKENS,
                                         "total_tokens": bound}
        quota = json.loads(gw.cli("quotas", "show", "capped", "--json").stdout)
        assert quota["used_tokens"] == len(ok) * bound <= QUOTA
        assert quota["reserved_tokens"] == 0

        excess = (900 - (bound - MAX_TOKENS)) + 2 * MAX_TOKENS
        metrics = (await client.get("/metrics")).text
        assert overreported(metrics, "liar") == len(ok) * excess

        # With the remote's tokenizer named, prompts are counted with it.
        from transformers import AutoTokenizer

        counted = len(AutoTokenizer.from_pretrained(tiny_model_dir)(PROMPT)["input_ids"])
        r = await client.post("/v1/completions", json={
            "model": "liar-tok", "prompt": PROMPT, "max_tokens": 5})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == counted

    served: list = []
    for _ in range(50):  # the log writer flushes in the background
        logs = json.loads(gw.cli("logs", "search", "--json", "--limit", "100").stdout)
        served = [row for row in logs["items"] if row["status"] == 200]
        if len(served) == len(ok) + 1:
            break
        await asyncio.sleep(0.2)
    assert len(served) == len(ok) + 1
    assert {row["error_type"] for row in served} == {"usage_overreported"}
    assert sum(row["charged_tokens"] for row in served if row["model"] == "liar") \
        == quota["used_tokens"]


async def test_negative_usage_is_a_clean_upstream_error(live_server_factory, fake_remote,
                                                        tmp_path, tiny_model_dir):
    fake_remote.usage = {"prompt_tokens": -5, "completion_tokens": 3}
    gw = live_server_factory(config(tmp_path, fake_remote, tiny_model_dir),
                             env={"LLMCTL_CACHE_ENABLED": "false"})
    secret = gw.create_key("k")
    headers = {"Authorization": f"Bearer {secret}"}
    for route, body in (("/v1/completions", {"prompt": "x", "max_tokens": 3}),
                        ("/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3})):
        r = httpx.post(gw.url + route, json={"model": "liar", **body}, headers=headers,
                       timeout=30)
        assert r.status_code == 502, r.text
        error = r.json()["error"]
        assert error["code"] == "upstream_error"
        assert "usage.prompt_tokens is -5" in error["message"]
