"""Registry pull and push against a loopback ``docker-registry`` (distribution 2.8), skopeo beside.

The image is the rootfs-v1 tree as one gzip layer, made by umoci (Go's gzip, as most images in
registries are) and put in the registry by skopeo.

- pull: ``store.pull(ref)`` into a fresh store vs ``skopeo copy docker://ref oci:DIR`` followed by
  ``store.import_oci(DIR)`` into a fresh store (what a user of skopeo would do). Target: >= 1.5x.
- push of a stored image vs ``skopeo copy oci:LAYOUT docker://ref`` of the same image, each round
  into a repository of its own (blobs are per repository; skopeo's blob-info cache is removed
  before each round so that it cannot mount blobs across repositories). Target: >= 2x. Two
  cases: the umoci image as imported (its blob kept byte for byte, pushed as is), and the
  rootfs-v1 tar imported as a layer (the store compresses it for the push; the peer copies the
  store's own export of it).
- bytes, through a counting proxy: a re-push of an image the registry holds (target 0 blob
  bytes), a re-pull of an image the store holds (target: no layer blob), and a pull of rootfs-v2
  into a store holding v1 (reported; partial pulls are the next issue).

Throughput is the uncompressed layer size over the median round time.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from benches.measure import (
    MB,
    Comparison,
    FreshStores,
    report,
    reset_dir,
    time_rounds,
    timed_pedantic,
)
from benches.peers import umoci_layout
from tests.registryutil import REGISTRY, Proxy, Registry

ROUNDS = 3
SKOPEO = shutil.which("skopeo")
# skopeo's blob-info cache (root's, then a user's): it remembers where a blob was seen.
SKOPEO_CACHES = [
    Path("/var/lib/containers/cache/blob-info-cache-v1.boltdb"),
    Path.home() / ".local/share/containers/cache/blob-info-cache-v1.boltdb",
]

pytestmark = [
    pytest.mark.benchmark(group="registry"),
    pytest.mark.skipif(
        REGISTRY is None or SKOPEO is None,
        reason="docker-registry and skopeo are needed (Debian packages)",
    ),
]
_repo = itertools.count()


def skopeo(*args: str | Path) -> None:
    subprocess.run(
        [SKOPEO or "skopeo", *map(str, args)], check=True, stdout=subprocess.DEVNULL, timeout=1800
    )


def forget_blob_locations() -> None:
    for cache in SKOPEO_CACHES:
        cache.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    r = Registry(tmp_path_factory.mktemp("registry-bench"))
    yield r
    r.stop()


@pytest.fixture(scope="module")
def proxy(registry: Registry) -> Iterator[Proxy]:
    p = Proxy(registry.host)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def v1(
    ls: ModuleType,
    rootfs_v1_tar: Path,
    registry: Registry,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    """rootfs-v1 as umoci's one-layer image (`layout`), in the registry (put by skopeo) and
    imported into a store (`image`); and as a layer imported from the plain tar (`made`), with
    the store's own OCI export of it (`made_layout`)."""
    work = tmp_path_factory.mktemp("registry-v1")
    umoci_layout([rootfs_v1_tar], work / "layout", "v1")
    ref = f"{registry.host}/bench/v1:v1"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{work / 'layout'}:v1", f"docker://{ref}")
    store = ls.Store(work / "store")
    image = store.import_oci(work / "layout")["v1"]
    # A store of its own: beside the umoci image, the same layer would re-export as that image.
    made_store = ls.Store(work / "made-store")
    made = made_store.stack([made_store.import_tar(rootfs_v1_tar)])
    made_store.export_oci(made, work / "made-layout", tag="v1", compression="gzip")
    yield {
        "store": store,
        "made_store": made_store,
        "image": image,
        "layout": work / "layout",
        "made": made,
        "made_layout": work / "made-layout",
        "ref": ref,
    }
    del store, image, made, made_store
    shutil.rmtree(work, ignore_errors=True)


def test_pull_vs_skopeo_copy_then_import_oci(
    benchmark: Any, ls: ModuleType, v1: dict[str, Any], scratch: Path
) -> None:
    stores = FreshStores(ls.Store, scratch / "store")
    ours, image = timed_pedantic(
        benchmark,
        lambda store: store.pull(v1["ref"], tls_verify=False),
        setup=stores,
        rounds=ROUNDS,
    )
    assert image.digest == v1["image"].digest
    stores.close()
    copy = scratch / "copy"
    peer_stores = FreshStores(ls.Store, scratch / "peer-store")
    fresh: list[Any] = []

    def setup() -> None:
        fresh.clear()
        reset_dir(copy)
        fresh.append(peer_stores()[0][0])

    def peer() -> None:
        skopeo("copy", "--src-tls-verify=false", f"docker://{v1['ref']}", f"oci:{copy}:v1")
        fresh[0].import_oci(copy)

    peer_s = time_rounds(peer, setup=setup, rounds=len(ours))
    fresh.clear()
    peer_stores.close()
    Comparison(
        "pull rootfs-v1 (umoci's gzip) from a loopback registry",
        "skopeo copy + import_oci",
        v1["image"].layers[0].size,
        ours,
        peer_s,
        target=1.5,
    ).publish(benchmark)


@pytest.mark.parametrize("which", ["imported", "made"])
def test_push_vs_skopeo_copy(
    benchmark: Any, v1: dict[str, Any], registry: Registry, which: str
) -> None:
    store, image, layout = (
        (v1["store"], v1["image"], v1["layout"])
        if which == "imported"
        else (v1["made_store"], v1["made"], v1["made_layout"])
    )

    def fresh_repo() -> tuple[tuple[str], dict[str, Any]]:
        return (f"{registry.host}/push/ours{next(_repo)}:v1",), {}

    ours, digest = timed_pedantic(
        benchmark,
        lambda ref: store.push(image, ref, tls_verify=False),
        setup=fresh_repo,
        rounds=ROUNDS,
    )
    assert digest == image.digest
    peer_s = time_rounds(
        lambda: skopeo(
            "copy",
            "--dest-tls-verify=false",
            f"oci:{layout}:v1",
            f"docker://{registry.host}/push/peer{next(_repo)}:v1",
        ),
        setup=forget_blob_locations,
        rounds=len(ours),
    )
    what = {"imported": "as imported (kept blob)", "made": "made in the store (gzip on push)"}
    Comparison(
        f"push rootfs-v1 {what[which]} to a loopback registry",
        "skopeo copy oci: docker://",
        image.layers[0].size,
        ours,
        peer_s,
        target=2,
    ).publish(benchmark)


def test_bytes_of_re_push_re_pull_and_v2_over_v1(
    ls: ModuleType, v1: dict[str, Any], proxy: Proxy, rootfs_v2_tar: Path, scratch: Path
) -> None:
    store, image = v1["made_store"], v1["made"]
    ref = f"{proxy.host}/bytes/app:v1"
    store.push(image, ref, tls_verify=False)
    proxy.reset()
    store.push(image, f"{proxy.host}/bytes/app:again", tls_verify=False)
    repush = proxy.blob_bytes_up()
    report(f"re-push of an image the registry holds: {repush} blob bytes uploaded (target 0)")
    assert repush == 0

    other = ls.Store(scratch / "other")
    other.pull(ref, tls_verify=False)
    proxy.reset()
    other.pull(ref, tls_verify=False)
    blob_gets = sum(1 for m, p, _ in proxy.requests if m == "GET" and "/blobs/" in p)
    report(
        f"re-pull of an image the store holds: {blob_gets} blob fetched (the config),"
        f" {proxy.blob_bytes_down()} bytes"
    )
    assert blob_gets == 1

    v2 = store.stack([store.import_tar(rootfs_v2_tar)])
    store.push(v2, f"{proxy.host}/bytes/app:v2", tls_verify=False)
    v2_blob = v2.layers[0].compressed_digest
    proxy.reset()
    other.pull(f"{proxy.host}/bytes/app:v2", tls_verify=False)
    fetched = proxy.blob_bytes_down()
    report(
        f"pull of rootfs-v2 into a store holding v1: {fetched / MB:.1f} MB fetched"
        f" ({v2_blob or 'new gzip blob'}; whole-layer blobs: the next issue makes this small)"
    )
