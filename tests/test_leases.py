"""gc never takes what an import in flight or a reader still needs (issue 14, section 6):
leases are judged live by a lock the kernel drops when their owner dies, which works across PID
namespaces, and a retired pack waits its grace period from the moment it was retired.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import layerstore as ls
import pytest
import tarfixtures as tf
from storeutil import export_bytes, no_core_dumps, pack_files, run_python

MiB = 1 << 20

PAUSING_IMPORT = """
import os, sys, time
import layerstore as ls
store = ls.Store(sys.argv[1])
def progress(n):
    if n >= 8 * 2**20 and not os.path.exists(sys.argv[3]):
        print("paused", os.getpid(), flush=True)
        while not os.path.exists(sys.argv[3]):
            time.sleep(0.05)
layer = store.import_tar(sys.argv[2], progress=progress)
print("done", layer.id, flush=True)
"""


@pytest.mark.root
def test_an_import_in_another_pid_namespace_keeps_its_lease_through_gc(
    store: ls.Store, tmp_path: Path
) -> None:
    src = tmp_path / "layer.tar"
    data = tf.simple_tar({f"f{i}": tf.rand_bytes(f"ns-{i}", 4 * MiB) for i in range(6)})
    src.write_bytes(data)
    go = tmp_path / "go"
    in_namespace = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]
    with subprocess.Popen(
        [*in_namespace, sys.executable, "-c", PAUSING_IMPORT, store.path, str(src), str(go)],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=no_core_dumps,
    ) as child:
        try:
            assert child.stdout is not None
            first = child.stdout.readline().split()
            assert first[0] == "paused", first
            assert int(first[1]) < 10, "the importer runs in a PID namespace of its own"
            in_flight = pack_files(store)
            assert in_flight, "the import has started writing its pack"
            store.gc()
            assert pack_files(store) >= in_flight, "gc removed the pack of an import in flight"
            go.touch()
            last = child.stdout.readline().split()
            assert child.wait(timeout=120) == 0
        finally:
            if child.poll() is None:
                child.kill()
    assert last[0] == "done"
    layer = store.layer(last[1])
    assert store.fsck()["ok"]
    assert export_bytes(store, layer) == data
    assert store.gc()["deferred"] is False


def test_a_killed_importer_lease_is_judged_dead_and_collected(
    store: ls.Store, tmp_path: Path
) -> None:
    src = tmp_path / "layer.tar"
    src.write_bytes(tf.simple_tar({f"f{i}": tf.rand_bytes(f"k-{i}", 4 * MiB) for i in range(6)}))
    go = tmp_path / "never"
    with subprocess.Popen(
        [sys.executable, "-c", PAUSING_IMPORT, store.path, str(src), str(go)],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=no_core_dumps,
    ) as child:
        assert child.stdout is not None
        assert child.stdout.readline().startswith("paused")
        in_flight = pack_files(store)
        store.gc()
        assert pack_files(store) == in_flight, "the live import's pack stays"
        child.kill()
        child.wait(timeout=60)
    report = store.gc()
    assert report["deferred"] is False
    assert pack_files(store) == set(), "the dead import's pack was collected"
    assert list((Path(store.path) / "leases").iterdir()) == [], "its lock file too"
    assert store.fsck()["ok"]


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_retired_pack_waits_its_grace_period_from_retirement(store: ls.Store) -> None:
    keep = store.import_tar(tf.simple_tar({"keep": tf.rand_bytes("keep", MiB)}))
    before = pack_files(store)
    gone = store.import_tar(tf.simple_tar({"gone": tf.rand_bytes("gone", MiB)}))
    (pack,) = pack_files(store) - before
    packs = Path(store.path) / "packs"
    age(packs / pack, 3600)  # written an hour ago, as a pack of a long-lived store is
    reader = store.stack([gone]).open("/gone")  # a reader that planned its reads earlier
    store.delete(gone)
    assert store.gc()["packs_removed"] == 1
    retired = packs / "retired" / pack
    assert retired.exists(), "a pack older than the grace period was deleted on retirement"
    assert reader.read() == tf.rand_bytes("gone", MiB)
    store.gc()
    assert retired.exists()
    age(retired, 3600)
    store.gc()
    assert not retired.exists(), "once its grace period is over it goes"
    assert export_bytes(store, keep) == tf.simple_tar({"keep": tf.rand_bytes("keep", MiB)})


def test_packs_merged_by_gc_wait_in_retirement_too(store: ls.Store) -> None:
    layers = [store.import_tar(tf.simple_tar({f"s{i}": tf.rand_bytes(i, 4096)})) for i in range(8)]
    packs = Path(store.path) / "packs"
    small = pack_files(store)
    assert len(small) == 8
    for p in small:
        age(packs / p, 3600)
    report = store.gc()
    assert report["packs_rewritten"] == 8
    assert {p.name for p in (packs / "retired").iterdir()} == small
    for i, layer in enumerate(layers):
        assert store.stack([layer]).read_bytes(f"/s{i}") == tf.rand_bytes(i, 4096)


GC_ELSEWHERE = """
import json, sys
import layerstore as ls
print(json.dumps(ls.Store(sys.argv[1]).gc()))
"""


@pytest.mark.root
def test_an_import_that_fails_on_a_full_disk_never_leaves_a_lease_that_blocks_gc(
    tmp_path: Path,
) -> None:
    """Whatever point of an import the disk fills at (its lease's own release included), once
    space is back a gc in another process collects: the lease is never left looking alive."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], check=True)
    try:
        root = disk / "store"
        store = ls.Store(root)
        kept = store.import_tar(tf.simple_tar({"kept": tf.rand_bytes("kept", 100_000)}))
        big = tf.simple_tar({"big": tf.rand_bytes("big", 2 * MiB)})
        failures = 0
        for free in (4096, 8192, 16384, 65536, 262144):
            filler = disk / "filler"
            st = os.statvfs(disk)
            room = st.f_bavail * st.f_frsize - free
            with open(filler, "wb") as f:
                f.truncate(0)
                f.write(b"\0" * max(room, 0))
            try:
                store.import_tar(big)
            except OSError:
                failures += 1
            filler.unlink()
            report = run_python(GC_ELSEWHERE, str(root))
            assert report.returncode == 0, report.stderr
            assert '"deferred": false' in report.stdout, (free, report.stdout)
            assert store.fsck()["ok"]
        assert failures >= 3, "the disk was not full enough to fail the imports"
        assert export_bytes(store, kept) == tf.simple_tar({"kept": tf.rand_bytes("kept", 100_000)})
        del store
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)


def paused_import(
    store: ls.Store, data: bytes
) -> tuple[threading.Thread, threading.Event, list[ls.Layer]]:
    """Start importing `data` on a thread that pauses mid-way, holding its lease."""
    paused, resume = threading.Event(), threading.Event()
    done: list[ls.Layer] = []

    def progress(n: int) -> None:
        if n >= 4 * MiB and not paused.is_set():
            paused.set()
            assert resume.wait(timeout=60)

    t = threading.Thread(target=lambda: done.append(store.import_tar(data, progress=progress)))
    t.start()
    assert paused.wait(timeout=60)
    return t, resume, done


def test_gc_collects_garbage_while_imports_keep_coming(store: ls.Store) -> None:
    """Imports in flight protect only what they may use: garbage made before them is collected
    by the first gc that runs once the imports older than it have ended, even though newer ones
    are running."""
    garbage = store.import_tar(tf.simple_tar({"g": tf.rand_bytes("garbage", 3 * MiB)}))
    store.delete(garbage)
    first, resume_first, _ = paused_import(
        store, tf.simple_tar({"a": tf.rand_bytes("first", 12 * MiB)})
    )
    report = store.gc()
    assert report["chunks_removed"] == 0 and report["deferred"] is True  # `first` may use it
    second, resume_second, done = paused_import(
        store, tf.simple_tar({"b": tf.rand_bytes("second", 12 * MiB)})
    )
    resume_first.set()
    first.join(timeout=60)
    report = store.gc()  # only `second` is in flight, and it began after the garbage was doomed
    assert report["chunks_removed"] > 0
    assert report["deferred"] is False
    resume_second.set()
    second.join(timeout=60)
    assert store.fsck()["ok"]
    assert export_bytes(store, done[0]) == tf.simple_tar({"b": tf.rand_bytes("second", 12 * MiB)})


def test_an_import_never_reuses_a_chunk_gc_has_doomed(store: ls.Store) -> None:
    content = tf.rand_bytes("doomed", 3 * MiB)
    old = store.import_tar(tf.simple_tar({"old": content}))
    store.delete(old)
    holder, resume, _ = paused_import(store, tf.simple_tar({"h": tf.rand_bytes("h", 12 * MiB)}))
    assert store.gc()["deferred"] is True  # the old chunks are doomed, not yet deleted
    again = store.import_tar(tf.simple_tar({"again": content}))
    assert again.import_timings is not None
    resume.set()
    holder.join(timeout=60)
    store.gc()  # nothing in flight: whatever is unreferenced goes
    assert store.fsck()["ok"]
    assert store.stack([again]).read_bytes("/again") == content
