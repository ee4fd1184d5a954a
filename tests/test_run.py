"""Processes in containers (``layerstore.run``): exit statuses, streams, environment, user and
working directory from the image, namespaces (PID, UTS, network), signals, reaping, the image
unchanged after a run, and ``commit=True``. One Debian store per module (the import and the
first mount's snapshot are the slow part)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import layerstore as ls
import pytest
import runutil
from layerstore._run import RunError, User, resolve_user, run_in

pytestmark = pytest.mark.root

PYTHONPATH = os.pathsep.join(str(Path(__file__).parents[1] / d) for d in ("python", "tests"))


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ls.Store, ls.Stack]]:
    store, image = runutil.debian_store(tmp_path_factory.mktemp("run") / "store")
    yield store, image
    assert store.mounts() == []


def sh(
    deb: tuple[ls.Store, ls.Stack], script: str, tmp_path: Path, **kw: object
) -> tuple[int, str]:
    """Run ``sh -c script``; (status, stdout)."""
    store, image = deb
    out = tmp_path / "stdout"
    with out.open("wb") as f:
        status = ls.run(store, image, ["sh", "-c", script], stdout=f, **kw)  # type: ignore[call-overload]
    return status, out.read_text()


@pytest.mark.parametrize(("script", "status"), [("true", 0), ("exit 3", 3), ("kill -9 $$", 137)])
def test_the_exit_status_is_the_commands_and_a_signal_gives_128_plus_n(
    deb: tuple[ls.Store, ls.Stack], tmp_path: Path, script: str, status: int
) -> None:
    assert sh(deb, script, tmp_path)[0] == status


def test_stdin_reaches_the_command_and_its_stdout_comes_back(
    deb: tuple[ls.Store, ls.Stack], tmp_path: Path
) -> None:
    assert sh(deb, "tr a-z A-Z", tmp_path, stdin=b"hello\n") == (0, "HELLO\n")


def test_env_user_by_name_and_working_directory(
    deb: tuple[ls.Store, ls.Stack], tmp_path: Path
) -> None:
    script = 'echo "$FOO|$HOME|$PATH"; id -un; id -gn; pwd'
    status, out = sh(deb, script, tmp_path, env={"FOO": "bar"}, user="nobody", cwd="/tmp")
    assert status == 0
    assert out.splitlines() == [
        "bar|/nonexistent|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "nobody",
        "nogroup",
        "/tmp",
    ]


def test_users_resolve_through_the_images_passwd_and_group(
    deb: tuple[ls.Store, ls.Stack], tmp_path: Path
) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group"):
        (root / "etc" / name).write_bytes(deb[1].read_bytes(f"/etc/{name}"))
    assert resolve_user(root, "nobody").uid == 65534
    daemon = resolve_user(root, "daemon:nogroup")
    assert (daemon.uid, daemon.gid) == (1, 65534)
    assert resolve_user(root, "1234:5").uid == 1234
    assert resolve_user(root, None) == User(0, 0, (0,), "/root")
    with pytest.raises(RunError, match="not in the image's /etc/passwd"):
        resolve_user(root, "nosuchuser")


def test_the_command_is_pid_2_under_a_pid_1_init_and_sees_only_its_namespace(
    deb: tuple[ls.Store, ls.Stack], tmp_path: Path
) -> None:
    status, out = sh(deb, "echo $$; ls /proc | grep -c '^[0-9]'", tmp_path)
    assert status == 0
    pid, count = out.split()
    assert pid == "2"
    assert int(count) <= 4  # init, sh, ls, grep


def test_a_process_that_forks_and_exits_leaves_no_child_behind(
    deb: tuple[ls.Store, ls.Stack], tmp_path: Path
) -> None:
    started = time.monotonic()
    status, _ = sh(deb, "sleep 4321 & sleep 4322 & exit 5", tmp_path)
    assert status == 5
    assert time.monotonic() - started < 10
    left = subprocess.run(["pgrep", "-f", "sleep 432[12]"], capture_output=True, text=True)
    assert left.stdout == ""


def test_hostname_is_isolated(deb: tuple[ls.Store, ls.Stack], tmp_path: Path) -> None:
    before = socket.gethostname()
    status, out = sh(deb, "hostname new-name && hostname", tmp_path)
    assert (status, out.strip()) == (0, "new-name")
    assert socket.gethostname() == before


def interfaces(text: str) -> set[str]:
    return {line.split(":")[0].strip() for line in text.splitlines()[2:]}


def test_the_network_namespace_holds_only_loopback_unless_host(
    deb: tuple[ls.Store, ls.Stack], tmp_path: Path
) -> None:
    status, out = sh(deb, "cat /proc/net/dev", tmp_path)
    assert (status, interfaces(out)) == (0, {"lo"})
    status, out = sh(deb, "cat /proc/net/dev", tmp_path, network="host")
    assert interfaces(out) == interfaces(Path("/proc/net/dev").read_text())


def test_dev_proc_hosts_and_resolv_conf_are_in_place(
    deb: tuple[ls.Store, ls.Stack], tmp_path: Path
) -> None:
    script = (
        "ls /dev | tr '\\n' ' '; echo; echo x > /dev/null; head -c4 /dev/zero | wc -c; "
        "cat /etc/resolv.conf"
    )
    status, out = sh(deb, script, tmp_path)
    assert status == 0
    first, *rest = out.splitlines()
    assert {"null", "zero", "full", "random", "urandom", "tty", "pts", "shm", "ptmx"} <= set(
        first.split()
    )
    assert rest[0] == "4"
    assert "\n".join(rest[1:]) == Path("/etc/resolv.conf").read_text().rstrip("\n")


def test_the_image_is_unchanged_after_a_run(deb: tuple[ls.Store, ls.Stack], tmp_path: Path) -> None:
    store, image = deb
    assert sh(deb, "echo x > /etc/new && rm /etc/os-release", tmp_path)[0] == 0
    assert not image.exists("/etc/new") and image.exists("/etc/os-release")
    assert sh(deb, "test -e /etc/new || test ! -e /etc/os-release || echo clean", tmp_path) == (
        0,
        "clean\n",
    )
    assert store.mounts() == []


def test_commit_stores_the_changes_and_nothing_of_the_mount_points(
    deb: tuple[ls.Store, ls.Stack],
) -> None:
    store, image = deb
    status, empty = ls.run(store, image, ["true"], commit=True)
    assert (status, empty.entries()) == (0, [])  # /proc, /dev, /etc/hosts… left no trace
    script = "echo data > /root/new && chmod 600 /root/new && rm /etc/issue"
    status, layer = ls.run(store, image, ["sh", "-c", script], commit=True)
    _, clamped = ls.run(store, image, ["sh", "-c", script], commit=True, source_date_epoch=0)
    # Mount.commit and store.diff(image, mount) give the same changes (mtimes aside).
    assert [(e.path, e.kind) for e in layer.entries()] == [
        (e.path, e.kind) for e in clamped.entries()
    ]
    assert {"/root/new", "/etc/.wh.issue"} <= {e.path for e in layer.entries()}
    after = image.push(layer)
    assert after.read_bytes("/root/new") == b"data\n"
    assert after.stat("/root/new").mode == 0o600
    assert not after.exists("/etc/issue")


def test_sigterm_to_the_runner_reaches_the_command(deb: tuple[ls.Store, ls.Stack]) -> None:
    store, _ = deb
    argv = [sys.executable, "-m", "layerstore", "--store", store.path, "run", "debian"]
    proc = subprocess.Popen(
        [*argv, "--", "sh", "-c", "echo ready; exec sleep 60"],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": PYTHONPATH},
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 143
    proc.stdout.close()


def test_the_cli_exits_with_the_commands_status_and_commits(
    deb: tuple[ls.Store, ls.Stack],
) -> None:
    store, image = deb
    base = [sys.executable, "-m", "layerstore", "--store", store.path, "run"]
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    done = subprocess.run([*base, "debian", "--", "sh", "-c", "exit 9"], env=env)
    assert done.returncode == 9
    cmd = [*base, "--commit", "withfile", "-e", "V=1", "debian", "--", "sh", "-c", "echo $V > /f"]
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    assert store.get("withfile").read_bytes("/f") == b"1\n"
    assert len(store.get("withfile").layers) == len(image.layers) + 1


def test_a_missing_command_gives_127(deb: tuple[ls.Store, ls.Stack], tmp_path: Path) -> None:
    store, image = deb
    assert ls.run(store, image, ["no-such-command"], stderr=subprocess.DEVNULL) == 127


def test_no_command_and_no_config_is_an_error(deb: tuple[ls.Store, ls.Stack]) -> None:
    with pytest.raises(ValueError, match="no command"):
        ls.run(*deb)
    assert deb[0].mounts() == []


def test_run_without_root_is_a_clear_error(tmp_path: Path) -> None:
    code = "from layerstore._run import run_in; run_in('/', ['true'])"
    done = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": PYTHONPATH},
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert done.returncode == 1
    assert "PermissionError: layerstore run needs root" in done.stderr


def test_run_in_refuses_an_unknown_network_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="network"):
        run_in(tmp_path, ["true"], network="bridge")  # type: ignore[arg-type]
