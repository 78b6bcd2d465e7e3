"""Run model-written Python with nothing at stake: the code sandbox behind mbpp.

Default mode, `bwrap`: each program runs under bubblewrap (a maintained sandbox tool,
https://github.com/containers/bubblewrap) in fresh user, PID, network, IPC, UTS and
cgroup namespaces. Its filesystem is a read-only root that holds only the system's
/usr (with /bin, /lib... links) and the interpreter's prefix: nothing else of the
host (no LLMCTL_HOME, no database, no repository, no home directory, no /run or /etc).
/tmp (its working directory) and /dev/shm are small private tmpfs mounts that vanish
with it, /proc is the namespace's own (the parent's environment is not there), the
network is a downed loopback (no host listener is reachable, abstract sockets
included), the environment is cleared, and when the outer bwrap dies, the namespace
and everything left in it die with it (`--die-with-parent`, PID namespace). As root
it also runs as an unused uid with no groups and at most NPROC processes, so a fork
bomb hits the limit. The kernel limits are set before it starts in either mode: CPU
seconds (RLIMIT_CPU), address space (RLIMIT_AS), file size (RLIMIT_FSIZE), no core
dumps; after a wall-clock timeout (3 s) the whole process group is SIGKILLed.

`rlimits-only` mode runs the program in a temporary directory, in its own process
group, with the same limits and a clean environment, and nothing else: it can read
and write whatever the current user can, use the network, and leave processes that
left its process group. It runs only when asked for by name
(LLMCTL_SANDBOX_MODE=rlimits-only); without bubblewrap the default mode refuses.
"""

from __future__ import annotations

import itertools
import math
import os
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
from typing import Literal

from server.errors import ConfigError

TIMEOUT_S = 3.0
MEMORY_BYTES = 1 << 30  # address space
FILE_BYTES = 16 << 20
NPROC = 8
OUTPUT_TAIL = 600
UID_BASE = 200_000  # unused uids, one per concurrent run
WORKDIR = "/tmp/work"

# The program runs under this stub, as in HF's code_eval: leaving early through
# SystemExit is not passing the tests.
RUNNER = ("import sys\n"
          "src = open('program.py', encoding='utf-8').read()\n"
          "sys.argv = ['program.py']\n"
          "try:\n"
          "    exec(compile(src, 'program.py', 'exec'), {'__name__': '__main__'})\n"
          "except SystemExit as exc:\n"
          "    sys.stderr.write(f'failed: SystemExit({exc.code!r})\\n')\n"
          "    sys.exit(1)\n")

Mode = Literal["bwrap", "rlimits-only"]
REFUSAL = ("the mbpp sandbox needs bubblewrap (`bwrap`, apt package `bubblewrap`) with "
           "working user namespaces: {why}. Install it, or set LLMCTL_SANDBOX_MODE="
           "rlimits-only to run model-written code with only CPU, memory and file-size "
           "limits: it can then read and write your files, use the network and leave "
           "processes behind")

_uids = itertools.count()
_uid_lock = threading.Lock()


@dataclass(frozen=True)
class SandboxConfig:
    """How programs are contained; from Settings (`sandbox_mode`, `sandbox_python`)."""

    mode: Mode = "bwrap"
    python: str | None = None  # the interpreter inside the sandbox
    hidden: tuple[str, ...] = ()  # host paths that must stay invisible (LLMCTL_HOME...)

    @classmethod
    def from_settings(cls, settings) -> SandboxConfig:
        hidden = [str(settings.home)]
        url = settings.sqlalchemy_url
        if url.startswith("sqlite:///"):
            hidden.append(str(Path(url.removeprefix("sqlite:///")).parent))
        return cls(settings.sandbox_mode,
                   str(settings.sandbox_python) if settings.sandbox_python else None,
                   tuple(hidden))


@dataclass
class SandboxResult:
    passed: bool
    status: str  # passed | failed | timeout | killed
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


@lru_cache(maxsize=8)
def _python(configured: str | None) -> str | None:
    """An interpreter an unprivileged uid can run (the venv's may sit under /root)."""
    for candidate in (configured, sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if candidate and os.path.exists(candidate) and _world_executable(candidate):
            return str(Path(candidate).resolve())
    return None


def _visible_roots(python: str) -> list[str]:
    """What the program sees of the host, read-only: /usr and the interpreter's prefix."""
    prefix = str(Path(python).parent.parent)
    roots = ["/usr"]
    if not (prefix + "/").startswith("/usr/"):
        roots.append(prefix)
    return roots


def _bwrap_argv(config: SandboxConfig, python: str) -> list[str]:
    argv = [shutil.which("bwrap") or "bwrap", "--unshare-all", "--die-with-parent",
            "--new-session", "--clearenv", "--hostname", "sandbox"]
    for root in _visible_roots(python):
        argv += ["--ro-bind", root, root]
    for top in ("bin", "sbin", "lib", "lib32", "lib64"):  # merged-/usr links, or bind them
        host = Path("/") / top
        if host.is_symlink():
            argv += ["--symlink", os.readlink(host), str(host)]
        elif host.is_dir():
            argv += ["--ro-bind", str(host), str(host)]
    for hidden in config.hidden:  # only if it lies inside what is visible
        if any(hidden == r or hidden.startswith(r + "/") for r in _visible_roots(python)):
            argv += ["--tmpfs", hidden]
    argv += ["--proc", "/proc", "--dev", "/dev",
             "--size", str(64 << 20), "--tmpfs", "/tmp",
             "--size", str(8 << 20), "--tmpfs", "/dev/shm",
             "--dir", WORKDIR, "--chdir", WORKDIR, "--file", "0", f"{WORKDIR}/program.py",
             "--remount-ro", "/",
             "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", WORKDIR,
             "--setenv", "TMPDIR", WORKDIR, "--setenv", "LANG", "C.UTF-8",
             "--setenv", "PYTHONHASHSEED", "0"]
    return argv + [python, "-I", "-B", "-c", RUNNER]


@lru_cache(maxsize=8)
def _bwrap_problem(config: SandboxConfig) -> str | None:
    """Why bubblewrap cannot run here (None when a probe run succeeds)."""
    if not shutil.which("bwrap"):
        return "bwrap is not on PATH"
    python = _python(config.python)
    if python is None:
        return "no interpreter that an unprivileged user can run (set LLMCTL_SANDBOX_PYTHON)"
    result = _run("assert 1 + 1 == 2\n", TIMEOUT_S, MEMORY_BYTES, config)
    if not result.passed:
        return f"a probe run failed ({result.status}: {result.detail[-200:]})"
    return None


def check(config: SandboxConfig) -> None:
    """Raise ConfigError when `config` cannot contain programs here (before any runs)."""
    if config.mode == "bwrap":
        why = _bwrap_problem(config)
        if why:
            raise ConfigError(REFUSAL.format(why=why))


def _limits(timeout: float, memory: int, nproc: int | None) -> list[str]:
    cpu = math.ceil(timeout) + 1
    limits = {"cpu": (cpu, cpu + 1), "as": (memory, memory), "fsize": (FILE_BYTES, FILE_BYTES),
              "core": (0, 0)}
    if nproc is not None:
        limits["nproc"] = (nproc, nproc)
    # util-linux `prlimit` sets them before exec: no Python between fork and exec,
    # which is unsafe in a threaded process.
    return ["prlimit", *(f"--{k}={soft}:{hard}" for k, (soft, hard) in limits.items()), "--"]


def _next_uid() -> int:
    with _uid_lock:
        return UID_BASE + (os.getpid() % 4000) * 64 + next(_uids) % 64


def _command(config: SandboxConfig, timeout: float, memory: int) -> list[str]:
    if config.mode == "rlimits-only":
        # RLIMIT_NPROC counts the user's processes and does not bind root.
        nproc = None if os.geteuid() == 0 else NPROC
        return [*_limits(timeout, memory, nproc), sys.executable, "-I", "-B", "-c", RUNNER]
    python = _python(config.python)
    if python is None:
        raise ConfigError(REFUSAL.format(why="no interpreter an unprivileged user can run"))
    if os.geteuid() != 0:
        # bwrap's user namespace already keeps the program from the user's other
        # processes; RLIMIT_NPROC would count all of them.
        return [*_limits(timeout, memory, None), *_bwrap_argv(config, python)]
    uid = str(_next_uid())
    return [*_limits(timeout, memory, NPROC), "setpriv", "--reuid", uid, "--regid", uid,
            "--clear-groups", *_bwrap_argv(config, python)]


def run_program(source: str, timeout: float = TIMEOUT_S, memory: int = MEMORY_BYTES,
                config: SandboxConfig = SandboxConfig()) -> SandboxResult:
    """Run `source` as a Python program; passed means it exited 0 within the limits.
    Raises ConfigError when the configured mode cannot run here."""
    check(config)
    return _run(source, timeout, memory, config)


def _run(source: str, timeout: float, memory: int, config: SandboxConfig) -> SandboxResult:
    staging = Path(tempfile.mkdtemp(prefix="llmctl-sandbox-"))
    try:
        (staging / "program.py").write_text(source, encoding="utf-8")
        argv = _command(config, timeout, memory)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(staging), "TMPDIR": str(staging),
               "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        # bwrap copies the program from its stdin into the sandbox (`--file 0`), which
        # leaves the program an empty stdin, as in the other mode.
        with open(staging / "output", "wb") as out, open(staging / "program.py", "rb") as prog:
            start = time.monotonic()
            proc = subprocess.Popen(argv, cwd=staging, env=env,
                                    stdin=prog if config.mode == "bwrap" else subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill(proc)
            seconds = time.monotonic() - start
        return _result(proc.returncode, timed_out, _tail(staging / "output"), seconds, timeout)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _kill(proc: subprocess.Popen) -> None:
    """Kill everything the program started: SIGKILL the process group (the outer bwrap,
    whose death takes the namespace's init and with it every process in the namespace),
    then wait until that init is gone, so nothing outlives the run."""
    inner = _children(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    deadline = time.monotonic() + 2.0
    while any(_alive(pid) for pid in inner) and time.monotonic() < deadline:
        time.sleep(0.01)


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


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
    if rc is not None and rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else rc
        why = {"SIGXCPU": "CPU time limit", "SIGXFSZ": "file size limit"}.get(str(name), "")
        return SandboxResult(False, "killed", f"killed by {name}" + (f" ({why})" if why else ""),
                             seconds, rc)
    return SandboxResult(False, "failed", tail[-OUTPUT_TAIL:], seconds, rc)
