"""The stack read API: stacks built from tars made with ``tarfile``, read without extracting them.

Every method of ``ls.Stack`` is exercised against what the tars say (independent parsers and
hashers: ``tarfile``, ``hashlib``, the ``b3sum`` CLI, ``os.walk`` over an extracted copy), with the
symlink rules of the image root, the error types of the ``os`` module, tags that outlive the
process, the depth limit, non-UTF-8 names and the structural sharing of the union index.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import shutil
import stat
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import layerstore as ls
import pytest
import tarfixtures as tf
from storeutil import b3sum, run_python

PAX = tarfile.PAX_FORMAT
MTIME = 1_600_000_000
BIG_SIZE = 3 * (1 << 20) + 12345  # several chunks at every chunk size the store allows


def sym(name: str, target: str, **kw: Any) -> tf.Member:
    return tf.Member(name, tarfile.SYMTYPE, linkname=target, mode=0o777, **kw)


def hard(name: str, target: str, **kw: Any) -> tf.Member:
    return tf.Member(name, tarfile.LNKTYPE, linkname=target, **kw)


def whiteout(path: str) -> tf.Member:
    parent, _, name = path.rpartition("/")
    return tf.file_(f"{parent}/.wh.{name}" if parent else f".wh.{name}", b"")


def opaque(directory: str) -> tf.Member:
    return tf.file_(f"{directory}/.wh..wh..opq", b"")


def import_members(store: ls.Store, members: list[tf.Member]) -> ls.Layer:
    return store.import_tar(tf.py_tar(PAX, members=members))


def chain_id(diff_ids: list[str]) -> str:
    """OCI ChainID, computed here from the definition in the image spec."""
    chain = diff_ids[0]
    for diff_id in diff_ids[1:]:
        chain = "sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest()
    return chain


def fields(st: Any) -> tuple[Any, ...]:
    """A stat result's fields, for comparing two results of the same lookup."""
    return (
        st.path,
        st.kind,
        st.mode,
        st.uid,
        st.gid,
        st.size,
        st.mtime_ns,
        st.linkname,
        st.rdev,
        st.devmajor,
        st.devminor,
        dict(st.xattrs),
        st.layer,
        st.digest,
        st.implicit,
        st.st_mode,
    )


# --------------------------------------------------------------------------------------------
# A three-layer image with every kind of entry, shared by the read tests
# --------------------------------------------------------------------------------------------

BIG = tf.rand_bytes("big", BIG_SIZE)
UTC = b"TZif2 fake zone data\n"
PASSWD = b"root:x:0:0:root:/root:/bin/sh\n"
CHAIN = 30  # symlink hops (Linux follows up to 40)


def layer0_members() -> list[tf.Member]:
    m = [
        tf.dir_("etc/", mtime=MTIME + 1),
        tf.file_("etc/hostname", b"base\n"),
        tf.file_("etc/passwd", PASSWD, uname="root", gname="root"),
        hard("etc/hostname.hard", "etc/hostname"),
        tf.dir_("etc/gone/"),
        tf.file_("etc/gone/child", b"hidden later\n"),
        tf.dir_("etc/olddir/"),
        tf.file_("etc/olddir/child", b"whited out with its directory\n"),
        tf.dir_("etc/cfg/", 0o750),
        tf.file_("etc/cfg/a", b"a\n"),
        tf.file_("etc/cfg/b", b"b\n"),
        sym("etc/localtime", "/usr/share/zoneinfo/UTC"),
        tf.dir_("usr/"),
        tf.dir_("usr/lib/"),
        tf.file_("usr/lib/libc.so.6", b"\x7fELF libc\n", 0o755),
        sym("lib", "usr/lib"),
        tf.file_("usr/share/zoneinfo/UTC", UTC),  # usr/share and usr/share/zoneinfo are implicit
        tf.file_("usr/bin/passwd", b"\x7fELF passwd", 0o4755),
        tf.dir_("tmp/", 0o1777),
        tf.Member("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
        tf.Member("dev/sda", tarfile.BLKTYPE, mode=0o660, devmajor=8, devminor=0, gid=6),
        tf.Member("run/initctl", tarfile.FIFOTYPE, mode=0o600),
        tf.file_("home/user/notes", b"owned\n", 0o640, uid=1000, gid=100),
        tf.file_(
            "srv/xattrs",
            b"with xattrs\n",
            pax={
                "SCHILY.xattr.user.comment": "hello",
                "SCHILY.xattr.security.capability": os.fsdecode(b"\x01\x00\x00\x02\xff\x80"),
            },
        ),
        tf.file_("srv/ns-mtime", b"ns\n", pax={"mtime": "1600000000.123456789"}),
        tf.dir_("data/"),
        tf.file_("data/big.bin", BIG),
        # symlinks: a chain, loops, `..` past the root, dangling, into directories
        sym("links/c1", "c2"),
        sym("links/c2", "/links/c3"),
        sym("links/c3", "../etc/./hostname"),
        sym("links/loop1", "loop2"),
        sym("links/loop2", "/links/loop1"),
        sym("links/self", "self"),
        sym("links/up", "../../../../../../etc/hostname"),
        sym("links/abs-up", "/../../etc/passwd"),
        sym("links/dangling", "/nonexistent/file"),
        sym("links/etcdir", "/etc"),
        sym("links/via-lib", "../lib/libc.so.6"),
        sym("links/long0", "long1"),
    ]
    m += [sym(f"links/long{i}", f"long{i + 1}") for i in range(1, CHAIN)]
    m.append(sym(f"links/long{CHAIN}", "/etc/passwd"))
    return m


def layer1_members() -> list[tf.Member]:
    return [
        tf.file_("etc/hostname", b"layer1\n", 0o600),
        whiteout("etc/gone"),
        whiteout("etc/olddir"),
        tf.file_("etc/cfg/c", b"c\n"),
        opaque("etc/cfg"),  # after an entry of its own layer: that entry survives
        tf.file_("data/new.txt", b"new\n"),
        hard("etc/passwd.lower", "etc/passwd", uname="root", gname="root"),  # a lower-layer target
    ]


def layer2_members() -> list[tf.Member]:
    return [
        tf.dir_("etc/", 0o700, uid=5, gid=6, mtime=MTIME + 2),
        tf.file_("etc/gone", b"back as a file\n"),
        tf.file_("opt/tool/bin", b"#!/bin/sh\n", 0o755),
    ]


@dataclass
class Image:
    store: ls.Store
    path: Path
    layers: list[ls.Layer]
    stack: ls.Stack


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    path = tmp_path_factory.mktemp("stack-api") / "store"
    store = ls.Store(path)
    layers = [
        import_members(store, members())
        for members in (layer0_members, layer1_members, layer2_members)
    ]
    yield Image(store, path, layers, store.stack(layers))
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Stacks: layers, ChainID, push
# --------------------------------------------------------------------------------------------


def test_stack_layers_len_and_chain_id(image: Image) -> None:
    stack = image.stack
    assert isinstance(stack, ls.Stack)
    assert len(stack) == 3
    assert [layer.id for layer in stack.layers] == [layer.id for layer in image.layers]
    assert all(isinstance(layer, ls.Layer) for layer in stack.layers)
    diff_ids = [layer.diff_id for layer in image.layers]
    assert stack.chain_id == chain_id(diff_ids)
    assert image.store.stack(image.layers[:1]).chain_id == diff_ids[0]
    assert image.store.stack(image.layers[:2]).chain_id == chain_id(diff_ids[:2])
    # ids are accepted in place of Layer objects
    by_id = image.store.stack([layer.id for layer in image.layers])
    assert by_id.chain_id == stack.chain_id
    assert [layer.id for layer in by_id.layers] == [layer.id for layer in image.layers]


def test_push_returns_a_new_stack_and_leaves_the_old_one(image: Image) -> None:
    store = image.store
    base = store.stack(image.layers[:2])
    before = (len(base), [x.id for x in base.layers], base.chain_id, base.listdir("/etc"))
    top = base.push(image.layers[2])
    assert isinstance(top, ls.Stack)
    assert (len(base), [x.id for x in base.layers], base.chain_id, base.listdir("/etc")) == before
    assert not base.exists("/opt/tool/bin")
    assert base.stat("/etc").mode == 0o755
    assert top.exists("/opt/tool/bin")
    assert len(top) == 3
    assert top.chain_id == image.stack.chain_id
    assert [x.id for x in top.layers] == [x.id for x in image.layers]
    # push by id too, and a second push on the same parent gives an equal, independent stack
    again = base.push(image.layers[2].id)
    assert again.chain_id == top.chain_id
    assert list(again.walk()) == list(top.walk())
    extra = import_members(store, [tf.file_("etc/extra", b"extra\n")])
    four = top.push(extra)
    assert four.read_bytes("/etc/extra") == b"extra\n"
    assert not top.exists("/etc/extra")
    assert len(top) == 3 and len(four) == 4


# --------------------------------------------------------------------------------------------
# stat: every field, every kind
# --------------------------------------------------------------------------------------------


def test_stat_regular_file(image: Image) -> None:
    st = image.stack.stat("/etc/hostname")
    assert isinstance(st, ls.Stat)
    assert st.path == "/etc/hostname"
    assert st.kind == "file"
    assert st.mode == 0o600
    assert st.st_mode == stat.S_IFREG | 0o600
    assert (st.uid, st.gid, st.size) == (0, 0, len(b"layer1\n"))
    assert st.mtime_ns == MTIME * 10**9
    assert st.layer == 1
    assert st.implicit is False
    assert st.digest == b3sum(b"layer1\n")
    assert st.xattrs == {}


def test_stat_modes_owners_mtimes_xattrs(image: Image) -> None:
    s = image.stack
    su = s.stat("/usr/bin/passwd")
    assert su.mode == 0o4755 and su.st_mode == stat.S_IFREG | 0o4755
    tmp = s.stat("/tmp")
    assert tmp.kind == "dir" and tmp.mode == 0o1777 and tmp.st_mode == stat.S_IFDIR | 0o1777
    notes = s.stat("/home/user/notes")
    assert (notes.uid, notes.gid, notes.mode) == (1000, 100, 0o640)
    assert s.stat("/srv/ns-mtime").mtime_ns == 1_600_000_000_123_456_789
    assert s.stat("/srv/xattrs").xattrs == {
        "user.comment": b"hello",
        "security.capability": b"\x01\x00\x00\x02\xff\x80",
    }
    assert s.stat("/etc/passwd").layer == 0
    assert s.stat("/etc/cfg/c").layer == 1


def test_stat_devices_and_fifo(image: Image) -> None:
    s = image.stack
    null = s.stat("/dev/null")
    assert null.kind == "char"
    assert (null.devmajor, null.devminor, null.rdev) == (1, 3, os.makedev(1, 3))
    assert null.st_mode == stat.S_IFCHR | 0o666
    assert null.digest is None
    sda = s.stat("/dev/sda")
    assert sda.kind == "block" and sda.gid == 6
    assert (sda.devmajor, sda.devminor, sda.rdev) == (8, 0, os.makedev(8, 0))
    assert sda.st_mode == stat.S_IFBLK | 0o660
    fifo = s.stat("/run/initctl")
    assert fifo.kind == "fifo" and fifo.st_mode == stat.S_IFIFO | 0o600


def test_stat_implicit_directories(image: Image) -> None:
    s = image.stack
    for path in ("/usr/share", "/usr/share/zoneinfo", "/dev", "/links", "/opt", "/opt/tool"):
        st = s.stat(path)
        assert st.kind == "dir", path
        assert st.implicit is True, path
        assert st.layer is None, path
        assert (st.mode, st.uid, st.gid, st.mtime_ns) == (0o755, 0, 0, 0), path
        assert st.st_mode == stat.S_IFDIR | 0o755, path
    declared = s.stat("/usr")
    assert declared.implicit is False and declared.layer == 0


def test_directory_merge_takes_the_upper_attributes(image: Image) -> None:
    etc = image.stack.stat("/etc")
    assert etc.kind == "dir" and etc.layer == 2
    assert (etc.mode, etc.uid, etc.gid, etc.mtime_ns) == (0o700, 5, 6, (MTIME + 2) * 10**9)
    # ... and the union of the children of every layer
    want = ["cfg", "gone", "hostname", "hostname.hard", "localtime", "passwd", "passwd.lower"]
    assert image.stack.listdir("/etc") == want


def test_root(image: Image) -> None:
    s = image.stack
    st = s.stat("/")
    assert st.kind == "dir"
    assert stat.S_ISDIR(st.st_mode)
    assert s.exists("/")
    want = ["data", "dev", "etc", "home", "lib", "links", "opt", "run", "srv", "tmp", "usr"]
    assert s.listdir() == s.listdir("/") == want


def test_path_spellings(image: Image) -> None:
    s = image.stack
    assert s.stat("/etc/passwd").path == "/etc/passwd"
    want = fields(s.stat("/etc/passwd"))[1:]
    for spelling in ("//etc//passwd", "/etc/./passwd", "/./etc/passwd", b"/etc/passwd"):
        assert fields(s.stat(spelling))[1:] == want, spelling
    assert s.listdir("/etc/") == s.listdir("/etc")


def test_whiteouts_and_opaques_in_the_view(image: Image) -> None:
    s = image.stack
    assert s.stat("/etc/gone").kind == "file"
    assert s.read_bytes("/etc/gone") == b"back as a file\n"
    assert not s.exists("/etc/gone/child")
    assert not s.exists("/etc/olddir")
    assert not s.exists("/etc/olddir/child")
    assert s.listdir("/etc/cfg") == ["c"]
    assert s.stat("/etc/cfg").mode == 0o750  # the lower directory stays, its children do not
    for dirpath, dirnames, filenames in s.walk():
        for name in dirnames + filenames:
            assert not name.startswith(".wh."), f"{dirpath}/{name}"


def test_hardlinks_read_their_targets(image: Image) -> None:
    s = image.stack
    # same-layer link: its layer's content, not what a later layer put at the target's path
    assert s.read_bytes("/etc/hostname.hard") == b"base\n"
    same = s.stat("/etc/hostname.hard")
    assert same.kind == "file" and same.size == 5 and same.digest == b3sum(b"base\n")
    lower = s.stat("/etc/passwd.lower")
    assert lower.kind == "file" and lower.layer == 1
    assert lower.digest == s.stat("/etc/passwd").digest == b3sum(PASSWD)
    assert s.read_bytes("/etc/passwd.lower") == PASSWD


def test_hardlinks_whose_targets_are_hidden_later(store: ls.Store) -> None:
    l0 = import_members(store, [tf.file_("t", b"T0"), hard("same", "t")])
    l1 = import_members(store, [hard("lower", "same")])
    l2 = import_members(store, [whiteout("t"), whiteout("same"), tf.file_("x", b"x")])
    l3 = import_members(store, [tf.file_("t", b"replaced")])
    stack = store.stack([l0, l1, l2, l3])
    assert stack.listdir("/") == ["lower", "t", "x"]
    assert stack.read_bytes("/lower") == b"T0"
    assert stack.stat("/lower").layer == 1
    assert stack.stat("/lower").digest == b3sum(b"T0")
    assert stack.read_bytes("/t") == b"replaced"
    assert store.stack([l0, l3]).read_bytes("/same") == b"T0"


def test_hardlinks_to_non_regular_files(tmp_path: Path) -> None:
    """GNU tar archives a hardlinked symlink (``cp -al`` trees have them) as a hardlink to the
    symlink; the link shares the target's inode, so it is a symlink too. Likewise for fifos and
    devices (as tarfile writes them)."""
    root = tmp_path / "tree"
    (root / "d").mkdir(parents=True)
    os.symlink("target", root / "d/link")
    os.link(root / "d/link", root / "d/link2", follow_symlinks=False)
    data = tf.gnu_tar(root, "gnu")
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        assert t.getmember("./d/link2").type == tarfile.LNKTYPE
    store = ls.Store(tmp_path / "store")
    stack = store.stack([store.import_tar(data)])
    for name in ("link", "link2"):
        st = stack.stat(f"/d/{name}", follow_symlinks=False)
        assert (st.kind, st.linkname) == ("symlink", "target"), name
        assert stack.readlink(f"/d/{name}") == "target"
    assert stack.listdir("/d") == ["link", "link2"]
    special = import_members(
        store,
        [
            tf.Member("fifo", tarfile.FIFOTYPE, mode=0o600),
            hard("fifo2", "fifo", mode=0o600),
            tf.Member("null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
            hard("null2", "null", mode=0o666),
        ],
    )
    stack = store.stack([special])
    assert stack.stat("/fifo2").kind == "fifo"
    null2 = stack.stat("/null2")
    assert (null2.kind, null2.devmajor, null2.devminor) == ("char", 1, 3)


def test_missing_paths_raise_file_not_found(image: Image) -> None:
    s = image.stack
    calls = [
        lambda: s.stat("/nope"),
        lambda: s.stat("/nope", follow_symlinks=False),
        lambda: s.stat("/etc/nope/deeper"),
        lambda: s.listdir("/nope"),
        lambda: s.read_bytes("/nope"),
        lambda: s.open("/nope"),
        lambda: s.readlink("/nope"),
        lambda: s.stat("/etc/gone/child"),
        lambda: s.stat("/etc/cfg/a"),
        lambda: s.path("/nope").stat(),
        lambda: s.path("/nope").read_bytes(),
    ]
    for i, call in enumerate(calls):
        with pytest.raises(FileNotFoundError) as info:
            call()
        assert info.value.errno == errno.ENOENT, i
    assert not s.exists("/nope")
    assert not s.exists("/nope", follow_symlinks=False)


def test_wrong_kind_errors(image: Image) -> None:
    s = image.stack
    with pytest.raises(NotADirectoryError):
        s.listdir("/etc/hostname")
    with pytest.raises((NotADirectoryError, FileNotFoundError)):
        s.stat("/etc/hostname/below")
    with pytest.raises(IsADirectoryError):
        s.read_bytes("/etc")
    with pytest.raises(IsADirectoryError):
        s.open("/etc")
    with pytest.raises(OSError) as info:
        s.readlink("/etc/hostname")
    assert info.value.errno == errno.EINVAL


# --------------------------------------------------------------------------------------------
# Content: read_bytes, open (seekable, lazy), digests
# --------------------------------------------------------------------------------------------


def test_read_bytes_and_digest_of_a_multi_chunk_file(image: Image) -> None:
    s = image.stack
    assert s.read_bytes("/data/big.bin") == BIG
    st = s.stat("/data/big.bin")
    assert st.size == BIG_SIZE
    assert st.digest == b3sum(BIG)
    layer0 = {e.path: e for e in image.layers[0].entries()}
    assert layer0["/data/big.bin"].chunk_count >= 4, "the file must span several chunks"
    assert s.read_bytes("/etc/passwd") == PASSWD
    assert s.read_bytes("/usr/share/zoneinfo/UTC") == UTC


def test_open_seek_and_partial_reads(image: Image) -> None:
    rng = random.Random(3)
    with image.stack.open("/data/big.bin") as f:
        assert f.readable()
        assert f.seekable()
        assert f.tell() == 0
        assert f.read(10) == BIG[:10]
        assert f.tell() == 10
        for _ in range(200):
            offset = rng.randrange(BIG_SIZE + 100)
            n = rng.choice([0, 1, 7, 4096, 65_537, 300_000, 1 << 20])
            assert f.seek(offset) == offset
            assert f.read(n) == BIG[offset : offset + n], (offset, n)
            assert f.tell() == offset + len(BIG[offset : offset + n])
        assert f.seek(-100, io.SEEK_END) == BIG_SIZE - 100
        assert f.read() == BIG[-100:]
        assert f.read(10) == b""
        f.seek(1000)
        assert f.seek(500, io.SEEK_CUR) == 1500
        assert f.read(10) == BIG[1500:1510]
        f.seek(BIG_SIZE + 10)
        assert f.read(10) == b""
        f.seek(2_000_000)
        buf = bytearray(100_000)
        assert f.readinto(buf) == 100_000
        assert bytes(buf) == BIG[2_000_000:2_100_000]
        f.seek(BIG_SIZE - 10)
        assert f.readinto(buf) == 10
        assert bytes(buf[:10]) == BIG[-10:]
        f.seek(12_345)
        assert f.read(-1) == BIG[12_345:]
    with pytest.raises(ValueError):
        f.read(1)


def test_open_is_buffered_reader_compatible(image: Image) -> None:
    raw = image.stack.open("/data/big.bin")
    with io.BufferedReader(raw, buffer_size=50_000) as f:
        assert f.read(3) == BIG[:3]
        assert f.peek(1)[:1] == BIG[3:4]
        f.seek(1_234_567)
        assert f.read(70_000) == BIG[1_234_567 : 1_234_567 + 70_000]
        out = io.BytesIO()
        f.seek(0)
        shutil.copyfileobj(f, out)
        assert out.getvalue() == BIG
    with image.stack.open("/etc/passwd") as f:
        assert f.read() == PASSWD
    with io.BufferedReader(image.stack.open("/etc/passwd")) as f:
        assert list(f) == [PASSWD]


def test_open_follows_symlinks_and_reads_empty_files(tmp_path: Path) -> None:
    store = ls.Store(tmp_path / "store")
    layer = import_members(store, [tf.file_("empty", b""), sym("link", "empty")])
    stack = store.stack([layer])
    with stack.open("/link") as f:
        assert f.read() == b""
        assert f.seek(0, io.SEEK_END) == 0
    assert stack.read_bytes("/empty") == b""
    assert stack.stat("/empty").digest == b3sum(b"")


# --------------------------------------------------------------------------------------------
# Symlinks resolve inside the image root
# --------------------------------------------------------------------------------------------


def test_absolute_symlink_targets_start_at_the_image_root(image: Image) -> None:
    s = image.stack
    st = s.stat("/etc/localtime")
    assert st.kind == "file" and st.size == len(UTC)
    assert st.path in ("/usr/share/zoneinfo/UTC", "/etc/localtime")
    assert s.read_bytes("/etc/localtime") == UTC
    link = s.stat("/etc/localtime", follow_symlinks=False)
    assert link.kind == "symlink"
    assert link.linkname == "/usr/share/zoneinfo/UTC"
    assert link.st_mode == stat.S_IFLNK | 0o777
    assert link.digest is None
    assert s.readlink("/etc/localtime") == "/usr/share/zoneinfo/UTC"
    assert s.read_bytes("/links/etcdir/passwd") == PASSWD
    assert s.listdir("/links/etcdir") == s.listdir("/etc")


def test_dotdot_stops_at_the_root(image: Image) -> None:
    s = image.stack
    assert s.read_bytes("/links/up") == b"layer1\n"
    assert s.read_bytes("/links/abs-up") == PASSWD
    assert s.stat("/links/up").layer == 1


def test_symlink_chains_and_directory_symlinks(image: Image) -> None:
    s = image.stack
    assert s.read_bytes("/links/c1") == b"layer1\n"
    assert fields(s.stat("/links/c1"))[1:] == fields(s.stat("/etc/hostname"))[1:]
    assert s.readlink("/links/c1") == "c2"
    assert s.readlink("/links/c2") == "/links/c3"
    assert s.read_bytes(f"/links/long{CHAIN}") == PASSWD
    assert s.read_bytes("/links/long0") == PASSWD  # CHAIN + 1 hops, fewer than Linux's 40
    # a directory symlink in the middle of a path is always followed
    assert s.read_bytes("/lib/libc.so.6") == b"\x7fELF libc\n"
    assert s.stat("/lib/libc.so.6", follow_symlinks=False).kind == "file"
    assert s.stat("/lib", follow_symlinks=False).kind == "symlink"
    assert s.stat("/lib").kind == "dir"
    assert s.listdir("/lib") == s.listdir("/usr/lib") == ["libc.so.6"]
    assert s.read_bytes("/links/via-lib") == b"\x7fELF libc\n"
    assert s.readlink("/links/etcdir/localtime") == "/usr/share/zoneinfo/UTC"
    # .. after a symlinked directory applies to the target (as in the kernel)
    assert s.read_bytes("/links/etcdir/../usr/lib/libc.so.6") == b"\x7fELF libc\n"


def test_symlink_loops_raise_eloop(image: Image) -> None:
    s = image.stack
    for path in ("/links/loop1", "/links/loop2", "/links/self", "/links/loop1/below"):
        with pytest.raises(OSError) as info:
            s.stat(path)
        assert info.value.errno == errno.ELOOP, path
        with pytest.raises(OSError) as info:
            s.read_bytes(path)
        assert info.value.errno == errno.ELOOP, path
        assert not s.exists(path), path
    assert s.stat("/links/loop1", follow_symlinks=False).kind == "symlink"
    assert s.exists("/links/self", follow_symlinks=False)
    assert s.readlink("/links/self") == "self"


def test_dangling_symlinks(image: Image) -> None:
    s = image.stack
    with pytest.raises(FileNotFoundError):
        s.stat("/links/dangling")
    assert not s.exists("/links/dangling")
    assert s.exists("/links/dangling", follow_symlinks=False)
    st = s.stat("/links/dangling", follow_symlinks=False)
    assert st.kind == "symlink" and st.linkname == "/nonexistent/file"


# --------------------------------------------------------------------------------------------
# stat_many, exists, listdir, walk
# --------------------------------------------------------------------------------------------


def test_stat_many_matches_stat_with_none_for_missing(image: Image) -> None:
    s = image.stack
    paths = [
        "/etc/hostname",
        "/missing",
        "/etc/localtime",
        "/usr/share",
        "/links/dangling",
        "/etc/gone/child",
        "/data/big.bin",
        "/etc/cfg/a",
        "/dev/null",
        "/lib/libc.so.6",
        "/",
    ]
    for follow in (True, False):
        got = s.stat_many(paths, follow_symlinks=follow)
        assert isinstance(got, list) and len(got) == len(paths)
        for path, st in zip(paths, got, strict=True):
            if not s.exists(path, follow_symlinks=follow):
                assert st is None, path
            else:
                assert st is not None, path
                assert fields(st) == fields(s.stat(path, follow_symlinks=follow)), path
    assert [st is None for st in s.stat_many(paths)] == [
        False,
        True,
        False,
        False,
        True,
        True,
        False,
        True,
        False,
        False,
        False,
    ]
    assert s.stat_many([]) == []
    assert s.stat_many(paths, follow_symlinks=False)[2].kind == "symlink"
    assert s.stat_many(("/etc/passwd",))[0].size == len(PASSWD)
    assert s.stat_many(iter(["/etc/passwd"]))[0].size == len(PASSWD)
    # Every spelling of a path gives the same result, path included (normalised spellings are
    # answered without copying the argument; the others are normalised first).
    spellings = [
        "/etc/passwd",
        "etc/passwd",
        b"/etc/passwd",
        PurePosixPath("/etc/passwd"),
        "//etc/./passwd",
    ]
    got = s.stat_many(spellings)
    assert [st.path for st in got] == ["/etc/passwd"] * len(spellings)
    assert all(fields(st) == fields(got[0]) for st in got)


def walk_reference(root: Path, top: Path) -> list[tuple[str, list[str], list[str]]]:
    """``os.walk`` over an extracted tree, sorted, with the paths made image-absolute."""
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        rel = "/" + os.path.relpath(dirpath, root)
        rel = "/" if rel == "/." else rel
        out.append((rel, list(dirnames), sorted(filenames)))
    return out


WALK_MEMBERS = [
    tf.dir_("a/"),
    tf.file_("a/f1", b"1"),
    tf.file_("a/f0", b"0"),
    tf.dir_("a/z/"),
    tf.dir_("a/b/"),
    tf.file_("a/b/deep", b"deep"),
    sym("a/to-b", "b"),
    sym("a/dangling", "nothing"),
    sym("a/to-file", "f1"),
    tf.file_("top", b"top"),
    tf.dir_("empty/"),
    tf.file_("m/n/o/p", b"implicit parents"),
    sym("loop", "loop"),
]


def test_walk_order_matches_os_walk(tmp_path: Path) -> None:
    store = ls.Store(tmp_path / "store")
    data = tf.py_tar(PAX, members=WALK_MEMBERS)
    stack = store.stack([store.import_tar(data)])
    root = tmp_path / "tree"
    root.mkdir()
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        t.extractall(root, filter="fully_trusted")
    want = walk_reference(root, root)
    got = [(d, list(dn), list(fn)) for d, dn, fn in stack.walk()]
    assert got == want
    assert got == [(d, list(dn), list(fn)) for d, dn, fn in stack.walk("/")]
    assert [(d, list(dn), list(fn)) for d, dn, fn in stack.walk("/a")] == walk_reference(
        root, root / "a"
    )
    for dirpath, dirnames, filenames in stack.walk():
        assert sorted(dirnames + filenames) == stack.listdir(dirpath)
    assert list(stack.walk("/missing")) == []


def test_walk_prunes_like_os_walk(tmp_path: Path) -> None:
    store = ls.Store(tmp_path / "store")
    stack = store.stack([store.import_tar(tf.py_tar(PAX, members=WALK_MEMBERS))])
    seen = []
    for dirpath, dirnames, _ in stack.walk():
        seen.append(dirpath)
        if dirpath == "/a":
            dirnames.remove("b")
    assert "/a/b" not in seen and "/a/z" in seen


def test_walk_of_the_image(image: Image) -> None:
    s = image.stack
    walked = list(s.walk())
    dirs = [d for d, _, _ in walked]
    assert dirs[0] == "/"
    assert "/etc/cfg" in dirs and "/usr/share/zoneinfo" in dirs
    assert "/lib" not in dirs and "/etc/olddir" not in dirs
    # top-down pre-order with sorted directory names
    assert dirs == sorted(dirs, key=lambda d: [] if d == "/" else d.split("/")[1:])
    for dirpath, dirnames, filenames in walked:
        assert sorted(dirnames + filenames) == s.listdir(dirpath)
        assert dirnames == sorted(dirnames) and filenames == sorted(filenames)
        for name in dirnames:
            assert s.stat(os.path.join(dirpath, name)).kind == "dir"
        for name in filenames:
            assert not s.exists(os.path.join(dirpath, name)) or (
                s.stat(os.path.join(dirpath, name)).kind != "dir"
            )


def test_exists(image: Image) -> None:
    s = image.stack
    assert s.exists("/etc/hostname")
    assert s.exists("/usr/share")
    assert s.exists("/lib/libc.so.6")
    assert not s.exists("/etc/olddir")
    assert not s.exists("/etc/hostname/x")


# --------------------------------------------------------------------------------------------
# provenance
# --------------------------------------------------------------------------------------------


def test_provenance(image: Image) -> None:
    s = image.stack
    assert sorted(s.provenance("/etc/gone")) == [(0, "entry"), (1, "whiteout"), (2, "entry")]
    assert sorted(s.provenance("/etc/gone/child")) == [(0, "entry"), (1, "whiteout")]
    assert sorted(s.provenance("/etc/olddir/child")) == [(0, "entry"), (1, "whiteout")]
    assert sorted(s.provenance("/etc/cfg/a")) == [(0, "entry"), (1, "opaque")]
    assert sorted(s.provenance("/etc/cfg/c")) == [(1, "entry")]
    assert sorted(s.provenance("/etc/hostname")) == [(0, "entry"), (1, "entry")]
    assert sorted(s.provenance("/opt/tool/bin")) == [(2, "entry")]
    assert s.stat("/etc/gone").layer == max(i for i, _ in s.provenance("/etc/gone"))


# --------------------------------------------------------------------------------------------
# path(): the pathlib-like view
# --------------------------------------------------------------------------------------------


def test_path_api(image: Image) -> None:
    s = image.stack
    root = s.path()
    assert str(root) == "/"
    assert str(s.path("/")) == "/"
    etc = root / "etc"
    assert str(etc) == "/etc"
    assert etc.is_dir() and not etc.is_file() and not etc.is_symlink()
    host = etc / "hostname"
    assert str(host) == "/etc/hostname"
    assert host.name == "hostname"
    assert str(host.parent) == "/etc"
    assert str(host.parent.parent) == "/"
    assert host.is_file() and host.exists()
    assert host.read_bytes() == b"layer1\n"
    assert host.read_text() == "layer1\n"
    assert fields(host.stat()) == fields(s.stat("/etc/hostname"))
    # open() reads text by default, as pathlib and importlib's Traversable have it.
    with host.open("rb") as f:
        assert f.read() == b"layer1\n"
    with host.open() as text:
        assert text.read() == "layer1\n"
    assert str(s.path("/etc") / "cfg" / "c") == "/etc/cfg/c"
    assert sorted(p.name for p in etc.iterdir()) == s.listdir("/etc")
    assert all(str(p) == f"/etc/{p.name}" for p in etc.iterdir())
    local = s.path("/etc/localtime")
    assert local.is_symlink() and local.is_file()
    assert local.lstat().kind == "symlink"
    assert local.stat().kind == "file"
    assert str(local.readlink()) == "/usr/share/zoneinfo/UTC"
    assert local.read_bytes() == UTC
    assert s.path("/lib").is_dir() and s.path("/lib").is_symlink()
    missing = s.path("/etc/missing")
    assert not missing.exists() and not missing.is_file() and not missing.is_dir()
    assert not missing.is_symlink()
    dangling = s.path("/links/dangling")
    assert dangling.is_symlink() and not dangling.exists()
    assert s.path("/links/loop1").is_symlink()
    assert s.path("/srv/xattrs").read_text() == "with xattrs\n"
    # `..` after a symlinked directory: as the kernel (and pathlib, which keeps `..`) resolve it
    via = "/links/etcdir/../usr/lib/libc.so.6"
    assert s.read_bytes(via) == b"\x7fELF libc\n"
    assert s.path(via).read_bytes() == b"\x7fELF libc\n"
    assert (s.path("/links/etcdir") / ".." / "usr").is_dir()


# --------------------------------------------------------------------------------------------
# Tags: persistence across reopen and processes; untag; delete while tagged
# --------------------------------------------------------------------------------------------

CHILD = """
import json, sys
import layerstore as ls
store = ls.Store(sys.argv[1])
stack = store.get(sys.argv[2])
st = stack.stat(sys.argv[3])
print(json.dumps({"chain_id": stack.chain_id, "layers": [x.id for x in stack.layers],
                  "size": st.size, "layer": st.layer, "digest": st.digest,
                  "data": stack.read_bytes(sys.argv[3]).decode(),
                  "images": sorted(store.images())}))
"""


def test_tags_persist_across_reopen_and_processes(tmp_path: Path) -> None:
    path = tmp_path / "store"
    store = ls.Store(path)
    l0 = import_members(store, [tf.file_("etc/hostname", b"zero\n"), tf.file_("a", b"a")])
    l1 = import_members(store, [tf.file_("etc/hostname", b"one!\n")])
    stack = store.stack([l0, l1])
    store.tag(stack, "app:1")
    store.tag(store.stack([l0]), "base:latest")
    got = store.get("app:1")
    assert isinstance(got, ls.Stack)
    assert got.chain_id == stack.chain_id
    images = store.images()
    assert sorted(images) == ["app:1", "base:latest"]
    assert images["app:1"].chain_id == stack.chain_id
    assert images["base:latest"].chain_id == l0.diff_id
    del store, got, images, stack

    reopened = ls.Store(path)
    again = reopened.get("app:1")
    assert [x.id for x in again.layers] == [l0.id, l1.id]
    assert again.read_bytes("/etc/hostname") == b"one!\n"
    assert again.stat("/etc/hostname").layer == 1

    res = run_python(CHILD, str(path), "app:1", "/etc/hostname")
    assert res.returncode == 0, res.stderr
    child = json.loads(res.stdout)
    assert child == {
        "chain_id": chain_id([l0.diff_id, l1.diff_id]),
        "layers": [l0.id, l1.id],
        "size": 5,
        "layer": 1,
        "digest": b3sum(b"one!\n"),
        "data": "one!\n",
        "images": ["app:1", "base:latest"],
    }


def test_get_missing_tag(store: ls.Store) -> None:
    with pytest.raises(ls.NotFoundError):
        store.get("nothing:here")
    with pytest.raises(LookupError):
        store.get("nothing:here")
    assert store.images() == {}


def test_untag_and_delete(tmp_path: Path) -> None:
    path = tmp_path / "store"
    store = ls.Store(path)
    l0 = import_members(store, [tf.file_("base", b"base")])
    l1 = import_members(store, [tf.file_("top", b"top")])
    store.tag(store.stack([l0, l1]), "app:1")
    with pytest.raises(ls.ConflictError):
        store.delete(l1)
    with pytest.raises(ls.ConflictError):
        store.delete(l0.id)
    assert {x.id for x in store.layers()} == {l0.id, l1.id}
    assert store.get("app:1").read_bytes("/top") == b"top"
    store.untag("app:1")
    with pytest.raises(ls.NotFoundError):
        store.get("app:1")
    assert store.images() == {}
    # the untag is persistent
    with pytest.raises(ls.NotFoundError):
        ls.Store(path).get("app:1")
    store.delete(l1)
    assert {x.id for x in store.layers()} == {l0.id}
    with pytest.raises(ls.NotFoundError):
        store.layer(l1.id)
    assert store.fsck()["ok"]


def test_delete_refused_for_any_tagged_stack_using_the_layer(store: ls.Store) -> None:
    l0 = import_members(store, [tf.file_("base", b"base")])
    l1 = import_members(store, [tf.file_("top", b"top")])
    store.tag(store.stack([l0, l1]), "a:1")
    store.tag(store.stack([l0]), "b:1")
    store.untag("a:1")
    store.delete(l1)
    with pytest.raises(ls.ConflictError):
        store.delete(l0)
    store.untag("b:1")
    store.delete(l0)
    assert store.layers() == []


# --------------------------------------------------------------------------------------------
# Depth limit
# --------------------------------------------------------------------------------------------


def small_layers(store: ls.Store, n: int) -> list[ls.Layer]:
    return [import_members(store, [tf.file_(f"layer{i:03d}", b"%d" % i)]) for i in range(n)]


def test_default_depth_limit_is_127(store: ls.Store) -> None:
    assert store.settings["max_depth"] == 127
    layers = small_layers(store, 128)
    full = store.stack(layers[:127])
    assert len(full) == 127
    assert full.read_bytes("/layer126") == b"126"
    assert full.stat("/layer000").layer == 0
    with pytest.raises(ls.StackDepthError):
        store.stack(layers)
    with pytest.raises(ls.StackDepthError):
        full.push(layers[127])
    assert isinstance(ls.StackDepthError("x"), ls.LayerstoreError)


def test_configured_depth_limit(tmp_path: Path) -> None:
    store = ls.Store(tmp_path / "store", max_depth=3)
    layers = small_layers(store, 4)
    three = store.stack(layers[:3])
    with pytest.raises(ls.StackDepthError):
        three.push(layers[3])
    with pytest.raises(ls.StackDepthError):
        store.stack(layers)
    assert store.stack(layers[:2]).push(layers[3]).read_bytes("/layer003") == b"3"


# --------------------------------------------------------------------------------------------
# Non-UTF-8 names
# --------------------------------------------------------------------------------------------


def test_non_utf8_names_round_trip(tmp_path: Path) -> None:
    store = ls.Store(tmp_path / "store")
    d, f, link = b"d\xff", b"d\xff/caf\xe9.txt", b"l\xe9nk"
    layer = import_members(
        store,
        [
            tf.dir_(os.fsdecode(d) + "/"),
            tf.file_(os.fsdecode(f), b"latin-1\n"),
            sym(os.fsdecode(link), os.fsdecode(b"/" + f)),
            tf.file_(os.fsdecode(b"w\x80x"), b"bye\n"),
        ],
    )
    top = import_members(store, [whiteout(os.fsdecode(b"w\x80x"))])
    stack = store.stack([layer, top])
    assert stack.listdir("/") == sorted([os.fsdecode(d), os.fsdecode(link)])
    assert stack.listdir("/" + os.fsdecode(d)) == [os.fsdecode(b"caf\xe9.txt")]
    name = stack.listdir("/" + os.fsdecode(d))[0]
    assert os.fsencode(name) == b"caf\xe9.txt"
    path = "/" + os.fsdecode(f)
    st = stack.stat(path)
    assert os.fsencode(st.path) == b"/" + f
    assert stack.read_bytes(path) == b"latin-1\n"
    assert stack.read_bytes(b"/" + f) == b"latin-1\n"
    assert stack.read_bytes("/" + os.fsdecode(link)) == b"latin-1\n"
    assert os.fsencode(stack.readlink("/" + os.fsdecode(link))) == b"/" + f
    walked = list(stack.walk())
    assert walked[1][0] == "/" + os.fsdecode(d)
    assert [os.fsencode(n) for n in walked[1][2]] == [b"caf\xe9.txt"]
    assert not stack.exists("/" + os.fsdecode(b"w\x80x"))
    assert sorted(stack.provenance("/" + os.fsdecode(b"w\x80x"))) == [(0, "entry"), (1, "whiteout")]
    assert (stack.path("/" + os.fsdecode(d)) / os.fsdecode(b"caf\xe9.txt")).read_bytes() == (
        b"latin-1\n"
    )


# --------------------------------------------------------------------------------------------
# Structural sharing of the union index
# --------------------------------------------------------------------------------------------

PACKAGES = 400  # base: /usr/share/pkgNNN/{0..3}, 2,000 entries in 400 directories
PUSHES = 100


def test_pushes_share_the_base_index(tmp_path: Path) -> None:
    store = ls.Store(tmp_path / "store")
    members = [tf.dir_("usr/"), tf.dir_("usr/share/")]
    for p in range(PACKAGES):
        members.append(tf.dir_(f"usr/share/pkg{p:03d}/"))
        members += [tf.file_(f"usr/share/pkg{p:03d}/f{j}", b"%d-%d" % (p, j)) for j in range(4)]
    assert len(members) >= 2000
    base_layer = import_members(store, members)
    small = []
    for i in range(PUSHES):
        pkg = f"usr/share/pkg{(i * 37) % PACKAGES:03d}"
        small.append(
            import_members(
                store,
                [
                    tf.file_(f"{pkg}/new{i}", b"new %d" % i),
                    tf.file_(f"{pkg}/f0", b"changed %d" % i),
                    tf.file_(f"etc/conf{i}/a", b"a"),
                    tf.file_(f"etc/conf{i}/b", b"b"),
                ],
            )
        )
    start = ls.Stack.index_nodes()
    base = store.stack([base_layer])
    assert base.stat("/usr/share/pkg399/f3").size == len(b"399-3")
    base_nodes = ls.Stack.index_nodes() - start
    assert base_nodes >= PACKAGES, f"the base index has {base_nodes} directory nodes"

    before = ls.Stack.index_nodes()
    stacks = [base]
    for i, layer in enumerate(small):
        stacks.append(stacks[-1].push(layer))
        pkg = f"/usr/share/pkg{(i * 37) % PACKAGES:03d}"
        assert stacks[-1].read_bytes(f"{pkg}/f0") == b"changed %d" % i
        assert stacks[-1].exists(f"/etc/conf{i}/b")
    grown = ls.Stack.index_nodes() - before
    # Each push copies the directories on the paths it touches (/, usr, usr/share, pkgNNN, etc,
    # etc/confN: six) and shares everything else.
    touched = 6
    assert grown >= PUSHES, f"{grown} new nodes for {PUSHES} live stacks"
    assert grown < PUSHES * (touched + 4), f"{PUSHES} pushes grew the index by {grown} nodes"
    assert grown < PUSHES * base_nodes / 20, (grown, base_nodes)
    # the stacks are all still correct views
    assert stacks[0].listdir("/") == ["usr"]
    assert stacks[50].exists("/etc/conf49/a") and not stacks[50].exists("/etc/conf50/a")
    assert len(stacks[-1].listdir("/etc")) == PUSHES
    del stacks, base


# --------------------------------------------------------------------------------------------
# Real-world shapes: GNU tar layers, repeated layers, gc, bad arguments, threads
# --------------------------------------------------------------------------------------------


def test_gnu_tar_layers_with_dot_slash_names(tmp_path: Path) -> None:
    """Layers as `tar -C dir .` writes them: a "./" root entry, "./"-prefixed names, whiteouts and
    opaque markers as empty regular files (how docker-style builders leave them on disk)."""
    base, upper = tmp_path / "base", tmp_path / "upper"
    for d in ("etc/cfg", "var/cache/apt", "srv"):
        (base / d).mkdir(parents=True)
    (base / "etc/hostname").write_bytes(b"base\n")
    (base / "etc/cfg/old").write_bytes(b"old\n")
    (base / "var/cache/apt/pkg.bin").write_bytes(b"cache\n")
    (base / "srv/keep").write_bytes(b"keep\n")
    os.chmod(base, 0o711)
    for d in ("etc/cfg", "var/cache"):
        (upper / d).mkdir(parents=True)
    (upper / "etc/.wh.hostname").write_bytes(b"")
    (upper / "etc/cfg/.wh..wh..opq").write_bytes(b"")
    (upper / "etc/cfg/new").write_bytes(b"new\n")
    (upper / "var/cache/.wh.apt").write_bytes(b"")
    os.chmod(upper, 0o755)
    store = ls.Store(tmp_path / "store")
    layers = [store.import_tar(tf.gnu_tar(root, "gnu")) for root in (base, upper)]
    assert any(e.path == "/" for e in layers[0].entries())
    stack = store.stack(layers)
    root = stack.stat("/")
    assert root.kind == "dir" and root.mode == 0o755 and root.layer == 1
    assert store.stack(layers[:1]).stat("/").mode == 0o711
    assert stack.listdir("/") == ["etc", "srv", "var"]
    assert stack.listdir("/etc") == ["cfg"]
    assert stack.listdir("/etc/cfg") == ["new"]
    assert stack.listdir("/var/cache") == []
    assert stack.read_bytes("/srv/keep") == b"keep\n"
    assert sorted(stack.provenance("/etc/hostname")) == [(0, "entry"), (1, "whiteout")]


def test_a_layer_may_appear_twice(tmp_path: Path) -> None:
    """Real images repeat layers (the empty layer of metadata-only build steps, most often)."""
    path = tmp_path / "store"
    store = ls.Store(path)
    empty = store.import_tar(tf.py_tar(PAX, members=[]))
    a = import_members(store, [tf.file_("a", b"a")])
    b = import_members(store, [tf.file_("b", b"b"), whiteout("a")])
    layers = [a, empty, b, empty]
    stack = store.stack(layers)
    assert len(stack) == 4
    assert stack.chain_id == chain_id([x.diff_id for x in layers])
    assert stack.listdir("/") == ["b"]
    assert stack.stat("/b").layer == 2
    store.tag(stack, "repeat:1")
    again = ls.Store(path).get("repeat:1")
    assert [x.id for x in again.layers] == [x.id for x in layers]
    assert again.chain_id == stack.chain_id


def test_tagged_stacks_survive_gc(tmp_path: Path) -> None:
    path = tmp_path / "store"
    store = ls.Store(path)
    kept = import_members(store, [tf.file_("data/big.bin", BIG[: 1 << 20])])
    dropped = import_members(store, [tf.file_("data/other.bin", tf.rand_bytes("other", 300_000))])
    store.tag(store.stack([kept]), "kept:1")
    store.gc()
    assert ls.Store(path).get("kept:1").read_bytes("/data/big.bin") == BIG[: 1 << 20]
    store.delete(dropped)
    store.gc()
    fresh = ls.Store(path)
    assert fresh.get("kept:1").stat("/data/big.bin").digest == b3sum(BIG[: 1 << 20])
    assert fresh.get("kept:1").read_bytes("/data/big.bin") == BIG[: 1 << 20]
    assert fresh.fsck()["ok"]


def test_retag_moves_the_tag(store: ls.Store) -> None:
    a = import_members(store, [tf.file_("a", b"a")])
    b = import_members(store, [tf.file_("b", b"b")])
    store.tag(store.stack([a]), "app:1")
    store.tag(store.stack([a, b]), "app:1")
    assert len(store.get("app:1")) == 2
    assert sorted(store.images()) == ["app:1"]
    store.tag(store.stack([a]), "registry.example.com:5000/team/app:1.0-rc1")
    assert len(store.get("registry.example.com:5000/team/app:1.0-rc1")) == 1


def test_bad_arguments(store: ls.Store) -> None:
    a = import_members(store, [tf.file_("a", b"a")])
    stack = store.stack([a])
    missing = "blake3:" + "0" * 64
    with pytest.raises(ls.NotFoundError):
        store.stack([a, missing])
    with pytest.raises(ls.NotFoundError):
        stack.push(missing)
    for name in ("", "has space:1"):
        with pytest.raises(ValueError):
            store.tag(stack, name)
    with pytest.raises(ls.NotFoundError):
        store.untag("never:tagged")
    with pytest.raises(TypeError):
        stack.stat(42)  # type: ignore[arg-type]


def test_trailing_slash_follows_os_semantics(image: Image) -> None:
    """As os.stat/os.lstat: a trailing slash requires a directory and resolves a final symlink."""
    s = image.stack
    with pytest.raises(NotADirectoryError):
        s.stat("/etc/hostname/")
    with pytest.raises(NotADirectoryError):
        s.stat("/etc/hostname/", follow_symlinks=False)
    assert not s.exists("/etc/hostname/")
    assert s.stat("/lib/", follow_symlinks=False).kind == "dir"
    assert s.stat("/etc/").kind == "dir"


def test_concurrent_readers(image: Image) -> None:
    """Several threads reading one stack (separate file objects, shared Stack) see the right
    bytes."""
    s = image.stack

    def work(seed: int) -> bool:
        rng = random.Random(seed)
        with s.open("/data/big.bin") as f:
            for _ in range(30):
                at, n = rng.randrange(BIG_SIZE), rng.randrange(1, 200_000)
                f.seek(at)
                if f.read(n) != BIG[at : at + n]:
                    return False
        return s.read_bytes("/etc/passwd") == PASSWD and s.stat("/lib/libc.so.6").layer == 0

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(8)))
