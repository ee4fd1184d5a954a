"""Squash and stack-to-stack diff, as properties over the random stacks of the union tests.

- squash: view(layers[:start] + squash(start, stop)) == view(layers[:stop]) for every range,
  a squash from the bottom has no whiteout or opaque marker, and squashing again gives the same
  diff_id;
- diff: view(a + diff(a, b)) == view(b) for two random stacks;
- the stored layers are ordinary: exporting and re-importing gives the same identity.

Views are compared without the providing layer's index (it is what a squash changes) and
without the implicit flag (a squash may declare a directory a lower layer left implicit).
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import layerstore as ls
import pytest
import tarfixtures as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from test_union_props import PROPS, Op, import_all, layer_ops, model_stack, stack_view


def plain(stack: ls.Stack) -> dict[str, Any]:
    return {p: d[:6] + d[8:] for p, d in stack_view(stack).items()}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ls.Store]:
    yield ls.Store(tmp_path_factory.mktemp("squash-props") / "store")


@settings(PROPS, max_examples=150)
@given(raw_layers=st.lists(layer_ops, min_size=1, max_size=5), data=st.data())
def test_squash_keeps_the_view(shared: ls.Store, raw_layers: list[list[Op]], data: Any) -> None:
    specs, _ = model_stack(raw_layers)
    layers = import_all(shared, specs)
    image = shared.stack(layers)
    stop = data.draw(st.integers(0, len(layers)))
    start = data.draw(st.integers(0, stop))
    flat = shared.squash(image, start, stop)
    rebuilt = shared.stack([*layers[:start], flat])
    assert plain(rebuilt) == plain(shared.stack(layers[:stop]))
    if start == 0:
        kinds = {e.kind for e in flat.entries()}
        assert not kinds & {"whiteout", "opaque"}, kinds
    assert shared.squash(image, start, stop).diff_id == flat.diff_id
    whole = image.squash(start, stop)
    assert len(whole) == len(layers) - (stop - start) + 1
    assert plain(whole) == plain(image)


@settings(PROPS, max_examples=150)
@given(
    a_layers=st.lists(layer_ops, min_size=1, max_size=3),
    b_layers=st.lists(layer_ops, min_size=1, max_size=3),
)
def test_diff_takes_a_to_b(
    shared: ls.Store, a_layers: list[list[Op]], b_layers: list[list[Op]]
) -> None:
    a = shared.stack(import_all(shared, model_stack(a_layers)[0]))
    b = shared.stack(import_all(shared, model_stack(b_layers)[0]))
    changes = shared.diff(a, b)
    assert plain(a.push(changes)) == plain(b)
    listed = shared.changes(a, b)
    assert len(listed) == len(changes.entries())
    assert shared.changes(b, b) == []


def test_squashed_layer_reimports_identically(shared: ls.Store, tmp_path: Path) -> None:
    specs, _ = model_stack([[("file", "a", 1), ("dir", "b", 2)], [("whiteout", "a", 3)]])
    image = shared.stack(import_all(shared, specs))
    dest = tmp_path / "flat.tar"
    flat = shared.squash(image, dest=dest)
    again = ls.Store(tmp_path / "other").import_tar(dest)
    assert (again.id, again.diff_id, again.tree_id) == (flat.id, flat.diff_id, flat.tree_id)
    assert os.path.getsize(dest) == flat.size
    # A canonical tar: whole 10 KiB records, and what Python's tarfile reads back.
    assert flat.size % 10240 == 0
    with tarfile.open(dest) as t:
        assert sorted(m.name for m in t.getmembers()) == ["b"]
    with pytest.raises(ValueError, match="range"):
        shared.squash(image, 2, 1)
    assert not dest.with_name("other.tar").exists()


def test_directory_sides(store: ls.Store, tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    for d in (old, new):
        (d / "etc").mkdir(parents=True)
        (d / "etc/keep").write_bytes(b"same")
        os.utime(d / "etc/keep", ns=(10**18, 10**18))
    (old / "etc/gone").write_bytes(b"x")
    (new / "etc/added").write_bytes(b"y")
    os.utime(old / "etc", ns=(10**18, 10**18))
    os.utime(new / "etc", ns=(10**18, 10**18))
    layers_before = len(store.layers())
    changes = store.changes(old, new)
    assert changes == [("whiteout", "/etc/gone"), ("entry", "/etc/added")]  # archive order
    layer = store.diff(old, new)
    assert len(store.layers()) == layers_before + 1  # only the changeset stays
    base = store.stack([store.import_dir(old)])
    assert base.push(layer).listdir("/etc") == ["added", "keep"]


def view_without_layers(stack: ls.Stack) -> dict[str, Any]:
    out = {}
    for dirpath, dirnames, filenames in stack.walk():
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = stack.stat(p, follow_symlinks=False)
            extra = stack.read_bytes(p) if st.kind == "file" else st.linkname
            out[p] = (st.kind, st.mode, st.uid, st.gid, st.mtime_ns, dict(st.xattrs), extra)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_image_to_directory_diff_gives_the_directory(
    store: ls.Store, tmp_path: Path, seed: int
) -> None:
    import random
    import shutil

    rng = random.Random(seed)
    names = ("a", "b", "c")
    root = tmp_path / "tree"

    def rand_path() -> Path:
        return root.joinpath(*(rng.choice(names) for _ in range(rng.randint(1, 3))))

    def populate(n: int) -> None:
        for _ in range(n):
            p = rand_path()
            try:
                p.parent.mkdir(parents=True, exist_ok=True)
                choice = rng.random()
                if p.is_dir() and not p.is_symlink():
                    if choice < 0.3:
                        shutil.rmtree(p)
                    else:
                        os.chmod(p, 0o700)
                elif p.exists() or p.is_symlink():
                    if choice < 0.3:
                        p.unlink()
                    elif choice < 0.6:
                        p.write_bytes(rng.randbytes(rng.choice([0, 10, 100_000])))
                    elif choice < 0.8 and not p.is_symlink():
                        os.link(p, p.parent / (p.name + "-link"))
                    else:
                        os.utime(p, ns=(5, 5), follow_symlinks=False)
                elif choice < 0.15:
                    p.symlink_to(rng.choice(names))
                else:
                    p.write_bytes(rng.randbytes(rng.choice([1, 5000, 300_000])))
            except OSError:
                pass

    root.mkdir()
    populate(25)
    image = store.stack([store.import_dir(root)])
    populate(15)
    listed = store.changes(image, root)
    layer = store.diff(image, root)
    assert len(listed) == len(layer.entries())
    want = view_without_layers(store.stack([store.import_dir(root)]))
    assert view_without_layers(image.push(layer)) == want
    assert store.changes(image.push(layer), root) == []


def test_compare_content_sees_a_same_size_same_mtime_change(
    store: ls.Store, tmp_path: Path
) -> None:
    root = tmp_path / "t"
    root.mkdir()
    f = root / "f"
    f.write_bytes(b"aaaa")
    os.utime(f, ns=(10**18, 10**18))
    image = store.stack([store.import_dir(root)])
    f.write_bytes(b"bbbb")
    os.utime(f, ns=(10**18, 10**18))
    assert store.changes(image, root) == []  # the stat fast path trusts size and mtime
    assert store.changes(image, root, compare_content=True) == [("entry", "/f")]
    layer = store.diff(image, root, compare_content=True)
    assert image.push(layer).read_bytes("/f") == b"bbbb"


def test_a_changed_hardlink_brings_its_whole_group(store: ls.Store, tmp_path: Path) -> None:
    root = tmp_path / "t"
    (root / "d").mkdir(parents=True)
    (root / "d/one").write_bytes(b"1")
    os.link(root / "d/one", root / "two")
    image = store.stack([store.import_dir(root)])
    os.chmod(root / "two", 0o600)  # one inode: both paths change
    assert store.changes(image, root) == [("entry", "/d/one"), ("link", "/two")]
    pushed = image.push(store.diff(image, root))
    assert pushed.stat("/two").mode == pushed.stat("/d/one").mode == 0o600
    assert pushed.stat("/two").hardlink == "/d/one"


def test_a_hardlinked_symlink_keeps_its_link_group_through_squash(
    store: ls.Store, tmp_path: Path
) -> None:
    """A hard link to a symlink (GNU tar archives ``cp -al`` trees so) and, from tarfile, to a
    fifo: the squashed tar links them as GNU tar does, and extracting it (GNU tar, materialize)
    gives one inode per group, as extracting the original does. (Before, the squash wrote two
    independent symlinks.)"""
    import subprocess

    root = tmp_path / "tree"
    (root / "d").mkdir(parents=True)
    os.symlink("target", root / "d/link")
    os.link(root / "d/link", root / "d/link2", follow_symlinks=False)
    fifos = [
        tf.Member("fifo", tarfile.FIFOTYPE, mode=0o600),
        tf.Member("fifo2", tarfile.LNKTYPE, linkname="fifo"),
    ]
    image = store.stack(
        [
            store.import_tar(tf.py_tar(tarfile.PAX_FORMAT, members=[tf.file_("base", b"b")])),
            store.import_tar(tf.gnu_tar(root, "gnu")),
            store.import_tar(tf.py_tar(tarfile.PAX_FORMAT, members=fifos)),
        ]
    )
    flat = store.squash(image)
    out = tmp_path / "flat.tar"
    store.export_tar(flat, out)
    with tarfile.open(out) as t:
        kinds = {m.name: (m.type, m.linkname) for m in t.getmembers()}
    assert kinds["d/link"] == (tarfile.SYMTYPE, "target")
    assert kinds["d/link2"] == (tarfile.LNKTYPE, "d/link")
    assert kinds["fifo"][0] == tarfile.FIFOTYPE
    assert kinds["fifo2"] == (tarfile.LNKTYPE, "fifo")
    untarred = tmp_path / "untarred"
    untarred.mkdir()
    subprocess.run(["tar", "-C", str(untarred), "-xf", str(out)], check=True)
    materialized = tmp_path / "materialized"
    store.materialize(store.stack([flat]), materialized)
    for dest in (untarred, materialized):
        for a, b in (("d/link", "d/link2"), ("fifo", "fifo2")):
            sa, sb = os.lstat(dest / a), os.lstat(dest / b)
            assert (sa.st_ino, sa.st_nlink) == (sb.st_ino, 2), (dest.name, a, b)
        assert os.readlink(dest / "d/link2") == "target"
    assert store.stack([flat]).stat("/d/link2", follow_symlinks=False).hardlink == "/d/link"


def test_a_changed_root_directory_is_squashed_as_dot_slash(store: ls.Store) -> None:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        root = tarfile.TarInfo("./")
        root.type, root.mode, root.mtime = tarfile.DIRTYPE, 0o700, 12345
        t.addfile(root)
        f = tarfile.TarInfo("f")
        f.size = 2
        t.addfile(f, io.BytesIO(b"hi"))
    image = store.stack([store.import_tar(buf.getvalue())])
    flat = store.squash(image)  # warnings are errors here: no "leading '/' removed"
    assert [e.path for e in flat.entries()] == ["/", "/f"]
    assert store.stack([flat]).stat("/").mode == 0o700


def test_source_date_epoch_clamps_mtimes(store: ls.Store, tmp_path: Path) -> None:
    root = tmp_path / "t"
    (root / "d").mkdir(parents=True)
    (root / "d/new").write_bytes(b"n")
    (root / "old").write_bytes(b"o")
    os.utime(root / "old", ns=(10**9, 10**9))
    image = store.stack([store.import_dir(tmp_path / "t")])
    epoch = 1_000_000
    clamped = store.squash(image, source_date_epoch=epoch)
    times = {e.path: e.mtime_ns for e in clamped.entries()}
    assert times["/old"] == 10**9  # older than the epoch: kept
    assert times["/d/new"] == times["/d"] == epoch * 10**9
    (root / "d/more").write_bytes(b"m")
    from_dir = store.diff(image, root, source_date_epoch=epoch)
    assert {e.mtime_ns for e in from_dir.entries()} == {epoch * 10**9}
    assert store.squash(image, source_date_epoch=epoch).diff_id == clamped.diff_id
    assert image.squash(source_date_epoch=epoch).layers[0].diff_id == clamped.diff_id


def test_a_squash_range_beyond_the_stack_counts_its_layers_in_words(store: ls.Store) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        f = tarfile.TarInfo("f")
        f.size = 2
        t.addfile(f, io.BytesIO(b"hi"))
    one = store.stack([store.import_tar(io.BytesIO(buf.getvalue()))])
    with pytest.raises(ValueError, match=r"not within a stack of 1 layer$"):
        store.squash(one, 0, 3)
    two = one.push(store.import_tar(io.BytesIO(buf.getvalue())))
    with pytest.raises(ValueError, match=r"not within a stack of 2 layers$"):
        store.squash_changes(two, 1, 5)
