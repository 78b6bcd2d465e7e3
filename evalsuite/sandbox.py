"""Run model-written Python with nothing at stake: the code sandbox behind mbpp.

Every program runs in its own process (and process group, `start_new_session`),
with a wall-clock timeout (3 s) after which the whole group is SIGKILLed, and with
kernel limits inherited from the start: CPU seconds (RLIMIT_CPU), address space
(RLIMIT_AS), file size (RLIMIT_FSIZE), no core dumps. Inside, an audit hook
(_sandbox_guard.py) fails the program at its first attempt to start a process,
connect to the network, use ctypes, or write outside its working directory.

Isolated mode (as root, with util-linux `unshare`; used where available): the
program also gets fresh PID, network and mount namespaces (no network device but
a downed loopback; /tmp, /var/tmp and /dev/shm are private tmpfs mounts that vanish
with it; when it ends the kernel kills every process it left), and runs as an
unused uid with no groups and RLIMIT_NPROC 8, so a fork bomb hits the limit and
nothing owned by anyone else is writable.

Fallback mode (not root, or no namespaces): the same process group, limits and
audit hook in a temporary directory, run as the current user. `mode()` says which
is in use; the README spells out the difference.
"""

from __future__ import annotations

import itertools
import math
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
GUARD = HERE / "_sandbox_guard.py"
BOOT = HERE / "_sandbox_boot.py"

TIMEOUT_S = 3.0
MEMORY_BYTES = 1 << 30  # address space
FILE_BYTES = 16 << 20
NPROC = 8
BLOCKED_EXIT = 97
OUTPUT_TAIL = 600
UID_BASE = 200_000  # unused uids, one per concurrent run

_uids = itertools.count()
_uid_lock = threading.Lock()


@dataclass
class SandboxResult:
    passed: bool
    status: str  # passed | failed | timeout | blocked | killed
    detail: str  # the tail of the program's output, or why it was stopped
    seconds: float
    returncode: int | None


def _world_executable(path: str) -> bool:
    """True when every directory on the way and the file itself are usable by others."""
    p = Path(path).resolve()
    try:
        for part in [*reversed(p.parents), p]:
            mode = part.stat().st_mode
            need = stat.S_IXOTH | (stat.S_IROTH if part == p else 0)
            if mode & need != need:
                return False
    except OSError:
        return False
    return True


@lru_cache(maxsize=1)
def _isolated_python() -> str | None:
    """An interpreter an unprivileged uid can run (the venv's may sit under /root)."""
    for candidate in (os.environ.get("LLMCTL_SANDBOX_PYTHON"), sys.executable,
                      "/usr/bin/python3", "/usr/local/bin/python3"):
        if candidate and os.path.exists(candidate) and _world_executable(candidate):
            return candidate
    return None


def mode() -> str:
    """`isolated` (namespaces + unprivileged uid) or `fallback`; LLMCTL_SANDBOX_MODE=fallback
    forces the fallback."""
    if os.environ.get("LLMCTL_SANDBOX_MODE") == "fallback":
        return "fallback"
    return "isolated" if _namespaces_work() else "fallback"


@lru_cache(maxsize=1)
def _namespaces_work() -> bool:
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or not unshare or not _isolated_python():
        return False
    probe = subprocess.run([unshare, "--net", "--pid", "--mount", "--fork", "--kill-child",
                            "--mount-proc", "true"], capture_output=True, timeout=10)
    return probe.returncode == 0


def _limit_values(timeout: float, memory: int, nproc: int | None) -> dict[str, tuple]:
    cpu = math.ceil(timeout) + 1
    limits = {"cpu": (cpu, cpu + 1), "as": (memory, memory), "fsize": (FILE_BYTES, FILE_BYTES),
              "core": (0, 0)}
    if nproc is not None:
        limits["nproc"] = (nproc, nproc)
    return limits


def _with_limits(argv: list[str], limits: dict[str, tuple]) -> tuple[list[str], object]:
    """Apply the limits through util-linux `prlimit` (no Python between fork and exec,
    which is unsafe in a threaded process); without it, through a preexec_fn."""
    prlimit = shutil.which("prlimit")
    if prlimit:
        return [prlimit, *(f"--{k}={soft}:{hard}" for k, (soft, hard) in limits.items()),
                "--", *argv], None
    names = {"cpu": resource.RLIMIT_CPU, "as": resource.RLIMIT_AS,
             "fsize": resource.RLIMIT_FSIZE, "core": resource.RLIMIT_CORE,
             "nproc": resource.RLIMIT_NPROC}

    def apply() -> None:
        for k, value in limits.items():
            resource.setrlimit(names[k], value)

    return argv, apply


def _next_uid() -> int:
    with _uid_lock:
        return UID_BASE + (os.getpid() % 4000) * 64 + next(_uids) % 64


def run_program(source: str, timeout: float = TIMEOUT_S, memory: int = MEMORY_BYTES,
                guard: bool = True) -> SandboxResult:
    """Run `source` as a Python program; passed means it exited 0 within the limits.

    `guard=False` leaves out the audit hook, so tests can show that the kernel-level
    containment holds on its own."""
    staging = Path(tempfile.mkdtemp(prefix="llmctl-sandbox-"))
    try:
        (staging / "program.py").write_text(source, encoding="utf-8")
        shutil.copyfile(GUARD, staging / "guard.py")
        isolated = mode() == "isolated"
        env = {"PATH": "/usr/bin:/bin", "HOME": str(staging), "TMPDIR": str(staging),
               "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        if isolated:
            argv = [shutil.which("unshare"), "--net", "--pid", "--mount", "--ipc", "--uts",
                    "--fork", "--kill-child", "--mount-proc", sys.executable, "-I", "-S",
                    str(BOOT), str(staging), str(_next_uid()), str(NPROC), _isolated_python(),
                    "guard" if guard else "bare"]
            nproc = None  # set by the boot stage, for the unprivileged uid
        else:
            argv = [sys.executable, "-I", "-B", *(["guard.py"] if guard else []), "program.py"]
            # RLIMIT_NPROC counts the user's processes and does not bind root.
            nproc = None if os.geteuid() == 0 else NPROC
        argv, preexec = _with_limits(argv, _limit_values(timeout, memory, nproc))
        with open(staging / "output", "wb") as out:
            start = time.monotonic()
            proc = subprocess.Popen(argv, cwd=staging, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=preexec)
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill(proc)
            seconds = time.monotonic() - start
        tail = _tail(staging / "output")
        return _result(proc.returncode, timed_out, tail, seconds, timeout)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _kill(proc: subprocess.Popen) -> None:
    """Kill everything the program started. Isolated: SIGKILL the namespace's init (the
    kernel then kills every process in the namespace) and let `unshare` reap it, so
    nothing is orphaned; then the whole process group, in either mode."""
    if proc.poll() is None:
        for child in _children(proc.pid):
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - OUTPUT_TAIL))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _result(rc: int | None, timed_out: bool, tail: str, seconds: float,
            timeout: float) -> SandboxResult:
    if timed_out:
        return SandboxResult(False, "timeout", f"killed after {timeout:g} s wall time",
                             seconds, rc)
    if rc == 0:
        return SandboxResult(True, "passed", "", seconds, rc)
    if rc == BLOCKED_EXIT:
        line = next((x for x in reversed(tail.splitlines()) if x.startswith("sandbox:")),
                    "sandbox: blocked")
        return SandboxResult(False, "blocked", line, seconds, rc)
    if rc is not None and rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else rc
        why = {"SIGXCPU": "CPU time limit", "SIGXFSZ": "file size limit"}.get(str(name), "")
        return SandboxResult(False, "killed", f"killed by {name}" + (f" ({why})" if why else ""),
                             seconds, rc)
    return SandboxResult(False, "failed", tail[-OUTPUT_TAIL:], seconds, rc)
