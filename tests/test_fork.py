"""A program that used the library and then forks can use it again in the children (issue 14,
section 2): the read-ahead workers, the shared rayon pool and the database connections are
rebuilt in a child instead of being waited on forever.
"""

from __future__ import annotations

import hashlib
import multiprocessing
from pathlib import Path

import layerstore as ls
import pytest
import tarfixtures as tf

# Big enough that reads and exports go through the read-ahead pool and gzip through the pool.
PARENT_TAR = tf.simple_tar({f"dir/f{i}": tf.text_bytes(f"parent-{i}", 300_000) for i in range(8)})

# A store the parent opened and used before forking (inherited by forked children).
INHERITED: ls.Store | None = None


def child_work(args: tuple[str, int, bool]) -> tuple[str, str, bytes]:
    """Import, read and export in a child; returns (diff_id, exported digest, a file's bytes)."""
    root, n, inherited = args
    store = INHERITED if inherited and INHERITED is not None else ls.Store(root)
    data = tf.simple_tar({f"child{n}/file": tf.text_bytes(f"child-{n}", 700_000)})
    layer = store.import_tar(data)
    parent = store.layer(hashlib_diff_id(PARENT_TAR))
    image = store.stack([parent, layer])
    content = image.read_bytes(f"/child{n}/file") + image.read_bytes("/dir/f3")
    out = Path(root).parent / f"child-{n}-{inherited}.tar.gz"
    digest = store.export_tar(parent, out, compression="gzip")
    return layer.diff_id, digest, content


def hashlib_diff_id(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_children_of_a_process_that_used_the_library_import_read_and_export(
    tmp_path: Path, method: str
) -> None:
    global INHERITED
    root = tmp_path / "store"
    store = ls.Store(root)
    INHERITED = store
    parent = store.import_tar(PARENT_TAR)
    # Use every pool in the parent first: reads, a gzip export (parallel deflate), a stack.
    expected_gz = store.export_tar(parent, tmp_path / "parent.tar.gz", compression="gzip")
    assert store.stack([parent]).read_bytes("/dir/f3") == tf.text_bytes("parent-3", 300_000)
    jobs = [(str(root), n, inherited) for n in range(4) for inherited in (False, True)]
    if method != "fork":
        jobs = [(r, n, False) for r, n, _ in jobs]  # only a forked child inherits objects
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(2) as pool:
        results = pool.map_async(child_work, jobs).get(timeout=60)
    for (_, n, _), (diff_id, digest, content) in zip(jobs, results, strict=True):
        assert diff_id == hashlib_diff_id(
            tf.simple_tar({f"child{n}/file": tf.text_bytes(f"child-{n}", 700_000)})
        )
        assert digest == expected_gz
        assert content == tf.text_bytes(f"child-{n}", 700_000) + tf.text_bytes("parent-3", 300_000)
    # The parent still works, and sees what the children stored.
    assert len(store.layers()) == 5
    assert store.fsck()["ok"]
    assert store.export_tar(parent, tmp_path / "again.tar.gz", compression="gzip") == expected_gz
