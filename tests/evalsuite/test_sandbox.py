"""The mbpp sandbox: hand-verified programs score right, and hostile programs fail
within their limits while the host and the repository stay untouched."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from evalsuite import sandbox
from evalsuite.tasks.mbpp import FEWSHOT

REPO = Path(__file__).resolve().parents[2]
PROTECTED = REPO / "evalsuite" / "fixtures"


def _mbpp_docs(fixtures):
    return [json.loads(x) for x in (fixtures / "mbpp" / "test.jsonl").read_text().splitlines()]


def _digest(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        h.update(str(path.relative_to(directory)).encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


MODES = [pytest.param(("isolated", True), id="isolated"),
         pytest.param(("isolated", False), id="isolated-kernel-only"),
         pytest.param(("fallback", True), id="fallback")]


@pytest.fixture(params=MODES)
def run(request, monkeypatch):
    mode, guard = request.param
    if mode == "fallback":
        monkeypatch.setenv("LLMCTL_SANDBOX_MODE", "fallback")
    elif sandbox.mode() != "isolated":
        pytest.skip("isolated mode needs root and util-linux unshare")
    return lambda source, **kw: sandbox.run_program(source, guard=guard, **kw)


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
    assert "MemoryError" in result.detail or result.status in ("blocked", "killed")
    assert time.monotonic() - start < 4.0


def test_write_outside_its_directory_fails(run, tmp_path):
    host_file = tmp_path / "host.txt"
    repo_file = REPO / "SANDBOX_ESCAPE.txt"
    for target in (host_file, repo_file, Path.home() / "SANDBOX_ESCAPE.txt"):
        program = (f"with open({str(target)!r}, 'w') as f:\n    f.write('escaped')\n"
                   "def f(x):\n    return x\nassert f(1) == 1\n")
        result = run(program)
        assert not result.passed, target
        assert not target.exists(), target
    # Its own directory is writable.
    assert run("open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == "
               "'ok'\n").passed


def test_network_connection_fails(run):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted = []
    finished = threading.Event()

    def accept():
        while not finished.is_set():
            try:
                conn, _ = server.accept()
                accepted.append(conn)
            except OSError:
                pass

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        program = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), "
                   "timeout=2)\ns.sendall(b'hi')\n")
        result = run(program)
    finally:
        finished.set()
        thread.join()
        server.close()
    assert not result.passed
    assert not accepted, "the sandboxed program reached a socket on the host"


def test_rm_rf_leaves_host_and_repository_untouched(run, tmp_path):
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep.txt").write_text("keep")
    os.chmod(tmp_path, 0o755)
    before = _digest(PROTECTED)
    # The program passes only if it saw its targets and they are gone afterwards. Where
    # the repository lies under /tmp (a CI clone), the isolated sandbox's private /tmp
    # hides it altogether, and the program fails at the first check.
    program = (f"import os\nassert os.path.exists({str(PROTECTED)!r})\n"
               f"os.system('rm -rf {canary} {PROTECTED}')\n"
               f"assert not os.path.exists({str(PROTECTED)!r})\n")
    result = run(program)
    assert not result.passed
    assert (canary / "keep.txt").read_text() == "keep"
    assert _digest(PROTECTED) == before


def test_endless_output_is_bounded(run):
    result = run("while True:\n    print('x' * 1000)\n", timeout=2.0)
    assert not result.passed
    assert len(result.detail) <= sandbox.OUTPUT_TAIL + 100


def test_isolated_mode_is_used_here():
    """This machine (root, util-linux) gets the namespaces; CI must not silently lose them."""
    if os.geteuid() != 0:
        pytest.skip("not root")
    assert sandbox.mode() == "isolated"
