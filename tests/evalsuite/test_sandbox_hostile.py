"""Hostile programs against the mbpp sandbox's default mode (bubblewrap).

Each program passes only if its escape worked (it read a secret, wrote a host path,
reached a listener...). In the default mode none may pass, the host must be
unchanged and nothing of LLMCTL_HOME may show in their output; the same programs
run in `rlimits-only` mode show that they are real escapes, and that this mode
contains none of them (as its name says)."""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

import pytest

from evalsuite import sandbox
from evalsuite.tasks import TaskOptions
from evalsuite.tasks.mbpp import MBPP
from server.config import Settings
from server.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
PREFIX = "llmctl-secret-"  # what programs look for; the rest shows only if read
SECRET = f"{PREFIX}{uuid.uuid4().hex}"
SHOW = f"\ni = data.index({PREFIX.encode()!r})\nprint(data[i:i + {len(SECRET)}])\n"
MARK = str(4000 + uuid.uuid4().int % 1000) + ".25"  # a sleep time no one else uses


@pytest.fixture
def host(tmp_path_factory):
    """A gateway's LLMCTL_HOME (SQLite DB holding a secret, 0644) outside /tmp, a 0666
    file in a 0777 directory, a process whose environment holds the secret, and
    listeners on loopback (TCP and an abstract unix socket)."""
    root = Path(tempfile.mkdtemp(prefix="llmctl-hostile-", dir="/var/tmp"))
    home = root / "home"
    home.mkdir()
    db = home / "llmctl.db"
    with sqlite3.connect(db) as conn:
        conn.execute("create table api_keys (secret text)")
        conn.execute("insert into api_keys values (?)", (SECRET,))
    os.chmod(home, 0o755)
    os.chmod(db, 0o644)
    shared = root / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    open_file = shared / "open.txt"
    open_file.write_text("original")
    os.chmod(open_file, 0o666)
    os.chmod(root, 0o755)
    gateway = subprocess.Popen(["sleep", "120"], env={"LLMCTL_ADMIN_KEY": SECRET})
    tcp = socket.create_server(("127.0.0.1", 0))
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0llmctl-hostile-{os.getpid()}")
    accepted = []
    stop = threading.Event()

    def accept(server):
        server.settimeout(0.1)
        server.listen(8)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                pass

    threads = [threading.Thread(target=accept, args=(s,)) for s in (tcp, abstract)]
    for t in threads:
        t.start()
    sentinels = [Path(f"/run/lock/llmctl-escape-{MARK}"), Path(f"/dev/shm/llmctl-escape-{MARK}"),
                 Path(f"/tmp/llmctl-escape-{MARK}"), shared / "created.txt",
                 REPO / f"llmctl-escape-{MARK}"]
    markers = [Path(f"/dev/shm/llmctl-host-{MARK}"), Path(f"/tmp/llmctl-host-{MARK}")]
    for marker in markers:
        marker.write_text("host")
    settings = Settings(home=home, _env_file=None)
    yield {"root": root, "db": db, "open": open_file, "shared": shared,
           "gateway": gateway, "tcp_port": tcp.getsockname()[1],
           "abstract": f"\0llmctl-hostile-{os.getpid()}", "accepted": accepted,
           "sentinels": sentinels, "markers": markers,
           "config": sandbox.SandboxConfig.from_settings(settings)}
    stop.set()
    for t in threads:
        t.join()
    for s in (tcp, abstract, *accepted):
        s.close()
    gateway.kill()
    gateway.wait()
    for path in sentinels + markers:
        path.unlink(missing_ok=True)
    shutil.rmtree(root)


def _programs(h) -> dict[str, str]:
    """name -> a program that exits 0 only when its escape worked."""
    db, shared, sentinel = str(h["db"]), str(h["shared"]), h["sentinels"]
    return {
        "read the SQLite DB in LLMCTL_HOME":
            f"data = open({db!r}, 'rb').read()" + SHOW,
        "read it through /proc/*/root":
            "import os\ndata = b''\nfor p in os.listdir('/proc'):\n    try:\n"
            f"        data += open(f'/proc/{{p}}/root{db}', 'rb').read()\n"
            "    except OSError:\n        pass" + SHOW,
        "read the parent's environment via /proc":
            "import os\ndata = b''\nfor p in os.listdir('/proc'):\n    try:\n"
            "        data += open(f'/proc/{p}/environ', 'rb').read()\n"
            "    except OSError:\n        pass" + SHOW,
        "write /run/lock": f"open({str(sentinel[0])!r}, 'w').write('x')",
        # /dev/shm and /tmp are private: writing there passes only with the host's marker
        "write /dev/shm": f"import os\nopen({str(sentinel[1])!r}, 'w').write('x')\n"
                          f"assert os.path.exists('/dev/shm/{h['markers'][0].name}')",
        "write /tmp": f"import os\nopen({str(sentinel[2])!r}, 'w').write('x')\n"
                      f"assert os.path.exists('/tmp/{h['markers'][1].name}')",
        "write the repository": f"open({str(sentinel[4])!r}, 'w').write('x')",
        "write a 0666 file": f"open({str(h['open'])!r}, 'w').write('pwned')",
        "relative path after chdir":
            f"import os\nos.chdir('/')\nopen({str(sentinel[0])[1:]!r}, 'w').write('x')",
        "relative path via dir_fd":
            f"import os\nd = os.open({shared!r}, os.O_RDONLY)\n"
            "os.write(os.open('created.txt', os.O_CREAT | os.O_WRONLY, 0o666, dir_fd=d), b'x')",
        "ctypes syscalls":
            "import ctypes\nlibc = ctypes.CDLL(None)\n"
            f"fd = libc.open({str(h['open']).encode()!r}, 1 | 0o1000)\n"
            "assert fd >= 0 and libc.write(fd, b'pwned', 5) == 5",
        "_posixsubprocess.fork_exec":
            "import _posixsubprocess, os, subprocess\n"
            f"subprocess.run(['/bin/sh', '-c', 'echo x > {sentinel[0]}; cat {db}'], check=True)\n"
            f"assert os.path.exists({str(sentinel[0])!r})",
        "os.system rm -rf": f"import os\nassert os.path.isdir({shared!r})\n"
                            f"assert os.system('rm -rf {shared}') == 0\n"
                            f"assert not os.path.exists({shared!r})",
        "reach a loopback listener":
            f"import socket\nsocket.create_connection(('127.0.0.1', {h['tcp_port']}), 2)",
        "reach an abstract unix socket":
            f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({h['abstract']!r})",
        "signal the gateway": f"import os\nos.kill({h['gateway'].pid}, 9)",
        "see LLMCTL_* in its environment": "import os\nassert any(k.startswith('LLMCTL') "
                                           "for k in os.environ)",
        "become root": "import os\nos.setuid(0)\nassert os.getuid() == 0\n"
                       f"open({str(sentinel[0])!r}, 'w')",
    }


def _host_unchanged(h):
    assert h["open"].read_text() == "original"
    for path in h["sentinels"]:
        assert not path.exists(), path
    assert h["shared"].is_dir()
    assert h["gateway"].poll() is None, "the sandboxed program killed a host process"
    assert not h["accepted"], "the sandboxed program reached a host listener"


def test_hostile_programs_change_nothing_and_read_nothing(host):
    config = host["config"]
    for name, program in _programs(host).items():
        result = sandbox.run_program(program, config=config)
        assert not result.passed, f"escaped: {name}"
        assert SECRET not in result.detail, name
        _host_unchanged(host)


def test_the_same_programs_escape_rlimits_only(host):
    """The programs are real escapes: without bubblewrap they get out (as root, the
    uid these tests run as; the mode's name says it contains only the limits)."""
    if os.geteuid() != 0:
        pytest.skip("some escapes need the host's root, which CI runs as")
    config = sandbox.SandboxConfig(mode="rlimits-only")
    programs = _programs(host)
    for name in ("read the SQLite DB in LLMCTL_HOME", "read the parent's environment via /proc",
                 "write a 0666 file", "relative path via dir_fd", "reach a loopback listener"):
        assert sandbox.run_program(programs[name], config=config).passed, name
    assert host["open"].read_text() == "pwned"


def _grandchildren() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True)
    return [int(line.split()[0]) for line in out.stdout.splitlines()
            if f"sleep {MARK}" in line and not line.split()[1].startswith("Z")]


@pytest.mark.parametrize("how", ["new session", "double fork"])
def test_no_process_outlives_the_run(how, host):
    spawn = {"new session": f"import subprocess\nsubprocess.Popen(['sleep', '{MARK}'], "
                            "start_new_session=True)\n",
             "double fork": f"import os\nif os.fork() == 0:\n    os.setsid()\n"
                            f"    if os.fork() == 0:\n        os.execv('/bin/sleep', "
                            f"['sleep', '{MARK}'])\n    os._exit(0)\nos.wait()\n"}[how]
    result = sandbox.run_program(spawn + "import time\ntime.sleep(0.2)\n",
                                 config=host["config"])
    assert result.passed, result.detail  # the program itself ran and left its daemon
    assert _grandchildren() == []


def test_llmctl_home_is_hidden_even_under_the_interpreter_prefix(host):
    """An interpreter installed where LLMCTL_HOME also lies: its prefix is visible (so
    that it runs), LLMCTL_HOME inside it is not."""
    prefix = host["root"] / "python"
    (prefix / "bin").mkdir(parents=True)
    shutil.copy2(os.path.realpath(sandbox._python(None)), prefix / "bin" / "python3")
    home = prefix / "home"
    shutil.copytree(host["db"].parent, home)
    config = sandbox.SandboxConfig.from_settings(Settings(home=home, _env_file=None,
                                                          sandbox_python=prefix / "bin/python3"))
    probe = (f"import os, sys\nassert sys.executable == {str(prefix / 'bin/python3')!r}\n"
             f"print(os.listdir({str(home)!r}))\n"
             f"data = open({str(home / 'llmctl.db')!r}, 'rb').read()" + SHOW)
    result = sandbox.run_program(probe, config=config)
    assert not result.passed and "FileNotFoundError" in result.detail, result.detail
    assert "[]" in result.detail  # the interpreter ran; the directory it saw was empty


def test_default_mode_refuses_without_bubblewrap(monkeypatch, tmp_path, host):
    """No bwrap: the default mode refuses (naming the opt-in and what it gives up),
    mbpp refuses before generating anything, and only the opt-in runs programs."""
    monkeypatch.setenv("PATH", str(tmp_path))
    sandbox._bwrap_problem.cache_clear()
    try:
        with pytest.raises(ConfigError, match="LLMCTL_SANDBOX_MODE=rlimits-only") as err:
            sandbox.run_program("assert True", config=host["config"])
        assert "read and write your files" in str(err.value)
        task = MBPP(TaskOptions(allow_code_execution=True, sandbox=host["config"]))
        with pytest.raises(ConfigError, match="bubblewrap"):
            task.check()
        monkeypatch.setenv("PATH", "/usr/bin:/bin")
        rlimits = Settings(sandbox_mode="rlimits-only", _env_file=None)
        opted_in = sandbox.SandboxConfig.from_settings(rlimits)
        assert sandbox.run_program("assert sum([1, 2]) == 3", config=opted_in).passed
    finally:
        sandbox._bwrap_problem.cache_clear()
    with pytest.raises(ValueError, match="sandbox_mode"):
        Settings(sandbox_mode="fallback", _env_file=None)


def test_sandbox_and_api_key_variables_come_through_settings(monkeypatch, tmp_path):
    from evalsuite.models import resolve_model

    monkeypatch.setenv("LLMCTL_SANDBOX_MODE", "rlimits-only")
    monkeypatch.setenv("LLMCTL_SANDBOX_PYTHON", "/usr/bin/python3")
    monkeypatch.setenv("LLMCTL_API_KEY", "llm_from_the_environment")
    settings = Settings(_env_file=None, home=tmp_path)
    config = sandbox.SandboxConfig.from_settings(settings)
    assert (config.mode, config.python) == ("rlimits-only", "/usr/bin/python3")
    assert str(tmp_path) in config.hidden
    choice = resolve_model(settings, name="tiny", through="http://127.0.0.1:9")
    assert choice.api_key == "llm_from_the_environment"
