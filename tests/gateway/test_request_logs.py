"""Request logs match requests one to one, with the tokenizer's counts, even across SIGTERM."""

import concurrent.futures
import signal
import sqlite3

import httpx
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def _rows(home) -> list[dict]:
    conn = sqlite3.connect(home / "llmctl.db")
    conn.row_factory = sqlite3.Row
    return [dict(r) for r in conn.execute("select * from request_logs order by id")]


def test_mixed_requests_are_logged_one_to_one(live_server_factory, tiny_models_yaml,
                                              tiny_model_dir, tmp_path):
    server = live_server_factory(tiny_models_yaml, env={"LLMCTL_LOG_PROMPTS": "true"})
    key = server.create_key("logs")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()

    def reference(prompt: str, n_prompt: int) -> list[int]:
        """What HF generate produces greedily, EOS included (it is generated and counted)."""
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=max_new[prompt], do_sample=False)
        generated = out[0, n_prompt:].tolist()
        if tokenizer.eos_token_id in generated:
            generated = generated[: generated.index(tokenizer.eos_token_id) + 1]
        return generated
    headers = {"X-API-Key": key, "Cache-Control": "no-cache, no-store"}
    sent, max_new = [], {"Count me": 4}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
        for i, prompt in enumerate(["Hello", "A longer prompt about things", "x y z"]):
            max_new[prompt] = 3 + i
            r = client.post("/v1/generate", json={"prompt": prompt, "max_new_tokens": 3 + i,
                                                  "temperature": 0})
            sent.append((r.headers["x-request-id"], r.status_code, prompt, r.json()))
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "Count me",
                                                 "max_tokens": 4, "temperature": 0})
        sent.append((r.headers["x-request-id"], r.status_code, "Count me", r.json()))
        r = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "chat"}], "max_tokens": 5})
        sent.append((r.headers["x-request-id"], r.status_code, None, r.json()))
        r = client.post("/v1/completions", json={"model": "missing", "prompt": "x"})
        sent.append((r.headers["x-request-id"], 404, None, r.json()))
        r = client.post("/v1/generate", json={"prompt": "x"}, headers={"X-API-Key": "bad"})
        sent.append((r.headers["x-request-id"], 401, None, r.json()))
    server.stop()  # graceful: flushes the log writer

    rows = {r["request_id"]: r for r in _rows(server.home)}
    assert set(rows) == {s[0] for s in sent}
    for request_id, status, prompt, body in sent:
        row = rows[request_id]
        assert row["status"] == status
        if status == 200:
            assert row["prompt_tokens"] == body["usage"]["prompt_tokens"]
            assert row["completion_tokens"] == body["usage"]["completion_tokens"]
            if prompt is not None:
                assert row["prompt_tokens"] == len(tokenizer(prompt, add_special_tokens=False)
                                                   ["input_ids"])
            text = body["text"] if "text" in body else (body["choices"][0].get("text")
                                                         or body["choices"][0]["message"]
                                                         ["content"])
            assert row["output"] == text
            if prompt is not None:  # greedy: the reference generation has the same length
                assert row["completion_tokens"] == len(reference(prompt, row["prompt_tokens"]))
        else:
            assert row["error_type"] == body["error"]["code"]
    chat_row = rows[sent[4][0]]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "chat"}],
                                             tokenize=False, add_generation_prompt=True)
    assert chat_row["prompt_tokens"] == len(tokenizer(rendered, add_special_tokens=False)
                                            ["input_ids"])


def test_sigterm_during_load_loses_no_log(live_server_factory, tiny_models_yaml):
    server = live_server_factory(tiny_models_yaml)
    key = server.create_key("load")

    def one(i: int):
        try:
            r = httpx.post(server.url + "/v1/generate", json={"prompt": f"load {i}",
                                                             "max_new_tokens": 48},
                           headers={"X-API-Key": key}, timeout=60)
            return r.headers.get("x-request-id"), r.status_code
        except httpx.HTTPError:
            return None, None

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, i) for i in range(48)]
        done_before = 0
        for _ in concurrent.futures.as_completed(futures):
            done_before += 1
            if done_before == 3:
                server.proc.send_signal(signal.SIGTERM)
                break
        answered = [f.result() for f in futures]
    ok = {rid for rid, status in answered if rid and status == 200}
    assert len(ok) > done_before, "no request was in flight when SIGTERM arrived"
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status shows it
    assert server.proc.wait(60) in (0, -signal.SIGTERM)
    rows = {r["request_id"]: r for r in _rows(server.home)}
    # Every answered request has its row (none lost), and no row is a phantom.
    answered_ids = {rid for rid, _ in answered if rid}
    assert set(rows) == answered_ids
    assert all(rows[rid]["status"] == 200 and rows[rid]["completion_tokens"] > 0 for rid in ok)
