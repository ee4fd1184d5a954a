"""Export throughput: the imported rootfs-v1 layer back to a tar file, vs GNU tar archiving the same
tree with the same options (so both write the same bytes). Target: >= 2x."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from benches.measure import Comparison, time_rounds, timed_pedantic
from benches.peers import gnu_tar

ROUNDS = 3

pytestmark = pytest.mark.benchmark(group="export")


@pytest.fixture(scope="module")
def imported_v1(
    ls: ModuleType, rootfs_v1_tar: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Any, Any]]:
    path = tmp_path_factory.mktemp("export") / "store"
    store = ls.Store(path)
    layer = store.import_tar(rootfs_v1_tar)
    yield store, layer
    del store, layer
    shutil.rmtree(path, ignore_errors=True)


def test_export_vs_gnu_tar(
    benchmark: Any, imported_v1: tuple[Any, Any], rootfs_v1: Path, scratch: Path
) -> None:
    store, layer = imported_v1
    ours_out, peer_out = scratch / "ours.tar", scratch / "gnu.tar"

    # One untimed warm-up round each: both then read from a warm page cache.
    ours, digest = timed_pedantic(
        benchmark,
        lambda: store.export_tar(layer, ours_out),
        setup=lambda: ours_out.unlink(missing_ok=True),
        rounds=ROUNDS,
        warmup_rounds=1,
    )
    peer = time_rounds(
        lambda: gnu_tar(rootfs_v1, peer_out),
        setup=lambda: peer_out.unlink(missing_ok=True),
        rounds=len(ours),
        warmup_rounds=1,
    )
    # Byte-exact export: what was written is the tar that was imported.
    assert digest.removeprefix("sha256:") == layer.diff_id.removeprefix("sha256:")
    assert ours_out.stat().st_size == layer.size
    Comparison(
        "export rootfs-v1 layer to a tar file",
        "GNU tar",
        layer.size,
        ours,
        peer,
        target=2,
    ).publish(benchmark)
