"""Tar fixtures: real archives from GNU tar and Python's ``tarfile``, and ways to mangle them.

Everything here is deterministic (seeded ``random.Random``), so a failing test names bytes that
can be rebuilt. The helpers only write where they are told (a pytest tmp directory).

- :func:`make_tree` lays out a directory tree with every kind of entry a layer carries, and
  :func:`gnu_tar` archives it with ``tar --format=gnu|posix|ustar``.
- :func:`py_tar` builds a tar from ``TarInfo`` objects in GNU, PAX or USTAR format, with the
  oddities real layers contain (duplicates, whiteouts, opaque markers, non-UTF-8 names, xattrs).
- :func:`walk` lists the header blocks of an archive; the ``with_*`` functions rewrite an archive
  in the ways other producers differ (checksum text, padding, trailers, base-256 numbers).
- :func:`expected_entries` turns what ``tarfile`` reads into the fields ``layer.entries()`` must
  report, so the tests compare against an independent parser.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import random
import stat
import subprocess
import tarfile
from collections.abc import Iterable
from pathlib import Path

import zstandard

IS_ROOT = os.geteuid() == 0
BLOCK = 512
RECORD = 10240
# A fixed base time, so archives do not depend on when the tests run.
EPOCH_NS = 1_600_000_000_000_000_000


def rand_bytes(seed: int | str, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def text_bytes(seed: int | str, n: int) -> bytes:
    """Compressible, text-like data."""
    rng = random.Random(seed)
    words = [b"layer", b"store", b"chunk", b"pack", b"tar", b"blake3", b"zstd", b"entry", b"\n"]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" "
    return bytes(out[:n])


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


# --------------------------------------------------------------------------------------------
# Directory trees and GNU tar
# --------------------------------------------------------------------------------------------

LONG_DIR = "usr/share/" + "d" * 60  # with a 70-byte file name: > 100 bytes, splittable for ustar
LONG_FILE = LONG_DIR + "/" + "f" * 66 + ".txt"
LONG_BASENAME = "opt/" + "n" * 150  # a component > 100 bytes: GNU/PAX only
VERY_LONG = "opt/" + "/".join(f"level{i:02d}-" + "x" * 24 for i in range(9)) + "/leaf.bin"


def make_tree(root: Path, *, seed: int = 0, ustar: bool = False) -> Path:
    """Create a tree with files (empty, small, multi-chunk), long names, nested directories, a
    symlink, a hardlink, a fifo, devices (root), setuid/setgid/sticky modes, owners (root),
    xattrs (``user.*``, and ``trusted.*`` as root) and nanosecond mtimes.

    ``ustar=True`` leaves out what ustar cannot encode (names over 255 bytes or with a component
    over 100, long link targets, ids over 0o7777777)."""
    assert len(LONG_FILE) > 100 and len(VERY_LONG) > 255
    rng = random.Random(seed)
    root.mkdir(parents=True)

    def write(rel: str, data: bytes, mode: int = 0o644) -> Path:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.chmod(p, mode)
        return p

    write("etc/hostname", b"layerstore\n")
    write("etc/empty", b"")
    write("etc/os-release", text_bytes(seed, 3000))
    write("usr/lib/big.bin", rng.randbytes(300_000))
    write("usr/share/doc/readme.txt", text_bytes(seed + 1, 50_000))
    write(LONG_FILE, b"long name\n")
    write("usr/bin/su", b"#!/bin/sh\n", 0o4755)
    os.link(root / "etc/hostname", root / "etc/hostname.hard")
    (root / "usr/bin/sh").symlink_to("dash")
    for d, mode in (("tmp", 0o1777), ("var/mail", 0o2775), ("srv/empty-dir", 0o700)):
        (root / d).mkdir(parents=True)
        os.chmod(root / d, mode)
    (root / "run").mkdir()
    os.mkfifo(root / "run/fifo", 0o600)
    if not ustar:
        write(LONG_BASENAME, b"long base name\n")
        write(VERY_LONG, rng.randbytes(1000))
        (root / "usr/bin/long-link").symlink_to("../" + "t" * 150)
    if IS_ROOT:
        (root / "dev").mkdir()
        os.mknod(root / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(root / "dev/loop0", stat.S_IFBLK | 0o660, os.makedev(7, 0))
        write("home/user/file", b"owned\n")
        os.chown(root / "home/user/file", 1000, 1000)
        os.chown(root / "home/user", 1000, 100)
        if not ustar:
            write("home/big-ids", b"ids past the octal range\n")
            os.chown(root / "home/big-ids", 3_000_000, 4_000_000)
        os.setxattr(root / "etc/os-release", "trusted.overlay.opaque", b"y")
        os.setxattr(root / "var/mail", "trusted.note", b"\x00\x01\xfe\xff")
    os.setxattr(root / "etc/hostname", "user.comment", b"hello xattr")
    # binary, with a NUL and high bytes (a newline in a value is tested on its own)
    os.setxattr(root / "usr/lib/big.bin", "user.binary", b"\x00\x01" + bytes(range(0x80, 0x100)))
    os.setxattr(root / "tmp", "user.empty", b"")

    # nanosecond mtimes, children before parents (writing a child changes its parent's mtime)
    paths = sorted(root.rglob("*"), key=lambda p: (-len(p.parts), str(p)))
    for i, p in enumerate([*paths, root]):
        t = EPOCH_NS + i * 1_000_000_000 + rng.randrange(1, 1_000_000_000)
        os.utime(p, ns=(t, t), follow_symlinks=False)
    return root


def gnu_tar(src: Path, fmt: str) -> bytes:
    """``tar --format=FMT --numeric-owner --sort=name`` of ``src`` (xattrs with posix)."""
    args = ["tar", f"--format={fmt}", "--numeric-owner", "--sort=name"]
    if fmt == "posix":
        args += ["--xattrs", "--xattrs-include=*"]
    args += ["-C", str(src), "-cf", "-", "."]
    res = subprocess.run(args, capture_output=True, check=False)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    return res.stdout


# --------------------------------------------------------------------------------------------
# Python tarfile
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Member:
    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mtime: float = 1_600_000_000
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    pax: dict[str, str] = dataclasses.field(default_factory=dict)

    def tarinfo(self) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(self.name)
        ti.type = self.type
        ti.size = len(self.data) if self.type in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
        ti.mode = self.mode
        ti.uid, ti.gid, ti.uname, ti.gname = self.uid, self.gid, self.uname, self.gname
        ti.mtime = self.mtime
        ti.linkname = self.linkname
        ti.devmajor, ti.devminor = self.devmajor, self.devminor
        ti.pax_headers = dict(self.pax)
        return ti


def dir_(name: str, mode: int = 0o755, **kw: object) -> Member:
    return Member(name, tarfile.DIRTYPE, mode=mode, **kw)  # type: ignore[arg-type]


def file_(name: str, data: bytes, mode: int = 0o644, **kw: object) -> Member:
    return Member(name, tarfile.REGTYPE, data, mode=mode, **kw)  # type: ignore[arg-type]


NON_UTF8_NAME = os.fsdecode(b"srv/caf\xe9-\xff.txt")


def py_members(fmt: int, seed: int = 0) -> list[Member]:
    """The members :func:`py_tar` writes for a format: everything the format can encode."""
    rng = random.Random(seed)
    m = [
        dir_("etc/", mtime=1_600_000_001),
        file_("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", uname="root", gname="root"),
        file_("etc/empty", b""),
        file_("etc/dup", b"first version\n"),
        Member("etc/localtime", tarfile.SYMTYPE, linkname="/usr/share/zoneinfo/UTC", mode=0o777),
        Member("etc/passwd-", tarfile.LNKTYPE, linkname="etc/passwd"),
        dir_("dev/"),
        Member("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
        Member("dev/sda", tarfile.BLKTYPE, mode=0o660, devmajor=8, devminor=0, gid=6),
        Member("run/initctl", tarfile.FIFOTYPE, mode=0o600),
        dir_("tmp/", 0o1777),
        dir_("var/mail/", 0o2775, uid=8, gid=8),
        file_("usr/bin/passwd", b"\x7fELF passwd", 0o4755),
        file_("usr/lib/libbig.so", rng.randbytes(300_000), 0o755),
        file_("usr/share/doc/README", text_bytes(seed, 40_000)),
        file_("var/.wh.foo", b""),
        dir_("var/cache/"),
        file_("var/cache/.wh..wh..opq", b""),
        dir_("var/.wh..wh.plnk/", 0o700),
        file_("etc/dup", b"second version, longer than the first\n", 0o600),
        file_("usr/share/" + "d" * 60 + "/" + "f" * 66 + ".txt", b"split into prefix/name\n"),
    ]
    if fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        m += [
            file_("opt/" + "a" * 120 + ".txt", b"component over 100 bytes\n"),
            file_(VERY_LONG, rng.randbytes(700)),
            Member("opt/long-link", tarfile.SYMTYPE, linkname="../" + "t" * 150, mode=0o777),
            Member("opt/long-hardlink", tarfile.LNKTYPE, linkname=VERY_LONG),
            file_(NON_UTF8_NAME, b"latin-1 name\n"),
            file_("srv/big-ids", b"ids\n", uid=10**9, gid=3_000_000),
        ]
    if fmt == tarfile.PAX_FORMAT:
        m += [
            file_(
                "srv/xattrs",
                b"with xattrs\n",
                pax={
                    "SCHILY.xattr.user.x": "value",
                    "SCHILY.xattr.security.capability": os.fsdecode(b"\x01\x00\x00\x02\xff\x80"),
                    "SCHILY.xattr.trusted.overlay.opaque": "y",
                },
            ),
            file_("srv/ns-mtime", b"nanoseconds\n", pax={"mtime": "1600000000.123456789"}),
            file_("srv/negative-mtime", b"before 1970\n", mtime=-86_400),
            file_("srv/unicode-\u00e9\u4e2d.txt", b"utf-8 name\n", uname="\u00e9l\u00e8ve"),
        ]
    return m


def py_tar(fmt: int, seed: int = 0, members: Iterable[Member] | None = None) -> bytes:
    """A tar written by Python's tarfile in ``fmt`` (tarfile.GNU_FORMAT/PAX_FORMAT/USTAR_FORMAT)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8") as t:
        for mem in members if members is not None else py_members(fmt, seed):
            ti = mem.tarinfo()
            t.addfile(ti, io.BytesIO(mem.data) if ti.size else None)
    return buf.getvalue()


def simple_tar(files: dict[str, bytes], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A tar of regular files (and their implied directories, not listed)."""
    return py_tar(fmt, members=[file_(name, data) for name, data in files.items()])


# --------------------------------------------------------------------------------------------
# Header walking and mangling
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Header:
    offset: int
    typeflag: bytes
    size: int

    @property
    def data_offset(self) -> int:
        return self.offset + BLOCK


def _num(field: bytes) -> int:
    if field[0] & 0x80:  # base-256
        n = int.from_bytes(field, "big", signed=False)
        n &= (1 << (8 * len(field) - 1)) - 1
        if field[0] & 0x40:
            n -= 1 << (8 * len(field) - 1)
        return n
    text = field.split(b"\0", 1)[0].strip()
    return int(text or b"0", 8)


def walk(data: bytes) -> tuple[list[Header], int]:
    """Every header block (extension headers included) and the offset of the first zero block."""
    out = []
    off = 0
    while True:
        block = data[off : off + BLOCK]
        assert len(block) == BLOCK, f"no end-of-archive marker (offset {off})"
        if block == bytes(BLOCK):
            return out, off
        typeflag = block[156:157]
        size = _num(block[124:136])
        if typeflag in (b"1", b"2", b"3", b"4", b"5", b"6"):
            size = 0
        out.append(Header(off, typeflag, size))
        off += BLOCK + padded(size)


def is_extension(h: Header) -> bool:
    return h.typeflag in (b"x", b"g", b"L", b"K")


def chksum_sums(block: bytes) -> tuple[int, int]:
    b = block[:148] + b" " * 8 + block[156:]
    unsigned = sum(b)
    signed = sum(x - 256 if x >= 128 else x for x in b)
    return unsigned, signed


CHECKSUM_STYLES = {
    # name: (formatter of the 8-byte field, use the signed sum)
    "nul-space": (lambda n: b"%06o\0 " % n, False),  # GNU tar, tarfile
    "seven-nul": (lambda n: b"%07o\0" % n, False),  # Go archive/tar, Rust tar crate
    "seven-space": (lambda n: b"%07o " % n, False),
    "leading-spaces": (lambda n: b"%6o\0 " % n, False),  # old Unix tar
    "no-padding": (lambda n: (b"%o" % n).ljust(8, b"\0"), False),
    "signed": (lambda n: b"%06o\0 " % (n & 0o777777), True),  # Sun tar's signed sum
}


def set_checksum(block: bytearray, style: str = "nul-space") -> None:
    fmt, signed = CHECKSUM_STYLES[style]
    unsigned, signed_sum = chksum_sums(bytes(block))
    field = fmt(signed_sum if signed else unsigned)
    assert len(field) == 8, field
    block[148:156] = field


def with_checksum_style(data: bytes, style: str) -> bytes:
    out = bytearray(data)
    for h in walk(data)[0]:
        blk = out[h.offset : h.offset + BLOCK]
        set_checksum(blk, style)
        out[h.offset : h.offset + BLOCK] = blk
    return bytes(out)


def with_nonzero_padding(data: bytes, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    out = bytearray(data)
    n = 0
    for h in walk(data)[0]:
        start = h.data_offset + h.size
        end = h.data_offset + padded(h.size)
        if end > start:
            out[start:end] = bytes(rng.randrange(1, 256) for _ in range(end - start))
            n += 1
    assert n > 0, "no member with padding"
    return bytes(out)


def end_of_entries(data: bytes) -> int:
    return walk(data)[1]


def without_record_padding(data: bytes) -> bytes:
    end = end_of_entries(data)
    return data[: end + 2 * BLOCK]


def with_lone_zero_block(data: bytes) -> bytes:
    return data[: end_of_entries(data) + BLOCK]


def with_garbage_after_fields(data: bytes, seed: int = 0) -> bytes:
    """Bytes after the NUL that ends name/linkname/uname/gname (tarfile stops at the NUL)."""
    rng = random.Random(seed)
    out = bytearray(data)
    for h in walk(data)[0]:
        if is_extension(h):
            continue
        blk = out[h.offset : h.offset + BLOCK]
        for start, length in ((0, 100), (157, 100), (265, 32), (297, 32)):
            field = blk[start : start + length]
            end = field.find(b"\0")
            if 0 <= end < length - 2:
                junk = bytes(rng.randrange(33, 127) for _ in range(length - end - 1))
                blk[start + end + 1 : start + length] = junk
        set_checksum(blk)
        out[h.offset : h.offset + BLOCK] = blk
    return bytes(out)


def base256(n: int, width: int) -> bytes:
    if n < 0:
        return ((1 << (8 * width)) + n).to_bytes(width, "big")
    raw = bytearray(n.to_bytes(width, "big"))
    raw[0] |= 0x80
    return bytes(raw)


def with_base256_fields(data: bytes) -> bytes:
    """Rewrite every member's uid, gid, size and mtime as base-256 numbers (GNU's encoding)."""
    out = bytearray(data)
    for h in walk(data)[0]:
        if is_extension(h):
            continue
        blk = out[h.offset : h.offset + BLOCK]
        for start, width in ((108, 8), (116, 8), (124, 12), (136, 12)):
            blk[start : start + width] = base256(_num(bytes(blk[start : start + width])), width)
        set_checksum(blk)
        out[h.offset : h.offset + BLOCK] = blk
    return bytes(out)


def with_header_byte_flipped(data: bytes, header_index: int) -> tuple[bytes, Header]:
    """Flip one byte of a header's name field, leaving the checksum stale."""
    h = [h for h in walk(data)[0] if not is_extension(h)][header_index]
    out = bytearray(data)
    out[h.offset + 5] ^= 0x01
    return bytes(out), h


# --------------------------------------------------------------------------------------------
# Compression
# --------------------------------------------------------------------------------------------


def gzip_single(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


def gzip_multi(data: bytes, parts: int = 3) -> bytes:
    step = -(-len(data) // parts)
    return b"".join(gzip.compress(data[i : i + step], mtime=0) for i in range(0, len(data), step))


def zstd_single(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)


def zstd_multi(data: bytes, parts: int = 3) -> bytes:
    step = -(-len(data) // parts)
    c = zstandard.ZstdCompressor(level=1)
    return b"".join(c.compress(data[i : i + step]) for i in range(0, len(data), step))


def zstd_decompress(blob: bytes) -> bytes:
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True)
    return reader.read()


# --------------------------------------------------------------------------------------------
# What layer.entries() must say, according to tarfile
# --------------------------------------------------------------------------------------------

_KINDS = {
    tarfile.REGTYPE: "file",
    tarfile.AREGTYPE: "file",
    tarfile.CONTTYPE: "file",
    tarfile.LNKTYPE: "hardlink",
    tarfile.SYMTYPE: "symlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.DIRTYPE: "dir",
    tarfile.FIFOTYPE: "fifo",
}


def norm(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    assert ".." not in parts
    return "/" + "/".join(parts)


def pax_time_ns(text: str) -> int:
    neg = text.startswith("-")
    secs, _, frac = text.lstrip("-").partition(".")
    ns = int(secs) * 10**9 + int((frac + "0" * 9)[:9])
    return -ns if neg else ns


def expected_entry(ti: tarfile.TarInfo) -> dict[str, object]:
    base = norm(ti.name).rsplit("/", 1)[-1]
    if base == ".wh..wh..opq":
        kind = "opaque"
    elif base.startswith(".wh.") and not base.startswith(".wh..wh."):
        kind = "whiteout"
    else:
        kind = _KINDS.get(ti.type, "other")
    has_data = ti.type not in (b"1", b"2", b"3", b"4", b"5", b"6")
    if "mtime" in ti.pax_headers:
        mtime_ns = pax_time_ns(ti.pax_headers["mtime"])
    else:
        mtime_ns = int(ti.mtime) * 10**9
    if ti.type == tarfile.LNKTYPE:
        linkname: str | None = norm(ti.linkname)
    else:
        linkname = ti.linkname or None
    xattrs = {
        k.removeprefix("SCHILY.xattr."): v.encode("utf-8", "surrogateescape")
        for k, v in ti.pax_headers.items()
        if k.startswith("SCHILY.xattr.")
    }
    return {
        "path": norm(ti.name),
        "kind": kind,
        "typeflag": ti.type.decode("latin-1"),
        "mode": ti.mode & 0o7777,
        "uid": ti.uid,
        "gid": ti.gid,
        "uname": ti.uname,
        "gname": ti.gname,
        "size": ti.size if has_data else 0,
        "mtime_ns": mtime_ns,
        "linkname": linkname,
        "devmajor": ti.devmajor if ti.type in (tarfile.CHRTYPE, tarfile.BLKTYPE) else 0,
        "devminor": ti.devminor if ti.type in (tarfile.CHRTYPE, tarfile.BLKTYPE) else 0,
        "xattrs": xattrs,
    }


ENTRY_FIELDS = (
    "path",
    "kind",
    "typeflag",
    "mode",
    "uid",
    "gid",
    "uname",
    "gname",
    "size",
    "mtime_ns",
    "linkname",
    "devmajor",
    "devminor",
    "xattrs",
)


def entry_fields(e: object) -> dict[str, object]:
    """The fields of an ``ls.Entry`` that :func:`expected_entry` predicts."""
    return {k: getattr(e, k) for k in ENTRY_FIELDS}


def expected_entries(data: bytes) -> list[dict[str, object]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:", encoding="utf-8") as t:
        return [expected_entry(ti) for ti in t.getmembers()]


def tar_contents(data: bytes) -> list[bytes | None]:
    """Each member's content as tarfile reads it (None for members without data)."""
    out: list[bytes | None] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:", encoding="utf-8") as t:
        for ti in t.getmembers():
            if ti.isreg():
                f = t.extractfile(ti)
                assert f is not None
                out.append(f.read())
            else:
                out.append(None)
    return out
