"""`llmctl bench device` on the tiny test model."""

from __future__ import annotations

import json

from typer.testing import CliRunner

RESULT_FIELDS = {"batch_size", "prefill_s", "prefill_tokens_per_s", "decode_s",
                 "decode_tokens_per_s", "decode_step_ms", "peak_memory_mb"}


def test_device_writes_json_and_prints_a_table(cli_app, tiny_models_yaml, tmp_path):
    out = tmp_path / "device.json"
    result = CliRunner().invoke(cli_app, [
        "bench", "device", "--model", "tiny", "--config", tiny_models_yaml,
        "--batch-sizes", "1,3", "--prompt-len", "16", "--gen-len", "4", "--output", str(out)],
        terminal_width=160)
    assert result.exit_code == 0, result.output
    assert "decode tok/s" in result.output and "prefill tok/s" in result.output
    data = json.loads(out.read_text())
    assert data["benchmark"] == "device" and data["model"] == "tiny"
    assert data["device"] == "cpu" and data["dtype"] == "float32"
    assert data["prompt_len"] == 16 and data["gen_len"] == 4 and data["parameters"] > 0
    assert data["memory_measure"].startswith("process_rss_peak")
    assert [r["batch_size"] for r in data["results"]] == [1, 3]
    for r in data["results"]:
        assert RESULT_FIELDS <= set(r)
        assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
        assert r["peak_memory_mb"] > 0


def test_device_json_to_stdout(cli_app, tiny_models_yaml):
    result = CliRunner().invoke(cli_app, [
        "bench", "device", "--config", tiny_models_yaml, "--batch-sizes", "2",
        "--prompt-len", "8", "--gen-len", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"] == "tiny" and data["results"][0]["batch_size"] == 2


def test_device_bad_input(cli_app, tiny_models_yaml, tmp_path):
    runner = CliRunner()
    unknown = runner.invoke(cli_app, ["bench", "device", "--model", "nope",
                                      "--config", tiny_models_yaml])
    assert unknown.exit_code == 4 and "'nope'" in unknown.output and "tiny" in unknown.output
    sizes = runner.invoke(cli_app, ["bench", "device", "--config", tiny_models_yaml,
                                    "--batch-sizes", "4,-1"])
    assert sizes.exit_code == 2 and "--batch-sizes" in sizes.output
    remote = tmp_path / "remote.yaml"
    remote.write_text("models:\n  - id: r\n    type: remote\n    base_url: http://127.0.0.1:9\n")
    remote_run = runner.invoke(cli_app, ["bench", "device", "--config", str(remote)])
    assert remote_run.exit_code == 2 and "remote" in remote_run.output
    missing = tmp_path / "missing.yaml"
    missing.write_text(f"models:\n  - id: gone\n    path: {tmp_path / 'nowhere'}\n")
    load = runner.invoke(cli_app, ["bench", "device", "--config", str(missing)])
    assert load.exit_code == 2 and "cannot load model" in load.output
    for r in (unknown, sizes, remote_run, load):
        assert len(r.output.strip().splitlines()) == 1, r.output
