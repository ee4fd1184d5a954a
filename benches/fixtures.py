"""Real artefacts for the benchmarks, built once and cached.

Everything lives under ``$LAYERSTORE_FIXTURES`` (default ``/var/tmp/lsfix``):

- ``rootfs-v1/``: ``debootstrap --variant=minbase bookworm`` (SLOW: minutes; needs root and the
  Debian mirror).
- ``rootfs-v2/``: v1 plus a few packages (apt-get in a chroot) and ~7% of its regular files
  appended to, deleted or replaced, chosen by a seeded RNG (tens of seconds).
- ``rootfs-v1.tar``, ``rootfs-v2.tar``: GNU tar of each tree (sorted names, numeric owners, xattrs).
- ``repeat-1g.tar``: one 1 GiB file, a 64 MiB random block repeated with small edits and shifts,
  streamed to disk (~1 GiB written).

A fixture is published by an atomic rename once complete, so its presence is the cache key; a
half-built one (``*.partial``) is thrown away and rebuilt. ``python -m benches.fixtures`` builds
them all ahead of ``pytest benches --benchmark-enable``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FIXTURES_ENV = "LAYERSTORE_FIXTURES"
DEFAULT_FIXTURES = "/var/tmp/lsfix"

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
V2_PACKAGES = ("less", "procps")
V2_SEED = 20_240_601
# Shares of v1's regular files that v2 changes; chosen disjointly.
V2_APPEND, V2_DELETE, V2_REPLACE = 0.05, 0.01, 0.01
# Fixed mtime for the files v2 changes, so a rebuild gives the same tree apart from what apt does.
V2_MTIME = 1_700_000_000

BIG_BLOCK = 64 << 20
BIG_SIZE = 1 << 30
BIG_SEED = 20_240_602
BIG_EDITS = 8  # overwritten 4 KiB windows per repetition of the block
BIG_EDIT_SIZE = 4096


class FixtureUnavailable(Exception):
    """A fixture cannot be built here (missing tool or privilege); the message says which."""


@dataclass(frozen=True)
class Fixtures:
    """Paths of the built fixtures."""

    root: Path

    @property
    def rootfs_v1(self) -> Path:
        return self.root / "rootfs-v1"

    @property
    def rootfs_v2(self) -> Path:
        return self.root / "rootfs-v2"

    @property
    def rootfs_v1_tar(self) -> Path:
        return self.root / "rootfs-v1.tar"

    @property
    def rootfs_v2_tar(self) -> Path:
        return self.root / "rootfs-v2.tar"

    @property
    def big_tar(self) -> Path:
        return self.root / "repeat-1g.tar"


def fixtures_root() -> Path:
    return Path(os.environ.get(FIXTURES_ENV, DEFAULT_FIXTURES))


def _log(msg: str) -> None:
    print(f"[fixtures] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Serialise builders: two benchmark runs must not build the same fixture at once."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _partial(final: Path) -> Path:
    """A fresh scratch path next to ``final``; a leftover from an interrupted build is removed."""
    partial = final.with_name(final.name + ".partial")
    if partial.is_dir() and not partial.is_symlink():
        shutil.rmtree(partial)
    elif partial.exists() or partial.is_symlink():
        partial.unlink()
    return partial


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise FixtureUnavailable(f"building {what} needs root (chroot, device nodes, ownership)")


def _require_tool(tool: str, what: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise FixtureUnavailable(f"building {what} needs {tool!r}, which is not installed")
    return found


def _run(cmd: list[str], **kwargs: Any) -> None:
    _log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, **kwargs)


def _rootfs_complete(path: Path) -> bool:
    # debootstrap deletes its /debootstrap work directory as its last step.
    return (path / "var/lib/dpkg/status").is_file() and not (path / "debootstrap").exists()


# --- rootfs v1 --------------------------------------------------------------------------------


def build_rootfs_v1(fx: Fixtures) -> Path:
    """SLOW (minutes): a minimal Debian root filesystem from the Debian mirror."""
    final = fx.rootfs_v1
    if _rootfs_complete(final):
        return final
    with _locked(fx.root):
        if _rootfs_complete(final):
            return final
        _require_root("rootfs-v1")
        debootstrap = _require_tool("debootstrap", "rootfs-v1")
        if final.exists():
            shutil.rmtree(final)
        partial = _partial(final)
        _log(f"building {final} with debootstrap (slow: minutes)")
        log = fx.root / "debootstrap.log"
        with open(log, "w") as out:
            _run(
                [debootstrap, "--variant=minbase", SUITE, str(partial), MIRROR],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        partial.rename(final)
    return final


# --- rootfs v2 --------------------------------------------------------------------------------


def _install_packages(root: Path) -> None:
    """Install V2_PACKAGES into ``root``: apt-get in a chroot, else unpacked .debs from the host."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["chroot", str(root), "apt-get", "-q", "-y", "--no-install-recommends"]
    cache = root / "var/cache/apt"
    before = set(cache.rglob("*")) if cache.is_dir() else set()
    try:
        _run([*apt, "install", *V2_PACKAGES], env=env, stdout=subprocess.DEVNULL)
    except (subprocess.CalledProcessError, OSError) as err:
        _log(f"apt-get in the chroot failed ({err}); unpacking .debs with dpkg-deb instead")
        _unpack_debs(root)
        return
    # As an image build step would, leave no apt caches behind: drop what this install added to
    # /var/cache/apt (the new .debs, pkgcache.bin) and keep what v1 already had.
    for path in sorted(set(cache.rglob("*")) - before, reverse=True):
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink()


def _unpack_debs(root: Path) -> None:
    _require_tool("apt-get", "rootfs-v2 (fallback)")
    _require_tool("dpkg-deb", "rootfs-v2 (fallback)")
    with tempfile.TemporaryDirectory(prefix="lsfix-debs-") as tmp:
        try:
            _run(["apt-get", "download", *V2_PACKAGES], cwd=tmp)
        except subprocess.CalledProcessError:
            _run(["apt-get", "update", "-q"])
            _run(["apt-get", "download", *V2_PACKAGES], cwd=tmp)
        for deb in sorted(Path(tmp).glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(root)])


def _regular_files(root: Path) -> list[Path]:
    """Regular files with a single link, in a stable order."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            st = path.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                found.append(path)
    return found


def mutate_tree(root: Path, seed: int = V2_SEED) -> dict[str, int]:
    """Append to, delete and replace a seeded random share of the regular files under ``root``."""
    rng = random.Random(seed)
    files = _regular_files(root)
    n_append = round(len(files) * V2_APPEND)
    n_delete = round(len(files) * V2_DELETE)
    n_replace = round(len(files) * V2_REPLACE)
    picked = rng.sample(files, n_append + n_delete + n_replace)
    appended = picked[:n_append]
    deleted = picked[n_append : n_append + n_delete]
    replaced = picked[n_append + n_delete :]
    for path in appended:
        with open(path, "ab") as f:
            f.write(rng.randbytes(rng.randint(1, 4096)))
        os.utime(path, (V2_MTIME, V2_MTIME))
    for path in deleted:
        path.unlink()
    for path in replaced:
        # Same inode and mode, new content of about the old size (capped so this stays cheap).
        size = min(path.stat().st_size, 1 << 20)
        path.write_bytes(rng.randbytes(max(size, 1)))
        os.utime(path, (V2_MTIME, V2_MTIME))
    return {"appended": n_append, "deleted": n_delete, "replaced": n_replace, "files": len(files)}


def build_rootfs_v2(fx: Fixtures) -> Path:
    """SLOW-ish: v1 plus packages plus seeded edits."""
    final = fx.rootfs_v2
    if final.is_dir():
        return final
    v1 = build_rootfs_v1(fx)
    with _locked(fx.root):
        if final.is_dir():
            return final
        _require_root("rootfs-v2")
        partial = _partial(final)
        _log(f"building {final}: cp -a of v1, apt-get install {' '.join(V2_PACKAGES)}, edits")
        _run(["cp", "-a", str(v1), str(partial)])
        _install_packages(partial)
        counts = mutate_tree(partial)
        _log(f"rootfs-v2 edits: {counts}")
        partial.rename(final)
    return final


# --- tars -------------------------------------------------------------------------------------


def gnu_tar_command(src: Path, out: Path) -> list[str]:
    """The GNU tar invocation the fixture tars are made with (also the export benchmark's peer)."""
    options = ["--numeric-owner", "--xattrs", "--sort=name"]
    return ["tar", *options, "-C", str(src), "-cf", str(out), "."]


def build_tar(fx: Fixtures, src: Path, final: Path) -> Path:
    if final.is_file():
        return final
    with _locked(fx.root):
        if final.is_file():
            return final
        _require_tool("tar", final.name)
        partial = _partial(final)
        _log(f"building {final} with GNU tar")
        _run(gnu_tar_command(src, partial))
        partial.rename(final)
    return final


def build_rootfs_v1_tar(fx: Fixtures) -> Path:
    return build_tar(fx, build_rootfs_v1(fx), fx.rootfs_v1_tar)


def build_rootfs_v2_tar(fx: Fixtures) -> Path:
    return build_tar(fx, build_rootfs_v2(fx), fx.rootfs_v2_tar)


# --- 1 GiB of repeated regions ----------------------------------------------------------------


class RepeatedRegions:
    """A read-only stream of ``size`` bytes: one random block, repeated with small differences.

    Each repetition after the first overwrites a few 4 KiB windows with fresh random bytes, and
    every other one also inserts a few bytes (shifting the rest of the block, which content-defined
    chunking must resynchronise after). Only two blocks are ever held in memory.
    """

    def __init__(self, size: int = BIG_SIZE, block: int = BIG_BLOCK, seed: int = BIG_SEED) -> None:
        self._rng = random.Random(seed)
        self._base = self._rng.randbytes(block)
        self._remaining = size
        self._index = 0
        self._current = memoryview(b"")

    def _next_block(self) -> memoryview:
        rng, base = self._rng, self._base
        if self._index == 0:
            data = bytearray(base)
        else:
            data = bytearray(base)
            for _ in range(BIG_EDITS):
                at = rng.randrange(len(data) - BIG_EDIT_SIZE)
                data[at : at + BIG_EDIT_SIZE] = rng.randbytes(BIG_EDIT_SIZE)
            if self._index % 2 == 0:
                at = rng.randrange(len(data))
                data[at:at] = rng.randbytes(rng.randint(1, 512))
                del data[len(base) :]
        self._index += 1
        return memoryview(data)

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self._remaining
        n = min(n, self._remaining)
        out = bytearray()
        while len(out) < n:
            if not self._current:
                self._current = self._next_block()
            take = self._current[: n - len(out)]
            out += take
            self._current = self._current[len(take) :]
        self._remaining -= n
        return bytes(out)


def build_big_tar(fx: Fixtures) -> Path:
    """SLOW-ish (~1 GiB written): a tar holding one 1 GiB file of repeated regions."""
    final = fx.big_tar
    if final.is_file():
        return final
    with _locked(fx.root):
        if final.is_file():
            return final
        partial = _partial(final)
        _log(f"building {final} (1 GiB, streamed)")
        info = tarfile.TarInfo("repeat.bin")
        info.size = BIG_SIZE
        info.mode = 0o644
        info.mtime = V2_MTIME
        with tarfile.open(partial, "w", format=tarfile.GNU_FORMAT) as tf:
            tf.copybufsize = 1 << 20
            tf.addfile(info, RepeatedRegions())  # type: ignore[arg-type]
        partial.rename(final)
    return final


def build_all(fx: Fixtures) -> None:
    build_rootfs_v1_tar(fx)
    build_rootfs_v2_tar(fx)
    build_big_tar(fx)


if __name__ == "__main__":
    fx = Fixtures(fixtures_root())
    build_all(fx)
    for path in (fx.rootfs_v1, fx.rootfs_v2, fx.rootfs_v1_tar, fx.rootfs_v2_tar, fx.big_tar):
        print(path)
