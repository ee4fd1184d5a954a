"""The union view, case by case, with the expected trees written out (DESIGN section 3).

First the cases where the kernel's overlayfs differs from the OCI image spec, which the
differential test (``test_union_overlay.py``) cannot judge and leaves out: a path and its
whiteout in one layer, an opaque marker at a layer's root, markers under directories no layer
has, hardlinks to lower layers, entries beneath a lower symlink, 0:0 character devices and
overlay xattrs inside a tar. Then the core rules: tar-order independence, duplicates, directory
attributes and xattr sets, merging stopped by a non-directory, AUFS metadata, implicit parents,
symlink resolution inside the image root, provenance, the depth limit and invalid whiteouts.

Trees are described by :func:`tree`: path -> ``("file", mode, content)``, ``("dir", mode)``,
``("symlink", target)``, ``(device kind, major, minor)`` or ``("fifo",)``.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import random
import stat
import tarfile
from pathlib import Path
from typing import Any

import layerstore as ls
import pytest
import tarfixtures as tf
from storeutil import b3sum

PAX = tarfile.PAX_FORMAT
T1 = 1_600_000_001
T2 = 1_700_000_002

Members = list[tf.Member]


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def sym(name: str, target: str, **kw: Any) -> tf.Member:
    return tf.Member(name, tarfile.SYMTYPE, linkname=target, mode=0o777, **kw)


def hard(name: str, target: str, **kw: Any) -> tf.Member:
    return tf.Member(name, tarfile.LNKTYPE, linkname=target, **kw)


def chr_(name: str, major: int, minor: int, mode: int = 0o600) -> tf.Member:
    return tf.Member(name, tarfile.CHRTYPE, mode=mode, devmajor=major, devminor=minor)


def wh(path: str) -> tf.Member:
    """The whiteout of ``path`` (an empty regular file ``.wh.NAME``)."""
    parent, _, name = path.rpartition("/")
    return tf.file_(f"{parent}/.wh.{name}" if parent else f".wh.{name}", b"")


def opq(directory: str) -> tf.Member:
    """The opaque marker of ``directory`` ("" for the layer's root)."""
    return tf.file_(f"{directory}/.wh..wh..opq" if directory else ".wh..wh..opq", b"")


def xattrs(**kv: str) -> dict[str, str]:
    """PAX records for xattrs: xattrs(user_a="1") -> SCHILY.xattr.user.a."""
    return {"SCHILY.xattr." + k.replace("_", ".", 1): v for k, v in kv.items()}


def layer(store: ls.Store, members: Members) -> ls.Layer:
    return store.import_tar(tf.py_tar(PAX, members=members))


def build(store: ls.Store, *layers: Members) -> ls.Stack:
    """A stack of the given layers, bottom first."""
    return store.stack([layer(store, m) for m in layers])


def tree(stack: ls.Stack) -> dict[str, tuple[Any, ...]]:
    """The whole view, by listdir and lstat (not by walk, which has its own tests)."""
    out: dict[str, tuple[Any, ...]] = {}

    def visit(d: str) -> None:
        for name in stack.listdir(d):
            p = f"{d.rstrip('/')}/{name}"
            st = stack.stat(p, follow_symlinks=False)
            if st.kind == "file":
                out[p] = ("file", st.mode, stack.read_bytes(p))
            elif st.kind == "dir":
                out[p] = ("dir", st.mode)
                visit(p)
            elif st.kind == "symlink":
                out[p] = ("symlink", st.linkname)
            elif st.kind in ("char", "block"):
                out[p] = (st.kind, st.devmajor, st.devminor)
            else:
                out[p] = (st.kind,)

    visit("/")
    return out


def assert_implicit(stack: ls.Stack, path: str) -> None:
    st = stack.stat(path, follow_symlinks=False)
    got = (st.kind, st.mode, st.uid, st.gid, st.mtime_ns, st.layer, st.implicit, st.xattrs)
    assert got == ("dir", 0o755, 0, 0, 0, None, True, {}), path
    assert st.st_mode == stat.S_IFDIR | 0o755


def chain_id(diff_ids: list[str]) -> str:
    chain = diff_ids[0]
    for d in diff_ids[1:]:
        chain = "sha256:" + hashlib.sha256(f"{chain} {d}".encode()).hexdigest()
    return chain


F = 0o644  # the default file mode of tf.file_
D = 0o755  # the default directory mode of tf.dir_


# ------------------------------------------------------------------------------------------------
# Where the kernel differs from the OCI spec
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("whiteout_first", [True, False], ids=["whiteout-first", "file-first"])
def test_file_and_its_whiteout_in_one_layer_the_file_survives(
    store: ls.Store, whiteout_first: bool
) -> None:
    upper = [wh("a"), tf.file_("a", b"new", 0o600)]
    s = build(
        store,
        [tf.file_("a", b"old"), tf.file_("b", b"b")],
        upper if whiteout_first else upper[::-1],
    )
    assert tree(s) == {"/a": ("file", 0o600, b"new"), "/b": ("file", F, b"b")}
    assert s.stat("/a").layer == 1


@pytest.mark.parametrize("whiteout_first", [True, False], ids=["whiteout-first", "dir-first"])
def test_directory_and_its_whiteout_in_one_layer(store: ls.Store, whiteout_first: bool) -> None:
    """The whiteout hides the lower directory and its subtree; the layer's own directory and
    children survive it (the same as an opaque directory)."""
    upper = [wh("d"), tf.dir_("d/", 0o700, mtime=T2), tf.file_("d/new", b"n")]
    s = build(
        store,
        [tf.dir_("d/", mtime=T1), tf.file_("d/old", b"o"), tf.file_("d/sub/x", b"x")],
        upper if whiteout_first else upper[::-1],
    )
    assert tree(s) == {"/d": ("dir", 0o700), "/d/new": ("file", F, b"n")}
    st = s.stat("/d")
    assert (st.layer, st.mtime_ns) == (1, T2 * 10**9)


@pytest.mark.parametrize("whiteout_first", [True, False], ids=["whiteout-first", "child-first"])
def test_whiteout_of_a_directory_with_an_undeclared_recreation(
    store: ls.Store, whiteout_first: bool
) -> None:
    """``.wh.d`` and ``d/new`` (no ``d/`` entry) in one layer: ``d`` is an implicit directory,
    nothing of the lower ``d`` (children or attributes) shows through."""
    upper = [wh("d"), tf.file_("d/new", b"n")]
    s = build(
        store,
        [tf.dir_("d/", 0o700, uid=5, mtime=T1, pax=xattrs(user_x="1")), tf.file_("d/old", b"o")],
        upper if whiteout_first else upper[::-1],
    )
    assert tree(s) == {"/d": ("dir", D), "/d/new": ("file", F, b"n")}
    assert_implicit(s, "/d")


@pytest.mark.parametrize("marker_first", [True, False], ids=["marker-first", "marker-last"])
def test_opaque_marker_at_a_layers_root_hides_everything_below(
    store: ls.Store, marker_first: bool
) -> None:
    upper = [opq(""), tf.file_("b", b"B"), tf.dir_("d/", 0o700)]
    s = build(
        store,
        [
            tf.file_("a", b"A"),
            tf.file_("b", b"lower b"),
            tf.dir_("d/"),
            tf.file_("d/x", b"x"),
            sym("s", "a"),
            tf.file_("implicit/parent/f", b"f"),
        ],
        upper if marker_first else upper[::-1],
    )
    assert tree(s) == {"/b": ("file", F, b"B"), "/d": ("dir", 0o700)}
    assert s.listdir("/") == ["b", "d"]
    for gone in ("/a", "/d/x", "/s", "/implicit"):
        assert not s.exists(gone, follow_symlinks=False)
    assert sorted(s.provenance("/a")) == [(0, "entry"), (1, "opaque")]
    assert sorted(s.provenance("/b")) == [(0, "entry"), (1, "entry")]
    # a layer above the opaque root still adds to it
    s2 = s.push(layer(store, [tf.file_("c", b"C")]))
    assert tree(s2) == {"/b": ("file", F, b"B"), "/c": ("file", F, b"C"), "/d": ("dir", 0o700)}


@pytest.mark.parametrize(
    "marker",
    [
        wh("nodir/x"),
        wh("nodir/sub/x"),
        opq("nodir"),
        opq("nodir/sub"),
    ],
    ids=["whiteout", "nested-whiteout", "opaque", "nested-opaque"],
)
def test_marker_under_a_directory_no_layer_has(store: ls.Store, marker: tf.Member) -> None:
    """A marker is not an entry: it makes no implicit parent, and hides nothing."""
    s = build(store, [tf.file_("a", b"A"), tf.dir_("d/")], [marker])
    assert tree(s) == {"/a": ("file", F, b"A"), "/d": ("dir", D)}
    assert not s.exists("/nodir")
    with pytest.raises(FileNotFoundError):
        s.stat("/nodir")
    assert s.stat_many(["/nodir", "/nodir/sub"]) == [None, None]


def test_opaque_marker_of_a_directory_whited_out_in_the_same_layer(store: ls.Store) -> None:
    """``.wh.d`` and ``d/.wh..wh..opq`` without a ``d/`` entry: the lower ``d`` is hidden, and
    the marker makes no directory."""
    s = build(
        store, [tf.dir_("d/"), tf.file_("d/x", b"x"), tf.file_("f", b"f")], [wh("d"), opq("d")]
    )
    assert tree(s) == {"/f": ("file", F, b"f")}


def test_whiteout_in_the_bottom_layer_hides_nothing(store: ls.Store) -> None:
    s = build(store, [wh("gone"), wh("d/gone"), tf.dir_("d/"), tf.file_("f", b"f")])
    assert tree(s) == {"/d": ("dir", D), "/f": ("file", F, b"f")}


def test_hardlink_to_a_lower_layer_file(store: ls.Store) -> None:
    """A link to a path only present below is resolved through the union below, and reports
    its target's content and metadata."""
    s = build(
        store,
        [tf.file_("x", b"lower content", 0o640, uid=5, gid=6, mtime=T1)],
        [hard("y", "x", mode=0o777, uid=1, gid=1, mtime=T2)],
    )
    assert tree(s) == {
        "/x": ("file", 0o640, b"lower content"),
        "/y": ("file", 0o640, b"lower content"),
    }
    x, y = s.stat("/x"), s.stat("/y")
    assert (y.kind, y.mode, y.uid, y.gid, y.mtime_ns, y.size) == (
        "file",
        0o640,
        5,
        6,
        T1 * 10**9,
        len(b"lower content"),
    )
    assert y.digest == x.digest == b3sum(b"lower content")
    assert (x.layer, y.layer) == (0, 1)


def test_hardlink_to_a_lower_file_resolves_through_the_whole_union(store: ls.Store) -> None:
    s = build(
        store,
        [tf.file_("x", b"v0")],
        [tf.file_("x", b"v1", 0o600)],
        [hard("y", "x")],
    )
    assert s.read_bytes("/y") == b"v1"
    assert s.stat("/y").mode == 0o600


@pytest.mark.parametrize(
    "later",
    [[tf.file_("x", b"v2")], [wh("x")], [tf.dir_("x/")], [sym("x", "elsewhere")]],
    ids=["replaced", "whited-out", "dir-over-it", "symlink-over-it"],
)
def test_link_to_a_lower_file_keeps_reading_it_when_a_later_layer_replaces_it(
    store: ls.Store, later: Members
) -> None:
    s = build(store, [tf.file_("x", b"v1")], [hard("y", "x")], later)
    assert s.read_bytes("/y") == b"v1"
    assert s.stat("/y").digest == b3sum(b"v1")
    assert s.stat("/y").layer == 1


@pytest.mark.parametrize(
    "later",
    [
        [tf.file_("x", b"v2"), tf.file_("d/x", b"v2")],
        [wh("x"), wh("d/x")],
        [wh("x"), wh("d")],
        [tf.dir_("x/"), tf.file_("d", b"not a directory")],
    ],
    ids=["targets-replaced", "targets-whited-out", "target-dir-whited-out", "replaced-by-kind"],
)
def test_link_within_a_layer_keeps_reading_when_a_later_layer_hides_the_target(
    store: ls.Store, later: Members
) -> None:
    s = build(
        store,
        [
            tf.dir_("d/"),
            tf.file_("d/x", b"v1"),
            tf.file_("x", b"v1 too"),
            hard("y", "d/x"),
            hard("z", "x"),
        ],
        later,
    )
    assert s.read_bytes("/y") == b"v1"
    assert s.read_bytes("/z") == b"v1 too"
    assert s.stat("/y").digest == b3sum(b"v1")


def test_hardlink_to_a_lower_file_that_is_itself_a_hardlink(store: ls.Store) -> None:
    s = build(
        store,
        [tf.file_("x", b"shared", 0o600, uid=3), hard("y", "x")],
        [hard("z", "y")],
        [tf.file_("x", b"replaced"), tf.file_("y", b"replaced too")],
    )
    assert s.read_bytes("/z") == b"shared"
    z = s.stat("/z")
    assert (z.kind, z.mode, z.uid, z.layer) == ("file", 0o600, 3, 1)


def test_hardlink_to_a_hardlink_in_the_same_layer(store: ls.Store) -> None:
    s = build(
        store,
        [tf.file_("x", b"shared", 0o750), hard("y", "x"), hard("z", "y")],
        [wh("x"), wh("y")],
    )
    assert tree(s) == {"/z": ("file", 0o750, b"shared")}


def test_link_to_a_path_replaced_later_in_the_same_tar_keeps_the_first_content(
    store: ls.Store,
) -> None:
    """``x``, ``y`` linked to ``x``, ``x`` again: the link was made to the first ``x`` (GNU tar
    and umoci extract ``y`` = "first"; the duplicate replaces the path, not the linked file)."""
    s = build(
        store,
        [tf.file_("x", b"first", 0o600), hard("y", "x"), tf.file_("x", b"second", 0o644)],
    )
    assert tree(s) == {"/x": ("file", 0o644, b"second"), "/y": ("file", 0o600, b"first")}
    assert s.stat("/y").digest == b3sum(b"first")


def test_link_written_before_its_same_layer_target_resolves_below(store: ls.Store) -> None:
    """``y`` linked to ``x`` comes before this layer's own ``x``: when the link is made, ``x``
    is only present below, so it is resolved through the union below (umoci: ``y`` = "lower")."""
    s = build(store, [tf.file_("x", b"lower")], [hard("y", "x"), tf.file_("x", b"upper")])
    assert tree(s) == {"/x": ("file", F, b"upper"), "/y": ("file", F, b"lower")}


def test_hardlink_within_a_layer_reports_its_targets_metadata(store: ls.Store) -> None:
    s = build(
        store,
        [
            tf.file_("x", b"data", 0o4750, uid=7, gid=8, mtime=T1, pax=xattrs(user_k="v")),
            hard("y", "x", mode=0o777, uid=0, gid=0, mtime=T2),
        ],
    )
    x, y = s.stat("/x"), s.stat("/y")
    fields = ("kind", "mode", "uid", "gid", "mtime_ns", "size", "digest", "xattrs", "layer")
    assert {f: getattr(y, f) for f in fields} == {f: getattr(x, f) for f in fields}
    assert y.kind == "file" and y.mode == 0o4750 and y.uid == 7
    assert s.read_bytes("/y") == b"data"


@pytest.mark.parametrize(
    "lower_a",
    [sym("a", "x"), sym("a", "/x"), tf.file_("a", b"file"), chr_("a", 1, 3)],
    ids=["relative-symlink", "absolute-symlink", "file", "device"],
)
def test_entries_beneath_a_lower_non_directory(store: ls.Store, lower_a: tf.Member) -> None:
    """Lower ``a`` is a symlink (or another non-directory), the upper layer has ``a/b`` and no
    ``a/`` entry: the upper ``a`` is an implicit directory holding only ``b`` (the lookup never
    goes through the lower symlink)."""
    s = build(
        store,
        [tf.dir_("x/"), tf.file_("x/old", b"old"), lower_a],
        [tf.file_("a/b", b"B"), tf.file_("a/sub/c", b"C")],
    )
    assert tree(s) == {
        "/a": ("dir", D),
        "/a/b": ("file", F, b"B"),
        "/a/sub": ("dir", D),
        "/a/sub/c": ("file", F, b"C"),
        "/x": ("dir", D),
        "/x/old": ("file", F, b"old"),
    }
    assert_implicit(s, "/a")
    assert_implicit(s, "/a/sub")
    assert s.stat("/a/b").layer == 1


@pytest.mark.parametrize("marker", [wh("link/x"), opq("link")], ids=["whiteout", "opaque"])
def test_markers_beneath_a_lower_symlink_hide_nothing(store: ls.Store, marker: tf.Member) -> None:
    """The kernel would see a directory ``link`` in the upper layer; here the marker is not an
    entry: ``link`` stays the lower symlink and what it points to is untouched."""
    lower = [tf.dir_("real/"), tf.file_("real/x", b"x"), sym("link", "real")]
    s = build(store, lower, [marker, tf.file_("other", b"o")])
    assert tree(s) == {
        "/link": ("symlink", "real"),
        "/other": ("file", F, b"o"),
        "/real": ("dir", D),
        "/real/x": ("file", F, b"x"),
    }
    assert s.read_bytes("/link/x") == b"x"


def test_declared_directory_over_a_lower_symlink(store: ls.Store) -> None:
    s = build(
        store,
        [tf.dir_("x/"), tf.file_("x/old", b"old"), sym("a", "x")],
        [tf.dir_("a/", 0o700, mtime=T2), tf.file_("a/b", b"B")],
    )
    assert tree(s) == {
        "/a": ("dir", 0o700),
        "/a/b": ("file", F, b"B"),
        "/x": ("dir", D),
        "/x/old": ("file", F, b"old"),
    }
    assert (s.stat("/a").layer, s.stat("/a").implicit) == (1, False)


def test_zero_zero_char_device_in_a_tar_is_a_device(store: ls.Store) -> None:
    """The kernel's whiteout form is plain data inside a tar: a character device 0:0."""
    s = build(
        store,
        [tf.file_("a", b"lower a"), tf.dir_("d/"), tf.file_("d/x", b"x"), tf.file_("d/y", b"y")],
        [chr_("a", 0, 0), chr_("n", 0, 0, 0o644), chr_("d/x", 0, 0)],
    )
    assert tree(s) == {
        "/a": ("char", 0, 0),
        "/d": ("dir", D),
        "/d/x": ("char", 0, 0),
        "/d/y": ("file", F, b"y"),
        "/n": ("char", 0, 0),
    }
    st = s.stat("/n")
    assert (st.mode, st.rdev, st.layer, st.st_mode) == (0o644, 0, 1, stat.S_IFCHR | 0o644)


@pytest.mark.parametrize(
    "name,value",
    [
        ("trusted.overlay.opaque", "y"),
        ("trusted.overlay.opaque", "x"),
        ("user.overlay.opaque", "y"),
    ],
)
def test_overlay_xattrs_in_a_tar_are_plain_data(store: ls.Store, name: str, value: str) -> None:
    s = build(
        store,
        [tf.dir_("d/"), tf.file_("d/x", b"lower x"), tf.file_("d/y", b"lower y")],
        [
            tf.dir_("d/", pax={"SCHILY.xattr." + name: value}),
            tf.file_("d/y", b"upper y", pax={"SCHILY.xattr.trusted.overlay.whiteout": "y"}),
            tf.file_("d/z", b"z", pax={"SCHILY.xattr.user.overlay.whiteout": "y"}),
        ],
    )
    assert tree(s) == {
        "/d": ("dir", D),
        "/d/x": ("file", F, b"lower x"),
        "/d/y": ("file", F, b"upper y"),
        "/d/z": ("file", F, b"z"),
    }
    assert s.stat("/d").xattrs == {name: value.encode()}
    assert s.stat("/d/y").xattrs == {"trusted.overlay.whiteout": b"y"}


# ------------------------------------------------------------------------------------------------
# Core rules
# ------------------------------------------------------------------------------------------------

ORDER_LOWER = [
    tf.file_("a", b"A"),
    tf.dir_("d/", 0o700),
    tf.file_("d/x", b"x"),
    tf.dir_("d/sub/"),
    tf.file_("d/sub/y", b"y"),
    tf.dir_("e/"),
    tf.file_("e/keep", b"keep"),
    tf.file_("e/gone", b"gone"),
    tf.dir_("w/"),
    tf.file_("w/x", b"wx"),
]
ORDER_UPPER = [
    wh("a"),
    opq("d"),
    tf.dir_("d/", 0o750, mtime=T2),
    tf.file_("d/new", b"new"),
    wh("e/gone"),
    tf.file_("b", b"B"),
    wh("w"),
    tf.file_("w2/f", b"implicit parent"),
]
ORDER_EXPECTED = {
    "/b": ("file", F, b"B"),
    "/d": ("dir", 0o750),
    "/d/new": ("file", F, b"new"),
    "/e": ("dir", D),
    "/e/keep": ("file", F, b"keep"),
    "/w2": ("dir", D),
    "/w2/f": ("file", F, b"implicit parent"),
}


def _orders() -> list[list[int]]:
    n = len(ORDER_UPPER)
    rng = random.Random("tar-order")
    perms = [list(range(n)), list(reversed(range(n)))]
    markers = [i for i, m in enumerate(ORDER_UPPER) if ".wh." in m.name]
    entries = [i for i in range(n) if i not in markers]
    perms += [markers + entries, entries + markers]
    all_perms = list(itertools.permutations(range(n)))
    perms += [list(p) for p in rng.sample(all_perms, 20)]
    return perms


def test_tar_order_does_not_matter(store: ls.Store) -> None:
    """Markers before or after the entries they concern, children before their parents: the
    same view every time."""
    lower = layer(store, ORDER_LOWER)
    for order in _orders():
        s = store.stack([lower, layer(store, [ORDER_UPPER[i] for i in order])])
        assert tree(s) == ORDER_EXPECTED, f"order {order}"
        assert s.stat("/d").layer == 1
        assert s.stat("/e").layer == 0
        assert_implicit(s, "/w2")


def test_duplicate_paths_last_one_wins(store: ls.Store) -> None:
    s = build(
        store,
        [tf.file_("x", b"lower")],
        [
            tf.file_("x", b"first"),
            tf.file_("x", b"second, longer", 0o600),
            tf.dir_("d/", 0o700, uid=1),
            tf.file_("d/child", b"c"),
            tf.dir_("d/", 0o711, uid=2),
            tf.file_("f", b"a file first"),
            tf.dir_("f/", 0o750),
            tf.dir_("g/"),
            tf.file_("g", b"a file last"),
            sym("s", "x"),
            sym("s", "d"),
        ],
    )
    assert tree(s) == {
        "/d": ("dir", 0o711),
        "/d/child": ("file", F, b"c"),
        "/f": ("dir", 0o750),
        "/g": ("file", F, b"a file last"),
        "/s": ("symlink", "d"),
        "/x": ("file", 0o600, b"second, longer"),
    }
    assert s.stat("/d").uid == 2
    assert s.stat("/x").digest == b3sum(b"second, longer")


def test_directory_merge_takes_the_upper_attributes(store: ls.Store) -> None:
    s = build(
        store,
        [tf.dir_("d/", 0o700, uid=1, gid=2, mtime=T1), tf.file_("d/x", b"x")],
        [tf.dir_("d/", 0o2755, uid=3, gid=4, mtime=T2), tf.file_("d/y", b"y")],
        [tf.file_("d/z", b"z")],  # an undeclared parent changes nothing
    )
    assert tree(s) == {
        "/d": ("dir", 0o2755),
        "/d/x": ("file", F, b"x"),
        "/d/y": ("file", F, b"y"),
        "/d/z": ("file", F, b"z"),
    }
    st = s.stat("/d")
    assert (st.uid, st.gid, st.mtime_ns, st.layer, st.implicit) == (3, 4, T2 * 10**9, 1, False)
    assert [(c, s.stat(f"/d/{c}").layer) for c in "xyz"] == [("x", 0), ("y", 1), ("z", 2)]


@pytest.mark.parametrize(
    "upper_pax,expected",
    [
        (xattrs(user_b="3"), {"user.b": b"3"}),
        ({}, {}),
        (xattrs(user_c="new", user_a="1"), {"user.a": b"1", "user.c": b"new"}),
    ],
    ids=["one-key-kept", "none", "other-set"],
)
def test_directory_xattrs_are_replaced_as_a_whole_set(
    store: ls.Store, upper_pax: dict[str, str], expected: dict[str, bytes]
) -> None:
    s = build(
        store,
        [tf.dir_("d/", pax=xattrs(user_a="1", user_b="2")), tf.file_("d/x", b"x")],
        [tf.dir_("d/", pax=upper_pax)],
    )
    assert s.stat("/d").xattrs == expected
    assert s.listdir("/d") == ["x"]


def test_undeclared_parent_keeps_the_lower_directory_and_its_xattrs(store: ls.Store) -> None:
    s = build(
        store,
        [tf.dir_("d/", 0o700, uid=9, mtime=T1, pax=xattrs(user_a="1")), tf.file_("d/x", b"x")],
        [tf.file_("d/y", b"y")],
    )
    st = s.stat("/d")
    assert (st.mode, st.uid, st.mtime_ns, st.layer, st.implicit) == (0o700, 9, T1 * 10**9, 0, False)
    assert st.xattrs == {"user.a": b"1"}
    assert s.listdir("/d") == ["x", "y"]


@pytest.mark.parametrize(
    "middle",
    [tf.file_("d", b"file"), sym("d", "elsewhere"), chr_("d", 1, 3), hard("d", "f")],
    ids=["file", "symlink", "device", "hardlink"],
)
def test_a_non_directory_stops_merging(store: ls.Store, middle: tf.Member) -> None:
    """Layer 1 puts a non-directory at ``d``: the directory of layer 2 never merges with the
    one of layer 0."""
    s = build(
        store,
        [tf.dir_("d/", 0o700), tf.file_("d/x", b"x"), tf.file_("d/sub/y", b"y")],
        [tf.file_("f", b"F"), middle],
        [tf.dir_("d/", 0o750), tf.file_("d/z", b"z")],
    )
    assert tree(s) == {"/d": ("dir", 0o750), "/d/z": ("file", F, b"z"), "/f": ("file", F, b"F")}
    # and with the directory of layer 2 left undeclared: an implicit directory
    s2 = build(
        store,
        [tf.dir_("d/", 0o700), tf.file_("d/x", b"x")],
        [tf.file_("f", b"F"), middle],
        [tf.file_("d/z", b"z")],
    )
    assert tree(s2) == {"/d": ("dir", D), "/d/z": ("file", F, b"z"), "/f": ("file", F, b"F")}
    assert_implicit(s2, "/d")


def test_a_directory_over_a_file_over_a_directory_in_one_stack(store: ls.Store) -> None:
    s = build(
        store,
        [tf.dir_("d/"), tf.file_("d/x", b"x")],
        [tf.file_("d", b"file")],
    )
    assert tree(s) == {"/d": ("file", F, b"file")}
    s = s.push(layer(store, [tf.dir_("d/", 0o700)]))
    assert tree(s) == {"/d": ("dir", 0o700)}


def test_whiteout_hides_a_subtree_and_a_recreation_does_not_merge(store: ls.Store) -> None:
    s = build(
        store,
        [tf.dir_("d/"), tf.file_("d/x", b"x"), tf.dir_("d/sub/"), tf.file_("d/sub/y", b"y")],
        [wh("d")],
    )
    assert tree(s) == {}
    assert not s.exists("/d/sub/y")
    s = s.push(layer(store, [tf.dir_("d/", 0o700), tf.file_("d/new", b"n")]))
    assert tree(s) == {"/d": ("dir", 0o700), "/d/new": ("file", F, b"n")}


@pytest.mark.parametrize("marker_first", [True, False], ids=["marker-first", "marker-last"])
def test_opaque_directory_keeps_its_own_layers_children(
    store: ls.Store, marker_first: bool
) -> None:
    upper = [opq("d"), tf.dir_("d/"), tf.file_("d/z", b"z"), tf.file_("d/x", b"new x")]
    s = build(
        store,
        [tf.dir_("d/"), tf.file_("d/x", b"x"), tf.file_("d/y", b"y"), tf.file_("d/s/t", b"t")],
        upper if marker_first else upper[::-1],
    )
    assert tree(s) == {
        "/d": ("dir", D),
        "/d/x": ("file", F, b"new x"),
        "/d/z": ("file", F, b"z"),
    }


def test_aufs_metadata_is_not_part_of_the_view(store: ls.Store) -> None:
    aufs = [
        tf.dir_(".wh..wh.plnk/", 0o700),
        tf.file_(".wh..wh.plnk/1234.5678", b"hardlink farm"),
        tf.file_(".wh..wh.aufs", b""),
        tf.dir_("d/.wh..wh.orph/", 0o700),
    ]
    upper = layer(store, [tf.dir_("d/"), *aufs, tf.file_("d/y", b"y")])
    s = store.stack([layer(store, [tf.file_("a", b"A"), tf.file_("d/x", b"x")]), upper])
    assert tree(s) == {
        "/a": ("file", F, b"A"),
        "/d": ("dir", D),
        "/d/x": ("file", F, b"x"),
        "/d/y": ("file", F, b"y"),
    }
    for p in ("/.wh..wh.plnk", "/.wh..wh.plnk/1234.5678", "/.wh..wh.aufs", "/d/.wh..wh.orph"):
        assert not s.exists(p, follow_symlinks=False), p
        with pytest.raises(FileNotFoundError):
            s.stat(p, follow_symlinks=False)
    assert [d for d, _, _ in s.walk("/")] == ["/", "/d"]
    # ... but the layer keeps them, for export
    paths = {e.path for e in upper.entries()}
    assert {"/.wh..wh.plnk", "/.wh..wh.plnk/1234.5678", "/.wh..wh.aufs"} <= paths


def test_whiteout_and_opaque_markers_are_never_visible(store: ls.Store) -> None:
    s = build(
        store,
        [tf.file_("a", b"A"), tf.dir_("d/"), tf.file_("d/x", b"x")],
        [wh("a"), opq("d"), tf.dir_("d/"), wh("d/x")],
    )
    assert tree(s) == {"/d": ("dir", D)}
    for p in ("/.wh.a", "/d/.wh..wh..opq", "/d/.wh.x"):
        assert not s.exists(p, follow_symlinks=False)


def test_implicit_parents(store: ls.Store) -> None:
    s = build(store, [tf.file_("a/b/c", b"C", mtime=T1)])
    assert tree(s) == {"/a": ("dir", D), "/a/b": ("dir", D), "/a/b/c": ("file", F, b"C")}
    assert_implicit(s, "/a")
    assert_implicit(s, "/a/b")
    c = s.stat("/a/b/c")
    assert (c.layer, c.implicit, c.mtime_ns) == (0, False, T1 * 10**9)
    assert s.provenance("/a/b/c") == [(0, "entry")]
    # a later layer declaring one of them
    s2 = s.push(layer(store, [tf.dir_("a/", 0o700, uid=3, mtime=T2)]))
    a = s2.stat("/a")
    assert (a.mode, a.uid, a.mtime_ns, a.layer, a.implicit) == (0o700, 3, T2 * 10**9, 1, False)
    assert_implicit(s2, "/a/b")
    assert s2.read_bytes("/a/b/c") == b"C"


def test_implicit_parent_declared_later_in_the_same_tar(store: ls.Store) -> None:
    s = build(store, [tf.file_("a/b", b"B"), tf.dir_("a/", 0o711, uid=4, mtime=T1)])
    a = s.stat("/a")
    assert (a.mode, a.uid, a.mtime_ns, a.layer, a.implicit) == (0o711, 4, T1 * 10**9, 0, False)


# ------------------------------------------------------------------------------------------------
# Symlinks resolve inside the image root
# ------------------------------------------------------------------------------------------------

LINKS = [
    tf.dir_("etc/"),
    tf.file_("etc/target", b"T"),
    sym("abs", "/etc/target"),
    sym("up", "../../../../etc/target"),
    sym("etc/rel", "target"),
    sym("etc/uprel", "../etc/target"),
    sym("etc/rootlink", "/"),
    sym("etc/dotdot", "../../.."),
    sym("chain", "abs"),
    sym("chain2", "etc/rel"),
    tf.file_("usr/lib/x", b"X"),
    sym("lib", "usr/lib"),
    sym("dirabs", "/usr"),
    sym("loop1", "loop2"),
    sym("loop2", "loop1"),
    sym("self", "self"),
    sym("selfdir", "selfdir/x"),
    sym("dangling", "nowhere"),
    sym("danglingdir", "nowhere/x"),
    sym("through-file", "etc/target/x"),
]


@pytest.fixture
def links(store: ls.Store) -> ls.Stack:
    return build(store, LINKS)


@pytest.mark.parametrize(
    "path",
    [
        "/abs",
        "/up",
        "/etc/rel",
        "/etc/uprel",
        "/chain",
        "/chain2",
        "/etc/rootlink/etc/target",
        "/etc/dotdot/etc/target",
        "/etc/rootlink/etc/rootlink/abs",
    ],
)
def test_symlinks_resolve_inside_the_root(links: ls.Stack, path: str) -> None:
    assert links.read_bytes(path) == b"T"
    st = links.stat(path)
    assert (st.kind, st.size, st.layer) == ("file", 1, 0)
    assert st.digest == b3sum(b"T")
    with links.open(path) as f:
        assert f.read() == b"T"


def test_directory_symlinks_in_the_middle_of_a_path(links: ls.Stack) -> None:
    assert links.read_bytes("/lib/x") == b"X"
    assert links.read_bytes("/dirabs/lib/x") == b"X"
    assert links.stat("/lib/x", follow_symlinks=False).kind == "file"
    assert links.listdir("/lib") == ["x"]
    assert links.listdir("/etc/rootlink") == links.listdir("/")
    assert links.stat("/lib").kind == "dir"
    assert links.stat("/lib", follow_symlinks=False).kind == "symlink"


def test_symlink_lstat_and_readlink(links: ls.Stack) -> None:
    st = links.stat("/abs", follow_symlinks=False)
    assert (st.kind, st.linkname, st.digest, st.layer) == ("symlink", "/etc/target", None, 0)
    assert st.st_mode == stat.S_IFLNK | 0o777
    assert links.readlink("/abs") == "/etc/target"
    assert links.readlink("/chain") == "abs"
    assert links.readlink("/etc/dotdot") == "../../.."


@pytest.mark.parametrize("path", ["/loop1", "/loop2", "/self", "/selfdir", "/loop1/x"])
def test_symlink_loops_raise_eloop(links: ls.Stack, path: str) -> None:
    for call in (links.stat, links.read_bytes, links.listdir):
        with pytest.raises(OSError) as e:
            call(path)
        assert e.value.errno == errno.ELOOP, (call, path, e.value)
    assert not links.exists(path)
    if path != "/loop1/x":
        assert links.exists(path, follow_symlinks=False)
        assert links.stat(path, follow_symlinks=False).kind == "symlink"


@pytest.mark.parametrize("path", ["/dangling", "/danglingdir"])
def test_dangling_symlinks(links: ls.Stack, path: str) -> None:
    with pytest.raises(FileNotFoundError):
        links.stat(path)
    with pytest.raises(FileNotFoundError):
        links.read_bytes(path)
    assert not links.exists(path)
    assert links.exists(path, follow_symlinks=False)
    assert links.stat_many([path]) == [None]


def test_stat_many_follows_like_stat(links: ls.Stack) -> None:
    paths = ["/abs", "/lib/x", "/dangling", "/nope", "/etc", "/chain"]
    for follow in (True, False):
        got = links.stat_many(paths, follow_symlinks=follow)
        want = []
        for p in paths:
            try:
                st = links.stat(p, follow_symlinks=follow)
            except FileNotFoundError:
                want.append(None)
            else:
                want.append((st.path, st.kind, st.linkname, st.size, st.layer))
        assert [
            None if g is None else (g.path, g.kind, g.linkname, g.size, g.layer) for g in got
        ] == want


def test_empty_symlink_target_resolves_to_nothing(store: ls.Store) -> None:
    """An empty target is an empty pathname: ENOENT, as on Linux (it does not name the
    symlink's own directory)."""
    s = build(store, [sym("e", ""), tf.dir_("d/"), sym("d/e", "")])
    for p in ("/e", "/d/e"):
        assert s.stat(p, follow_symlinks=False).linkname == ""
        assert s.readlink(p) == ""
        with pytest.raises(FileNotFoundError):
            s.stat(p)
        assert not s.exists(p)
        assert s.stat_many([p]) == [None]


def test_path_through_a_file(links: ls.Stack) -> None:
    for path in ("/through-file", "/etc/target/x"):
        with pytest.raises((FileNotFoundError, NotADirectoryError)):
            links.stat(path)
        assert not links.exists(path)


def test_missing_paths_raise_file_not_found(links: ls.Stack) -> None:
    for call in (links.stat, links.read_bytes, links.listdir, links.readlink, links.open):
        with pytest.raises(FileNotFoundError):
            call("/nope")
        with pytest.raises(FileNotFoundError):
            call("/etc/nope")


def test_symlink_in_one_layer_resolves_through_the_union(store: ls.Store) -> None:
    s = build(
        store,
        [sym("link", "/data/file"), sym("dlink", "data")],
        [tf.file_("data/file", b"from layer 1")],
        [tf.file_("data/more", b"from layer 2")],
    )
    assert s.read_bytes("/link") == b"from layer 1"
    assert s.stat("/link").layer == 1
    assert s.listdir("/dlink") == ["file", "more"]
    assert s.stat("/link", follow_symlinks=False).layer == 0


# ------------------------------------------------------------------------------------------------
# Provenance
# ------------------------------------------------------------------------------------------------


def test_provenance_lists_every_layer_that_has_or_hides_a_path(store: ls.Store) -> None:
    s = build(
        store,
        [tf.file_("a", b"0"), tf.dir_("d/"), tf.file_("d/x", b"x"), tf.file_("keep", b"k")],
        [wh("a"), tf.dir_("d/"), opq("d"), tf.file_("d/y", b"y")],
        [tf.file_("a", b"2")],
    )
    assert sorted(s.provenance("/a")) == [(0, "entry"), (1, "whiteout"), (2, "entry")]
    assert sorted(s.provenance("/d")) == [(0, "entry"), (1, "entry")]
    assert sorted(s.provenance("/d/x")) == [(0, "entry"), (1, "opaque")]
    assert sorted(s.provenance("/d/y")) == [(1, "entry")]
    assert sorted(s.provenance("/keep")) == [(0, "entry")]
    assert s.stat("/a").layer == 2
    assert not s.exists("/d/x")


def test_provenance_of_a_path_hidden_by_a_whiteout_of_its_directory(store: ls.Store) -> None:
    s = build(store, [tf.dir_("d/"), tf.file_("d/x", b"x")], [wh("d")])
    assert sorted(s.provenance("/d")) == [(0, "entry"), (1, "whiteout")]
    assert sorted(s.provenance("/d/x")) == [(0, "entry"), (1, "whiteout")]


# ------------------------------------------------------------------------------------------------
# The stack itself: identity, depth limit, invalid whiteouts
# ------------------------------------------------------------------------------------------------


def test_stack_identity_and_push(store: ls.Store) -> None:
    layers = [layer(store, [tf.file_(f"f{i}", b"%d" % i)]) for i in range(3)]
    s2 = store.stack(layers[:2])
    s3 = s2.push(layers[2])
    assert isinstance(s3, ls.Stack)
    assert len(s2) == 2 and len(s3) == 3
    assert [x.id for x in s3.layers] == [x.id for x in layers]
    assert s3.chain_id == store.stack(layers).chain_id == chain_id([x.diff_id for x in layers])
    assert store.stack(layers[:1]).chain_id == layers[0].diff_id
    assert s2.listdir("/") == ["f0", "f1"]  # the parent is unchanged
    assert s3.listdir("/") == ["f0", "f1", "f2"]


def test_repeated_and_empty_layers(store: ls.Store) -> None:
    """Real images repeat layers (empty ones above all): each occurrence is a layer of its own."""
    empty = layer(store, [])
    same = layer(
        store, [tf.file_("x", b"x"), wh("x"), tf.dir_("d/"), opq("d"), tf.file_("d/n", b"n")]
    )
    base = layer(store, [tf.file_("d/old", b"old"), tf.file_("y", b"y")])
    s = store.stack([empty, base, same, empty, same, empty])
    assert len(s) == 6
    assert tree(s) == {
        "/d": ("dir", D),
        "/d/n": ("file", F, b"n"),
        "/x": ("file", F, b"x"),
        "/y": ("file", F, b"y"),
    }
    assert (s.stat("/x").layer, s.stat("/d").layer, s.stat("/y").layer) == (4, 4, 1)
    ids = [x.diff_id for x in (empty, base, same, empty, same, empty)]
    assert s.chain_id == chain_id(ids)
    assert store.stack([empty.id, base.id]).chain_id == chain_id(ids[:2])
    assert tree(store.stack([empty])) == {}
    assert store.stack([empty]).listdir("/") == []


def test_default_depth_limit_is_127(store: ls.Store) -> None:
    layers = [layer(store, [tf.file_(f"f{i}", b"%d" % i)]) for i in range(128)]
    s = store.stack(layers[:127])
    assert len(s) == 127
    assert s.read_bytes("/f0") == b"0" and s.stat("/f126").layer == 126
    with pytest.raises(ls.StackDepthError):
        store.stack(layers)
    with pytest.raises(ls.StackDepthError):
        s.push(layers[127])
    assert issubclass(ls.StackDepthError, ls.LayerstoreError)


def test_rules_hold_at_full_depth(store: ls.Store) -> None:
    """127 layers: ``x`` alternately written and whited out, each layer adding ``d/fI`` and every
    tenth one making ``d`` opaque."""
    layers = []
    for i in range(127):
        m = [tf.file_(f"d/f{i}", b"%d" % i)]
        m.append(tf.file_("x", b"v%d" % i) if i % 2 == 0 else wh("x"))
        if i % 10 == 0:
            m.append(opq("d"))
        layers.append(layer(store, m))
    s = store.stack(layers)
    assert s.read_bytes("/x") == b"v126"
    assert s.stat("/x").layer == 126
    assert s.listdir("/d") == sorted(f"f{i}" for i in range(120, 127))
    s2 = store.stack(layers[:126])
    assert not s2.exists("/x")
    assert sorted(s2.provenance("/x"))[-2:] == [(124, "entry"), (125, "whiteout")]


def test_configured_depth_limit(tmp_path: Path) -> None:
    store = ls.Store(tmp_path / "store", max_depth=5)
    layers = [layer(store, [tf.file_(f"f{i}", b"%d" % i)]) for i in range(6)]
    s = store.stack(layers[:5])
    assert len(s) == 5
    with pytest.raises(ls.StackDepthError):
        store.stack(layers)
    with pytest.raises(ls.StackDepthError):
        s.push(layers[5])
    assert len(store.stack(layers[:4]).push(layers[4])) == 5


@pytest.mark.parametrize("name", [".wh.", "d/.wh.", ".wh..", "d/.wh..", ".wh...", "d/.wh..."])
def test_invalid_whiteout_names_are_rejected_at_import(store: ls.Store, name: str) -> None:
    before = sorted(x.id for x in store.layers())
    with pytest.raises(ls.InvalidLayerError) as e:
        store.import_tar(tf.py_tar(PAX, members=[tf.dir_("d/"), tf.file_(name, b"")]))
    assert isinstance(e.value, ValueError)
    assert sorted(x.id for x in store.layers()) == before
