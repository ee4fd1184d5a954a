"""Run a process in a container: :func:`run` (an image) and :func:`run_in` (a mounted root).

The image is mounted writable (kernel overlay), then a helper process (``_runinit.py``) puts the
command in new mount, PID, UTS and IPC namespaces, and a new network namespace holding only a
loopback interface unless ``network="host"``, with the mount as its root (``pivot_root``), a
fresh ``/proc``, a minimal ``/dev`` (null, zero, full, random, urandom, tty, pts, shm) and the
host's ``/etc/hosts`` and ``/etc/resolv.conf`` bound read-only. The command is PID 2 under a
small init that forwards signals and reaps orphans. Environment, working directory, user and
default command come from the image config (``Env``, ``WorkingDir``, ``User`` resolved through
the image's own ``/etc/passwd`` and ``/etc/group``, ``Entrypoint`` + ``Cmd``).

Mount points the image lacks (``/proc``, ``/dev``, ``/etc/hosts``…) are created in the writable
layer for the run and removed afterwards, their parent directory's times restored, so they never
reach a commit. ``SIGINT`` and ``SIGTERM`` sent to the calling process are forwarded.

**What it lacks**: this is a build and test runner, not a hardened runtime. The command runs as
real root (or the image user) of the host: no user namespace, no capabilities dropped, no
seccomp filter, no cgroup limits (memory, CPU, PIDs), no AppArmor/SELinux label, ``/sys`` not
mounted. A process in it can undo its isolation. Run only what you would run as root.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any, Literal, overload

from layerstore._errors import LayerstoreError

if TYPE_CHECKING:
    from layerstore._core import Layer, Stack, Store

__all__ = ["RunError", "User", "image_config", "resolve_user", "run", "run_in"]

#: The ``PATH`` a command gets when the image config sets none (docker's default).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: The status the helper exits with when the container could not be set up (as podman's 125).
SETUP_FAILED = 125

_INIT = str(Path(__file__).with_name("_runinit.py"))
_MOUNT_DIRS = ("proc", "dev")
_MOUNT_FILES = ("etc/hosts", "etc/resolv.conf")

Stream = int | IO[Any] | None


class RunError(LayerstoreError):
    """The container could not be set up, or the command could not be started."""


@dataclass(frozen=True)
class User:
    """Who the command runs as: ids, supplementary groups and home directory."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


def _table(path: Path) -> list[list[str]]:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def resolve_user(root: str | os.PathLike[str], user: str | None) -> User:
    """Resolve ``user`` (``name``, ``uid``, ``name:group``, ``uid:gid``; None is root) through
    the ``/etc/passwd`` and ``/etc/group`` under ``root``, as a container runtime does.

    A numeric uid missing from passwd is allowed (gid 0 unless given); a name that is missing is
    a :class:`RunError`.
    """
    etc = Path(root) / "etc"
    passwd = [row for row in _table(etc / "passwd") if len(row) >= 7]
    groups = [row for row in _table(etc / "group") if len(row) >= 4]
    name, _, group = (user or "0").partition(":")
    row = next((r for r in passwd if r[0] == name or (name.isdigit() and r[2] == name)), None)
    if row is None and not name.isdigit():
        raise RunError(f"user {name!r} is not in the image's /etc/passwd")
    uid = int(name) if row is None else int(row[2])
    gid = 0 if row is None else int(row[3])
    home = "/" if row is None else row[5] or "/"
    if group:
        grow = next((g for g in groups if g[0] == group or g[2] == group), None)
        if grow is None and not group.isdigit():
            raise RunError(f"group {group!r} is not in the image's /etc/group")
        gid = int(group) if grow is None else int(grow[2])
    login = row[0] if row is not None else None
    extra = {int(g[2]) for g in groups if login and login in g[3].split(",")}
    return User(uid, gid, tuple(sorted(extra | {gid})), home)


def image_config(store: Store, image: Stack) -> dict[str, Any]:
    """The ``config`` section of ``image``'s OCI config (``Env``, ``Cmd``…); ``{}`` if it has
    none (an image stacked in the store rather than imported or built)."""
    if image.config_digest is None:
        return {}
    _, data = store.oci_blob(image.config_digest)
    section = json.loads(data).get("config") or {}
    return dict(section)


def _environment(
    base: Sequence[str], overrides: Mapping[str, str] | None, home: str
) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in base:
        key, _, value = item.partition("=")
        env[key] = value
    env.update(overrides or {})
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOME", home)
    return env


@contextmanager
def _mount_points(root: Path) -> Iterator[None]:
    """Create the mount points ``root`` lacks; afterwards remove them and restore the times of
    the directories they were made in, so a commit does not see them."""
    created: list[Path] = []
    touched: dict[Path, os.stat_result] = {}

    def make(path: Path, is_dir: bool) -> None:
        if path.is_symlink():
            path.unlink()  # a dangling /etc/resolv.conf link: the bind mount needs a file
        if path.exists():
            return
        missing = [p for p in [path, *path.parents] if not p.exists() and p != root]
        for p in reversed(missing):
            touched.setdefault(p.parent, p.parent.stat())
            if p == path and not is_dir:
                p.touch(mode=0o644)
            else:
                p.mkdir(mode=0o755)
            created.append(p)

    try:
        for name in _MOUNT_DIRS:
            make(root / name, True)
        for name in _MOUNT_FILES:
            if Path("/" + name).exists():
                make(root / name, False)
        yield
    finally:
        for path in reversed(created):
            path.rmdir() if path.is_dir() else path.unlink()
        for parent, st in touched.items():
            os.utime(parent, ns=(st.st_atime_ns, st.st_mtime_ns))


@contextmanager
def _forwarding(proc: subprocess.Popen[bytes]) -> Iterator[list[int]]:
    """Forward SIGINT and SIGTERM to ``proc`` while the block runs; yields the signals seen."""
    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def forward(signum: int, _frame: FrameType | None) -> None:
        seen.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    old: dict[signal.Signals, Callable[[int, FrameType | None], Any] | int | None] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        old[sig] = signal.signal(sig, forward)
    try:
        yield seen
    finally:
        for number, handler in old.items():
            signal.signal(number, handler)


def run_in(
    root: str | os.PathLike[str],
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str = "/",
    user: str | None = None,
    stdin: Stream | bytes = None,
    stdout: Stream = None,
    stderr: Stream = None,
    network: Literal["private", "host"] = "private",
    hostname: str = "layerstore",
) -> int:
    """Run ``argv`` with ``root`` (a writable mount) as its root; return its exit status.

    ``env`` is the whole environment (``PATH`` and ``HOME`` added when missing); ``user`` is
    resolved through the root's own passwd and group files. A signal that ends the command
    gives 128 + its number. ``stdin`` may be bytes (fed through a pipe), a file or descriptor.
    ``KeyboardInterrupt`` is raised again once the command has ended.
    """
    if os.geteuid() != 0:
        raise PermissionError(
            "layerstore run needs root: it mounts the image and creates namespaces"
        )
    if not argv:
        raise ValueError("no command to run (the image config has no Entrypoint or Cmd)")
    if network not in ("private", "host"):
        raise ValueError(f"network must be 'private' or 'host', not {network!r}")
    root_path = Path(root).resolve()
    who = resolve_user(root_path, user)
    read_fd, write_fd = os.pipe()
    spec = {
        "root": str(root_path),
        "argv": list(argv),
        "env": _environment([], env, who.home),
        "cwd": cwd or "/",
        "uid": who.uid,
        "gid": who.gid,
        "groups": list(who.groups),
        "network": network,
        "hostname": hostname,
        "errfd": write_fd,
    }
    data = stdin if isinstance(stdin, bytes) else None
    with _mount_points(root_path):
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", _INIT, json.dumps(spec)],
                stdin=subprocess.PIPE if data is not None else stdin,  # type: ignore[arg-type]
                stdout=stdout,
                stderr=stderr,
                pass_fds=(write_fd,),
            )
        finally:
            os.close(write_fd)
        with _forwarding(proc) as seen:
            proc.communicate(data)
        with os.fdopen(read_fd, "rb") as errors:
            message = errors.read().decode(errors="replace").strip()
    status = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
    if signal.SIGINT in seen:
        raise KeyboardInterrupt
    if message:
        raise RunError(f"{argv[0]}: {message}")
    return status


@overload
def run(
    store: Store,
    image: Stack,
    argv: Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = ...,
    cwd: str | None = ...,
    user: str | None = ...,
    stdin: Stream | bytes = ...,
    stdout: Stream = ...,
    stderr: Stream = ...,
    network: Literal["private", "host"] = ...,
    commit: Literal[False] = ...,
    source_date_epoch: int | None = ...,
) -> int: ...
@overload
def run(
    store: Store,
    image: Stack,
    argv: Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = ...,
    cwd: str | None = ...,
    user: str | None = ...,
    stdin: Stream | bytes = ...,
    stdout: Stream = ...,
    stderr: Stream = ...,
    network: Literal["private", "host"] = ...,
    commit: Literal[True],
    source_date_epoch: int | None = ...,
) -> tuple[int, Layer]: ...
def run(
    store: Store,
    image: Stack,
    argv: Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    user: str | None = None,
    stdin: Stream | bytes = None,
    stdout: Stream = None,
    stderr: Stream = None,
    network: Literal["private", "host"] = "private",
    commit: bool = False,
    source_date_epoch: int | None = None,
) -> int | tuple[int, Layer]:
    """Run a command in a container of ``image``; return its exit status.

    The image is mounted writable for the run and the mount dropped afterwards: the image is
    unchanged. ``argv`` defaults to the config's ``Cmd`` (after its ``Entrypoint``, which also
    precedes a given ``argv``); ``env`` is added to the config's ``Env``; ``cwd`` and ``user``
    default to its ``WorkingDir`` and ``User``. With ``commit=True`` the container's changes
    are stored as a layer (its mtimes clamped to ``source_date_epoch`` if given) and
    ``(status, layer)`` is returned, whatever the status. Root only; see the module docs for
    the isolation it lacks.
    """
    config = image_config(store, image)
    command = list(config.get("Entrypoint") or []) + list(argv or config.get("Cmd") or [])
    with tempfile.TemporaryDirectory(prefix="layerstore-run-") as scratch:
        target = Path(scratch) / "root"
        target.mkdir()
        with store.mount(image, target, writable=True, backend="overlay") as mount:
            who = resolve_user(target, user or config.get("User") or None)
            full_env = _environment(config.get("Env") or [], env, who.home)
            status = run_in(
                target,
                command,
                env=full_env,
                cwd=cwd or config.get("WorkingDir") or "/",
                user=user or config.get("User") or None,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                network=network,
                hostname=image.chain_id.split(":")[-1][:12],
            )
            layer = None
            if commit and source_date_epoch is None:
                layer = mount.commit()
            elif commit:
                layer = store.diff(image, target, source_date_epoch=source_date_epoch)
    return status if layer is None else (status, layer)
