"""Session fixtures for the benchmarks: the built artefacts, the module under test, the peers."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from benches import fixtures as fx
from benches.measure import SUMMARY
from benches.peers import casync_path


@pytest.fixture(scope="session")
def artefacts() -> fx.Fixtures:
    return fx.Fixtures(fx.fixtures_root())


def _built(build: Callable[[fx.Fixtures], Path], artefacts: fx.Fixtures) -> Path:
    try:
        return build(artefacts)
    except fx.FixtureUnavailable as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def rootfs_v1(artefacts: fx.Fixtures) -> Path:
    return _built(fx.build_rootfs_v1, artefacts)


@pytest.fixture(scope="session")
def rootfs_v2(artefacts: fx.Fixtures) -> Path:
    return _built(fx.build_rootfs_v2, artefacts)


@pytest.fixture(scope="session")
def rootfs_v1_tar(artefacts: fx.Fixtures) -> Path:
    return _built(fx.build_rootfs_v1_tar, artefacts)


@pytest.fixture(scope="session")
def rootfs_v2_tar(artefacts: fx.Fixtures) -> Path:
    return _built(fx.build_rootfs_v2_tar, artefacts)


@pytest.fixture(scope="session")
def big_tar(artefacts: fx.Fixtures) -> Path:
    return _built(fx.build_big_tar, artefacts)


@pytest.fixture(scope="session")
def ls() -> ModuleType:
    return pytest.importorskip(
        "layerstore", reason="layerstore is not built: run `maturin develop --release` first"
    )


@pytest.fixture(scope="session")
def casync() -> str:
    found = casync_path()
    if found is None:
        pytest.skip("casync is not installed (Debian package `casync`)")
    return found


@pytest.fixture(autouse=True)
def _settled() -> None:
    """Each benchmark starts with what earlier ones wrote already on disk: the kernel's
    writeback of their gigabytes would otherwise compete for the two cores while it runs."""
    os.sync()


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A work directory for stores and outputs, removed after the test (stores are large)."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if SUMMARY:
        terminalreporter.section("layerstore benchmark summary (ours vs peer)")
        for line in SUMMARY:
            terminalreporter.write_line(line)
