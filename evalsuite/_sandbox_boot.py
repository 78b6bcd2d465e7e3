"""First stage of a sandboxed run, as PID 1 of fresh PID, network and mount namespaces.

Started by sandbox.py through `unshare` (as root): it covers /tmp, /var/tmp and
/dev/shm with small private tmpfs mounts (so nothing the program writes survives
it), makes a working directory there, drops to an unused uid/gid with no
supplementary groups and a process-count limit, and executes the guard
(_sandbox_guard.py) under the sandbox's Python. When the program (PID 1) exits or
is killed, the kernel kills everything else left in its PID namespace.

argv: STAGING_DIR UID NPROC PYTHON guard|bare
Standard library only: this file runs with `python -I -S`.
"""

import ctypes
import os
import resource
import sys

MS_NOSUID, MS_NODEV = 2, 4


def mount_tmpfs(target, size):
    libc = ctypes.CDLL(None, use_errno=True)
    if os.path.isdir(target):
        rc = libc.mount(b"tmpfs", target.encode(), b"tmpfs", MS_NOSUID | MS_NODEV,
                        f"size={size},mode=1777".encode())
        if rc != 0:
            raise OSError(ctypes.get_errno(), f"mount tmpfs on {target}")


def main():
    staging, uid, nproc, python = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    guarded = sys.argv[5] == "guard"
    with open(os.path.join(staging, "program.py"), "rb") as f:
        program = f.read()
    with open(os.path.join(staging, "guard.py"), "rb") as f:
        guard = f.read()
    for target, size in (("/tmp", "64m"), ("/var/tmp", "8m"), ("/dev/shm", "8m")):
        mount_tmpfs(target, size)
    work = "/tmp/work"
    os.mkdir(work, 0o700)
    for name, data in (("program.py", program), ("guard.py", guard)):
        with open(os.path.join(work, name), "wb") as f:
            f.write(data)
        os.chown(os.path.join(work, name), uid, uid)
    os.chown(work, uid, uid)
    os.chdir(work)
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
    os.execve(python, [python, "-I", "-B", *(["guard.py"] if guarded else []), "program.py"],
              env)


if __name__ == "__main__":
    main()
