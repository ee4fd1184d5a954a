"""A store on a full disk can free space (issue 14, section 6): `delete`, `untag` and `gc` work
at 0 bytes free, gc frees what needs no new space before it rewrites anything, and says what it
could not rewrite for want of room. Each test runs on a small tmpfs of its own (root).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import layerstore as ls
import pytest
import tarfixtures as tf
from storeutil import export_bytes

MiB = 1 << 20

pytestmark = pytest.mark.root


@pytest.fixture
def disk(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    size = getattr(request, "param", "16m")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "--lazy", str(mnt)], check=True)


def free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(disk: Path) -> Path:
    """Take every byte left on `disk` (files written until the disk refuses)."""
    filler = disk / "filler"
    while filler.exists():
        filler = filler.with_name(filler.name + "+")
    with open(filler, "wb", buffering=0) as f:
        for block in (MiB, 4096, 512, 1):
            try:
                while True:
                    f.write(b"\0" * block)
            except OSError:
                pass
    assert free(disk) == 0
    return filler


def layer_tar(name: str, size: int) -> bytes:
    return tf.simple_tar({name: tf.rand_bytes(name, size)})


def test_delete_untag_and_gc_free_space_at_zero_bytes_free(disk: Path) -> None:
    store = ls.Store(disk / "store")
    layers = [store.import_tar(layer_tar(f"l{i}", 1_500_000)) for i in range(6)]
    store.tag(store.stack(layers[:1]), "first")
    filler = fill(disk)
    store.untag("first")  # was: OSError "database or disk is full"
    for layer in layers[:3]:
        store.delete(layer)
    report = store.gc()  # was: OSError "No space left on device" (it wrote packs first)
    assert report["packs_removed"] == 3
    assert free(disk) >= 3 * 1_500_000, "the deleted layers' packs are gone at once"
    for i, layer in enumerate(layers[3:], start=3):
        assert export_bytes(store, layer) == layer_tar(f"l{i}", 1_500_000)
    assert store.fsck()["ok"]
    filler.unlink()
    store.gc()
    assert (disk / "store/reserve").stat().st_size > 0, "gc makes the reserve again"


@pytest.mark.parametrize("disk", ["24m"], indirect=True)
def test_gc_says_which_rewrites_the_disk_had_no_room_for(disk: Path) -> None:
    store = ls.Store(disk / "store")
    keep = {"keep": tf.rand_bytes("keep", 3 * MiB)}
    mixed = store.import_tar(tf.simple_tar({**keep, "gone": tf.rand_bytes("gone", 7 * MiB)}))
    kept = store.import_tar(tf.simple_tar(keep))  # its chunks are in the mixed layer's pack
    store.delete(mixed)
    filler = fill(disk)
    report = store.gc()
    assert report["packs_not_rewritten"] == 1, report
    assert report["packs_rewritten"] == 0
    assert export_bytes(store, kept) == tf.simple_tar(keep)
    assert store.fsck()["ok"]
    filler.unlink()
    report = store.gc()
    assert (report["packs_rewritten"], report["packs_not_rewritten"]) == (1, 0), report
    assert export_bytes(store, kept) == tf.simple_tar(keep)
    assert store.fsck()["ok"]


def test_io_errors_name_the_store_file_they_are_about(disk: Path) -> None:
    """With no reserve left to give up, a full disk fails imports and deletes with ENOSPC, each
    naming the file of the store it could not write (before: 'metadata database: database or
    disk is full', naming nothing)."""
    root = disk / "store"
    store = ls.Store(root)
    layer = store.import_tar(layer_tar("small", 10_000))
    (root / "reserve").unlink(missing_ok=True)
    filler = fill(disk)
    os.truncate(filler, filler.stat().st_size - 256 * 1024)  # room for the lease, not the pack
    with pytest.raises(OSError) as info:
        store.import_tar(layer_tar("big", MiB))
    assert info.value.errno == 28
    assert f"writing pack {root / 'packs'}/" in str(info.value)
    fill(disk)
    with pytest.raises(OSError) as info:
        store.delete(layer)
    assert info.value.errno == 28
    assert f"metadata database {root / 'meta.db'}: " in str(info.value)
    assert store.layers() == [layer]
