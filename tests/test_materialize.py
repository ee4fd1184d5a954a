"""``Store.materialize`` and ``Store.apply``: the union view written to disk, checked against the
stack's own view (every field, every xattr, hardlinks as shared inodes) and against the kernel's
overlayfs; ``apply`` against ``materialize`` of the pushed stack; and the known breakouts of
hostile layers, each with a victim directory beside the target that must stay untouched.

Root-only where devices, owners or ``trusted.*`` xattrs are involved (CI runs as root).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import stat
import subprocess
import tarfile
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import layerstore as ls
import overlayutil as ou
import pytest
import tarfixtures as tf
from storeutil import start_time

Info = dict[str, Any]
OVERLAY_STACKS = int(os.environ.get("LAYERSTORE_MATERIALIZE_STACKS", "40"))


# ------------------------------------------------------------------------------------------------
# Describing trees
# ------------------------------------------------------------------------------------------------


def disk_tree(root: Path) -> dict[str, Info]:
    """Every path under ``root`` (symlinks not followed): lstat fields, every xattr, content,
    symlink target, and the inode (for hardlink groups)."""
    out: dict[str, Info] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            full = os.path.join(dirpath, name)
            rel = "/" + os.path.relpath(full, root)
            st = os.lstat(full)
            info = ou.info_from_stat(st)
            info["linkname"] = os.readlink(full) if info["kind"] == "symlink" else None
            info["xattrs"] = {
                k: os.getxattr(full, k, follow_symlinks=False)
                for k in os.listxattr(full, follow_symlinks=False)
            }
            if info["kind"] == "file":
                info["data"] = Path(full).read_bytes()
            info["ino"] = st.st_ino
            out[rel] = info
    return out


def view_tree(image: ls.Stack) -> dict[str, Info]:
    """The same description of a stack's view, by walk and lstat (``ino``: the hardlink group,
    named by the path whose content a link shares)."""
    out: dict[str, Info] = {}
    for dirpath, dirnames, filenames in image.walk("/"):
        for name in [*dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            st = image.stat(p, follow_symlinks=False)
            info = ou.info_from_lib(st)
            info["linkname"] = st.linkname
            info["xattrs"] = dict(st.xattrs)
            if st.kind == "file":
                info["data"] = image.read_bytes(p)
            info["ino"] = os.fsdecode(st.hardlink) if st.hardlink else p
            out[p] = info
    # A link shares its target path's inode only while that path shows the same entry.
    same = ("kind", "mode", "uid", "gid", "mtime_ns", "data", "linkname", "xattrs")
    for p, info in out.items():
        h = info["ino"]
        if h != p and (h not in out or any(out[h].get(k) != info.get(k) for k in same)):
            info["ino"] = ("orphan", h)
    return out


def groups(tree: dict[str, Info], key: str = "ino") -> list[list[str]]:
    """Paths sharing an inode (disk) or a hardlink target (view), groups of two or more."""
    by: dict[Any, list[str]] = {}
    for p, info in tree.items():
        if info["kind"] != "dir" and info[key] is not None:
            by.setdefault(info[key], []).append(p)
    return sorted(sorted(g) for g in by.values() if len(g) > 1)


def without(tree: dict[str, Info], *keys: str) -> dict[str, Info]:
    return {p: {k: v for k, v in info.items() if k not in keys} for p, info in tree.items()}


def assert_same(expected: dict[str, Info], got: dict[str, Info], what: tuple[str, str]) -> None:
    lines = ou.diff_trees(expected, got, what)
    assert not lines, "\n".join(lines[:60])


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything about a victim tree that a breakout could change (the root's entry included)."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            data: bytes | str | None = None
            if stat.S_ISREG(st.st_mode):
                data = Path(full).read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                data = os.readlink(full)
            xattrs = {
                k: os.getxattr(full, k, follow_symlinks=False)
                for k in os.listxattr(full, follow_symlinks=False)
            }
            names = sorted(os.listdir(full)) if stat.S_ISDIR(st.st_mode) else None
            out[os.path.relpath(full, root)] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_nlink,
                st.st_mtime_ns,
                data,
                xattrs,
                names,
            )
    return out


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------


def sym(name: str, target: str) -> tf.Member:
    return tf.Member(name, tarfile.SYMTYPE, linkname=target, mode=0o777)


def hard(name: str, target: str) -> tf.Member:
    return tf.Member(name, tarfile.LNKTYPE, linkname=target)


def layer_of(store: ls.Store, members: list[tf.Member]) -> ls.Layer:
    return store.import_tar(tf.py_tar(tarfile.PAX_FORMAT, members=members))


UPPER = [
    # replaces a lower file (new inode for etc/hostname; its lower hardlink keeps the old one)
    tf.file_("etc/hostname", b"upper\n", 0o600, uid=7, gid=8),
    tf.file_("etc/.wh.os-release", b""),
    # a lower directory becomes a file, a lower file a directory
    tf.file_("srv/empty-dir", b"now a file\n"),
    tf.dir_("usr/bin/sh/", 0o750),
    tf.file_("usr/bin/sh/inside", b"under the former symlink\n"),
    # opaque: the lower children of usr/share go, this layer's stay
    tf.file_("usr/share/new.txt", b"kept\n"),
    tf.file_("usr/share/.wh..wh..opq", b""),
    # a hardlink to a lower file, and a chain inside the layer
    hard("etc/hostname.again", "etc/hostname.hard"),
    tf.file_("opt/a", b"a\n", pax={"SCHILY.xattr.user.a": "1"}),
    hard("opt/b", "opt/a"),
    hard("opt/c", "opt/b"),
    # directory merge: upper attributes and xattrs, lower children
    tf.dir_("var/mail/", 0o2770, gid=12, pax={"SCHILY.xattr.user.mail": "upper"}),
    tf.file_("var/mail/new", b"mail\n"),
    # a parent no layer declares, over a lower fifo
    tf.file_("run/fifo/child", b"implicit parent over a fifo\n"),
]


@pytest.fixture(scope="module")
def base_tar(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    root = tf.make_tree(tmp_path_factory.mktemp("base") / "tree")
    return tf.gnu_tar(root, "posix")


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    v = tmp_path / "victim"
    (v / "sub").mkdir(parents=True)
    (v / "secret").write_bytes(b"do not touch\n")
    (v / "sub/inner").write_bytes(b"nor this\n")
    os.symlink("secret", v / "link")
    os.chmod(v / "secret", 0o640)
    os.setxattr(v / "secret", "user.v", b"1")
    return v


# ------------------------------------------------------------------------------------------------
# Correctness
# ------------------------------------------------------------------------------------------------


def without_overlay_xattrs(tree: dict[str, Info]) -> dict[str, Info]:
    """The view as materialize writes it: overlayfs control xattrs left out."""
    out: dict[str, Info] = {}
    for path, info in tree.items():
        info = dict(info)
        if "xattrs" in info:
            info["xattrs"] = {
                k: v for k, v in info["xattrs"].items() if not k.startswith("trusted.overlay.")
            }
        out[path] = info
    return out


@pytest.mark.root
def test_materialize_equals_the_view(store: ls.Store, base_tar: bytes, tmp_path: Path) -> None:
    """Every field of every path (devices, owners, big ids, setuid, sticky, ns mtimes, every
    xattr, symlink targets, hardlinks as one inode), for one layer and for two."""
    base = store.import_tar(base_tar)
    upper = layer_of(store, UPPER)
    kinds: set[str] = set()
    for n, image in enumerate([store.stack([base]), store.stack([base, upper])]):
        dest = tmp_path / f"out{n}"
        if image.exists("/etc/os-release"):
            # The layer's overlay xattr is data: never written where overlayfs would obey it.
            with pytest.warns(ls.LayerstoreWarning, match="trusted.overlay.opaque"):
                report = store.materialize(image, dest)
        else:
            report = store.materialize(image, dest)
        expected, got = without_overlay_xattrs(view_tree(image)), disk_tree(dest)
        assert_same(without(expected, "ino"), without(got, "ino"), ("view", "disk"))
        assert groups(got) == groups(expected)
        assert report["entries"] == len(expected)
        inodes = {i["ino"]: len(i.get("data", b"")) for i in got.values()}
        assert report["bytes"] == sum(inodes.values())  # a hardlinked file is written once
        assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # nothing left beside
        root_meta = os.lstat(dest)
        assert stat.S_IMODE(root_meta.st_mode) == image.stat("/").mode
        kinds |= {i["kind"] for i in got.values()}
    # the kinds the fixture must exercise were all there
    assert kinds == {"file", "dir", "symlink", "char", "block", "fifo"}
    assert ["/etc/hostname.again", "/etc/hostname.hard"] in groups(got)
    assert ["/opt/a", "/opt/b", "/opt/c"] in groups(got)
    assert got["/var/mail"]["xattrs"] == {"user.mail": b"upper"}
    assert "/etc/os-release" not in got
    assert got["/run/fifo/child"]["data"] == b"implicit parent over a fifo\n"


def test_materialize_refuses_an_existing_dest(store: ls.Store, tmp_path: Path) -> None:
    image = store.stack([layer_of(store, [tf.file_("f", b"x")])])
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_bytes(b"")
    os.symlink("missing", tmp_path / "dangling")
    for name in ("dir", "file", "dangling"):
        with pytest.raises(FileExistsError):
            store.materialize(image, tmp_path / name)
    assert sorted(os.listdir(tmp_path)) == ["dangling", "dir", "file", "store"]
    assert os.listdir(tmp_path / "dir") == []


def test_a_failed_materialize_leaves_nothing(store: ls.Store, tmp_path: Path) -> None:
    files = {
        f"d{i:03d}/f{j}": tf.rand_bytes(i * 100 + j, 3000) for i in range(40) for j in range(40)
    }
    image = store.stack([store.import_tar(tf.simple_tar(files))])
    calls = []

    def progress(done: int) -> None:
        calls.append(done)
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        store.materialize(image, tmp_path / "out", progress=progress)
    assert calls
    assert sorted(os.listdir(tmp_path)) == ["store"]
    # and the same call without the failure works, with one writer thread too
    store.materialize(image, tmp_path / "out", max_threads=1)
    assert (tmp_path / "out/d007/f3").read_bytes() == files["d007/f3"]


def test_big_files_are_written_in_pieces_by_every_thread(store: ls.Store, tmp_path: Path) -> None:
    """Files of 16 MiB and more are written piecewise at their offsets, in parallel: the bytes,
    times, mode and a hardlink to one come out as tar -x makes them, with one thread or two;
    a corrupt chunk in the middle of one is an IntegrityError that leaves nothing."""
    big = tf.rand_bytes(7, 40 << 20)
    members = [
        tf.dir_("models/", 0o755),
        tf.file_("models/a.bin", big, 0o640),
        tf.file_("models/b.bin", big[: 17 << 20] + b"tail", 0o600),
        hard("models/a.link", "models/a.bin"),
        tf.file_("small", b"small\n"),
    ]
    data = tf.py_tar(tarfile.PAX_FORMAT, members=members)
    image = store.stack([store.import_tar(data)])
    expected = tmp_path / "tar-x"
    expected.mkdir()
    subprocess.run(
        ["tar", "--numeric-owner", "-C", str(expected), "-xf", "-"], input=data, check=True
    )
    for threads in (None, 1):
        out = tmp_path / f"out-{threads}"
        store.materialize(image, out, max_threads=threads)
        for name in ("models/a.bin", "models/b.bin", "models/a.link", "small"):
            assert (out / name).read_bytes() == (expected / name).read_bytes(), name
        got, want = disk_tree(out), disk_tree(expected)
        assert_same(without(want, "ino"), without(got, "ino"), ("tar -x", "materialize"))
        assert groups(got) == groups(want)
    packs = sorted((Path(store.path) / "packs").iterdir(), key=lambda p: p.stat().st_size)
    raw = bytearray(packs[-1].read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    packs[-1].write_bytes(bytes(raw))
    with pytest.raises(ls.IntegrityError):
        store.materialize(image, tmp_path / "broken")
    assert not [p for p in os.listdir(tmp_path) if "broken" in p]


def test_materialize_removes_what_a_killed_one_left(store: ls.Store, tmp_path: Path) -> None:
    """A materialize killed mid-way leaves its private directory beside `dest`; the next
    materialize to that `dest` removes it when its owner is gone, and keeps a live one's."""
    image = store.stack([layer_of(store, [tf.file_("f", b"x")])])
    gone = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True, check=True)
    dead_pid = int(gone.stdout)
    abandoned = tmp_path / f".out.layerstore-tmp-{dead_pid}-12345-abc"
    (abandoned / "deep/er").mkdir(parents=True)
    (abandoned / "deep/er/file").write_bytes(b"half written")
    os.symlink("/", abandoned / "deep/root")  # removed as a link, never followed
    me = os.getpid()
    live = tmp_path / f".out.layerstore-tmp-{me}-{start_time(me)}-def"
    live.mkdir()
    untagged = tmp_path / ".out.layerstore-tmp-0123456789abcdef"  # an older build's: no owner
    untagged.mkdir()
    other = tmp_path / f".other.layerstore-tmp-{dead_pid}-12345-abc"  # another destination's
    other.mkdir()
    store.materialize(image, tmp_path / "out")
    assert (tmp_path / "out/f").read_bytes() == b"x"
    assert not abandoned.exists()
    assert live.is_dir() and untagged.is_dir() and other.is_dir()
    assert Path("/etc/passwd").exists()


@pytest.mark.root
def test_apply_equals_materialize_of_the_pushed_stack(
    store: ls.Store, base_tar: bytes, tmp_path: Path
) -> None:
    base = store.import_tar(base_tar)
    # the markers after the entries they must not hide, and before: the order does not matter
    markers = [m for m in UPPER if "/.wh." in "/" + m.name]
    others = [m for m in UPPER if m not in markers]
    for n, members in enumerate([markers + others, others + markers]):
        upper = layer_of(store, members)
        applied, fresh = tmp_path / f"applied{n}", tmp_path / f"fresh{n}"
        with pytest.warns(ls.LayerstoreWarning, match="trusted.overlay.opaque"):
            store.materialize(store.stack([base]), applied)
        report = store.apply(upper, applied)
        store.materialize(store.stack([base, upper]), fresh)
        a, b = disk_tree(applied), disk_tree(fresh)
        assert_same(without(b, "ino"), without(a, "ino"), ("materialize", "apply"))
        assert groups(a) == groups(b)
        assert report["removed"] > 0
        assert os.lstat(applied).st_mtime_ns == os.lstat(fresh).st_mtime_ns


@pytest.fixture(scope="module")
def overlayfs() -> None:
    reason = ou.overlay_unsupported_reason()
    if reason:
        pytest.fail(f"the overlayfs oracle is unavailable: {reason}")


@pytest.mark.root
def test_materialize_and_apply_match_overlayfs(
    store: ls.Store, tmp_path: Path, overlayfs: None
) -> None:
    """Random stacks (overlayutil's generator): the materialized tree is the kernel's merged
    view, and applying the top layer onto the materialized rest gives it too."""
    gen = ou.StackGen()
    failures = []
    for i in range(OVERLAY_STACKS):
        recipes, views = gen.stack(random.Random(f"materialize-1/{i}"))
        work = tmp_path / f"s{i}"
        work.mkdir()
        layers = [store.import_tar(ou.recipe_tar(r)) for r in recipes]
        lowers = []
        for r, v in zip(recipes, views, strict=True):
            ou.write_lower(r, v, work / f"L{r.index}")
            lowers.append(work / f"L{r.index}")
        with ou.overlay_mount(lowers, work / "merged") as merged:
            kernel = ou.kernel_tree(merged)
        store.materialize(store.stack(layers), work / "out")
        store.materialize(store.stack(layers[:-1]), work / "applied")
        store.apply(layers[-1], work / "applied")
        for name in ("out", "applied"):
            lines = ou.diff_trees(kernel, ou.kernel_tree(work / name), ("kernel", name))
            if lines:
                failures.append(f"stack {i} ({name}):\n" + "\n".join(lines[:20]))
        shutil.rmtree(work)
    assert not failures, "\n\n".join(failures[:3])
    assert gen.features["hardlink"] > 0 and gen.features["opaque_dir"] > 0


def test_apply_semantics(store: ls.Store, tmp_path: Path) -> None:
    """Whiteouts and opaque markers hide only what was there; implicit parents replace
    non-directories (a symlink is replaced, never followed); a directory whose children change
    keeps its times; duplicates: the last wins; a hardlink to a path this layer whites out keeps
    the lower inode."""
    dest = tmp_path / "dest"
    (dest / "keep").mkdir(parents=True)
    (dest / "opq").mkdir()
    (dest / "opq/old").write_bytes(b"old")
    (dest / "gone").write_bytes(b"gone")
    (dest / "linked").write_bytes(b"lower inode")
    (dest / "keep/f").write_bytes(b"f")
    os.symlink("keep", dest / "sym")
    os.utime(dest / "keep", ns=(5, 123_456_789))
    layer = layer_of(
        store,
        [
            tf.file_("opq/new", b"new"),
            tf.file_("opq/.wh..wh..opq", b""),
            tf.file_(".wh.gone", b""),
            tf.file_("gone", b"recreated"),
            tf.file_("sym/inside", b"x"),
            tf.file_("keep/g", b"g"),
            tf.file_("dup", b"first"),
            tf.file_("dup", b"second"),
            hard("link-to-lower", "linked"),
            tf.file_(".wh.linked", b""),
        ],
    )
    store.apply(layer, dest)
    assert sorted(os.listdir(dest / "opq")) == ["new"]
    assert (dest / "gone").read_bytes() == b"recreated"
    assert (dest / "sym").is_dir() and not (dest / "sym").is_symlink()
    assert os.listdir(dest / "sym") == ["inside"]
    assert os.lstat(dest / "sym").st_mtime_ns == 0  # implicit: mtime 0, 0755
    assert stat.S_IMODE(os.lstat(dest / "sym").st_mode) == 0o755
    assert sorted(os.listdir(dest / "keep")) == ["f", "g"]
    assert os.lstat(dest / "keep").st_mtime_ns == 123_456_789
    assert (dest / "dup").read_bytes() == b"second"
    assert not (dest / "linked").exists()
    assert (dest / "link-to-lower").read_bytes() == b"lower inode"
    assert not [n for n in os.listdir(dest) if n.startswith(".layerstore")]


def test_apply_replaces_the_xattrs_of_a_merged_directory(store: ls.Store, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    (dest / "d").mkdir(parents=True)
    os.setxattr(dest / "d", "user.old", b"1")
    os.setxattr(dest / "d", "user.both", b"lower")
    layer = layer_of(store, [tf.dir_("d/", 0o700, pax={"SCHILY.xattr.user.both": "upper"})])
    store.apply(layer, dest)
    assert {k: os.getxattr(dest / "d", k) for k in os.listxattr(dest / "d")} == {
        "user.both": b"upper"
    }
    assert stat.S_IMODE(os.lstat(dest / "d").st_mode) == 0o700


def test_apply_needs_an_existing_directory(store: ls.Store, tmp_path: Path) -> None:
    layer = layer_of(store, [tf.file_("f", b"x")])
    with pytest.raises(FileNotFoundError):
        store.apply(layer, tmp_path / "missing")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        store.apply(layer, tmp_path / "file")


# ------------------------------------------------------------------------------------------------
# Hostile layers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "../victim/x",
        "a/../../victim/x",
        "etc/.wh..",
        "etc/.wh.",
        ".wh...",
        "a/.wh.b/c",
        "a/.wh..wh..opq/c",
    ],
)
def test_impossible_names_are_rejected_at_import(store: ls.Store, name: str) -> None:
    with pytest.raises(ls.InvalidLayerError):
        layer_of(store, [tf.file_(name, b"x")])
    assert store.layers() == []


def test_hardlink_out_of_the_layer_is_rejected_at_import(store: ls.Store) -> None:
    with pytest.raises(ls.InvalidLayerError, match="escapes"):
        layer_of(store, [hard("h", "../victim/secret")])


def hostile_cases(victim: Path) -> dict[str, list[list[tf.Member]]]:
    """Stacks (lists of layers) that try to write through symlinks or links to the victim."""
    chain = [sym(f"l{i}", f"l{i + 1}") for i in range(45)] + [sym("l45", "../victim")]
    deep = [tf.dir_("d/" * k) for k in range(1, 9)] + [sym("d/" * 8 + "up", "../" * 9 + "victim")]
    return {
        "symlink-then-file": [[sym("evil", "../victim"), tf.file_("evil/pwned", b"x")]],
        "abs-symlink-then-dir": [
            [sym("evil", str(victim)), tf.dir_("evil/sub/"), tf.file_("evil/sub/inner", b"x")]
        ],
        "lower-symlink-upper-file": [
            [sym("evil", "../victim")],
            [tf.file_("evil/secret", b"overwritten"), tf.file_("evil/pwned", b"x")],
        ],
        "lower-abs-symlink-upper-dir": [
            [sym("evil", str(victim))],
            [tf.dir_("evil/", 0o777), tf.dir_("evil/sub/", 0o777)],
        ],
        "symlink-chain": [chain, [tf.file_("l0/secret", b"x"), tf.file_("l0/sub/inner", b"x")]],
        "deep-dotdot-symlink": [deep, [tf.file_("d/" * 8 + "up/secret", b"x")]],
        "whiteouts-through-symlink": [
            [sym("evil", "../victim"), sym("abs", str(victim))],
            [
                tf.file_("evil/.wh.secret", b""),
                tf.file_("abs/.wh.sub", b""),
                tf.file_("abs/sub/.wh..wh..opq", b""),
                tf.file_("evil/.wh..wh..opq", b""),
            ],
        ],
        "file-replaced-by-symlink": [
            [tf.dir_("d/"), sym("d", "../victim"), tf.file_("d/secret", b"x")]
        ],
        "dir-then-symlink-then-file": [
            [tf.dir_("d/"), tf.file_("d/f", b"f")],
            [sym("d", str(victim)), tf.file_("d/secret", b"x")],
        ],
        "absolute-member-names": [[tf.file_(str(victim / "secret"), b"x")]],
    }


HOSTILE = [
    "symlink-then-file",
    "abs-symlink-then-dir",
    "lower-symlink-upper-file",
    "lower-abs-symlink-upper-dir",
    "symlink-chain",
    "deep-dotdot-symlink",
    "whiteouts-through-symlink",
    "file-replaced-by-symlink",
    "dir-then-symlink-then-file",
    "absolute-member-names",
]


def import_hostile(store: ls.Store, members: list[tf.Member]) -> ls.Layer:
    if any(m.name.startswith("/") for m in members):
        with pytest.warns(ls.LayerstoreWarning, match="leading '/'"):
            return layer_of(store, members)
    return layer_of(store, members)


# Layers writing beneath a symlink they made themselves: refused at import (their last layer).
REFUSED_AT_IMPORT = {
    "symlink-then-file",
    "abs-symlink-then-dir",
    "file-replaced-by-symlink",
    "dir-then-symlink-then-file",
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_layers_stay_inside(
    store: ls.Store, tmp_path: Path, victim: Path, case: str
) -> None:
    stack = hostile_cases(victim)[case]
    if case in REFUSED_AT_IMPORT:
        lower = [import_hostile(store, m) for m in stack[:-1]]
        with pytest.raises(ls.InvalidLayerError, match="a symlink this layer created"):
            import_hostile(store, stack[-1])
        assert sorted(x.id for x in store.layers()) == sorted(x.id for x in lower)
        return
    layers = [import_hostile(store, m) for m in stack]
    before = snapshot(victim)
    image = store.stack(layers)
    store.materialize(image, tmp_path / "dest")
    assert snapshot(victim) == before
    assert_same(
        without(view_tree(image), "ino"),
        without(disk_tree(tmp_path / "dest"), "ino"),
        ("view", "disk"),
    )
    # the same layers applied one by one onto a directory
    (tmp_path / "applied").mkdir()
    for layer in layers:
        store.apply(layer, tmp_path / "applied")
        assert snapshot(victim) == before
    assert_same(
        without(disk_tree(tmp_path / "dest"), "ino"),
        without(disk_tree(tmp_path / "applied"), "ino"),
        ("materialize", "apply"),
    )


def test_hostile_hardlinks_are_typed_errors(store: ls.Store, tmp_path: Path, victim: Path) -> None:
    """Hardlinks to an absolute path, and through a symlink to the victim: no such path in the
    view (materialize) or beneath the target (apply), so InvalidLayerError, and no link made."""
    before = snapshot(victim)
    with pytest.warns(ls.LayerstoreWarning):
        absolute = layer_of(store, [hard("h", str(victim / "secret"))])
    through = [
        layer_of(store, [sym("evil", "../victim")]),
        layer_of(store, [hard("h", "evil/secret")]),
    ]
    with pytest.raises(ls.InvalidLayerError):
        store.stack([absolute])
    with pytest.raises(ls.InvalidLayerError):
        store.stack(through)
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink("/", dest / "tmp")  # the absolute target, made relative, runs into this symlink
    with pytest.raises(ls.InvalidLayerError):
        store.apply(absolute, dest)
    store.apply(through[0], dest)
    with pytest.raises(ls.InvalidLayerError):
        store.apply(through[1], dest)
    assert snapshot(victim) == before
    assert sorted(os.listdir(dest)) == ["evil", "tmp"]


def swapper(
    parent: Path, prefix: str, victim: Path, stop: threading.Event, swaps: list[int]
) -> None:
    """Keep replacing the directories just below any ``prefix*`` directory in ``parent`` by
    symlinks to the victim (the attack on a check-then-use implementation)."""
    while not stop.is_set():
        for top in [parent / n for n in os.listdir(parent) if n.startswith(prefix)]:
            try:
                names = os.listdir(top)
            except OSError:
                continue
            for n in names:
                d = top / n
                try:
                    if d.is_symlink() or not d.is_dir():
                        continue
                    os.rename(d, top / f"{n}.moved")
                    os.symlink(victim, d)
                    swaps[0] += 1
                except OSError:
                    pass


def race_layer(store: ls.Store) -> ls.Layer:
    files = {f"d{i:03d}/s/f{j:02d}": b"x" * 100 for i in range(60) for j in range(40)}
    files.update({f"d{i:03d}/secret": b"pwned" for i in range(60)})
    return store.import_tar(tf.simple_tar(files))


def test_materialize_races_with_symlink_swaps(
    store: ls.Store, tmp_path: Path, victim: Path
) -> None:
    layer = race_layer(store)
    image = store.stack([layer])
    before = snapshot(victim)
    swaps = [0]
    outcomes = []
    for attempt in range(5):
        stop = threading.Event()
        t = threading.Thread(target=swapper, args=(tmp_path, ".dest", victim, stop, swaps))
        t.start()
        try:
            store.materialize(image, tmp_path / "dest")
            outcomes.append("ok")
        except OSError as e:
            outcomes.append(type(e).__name__)
        finally:
            stop.set()
            t.join()
        assert snapshot(victim) == before, f"attempt {attempt}: {outcomes}"
        shutil.rmtree(tmp_path / "dest", ignore_errors=True)
        assert not [n for n in os.listdir(tmp_path) if n.startswith(".dest")]
    assert swaps[0] > 0, "the attacker never got in: the test proves nothing"


def test_apply_races_with_symlink_swaps(store: ls.Store, tmp_path: Path, victim: Path) -> None:
    layer = race_layer(store)
    base = store.stack(
        [store.import_tar(tf.simple_tar({f"d{i:03d}/s/old": b"" for i in range(60)}))]
    )
    before = snapshot(victim)
    swaps = [0]
    for attempt in range(5):
        dest = tmp_path / f"dest{attempt}"
        store.materialize(base, dest)
        stop = threading.Event()
        t = threading.Thread(target=swapper, args=(tmp_path, dest.name, victim, stop, swaps))
        t.start()
        try:
            store.apply(layer, dest)
        except OSError:
            pass
        finally:
            stop.set()
            t.join()
        assert snapshot(victim) == before, f"attempt {attempt}"
    assert swaps[0] > 0, "the attacker never got in: the test proves nothing"


@pytest.mark.root
def test_without_root_devices_are_skipped_with_a_warning(store: ls.Store) -> None:
    """The documented policy without privileges, checked in a forked child that drops to uid
    65534: owners are the caller's, char/block devices and ``trusted.*`` xattrs are skipped with
    a LayerstoreWarning each, fifos and everything else are written."""
    layer = layer_of(
        store,
        [
            tf.file_("f", b"data", 0o4755, uid=1000, gid=1000, pax={"SCHILY.xattr.user.k": "v"}),
            tf.file_("t", b"", pax={"SCHILY.xattr.trusted.k": "v"}),
            tf.Member("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
            tf.Member("dev/sda", tarfile.BLKTYPE, mode=0o660, devmajor=8, devminor=0),
            tf.Member("fifo", tarfile.FIFOTYPE, mode=0o640),
        ],
    )
    work = Path(tempfile.mkdtemp(prefix="layerstore-nonroot-"))
    try:
        os.chmod(work, 0o777)
        store_path = work / "store"
        shutil.copytree(store.path, store_path)
        for dirpath, _, filenames in os.walk(store_path):
            for n in [".", *filenames]:
                os.chown(os.path.join(dirpath, n), 65534, 65534)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            status = 1
            try:
                os.close(read)
                os.setegid(65534)
                os.seteuid(65534)
                child_store = ls.Store(store_path)
                image = child_store.stack([child_store.layer(layer.id)])
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    report = child_store.materialize(image, work / "out")
                messages = [str(w.message) for w in caught if w.category is ls.LayerstoreWarning]
                os.write(write, json.dumps({"report": report, "warnings": messages}).encode())
                status = 0
            finally:
                os._exit(status)
        os.close(write)
        with os.fdopen(read, "rb") as f:
            result = json.loads(f.read() or b"{}")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, result
        out = work / "out"
        assert sorted(os.listdir(out)) == ["dev", "f", "fifo", "t"]
        assert os.listdir(out / "dev") == []
        assert stat.S_ISFIFO(os.lstat(out / "fifo").st_mode)
        st = os.lstat(out / "f")
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o4755)
        assert os.getxattr(out / "f", "user.k") == b"v"
        assert os.listxattr(out / "t") == []
        assert result["report"]["skipped"] == 3
        text = "\n".join(result["warnings"])
        assert "/dev/null" in text and "/dev/sda" in text and "trusted.k" in text
    finally:
        shutil.rmtree(work)


def read_beneath(root: Path, rel: str) -> bytes:
    """A file's bytes, opened one component at a time (its path is beyond PATH_MAX)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        *dirs, name = rel.split("/")
        for c in dirs:
            nfd = os.open(c, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        leaf = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
        try:
            return os.read(leaf, 1 << 16)
        finally:
            os.close(leaf)
    finally:
        os.close(fd)


def test_a_view_deeper_than_path_max_materializes_and_applies(
    store: ls.Store, tmp_path: Path
) -> None:
    """A path of 5,000 bytes (20 components of 250): materialize and apply open directories a
    stretch of components at a time. (Before: OSError [Errno 36] opening the deep directory.)"""
    deep = "/".join(f"d{i:03}" + "x" * 246 for i in range(20))
    assert len(deep) > os.pathconf("/", "PC_PATH_MAX")
    members = [tf.file_(f"{deep}/leaf", b"deep\n", mode=0o600), tf.file_("top", b"top\n")]
    layer = store.import_tar(tf.py_tar(tarfile.PAX_FORMAT, members=members))
    out = tmp_path / "out"
    store.materialize(store.stack([layer]), out)
    assert read_beneath(out, f"{deep}/leaf") == b"deep\n"
    assert (out / "top").read_bytes() == b"top\n"
    applied = tmp_path / "applied"
    applied.mkdir()
    store.apply(layer, applied)
    assert read_beneath(applied, f"{deep}/leaf") == b"deep\n"


def test_a_name_beyond_name_max_is_an_os_error_naming_the_entry(
    store: ls.Store, tmp_path: Path
) -> None:
    """A 300-byte name imports (a tar may hold it) but no Linux file system takes it: materialize
    raises OSError ENAMETOOLONG naming the entry, and leaves nothing at (or beside) dest."""
    name = "n" * 300
    members = [tf.file_("a/ok", b"ok\n"), tf.file_(f"a/{name}", b"long\n")]
    layer = store.import_tar(tf.py_tar(tarfile.PAX_FORMAT, members=members))
    out = tmp_path / "out"
    with pytest.raises(OSError, match=f"/a/{name}") as info:
        store.materialize(store.stack([layer]), out)
    assert info.value.errno == 36  # ENAMETOOLONG
    assert sorted(os.listdir(tmp_path)) == ["store"]
