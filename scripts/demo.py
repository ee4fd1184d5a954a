#!/usr/bin/env python3
"""layerstore's main job on data every Linux machine has (``make demo``).

Into a fresh store under /tmp it imports a system directory (default ``/usr/share``) three ways:

1. the directory itself, as a layer (a canonical tar of the tree, made on the fly);
2. a GNU tar of it (``tar --sort=name -cf``), as a tar layer;
3. the same tar gzipped, which is recognised as the same layer.

It then exports the layers back and checks that the exported tar's sha256 equals the layer's
``diff_id`` and, for the GNU tar, the sha256 of the original file (a byte-exact round trip), and
prints the store's dedup statistics: the three imports hold the same file contents, which are
stored once. Exit status 1 if a check fails.

    python3 scripts/demo.py [DIR] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeVar, cast

import layerstore as ls

T = TypeVar("T")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return "sha256:" + h.hexdigest()


class HashingSink:
    """A binary file object that only hashes what is written (no temporary copy on disk)."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


def timed(what: str, nbytes: Callable[[T], int] | None, fn: Callable[[], T]) -> T:
    print(f"  {what} ...", end="", flush=True)
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    rate = ""
    if nbytes is not None and elapsed > 0:
        rate = f", {human(nbytes(result) / elapsed)}/s"
    print(f" {elapsed:.1f} s{rate}")
    return result


def show_layer(name: str, layer: ls.Layer) -> None:
    print(f"  {name}")
    print(f"    id        {layer.id}")
    print(f"    diff_id   {layer.diff_id}")
    print(f"    entries   {layer.entry_count:,}")
    print(f"    tar size  {human(layer.size)} ({layer.size:,} bytes)")
    if layer.compressed_digest:
        print(f"    from      {layer.compression} blob {layer.compressed_digest}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", nargs="?", default="/usr/share", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the store and the tars")
    args = parser.parse_args()
    src: Path = args.dir.resolve()
    if not src.is_dir():
        parser.error(f"{src} is not a directory")
    tar_bin = shutil.which("tar")
    gzip_bin = shutil.which("gzip")
    if tar_bin is None or gzip_bin is None:
        parser.error("GNU tar and gzip are needed")

    work = Path(tempfile.mkdtemp(prefix="layerstore-demo-"))
    store_dir = work / "store"
    tar_path = work / f"{src.name}.tar"
    gz_path = work / f"{src.name}.tar.gz"
    failures: list[str] = []
    sanitised: list[str] = []

    def check(ok: bool, label: str) -> None:
        print(f"    {'ok  ' if ok else 'FAIL'}  {label}")
        if not ok:
            failures.append(label)

    try:
        print(f"layerstore {ls.__version__}: store {store_dir} (format v{ls.FORMAT_VERSION})")
        print(f"source: {src}")
        store = ls.Store(store_dir)

        print("\n1. preparing the inputs")
        timed(
            f"tar --sort=name -cf {tar_path.name}",
            None,
            lambda: subprocess.run(
                [tar_bin, "--sort=name", "-C", str(src.parent), "-cf", str(tar_path), src.name],
                check=True,
            ),
        )
        with open(gz_path, "wb") as out:
            timed(
                f"gzip --fast -c > {gz_path.name}",
                None,
                lambda: subprocess.run(
                    [gzip_bin, "--fast", "-c", str(tar_path)], stdout=out, check=True
                ),
            )
        tar_sha = timed(f"sha256 of {tar_path.name}", None, lambda: sha256_file(tar_path))
        print(
            f"    {tar_path.name}: {human(tar_path.stat().st_size)}, "
            f"{gz_path.name}: {human(gz_path.stat().st_size)}"
        )

        print("\n2. importing")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dir_layer = timed(
                f"directory {src}", lambda layer: layer.size, lambda: store.import_dir(src)
            )
            tar_layer = timed(
                f"tar {tar_path.name}", lambda layer: layer.size, lambda: store.import_tar(tar_path)
            )
            gz_layer = timed(
                f"gzip {gz_path.name}", lambda layer: layer.size, lambda: store.import_tar(gz_path)
            )
        sanitised = [str(w.message) for w in caught]
        if sanitised:
            print(f"  {len(sanitised)} warning(s), e.g.: {sanitised[0]}")
        show_layer(f"directory {src}", dir_layer)
        show_layer(f"tar {tar_path.name}", tar_layer)
        show_layer(f"tar.gz {gz_path.name}", gz_layer)

        print("\n3. checking")
        check(tar_layer.diff_id == tar_sha, "tar layer diff_id == sha256 of the original tar")
        check(gz_layer.id == tar_layer.id, "tar.gz import is the same layer as the tar import")
        check(
            gz_layer.compressed_digest == sha256_file(gz_path),
            "tar.gz layer's blob digest == sha256 of the .tar.gz",
        )
        for name, layer in (("GNU tar", tar_layer), ("directory", dir_layer)):
            sink = HashingSink()
            digest = timed(
                f"export the {name} layer",
                lambda _digest, sink=sink: sink.size,
                lambda layer=layer, sink=sink: store.export_tar(layer, cast(IO[bytes], sink)),
            )
            check(
                sink.digest == layer.diff_id == digest,
                f"sha256 of the {name} layer's export == its diff_id",
            )
            if layer is tar_layer:
                check(sink.digest == tar_sha, "exported tar == original tar, byte for byte")
        fsck = timed("fsck (re-hash every chunk)", None, store.fsck)
        check(bool(fsck["ok"]), f"fsck: {fsck['chunks_checked']:,} chunks, no problem")

        print("\n4. store statistics")
        s = store.stats()
        content, stored = s["content_bytes"], s["stored_bytes"]
        dedup = s["logical_bytes"] / content if content else 1.0
        packing = content / stored if stored else 1.0
        rows = [
            ("layers", f"{s['layers']}", "3 imports; the .tar.gz is the same layer as the .tar"),
            ("logical", human(s["logical_bytes"]), "the layers' tars, added up"),
            ("content", human(content), f"{s['chunks']:,} unique chunks, uncompressed"),
            ("stored", human(stored), f"chunk blocks in {s['packs']} pack file(s), zstd"),
            ("metadata", human(s["metadata_bytes"]), "entry lists and raw tar headers"),
            ("on disk", human(s["disk_bytes"]), "every file of the store"),
            (
                "dedup ratio",
                f"{s['dedup_ratio']:.2f}x",
                f"logical / (stored + metadata): dedup {dedup:.2f}x, zstd {packing:.2f}x",
            ),
            ("(gzip -1)", human(gz_path.stat().st_size), "one gzipped copy, for comparison"),
        ]
        for label, value, note in rows:
            print(f"    {label:<12} {value:>10}   {note}")
    finally:
        if args.keep:
            print(f"\nkept {work}: try  layerstore --store {store_dir} ls")
        else:
            shutil.rmtree(work, ignore_errors=True)

    if failures:
        print(f"\n{len(failures)} check(s) FAILED", file=sys.stderr)
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
