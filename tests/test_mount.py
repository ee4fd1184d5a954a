"""Mounts: kernel overlayfs over shared layer snapshots and a FUSE view from the store, read-only
and writable, against the stack's own view; commit; lifecycle (delete refused, kill, gc); CLI.

Random stacks come from :class:`overlayutil.StackGen` (the generator of the overlayfs
differential test): each is imported as OCI tars, mounted, and walked with ``os.lstat``,
``os.listdir``, ``os.readlink``, ``os.getxattr`` and reads; the walk must equal the stack's view
path for path (kind, mode, owner, mtime, size, content, link target, device numbers, ``user.*``
xattrs). ``LAYERSTORE_MOUNT_STACKS`` sets how many stacks per backend (default 12).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import layerstore as ls
import overlayutil as ou
import pytest

pytestmark = pytest.mark.root

STACKS = int(os.environ.get("LAYERSTORE_MOUNT_STACKS", "12"))
BACKENDS = ["overlay", "fuse"]


def mounted_sources() -> list[tuple[str, str]]:
    """(target, source) of every mount whose source is one of ours."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            head, _, tail = line.partition(" - ")
            fields = tail.split()
            if len(fields) > 1 and fields[1].startswith("layerstore:"):
                out.append((head.split()[4], fields[1]))
    return out


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ls.Store]:
    s = ls.Store(tmp_path / "store", max_depth=1000)
    yield s
    for m in s.mounts():
        s.unmount(m["target"])


def snapshot_dirs(store: ls.Store) -> list[Path]:
    return [p for p in (Path(store.path) / "snapshots").iterdir() if not p.name.startswith(".")]


def empty_dir(tmp_path: Path, name: str = "mnt") -> Path:
    d = tmp_path / name
    d.mkdir()
    return d


def import_recipes(store: ls.Store, recipes: list[ou.Recipe]) -> ls.Stack:
    return store.stack([store.import_tar(ou.recipe_tar(r)) for r in recipes])


def tar_of(files: dict[str, bytes]) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_600_000_000
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def assert_same(mount_path: str, image: ls.Stack, what: str) -> None:
    lines = ou.diff_trees(ou.stack_tree(image), ou.kernel_tree(Path(mount_path)), ("stack", what))
    assert not lines, "\n".join(lines[:40])


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_stacks_mount_as_the_stack_shows(
    store: ls.Store, tmp_path: Path, backend: str
) -> None:
    rng = random.Random(f"mount-{backend}")
    gen = ou.StackGen()
    for i in range(STACKS):
        recipes, _ = gen.stack(rng)
        image = import_recipes(store, recipes)
        target = tmp_path / f"m{i}"
        target.mkdir()
        with store.mount(image, target, backend=backend) as m:
            assert m.backend == backend and not m.writable
            assert_same(m.path, image, f"{backend} mount #{i}")
            with pytest.raises(OSError):
                (target / "new-file").write_bytes(b"x")
        assert not any(t == str(target) for t, _ in mounted_sources())


@pytest.mark.parametrize("backend", BACKENDS)
def test_127_layers(store: ls.Store, tmp_path: Path, backend: str) -> None:
    layers = [
        store.import_tar(tar_of({f"f{i}": f"layer {i}".encode(), "common": f"{i}".encode()}))
        for i in range(127)
    ]
    image = store.stack(layers)
    target = empty_dir(tmp_path)
    with store.mount(image, target, backend=backend) as m:
        assert (target / "common").read_bytes() == b"126"
        assert len(os.listdir(target)) == 128
        assert_same(m.path, image, backend)


def test_fuse_mounts_1000_layers(store: ls.Store, tmp_path: Path) -> None:
    layers = [store.import_tar(tar_of({f"d{i % 10}/f{i}": f"{i}".encode()})) for i in range(1000)]
    image = store.stack(layers)
    target = empty_dir(tmp_path)
    with store.mount(image, target, backend="fuse"):
        assert sum(len(os.listdir(target / f"d{k}")) for k in range(10)) == 1000
        assert (target / "d7/f997").read_bytes() == b"997"
    with pytest.raises(ValueError, match="at most 500"):
        store.mount(image, target, backend="overlay")


def scribble(root: Path, rng: random.Random) -> None:
    """Change a mounted tree with ordinary file calls: the container operations, as os calls."""
    paths = sorted(p for p in root.rglob("*"))
    files = [p for p in paths if p.is_file() and not p.is_symlink()]
    dirs = [p for p in paths if p.is_dir() and not p.is_symlink()]
    (root / "new-dir/sub").mkdir(parents=True)
    (root / "new-dir/sub/file").write_bytes(os.urandom(70_000))
    os.symlink("../new-dir/sub/file", root / "new-dir/link")
    os.link(root / "new-dir/sub/file", root / "new-dir/hard")
    if files:
        f = rng.choice(files)
        with open(f, "ab") as out:
            out.write(b"appended")
        g = rng.choice(files)
        if g.exists():
            os.chmod(g, 0o640)
            os.chown(g, 1234, 5678)
            os.setxattr(g, "user.mounted", b"yes")
        h = rng.choice(files)
        if h.exists():
            h.unlink()
    if dirs:
        d = rng.choice(dirs)
        if d.exists():
            shutil.rmtree(d)
            d.mkdir()
            (d / "again").write_bytes(b"recreated")
    os.utime(root / "new-dir/sub/file", ns=(1_700_000_000_000_000_000,) * 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_writable_mount_commits_what_changed(store: ls.Store, tmp_path: Path, backend: str) -> None:
    rng = random.Random(f"rw-{backend}")
    gen = ou.StackGen()
    for i in range(4):
        recipes, _ = gen.stack(rng)
        image = import_recipes(store, recipes)
        before = ou.stack_tree(image)
        target = tmp_path / f"rw{i}"
        target.mkdir()
        with store.mount(image, target, writable=True, backend=backend) as m:
            scribble(target, rng)
            layer = m.commit(created_by="scribble")
            assert layer.created_by == "scribble"
            assert_same(m.path, image.push(layer), f"committed {backend} mount #{i}")
            assert store.diff(image, target).id == layer.id
        assert ou.stack_tree(image) == before
        assert store.mounts() == []
        assert not list((Path(store.path) / "mounts").iterdir())


def test_eight_mounts_share_one_snapshot_per_layer(store: ls.Store, tmp_path: Path) -> None:
    rng = random.Random("shared")
    recipes, _ = ou.StackGen().stack(rng)
    image = import_recipes(store, recipes)
    mounts = []
    for i in range(8):
        d = tmp_path / f"m{i}"
        d.mkdir()
        mounts.append(store.mount(image, d, writable=i % 2 == 0, backend="overlay"))
    assert len(snapshot_dirs(store)) == len(image.layers)
    assert len(store.mounts()) == 8
    for m in mounts:
        m.unmount()
    assert store.mounts() == []
    # A second image over the same base adds one snapshot only.
    top = store.import_tar(tar_of({"v2": b"two"}))
    with store.mount(image.push(top), tmp_path / "m0", backend="overlay"):
        assert len(snapshot_dirs(store)) == len(image.layers) + 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_mounted_layers_cannot_be_deleted(store: ls.Store, tmp_path: Path, backend: str) -> None:
    layer = store.import_tar(tar_of({"a": b"1"}))
    m = store.mount(store.stack([layer]), empty_dir(tmp_path), backend=backend)
    with pytest.raises(ls.ConflictError, match="mounted at"):
        store.delete(layer)
    m.unmount()
    store.delete(layer)
    report = store.gc()
    assert report["snapshots_removed"] == (1 if backend == "overlay" else 0)


def test_bad_requests_are_refused_clearly(store: ls.Store, tmp_path: Path) -> None:
    image = store.stack([store.import_tar(tar_of({"a": b"1"}))])
    target = empty_dir(tmp_path)
    with pytest.raises(ValueError, match="unknown mount backend"):
        store.mount(image, target, backend="nfs")
    (target / "x").write_bytes(b"")
    with pytest.raises(ValueError, match="not an empty directory"):
        store.mount(image, target)
    with pytest.raises(FileNotFoundError):
        store.mount(image, tmp_path / "missing")
    (target / "x").unlink()
    ro = ls.Store(store.path, readonly=True)
    with pytest.raises(OSError, match="read-only"):
        ro.mount(ro.stack(image.layers), target)
    assert store.mounts() == []


HOLDER = textwrap.dedent(
    """
    import sys, time, layerstore as ls
    store = ls.Store(sys.argv[1])
    image = store.get("img")
    rw = store.mount(image, sys.argv[2], writable=True, backend="overlay")
    fuse = store.mount(image, sys.argv[3], backend="fuse")
    rwf = store.mount(image, sys.argv[4], writable=True, backend="fuse")
    open(sys.argv[2] + "/written", "wb").write(b"data")
    print("ready", flush=True)
    time.sleep(600)
    """
)


def test_a_killed_owner_leaves_nothing_gc_does_not_clean(store: ls.Store, tmp_path: Path) -> None:
    store.tag(store.stack([store.import_tar(tar_of({"a": b"1", "b/c": b"2"}))]), "img")
    dirs = [tmp_path / n for n in ("rw", "fuse", "rwfuse")]
    for d in dirs:
        d.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, store.path, *map(str, dirs)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.stdout.close()
    assert len(store.mounts()) == 3  # the owner lives: nothing is reaped
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    report = store.gc()
    assert report["mounts_reaped"] == 3
    deadline = time.monotonic() + 10
    while any(t in map(str, dirs) for t, _ in mounted_sources()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(t in map(str, dirs) for t, _ in mounted_sources())
    assert store.mounts() == []
    assert not list((Path(store.path) / "mounts").iterdir())
    # The snapshots of stored layers stay (a cache every later mount shares).
    assert store.gc()["snapshots_removed"] == 0
    with store.mount(store.get("img"), dirs[0]) as m:
        assert_same(m.path, store.get("img"), "after the kill")
    assert store.fsck()["ok"]


def cli(store: ls.Store, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "layerstore", "--store", store.path, *args],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_cli_mount_umount_commit(store: ls.Store, tmp_path: Path, backend: str) -> None:
    store.tag(store.stack([store.import_tar(tar_of({"a": b"1"}))]), "img")
    target = empty_dir(tmp_path)
    r = cli(store, "mount", "img", str(target), "--rw", "--backend", backend)
    assert r.returncode == 0, r.stderr
    assert f"mounted img at {target} ({backend}, read-write)" in r.stdout
    (target / "b").write_bytes(b"2")
    listing = cli(store, "mounts")
    owner = "until umount" if backend == "overlay" else "process"
    assert str(target) in listing.stdout and owner in listing.stdout, listing.stdout
    r = cli(store, "umount", str(target), "--commit", "img2")
    assert r.returncode == 0, r.stderr
    assert store.get("img2").read_bytes("/b") == b"2"
    assert len(store.get("img2").layers) == 2
    deadline = time.monotonic() + 10
    while store.mounts() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert store.mounts() == []
    assert cli(store, "umount", str(target)).returncode != 0


USER_HOLDER = textwrap.dedent(
    """
    import os, sys
    import layerstore as ls
    store = ls.Store(sys.argv[1])
    m = store.mount(store.get("img"), sys.argv[2], backend="fuse")
    # Closed before saying so: this process serves the mount too, and a kill while it waits
    # on its own server (the close's FLUSH) would leave it stuck in the kernel.
    with open(os.path.join(m.path, "b", "c"), "rb") as f:
        data = f.read().decode()
    print(data, os.getuid(), flush=True)
    sys.stdin.read()
    """
)


def as_nobody(*argv: str, env: dict[str, str]) -> list[str]:
    """`argv` run as user nobody with only `env`."""
    user = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]
    return [*user, "env", "-i", *(f"{k}={v}" for k, v in env.items()), *argv]


def user_python(env: dict[str, str]) -> str:
    """A Python >= 3.11 that user nobody may run and that imports this layerstore (the venv's
    may live under /root; Debian's python3 is the other candidate)."""
    check = "import sys, layerstore; assert sys.version_info >= (3, 11)"
    for candidate in (sys.executable, "/usr/bin/python3"):
        probe = subprocess.run(as_nobody(candidate, "-c", check, env=env), capture_output=True)
        if probe.returncode == 0:
            return candidate
    pytest.fail("no Python >= 3.11 runnable by nobody (Debian's python3 is one)")


def test_an_unprivileged_user_mounts_with_fuse_and_a_kill_unmounts() -> None:
    """Not root: fusermount3 mounts for the user (no allow_other, which fuse.conf does not
    grant users), the user reads through it, and after a SIGKILL of the user's process the
    user's next gc unmounts what it left (fusermount3's watchdog cannot: it checks the dead
    mount as root, whom a mount without allow_other turns away)."""
    # The device as Debian's udev leaves it (0666); some containers make it root-only.
    mode = os.stat("/dev/fuse").st_mode & 0o777
    os.chmod("/dev/fuse", 0o666)
    top = Path(tempfile.mkdtemp(prefix="ls-user-", dir="/tmp"))
    try:
        os.chmod(top, 0o755)
        store = ls.Store(top / "store")
        store.tag(store.stack([store.import_tar(tar_of({"a": b"1", "b/c": b"user"}))]), "img")
        (top / "mnt").mkdir()
        subprocess.run(["chown", "-R", "nobody:nogroup", str(top)], check=True)
        # A copy of the package the user can read, wherever this checkout lives.
        shutil.copytree(Path(ls.__file__).resolve().parent, top / "pkg" / "layerstore")
        subprocess.run(["chown", "-R", "nobody:nogroup", str(top)], check=True)
        env = {"PYTHONPATH": str(top / "pkg"), "HOME": str(top), "PATH": os.environ["PATH"]}
        argv = [user_python(env), "-c", USER_HOLDER, str(top / "store"), str(top / "mnt")]
        proc = subprocess.Popen(
            as_nobody(*argv, env=env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line[:1] == ["user"], proc.stderr.read() if proc.stderr else line
        assert int(line[1]) != 0
        mounted = [t for t, _ in mounted_sources() if t == str(top / "mnt")]
        assert mounted == [str(top / "mnt")]
        # Root may not enter a user's mount that does not allow others: it is the user's alone.
        with pytest.raises(PermissionError):
            os.listdir(top / "mnt")
        proc.kill()
        proc.communicate(timeout=30)  # reaps it and closes the pipes
        time.sleep(0.5)  # time for the watchdog to try (and fail)
        assert str(top / "mnt") in (t for t, _ in mounted_sources()), "left by the kill"
        gc = "import sys, layerstore as ls; print(ls.Store(sys.argv[1]).gc()['mounts_reaped'])"
        reaped = subprocess.run(
            as_nobody(argv[0], "-c", gc, str(top / "store"), env=env),
            capture_output=True,
            text=True,
            check=True,
        )
        assert reaped.stdout.strip() == "1"
        assert str(top / "mnt") not in (t for t, _ in mounted_sources())
        assert store.mounts() == []
    finally:
        os.chmod("/dev/fuse", mode)
        subprocess.run(["fusermount3", "-u", "-z", str(top / "mnt")], capture_output=True)
        shutil.rmtree(top, ignore_errors=True)
