"""Helpers of the run and build tests: the Debian base image, and a tree walk to compare images.

The base is the Debian bookworm minbase fixture (``/var/tmp/lsfix/rootfs-v1.tar``), the one the
benchmarks use: built here on first need, as root with debootstrap (``benches.fixtures``, a few
minutes, from Debian's mirror), then cached. Where it cannot be built the tests that need a shell
skip, except under CI (``$CI`` set), where a missing fixture is a failure.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import layerstore as ls
import pytest

DEBIAN_TAR = Path(os.environ.get("LAYERSTORE_DEBIAN_TAR", "/var/tmp/lsfix/rootfs-v1.tar"))


def _build_debian() -> None:
    """Build the default fixture when this machine can (root, debootstrap); else leave it."""
    default = Path(os.environ.get("LAYERSTORE_FIXTURES", "/var/tmp/lsfix")) / "rootfs-v1.tar"
    if default != DEBIAN_TAR or os.geteuid() != 0 or shutil.which("debootstrap") is None:
        return
    from benches import fixtures as fx

    fx.build_rootfs_v1_tar(fx.Fixtures(fx.fixtures_root()))


def need_debian() -> Path:
    """The fixture tar's path, built on first need where possible; skips (fails under CI) when
    it is missing."""
    if not DEBIAN_TAR.exists():
        _build_debian()
    if not DEBIAN_TAR.exists():
        message = f"the Debian rootfs fixture {DEBIAN_TAR} is missing (scripts make it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return DEBIAN_TAR


def debian_store(path: Path) -> tuple[ls.Store, ls.Stack]:
    """A store at ``path`` holding the Debian base, tagged ``debian``."""
    store = ls.Store(path)
    image = store.stack([store.import_tar(need_debian())])
    store.tag(image, "debian")
    return store, image


def tree(image: ls.Stack, *, mtimes: tuple[str, ...] = ()) -> dict[str, tuple[Any, ...]]:
    """Every path of ``image`` → (kind, mode, uid, gid, size, content digest, link target,
    xattrs), plus the mtime for paths under one of ``mtimes``."""
    out: dict[str, tuple[Any, ...]] = {}
    for top, dirs, files in image.walk("/"):
        for name in dirs + files:
            path = f"{top.rstrip('/')}/{name}"
            st = image.stat(path, follow_symlinks=False)
            row: tuple[Any, ...] = (
                st.kind,
                oct(st.mode),
                st.uid,
                st.gid,
                st.size if st.kind == "file" else 0,
                st.digest,
                st.linkname,
                sorted(st.xattrs.items()),
            )
            if any(path == m or path.startswith(m.rstrip("/") + "/") for m in mtimes):
                row += (st.mtime_ns // 10**9,)
            out[path] = row
    return out
