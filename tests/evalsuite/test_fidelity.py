"""Fidelity with lm-evaluation-harness beyond the fixtures' happy path: remote prompts
longer than the context, summarization's default stop, and what a run records."""

from __future__ import annotations

import httpx

from evalsuite import data, runner
from evalsuite.remote_model import OpenAIModel
from evalsuite.tasks import TaskOptions
from server.db.engine import Database


def test_remote_prompts_are_left_truncated_like_lm_eval_hf(cli, tiny_models_yaml,
                                                          tiny_model_dir, fixtures,
                                                          live_server_factory):
    # The 5-shot gsm8k prompts have ~750 tokens; the model's context is 512 here.
    server = live_server_factory(tiny_models_yaml)
    secret = server.create_key("evals")
    args = ("eval", "gsm8k", "--data", fixtures / "gsm8k", "--limit", 3,
            "--max-gen-tokens", 16, "--log-samples")
    direct = cli.json(*args, "--config", tiny_models_yaml)
    through = cli.json(*args, "--through", server.url, "--api-key", secret, "--model",
                       "tiny", "--tokenizer", tiny_model_dir, "--fresh")
    assert [s["output"] for s in through["samples"]] == [s["output"] for s in direct["samples"]]
    assert not any(s.get("extra", {}).get("error") for s in through["samples"])
    # Without a tokenizer the prompt cannot be cut: each item records the server's 400
    # and the run still finishes.
    failed = cli.json(*args, "--through", server.url, "--api-key", secret, "--model", "tiny",
                      "--fresh")
    assert failed["status"] == "finished" and len(failed["samples"]) == 3
    assert all("exceeds the context" in s["extra"]["error"] for s in failed["samples"])
    assert "3 item(s) refused" in failed["notes"][-1]


def _blank_line_server(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"choices": [
        {"index": 0, "text": "The summary line.\n\nUnrelated rambling after it."}]})


def test_summarization_stops_at_a_blank_line_and_runs_record_effective_settings(
        tmp_path, fixtures):
    db = Database(f"sqlite:///{tmp_path / 'eval.db'}")
    model = OpenAIModel("http://fake", "m", transport=httpx.MockTransport(_blank_line_server))
    prepared = runner.prepare_task("summarization", TaskOptions(limit=1),
                                   data.DataOptions(data=fixtures / "cnn_dailymail"))
    result = runner.run_eval(prepared, model, db, model_identity=model.identity())
    # lm-eval's default `until` for a task that sets none is "\n\n".
    assert result.samples[0].output == "The summary line."
    assert result.config["max_gen_toks"] == 128 and result.config["num_fewshot"] == 0

    prepared = runner.prepare_task("gsm8k", TaskOptions(limit=1),
                                   data.DataOptions(data=fixtures / "gsm8k"))
    result = runner.run_eval(prepared, model, db, model_identity=model.identity())
    # The values in effect (not the options' None), and the few-shot file.
    assert result.config["num_fewshot"] == 5 and result.config["max_gen_toks"] == 256
    assert result.config["fewshot_data"].endswith("train.jsonl")
    assert result.config["data"].endswith("test.jsonl")
