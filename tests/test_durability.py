"""Crash safety and multi-process use: injected aborts, SIGKILL mid-import, concurrent gc.

Children run ``sys.executable -c CODE`` against the same store directory as the test. After any
crash the store must be consistent (fsck), show no partial layer, keep every layer whose import
returned, accept the same import again, and let ``gc`` reclaim what the crash left behind.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import layerstore as ls
import pytest
import tarfixtures as tf
from storeutil import (
    db_packs,
    export_bytes,
    pack_files,
    python_child,
    run_python,
    start_time,
)

MiB = 1 << 20

IMPORT_CHILD = """
import sys
import layerstore as ls
store = ls.Store(sys.argv[1])
layer = store.import_tar(sys.argv[2])
print(layer.id, flush=True)
"""

CRASH_POINTS = ["after-pack-write", "after-sync", "before-commit", "after-commit"]


def check_recovered(store: ls.Store, expected: dict[str, bytes]) -> None:
    """fsck clean, exactly the expected layers, each byte-identical; then gc leaves only the
    packs the database names."""
    fsck = store.fsck()
    assert fsck["ok"], fsck["problems"]
    assert {x.id for x in store.layers()} == set(expected)
    for layer_id, data in expected.items():
        assert export_bytes(store, layer_id) == data
    store.gc()
    fsck = store.fsck()
    assert fsck["ok"], fsck["problems"]
    assert fsck["garbage"] == []
    assert pack_files(store) == db_packs(store)
    assert not os.listdir(Path(store.path) / "tmp")
    for layer_id, data in expected.items():
        assert export_bytes(store, layer_id) == data


@pytest.fixture
def prior(store: ls.Store) -> tuple[ls.Store, str, bytes]:
    """A store with one layer whose import returned before the crash under test."""
    data = tf.simple_tar({"prior/big": tf.rand_bytes("prior", 2 * MiB), "prior/small": b"small\n"})
    layer = store.import_tar(data)
    return store, layer.id, data


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_crash_point(prior: tuple[ls.Store, str, bytes], tmp_path: Path, point: str) -> None:
    store, prior_id, prior_tar = prior
    new_tar = tf.simple_tar(
        {
            "new/big": tf.rand_bytes(f"crash-{point}", 3 * MiB),
            "new/text": tf.text_bytes("crash-text", 200_000),
            "prior/big": tf.rand_bytes("prior", 2 * MiB),  # dedups against the prior layer
        },
        tarfile.GNU_FORMAT,
    )
    src = tmp_path / "new.tar"
    src.write_bytes(new_tar)
    new_id = tf.sha256(new_tar)  # diff_id: a lookup key that needs no BLAKE3 here

    res = run_python(IMPORT_CHILD, store.path, str(src), env={"LAYERSTORE_CRASH_AT": point})
    assert res.returncode == -signal.SIGABRT, (res.returncode, res.stdout, res.stderr)
    assert res.stdout == "", "the child returned from import_tar before crashing"

    committed = point == "after-commit"
    garbage = store.fsck()["garbage"]
    if committed:
        assert garbage == []
    else:
        # the crash left the new pack behind (that is what gc must reclaim)
        assert garbage, "no pack was left: the crash point was not reached mid-import"

    expected = {prior_id: prior_tar}
    if committed:
        layer = store.layer(new_id)
        expected[layer.id] = new_tar
    else:
        with pytest.raises(ls.NotFoundError):
            store.layer(new_id)
    check_recovered(store, expected)

    again = store.import_tar(src)
    assert again.diff_id == new_id
    expected[again.id] = new_tar
    check_recovered(store, expected)


OCI_CHILD = """
import sys
import layerstore as ls
ls.Store(sys.argv[1]).import_oci(sys.argv[2])
print("imported", flush=True)
"""


def test_crash_during_an_image_import_leaves_scratch_gc_removes(
    store: ls.Store, tmp_path: Path
) -> None:
    """A killed image import leaves its staging directory in tmp/; gc knows its owner is dead."""
    source = ls.Store(tmp_path / "source")
    data = tf.simple_tar({"image/big": tf.rand_bytes("image", 2 * MiB)})
    layer = source.import_tar(data)
    layout = tmp_path / "layout"
    source.export_oci(source.stack([layer]), layout, tag="v1")

    res = run_python(
        OCI_CHILD, store.path, str(layout), env={"LAYERSTORE_CRASH_AT": "before-commit"}
    )
    assert res.returncode == -signal.SIGABRT, (res.returncode, res.stdout, res.stderr)
    left = os.listdir(Path(store.path) / "tmp")
    assert len(left) == 1 and left[0].startswith("oci-"), left
    check_recovered(store, {})  # gc empties tmp/
    assert list(store.import_oci(layout)) == ["v1"]


def test_crash_env_var_is_inert_for_other_values(store: ls.Store, tmp_path: Path) -> None:
    src = tmp_path / "t.tar"
    src.write_bytes(tf.simple_tar({"f": tf.rand_bytes("inert", 100_000)}))
    res = run_python(IMPORT_CHILD, store.path, str(src), env={"LAYERSTORE_CRASH_AT": "nowhere"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == store.layers()[0].id


class RandomStream:
    """A file-like object of seeded random bytes (for big tars without big memory)."""

    def __init__(self, seed: str, size: int) -> None:
        import random

        self.rng = random.Random(seed)
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return self.rng.randbytes(n)


def write_big_tar(path: Path, size: int) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        t.addfile(tf.file_("small/first", b"first\n").tarinfo(), io.BytesIO(b"first\n"))
        ti = tarfile.TarInfo("big/random.bin")
        ti.size = size
        t.addfile(ti, RandomStream("sigkill", size))  # type: ignore[arg-type]


SLOW_IMPORT_CHILD = """
import sys, time
import layerstore as ls
store = ls.Store(sys.argv[1])
def progress(n):
    print("progress", n, flush=True)
    if n:
        time.sleep(0.5)  # a slow consumer: the kill lands mid-import, not after it
layer = store.import_tar(sys.argv[2], progress=progress)
print("done", layer.id, flush=True)
"""


@pytest.mark.slow
def test_sigkill_mid_import(prior: tuple[ls.Store, str, bytes], tmp_path: Path) -> None:
    store, prior_id, prior_tar = prior
    src = tmp_path / "big.tar"
    write_big_tar(src, 200 * MiB)
    seen: list[str] = []
    with python_child(SLOW_IMPORT_CHILD, store.path, str(src)) as proc:
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                seen.append(line)
                words = line.split()
                if words[0] == "progress" and int(words[1]) >= 16 * MiB:
                    break
            else:
                pytest.fail(f"child ended before the kill: {seen}")
            time.sleep(0.1)
            proc.send_signal(signal.SIGKILL)
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert rc == -signal.SIGKILL
    assert not any(line.startswith("done") for line in seen)

    assert store.fsck()["ok"]
    assert store.fsck()["garbage"], "the killed import should have left a partial pack"
    check_recovered(store, {prior_id: prior_tar})

    layer = store.import_tar(src)
    assert layer.size == src.stat().st_size
    with open(src, "rb") as f:
        expected_diff = tf.sha256(f.read())
    assert layer.diff_id == expected_diff
    check_recovered(store, {prior_id: prior_tar, layer.id: src.read_bytes()})


# ------------------------------------------------------------------------------------------
# Several processes at once
# ------------------------------------------------------------------------------------------

IMPORTER = """
import json, sys
import layerstore as ls
store = ls.Store(sys.argv[1])
spec = json.loads(sys.argv[2])
ids = []
for path in spec["imports"]:
    ids.append(store.import_tar(path).id)
    for scratch in spec.get("scratch", []):
        # make some chunks garbage while others import: gc may sweep them any time now
        store.delete(store.import_tar(scratch))
print(json.dumps(ids), flush=True)
"""

GC_LOOP = """
import json, os, sys, traceback
import layerstore as ls
store = ls.Store(sys.argv[1])
runs, deferred, errors = 0, 0, []
while not os.path.exists(sys.argv[2]):
    try:
        report = store.gc()
        runs += 1
        deferred += bool(report["deferred"])
    except Exception:
        errors.append(traceback.format_exc(limit=1))
        if len(errors) > 20:
            break
print(json.dumps({"runs": runs, "deferred": deferred, "errors": errors}), flush=True)
"""


def test_two_importers_and_gc(store: ls.Store, tmp_path: Path) -> None:
    """Two processes import overlapping layers (one also imports and deletes a scratch layer,
    making shared chunks garbage again and again) while a third runs gc in a loop."""
    # a layer whose pack ends up mostly garbage once it is deleted (see the end of the test)
    keep = tf.rand_bytes("keep", 20_000)
    base_tar = tf.simple_tar({"keep": keep, "drop": tf.rand_bytes("drop", 3 * MiB // 2)})
    kept_tar = tf.simple_tar({"kept/keep": keep})
    base = store.import_tar(base_tar)
    kept = store.import_tar(kept_tar)

    s1 = tf.rand_bytes("s1", 3 * MiB)
    s2 = tf.rand_bytes("s2", 2 * MiB)
    s3 = tf.text_bytes("s3", MiB)
    tars: dict[str, bytes] = {}

    def put(name: str, files: dict[str, bytes], fmt: int = tarfile.PAX_FORMAT) -> str:
        path = tmp_path / f"{name}.tar"
        data = tf.simple_tar(files, fmt)
        path.write_bytes(data)
        tars[str(path)] = data
        return str(path)

    a = [
        put(f"a{i}", {"s1": s1, "s2": s2, f"a{i}": tf.rand_bytes(f"a{i}", 700_000), "s3": s3})
        for i in range(6)
    ]
    b = [
        put(
            f"b{i}",
            {"x/s1": s1, f"b{i}": tf.rand_bytes(f"b{i}", 500_000), "y/s3": s3},
            tarfile.GNU_FORMAT,
        )
        for i in range(6)
    ]
    scratch = [put("scratch", {"s2": s2, "scratch": tf.rand_bytes("scratch", 300_000)})]

    stop = tmp_path / "stop-gc"
    env = {k: v for k, v in os.environ.items() if k != "LAYERSTORE_CRASH_AT"}
    gc_proc = subprocess.Popen(
        [sys.executable, "-c", GC_LOOP, store.path, str(stop)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    importers = [
        subprocess.Popen(
            [sys.executable, "-c", IMPORTER, store.path, json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for spec in ({"imports": a}, {"imports": b, "scratch": scratch})
    ]
    outs = []
    try:
        for p in importers:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
            outs.append(json.loads(out))
    finally:
        stop.touch()
        gc_out, _ = gc_proc.communicate(timeout=120)
        for p in importers:
            if p.poll() is None:
                p.kill()
    gc_report = json.loads(gc_out)

    ids = dict(zip(a + b, outs[0] + outs[1], strict=True))
    assert {x.id for x in store.layers()} == {*ids.values(), base.id, kept.id}
    for path, layer_id in ids.items():
        assert export_bytes(store, layer_id) == tars[path], path
    fsck = store.fsck()
    assert fsck["ok"], fsck["problems"]

    ids["kept"] = kept.id
    tars["kept"] = kept_tar
    store.delete(base)
    store.gc()  # compacts base's pack: only "keep" is live in it
    fsck = store.fsck()
    assert fsck["ok"], fsck["problems"]
    assert fsck["garbage"] == []
    assert pack_files(store) == db_packs(store)
    for path, layer_id in ids.items():
        assert export_bytes(store, layer_id) == tars[path], path

    assert gc_report["runs"] > 0
    assert gc_report["errors"] == [], gc_report["errors"][0]


def test_concurrent_imports_of_the_same_tar(store: ls.Store, tmp_path: Path) -> None:
    """Several processes importing one tar at once all succeed, and make one layer."""
    data = tf.simple_tar(
        {"same": tf.rand_bytes("same", 4 * MiB), "t": tf.text_bytes("same-t", 300_000)}
    )
    src = tmp_path / "same.tar"
    src.write_bytes(data)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", IMPORT_CHILD, store.path, str(src)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    ids = set()
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        ids.add(out.strip())
    assert len(ids) == 1
    (layer_id,) = ids
    check_recovered(store, {layer_id: data})


CTRL_C_CHILD = """
import os, signal, sys, threading, time
import layerstore as ls

store = ls.Store(sys.argv[1])

class Slow:
    # a source that takes a while: the import is still running when Ctrl-C comes
    def __init__(self, path):
        self.f = open(path, "rb")
    def read(self, n=-1):
        time.sleep(0.002)
        return self.f.read(min(n, 256 * 1024))

threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
try:
    store.import_tar(Slow(sys.argv[2]))
except KeyboardInterrupt:
    print("interrupted", len(store.layers()), flush=True)
else:
    print("finished", flush=True)
"""


def test_ctrl_c_interrupts_a_long_import(
    prior: tuple[ls.Store, str, bytes], tmp_path: Path
) -> None:
    store, prior_id, prior_tar = prior
    src = tmp_path / "big.tar"
    write_big_tar(src, 96 * MiB)
    res = run_python(CTRL_C_CHILD, store.path, str(src))
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["interrupted", "1"]
    check_recovered(store, {prior_id: prior_tar})


COMMIT_CHILD = """
import sys
import layerstore as ls
store = ls.Store(sys.argv[1])
image = store.stack([store.layer(sys.argv[2])])
with image.container() as c:
    c.mkdir("/new")
    c.write_bytes("/new/big", bytes(range(256)) * (12 * 1024))
    c.write_bytes("/prior/small", b"changed\\n")
    layer = c.commit(created_by="RUN crash")
print(layer.id, flush=True)
"""


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_crash_during_a_container_commit(prior: tuple[ls.Store, str, bytes], point: str) -> None:
    """A commit is an import of its own: the same crash points, the same guarantees."""
    store, prior_id, prior_tar = prior
    res = run_python(COMMIT_CHILD, store.path, prior_id, env={"LAYERSTORE_CRASH_AT": point})
    assert res.returncode == -signal.SIGABRT, (res.returncode, res.stdout, res.stderr)
    assert res.stdout == ""
    committed = point == "after-commit"
    assert (store.fsck()["garbage"] == []) == committed
    layers = {x.id for x in store.layers()}
    assert len(layers) == (2 if committed else 1) and prior_id in layers
    expected = {prior_id: prior_tar}
    for layer_id in layers - {prior_id}:
        expected[layer_id] = export_bytes(store, layer_id)
    check_recovered(store, expected)
    again = run_python(COMMIT_CHILD, store.path, prior_id)
    assert again.returncode == 0, again.stderr
    new = store.stack([prior_id, again.stdout.strip()])
    assert new.read_bytes("/prior/small") == b"changed\n"
    assert new.stat("/new/big").size == 256 * 12 * 1024


STUCK_EXPORT_CHILD = """
import sys, time
import layerstore as ls
store = ls.Store(sys.argv[1])
def progress(n):
    if n:
        print("writing", flush=True)
        time.sleep(600)  # stuck mid-export until killed
store.export_tar(sys.argv[2], sys.argv[3], progress=progress)
print("done", flush=True)
"""


def test_sigkill_mid_export_leaves_no_dest_and_the_next_export_cleans_up(
    prior: tuple[ls.Store, str, bytes], tmp_path: Path
) -> None:
    """A killed export leaves only its hidden temporary file beside `dest`, never `dest`; the
    next export to that `dest` removes it (its owner is gone) and keeps a live writer's."""
    store, layer_id, tar = prior
    out = tmp_path / "exports"
    out.mkdir()
    dest = out / "out.tar"
    me = os.getpid()
    live = out / f".out.tar.layerstore-tmp-{me}-{start_time(me)}-abc"
    live.write_bytes(b"another writer, still running")
    with python_child(STUCK_EXPORT_CHILD, store.path, layer_id, str(dest)) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "writing\n"
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
    left = sorted(p.name for p in out.iterdir() if p != live)
    assert not dest.exists()
    assert len(left) == 1 and left[0].startswith(".out.tar.layerstore-tmp-"), left

    store.export_tar(layer_id, dest)
    assert dest.read_bytes() == tar
    assert sorted(p.name for p in out.iterdir()) == sorted(["out.tar", live.name])
