"""gc never takes what an import in flight or a reader still needs (issue 14, section 6):
leases are judged live by a lock the kernel drops when their owner dies, which works across PID
namespaces, and a retired pack waits its grace period from the moment it was retired.
"""

from __future__ import annotations

import os
import subprocess
import sys
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
            report = store.gc()
            assert report["deferred"] is True
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
        assert store.gc()["deferred"] is True
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
