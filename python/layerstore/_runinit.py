"""The process side of :func:`layerstore.run`: namespaces, mounts, ``pivot_root``, exec.

Started by ``_run.py`` as a fresh interpreter (``python -I -S _runinit.py SPEC``), so it forks
from a single-threaded process that imported nothing but the standard library. Three processes:

* the *keeper* (this script's first process) unshares the mount, UTS, IPC, PID and (unless the
  host network is asked for) network namespaces, forks the init, forwards signals to it and
  exits with its status;
* the *init* is PID 1 of the new PID namespace: it makes every mount private, sets up the root
  (``/proc``, a tmpfs ``/dev`` with the host's null, zero, full, random, urandom and tty bound
  in, ``/dev/pts``, ``/dev/shm``, ``/etc/hosts`` and ``/etc/resolv.conf`` bound read-only),
  brings ``lo`` up, ``pivot_root``\\s into it and forks the command; then it forwards signals to
  the command (SIGINT to every process of the namespace, as Ctrl-C reaches a terminal's
  foreground group) and reaps every zombie until the command exits, and exits with its status
  (128 + n for a signal n, as shells say). PID 1 ignores signals it has no handler for, which is
  why the command is PID 2: a ``kill`` reaches it as it would anywhere else;
* the *command*, which drops to the user's groups, gid and uid and ``execvpe``\\s.

A setup failure is written to the error descriptor (``spec["errfd"]``) and ends the keeper
with status 125; a command that cannot be executed gives 127 (not found) or 126, as shells do.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import signal
import socket
import struct
import sys
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 1
# pivot_root(2) has no glibc wrapper: the syscall by number, per architecture.
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
SETUP_FAILED = 125

_libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    """A step of the container's setup failed (its message says which)."""


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    enc = os.fsencode
    _check(
        _libc.mount(
            enc(source) if source else None,
            enc(target),
            enc(fstype) if fstype else None,
            ctypes.c_ulong(flags),
            enc(data) if data else None,
        ),
        f"mount {target}",
    )


def _status(wait_status: int) -> int:
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def _forward_to(pid: int, *, broadcast_sigint: bool = False) -> None:
    """Forward the usual signals to ``pid``; in the init (``broadcast_sigint``), SIGINT goes to
    every process of the namespace (``kill(-1)``), as a terminal's Ctrl-C reaches the whole
    foreground process group: a shell waiting for ``sleep`` would otherwise wait it out."""

    def handler(signum: int, _frame: object) -> None:
        target = -1 if broadcast_sigint and signum == signal.SIGINT else pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signum)

    for sig in FORWARDED:
        signal.signal(sig, handler)


def _setup_dev(root: str) -> None:
    dev = root + "/dev"
    _mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=65536k")
    for name in DEVICES:
        node = f"{dev}/{name}"
        with open(node, "w"):
            pass
        _mount("/dev/" + name, node, None, MS_BIND)
    os.mkdir(dev + "/pts", 0o755)
    _mount(
        "devpts",
        dev + "/pts",
        "devpts",
        MS_NOSUID | MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=620",
    )
    os.symlink("pts/ptmx", dev + "/ptmx")
    os.mkdir(dev + "/shm", 0o1777)
    _mount("shm", dev + "/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777,size=65536k")
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", f"{dev}/{name}")
    os.symlink("/proc/self/fd", dev + "/fd")


def _bind_ro(source: str, target: str) -> None:
    _mount(source, target, None, MS_BIND)
    _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        import fcntl

        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def _pivot(root: str) -> None:
    number = SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise SetupError(f"pivot_root: unknown syscall number on {os.uname().machine}")
    os.chdir(root)
    # pivot_root(".", ".") stacks the old root under the new one; unmounting it detaches the
    # host's tree without a put_old directory in the image.
    _check(_libc.syscall(number, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")


def _setup_root(spec: dict[str, Any]) -> None:
    root = spec["root"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount(root, root, None, MS_BIND | MS_REC)
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _setup_dev(root)
    for name in ("hosts", "resolv.conf"):
        if os.path.exists("/etc/" + name):
            _bind_ro("/etc/" + name, f"{root}/etc/{name}")
    if spec["network"] == "private":
        _loopback_up()
    hostname = spec["hostname"].encode()
    _check(_libc.sethostname(hostname, len(hostname)), "sethostname")
    _pivot(root)


def _exec(spec: dict[str, Any]) -> None:
    """In the command's process: become the user, enter the working directory, exec."""
    errfd = spec["errfd"]
    try:
        os.setgroups(spec["groups"])
        os.setgid(spec["gid"])
        os.setuid(spec["uid"])
        os.chdir(spec["cwd"])
    except OSError as e:
        os.write(errfd, f"cannot become {spec['uid']}:{spec['gid']} in {spec['cwd']}: {e}".encode())
        os._exit(SETUP_FAILED)
    for sig in FORWARDED:
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    argv = spec["argv"]
    try:
        os.execvpe(argv[0], argv, spec["env"])
    except OSError as e:
        sys.stderr.write(f"layerstore run: {argv[0]}: {e.strerror}\n")
        sys.stderr.flush()
        os._exit(127 if e.errno == errno.ENOENT else 126)


def _init(spec: dict[str, Any]) -> None:
    """PID 1 of the new namespace: set up, start the command as PID 2, reap until it ends."""
    try:
        _setup_root(spec)
    except (OSError, SetupError) as e:
        os.write(spec["errfd"], str(e).encode())
        os._exit(SETUP_FAILED)
    command = os.fork()
    if command == 0:
        _exec(spec)
    os.close(spec["errfd"])
    _forward_to(command, broadcast_sigint=True)
    while True:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            os._exit(SETUP_FAILED)
        if pid == command:
            # Leaving kills every other process of the namespace (the kernel's rule for PID 1).
            os._exit(_status(wait_status))


def main() -> None:
    """The keeper: unshare, fork the namespace's init, forward signals, exit with its status."""
    spec = json.loads(sys.argv[1])
    os.set_inheritable(spec["errfd"], False)  # the command must not hold it open
    flags = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID
    if spec["network"] == "private":
        flags |= CLONE_NEWNET
    try:
        _check(_libc.unshare(ctypes.c_int(flags)), "unshare")
    except SetupError as e:
        os.write(spec["errfd"], str(e).encode())
        os._exit(SETUP_FAILED)
    init = os.fork()
    if init == 0:
        _init(spec)
    os.close(spec["errfd"])
    _forward_to(init)
    _, wait_status = os.waitpid(init, 0)
    os._exit(_status(wait_status))


if __name__ == "__main__":
    main()
