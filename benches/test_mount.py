"""Mounts against buildah (overlay storage driver, which extracts each layer at pull time).

- pull-to-mount: an OCI layout of rootfs-v1 (one gzip layer, by umoci) to a usable mount.
  Ours: ``import_oci`` into a fresh store + ``mount`` (overlay: snapshot cache cold; fuse:
  nothing extracted). Peer: ``buildah pull oci:DIR`` + ``buildah from`` + ``buildah mount`` into
  a fresh storage root. Targets: overlay >= 2x, fuse >= 4x.
- mount a stored image: ours ``mount`` (overlay, snapshots warm; fuse) vs ``buildah from`` +
  ``buildah mount`` of the pulled image. Target: at most half buildah's time (>= 2x); fuse
  ready in at most 50 ms (reported).
- v2 over v1: rootfs-v2's changes over v1 as a second layer; mounting it with v1's snapshot
  warm adds only that layer's snapshot (time and bytes reported).
- reading everything through the mount (``tar -cf - . | cat >/dev/null``, page cache dropped
  before each round) and ``find . -ls``, against the same over a materialized directory.
  Targets: fuse >= 0.5x, overlay >= 0.9x.

Needs root, buildah, umoci and the rootfs fixtures; timings are medians, never asserted.
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

from benches.measure import (
    Comparison,
    apparent_bytes,
    report,
    reset_dir,
    time_rounds,
    timed_pedantic,
)
from benches.peers import umoci_layout

ROUNDS = 3
pytestmark = pytest.mark.benchmark(group="mount")


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")
    if os.geteuid() != 0:
        pytest.skip("mount benchmarks need root")


@pytest.fixture(scope="module")
def layout(rootfs_v1_tar: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    need("umoci")
    out = tmp_path_factory.mktemp("mount-layout") / "layout"
    umoci_layout([rootfs_v1_tar], out, "v1")
    return out


class Buildah:
    """buildah with a storage root of its own (overlay driver), emptied between rounds."""

    def __init__(self, base: Path) -> None:
        need("buildah")
        self.root, self.runroot = base / "root", base / "run"

    def __call__(self, *args: str) -> str:
        cmd = ["buildah", "--root", str(self.root), "--runroot", str(self.runroot)]
        cmd += ["--storage-driver", "overlay", *args]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()

    def from_and_mount(self, image: str) -> tuple[str, str]:
        container = self("from", image)
        return container, self("mount", container)

    def reset(self) -> None:
        if self.root.exists():
            subprocess.run(
                [
                    "buildah",
                    "--root",
                    str(self.root),
                    "--runroot",
                    str(self.runroot),
                    "--storage-driver",
                    "overlay",
                    "rm",
                    "--all",
                ],
                capture_output=True,
                check=False,
            )
            subprocess.run(["umount", "-R", "-l", str(self.root)], capture_output=True, check=False)
        for d in (self.root, self.runroot):
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def buildah(tmp_path: Path) -> Iterator[Buildah]:
    b = Buildah(tmp_path / "buildah")
    yield b
    b.reset()


def fresh(path: Path) -> Path:
    reset_dir(path)
    path.mkdir()
    return path


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def disk_bytes(path: Path) -> int:
    """Allocated bytes of a tree (what it costs on disk)."""
    out = subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


@pytest.mark.parametrize(("backend", "target"), [("overlay", 2.0), ("fuse", 4.0)])
def test_pull_to_mount_vs_buildah(
    benchmark: Any,
    ls: ModuleType,
    layout: Path,
    buildah: Buildah,
    tmp_path: Path,
    backend: str,
    target: float,
) -> None:
    live: list[Any] = []

    def setup() -> None:
        while live:
            live.pop().unmount()
        reset_dir(tmp_path / "store")
        fresh(tmp_path / "mnt")

    def ours() -> Any:
        store = ls.Store(tmp_path / "store")
        image = store.import_oci(layout)["v1"]
        live.append(store.mount(image, tmp_path / "mnt", backend=backend))
        return image

    ours_s, image = timed_pedantic(benchmark, ours, setup=setup, rounds=ROUNDS)
    assert (tmp_path / "mnt/etc/os-release").exists()
    setup()

    def peer() -> None:
        image_id = buildah("pull", f"oci:{layout}:v1").splitlines()[-1]
        _, mnt = buildah.from_and_mount(image_id)
        assert Path(mnt, "etc/os-release").exists()

    peer_s = time_rounds(peer, setup=buildah.reset, rounds=ROUNDS)
    nbytes = image.layers[0].size
    Comparison(
        f"pull+mount ({backend})", "buildah pull+from+mount", nbytes, ours_s, peer_s, target
    ).publish(benchmark)


@pytest.fixture(scope="module")
def stored(
    ls: ModuleType, layout: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Any, Any]]:
    store = ls.Store(tmp_path_factory.mktemp("mount-stored") / "store")
    image = store.import_oci(layout)["v1"]
    yield store, image
    for m in store.mounts():
        store.unmount(m["target"])


@pytest.mark.parametrize("backend", ["overlay", "fuse"])
def test_mount_stored_image_vs_buildah(
    benchmark: Any,
    stored: tuple[Any, Any],
    layout: Path,
    buildah: Buildah,
    tmp_path: Path,
    backend: str,
) -> None:
    store, image = stored
    live: list[Any] = []
    store.mount(image, fresh(tmp_path / "warm"), backend=backend).unmount()  # warm snapshots

    def setup() -> None:
        while live:
            live.pop().unmount()
        fresh(tmp_path / "mnt")

    ours_s, _ = timed_pedantic(
        benchmark,
        lambda: live.append(store.mount(image, tmp_path / "mnt", backend=backend)),
        setup=setup,
        rounds=ROUNDS,
    )
    setup()
    image_id = buildah("pull", f"oci:{layout}:v1").splitlines()[-1]
    containers: list[str] = []

    def peer() -> None:
        containers.append(buildah.from_and_mount(image_id)[0])

    peer_s = time_rounds(peer, rounds=ROUNDS)
    Comparison(
        f"mount a stored image ({backend})",
        "buildah from+mount",
        image.layers[0].size,
        ours_s,
        peer_s,
        2.0,
    ).publish(benchmark)
    if backend == "fuse":
        median_ms = sorted(ours_s)[len(ours_s) // 2] * 1000
        verdict = "meets" if median_ms <= 50 else "MISSES"
        report(f"fuse mount ready in {median_ms:.1f} ms ({verdict} target <= 50 ms)")


def test_second_image_over_the_same_base(
    benchmark: Any, ls: ModuleType, stored: tuple[Any, Any], rootfs_v2: Path, tmp_path: Path
) -> None:
    store, v1 = stored
    store.mount(v1, fresh(tmp_path / "warm"), backend="overlay").unmount()
    v2 = v1.push(store.diff(v1, rootfs_v2))
    snapshots = Path(store.path) / "snapshots"
    before = disk_bytes(snapshots)
    live: list[Any] = []
    seconds, _ = timed_pedantic(
        benchmark,
        lambda: live.append(store.mount(v2, fresh(tmp_path / "v2"), backend="overlay")),
        rounds=1,
    )
    added = disk_bytes(snapshots) - before
    layer = v2.layers[-1]
    live.pop().unmount()
    report(
        f"v2 over v1 (warm): mounted in {seconds[0] * 1000:.0f} ms, snapshot bytes added "
        f"{added / 1e6:.1f} MB for a {layer.size / 1e6:.1f} MB layer (v1 snapshot "
        f"{before / 1e6:.0f} MB not copied)"
    )
    assert added < before / 2


def read_all(root: Path) -> None:
    subprocess.run("tar -cf - . | cat >/dev/null", shell=True, cwd=root, check=True)


def find_ls(root: Path) -> None:
    subprocess.run(["find", ".", "-ls"], cwd=root, check=True, stdout=subprocess.DEVNULL)


@pytest.mark.parametrize(("backend", "target"), [("overlay", 0.9), ("fuse", 0.5)])
def test_read_through_the_mount_vs_a_directory(
    benchmark: Any, stored: tuple[Any, Any], tmp_path: Path, backend: str, target: float
) -> None:
    store, image = stored
    plain = tmp_path / "plain"
    store.materialize(image, plain)
    nbytes = apparent_bytes(plain)
    with store.mount(image, fresh(tmp_path / "mnt"), backend=backend) as m:
        mnt = Path(m.path)
        ours_s, _ = timed_pedantic(
            benchmark, lambda: read_all(mnt), setup=drop_caches, rounds=ROUNDS
        )
        peer_s = time_rounds(lambda: read_all(plain), setup=drop_caches, rounds=ROUNDS)
        Comparison(
            f"read all via {backend} mount",
            "the materialized tree",
            nbytes,
            ours_s,
            peer_s,
            target,
        ).publish(benchmark)
        walk_ours = time_rounds(lambda: find_ls(mnt), setup=drop_caches, rounds=ROUNDS)
        walk_peer = time_rounds(lambda: find_ls(plain), setup=drop_caches, rounds=ROUNDS)
        ratio = sorted(walk_peer)[1] / sorted(walk_ours)[1]
        verdict = "meets" if ratio >= target else "MISSES"
        report(
            f"find -ls via {backend} mount: {sorted(walk_ours)[1] * 1000:.0f} ms vs "
            f"{sorted(walk_peer)[1] * 1000:.0f} ms on the tree, ratio {ratio:.2f}x "
            f"({verdict} target >= {target:g}x)"
        )
