"""The peers the benchmarks compare against: casync, GNU tar, and a naive Python importer."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from benches.fixtures import gnu_tar_command

# The store's chunk parameters (FastCDC min / average / max), used by the naive importer so it cuts
# chunks of the same sizes as ours.
CHUNK_MIN = 16 * 1024
CHUNK_AVG = 64 * 1024
CHUNK_MAX = 256 * 1024


def casync_path() -> str | None:
    return shutil.which("casync")


def casync_make(store: Path, index: Path, source: Path) -> None:
    """``casync make``: a blob index (``.caibx``) for a file, an archive index (``.caidx``) for a
    directory. casync's defaults are kept: 64 KiB average chunks, zstd, SHA-512/256."""
    casync = casync_path()
    assert casync is not None
    subprocess.run(
        [casync, f"--store={store}", "make", str(index), str(source)],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def gnu_tar(src: Path, out: Path) -> None:
    """GNU tar with the very options the fixture tars were made with, so both sides write the same
    archive of the same tree."""
    subprocess.run(gnu_tar_command(src, out), check=True)


@dataclass
class NaiveResult:
    entries: int
    chunks: int
    stored_bytes: int


def naive_import(tar_path: Path, store: Path) -> NaiveResult:
    """What a few lines of Python do: read the tar with ``tarfile``, cut each regular file's content
    with FastCDC (the PyPI ``fastcdc`` package's compiled chunker), name each chunk by BLAKE3 and
    append the chunks not seen before to one pack file, then fsync it once (ours is durable too).
    No compression, no SHA-256 of the stream, no raw tar headers kept, no database."""
    # Imported here: only this peer needs the `bench` extra's fastcdc and blake3.
    import blake3
    import fastcdc

    store.mkdir(parents=True, exist_ok=True)
    index: dict[bytes, tuple[int, int]] = {}
    files: list[tuple[str, list[bytes]]] = []
    entries = 0
    with tarfile.open(tar_path, "r:") as tf, open(store / "pack", "wb") as pack:
        offset = 0
        for member in tf:
            entries += 1
            if not member.isreg():
                continue
            reader = tf.extractfile(member)
            assert reader is not None
            data = memoryview(reader.read())
            digests: list[bytes] = []
            for chunk in fastcdc.fastcdc(
                data, min_size=CHUNK_MIN, avg_size=CHUNK_AVG, max_size=CHUNK_MAX
            ):
                piece = data[chunk.offset : chunk.offset + chunk.length]
                digest = blake3.blake3(piece).digest()
                if digest not in index:
                    index[digest] = (offset, chunk.length)
                    pack.write(piece)
                    offset += chunk.length
                digests.append(digest)
            files.append((member.name, digests))
        pack.flush()
        os.fsync(pack.fileno())
    return NaiveResult(entries=entries, chunks=len(index), stored_bytes=offset)


def umoci(*args: str | Path) -> None:
    """Run umoci (Debian package umoci), quietly."""
    subprocess.run(["umoci", *map(str, args)], check=True, capture_output=True)


def umoci_layout(tars: list[Path], layout: Path, tag: str) -> None:
    """An OCI layout whose image `tag` has the given layer tars, bottom first (umoci gzips them)."""
    if not (layout / "index.json").exists():
        umoci("init", "--layout", layout)
    umoci("new", "--image", f"{layout}:{tag}")
    for tar in tars:
        umoci("raw", "add-layer", "--image", f"{layout}:{tag}", tar)


def umoci_flatten(layout: Path, tag: str, new_tag: str, rootfs: Path) -> None:
    """umoci's squash: unpack the image's union to a directory, then insert that directory as
    the only layer of a new image (unpack + repack)."""
    umoci("raw", "unpack", "--image", f"{layout}:{tag}", rootfs)
    umoci("new", "--image", f"{layout}:{new_tag}")
    umoci("insert", "--image", f"{layout}:{new_tag}", rootfs, "/")
