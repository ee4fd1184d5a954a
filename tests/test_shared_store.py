"""Several processes sharing one store (issue 14, section 6): creating the same new store at the
same moment is race-free; a store that cannot be written (a shared, read-only cache) serves every
read and refuses writes clearly."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import layerstore as ls
import pytest
import tarfixtures as tf

CREATOR = """
import os, sys
import layerstore as ls
while not os.path.exists(sys.argv[2]):
    pass
store = ls.Store(sys.argv[1])
layer = store.import_tar(bytes.fromhex(sys.argv[3]))
print(layer.diff_id, flush=True)
"""


def test_processes_creating_the_same_new_store_at_once_all_succeed(tmp_path: Path) -> None:
    for round_ in range(6):
        root = tmp_path / f"store-{round_}"
        go = tmp_path / f"go-{round_}"
        tars = [tf.simple_tar({f"p{i}": tf.text_bytes(f"{round_}-{i}", 5000)}) for i in range(10)]
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", CREATOR, str(root), str(go), data.hex()],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for data in tars
        ]
        time.sleep(0.5)  # every child is waiting for the signal
        go.touch()
        outs = [p.communicate(timeout=120) for p in procs]
        for p, (out, err), data in zip(procs, outs, tars, strict=True):
            assert p.returncode == 0, err
            assert out.strip() == tf.sha256(data)
        store = ls.Store(root)
        assert len(store.layers()) == 10
        assert store.fsck()["ok"]


@pytest.fixture
def readonly_view(tmp_path: Path) -> Iterator[tuple[ls.Store, Path, bytes, ls.Layer]]:
    """A store with an image, and a read-only bind mount of it (a shared, read-only cache)."""
    data = tf.simple_tar({f"f{i}": tf.text_bytes(f"ro-{i}", 200_000) for i in range(5)})
    store = ls.Store(tmp_path / "store")
    layer = store.import_tar(data)
    store.tag(store.stack([layer]), "app:1")
    view = tmp_path / "ro"
    view.mkdir()
    subprocess.run(["mount", "--bind", str(tmp_path / "store"), str(view)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        yield store, view, data, layer
    finally:
        # Lazily: the store objects of the test may still hold files open.
        subprocess.run(["umount", "--lazy", str(view)], check=True)


@pytest.mark.root
@pytest.mark.parametrize("asked", [False, True], ids=["detected", "asked"])
def test_a_store_on_a_read_only_file_system_serves_every_read_and_refuses_writes(
    readonly_view: tuple[ls.Store, Path, bytes, ls.Layer], tmp_path: Path, asked: bool
) -> None:
    writer, view, data, layer = readonly_view
    before = sorted(p.name for p in view.iterdir())
    ro = ls.Store(view, readonly=True) if asked else ls.Store(view)
    assert ro.readonly
    assert [x.id for x in ro.layers()] == [layer.id]
    image = ro.get("app:1")
    assert image.read_bytes("/f3") == tf.text_bytes("ro-3", 200_000)
    assert ro.export_tar(layer, tmp_path / "out.tar") == layer.diff_id
    assert (tmp_path / "out.tar").read_bytes() == data
    ro.materialize(image, tmp_path / "tree")
    assert (tmp_path / "tree" / "f1").read_bytes() == tf.text_bytes("ro-1", 200_000)
    report = ro.fsck()
    assert report["ok"], report
    for write in (
        lambda: ro.import_tar(tf.simple_tar({"new": b"x"})),
        lambda: ro.delete(layer),
        lambda: ro.tag(image, "other:1"),
        lambda: ro.gc(),
        lambda: ro.fsck(repair=True),
        lambda: ro.squash(image),
    ):
        with pytest.raises(PermissionError, match="read-only"):
            write()
    assert sorted(p.name for p in view.iterdir()) == before
    # The writer's store is untouched and still writable.
    assert not writer.readonly
    writer.import_tar(tf.simple_tar({"later": b"y"}))


def test_a_writable_store_asked_read_only_refuses_writes(store: ls.Store, tmp_path: Path) -> None:
    layer = store.import_tar(tf.simple_tar({"a": b"a"}))
    ro = ls.Store(store.path, readonly=True)
    assert ro.readonly and not store.readonly
    assert ro.stack([layer]).read_bytes("/a") == b"a"
    with pytest.raises(PermissionError, match="read-only"):
        ro.import_tar(tf.simple_tar({"b": b"b"}))
    with pytest.raises(ls.NotFoundError):
        ls.Store(tmp_path / "nothing-here", readonly=True)
    assert not (tmp_path / "nothing-here").exists()
