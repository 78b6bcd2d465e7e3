"""`llmctl eval suite`: gates and their exit codes, CI reports, suite runs in the
database, the gateway's eval-score gauges, the cron lock and resuming a killed suite."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
import xml.etree.ElementTree as ET

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from evalsuite.suite import SuiteBusy, SuiteLock
from tests.plugins.live import LLMCTL


def write_suite(path, fixtures, models_yaml, *, gsm8k_gate: float, name: str = "ci",
                gsm8k_limit: int = 2, max_gen: int = 8, batch_size: int = 2) -> str:
    suite = {"name": name, "models": ["tiny"], "config": str(models_yaml),
             "batch_size": batch_size, "tasks": [
                 {"task": "mmlu", "data": str(fixtures / "mmlu"), "limit": 1,
                  "gates": {"acc": 0.0}},
                 {"task": "gsm8k", "data": str(fixtures / "gsm8k"), "limit": gsm8k_limit,
                  "max_gen_tokens": max_gen, "gates": {"exact_match,strict-match": gsm8k_gate}},
                 {"task": "mbpp", "data": str(fixtures / "mbpp"), "limit": 1,
                  "max_gen_tokens": max_gen, "allow_code_execution": True}]}
    path.write_text(yaml.safe_dump(suite))
    return str(path)


def test_suite_gates_reports_and_metrics(cli, tmp_path, fixtures, eval_models_yaml,
                                         live_server_factory):
    failing = write_suite(tmp_path / "failing.yaml", fixtures, eval_models_yaml,
                          gsm8k_gate=0.5)
    junit, md = tmp_path / "out" / "junit.xml", tmp_path / "out" / "summary.md"
    result = cli("eval", "suite", failing, "--report", f"junit={junit}",
                 "--report", f"markdown={md}")
    # The random test model scores 0 on gsm8k: its gate fails, mmlu's passes.
    assert result.exit_code == 1, result.output
    assert "gate failed: gsm8k · tiny · exact_match,strict-match >= 0.5" in result.output
    root = ET.parse(junit).getroot()
    cases = root.findall(".//testcase")
    assert len(cases) == 2 and root.get("failures") == "1"
    failures = [c for c in cases if c.find("failure") is not None]
    assert len(failures) == 1 and failures[0].get("classname") == "gsm8k.tiny"
    assert "= 0.0000, required >= 0.5" in failures[0].find("failure").get("message")
    summary = md.read_text()
    assert "| mmlu | tiny |" in summary and "| mbpp | tiny |" in summary
    assert "❌ FAIL" in summary and "Gates: 1 passed, 1 failed" in summary

    passing = write_suite(tmp_path / "passing.yaml", fixtures, eval_models_yaml, gsm8k_gate=0.0)
    result = cli("eval", "suite", passing, "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith("gates 2 passed, 0 failed")
    assert result.stdout.count("gates") == 1, result.stdout
    assert len(result.stdout.strip().splitlines()) == 1

    suites = cli.json("eval", "runs", "--suite")
    assert [s["status"] for s in suites] == ["finished", "finished"]
    shown = cli.json("eval", "show", suites[0]["suite_run_id"])
    assert sorted(r["task"] for r in shown["runs"]) == ["gsm8k", "mbpp", "mmlu"]
    assert all(g["passed"] for g in shown["results"]["gates"])

    # The gateway on the same database exports the latest score of each task.
    server = live_server_factory(eval_models_yaml, home=cli.home)
    families = {f.name: f for f in text_string_to_metric_families(
        httpx.get(server.url + "/metrics").text)}
    scores = {(s.labels["task"], s.labels["metric"]): s.value
              for s in families["llmctl_eval_score"].samples if s.labels["model_name"] == "tiny"}
    latest = {r["task"]: r for r in shown["runs"]}
    assert scores[("mmlu", "acc")] == latest["mmlu"]["metrics"]["metrics"]["acc"]["value"]
    assert ("gsm8k", "exact_match,flexible-extract") in scores and ("mbpp", "pass@1") in scores
    stamps = {s.labels["task"]: s.value
              for s in families["llmctl_eval_run_timestamp_seconds"].samples}
    assert abs(stamps["mmlu"] - time.time()) < 600


def _samples(db: str, task: str) -> list[tuple[int, int]]:
    if not os.path.exists(db):
        return []
    try:
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT s.id, s.item_index FROM eval_samples s JOIN eval_runs "
                                "r ON s.run_id = r.id WHERE r.task = ? ORDER BY s.id",
                                (task,)).fetchall()
    except sqlite3.OperationalError:  # not migrated yet, or busy
        return []


def test_overlapping_suites_lock_and_a_killed_suite_resumes(tmp_path, fixtures,
                                                            eval_models_yaml):
    suite = write_suite(tmp_path / "nightly.yaml", fixtures, eval_models_yaml, gsm8k_gate=0.0,
                        name="nightly", gsm8k_limit=8, max_gen=48, batch_size=1)
    env = {**os.environ, "LLMCTL_HOME": str(tmp_path / "home")}
    db = str(tmp_path / "home" / "llmctl.db")
    cmd = [LLMCTL, "eval", "suite", suite]
    first, second = (subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for _ in range(2))
    try:
        # One of the two gets the lock; the other says so and exits 6 at once.
        deadline = time.monotonic() + 120
        while first.poll() is None and second.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        loser, winner = (first, second) if first.poll() is not None else (second, first)
        assert loser.wait() == 6
        message = loser.stderr.read()
        assert "suite 'nightly' is already running (pid" in message, message
        assert winner.poll() is None
        # Kill the winner once gsm8k has scored some items but not all.
        while len(_samples(db, "gsm8k")) < 2 and time.monotonic() < deadline:
            assert winner.poll() is None, winner.stderr.read()
            time.sleep(0.05)
        winner.send_signal(signal.SIGKILL)
        winner.wait()
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
    before = _samples(db, "gsm8k")
    assert 2 <= len(before) < 8

    resumed = subprocess.run([*cmd, "--resume", "--json"], env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    out = json.loads(resumed.stdout)
    assert out["resumed"] is True
    assert "mmlu on tiny: kept finished run" in resumed.stderr
    assert f"{len(before)}/8 items already scored" in resumed.stderr
    after = _samples(db, "gsm8k")
    # The stored items were kept as they were; only the others were added.
    assert after[:len(before)] == before
    assert sorted(i for _, i in after) == list(range(8))


def test_task_command_gates_and_bad_gate_input(cli, tmp_path, fixtures, eval_models_yaml):
    base = ["eval", "mmlu", "--config", eval_models_yaml, "--data", fixtures / "mmlu",
            "--limit", 1]
    failed = cli(*base, "--fail-under", "acc=1.01", "--report", f"json={tmp_path / 'r.json'}")
    assert failed.exit_code == 1 and "gate failed: mmlu · tiny · acc >= 1.01" in failed.output
    assert json.loads((tmp_path / "r.json").read_text())["gates"][0]["passed"] is False
    assert cli(*base, "--fail-under", "acc=0").exit_code == 0
    bad = cli(*base, "--fail-under", "acc")
    assert bad.exit_code == 2 and "expected METRIC=NUMBER" in bad.output
    suite = tmp_path / "bad.yaml"
    suite.write_text(yaml.safe_dump({"models": ["tiny"], "tasks": [
        {"task": "mmlu", "gates": {"accuracy": 0.5}}]}))
    bad = cli("eval", "suite", suite)
    assert bad.exit_code == 2 and "tasks.0.gates: mmlu has no metric 'accuracy'" in bad.output
    assert "Traceback" not in bad.output


def test_tasks_on_one_model_share_one_loaded_model(tmp_path, fixtures):
    from evalsuite import runner
    from evalsuite import suite as suite_mod
    from evalsuite.remote_model import OpenAIModel
    from server.db.engine import Database

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"choices": [{"index": 0, "text": " 42"}]})

    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump({"models": ["a", "b"], "tasks": [
        {"task": "gsm8k", "data": str(fixtures / "gsm8k"), "limit": 2},
        {"task": "summarization", "data": str(fixtures / "cnn_dailymail"), "limit": 2}]}))
    opened: list[str] = []

    def open_model(name):
        opened.append(name)
        return OpenAIModel("http://fake", name, transport=httpx.MockTransport(answer))

    hooks = suite_mod.Hooks(open_model=open_model, label=lambda name: name,
                            run_task=lambda prepared, model, **kw: runner.run_eval(
                                prepared, model, db, model_identity=model.identity(), **kw))
    db = Database(f"sqlite:///{tmp_path / 'eval.db'}")
    result = suite_mod.run(suite_mod.load(path), db, hooks)
    assert opened == ["a", "b"]  # once per model, not once per task
    assert [(r["task"], r["model"]) for r in result.runs] == [
        ("gsm8k", "a"), ("summarization", "a"), ("gsm8k", "b"), ("summarization", "b")]


def test_a_suite_locked_but_not_yet_labelled_is_reported_with_its_holder(tmp_path):
    # The holder writes its pid just after taking the lock; a second run that looks in
    # between still names it (a clean CI run once caught that window).
    lock = SuiteLock(tmp_path, "nightly")
    lock.path.parent.mkdir(parents=True)
    fd = os.open(lock.path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    label = threading.Timer(0.2, os.write, (fd, b"pid 4242, since now"))
    label.start()
    try:
        with pytest.raises(SuiteBusy, match=r"already running \(pid 4242, since now\)"):
            with lock:
                pass
    finally:
        label.join()
        os.close(fd)
    with lock:  # free again once the holder is gone
        assert "pid" in lock.path.read_text()
