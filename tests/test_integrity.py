"""No output path hands out bytes it did not verify (issue 14, section 1).

A layer's content is damaged on disk four ways (a flipped byte in a zstd-compressed block, a
flipped byte in a block stored uncompressed, a truncated pack, a missing pack), then every output
path is asked for it: each must fail with `IntegrityError` naming the chunk, the layer and the file,
leave nothing at its destination and nothing new in the store. `fsck` names the damaged chunks and
the files that use them; `fsck(repair=True)` takes them out of use and marks the layers broken,
and importing the same content again heals them.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import layerstore as ls
import pytest
import tarfixtures as tf
from storeutil import pack_files

DAMAGES = ["flip-compressed", "flip-uncompressed", "truncate", "missing"]

# The damaged layer: one big compressible file (many chunks, several blocks) and a small one.
BIG = tf.text_bytes("integrity-big", 3 << 20)
DAMAGED_TAR = tf.simple_tar({"data/big.txt": BIG, "data/small.txt": b"small\n"})
BASE_TAR = tf.simple_tar({"etc/base": b"base layer\n"})
TOP_TAR = tf.simple_tar({"etc/top": b"top layer\n"})


class Damaged:
    """A store whose middle layer's pack was damaged after import."""

    def __init__(self, root: Path, damage: str) -> None:
        level = 0 if damage == "flip-uncompressed" else 3
        self.store = ls.Store(root / "store", compression_level=level)
        self.base = self.store.import_tar(BASE_TAR)
        before = pack_files(self.store)
        self.layer = self.store.import_tar(DAMAGED_TAR)
        (pack,) = pack_files(self.store) - before
        self.top = self.store.import_tar(TOP_TAR)
        self.image = self.store.stack([self.base, self.layer, self.top])
        self.out = root / "out"
        self.out.mkdir()
        damage_pack(Path(self.store.path) / "packs" / pack, damage)


def damage_pack(path: Path, damage: str) -> None:
    size = path.stat().st_size
    if damage == "missing":
        path.unlink()
    elif damage == "truncate":
        os.truncate(path, size // 2)
    else:
        with open(path, "r+b") as f:
            f.seek(size // 2)
            byte = f.read(1)[0]
            f.seek(size // 2)
            f.write(bytes([byte ^ 0x5A]))


def export_tar(d: Damaged, compression: str | None) -> Path:
    dest = d.out / "layer.tar"
    d.store.export_tar(d.layer, dest, compression=compression)
    return dest


def export_oci(d: Damaged) -> Path:
    dest = d.out / "layout"
    d.store.export_oci(d.image, dest, tag="t")
    return dest


def export_docker(d: Damaged) -> Path:
    dest = d.out / "image.tar"
    d.store.export_docker_archive(d.image, dest, tag="x:t")
    return dest


def squash(d: Damaged) -> None:
    d.store.squash(d.image)


def diff(d: Damaged) -> None:
    d.store.diff(d.store.stack([d.base]), d.image)


def commit(d: Damaged) -> None:
    with d.image.container() as c:
        c.chmod("/data/big.txt", 0o600)  # the committed layer carries the file whole
        c.commit(created_by="chmod")


OUTPUTS: dict[str, Callable[[Damaged], Path | None]] = {
    "tar": lambda d: export_tar(d, None),
    "tar-gzip": lambda d: export_tar(d, "gzip"),
    "tar-zstd": lambda d: export_tar(d, "zstd"),
    "oci": export_oci,
    "docker-archive": export_docker,
    "squash": squash,
    "diff": diff,
    "commit": commit,
}


@pytest.fixture(params=DAMAGES)
def damaged(request: pytest.FixtureRequest, tmp_path: Path) -> Damaged:
    return Damaged(tmp_path, request.param)


@pytest.mark.parametrize("output", sorted(OUTPUTS))
def test_every_output_path_refuses_damaged_content_and_leaves_nothing(
    damaged: Damaged, output: str
) -> None:
    layers_before = {layer.id for layer in damaged.store.layers()}
    with pytest.raises(ls.IntegrityError) as err:
        OUTPUTS[output](damaged)
    message = str(err.value)
    assert damaged.layer.id in message, message
    assert "/data/big.txt" in message, message
    assert "chunk blake3:" in message, message
    assert list(damaged.out.iterdir()) == [], "nothing is left at the destination"
    assert {layer.id for layer in damaged.store.layers()} == layers_before


def test_fsck_names_the_damaged_chunks_and_the_files_using_them(damaged: Damaged) -> None:
    report = damaged.store.fsck()
    assert not report["ok"]
    assert report["damaged"], report
    users = {tuple(u) for d in report["damaged"] for u in d["used_by"]}
    assert (damaged.layer.id, "/data/big.txt") in users
    assert {layer for layer, _ in users} == {damaged.layer.id}, "other layers are intact"
    assert report["repaired"] is None and damaged.store.broken_layers() == {}


def test_repair_marks_the_layer_broken_and_a_reimport_heals_it(damaged: Damaged) -> None:
    store, layer = damaged.store, damaged.layer
    report = store.fsck(repair=True)
    assert report["repaired"]["layers_broken"] == [layer.id]
    assert report["repaired"]["chunks_retired"] == len(report["damaged"]) > 0
    assert list(store.broken_layers()) == [layer.id]
    assert store.fsck()["broken"] == [layer.id]
    # Every read of a broken layer is refused, clearly.
    for read in (
        lambda: store.export_tar(layer, damaged.out / "x.tar"),
        lambda: store.stack([damaged.base, layer]),
        lambda: store.squash(damaged.image),
    ):
        with pytest.raises(ls.IntegrityError, match="is broken"):
            read()
    assert list(damaged.out.iterdir()) == []
    # Layers that do not use a damaged chunk still read.
    assert store.stack([damaged.base, damaged.top]).read_bytes("/etc/top") == b"top layer\n"

    healed = store.import_tar(DAMAGED_TAR)
    assert healed.id == layer.id
    assert store.broken_layers() == {}
    digest = store.export_tar(layer, damaged.out / "healed.tar")
    data = (damaged.out / "healed.tar").read_bytes()
    assert digest == layer.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    assert data == DAMAGED_TAR
    assert store.stack([damaged.base, layer]).read_bytes("/data/big.txt") == BIG
    store.gc()
    assert store.fsck()["ok"]


def test_cli_fsck_repair_reports_what_it_did(damaged: Damaged) -> None:
    cli = [sys.executable, "-m", "layerstore", "--store", damaged.store.path]
    found = subprocess.run([*cli, "fsck"], capture_output=True, text=True)
    assert found.returncode == 1
    assert "/data/big.txt" in found.stdout
    repaired = subprocess.run([*cli, "fsck", "--repair"], capture_output=True, text=True)
    assert repaired.returncode == 1, repaired.stderr
    assert f"broken: {damaged.layer.id}" in repaired.stdout
    assert re.search(r"took \d+ damaged chunks? out of use", repaired.stdout), repaired.stdout
    export = subprocess.run(
        [*cli, "export", damaged.layer.id, str(damaged.out / "x.tar")],
        capture_output=True,
        text=True,
    )
    assert export.returncode != 0 and "is broken" in export.stderr
    assert not (damaged.out / "x.tar").exists()


def test_a_chunk_served_from_a_block_read_for_another_file_is_checked_too(tmp_path: Path) -> None:
    # file1 and file3 land in one block of the layer's pack; file2's chunk sits in the base's
    # pack, so the export reads file1's block, then file2's, then reuses file1's for file3.
    store = ls.Store(tmp_path / "store", compression_level=0)
    shared = tf.text_bytes("shared", 4000)
    store.import_tar(tf.simple_tar({"base": shared}))
    third = tf.text_bytes("third", 4000)
    layer = store.import_tar(
        tf.simple_tar({"f1": tf.text_bytes("first", 4000), "f2": shared, "f3": third})
    )
    packs = list((Path(store.path) / "packs").glob("*.pack"))
    (pack,) = [p for p in packs if third in p.read_bytes()]
    data = bytearray(pack.read_bytes())
    data[data.index(third) + 100] ^= 1
    pack.write_bytes(bytes(data))
    with pytest.raises(ls.IntegrityError, match="/f3"):
        store.export_tar(layer, tmp_path / "out.tar")
    assert not (tmp_path / "out.tar").exists()
