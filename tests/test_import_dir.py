"""import_dir: a directory tree as one layer, through a canonical deterministic tar.

Oracles: ``os.lstat``/``os.listxattr`` for the metadata, ``b3sum`` for contents, ``tarfile`` and
GNU tar for the tar that export writes (GNU tar extracts it back into a tree that imports to the
same diff_id).
"""

from __future__ import annotations

import io
import os
import socket
import stat
import subprocess
import tarfile
from pathlib import Path

import layerstore as ls
import pytest
import tarfixtures as tf
from storeutil import assert_unchanged, b3sum, export_bytes, snapshot

KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFIFO: "fifo",
}


def make_dir_tree(root: Path) -> Path:
    """make_tree plus a second hardlink to a big file and a non-UTF-8 name, mtimes fixed."""
    tf.make_tree(root, seed=7)
    os.link(root / "usr/lib/big.bin", root / "usr/lib/big-link.bin")
    latin = root / "srv" / os.fsdecode(b"caf\xe9-\xff")
    latin.write_bytes(b"latin-1 name\n")
    for i, p in enumerate((latin, root / "srv", root / "usr/lib")):
        t = tf.EPOCH_NS + 10**9 * (100 + i) + 123
        os.utime(p, ns=(t, t))
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_dir_tree(tmp_path / "tree")


def walk_tree(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            out.append(Path(dirpath) / name)
    return out


def test_entries_describe_the_tree(store: ls.Store, tree: Path) -> None:
    layer = store.import_dir(tree)
    entries = {e.path: e for e in layer.entries()}
    paths = walk_tree(tree)
    assert len(entries) == len(paths) == layer.entry_count, "the root is not an entry"
    first_of_inode: dict[tuple[int, int], str] = {}
    for p in sorted(paths, key=lambda p: os.fsencode(p.relative_to(tree))):
        key = "/" + os.fsdecode(os.fsencode(p.relative_to(tree)))
        e = entries[key]
        st = os.lstat(p)
        assert e.mode == stat.S_IMODE(st.st_mode), key
        assert (e.uid, e.gid) == (st.st_uid, st.st_gid), key
        assert e.mtime_ns == st.st_mtime_ns, key
        if not stat.S_ISLNK(st.st_mode):
            names = os.listxattr(p, follow_symlinks=False)
            assert e.xattrs == {n: os.getxattr(p, n, follow_symlinks=False) for n in names}, key
        kind = KINDS[stat.S_IFMT(st.st_mode)]
        inode = (st.st_dev, st.st_ino)
        if kind == "file" and st.st_nlink > 1 and inode in first_of_inode:
            assert (e.kind, e.linkname, e.size) == ("hardlink", first_of_inode[inode], 0), key
            continue
        first_of_inode.setdefault(inode, key)
        assert e.kind == kind, key
        if kind == "file":
            assert e.size == st.st_size, key
            data = p.read_bytes()
            if data:
                assert e.digest == b3sum(data), key
        elif kind == "symlink":
            assert e.linkname == os.readlink(p), key
        elif kind in ("char", "block"):
            assert (e.devmajor, e.devminor) == (os.major(st.st_rdev), os.minor(st.st_rdev)), key
            assert e.rdev == st.st_rdev


def test_same_tree_same_layer(store: ls.Store, tree: Path, tmp_path: Path) -> None:
    a = store.import_dir(tree)
    b = store.import_dir(str(tree))
    assert a.id == b.id and a.diff_id == b.diff_id
    # an identical tree elsewhere (other inodes, other readdir order, other atimes/ctimes)
    c = store.import_dir(make_dir_tree(tmp_path / "elsewhere" / "copy"))
    assert c.diff_id == a.diff_id
    assert len(store.layers()) == 1


def test_canonical_tar_shape(store: ls.Store, tree: Path) -> None:
    layer = store.import_dir(tree)
    data = export_bytes(store, layer)
    assert layer.diff_id == tf.sha256(data)
    assert len(data) % tf.RECORD == 0
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        names = [os.fsencode(m.name) for m in t.getmembers()]
        assert all(m.uname == "" and m.gname == "" for m in t.getmembers())
    # parents first, siblings sorted by name bytes
    parts = [n.split(b"/") for n in names]
    assert parts == sorted(parts)
    assert_entries = [tf.entry_fields(e) for e in layer.entries()]
    assert assert_entries == tf.expected_entries(data)
    # GNU tar reads it without complaint
    res = subprocess.run(["tar", "-tvf", "-"], input=data, capture_output=True, check=False)
    assert res.returncode == 0, res.stderr


@pytest.mark.root
def test_extract_with_gnu_tar_and_reimport(store: ls.Store, tree: Path, tmp_path: Path) -> None:
    """Filesystem round trip: export, extract with GNU tar, import_dir again: same diff_id."""
    layer = store.import_dir(tree)
    data = export_bytes(store, layer)
    dest = tmp_path / "extracted"
    dest.mkdir()
    res = subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf", "-", "-C", str(dest)],
        input=data,
        capture_output=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    again = store.import_dir(dest)
    assert again.diff_id == layer.diff_id


def test_exclude_xattrs(store: ls.Store, tree: Path) -> None:
    full = store.import_dir(tree)
    slim = store.import_dir(tree, exclude_xattrs=["user.comment", "user.binary"])
    assert slim.diff_id != full.diff_id
    for e in slim.entries():
        assert "user.comment" not in e.xattrs and "user.binary" not in e.xattrs
    kept = {k for e in slim.entries() for k in e.xattrs}
    assert "user.empty" in kept


def test_import_dir_dedups_with_tar_import(store: ls.Store, tree: Path) -> None:
    store.import_tar(tf.gnu_tar(tree, "posix"))
    before = store.stats()
    layer = store.import_dir(tree)
    after = store.stats()
    assert after["content_bytes"] == before["content_bytes"]
    assert after["chunks"] == before["chunks"]
    big = next(e for e in layer.entries() if e.kind == "file" and e.size == 300_000)
    assert big.digest == b3sum((tree / "usr/lib/big.bin").read_bytes())


def test_socket_is_skipped_with_warning(store: ls.Store, tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    (root / "f").write_bytes(b"x")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(root / "sock"))
        with pytest.warns(ls.LayerstoreWarning, match="sock"):
            layer = store.import_dir(root)
    finally:
        sock.close()
    assert [e.path for e in layer.entries()] == ["/f"]


def test_empty_directory(store: ls.Store, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    layer = store.import_dir(tmp_path / "empty")
    assert layer.entry_count == 0
    data = export_bytes(store, layer)
    assert data == bytes(tf.RECORD)


def test_import_dir_errors_leave_store_unchanged(
    store: ls.Store, tree: Path, tmp_path: Path
) -> None:
    store.import_tar(tf.simple_tar({"seed": tf.rand_bytes("dir-seed", 300_000)}))
    before = snapshot(store)
    with pytest.raises(FileNotFoundError):
        store.import_dir(tmp_path / "missing")
    (tmp_path / "plain").write_bytes(b"x")
    with pytest.raises((ls.InvalidLayerError, NotADirectoryError)):
        store.import_dir(tmp_path / "plain")
    with pytest.raises(ls.InvalidLayerError, match="entry"):
        store.import_dir(tree, limits=ls.Limits(max_entries=5))
    with pytest.raises(ls.IntegrityError):
        store.import_dir(tree, expected_diff_id="sha256:" + "0" * 64)
    assert_unchanged(store, before)


def test_symlinks_are_archived_not_followed(store: ls.Store, tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    (root / "ok").write_bytes(b"fine")
    (root / "loop").symlink_to("loop")
    (root / "outside").symlink_to("/etc")
    (root / "dangling").symlink_to("missing/target")
    layer = store.import_dir(root)
    got = {e.path: (e.kind, e.linkname) for e in layer.entries()}
    assert got == {
        "/dangling": ("symlink", "missing/target"),
        "/loop": ("symlink", "loop"),
        "/ok": ("file", None),
        "/outside": ("symlink", "/etc"),
    }


def test_thread_count_does_not_change_the_layer(tree: Path, tmp_path: Path) -> None:
    """The parallel walk's output is the same tar whatever the number of threads."""
    ids = set()
    for threads in (1, 2, 5):
        s = ls.Store(tmp_path / f"store-{threads}")
        ids.add(s.import_dir(tree, max_threads=threads).diff_id)
    assert len(ids) == 1
