"""Runs one sandboxed program (argv[1]) in the current directory, under an audit hook.

Executed by the sandbox's own interpreter, already unprivileged (see sandbox.py).
The hook (PEP 578) ends the program with exit status 97 at the first attempt to
start a process, open a network connection, load native code through ctypes,
signal another process, or write, delete or rename anything outside the working
directory. The kernel-level limits in sandbox.py hold even if this hook is
bypassed; the hook makes every such attempt a recorded failure.
Standard library only: this file runs outside the project's environment.
"""

import os
import sys

WORK = os.path.realpath(os.getcwd())
BLOCKED = 97

DENY = {
    "os.system", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn",
    "os.startfile", "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg",
    "signal.pthread_kill", "socket.connect", "socket.bind", "socket.sendto",
    "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname", "ctypes.dlopen",
    "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "os.setuid", "os.setgid",
    "os.chroot", "os.putenv", "os.unsetenv", "resource.setrlimit", "resource.prlimit",
    "sys.addaudithook", "sys.setprofile", "sys.settrace", "mmap.__new__", "winreg.OpenKey",
}
PATH_EVENTS = {  # event -> positions of path arguments that must stay inside WORK
    "os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.replace": (0, 1),
    "os.mkdir": (0,), "os.symlink": (0, 1), "os.link": (0, 1), "os.truncate": (0,),
    "os.chmod": (0,), "os.chown": (0,), "os.chflags": (0,), "os.utime": (0,),
    "os.mkfifo": (0,), "os.mknod": (0,), "shutil.rmtree": (0,), "shutil.move": (0, 1),
    "shutil.copyfile": (1,), "shutil.copytree": (1,), "os.setxattr": (0,),
    "os.removexattr": (0,),
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _deny(what):
    try:
        os.write(2, f"\nsandbox: blocked {what}\n".encode())
    finally:
        os._exit(BLOCKED)


def _inside(path):
    if isinstance(path, int):
        return True  # an already-open descriptor was checked when it was opened
    try:
        path = os.fsdecode(path)
    except TypeError:
        return False
    real = os.path.realpath(os.path.join(WORK, path))
    return real == WORK or real.startswith(WORK + os.sep)


def _hook(event, args):
    if event in DENY:
        _deny(event)
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None, 0))[:3]
        writing = bool((flags or 0) & WRITE_FLAGS) or bool(mode and set(str(mode)) & set("wax+"))
        if writing and not _inside(path):
            _deny(f"write to {path!r}")
    elif event in PATH_EVENTS:
        for i in PATH_EVENTS[event]:
            if i < len(args) and args[i] is not None and not _inside(args[i]):
                _deny(f"{event} {args[i]!r}")


def main():
    program = sys.argv[1]
    with open(program, encoding="utf-8") as f:
        source = f.read()
    code = compile(source, program, "exec")
    sys.argv = [program]
    sys.path.insert(0, WORK)
    sys.addaudithook(_hook)
    namespace = {"__name__": "__main__", "__file__": program, "__builtins__": __builtins__}
    try:
        exec(code, namespace)
    except SystemExit as exc:
        # As in HF's code_eval: leaving early is not passing the tests.
        sys.stderr.write(f"failed: SystemExit({exc.code!r})\n")
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
