"""OCI image layouts: the rootfs-v1 tree as a one-layer image made by umoci (its gzip layer).

- import: ``store.import_oci(layout)`` into a fresh store vs ``umoci unpack`` of the same layout
  into a fresh bundle. Target: >= 10x.
- export: ``store.export_oci(image, dest, compression="gzip")`` of the rootfs-v1 layer (imported
  from the plain tar, so the gzip blob must be made) into a fresh layout vs ``umoci repack`` of
  the same tree into a copy of an empty layout. Target: >= 2x.
- docker archive: ``store.export_docker_archive(image, out)`` of the same image vs ``skopeo copy``
  from an uncompressed OCI layout of it to a ``docker-archive:``. Our own target (no issue sets
  one): >= 2x.

Throughput is the uncompressed layer size over the median round time.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from benches.measure import Comparison, FreshStores, reset_dir, time_rounds, timed_pedantic

ROUNDS = 3
UMOCI = shutil.which("umoci")
SKOPEO = shutil.which("skopeo")

pytestmark = [
    pytest.mark.benchmark(group="oci"),
    pytest.mark.skipif(UMOCI is None, reason="umoci is not installed (Debian package `umoci`)"),
]


def umoci(*args: str | Path) -> None:
    subprocess.run(
        [UMOCI or "umoci", *map(str, args)], check=True, stdout=subprocess.DEVNULL, timeout=1800
    )


@pytest.fixture(scope="module")
def umoci_work(rootfs_v1: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An empty image (`empty/`), a bundle of it holding rootfs-v1 (`bundle/`), and the layout
    with rootfs-v1 packed by umoci as tag `v1` (`layout/`)."""
    work = tmp_path_factory.mktemp("oci-bench")
    empty, bundle, layout = work / "empty", work / "bundle", work / "layout"
    umoci("init", "--layout", empty)
    umoci("new", "--image", f"{empty}:v1")
    umoci("unpack", "--image", f"{empty}:v1", bundle)
    (bundle / "rootfs").rmdir()
    subprocess.run(["cp", "-a", str(rootfs_v1), str(bundle / "rootfs")], check=True)
    shutil.copytree(empty, layout)
    umoci("repack", "--image", f"{layout}:v1", bundle)
    yield work
    shutil.rmtree(work, ignore_errors=True)


def test_import_oci_vs_umoci_unpack(
    benchmark: Any, ls: ModuleType, umoci_work: Path, scratch: Path
) -> None:
    layout = umoci_work / "layout"
    stores = FreshStores(ls.Store, scratch / "store")
    ours, images = timed_pedantic(
        benchmark, lambda store: store.import_oci(layout), setup=stores, rounds=ROUNDS
    )
    image = images["v1"]
    bundle = scratch / "bundle"
    peer = time_rounds(
        lambda: umoci("unpack", "--image", f"{layout}:v1", bundle),
        setup=lambda: reset_dir(bundle),
        rounds=len(ours),
    )
    assert len(image) == 1 and image.digest is not None
    size = image.layers[0].size
    stores.close()
    Comparison(
        "import rootfs-v1 OCI layout (umoci's gzip layer)",
        "umoci unpack",
        size,
        ours,
        peer,
        target=10,
    ).publish(benchmark)


@pytest.fixture(scope="module")
def plain_v1(
    ls: ModuleType, rootfs_v1_tar: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Any, Any]]:
    path = tmp_path_factory.mktemp("oci-export") / "store"
    store = ls.Store(path)
    image = store.stack([store.import_tar(rootfs_v1_tar)])
    yield store, image
    del store, image
    shutil.rmtree(path, ignore_errors=True)


def test_export_oci_vs_umoci_repack(
    benchmark: Any, plain_v1: tuple[Any, Any], umoci_work: Path, scratch: Path
) -> None:
    store, image = plain_v1
    ours_out, peer_out = scratch / "ours", scratch / "peer"

    def fresh_dest() -> None:
        reset_dir(ours_out)

    ours, digest = timed_pedantic(
        benchmark,
        lambda: store.export_oci(image, ours_out, tag="v1", compression="gzip"),
        setup=fresh_dest,
        rounds=ROUNDS,
        warmup_rounds=1,
    )

    def fresh_layout() -> None:
        reset_dir(peer_out)
        shutil.copytree(umoci_work / "empty", peer_out)

    peer = time_rounds(
        lambda: umoci("repack", "--image", f"{peer_out}:v1", umoci_work / "bundle"),
        setup=fresh_layout,
        rounds=len(ours),
        warmup_rounds=1,
    )
    assert digest.startswith("sha256:")
    Comparison(
        "export rootfs-v1 image as an OCI layout (gzip)",
        "umoci repack",
        image.layers[0].size,
        ours,
        peer,
        target=2,
    ).publish(benchmark)


@pytest.mark.skipif(SKOPEO is None, reason="skopeo is not installed (Debian package `skopeo`)")
def test_export_docker_archive_vs_skopeo(
    benchmark: Any, plain_v1: tuple[Any, Any], scratch: Path
) -> None:
    store, image = plain_v1
    layout = scratch / "layout"
    store.export_oci(image, layout, tag="v1", compression="none")
    ours_out, peer_out = scratch / "ours.tar", scratch / "peer.tar"

    def no_output(path: Path) -> Callable[[], None]:
        return lambda: path.unlink(missing_ok=True)

    ours, exported = timed_pedantic(
        benchmark,
        lambda: store.export_docker_archive(image, ours_out, tag="app:v1"),
        setup=no_output(ours_out),
        rounds=ROUNDS,
        warmup_rounds=1,
    )
    peer = time_rounds(
        lambda: subprocess.run(
            [
                SKOPEO or "skopeo",
                "copy",
                "--quiet",
                f"oci:{layout}:v1",
                f"docker-archive:{peer_out}:app:v1",
            ],
            check=True,
            timeout=1800,
        ),
        setup=no_output(peer_out),
        rounds=len(ours),
        warmup_rounds=1,
    )
    # Ours holds the layer's tar under its diff_id; the peer wrote its archive too.
    members = subprocess.run(
        ["tar", "-tf", str(ours_out)], check=True, capture_output=True, text=True
    ).stdout.split()
    assert f"blobs/sha256/{image.layers[0].diff_id.removeprefix('sha256:')}" in members
    assert exported.startswith("sha256:")
    assert peer_out.stat().st_size > image.layers[0].size
    Comparison(
        "export rootfs-v1 image as a docker-archive",
        "skopeo copy oci: -> docker-archive:",
        image.layers[0].size,
        ours,
        peer,
        target=2,
    ).publish(benchmark)
