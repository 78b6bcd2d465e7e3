"""The mbpp sandbox: hand-verified programs score right, and runaway programs stop
at their limits in both modes (test_sandbox_hostile.py: what only bwrap holds)."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from evalsuite import sandbox
from evalsuite.tasks.mbpp import FEWSHOT


def _mbpp_docs(fixtures):
    return [json.loads(x) for x in (fixtures / "mbpp" / "test.jsonl").read_text().splitlines()]


BWRAP = sandbox.SandboxConfig()
RLIMITS_ONLY = sandbox.SandboxConfig(mode="rlimits-only")


@pytest.fixture(params=[pytest.param(BWRAP, id="bwrap"),
                        pytest.param(RLIMITS_ONLY, id="rlimits-only")])
def run(request):
    """Both modes: what they share (limits, timeout, scoring)."""
    return lambda source, **kw: sandbox.run_program(source, config=request.param, **kw)


def test_hand_verified_programs(fixtures):
    """The reference solutions pass, broken ones fail: what pass@1 counts."""
    docs = _mbpp_docs(fixtures) + [dict(s) for s in FEWSHOT]
    for doc in docs:
        tests = "\n".join(doc["test_list"])
        good = sandbox.run_program(f"{doc['code']}\n{tests}")
        assert good.passed, (doc["task_id"], good.detail)
        broken = doc["code"].replace("return", "return None and", 1)
        bad = sandbox.run_program(f"{broken}\n{tests}")
        assert not bad.passed and bad.status == "failed", doc["task_id"]
    # A completion that stops early is not a pass (HF code_eval counts it failed).
    assert sandbox.run_program("import sys\nsys.exit(0)\nassert False").status == "failed"


def test_infinite_loop_is_killed_at_the_timeout(run):
    start = time.monotonic()
    result = run("while True:\n    pass\n", timeout=2.0)
    assert not result.passed and result.status in ("timeout", "killed")
    assert time.monotonic() - start < 4.0


def test_fork_bomb_is_contained(run):
    bomb = ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
            "        pass\n")
    start = time.monotonic()
    result = run(bomb, timeout=2.0)
    assert not result.passed
    assert time.monotonic() - start < 5.0
    # Nothing it started is left running (a zombie is dead; the host's init reaps it).
    for _ in range(20):
        ps = subprocess.run(["ps", "-eo", "uid=,pid=,stat=,args="], capture_output=True,
                            text=True).stdout
        leftovers = [line for line in ps.splitlines()
                     if (int(line.split()[0]) >= sandbox.UID_BASE or "program.py" in line)
                     and not line.split()[2].startswith("Z")]
        if not leftovers:
            break
        time.sleep(0.25)
    assert not leftovers, leftovers


def test_memory_hog_fails_at_the_memory_limit(run):
    hog = "chunks = []\nwhile True:\n    chunks.append(bytearray(64 * 2**20))\n"
    start = time.monotonic()
    result = run(hog)
    assert not result.passed
    assert "MemoryError" in result.detail or result.status == "killed"
    assert time.monotonic() - start < 4.0


def test_endless_output_is_bounded(run):
    result = run("while True:\n    print('x' * 1000)\n", timeout=2.0)
    assert not result.passed
    assert len(result.detail) <= sandbox.OUTPUT_TAIL + 100




def test_its_working_directory_is_writable(run):
    assert run("open('scratch.txt', 'w').write('ok')\n"
               "assert open('scratch.txt').read() == 'ok'\n").passed
