"""Content is stored once: across re-imports, compressions, layers and versions."""

from __future__ import annotations

import tarfile
from pathlib import Path

import layerstore as ls
import pytest
import tarfixtures as tf
from storeutil import b3sum, export_bytes, pack_files

MiB = 1 << 20
SHARED = tf.rand_bytes("shared", 2 * MiB)


def counts(store: ls.Store) -> tuple[int, int, int]:
    s = store.stats()
    return s["chunks"], s["content_bytes"], s["stored_bytes"]


@pytest.mark.parametrize("again", ["same-bytes", "gzip", "gzip-multi", "zstd", "from-path"])
def test_reimport_stores_no_new_chunk(
    store: ls.Store, producer_tars: dict[str, bytes], tmp_path: Path, again: str
) -> None:
    data = producer_tars["gnutar-posix"]
    first = store.import_tar(data)
    before = counts(store)
    packs = pack_files(store)
    blob = {
        "same-bytes": data,
        "gzip": tf.gzip_single(data),
        "gzip-multi": tf.gzip_multi(data),
        "zstd": tf.zstd_single(data),
        "from-path": data,
    }[again]
    if again == "from-path":
        (tmp_path / "t.tar").write_bytes(blob)
        second = store.import_tar(tmp_path / "t.tar")
    else:
        second = store.import_tar(blob)
    assert second.id == first.id
    assert counts(store) == before
    assert pack_files(store) == packs, "a re-import wrote a pack"
    s = store.stats()
    assert s["layers"] == 1
    assert s["logical_bytes"] == len(data)


def test_all_producers_then_again(store: ls.Store, producer_tars: dict[str, bytes]) -> None:
    for data in producer_tars.values():
        store.import_tar(data)
    before = counts(store)
    for data in producer_tars.values():
        store.import_tar(tf.zstd_single(data))
        store.import_tar(tf.gzip_single(data))
    assert counts(store) == before
    assert store.stats()["layers"] == len(producer_tars)


def test_shared_file_is_stored_once(store: ls.Store) -> None:
    a_only = tf.rand_bytes("a-only", 100_000)
    b_only = tf.rand_bytes("b-only", 150_000)
    a = tf.simple_tar({"usr/lib/libshared.so": SHARED, "a.txt": a_only})
    b = tf.simple_tar({"opt/other/name.so": SHARED, "b.txt": b_only}, tarfile.GNU_FORMAT)

    la = store.import_tar(a)
    chunks_a, content_a, _ = counts(store)
    assert content_a == len(SHARED) + len(a_only)

    lb = store.import_tar(b)
    chunks_b, content_b, _ = counts(store)
    assert content_b - content_a == len(b_only), "only the new file's bytes are new"

    shared_a = next(e for e in la.entries() if e.path == "/usr/lib/libshared.so")
    shared_b = next(e for e in lb.entries() if e.path == "/opt/other/name.so")
    assert shared_a.digest == shared_b.digest == b3sum(SHARED)
    assert shared_a.chunk_count == shared_b.chunk_count > 1
    b_entry = next(e for e in lb.entries() if e.path == "/b.txt")
    assert chunks_b - chunks_a == b_entry.chunk_count
    assert export_bytes(store, la) == a
    assert export_bytes(store, lb) == b


def test_duplicate_content_within_one_tar(store: ls.Store) -> None:
    data = tf.simple_tar({"one": SHARED, "two": SHARED, "three": SHARED[:100_000]})
    layer = store.import_tar(data)
    s = store.stats()
    assert s["content_bytes"] < len(SHARED) + 100_000 + 256 * 1024
    one, two, _three = layer.entries()
    assert one.digest == two.digest
    assert export_bytes(store, layer) == data


def test_edited_file_shares_most_chunks(store: ls.Store) -> None:
    """Content-defined chunking: an insertion in the middle only changes nearby chunks."""
    v1 = tf.rand_bytes("v1", 4 * MiB)
    v2 = v1[: 2 * MiB] + b"inserted bytes" * 10 + v1[2 * MiB :]
    store.import_tar(tf.simple_tar({"big.bin": v1}))
    _, content1, _ = counts(store)
    layer2 = store.import_tar(tf.simple_tar({"big.bin": v2}))
    _, content2, _ = counts(store)
    chunk_max = store.settings["chunk_max"]
    assert 0 < content2 - content1 <= 2 * chunk_max + 140
    (entry,) = layer2.entries()
    assert entry.digest == b3sum(v2)


def test_rootfs_v1_v2(store: ls.Store, tmp_path: Path) -> None:
    """Two versions of a tree (GNU tar): files kept across versions are stored once."""
    root1 = tf.make_tree(tmp_path / "v1", seed=1)
    v1 = tf.gnu_tar(root1, "posix")
    (root1 / "etc/hostname").write_bytes(b"changed\n")
    (root1 / "usr/share/doc/readme.txt").unlink()
    new_file = tf.rand_bytes("v2-new", 200_000)
    (root1 / "usr/lib/new.bin").write_bytes(new_file)
    v2 = tf.gnu_tar(root1, "posix")

    store.import_tar(v1)
    _, content1, _ = counts(store)
    l2 = store.import_tar(v2)
    _, content2, _ = counts(store)
    assert content2 - content1 == len(new_file) + len(b"changed\n")
    assert export_bytes(store, l2) == v2


def test_multichunk_file_digest_and_chunks(store: ls.Store) -> None:
    big = tf.rand_bytes("two-mib", 2 * MiB)
    small = b"small file\n"
    data = tf.simple_tar({"big": big, "small": small, "empty": b""})
    layer = store.import_tar(data)
    by_path = {e.path: e for e in layer.entries()}
    settings = store.settings
    assert by_path["/big"].chunk_count > 1
    assert by_path["/big"].chunk_count >= len(big) // settings["chunk_max"]
    assert by_path["/big"].chunk_count <= len(big) // settings["chunk_min"] + 1
    assert by_path["/big"].digest == b3sum(big)
    assert by_path["/small"].chunk_count == 1
    assert by_path["/small"].digest == b3sum(small)
    assert by_path["/empty"].chunk_count == 0
    assert by_path["/empty"].size == 0
    s = store.stats()
    assert s["chunks"] == by_path["/big"].chunk_count + 1
    assert s["content_bytes"] == len(big) + len(small)


@pytest.mark.parametrize("level", [0, 1, 19])
def test_compression_levels(tmp_path: Path, level: int) -> None:
    store = ls.Store(tmp_path / "store", compression_level=level)
    assert store.settings["compression_level"] == level
    text = tf.text_bytes("compressible", MiB)
    rand = tf.rand_bytes("incompressible", 500_000)
    data = tf.simple_tar({"text": text, "rand": rand})
    layer = store.import_tar(data)
    assert export_bytes(store, layer) == data
    s = store.stats()
    assert s["content_bytes"] == len(text) + len(rand)
    if level == 0:
        assert s["stored_bytes"] == s["content_bytes"]
    else:
        assert s["stored_bytes"] < len(text) // 2 + len(rand) + 4096
    assert store.fsck()["ok"]


def test_custom_chunk_parameters(tmp_path: Path) -> None:
    store = ls.Store(tmp_path / "store", chunk_min=4096, chunk_avg=16384, chunk_max=65536)
    assert (
        store.settings["chunk_min"],
        store.settings["chunk_avg"],
        store.settings["chunk_max"],
    ) == (
        4096,
        16384,
        65536,
    )
    big = tf.rand_bytes("custom", MiB)
    layer = store.import_tar(tf.simple_tar({"f": big}))
    (e,) = layer.entries()
    assert MiB // 65536 <= e.chunk_count <= MiB // 4096 + 1
    assert e.chunk_count > 8  # far more than with the 64 KiB default average
    assert e.digest == b3sum(big)


def test_invalid_chunk_parameters_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ls.LayerstoreError):
        ls.Store(tmp_path / "a", chunk_min=65536, chunk_avg=16384, chunk_max=4096)


def test_deleted_then_reimported_layer_reuses_chunks(store: ls.Store) -> None:
    data = tf.simple_tar({"f": SHARED})
    layer = store.import_tar(data)
    before = counts(store)
    store.delete(layer)
    again = store.import_tar(data)  # before any gc: the chunks are still there
    assert again.id == layer.id
    assert counts(store) == before
    assert export_bytes(store, again) == data
    store.gc()
    assert export_bytes(store, again) == data
    assert store.fsck()["ok"]
