"""Materialize throughput: the imported rootfs-v1 image written to a fresh directory, vs GNU tar
extracting the same tar (``tar --numeric-owner --xattrs --xattrs-include=* -xf``) into a fresh
directory on the same filesystem. Both keep every owner, mode, time, xattr, device and
hardlink (we run as root, as the fixture needs). Target: >= 2x."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from benches.measure import Comparison, time_rounds, timed_pedantic

ROUNDS = 3

pytestmark = pytest.mark.benchmark(group="materialize")


@pytest.fixture(scope="module")
def image_v1(
    ls: ModuleType, rootfs_v1_tar: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Any, Any]]:
    path = tmp_path_factory.mktemp("materialize") / "store"
    store = ls.Store(path)
    image = store.stack([store.import_tar(rootfs_v1_tar)])
    yield store, image
    del store, image
    shutil.rmtree(path, ignore_errors=True)


def describe(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every path's type, mode, owner, mtime, size, xattrs and link target (content by size)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            xattrs = tuple(sorted(os.listxattr(p, follow_symlinks=False)))
            link = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
            size = st.st_size if stat.S_ISREG(st.st_mode) else 0
            out[os.path.relpath(p, root)] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_mtime_ns,
                st.st_rdev,
                st.st_nlink,
                size,
                xattrs,
                link,
            )
    return out


def test_materialize_vs_gnu_tar(
    benchmark: Any, image_v1: tuple[Any, Any], rootfs_v1_tar: Path, scratch: Path
) -> None:
    store, image = image_v1
    # Every round writes a new directory and nothing is deleted until the end: on this
    # journal-less ext4 the inode allocator skips inodes deleted in the last 30 s, reading inode
    # tables to find them (perf: ~65% of both sides' time in find_inode_bit/recently_deleted
    # when each round deleted the last one's tree first). Writeback of earlier rounds is
    # finished before each round (untimed).
    rounds = iter(range(1000))
    ours_out = peer_out = scratch
    peer: list[float] = []

    def tar_x() -> None:
        subprocess.run(
            [
                "tar",
                "--numeric-owner",
                "--xattrs",
                "--xattrs-include=*",
                "-C",
                str(peer_out),
                "-xf",
                str(rootfs_v1_tar),
            ],
            check=True,
        )

    def setup() -> None:
        """Before each of our rounds, one of GNU tar's (so both see the same machine state;
        the peer is timed here, outside our timing), then a new destination for ours."""
        nonlocal ours_out, peer_out
        peer_out = scratch / f"gnu{next(rounds)}"
        peer_out.mkdir()
        os.sync()
        peer.extend(time_rounds(tar_x, rounds=1))
        ours_out = scratch / f"ours{next(rounds)}"
        os.sync()

    # One untimed warm-up round each: both then read from a warm page cache.
    ours, report = timed_pedantic(
        benchmark,
        lambda: store.materialize(image, ours_out),
        setup=setup,
        rounds=ROUNDS,
        warmup_rounds=1,
    )
    peer = peer[len(peer) - len(ours) :]
    assert report["skipped"] == 0, "metadata was skipped"
    # The same tree, metadata and all (directory mtimes included).
    theirs, mine = describe(peer_out), describe(ours_out)
    assert mine == theirs, sorted(set(mine.items()) ^ set(theirs.items()))[:10]
    Comparison(
        "materialize rootfs-v1 image to a directory",
        "GNU tar -x",
        rootfs_v1_tar.stat().st_size,
        ours,
        peer,
        target=2,
    ).publish(benchmark)
