"""Partial pulls of zstd:chunked layers (issue 20) on the rootfs v1 → v2 fixtures, through the
byte-counting proxy in front of a loopback ``docker-registry``.

The store pushes rootfs-v1 and rootfs-v2 (one layer each) twice: as zstd:chunked and as gzip.
A store holding v1 (pulled) then pulls v2:

- bytes fetched: the partial pull (measured by the proxy), against a full gzip pull of v2 (the
  proxy again) and against whole-file reuse, computed from the same two TOCs: the frames of
  every v2 file whose sha256 no v1 file has, plus the TOC and tar-split (what a zstd:chunked
  reader that reuses whole files fetches). Also the compressed size of the v2 chunks that v1
  lacks (the floor for any chunk-level reader).
- blob sizes: the zstd:chunked blob of each tar against ``gzip -6`` and ``zstd -3`` of it.
- time on loopback, and through the proxy throttled to 100 Mbit/s (bandwidth only: no added
  delay; a ``tc netem`` link is not set up here): the partial pull against a full pull of the
  gzip image, each into a copy of the store holding v1.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import zstandard

from benches.measure import report, time_rounds
from tests.registryutil import REGISTRY, Proxy, Registry

ROUNDS = 3
NO_TLS: dict[str, Any] = {"tls_verify": False}
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"

pytestmark = [
    pytest.mark.benchmark(group="partial-pull"),
    pytest.mark.skipif(REGISTRY is None, reason="docker-registry is needed (Debian package)"),
]


def manifest(host: str, repo: str, tag: str) -> dict[str, Any]:
    req = urllib.request.Request(
        f"http://{host}/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST}
    )
    with urllib.request.urlopen(req) as r:
        doc: dict[str, Any] = json.loads(r.read())
        return doc


def toc_of(blob: Path) -> tuple[list[dict[str, Any]], int]:
    """A zstd:chunked blob's TOC entries and the compressed size of its TOC and tar-split."""
    with blob.open("rb") as f:
        f.seek(-64, 2)
        fields = struct.unpack("<8Q", f.read(64))
        f.seek(fields[0])
        toc = zstandard.ZstdDecompressor().decompress(f.read(fields[1]), max_output_size=1 << 30)
    entries: list[dict[str, Any]] = json.loads(toc)["entries"]
    return entries, fields[1] + fields[5]


def compressed_size(cmd: list[str], tar: Path) -> int:
    with tar.open("rb") as f:
        out = subprocess.run(cmd, stdin=f, capture_output=True, check=True).stdout
    return len(out)


@pytest.fixture(scope="module")
def setup(
    ls: ModuleType,
    rootfs_v1_tar: Path,
    rootfs_v2_tar: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("partial-bench")
    registry = Registry(root / "registry")
    proxy = Proxy(registry.host)
    try:
        pusher = ls.Store(root / "pusher")
        for tag, tar in (("v1", rootfs_v1_tar), ("v2", rootfs_v2_tar)):
            image = pusher.stack([pusher.import_tar(tar)])
            pusher.push(image, f"{proxy.host}/b/c:{tag}", compression="zstd:chunked", **NO_TLS)
            pusher.push(image, f"{proxy.host}/b/g:{tag}", compression="gzip", **NO_TLS)
        holding_v1 = root / "holding-v1"
        ls.Store(holding_v1).pull(f"{proxy.host}/b/c:v1", **NO_TLS)
        yield {"ls": ls, "registry": registry, "proxy": proxy, "root": root, "v1": holding_v1}
    finally:
        proxy.stop()
        registry.stop()


def fresh_copy(src: Path, dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)


def test_bytes_fetched_for_v2_with_v1_stored(
    setup: dict[str, Any], rootfs_v1_tar: Path, rootfs_v2_tar: Path
) -> None:
    ls, proxy, registry, root = setup["ls"], setup["proxy"], setup["registry"], setup["root"]
    work = root / "bytes"
    fresh_copy(setup["v1"], work)
    proxy.reset()
    pulled = ls.Store(work).pull(f"{proxy.host}/b/c:v2", **NO_TLS)
    partial = proxy.blob_bytes_down()
    fresh_copy(setup["v1"], work)
    proxy.reset()
    ls.Store(work).pull(f"{proxy.host}/b/g:v2", **NO_TLS)
    full_gzip = proxy.blob_bytes_down()

    m1 = manifest(proxy.host, "b/c", "v1")["layers"][0]
    m2 = manifest(proxy.host, "b/c", "v2")["layers"][0]
    with rootfs_v2_tar.open("rb") as f:
        assert pulled.layers[0].diff_id == "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    e1, _ = toc_of(registry.blob_file(m1["digest"]))
    e2, meta2 = toc_of(registry.blob_file(m2["digest"]))
    v1_files = {e["digest"] for e in e1 if e["type"] == "reg" and e.get("digest")}
    v1_chunks = {e["chunkDigest"] for e in e1 if e.get("chunkDigest")}
    whole_file = meta2 + sum(
        e["endOffset"] - e["offset"]
        for e in e2
        if e["type"] == "reg" and e.get("digest") and e["digest"] not in v1_files
    )
    # Each chunk's frame: a file entry's first frame ends where its next chunk begins.
    new_chunks = 0
    for i, e in enumerate(e2):
        if not e.get("chunkDigest") or e["chunkDigest"] in v1_chunks:
            continue
        nxt = e2[i + 1] if i + 1 < len(e2) else None
        end = e["endOffset"]
        if e["type"] == "reg" and nxt and nxt["type"] == "chunk" and nxt["name"] == e["name"]:
            end = nxt["offset"]
        new_chunks += end - e["offset"]
    report(
        f"partial pull v2 over v1: {partial / 1e6:.2f} MB fetched; full gzip pull "
        f"{full_gzip / 1e6:.2f} MB ({partial / full_gzip:.1%}); whole-file reuse "
        f"{whole_file / 1e6:.2f} MB ({whole_file / full_gzip:.1%}); new chunks compressed "
        f"{new_chunks / 1e6:.2f} MB (partial = {partial / max(new_chunks, 1):.2f}x of it)"
    )
    gz = {t: compressed_size(["gzip", "-6", "-c"], t) for t in (rootfs_v1_tar, rootfs_v2_tar)}
    zs = {t: compressed_size(["zstd", "-3", "-c"], t) for t in (rootfs_v1_tar, rootfs_v2_tar)}
    for tag, tar, layer in (("v1", rootfs_v1_tar, m1), ("v2", rootfs_v2_tar, m2)):
        report(
            f"zstd:chunked blob {tag}: {layer['size'] / 1e6:.2f} MB; gzip -6 "
            f"{gz[tar] / 1e6:.2f} MB ({layer['size'] / gz[tar]:.3f}x); zstd -3 "
            f"{zs[tar] / 1e6:.2f} MB ({layer['size'] / zs[tar]:.3f}x)"
        )
    assert partial < full_gzip
    assert partial <= whole_file


def test_partial_pull_time_vs_full_pull_on_loopback(setup: dict[str, Any]) -> None:
    ls, proxy, root = setup["ls"], setup["proxy"], setup["root"]
    work = root / "timed"

    def fresh() -> None:
        fresh_copy(setup["v1"], work)

    def pull(repo: str) -> None:
        ls.Store(work).pull(f"{proxy.host}/{repo}:v2", **NO_TLS)

    partial = time_rounds(lambda: pull("b/c"), setup=fresh, rounds=ROUNDS)
    full = time_rounds(lambda: pull("b/g"), setup=fresh, rounds=ROUNDS)
    p, f = sorted(partial)[ROUNDS // 2], sorted(full)[ROUNDS // 2]
    report(
        f"loopback, v2 with v1 stored: partial pull {p:.2f} s, full gzip pull {f:.2f} s "
        f"({f / p:.2f}x)"
    )


def test_partial_pull_time_vs_full_pull_on_a_throttled_link(setup: dict[str, Any]) -> None:
    """The proxy sends each blob body at 100 Mbit/s (no added delay: not `tc netem`). It throttles
    each answer, not the link: the partial pull's parallel range requests get 100 Mbit/s each
    (for about 6 MB of ranges here, at most ~0.4 s it would otherwise spend)."""
    ls, proxy, root = setup["ls"], setup["proxy"], setup["root"]
    work = root / "throttled"

    def fresh() -> None:
        fresh_copy(setup["v1"], work)

    def pull(repo: str) -> None:
        ls.Store(work).pull(f"{proxy.host}/{repo}:v2", **NO_TLS)

    proxy.reset()
    proxy.throttle = 100e6 / 8
    try:
        partial = time_rounds(lambda: pull("b/c"), setup=fresh, rounds=ROUNDS)
        full = time_rounds(lambda: pull("b/g"), setup=fresh, rounds=ROUNDS)
    finally:
        proxy.throttle = None
    p, f = sorted(partial)[ROUNDS // 2], sorted(full)[ROUNDS // 2]
    report(
        f"100 Mbit/s proxy, v2 with v1 stored: partial pull {p:.2f} s, full gzip pull {f:.2f} s "
        f"({f / p:.2f}x)"
    )
