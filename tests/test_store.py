"""The store's own operations: lookup, delete, gc, reopen, settings, stats, progress, threads."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import layerstore as ls
import pytest
import tarfixtures as tf
from storeutil import (
    assert_unchanged,
    b3sum,
    db_packs,
    export_bytes,
    pack_files,
    run_python,
    snapshot,
)

MiB = 1 << 20


def two_layers(store: ls.Store) -> tuple[ls.Layer, bytes, ls.Layer, bytes]:
    shared = tf.rand_bytes("shared", 300_000)
    a = tf.simple_tar(
        {"shared.bin": shared, "a-only.bin": tf.rand_bytes("a-only", 2 * MiB), "a.txt": b"a"}
    )
    b = tf.simple_tar({"shared.bin": shared, "b-only.bin": tf.rand_bytes("b-only", 200_000)})
    return store.import_tar(a), a, store.import_tar(b), b


# ------------------------------------------------------------------------------------------
# Lookup
# ------------------------------------------------------------------------------------------


def test_lookup_by_every_key(store: ls.Store, producer_tars: dict[str, bytes]) -> None:
    data = producer_tars["py-pax"]
    gz = tf.gzip_single(data)
    zs = tf.zstd_single(data)
    layer = store.import_tar(gz)
    store.import_tar(zs)
    other = store.import_tar(producer_tars["py-gnu"])
    hex_id = layer.id.removeprefix("blake3:")
    hex_diff = layer.diff_id.removeprefix("sha256:")
    keys = [
        layer.id,
        layer.diff_id,
        tf.sha256(gz),
        tf.sha256(zs),
        hex_id[:12],
        hex_id,
        "blake3:" + hex_id[:16],
        hex_diff[:12],
        "sha256:" + hex_diff[:16],
    ]
    for key in keys:
        found = store.layer(key)
        assert found == layer, key
        assert found.id == layer.id and found.diff_id == layer.diff_id
    assert store.layer(layer) == layer
    assert store.layer(other.id) == other != layer
    assert {x.id for x in store.layers()} == {layer.id, other.id}


def test_layer_attributes(store: ls.Store, producer_tars: dict[str, bytes]) -> None:
    data = producer_tars["gnutar-gnu"]
    t0 = int(time.time())
    layer = store.import_tar(data)
    assert layer.id.startswith("blake3:") and len(layer.id) == 7 + 64
    assert layer.diff_id.startswith("sha256:") and len(layer.diff_id) == 7 + 64
    assert layer.tree_id.startswith("blake3:") and len(layer.tree_id) == 7 + 64
    assert layer.tree_id != layer.id
    assert layer.size == len(data)
    assert layer.entry_count == len(layer.entries())
    assert t0 - 5 <= layer.created <= time.time() + 5
    assert layer.diff_id in repr(layer)


def test_tree_id_is_independent_of_encoding(store: ls.Store) -> None:
    members = [tf.dir_("etc/"), tf.file_("etc/a", b"a"), tf.file_("etc/b", b"b" * 1000)]
    ustar_tar = tf.py_tar(tarfile.USTAR_FORMAT, members=members)
    variants = [
        tf.py_tar(tarfile.GNU_FORMAT, members=members),
        ustar_tar,
        tf.py_tar(tarfile.USTAR_FORMAT, members=members[::-1]),  # other order
        tf.with_checksum_style(ustar_tar, "seven-nul"),
        tf.without_record_padding(ustar_tar),
    ]
    layers = [store.import_tar(v) for v in variants]
    assert len({x.id for x in layers}) == len(variants)
    assert len({x.tree_id for x in layers}) == 1
    changed = store.import_tar(
        tf.py_tar(tarfile.USTAR_FORMAT, members=[*members[:2], tf.file_("etc/b", b"c" * 1000)])
    )
    assert changed.tree_id != layers[0].tree_id
    chmod = store.import_tar(
        tf.py_tar(
            tarfile.USTAR_FORMAT, members=[*members[:2], tf.file_("etc/b", b"b" * 1000, 0o600)]
        )
    )
    assert chmod.tree_id not in (changed.tree_id, layers[0].tree_id)


def test_store_path_type(store: ls.Store, tmp_path: Path) -> None:
    assert os.fspath(store.path) == str(tmp_path / "store")
    assert isinstance(store.path, str), "_core.pyi declares Store.path -> str"


# ------------------------------------------------------------------------------------------
# Delete and gc
# ------------------------------------------------------------------------------------------


def test_delete_then_gc_reclaims_only_unshared_chunks(store: ls.Store) -> None:
    a, _, b, b_tar = two_layers(store)
    a_only = next(e for e in a.entries() if e.path == "/a-only.bin")
    a_txt = next(e for e in a.entries() if e.path == "/a.txt")
    before = store.stats()

    store.delete(a)
    assert [x.id for x in store.layers()] == [b.id]
    with pytest.raises(ls.NotFoundError):
        store.layer(a.id)
    with pytest.raises(ls.NotFoundError):
        store.layer(a.diff_id)
    # chunks stay until gc
    assert store.stats()["chunks"] == before["chunks"]
    assert export_bytes(store, b) == b_tar

    report = store.gc()
    assert report["chunks_removed"] == a_only.chunk_count + a_txt.chunk_count
    assert report["bytes_reclaimed"] > 0
    assert report["deferred"] is False
    after = store.stats()
    assert after["chunks"] == before["chunks"] - report["chunks_removed"]
    b_content = sum(e.size for e in b.entries())
    assert after["content_bytes"] == b_content
    assert after["stored_bytes"] < before["stored_bytes"]
    assert after["layers"] == 1
    assert after["logical_bytes"] == len(b_tar)

    assert export_bytes(store, b) == b_tar
    fsck = store.fsck()
    assert fsck["ok"], fsck["problems"]
    assert fsck["garbage"] == []
    assert pack_files(store) == db_packs(store)

    # a's pack held b's shared chunks: it is rewritten (mostly garbage) or kept, never lost
    second = store.gc()
    assert second["chunks_removed"] == 0
    assert export_bytes(store, b) == b_tar


def test_delete_every_layer_then_gc_empties_the_store(store: ls.Store) -> None:
    a, _, b, _ = two_layers(store)
    store.delete(a.id)
    store.delete(b.diff_id)
    assert store.layers() == []
    store.gc()
    s = store.stats()
    assert (s["layers"], s["chunks"], s["packs"], s["content_bytes"], s["stored_bytes"]) == (
        0,
        0,
        0,
        0,
        0,
    )
    assert pack_files(store) == set()
    assert store.fsck()["ok"]


def test_gc_on_a_clean_store_reclaims_nothing(
    store: ls.Store, producer_tars: dict[str, bytes]
) -> None:
    """Nothing is garbage right after imports: gc removes and rewrites nothing."""
    layers = [store.import_tar(producer_tars[name]) for name in ("py-ustar", "py-pax")]
    store.import_tar(tf.simple_tar({"tiny": b"hello"}))  # a pack holding one 5-byte chunk
    before = snapshot(store)
    packs = pack_files(store)
    report = store.gc()
    assert report == {
        "chunks_removed": 0,
        "packs_removed": 0,
        "packs_rewritten": 0,
        "bytes_reclaimed": 0,
        "deferred": False,
        "mounts_reaped": 0,
        "snapshots_removed": 0,
        "packs_not_rewritten": 0,
    }
    assert pack_files(store) == packs
    assert snapshot(store) == before
    for layer, name in zip(layers, ("py-ustar", "py-pax"), strict=True):
        assert export_bytes(store, layer) == producer_tars[name]


def test_gc_rewrites_mostly_garbage_pack(store: ls.Store) -> None:
    """One import's pack keeps a few live chunks after its layer goes: gc compacts it."""
    keep = {f"keep/{i}": tf.rand_bytes(f"keep{i}", 3000) for i in range(5)}
    drop = {f"drop/{i}": tf.rand_bytes(f"drop{i}", 50_000) for i in range(40)}
    big = store.import_tar(tf.simple_tar({**keep, **drop}))
    small_tar = tf.simple_tar(keep, tarfile.GNU_FORMAT)
    small = store.import_tar(small_tar)  # all of its chunks live in big's pack
    entries = big.entries()
    store.delete(big)
    disk_before = sum((Path(store.path) / "packs" / p).stat().st_size for p in pack_files(store))
    report = store.gc()
    dropped = [e for e in entries if e.path.startswith("/drop/")]
    assert report["chunks_removed"] == sum(e.chunk_count for e in dropped)
    assert report["packs_rewritten"] + report["packs_removed"] >= 1
    disk_after = sum((Path(store.path) / "packs" / p).stat().st_size for p in pack_files(store))
    assert disk_after < disk_before // 4
    assert export_bytes(store, small) == small_tar
    assert store.fsck()["ok"]
    assert pack_files(store) == db_packs(store)


# ------------------------------------------------------------------------------------------
# Reopen, settings, stats
# ------------------------------------------------------------------------------------------


def test_reopen_same_process(tmp_path: Path, producer_tars: dict[str, bytes]) -> None:
    path = tmp_path / "store"
    first = ls.Store(path)
    layer = first.import_tar(producer_tars["py-gnu"])
    del first
    again = ls.Store(str(path))
    assert [x.id for x in again.layers()] == [layer.id]
    assert export_bytes(again, layer.id) == producer_tars["py-gnu"]
    # two Store objects on one path at once
    third = ls.Store(path)
    other = third.import_tar(producer_tars["py-ustar"])
    assert {x.id for x in again.layers()} == {layer.id, other.id}


def test_reopen_in_new_process(tmp_path: Path, producer_tars: dict[str, bytes]) -> None:
    path = tmp_path / "store"
    store = ls.Store(path)
    a = store.import_tar(producer_tars["py-pax"])
    code = """
import json, sys, io, hashlib
import layerstore as ls
s = ls.Store(sys.argv[1])
out = []
for layer in s.layers():
    buf = io.BytesIO()
    s.export_tar(layer, buf)
    out.append([layer.id, layer.diff_id, "sha256:" + hashlib.sha256(buf.getvalue()).hexdigest()])
b = s.import_tar(sys.argv[2])
print(json.dumps({"layers": out, "new": b.id, "settings": s.settings}))
"""
    tar2 = tmp_path / "two.tar"
    tar2.write_bytes(producer_tars["gnutar-ustar"])
    res = run_python(code, str(path), str(tar2))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["layers"] == [[a.id, a.diff_id, a.diff_id]]
    assert out["settings"] == store.settings
    # the parent sees what the child imported
    assert {x.id for x in store.layers()} == {a.id, out["new"]}
    assert export_bytes(store, out["new"]) == producer_tars["gnutar-ustar"]


def test_settings_persist(tmp_path: Path) -> None:
    path = tmp_path / "store"
    created = ls.Store(
        path, compression_level=0, chunk_min=8192, chunk_avg=32768, chunk_max=131072, max_depth=16
    )
    expected = {
        "compression_level": 0,
        "chunk_min": 8192,
        "chunk_avg": 32768,
        "chunk_max": 131072,
        "max_depth": 16,
        "format_version": ls.FORMAT_VERSION,
    }
    assert created.settings == expected
    data = tf.simple_tar({"f": tf.text_bytes("settings", 500_000)})
    created.import_tar(data)
    reopened = ls.Store(
        path, compression_level=9, chunk_min=4096, chunk_avg=16384, chunk_max=65536, max_depth=3
    )
    assert reopened.settings == expected
    # still uncompressed, whatever the reopening asked for
    data2 = tf.simple_tar({"g": tf.text_bytes("settings2", 500_000)})
    reopened.import_tar(data2)
    s = reopened.stats()
    assert s["stored_bytes"] == s["content_bytes"]


def test_default_settings(store: ls.Store) -> None:
    s = store.settings
    assert s["compression_level"] >= 1, "chunks are compressed by default"
    assert s["chunk_min"] < s["chunk_avg"] < s["chunk_max"]
    assert s["max_depth"] == 127
    assert s["format_version"] == ls.FORMAT_VERSION >= 1


def test_stats_are_consistent(store: ls.Store, producer_tars: dict[str, bytes]) -> None:
    empty = store.stats()
    assert (empty["layers"], empty["chunks"], empty["logical_bytes"], empty["content_bytes"]) == (
        0,
        0,
        0,
        0,
    )
    assert empty["dedup_ratio"] >= 0

    layers = [store.import_tar(d) for d in producer_tars.values()]
    store.import_tar(tf.gzip_single(producer_tars["py-pax"]))  # same layer again
    s = store.stats()
    assert set(s) >= {
        "layers",
        "chunks",
        "packs",
        "logical_bytes",
        "content_bytes",
        "stored_bytes",
        "metadata_bytes",
        "disk_bytes",
        "dedup_ratio",
    }
    assert s["layers"] == len(layers) == len(store.layers())
    assert s["logical_bytes"] == sum(len(d) for d in producer_tars.values())
    assert s["packs"] == len(pack_files(store)) == len(db_packs(store))
    distinct: dict[str, int] = {}
    for layer in layers:
        for e in layer.entries():
            if e.digest is not None:
                distinct[e.digest] = e.size
    # every distinct content is stored; chunks of different files may coincide, never exceed
    assert s["content_bytes"] <= sum(distinct.values())
    assert s["content_bytes"] >= max(distinct.values())
    assert 0 < s["stored_bytes"] <= s["content_bytes"] + 64 * s["chunks"]
    assert s["metadata_bytes"] > 0
    assert s["disk_bytes"] >= s["stored_bytes"]
    assert s["dedup_ratio"] == pytest.approx(
        s["logical_bytes"] / (s["stored_bytes"] + s["metadata_bytes"])
    )


# ------------------------------------------------------------------------------------------
# Progress and cancellation
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_tar() -> bytes:
    return tf.simple_tar({"big.bin": tf.rand_bytes("progress", 40 * MiB), "small": b"x"})


def test_progress_is_called_with_increasing_counts(store: ls.Store, big_tar: bytes) -> None:
    seen: list[int] = []
    layer = store.import_tar(big_tar, progress=seen.append)
    assert len(seen) >= 3
    assert all(isinstance(n, int) for n in seen)
    assert seen == sorted(seen)
    assert len(set(seen)) >= 3
    assert seen[0] >= 0 and seen[-1] <= len(big_tar)
    assert seen[-1] >= len(big_tar) // 2

    out: list[int] = []
    store.export_tar(layer, io.BytesIO(), progress=out.append)
    assert out and out == sorted(out)
    assert out[-1] <= len(big_tar)

    gz: list[int] = []
    store.import_tar(gzip.compress(big_tar, compresslevel=1, mtime=0), progress=gz.append)
    assert gz == sorted(gz) and gz[-1] <= len(big_tar)


def test_progress_reaches_the_total(store: ls.Store, big_tar: bytes) -> None:
    """The last progress report is the whole size, so a progress bar can reach 100%."""
    seen: list[int] = []
    layer = store.import_tar(big_tar, progress=seen.append)
    assert seen[-1] == layer.size
    out: list[int] = []
    store.export_tar(layer, io.BytesIO(), progress=out.append)
    assert out[-1] == layer.size


class Stop(Exception):
    pass


@pytest.mark.parametrize("at_call", [1, 3])
def test_progress_exception_cancels_import(store: ls.Store, big_tar: bytes, at_call: int) -> None:
    seed_tar = tf.simple_tar({"seed": tf.rand_bytes("seed", 500_000)})
    store.import_tar(seed_tar)
    before = snapshot(store)
    calls: list[int] = []

    def progress(n: int) -> None:
        calls.append(n)
        if len(calls) == at_call:
            raise Stop(f"stop at {n}")

    with pytest.raises(Stop, match="stop at"):
        store.import_tar(big_tar, progress=progress)
    assert len(calls) == at_call, "the import went on after the callback raised"
    assert store.fsck()["garbage"] == []
    assert_unchanged(store, before)
    assert export_bytes(store, store.layers()[0]) == seed_tar
    # and a later import of the same tar works
    layer = store.import_tar(big_tar)
    assert export_bytes(store, layer) == big_tar


def test_progress_exception_cancels_export(store: ls.Store, big_tar: bytes, tmp_path: Path) -> None:
    layer = store.import_tar(big_tar)

    def progress(n: int) -> None:
        raise Stop("no export")

    dest = tmp_path / "out" / "x.tar"
    dest.parent.mkdir()
    with pytest.raises(Stop):
        store.export_tar(layer, dest, progress=progress)
    assert os.listdir(dest.parent) == [], "a cancelled export to a path leaves nothing"
    assert export_bytes(store, layer) == big_tar


# ------------------------------------------------------------------------------------------
# Threads
# ------------------------------------------------------------------------------------------


def test_threads_import_concurrently(store: ls.Store) -> None:
    shared = tf.rand_bytes("thread-shared", MiB)
    tars = [
        tf.simple_tar(
            {
                "shared": shared,
                f"own{i}": tf.rand_bytes(f"thread{i}", 3 * MiB),
                "n": str(i).encode(),
            }
        )
        for i in range(4)
    ]
    results: dict[int, ls.Layer] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def work(i: int) -> None:
        try:
            barrier.wait()
            src = tars[i] if i % 2 else io.BytesIO(tf.gzip_single(tars[i]))
            results[i] = store.import_tar(src)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sorted(results) == [0, 1, 2, 3]
    assert {x.id for x in store.layers()} == {b3sum(t) for t in tars}

    # concurrent exports as well
    outs: dict[int, bytes] = {}

    def export(i: int) -> None:
        outs[i] = export_bytes(store, results[i])

    threads = [threading.Thread(target=export, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [outs[i] for i in range(4)] == tars
    assert store.fsck()["ok"]
    s = store.stats()
    assert s["content_bytes"] == len(shared) + 4 * 3 * MiB + 4


# ------------------------------------------------------------------------------------------
# Leases, corruption
# ------------------------------------------------------------------------------------------


def test_gc_defers_while_an_import_holds_a_lease(store: ls.Store) -> None:
    """An import deduplicating against garbage chunks keeps them alive through a gc."""
    reused = tf.rand_bytes("reused", 2 * MiB)
    old = store.import_tar(tf.simple_tar({"old": reused}))
    store.delete(old)  # its chunks are garbage now
    new_tar = tf.simple_tar({"a-reused": reused, "z-fresh": tf.rand_bytes("fresh", 20 * MiB)})

    past_reused = threading.Event()
    resume = threading.Event()

    def progress(n: int) -> None:
        if n >= len(reused) + 4 * MiB and not past_reused.is_set():
            past_reused.set()
            assert resume.wait(timeout=60)

    result: list[ls.Layer] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            result.append(store.import_tar(new_tar, progress=progress))
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=work)
    t.start()
    try:
        assert past_reused.wait(timeout=60), "the import never got past the reused file"
        report = store.gc()  # the import is paused mid-way, holding its lease
        assert report["deferred"] is True
        assert report["chunks_removed"] == 0
    finally:
        resume.set()
        t.join(timeout=120)
    assert not errors, errors
    (layer,) = result
    assert export_bytes(store, layer) == new_tar
    assert store.fsck()["ok"]
    report = store.gc()  # now nothing is in flight: nothing to remove either
    assert report["deferred"] is False
    assert export_bytes(store, layer) == new_tar


def corrupt_one_pack(store: ls.Store) -> Path:
    (pack,) = pack_files(store)
    path = Path(store.path) / "packs" / pack
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    return path


def test_fsck_and_export_detect_a_corrupt_chunk(store: ls.Store, tmp_path: Path) -> None:
    data = tf.simple_tar({"f": tf.rand_bytes("corrupt-me", MiB), "g": b"small"})
    layer = store.import_tar(data)
    corrupt_one_pack(store)

    report = store.fsck()
    assert report["ok"] is False
    assert report["problems"], report
    assert any("chunk" in p for p in report["problems"])

    with pytest.raises(ls.IntegrityError):
        store.export_tar(layer, io.BytesIO())
    dest = tmp_path / "out" / "x.tar"
    dest.parent.mkdir()
    with pytest.raises(ls.IntegrityError):
        store.export_tar(layer, dest)
    assert os.listdir(dest.parent) == [], "a failed export to a path leaves nothing"


def test_fsck_reports_a_missing_pack(store: ls.Store) -> None:
    store.import_tar(tf.simple_tar({"f": tf.rand_bytes("missing-pack", 500_000)}))
    (pack,) = pack_files(store)
    (Path(store.path) / "packs" / pack).unlink()
    report = store.fsck()
    assert report["ok"] is False
    assert any(pack in p for p in report["problems"]), report["problems"]


def test_bytes_past_a_committed_pack_are_ignored(store: ls.Store) -> None:
    """A torn tail (bytes after the committed length) is never read."""
    data = tf.simple_tar({"f": tf.rand_bytes("torn", 500_000)})
    layer = store.import_tar(data)
    (pack,) = pack_files(store)
    with open(Path(store.path) / "packs" / pack, "ab") as f:
        f.write(tf.rand_bytes("tail", 10_000))
    assert store.fsck()["ok"]
    assert export_bytes(store, layer) == data
    other = store.import_tar(tf.simple_tar({"g": tf.rand_bytes("after-torn", 300_000)}))
    assert export_bytes(store, other) != data
    assert store.fsck()["ok"]


def test_entries_of_a_deleted_layer(store: ls.Store) -> None:
    layer = store.import_tar(tf.simple_tar({"f": b"x"}))
    store.delete(layer)
    with pytest.raises(ls.NotFoundError):
        layer.entries()
    with pytest.raises(ls.NotFoundError):
        store.export_tar(layer, io.BytesIO())


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "store"
    ls.Store(path).import_tar(tf.simple_tar({"f": b"x"}))
    conn = sqlite3.connect(path / "meta.db")
    with conn:
        conn.execute("UPDATE settings SET value = '999' WHERE key = 'format_version'")
    conn.close()
    with pytest.raises(ls.LayerstoreError, match="999"):
        ls.Store(path)


def test_store_path_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"not a store")
    with pytest.raises(OSError):
        ls.Store(tmp_path / "file")


def test_reader_survives_a_concurrent_compaction(tmp_path: Path) -> None:
    """A file opened before another process's gc compacts its pack still reads right: gc
    retires replaced packs for a grace period instead of deleting them at once."""
    small = tf.rand_bytes("keep-me", 4000)
    big = tf.rand_bytes("drop-me", 2_000_000)
    s = ls.Store(tmp_path / "store")
    both = s.import_tar(
        tf.py_tar(tarfile.PAX_FORMAT, members=[tf.file_("big", big), tf.file_("small", small)])
    )
    only_small = s.import_tar(tf.py_tar(tarfile.PAX_FORMAT, members=[tf.file_("small", small)]))
    image = s.stack([only_small])
    f = image.open("/small")  # chunk locations resolved now, in the first import's pack
    s.delete(both)
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import layerstore as ls, sys; print(ls.Store(sys.argv[1]).gc())",
            str(tmp_path / "store"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "'packs_rewritten': 1" in child.stdout, child.stdout
    assert f.read() == small
    assert s.fsck()["ok"] and s.fsck()["garbage"] == []
    assert image.read_bytes("/small") == small


@pytest.mark.root
def test_export_into_a_device_or_fifo_writes_into_it(store: ls.Store, tmp_path: Path) -> None:
    """Exporting to /dev/null (or any existing non-regular file) writes into it: the atomic
    temporary-file-and-rename must not replace the device node."""
    import stat as st

    layer = store.import_tar(tf.simple_tar({"f": b"x" * 10_000}))
    null = tmp_path / "null"
    os.mknod(null, st.S_IFCHR | 0o666, os.makedev(1, 3))
    assert store.export_tar(layer, null) == layer.diff_id
    assert st.S_ISCHR(os.lstat(null).st_mode)
    image = store.stack([layer])
    store.squash(image, dest=null)
    assert st.S_ISCHR(os.lstat(null).st_mode)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = bytearray()

    def drain() -> None:
        with open(fifo, "rb") as f:
            got.extend(f.read())

    reader = threading.Thread(target=drain)
    reader.start()
    store.export_tar(layer, fifo)
    reader.join(timeout=30)
    assert st.S_ISFIFO(os.lstat(fifo).st_mode)
    assert hashlib.sha256(got).hexdigest() == layer.diff_id.removeprefix("sha256:")
