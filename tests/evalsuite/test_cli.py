"""`llmctl eval` end to end on the tiny test model with the project's fixtures:
every task runs offline, and the results JSON and the database agree."""

from __future__ import annotations

import json

import pytest

from evalsuite import scoring


def _task_args(fixtures, classifier: str) -> dict[str, list]:
    return {
        "gsm8k": ["--data", fixtures / "gsm8k", "--limit", 3, "--max-gen-tokens", 24],
        "mmlu": ["--data", fixtures / "mmlu", "--limit", 2],
        "mbpp": ["--data", fixtures / "mbpp", "--limit", 3, "--max-gen-tokens", 24,
                 "--allow-code-execution"],
        "summarization": ["--data", fixtures / "cnn_dailymail", "--limit", 2,
                          "--max-gen-tokens", 24],
        "toxicity": ["--data", fixtures / "real_toxicity_prompts", "--limit", 4,
                     "--max-gen-tokens", 16, "--classifier", classifier],
    }


@pytest.mark.parametrize("task", ["gsm8k", "mmlu", "mbpp", "summarization", "toxicity"])
def test_task_end_to_end(cli, eval_models_yaml, fixtures, tiny_classifier_dir, tmp_path, task):
    out = tmp_path / "results.json"
    args = _task_args(fixtures, tiny_classifier_dir)[task]
    result = cli("eval", task, "--config", eval_models_yaml, *args, "--output", out,
                 "--log-samples", "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    written = json.loads(out.read_text())
    assert printed == written
    assert printed["task"] == task and printed["status"] == "finished"
    samples = printed["samples"]
    assert len(samples) == printed["n_items"] > 0
    for s in samples:
        assert s["prompt"] and s["output"] is not None and s["scores"]
    # Every metric with a standard error is the mean of its per-item scores.
    for name, m in printed["metrics"].items():
        assert set(m) == {"value", "stderr", "n"}
        per_item = "toxic" if name == "toxic_fraction" else name
        if name == "toxicity_max":
            assert m["value"] == max(s["scores"]["toxicity"] for s in samples)
            continue
        values = [s["scores"][per_item] for s in samples]
        assert m["value"] == pytest.approx(scoring.mean(values))
        assert m["stderr"] == pytest.approx(scoring.mean_stderr(values))
    # The database holds the same figures and items.
    stored = cli.json("eval", "show", printed["run_id"], "--samples", 1000)
    assert stored["metrics"] == printed["metrics"]
    assert stored.get("breakdown") == printed.get("breakdown")
    assert stored["n_items"] == printed["n_items"] and stored["status"] == "finished"
    for mine, theirs in zip(samples, stored["samples"], strict=True):
        assert mine == theirs
    # Listed among the runs.
    runs = cli.json("eval", "runs")
    assert [r["run_id"] for r in runs] == [printed["run_id"]]
    assert runs[0]["n_samples"] == printed["n_items"]


def test_mmlu_groups_and_fewshot(cli, eval_models_yaml, fixtures):
    res = cli.json("eval", "mmlu", "--config", eval_models_yaml, "--data", fixtures / "mmlu",
                   "--num-fewshot", 5, "--limit", 1, "--log-samples")
    samples = res["samples"]
    assert len(samples) == 4  # one per subject
    for s in samples:
        subject = s["extra"]["subject"]
        assert s["prompt"].startswith("The following are multiple choice questions (with "
                                      f"answers) about {subject.replace('_', ' ')}.\n\n")
        assert s["prompt"].count("\nAnswer:") == 6 and s["prompt"].endswith("Answer:")
        assert len(s["extra"]["loglikelihoods"]) == 4
    breakdown = res["breakdown"]
    assert set(breakdown["category"]) == {"stem", "humanities", "social_sciences", "other"}
    assert len(breakdown["subject"]) == 4
    overall = res["metrics"]["acc"]
    assert overall["n"] == sum(c["n"] for c in breakdown["category"].values())
    assert overall["value"] == pytest.approx(
        sum(c["value"] * c["n"] for c in breakdown["category"].values()) / overall["n"])


def test_gsm8k_reports_both_extractions(cli, eval_models_yaml, fixtures):
    res = cli.json("eval", "gsm8k", "--config", eval_models_yaml, "--data", fixtures / "gsm8k",
                   "--limit", 2, "--max-gen-tokens", 8, "--log-samples")
    assert set(res["metrics"]) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    first = res["samples"][0]
    assert set(first["extracted"]) == {"strict-match", "flexible-extract"}
    assert first["prompt"].count("Question: ") == 6  # 5-shot + the question
    assert first["target"].endswith("#### " + first["target"].split("#### ")[-1])


def test_human_output_has_a_results_table(cli, eval_models_yaml, fixtures):
    result = cli("eval", "mmlu", "--config", eval_models_yaml, "--data", fixtures / "mmlu",
                 "--limit", 1)
    assert result.exit_code == 0, result.output
    assert "acc" in result.stdout and "by category" in result.stdout
    assert "4 items from" in result.output


def test_list_show_compare(cli, eval_models_yaml, fixtures):
    tasks = cli.json("eval", "list")
    assert [t["task"] for t in tasks] == ["gsm8k", "mmlu", "mbpp", "summarization",
                                          "toxicity"]
    assert all(t["source"] and t["metrics"] and t["prompt"] for t in tasks)
    base = ["eval", "mmlu", "--config", eval_models_yaml, "--data", fixtures / "mmlu"]
    a = cli.json(*base, "--limit", 1)
    b = cli.json(*base, "--limit", 1, "--fresh")  # the same eval again: a new run
    assert a["run_id"] != b["run_id"]
    diff = cli.json("eval", "compare", a["run_id"], b["run_id"][:6])
    assert diff["items"] == {"common": 4, "identical": 4, "different": 0}
    assert diff["metrics"]["acc"]["delta"] == 0
    gen = cli.json(*base, "--limit", 1, "--generative", "--max-gen-tokens", 4)
    diff = cli.json("eval", "compare", a["run_id"], gen["run_id"])
    assert set(diff["metrics"]) == {"acc", "exact_match"}
    shown = cli("eval", "show", a["run_id"], "--samples", 1)
    assert shown.exit_code == 0 and "item 0" in shown.stdout


def _one_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def missing_column(tmp_path, fixtures):
    path = tmp_path / "bad.jsonl"
    rows = [json.loads(x) for x in (fixtures / "gsm8k" / "test.jsonl").read_text().splitlines()]
    path.write_text("".join(json.dumps({"question": r["question"]}) + "\n" for r in rows))
    return path


def test_bad_input_is_one_line(cli, eval_models_yaml, fixtures, missing_column, monkeypatch):
    cases = [
        (["eval", "bogus", "--model", "tiny"], 2, "unknown task 'bogus'"),
        (["eval", "gsm8k", "--config", eval_models_yaml, "--model", "nope", "--data",
          fixtures / "gsm8k"], 4, "model 'nope' is not configured"),
        (["eval", "gsm8k", "--config", eval_models_yaml, "--data", missing_column], 2,
         "missing column 'answer'"),
        (["eval", "mbpp", "--config", eval_models_yaml, "--data", fixtures / "mbpp"], 2,
         "--allow-code-execution"),
        (["eval", "gsm8k", "--config", eval_models_yaml, "--data", fixtures / "gsm8k" /
          "test.jsonl"], 2, "--fewshot-data"),
        (["eval", "mmlu", "--config", eval_models_yaml, "--data", fixtures / "mmlu",
          "--subjects", "astrology"], 2, "astrology"),
        (["eval", "gsm8k", "--through", "http://127.0.0.1:9"], 2, "--api-key"),
        (["eval", "show", "nosuchrun"], 4, "no eval run"),
    ]
    for args, code, text in cases:
        result = cli(*args)
        assert result.exit_code == code, (args, result.output)
        assert text in _one_line(result), args


def test_offline_hub_is_one_line_pointing_to_data(cli, eval_models_yaml, monkeypatch):
    from evalsuite import data

    monkeypatch.setattr(data, "_hub_reachable", lambda timeout=3.0: False)
    result = cli("eval", "gsm8k", "--config", eval_models_yaml,
                 env={"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"})
    assert result.exit_code == 1
    line = _one_line(result)
    assert "openai/gsm8k" in line and "not reachable" in line and "--data" in line
    # With the offline switches set, datasets' own error gives the same advice.
    line = _one_line(cli("eval", "mmlu", "--config", eval_models_yaml))
    assert "cais/mmlu" in line and "--data" in line


def test_missing_classifier_fails_before_the_model_loads(cli, eval_models_yaml, fixtures):
    res = cli("eval", "toxicity", "--config", eval_models_yaml, "--data",
              fixtures / "real_toxicity_prompts", "--limit", 1, "--classifier",
              "/nonexistent/classifier")
    assert res.exit_code == 2
    assert _one_line(res) == "error: toxicity classifier /nonexistent/classifier: no such directory"
