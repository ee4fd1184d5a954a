"""Dockerfile builds against ``buildah bud --isolation chroot --layers`` (overlay driver).

The Dockerfile: over the Debian rootfs-v1 base, a ``COPY`` of a 200 MB context (50 random
4 MB files) and four ``RUN``s, and a second small ``COPY``.

- cold build: ours into a store holding only the base (its snapshot warm, as buildah's pull
  has extracted it), no build cache; buildah with the base pulled and its cache pruned. Target:
  >= 2x.
- rebuild with nothing changed: both all cache hits. Target: >= 5x.
- rebuild after changing the small ``COPY``'s source: only the steps from it on rebuild
  (asserted from the progress lines), time reported against buildah's same rebuild.

Needs root, buildah and the rootfs-v1 fixture; medians, never asserted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from benches.measure import Comparison, report, time_rounds, timed_pedantic

pytestmark = pytest.mark.benchmark(group="build")

FILES, FILE_SIZE = 50, 4_000_000
DOCKERFILE = """\
ARG BASE=debian
FROM $BASE
RUN echo one > /one
COPY data /data/
RUN ls -l /data | wc -l > /count
RUN sha256sum /data/f00 > /sum
COPY small.txt /small
RUN cat /small > /small2
"""


def rounds(benchmark: Any) -> int:
    return 3 if benchmark.enabled else 1


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0 or shutil.which("buildah") is None:
        pytest.skip("build benchmarks need root and buildah")
    ctx = tmp_path_factory.mktemp("build-context")
    (ctx / "data").mkdir()
    for i in range(FILES):
        (ctx / "data" / f"f{i:02d}").write_bytes(os.urandom(FILE_SIZE))
    (ctx / "small.txt").write_text("small\n")
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    return ctx


class Buildah:
    """buildah with a storage root of its own and the base image pulled."""

    def __init__(self, base: Path, layout: Path) -> None:
        self.cmd = ["buildah", "--root", str(base / "root"), "--runroot", str(base / "run")]
        self.cmd += ["--storage-driver", "overlay"]
        self.base_id = self("pull", "-q", f"oci:{layout}:debian").splitlines()[-1]

    def __call__(self, *args: str) -> str:
        return subprocess.run(
            [*self.cmd, *args], check=True, capture_output=True, text=True
        ).stdout.strip()

    def build(self, ctx: Path) -> None:
        self("bud", "-q", "--isolation", "chroot", "--layers", "--build-arg",
             f"BASE={self.base_id}", "-t", "bench", str(ctx))  # fmt: skip

    def prune(self) -> None:
        subprocess.run([*self.cmd, "rmi", "bench"], capture_output=True, check=False)
        subprocess.run([*self.cmd, "rmi", "--prune"], capture_output=True, check=False)


@pytest.fixture(scope="module")
def peers(
    ls: ModuleType, rootfs_v1_tar: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Any, Buildah]]:
    work = tmp_path_factory.mktemp("build-peers")
    store = ls.Store(work / "store")
    image = store.stack([store.import_tar(rootfs_v1_tar)])
    store.tag(image, "debian")
    store.mount(image, _fresh(work / "warm")).unmount()  # the base's snapshot, as buildah's pull
    store.export_oci(image, work / "layout", tag="debian")
    b = Buildah(work / "buildah", work / "layout")
    yield store, b
    subprocess.run([*b.cmd, "rmi", "--all", "--force"], capture_output=True, check=False)


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _forget_cache(store: Any) -> None:
    Path(store.path, "build-cache.json").unlink(missing_ok=True)


def _size(ctx: Path) -> int:
    return FILES * FILE_SIZE + (ctx / "small.txt").stat().st_size


def test_cold_build_vs_buildah(
    benchmark: Any, ls: ModuleType, peers: tuple[Any, Buildah], context: Path
) -> None:
    store, b = peers
    n = rounds(benchmark)
    ours_s, image = timed_pedantic(
        benchmark,
        lambda: ls.build(store, context, tag="bench"),
        setup=lambda: _forget_cache(store),
        rounds=n,
    )
    assert image.read_bytes("/count").strip() == b"51"
    peer_s = time_rounds(lambda: b.build(context), setup=b.prune, rounds=n)
    Comparison("cold build", "buildah bud --layers", _size(context), ours_s, peer_s, 2.0).publish(
        benchmark
    )


def test_noop_rebuild_vs_buildah(
    benchmark: Any, ls: ModuleType, peers: tuple[Any, Buildah], context: Path
) -> None:
    store, b = peers
    ls.build(store, context, tag="bench")
    b.build(context)
    n = rounds(benchmark)
    ours_s, _ = timed_pedantic(benchmark, lambda: ls.build(store, context, tag="bench"), rounds=n)
    peer_s = time_rounds(lambda: b.build(context), rounds=n)
    Comparison(
        "no-change rebuild", "buildah bud --layers", _size(context), ours_s, peer_s, 5.0
    ).publish(benchmark)


def test_rebuild_after_one_copy_change(
    benchmark: Any, ls: ModuleType, peers: tuple[Any, Buildah], context: Path
) -> None:
    store, b = peers
    ls.build(store, context, tag="bench")
    b.build(context)
    n = rounds(benchmark)
    count = [0]
    lines: list[str] = []

    def change() -> None:
        count[0] += 1
        (context / "small.txt").write_text(f"small {count[0]}\n")
        lines.clear()

    ours_s, image = timed_pedantic(
        benchmark,
        lambda: ls.build(store, context, tag="bench", progress=lines.append),
        setup=change,
        rounds=n,
    )
    hits = [line for line in lines if "using cache blake3" in line]
    assert len(hits) == 4  # RUN, COPY data, RUN, RUN: everything before the changed COPY
    assert image.read_bytes("/small2") == f"small {count[0]}\n".encode()
    peer_s = time_rounds(lambda: b.build(context), setup=change, rounds=n)
    Comparison(
        "rebuild after one COPY change", "buildah bud --layers", _size(context), ours_s, peer_s, 1.0
    ).publish(benchmark)
    report(f"rebuild after one COPY change: {len(hits)} of 5 layer steps from the cache")
