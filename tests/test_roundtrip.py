"""Byte-exact import/export of tars from every producer, plain and compressed, and odd tars.

The oracles are independent of the store: ``hashlib`` and the ``b3sum`` CLI for identities,
Python's ``tarfile`` for what each entry is, GNU tar for producing real archives.
"""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import layerstore as ls
import pytest
import tarfixtures as tf
from storeutil import b3sum, export_bytes

COMPRESSORS: dict[str, tuple[str, Callable[[bytes], bytes]]] = {
    "gzip": ("gzip", tf.gzip_single),
    "gzip-multi-member": ("gzip", tf.gzip_multi),
    "gzip-cli": (
        "gzip",
        lambda d: subprocess.run(["gzip", "-9c"], input=d, capture_output=True, check=True).stdout,
    ),
    "zstd": ("zstd", tf.zstd_single),
    "zstd-multi-frame": ("zstd", tf.zstd_multi),
    "zstd-cli": (
        "zstd",
        lambda d: (
            subprocess.run(["zstd", "-q", "-c"], input=d, capture_output=True, check=True).stdout
        ),
    ),
}

DECOMPRESS = {"gzip": gzip.decompress, "zstd": tf.zstd_decompress}


def assert_entries_match_tarfile(layer: ls.Layer, data: bytes) -> None:
    expected = tf.expected_entries(data)
    entries = layer.entries()
    assert layer.entry_count == len(expected) == len(entries)
    for i, (want, entry) in enumerate(zip(expected, entries, strict=True)):
        got = tf.entry_fields(entry)
        assert got == want, f"entry {i} ({want['path']!r}) differs"
        assert isinstance(entry.path, str)
        if entry.kind in ("char", "block"):
            assert entry.rdev == os.makedev(entry.devmajor, entry.devminor)


def assert_roundtrip(store: ls.Store, data: bytes) -> ls.Layer:
    layer = store.import_tar(data)
    assert layer.diff_id == tf.sha256(data)
    assert layer.size == len(data)
    out = export_bytes(store, layer)
    assert len(out) == len(data)
    assert out == data
    return layer


# ------------------------------------------------------------------------------------------
# Every producer
# ------------------------------------------------------------------------------------------


def test_producer_roundtrip_is_byte_identical(
    store: ls.Store, producer: tuple[str, bytes], tmp_path: Path
) -> None:
    _, data = producer
    layer = store.import_tar(data)

    assert layer.diff_id == tf.sha256(data)
    assert layer.id == b3sum(data)
    assert layer.size == len(data)
    assert layer.compressed_digest is None
    assert layer.compression is None

    buf = io.BytesIO()
    digest = store.export_tar(layer, buf)
    assert buf.getvalue() == data
    assert digest == layer.diff_id

    dest = tmp_path / "out" / "layer.tar"
    dest.parent.mkdir()
    digest = store.export_tar(layer, dest)
    assert dest.read_bytes() == data
    assert digest == tf.sha256(data)
    assert os.listdir(dest.parent) == ["layer.tar"], "a temporary file was left behind"

    # by id string, by diff_id, and as a str path
    assert export_bytes(store, layer.id) == data
    assert export_bytes(store, layer.diff_id) == data
    store.export_tar(layer.id, str(dest))
    assert dest.read_bytes() == data


def test_producer_entries_match_tarfile(store: ls.Store, producer: tuple[str, bytes]) -> None:
    _, data = producer
    layer = store.import_tar(data)
    assert_entries_match_tarfile(layer, data)

    contents = tf.tar_contents(data)
    for entry, content in zip(layer.entries(), contents, strict=True):
        if entry.kind in ("file", "whiteout", "opaque") and content:
            assert entry.digest == b3sum(content), entry.path
            assert entry.chunk_count >= 1
        elif entry.kind in ("dir", "symlink", "hardlink", "char", "block", "fifo"):
            assert entry.digest is None, entry.path
            assert entry.chunk_count == 0
        assert entry.sparse is False


def test_producer_has_every_kind(producer: tuple[str, bytes]) -> None:
    """Guard on the fixtures themselves: each producer covers what the round trip must."""
    name, data = producer
    kinds = {e["kind"] for e in tf.expected_entries(data)}
    assert {"file", "dir", "symlink", "hardlink", "fifo"} <= kinds
    if tf.IS_ROOT or name.startswith("py-"):
        assert {"char", "block"} <= kinds
    if name.startswith("py-"):
        assert {"whiteout", "opaque"} <= kinds
        paths = [e["path"] for e in tf.expected_entries(data)]
        assert len(paths) != len(set(paths)), "duplicate entries expected"
    assert any(e["mode"] & 0o4000 for e in tf.expected_entries(data)), "setuid expected"
    assert any(e["mode"] & 0o1000 for e in tf.expected_entries(data)), "sticky expected"
    assert any(len(str(e["path"])) > 100 for e in tf.expected_entries(data))
    if not name.endswith("ustar"):
        assert any(len(str(e["path"])) > 255 for e in tf.expected_entries(data))
    if name in ("gnutar-posix", "py-pax"):
        assert any(e["xattrs"] for e in tf.expected_entries(data))
        assert any(e["mtime_ns"] % 10**9 for e in tf.expected_entries(data))


@pytest.mark.parametrize("kind", ["path", "str", "bytes", "bytesio", "file"])
def test_import_sources(
    store: ls.Store, producer_tars: dict[str, bytes], tmp_path: Path, kind: str
) -> None:
    data = producer_tars["py-pax"]
    src_path = tmp_path / "in.tar"
    src_path.write_bytes(data)
    if kind == "path":
        layer = store.import_tar(src_path)
    elif kind == "str":
        layer = store.import_tar(str(src_path))
    elif kind == "bytes":
        layer = store.import_tar(data)
    elif kind == "bytesio":
        layer = store.import_tar(io.BytesIO(data))
    else:
        with open(src_path, "rb") as f:
            layer = store.import_tar(f)
    assert layer.diff_id == tf.sha256(data)
    assert export_bytes(store, layer) == data
    assert [x.id for x in store.layers()] == [layer.id]


def test_same_tar_from_every_source_is_one_layer(
    store: ls.Store, producer_tars: dict[str, bytes], tmp_path: Path
) -> None:
    data = producer_tars["gnutar-gnu"]
    p = tmp_path / "in.tar"
    p.write_bytes(data)
    layers = [store.import_tar(data), store.import_tar(p), store.import_tar(io.BytesIO(data))]
    assert len({x.id for x in layers}) == 1
    assert layers[0] == layers[1] == layers[2]
    assert hash(layers[0]) == hash(layers[2])
    assert len(store.layers()) == 1


# ------------------------------------------------------------------------------------------
# Compression
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(COMPRESSORS))
def test_compressed_import_is_the_same_layer(
    store: ls.Store, producer: tuple[str, bytes], method: str
) -> None:
    _, data = producer
    name, compress = COMPRESSORS[method]
    blob = compress(data)
    assert blob != data
    plain_id = b3sum(data)

    layer = store.import_tar(blob)
    assert layer.id == plain_id
    assert layer.diff_id == tf.sha256(data)
    assert layer.size == len(data)
    assert layer.compression == name
    assert layer.compressed_digest == tf.sha256(blob)
    assert export_bytes(store, layer) == data
    # the blob digest is a lookup key
    assert store.layer(tf.sha256(blob)).id == plain_id

    # importing the plain tar afterwards finds the same layer
    again = store.import_tar(data)
    assert again.id == plain_id
    assert len(store.layers()) == 1


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_compressed_export(
    store: ls.Store, producer: tuple[str, bytes], compression: str, tmp_path: Path
) -> None:
    _, data = producer
    layer = store.import_tar(data)

    buf = io.BytesIO()
    digest = store.export_tar(layer, buf, compression=compression)
    blob = buf.getvalue()
    assert digest == tf.sha256(blob)
    assert DECOMPRESS[compression](blob) == data

    dest = tmp_path / f"layer.tar.{compression}"
    digest2 = store.export_tar(layer, dest, compression=compression)
    assert digest2 == tf.sha256(dest.read_bytes())
    assert DECOMPRESS[compression](dest.read_bytes()) == data
    assert sorted(os.listdir(tmp_path)) == sorted(["store", dest.name])

    # the exported blob imports back to the same layer, with its own blob digest
    back = store.import_tar(blob)
    assert back.id == layer.id
    assert back.compressed_digest == tf.sha256(blob)


def test_compressed_export_cli_can_read(
    store: ls.Store, producer_tars: dict[str, bytes], tmp_path: Path
) -> None:
    data = producer_tars["gnutar-posix"]
    layer = store.import_tar(data)
    store.export_tar(layer, tmp_path / "l.tar.gz", compression="gzip")
    store.export_tar(layer, tmp_path / "l.tar.zst", compression="zstd")
    gz = subprocess.run(["gzip", "-dc", tmp_path / "l.tar.gz"], capture_output=True, check=True)
    zs = subprocess.run(["zstd", "-dc", tmp_path / "l.tar.zst"], capture_output=True, check=True)
    assert gz.stdout == data
    assert zs.stdout == data


def test_unknown_export_compression_is_rejected(
    store: ls.Store, producer_tars: dict[str, bytes]
) -> None:
    layer = store.import_tar(producer_tars["py-ustar"])
    # A bad argument, not a bad layer: a plain ValueError naming it.
    with pytest.raises(ValueError, match="bzip2"):
        store.export_tar(layer, io.BytesIO(), compression="bzip2")


# ------------------------------------------------------------------------------------------
# Odd tars
# ------------------------------------------------------------------------------------------

# transformations that keep every entry's metadata (so the tree_id must not change)
SAME_TREE: dict[str, Callable[[bytes], bytes]] = {
    "nonzero-padding": tf.with_nonzero_padding,
    "trailing-garbage": lambda d: d + tf.rand_bytes("garbage", 3000),
    "trailing-garbage-unaligned": lambda d: d + b"\x01" * 77,
    "extra-zero-blocks": lambda d: d + bytes(7 * tf.BLOCK),
    "no-record-padding": tf.without_record_padding,
    "lone-zero-block": tf.with_lone_zero_block,
    "garbage-after-nul-in-fields": tf.with_garbage_after_fields,
    "base256-numbers": tf.with_base256_fields,
    **{
        f"checksum-{style}": (lambda s: lambda d: tf.with_checksum_style(d, s))(style)
        for style in tf.CHECKSUM_STYLES
        if style != "nul-space"  # what tarfile and GNU tar write already
    },
}


ODD_CASES = [
    (variant, base)
    for variant in sorted(SAME_TREE)
    for base in ("py-pax", "py-gnu", "gnutar-gnu")
    # PAX keeps every header byte ASCII: the signed and unsigned sums are equal there
    if (variant, base) != ("checksum-signed", "py-pax")
]


@pytest.mark.parametrize(("variant", "base"), ODD_CASES)
def test_odd_tar_roundtrip(
    store: ls.Store, producer_tars: dict[str, bytes], base: str, variant: str
) -> None:
    original = producer_tars[base]
    data = SAME_TREE[variant](original)
    assert data != original
    # tarfile (the oracle) still reads it as the same entries
    assert tf.expected_entries(data) == tf.expected_entries(original)

    ref = store.import_tar(original)
    layer = assert_roundtrip(store, data)
    assert layer.id == b3sum(data) != ref.id
    assert layer.tree_id == ref.tree_id
    assert_entries_match_tarfile(layer, data)


def test_checksum_styles_really_differ(producer_tars: dict[str, bytes]) -> None:
    """Guard: the checksum variants produce distinct header bytes (and the signed one is used
    on headers with high bytes, where signed and unsigned sums differ)."""
    data = producer_tars["py-gnu"]
    variants = {tf.with_checksum_style(data, s) for s in tf.CHECKSUM_STYLES}
    assert len(variants) == len(tf.CHECKSUM_STYLES)
    high = [
        h
        for h in tf.walk(data)[0]
        if max(data[h.offset : h.offset + tf.BLOCK]) >= 0x80 and not tf.is_extension(h)
    ]
    assert high, "a header with bytes >= 0x80 (non-UTF-8 name, base-256 uid) is expected"
    blk = data[high[0].offset : high[0].offset + tf.BLOCK]
    unsigned, signed = tf.chksum_sums(blk)
    assert unsigned != signed


def test_pre_posix_directory_typeflag(store: ls.Store) -> None:
    """A regular-file typeflag ('\\0') on a name ending in '/' is a directory (old tars)."""
    data = bytearray(
        tf.py_tar(tarfile.USTAR_FORMAT, members=[tf.dir_("olddir/"), tf.file_("olddir/f", b"x")])
    )
    h = tf.walk(bytes(data))[0][0]
    blk = data[h.offset : h.offset + tf.BLOCK]
    assert blk[156:157] == b"5"
    blk[156] = 0
    tf.set_checksum(blk)
    data[h.offset : h.offset + tf.BLOCK] = blk
    data = bytes(data)
    layer = assert_roundtrip(store, data)
    first = layer.entries()[0]
    assert (first.path, first.kind) == ("/olddir", "dir")
    assert_entries_match_tarfile(layer, data)


def test_global_pax_header_applies_to_following_entries(store: ls.Store) -> None:
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf,
        mode="w",
        format=tarfile.PAX_FORMAT,
        pax_headers={"SCHILY.xattr.user.global": "g", "comment": "global header"},
    ) as t:
        for m in (tf.file_("a", b"1"), tf.dir_("d/"), tf.file_("d/b", b"2")):
            ti = m.tarinfo()
            t.addfile(ti, io.BytesIO(m.data) if ti.size else None)
    data = buf.getvalue()
    assert any(h.typeflag == b"g" for h in tf.walk(data)[0])
    layer = assert_roundtrip(store, data)
    assert [e.xattrs for e in layer.entries()] == [{"user.global": b"g"}] * 3
    assert_entries_match_tarfile(layer, data)


def test_pax_size_and_path_override_header_fields(store: ls.Store) -> None:
    """PAX 'path' and 'size' records win over the ustar header fields."""
    content = tf.rand_bytes(5, 2000)
    m = tf.file_("short", content, pax={"path": "real/name/from/pax", "size": str(len(content))})
    data = tf.py_tar(tarfile.PAX_FORMAT, members=[m])
    layer = assert_roundtrip(store, data)
    (e,) = layer.entries()
    assert (e.path, e.size, e.digest) == ("/real/name/from/pax", 2000, b3sum(content))


def test_binary_xattr_values_from_gnu_tar(store: ls.Store, tmp_path: Path) -> None:
    """xattr values with NUL, newline, '=' and high bytes (PAX records are length-prefixed)."""
    root = tmp_path / "tree"
    root.mkdir()
    (root / "f").write_bytes(b"x")
    value = bytes(range(256)) + b"\n=\n"
    os.setxattr(root / "f", "user.all-bytes", value)
    os.setxattr(root / "f", "user.newline", b"line1\nline2\n")
    data = tf.gnu_tar(root, "posix")
    layer = assert_roundtrip(store, data)
    f = next(e for e in layer.entries() if e.path == "/f")
    assert f.xattrs == {"user.all-bytes": value, "user.newline": b"line1\nline2\n"}
    assert_entries_match_tarfile(layer, data)


@pytest.mark.parametrize("fmt", ["v7", "oldgnu"])
def test_other_gnu_tar_formats(store: ls.Store, tmp_path: Path, fmt: str) -> None:
    root = tf.make_tree(tmp_path / "tree", ustar=True)
    if fmt == "v7":  # v7 has no devices or fifos, and names of at most 99 bytes
        for p in ("run/fifo", "dev/null", "dev/loop0", tf.LONG_FILE):
            (root / p).unlink(missing_ok=True)
    data = tf.gnu_tar(root, fmt)
    layer = assert_roundtrip(store, data)
    assert_entries_match_tarfile(layer, data)


@pytest.mark.parametrize(
    ("args", "encoding"),
    [
        (["--format=gnu"], "old GNU format"),
        (["--format=oldgnu"], "old GNU format"),
        (["--format=posix", "--sparse-version=0.0"], "PAX 0.0"),
        (["--format=posix", "--sparse-version=0.1"], "PAX 0.1"),
        (["--format=posix", "--sparse-version=1.0"], "PAX 1.0"),
    ],
    ids=["gnu", "oldgnu", "pax-0.0", "pax-0.1", "pax-1.0"],
)
def test_gnu_sparse_files_are_refused_naming_the_entry(
    store: ls.Store, tmp_path: Path, args: list[str], encoding: str
) -> None:
    """GNU sparse files archive a map and their data regions, not their content: every
    encoding is refused with a typed error naming the entry (before, the view and materialize
    showed the map and regions as the content), and the store is left as it was."""
    root = tmp_path / "tree"
    root.mkdir()
    with open(root / "sparse", "wb") as f:
        f.seek(1 << 20)
        f.write(b"data" * 100)
        f.seek(3 << 20)
        f.write(b"end")
    res = subprocess.run(
        ["tar", *args, "--sparse", "-C", str(root), "-cf", "-", "sparse"],
        capture_output=True,
        check=True,
    )
    before = store.layers()
    with pytest.raises(ls.InvalidLayerError, match=rf"sparse: a GNU sparse file \({encoding}\)"):
        store.import_tar(res.stdout)
    assert store.layers() == before
    assert store.fsck()["ok"]


def test_gnutar_negative_mtime_base256(store: ls.Store, tmp_path: Path) -> None:
    """GNU tar --format=gnu writes a pre-1970 mtime as a negative base-256 number."""
    root = tmp_path / "tree"
    root.mkdir()
    (root / "old").write_bytes(b"from 1960\n")
    t = -315_619_200  # 1960-01-01
    os.utime(root / "old", (t, t))
    data = subprocess.run(
        ["tar", "--format=gnu", "-C", str(root), "-cf", "-", "old"], capture_output=True, check=True
    ).stdout
    assert data[136] == 0xFF, "expected a negative base-256 mtime"
    layer = assert_roundtrip(store, data)
    assert layer.entries()[0].mtime_ns == t * 10**9
    assert_entries_match_tarfile(layer, data)


def test_python_gnu_negative_mtime(store: ls.Store) -> None:
    data = tf.py_tar(tarfile.GNU_FORMAT, members=[tf.file_("neg", b"x", mtime=-86_400)])
    layer = assert_roundtrip(store, data)
    assert layer.entries()[0].mtime_ns == -86_400 * 10**9


def test_gnutar_volume_label(store: ls.Store, tmp_path: Path) -> None:
    """`tar --label` writes a 'V' header whose numeric fields are empty (NUL)."""
    root = tmp_path / "tree"
    root.mkdir()
    (root / "f").write_bytes(b"labelled\n")
    data = subprocess.run(
        ["tar", "--format=gnu", "-V", "my label", "-C", str(root), "-cf", "-", "f"],
        capture_output=True,
        check=True,
    ).stdout
    layer = assert_roundtrip(store, data)
    kinds = [(e.kind, e.typeflag) for e in layer.entries()]
    assert kinds == [("other", "V"), ("file", "0")]


def test_unknown_typeflag_reads_as_a_regular_file_everywhere(
    store: ls.Store, tmp_path: Path
) -> None:
    """POSIX: an unknown typeflag is read as a regular file. The entry keeps its typeflag (and
    the export its header); the view, read_bytes, materialize and squash all see a file."""
    m = tf.file_("vendor/thing", b"vendor data\n")
    data = bytearray(tf.py_tar(tarfile.USTAR_FORMAT, members=[m, tf.file_("after", b"z")]))
    h = tf.walk(bytes(data))[0][0]
    blk = data[h.offset : h.offset + tf.BLOCK]
    blk[156:157] = b"X"
    tf.set_checksum(blk)
    data[h.offset : h.offset + tf.BLOCK] = blk
    data = bytes(data)
    layer = assert_roundtrip(store, data)
    first, second = layer.entries()
    assert (first.kind, first.typeflag, first.size) == ("file", "X", len(m.data))
    assert (second.path, second.kind) == ("/after", "file")
    image = store.stack([layer])
    assert image.stat("/vendor/thing").kind == "file"
    assert image.read_bytes("/vendor/thing") == m.data
    store.materialize(image, tmp_path / "out")
    assert (tmp_path / "out" / "vendor" / "thing").read_bytes() == m.data
    squashed = store.stack([store.squash(image)])
    assert squashed.read_bytes("/vendor/thing") == m.data


def test_hardlink_with_nonzero_size_field(store: ls.Store) -> None:
    """Header-only typeflags never carry data, whatever their size field says."""
    data = bytearray(
        tf.py_tar(
            tarfile.USTAR_FORMAT,
            members=[
                tf.file_("a", b"x" * 600),
                tf.Member("b", tarfile.LNKTYPE, linkname="a"),
                tf.file_("c", b"y"),
            ],
        )
    )
    h = next(h for h in tf.walk(bytes(data))[0] if h.typeflag == b"1")
    blk = data[h.offset : h.offset + tf.BLOCK]
    blk[124:136] = b"%011o\0" % 600
    tf.set_checksum(blk)
    data[h.offset : h.offset + tf.BLOCK] = blk
    data = bytes(data)
    layer = assert_roundtrip(store, data)
    assert [(e.path, e.kind, e.size) for e in layer.entries()] == [
        ("/a", "file", 600),
        ("/b", "hardlink", 0),
        ("/c", "file", 1),
    ]


def test_empty_archive(store: ls.Store) -> None:
    """An archive with no entries (just the end marker) is a valid, empty layer."""
    for data in (bytes(1024), bytes(tf.RECORD), tf.py_tar(tarfile.PAX_FORMAT, members=[])):
        layer = assert_roundtrip(store, data)
        assert layer.entry_count == 0
        assert layer.entries() == []


def test_many_small_files(store: ls.Store) -> None:
    files = {f"d{i % 13}/f{i}": tf.rand_bytes(i, i % 700) for i in range(2000)}
    data = tf.simple_tar(files, tarfile.GNU_FORMAT)
    layer = assert_roundtrip(store, data)
    assert layer.entry_count == 2000
    assert_entries_match_tarfile(layer, data)


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("1600000000.123456789", 1_600_000_000_123_456_789),
        ("1600000000.1234567891", 1_600_000_000_123_456_789),  # digits past ns are dropped
        ("-1.5", -1_500_000_000),
        ("0.000000001", 1),
        ("42", 42_000_000_000),
    ],
)
def test_pax_mtime_formats(store: ls.Store, text: str, ns: int) -> None:
    data = tf.py_tar(tarfile.PAX_FORMAT, members=[tf.file_("f", b"x", pax={"mtime": text})])
    layer = assert_roundtrip(store, data)
    assert layer.entries()[0].mtime_ns == ns == tf.expected_entries(data)[0]["mtime_ns"]
