"""Import throughput of a real root filesystem tar into a fresh, empty store.

- Default settings (zstd chunks) vs ``casync make --store=S out.caibx rootfs-v1.tar``: target >= 8x.
- Compression off (``compression_level=0``) vs a naive Python importer (tarfile + fastcdc + blake3,
  chunks appended to one pack file): target >= 3x.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from benches.measure import Comparison, FreshStores, reset_dir, time_rounds, timed_pedantic
from benches.peers import casync_make, naive_import

ROUNDS = 3

pytestmark = pytest.mark.benchmark(group="import")


def _bench_ours(
    benchmark: Any, ls: ModuleType, tar: Path, store_dir: Path, *, compression_level: int
) -> list[float]:
    stores = FreshStores(lambda p: ls.Store(p, compression_level=compression_level), store_dir)

    def run(store: Any) -> Any:
        return store.import_tar(tar)

    try:
        durations, layer = timed_pedantic(benchmark, run, setup=stores, rounds=ROUNDS)
    finally:
        stores.close()
    assert layer.size == tar.stat().st_size
    return durations


def test_import_vs_casync(
    benchmark: Any, ls: ModuleType, casync: str, rootfs_v1_tar: Path, scratch: Path
) -> None:
    ours = _bench_ours(benchmark, ls, rootfs_v1_tar, scratch / "ours", compression_level=3)

    store, index = scratch / "casync-store", scratch / "out.caibx"

    def setup() -> None:
        reset_dir(store)
        index.unlink(missing_ok=True)

    peer = time_rounds(
        lambda: casync_make(store, index, rootfs_v1_tar), setup=setup, rounds=len(ours)
    )
    Comparison(
        "import rootfs-v1.tar (zstd)",
        "casync make",
        rootfs_v1_tar.stat().st_size,
        ours,
        peer,
        target=8,
    ).publish(benchmark)


def test_import_uncompressed_vs_naive_python(
    benchmark: Any, ls: ModuleType, rootfs_v1_tar: Path, scratch: Path
) -> None:
    for module in ("fastcdc", "blake3"):
        pytest.importorskip(module, reason="the naive peer needs the `bench` extra")
    ours = _bench_ours(benchmark, ls, rootfs_v1_tar, scratch / "ours", compression_level=0)

    store = scratch / "naive"
    peer = time_rounds(
        lambda: naive_import(rootfs_v1_tar, store), setup=lambda: reset_dir(store), rounds=len(ours)
    )
    Comparison(
        "import rootfs-v1.tar (compression off)",
        "naive Python",
        rootfs_v1_tar.stat().st_size,
        ours,
        peer,
        target=3,
    ).publish(benchmark)
