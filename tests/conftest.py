"""Shared fixtures: a fresh store per test, and the producer tars (built once per session)."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import layerstore as ls
import pytest
import tarfixtures as tf

# GNU tar over a directory tree, and Python's tarfile over TarInfo lists.
PRODUCERS = ["gnutar-gnu", "gnutar-posix", "gnutar-ustar", "py-gnu", "py-pax", "py-ustar"]
PY_FORMATS = {
    "py-gnu": tarfile.GNU_FORMAT,
    "py-pax": tarfile.PAX_FORMAT,
    "py-ustar": tarfile.USTAR_FORMAT,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs uid 0 (devices, chown, trusted.* xattrs)")
        for item in items:
            if "root" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ls.Store]:
    yield ls.Store(tmp_path / "store")


@pytest.fixture(scope="session")
def producer_tars(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    base = tmp_path_factory.mktemp("producers")
    tars = {}
    for fmt in ("gnu", "posix", "ustar"):
        root = tf.make_tree(base / f"tree-{fmt}", ustar=fmt == "ustar")
        tars[f"gnutar-{fmt}"] = tf.gnu_tar(root, fmt)
    for name, fmt in PY_FORMATS.items():
        tars[name] = tf.py_tar(fmt)
    assert sorted(tars) == sorted(PRODUCERS)
    return tars


@pytest.fixture(params=PRODUCERS)
def producer(request: pytest.FixtureRequest, producer_tars: dict[str, bytes]) -> tuple[str, bytes]:
    return request.param, producer_tars[request.param]
