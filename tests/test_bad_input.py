"""Bad input is rejected with a typed error that says where, and leaves the store as it was."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import layerstore as ls
import pytest
import tarfixtures as tf
import zstandard
from storeutil import POSITION, assert_unchanged, export_bytes, snapshot

# A valid tar whose first file is large enough that its chunks reach the pack file before the
# later damage is found (so the cleanup of a half-written pack is exercised too).
FIRST = tf.rand_bytes("first", 3 << 20)
BASE = tf.simple_tar({"big": FIRST, "b": tf.rand_bytes("b", 30_000), "c": tf.rand_bytes("c", 100)})
HEADERS = [h for h in tf.walk(BASE)[0] if not tf.is_extension(h)]


@dataclass
class Bad:
    data: Callable[[], bytes]
    # substrings the message must contain (besides naming a position)
    says: list[str] = field(default_factory=list)
    limits: ls.Limits | None = None
    position: bool = True


def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0xFF
    return bytes(out)


def _gzip_corrupt() -> bytes:
    gz = tf.gzip_single(BASE)
    return _flip(gz, len(gz) // 2)


def _zstd_corrupt() -> bytes:
    z = tf.zstd_single(BASE)
    return _flip(z, len(z) // 2)


def _zstd_huge_window() -> bytes:
    """A zstd frame that asks for a 2 GiB window (the decoder must refuse, not allocate)."""
    params = zstandard.ZstdCompressionParameters(window_log=31, write_content_size=False)
    buf = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(buf, closefd=False) as w:
        w.write(BASE)
    blob = buf.getvalue()
    assert zstandard.get_frame_parameters(blob).window_size == 1 << 31
    return blob


def _pax(name: str, pax: dict[str, str], data: bytes = b"x") -> bytes:
    return tf.py_tar(
        tarfile.PAX_FORMAT, members=[tf.file_("ok", b"fine"), tf.file_(name, data, pax=pax)]
    )


CASES: dict[str, Bad] = {
    "truncated-mid-data": Bad(
        lambda: BASE[: HEADERS[1].data_offset + 3000],
        ["truncated", "entry 1", f"offset {HEADERS[1].offset}"],
    ),
    "truncated-mid-first-data": Bad(
        lambda: BASE[: HEADERS[0].data_offset + (2 << 20)], ["entry 0", "offset 0"]
    ),
    "truncated-mid-header": Bad(
        lambda: BASE[: HEADERS[1].offset + 100],
        ["truncated", "entry 1", f"offset {HEADERS[1].offset}"],
    ),
    "truncated-at-header": Bad(lambda: BASE[: HEADERS[2].offset], ["entry 2"]),
    "truncated-mid-padding": Bad(lambda: BASE[: HEADERS[2].data_offset + 300], ["entry 2"]),
    "no-end-marker": Bad(lambda: BASE[: tf.end_of_entries(BASE)], ["entry 3"]),
    "bad-checksum": Bad(
        lambda: tf.with_header_byte_flipped(BASE, 1)[0],
        ["checksum", "entry 1", f"offset {HEADERS[1].offset}"],
    ),
    "bad-checksum-first": Bad(
        lambda: tf.with_header_byte_flipped(BASE, 0)[0], ["checksum", "entry 0", "offset 0"]
    ),
    "random-bytes": Bad(lambda: b"R" + tf.rand_bytes("random", 20_000), ["entry 0", "offset 0"]),
    "junk-header-block": Bad(lambda: b"\x01" * 512 + bytes(1024), ["entry 0", "offset 0"]),
    "empty": Bad(lambda: b"", ["entry 0", "offset 0"]),
    "three-bytes": Bad(lambda: b"abc", ["entry 0", "offset 0"]),
    "corrupt-gzip": Bad(_gzip_corrupt),
    "truncated-gzip": Bad(lambda: tf.gzip_single(BASE)[:200_000]),
    "gzip-bad-crc": Bad(lambda: _flip(tf.gzip_single(BASE), -6)),
    "gzip-magic-only": Bad(lambda: b"\x1f\x8b"),
    "corrupt-zstd": Bad(_zstd_corrupt),
    "truncated-zstd": Bad(lambda: tf.zstd_single(BASE)[:200_000]),
    "zstd-window-too-large": Bad(_zstd_huge_window),
    "zstd-bad-checksum": Bad(lambda: _flip(tf.zstd_single(BASE), -2)),
    "gzip-of-garbage": Bad(
        lambda: tf.gzip_single(tf.rand_bytes("gz-garbage", 5000)), ["entry 0", "offset 0"]
    ),
    "escape-dotdot": Bad(
        lambda: tf.simple_tar({"ok": b"1", "../etc/x": b"x"}), ["escapes", "entry 1"]
    ),
    "escape-inner-dotdot": Bad(
        lambda: tf.simple_tar({"a/../../etc/x": b"x"}), ["escapes", "entry 0"]
    ),
    "escape-pax-path": Bad(
        lambda: _pax("innocent", {"path": "x/../../../root/.ssh/keys"}), ["entry 1"]
    ),
    "escape-gnu-longname": Bad(
        lambda: tf.py_tar(tarfile.GNU_FORMAT, members=[tf.file_("../" + "x/" * 60 + "f", b"x")]),
        ["entry 0"],
    ),
    "escape-hardlink-target": Bad(
        lambda: tf.py_tar(
            tarfile.PAX_FORMAT,
            members=[tf.Member("h", tarfile.LNKTYPE, linkname="../../etc/shadow")],
        ),
        ["escapes", "entry 0"],
    ),
    "whiteout-bare": Bad(lambda: tf.simple_tar({"etc/.wh.": b""}), ["whiteout", "entry 0"]),
    "whiteout-dot": Bad(lambda: tf.simple_tar({"etc/.wh..": b""}), ["whiteout", "entry 0"]),
    "whiteout-dotdot": Bad(
        lambda: tf.simple_tar({"ok": b"", "etc/.wh...": b""}), ["whiteout", "entry 1"]
    ),
    "whiteout-root-bare": Bad(lambda: tf.simple_tar({".wh.": b""}), ["whiteout", "entry 0"]),
    "nul-in-pax-path": Bad(lambda: _pax("innocent", {"path": "a\x00b"}), ["entry 1"]),
    "file-named-root": Bad(lambda: tf.simple_tar({"./": b"not a directory"}), ["entry 0"]),
    "bad-pax-size": Bad(lambda: _pax("f", {"size": "twelve"}), ["entry 1"]),
    "bad-pax-mtime": Bad(lambda: _pax("f", {"mtime": "yesterday"}), ["entry 1"]),
    "malformed-pax-record": Bad(
        lambda: _patch_pax_record(
            tf.py_tar(tarfile.PAX_FORMAT, members=[tf.file_("f", b"x", pax={"comment": "hello"})])
        ),
        ["entry 0"],
    ),
    "limit-max-entries": Bad(lambda: BASE, ["entry count", "entry 2"], ls.Limits(max_entries=2)),
    "limit-max-bytes": Bad(lambda: BASE, ["decompressed size"], ls.Limits(max_bytes=1 << 20)),
    "limit-max-bytes-gzip": Bad(
        lambda: tf.gzip_single(BASE), ["decompressed size"], ls.Limits(max_bytes=1 << 20)
    ),
    "limit-max-record-default": Bad(
        lambda: _pax("f", {"SCHILY.xattr.user.huge": "v" * (1 << 20)}), ["record", "entry 1"]
    ),
    "limit-max-record-gnu-longname": Bad(
        lambda: tf.py_tar(tarfile.GNU_FORMAT, members=[tf.file_("d/" * 700 + "f", b"x")]),
        ["record", "entry 0"],
        ls.Limits(max_record=1000),
    ),
    "limit-max-path-depth": Bad(
        lambda: tf.simple_tar({"a/b/c": b"ok", "a/b/c/d/e/f": b"x"}),
        ["depth", "entry 1"],
        ls.Limits(max_path_depth=4),
    ),
    "limit-max-trailing": Bad(
        lambda: BASE + b"\x01" * 50_000,
        ["after end-of-archive", "entry 3"],
        ls.Limits(max_trailing=40_000),
    ),
}


def _patch_pax_record(data: bytes) -> bytes:
    """Make the PAX record's length prefix lie (claims more bytes than the record set holds)."""
    h = tf.walk(data)[0][0]
    assert h.typeflag == b"x"
    records = data[h.data_offset : h.data_offset + h.size]
    bad = records.replace(b"17 comment=hello\n", b"99 comment=hello\n")
    assert bad != records
    return data[: h.data_offset] + bad + data[h.data_offset + h.size :]


def test_default_limits_are_safe() -> None:
    d = ls.Limits()
    assert d.max_record == 1 << 20
    assert d.max_bytes > 0 and d.max_entries > 0 and d.max_path_depth > 0 and d.max_trailing > 0
    custom = ls.Limits(max_entries=7)
    assert (custom.max_entries, custom.max_record) == (7, d.max_record)


@pytest.fixture
def seeded(store: ls.Store) -> tuple[ls.Store, bytes]:
    """A store holding one layer already (large random content, so packs are mostly live)."""
    data = tf.simple_tar(
        {"seed/one": tf.rand_bytes("seed1", 400_000), "seed/two": tf.rand_bytes("seed2", 1000)}
    )
    store.import_tar(data)
    return store, data


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_rejected_and_store_unchanged(
    seeded: tuple[ls.Store, bytes], case: str
) -> None:
    store, seed_tar = seeded
    bad = CASES[case]
    data = bad.data()
    before = snapshot(store)

    with pytest.raises(ls.InvalidLayerError) as exc_info:
        store.import_tar(data, limits=bad.limits)
    err = exc_info.value
    assert isinstance(err, ValueError)
    assert isinstance(err, ls.LayerstoreError)
    msg = str(err)
    if bad.position:
        assert POSITION.search(msg), f"message names no entry index or byte offset: {msg!r}"
    for s in bad.says:
        assert s in msg, f"{s!r} not in {msg!r}"

    assert store.fsck()["garbage"] == [], "the failed import left files behind"
    assert_unchanged(store, before)
    # the layer that was there is intact
    assert export_bytes(store, store.layers()[0]) == seed_tar


@pytest.mark.parametrize(
    "case", ["limit-max-entries", "limit-max-path-depth", "limit-max-trailing"]
)
def test_store_level_limits(tmp_path: Path, case: str) -> None:
    bad = CASES[case]
    assert bad.limits is not None
    store = ls.Store(tmp_path / "store", limits=bad.limits)
    before = snapshot(store)
    with pytest.raises(ls.InvalidLayerError, match=POSITION.pattern):
        store.import_tar(bad.data())
    assert_unchanged(store, before)
    # a per-call limit overrides the store's
    layer = store.import_tar(bad.data(), limits=ls.Limits())
    assert export_bytes(store, layer) == bad.data()


def test_limits_at_the_boundary_are_accepted(store: ls.Store) -> None:
    # record padding after the two zero blocks (whether the second zero block counts as
    # "trailing" is left open: one block of slack)
    trailing = len(BASE) - tf.end_of_entries(BASE) - tf.BLOCK
    limits = ls.Limits(max_entries=3, max_bytes=len(BASE), max_path_depth=1, max_trailing=trailing)
    layer = store.import_tar(BASE, limits=limits)
    assert export_bytes(store, layer) == BASE
    for over in (
        ls.Limits(max_entries=2),
        ls.Limits(max_bytes=len(BASE) - 1),
        ls.Limits(max_trailing=trailing - tf.BLOCK - 1),
    ):
        with pytest.raises(ls.InvalidLayerError):
            store.import_tar(BASE, limits=over)
    with pytest.raises(ls.InvalidLayerError):
        store.import_tar(tf.simple_tar({"a/b": b"x"}), limits=limits)


def test_large_record_within_the_limit_is_accepted(store: ls.Store) -> None:
    value = "v" * (512 << 10)
    data = _pax("f", {"SCHILY.xattr.user.big": value})
    layer = store.import_tar(data)
    assert export_bytes(store, layer) == data
    assert layer.entries()[1].xattrs == {"user.big": value.encode()}


# ------------------------------------------------------------------------------------------
# Expected digests
# ------------------------------------------------------------------------------------------

WRONG = "sha256:" + "0" * 64


@pytest.mark.parametrize(
    ("blob", "kwargs"),
    [
        ("plain", {"expected_diff_id": WRONG}),
        ("plain", {"expected_digest": WRONG}),
        ("gzip", {"expected_diff_id": WRONG}),
        ("gzip", {"expected_digest": WRONG}),
        ("zstd", {"expected_digest": WRONG}),
        ("gzip", {"expected_digest": tf.sha256(BASE)}),  # the diff_id is not the blob digest
        ("plain", {"expected_diff_id": "sha512:" + "0" * 128}),
    ],
)
def test_digest_mismatch_is_integrity_error(
    seeded: tuple[ls.Store, bytes], blob: str, kwargs: dict[str, str]
) -> None:
    store, _ = seeded
    data = {"plain": BASE, "gzip": tf.gzip_single(BASE), "zstd": tf.zstd_single(BASE)}[blob]
    before = snapshot(store)
    with pytest.raises(ls.IntegrityError) as exc_info:
        store.import_tar(data, **kwargs)
    assert "expected" in str(exc_info.value)
    assert store.fsck()["garbage"] == []
    assert_unchanged(store, before)


def test_matching_expected_digests_are_accepted(store: ls.Store) -> None:
    gz = tf.gzip_single(BASE)
    sha512 = "sha512:" + hashlib.sha512(BASE).hexdigest()
    a = store.import_tar(BASE, expected_diff_id=tf.sha256(BASE))
    b = store.import_tar(gz, expected_diff_id=tf.sha256(BASE), expected_digest=tf.sha256(gz))
    c = store.import_tar(BASE, expected_diff_id=sha512)
    d = store.import_tar(gz, expected_digest="sha512:" + hashlib.sha512(gz).hexdigest())
    assert a.id == b.id == c.id == d.id
    assert len(store.layers()) == 1


def test_malformed_expected_digest_is_rejected(store: ls.Store) -> None:
    before = snapshot(store)
    with pytest.raises(ls.LayerstoreError):
        store.import_tar(BASE, expected_diff_id="not-a-digest")
    with pytest.raises(ls.LayerstoreError):
        store.import_tar(BASE, expected_digest="sha256:1234")
    assert_unchanged(store, before)


# ------------------------------------------------------------------------------------------
# Sanitised, not rejected; lookups; sources
# ------------------------------------------------------------------------------------------


def test_absolute_member_name_warns_and_imports(store: ls.Store) -> None:
    data = tf.simple_tar({"/etc/x": b"absolute\n", "etc/y": b"relative\n"})
    with pytest.warns(ls.LayerstoreWarning, match="/etc/x") as record:
        layer = store.import_tar(data)
    assert len(record) == 1
    assert [e.path for e in layer.entries()] == ["/etc/x", "/etc/y"]
    assert export_bytes(store, layer) == data


def test_absolute_hardlink_target_warns(store: ls.Store) -> None:
    data = tf.py_tar(
        tarfile.PAX_FORMAT,
        members=[tf.file_("etc/x", b"x"), tf.Member("etc/y", tarfile.LNKTYPE, linkname="/etc/x")],
    )
    with pytest.warns(ls.LayerstoreWarning):
        layer = store.import_tar(data)
    assert layer.entries()[1].linkname == "/etc/x"
    assert export_bytes(store, layer) == data


def test_symlink_targets_are_data_not_paths(store: ls.Store) -> None:
    """A symlink may point anywhere (resolving it safely is the materialiser's job)."""
    data = tf.py_tar(
        tarfile.PAX_FORMAT,
        members=[
            tf.Member("up", tarfile.SYMTYPE, linkname="../../../../etc/shadow"),
            tf.Member("abs", tarfile.SYMTYPE, linkname="/etc/shadow"),
        ],
    )
    layer = store.import_tar(data)
    assert [e.linkname for e in layer.entries()] == ["../../../../etc/shadow", "/etc/shadow"]


def test_aufs_metadata_names_are_not_whiteouts(store: ls.Store) -> None:
    data = tf.simple_tar({".wh..wh.plnk/1.2": b"x", "d/.wh..wh..opq": b"", "d/.wh.gone": b""})
    layer = store.import_tar(data)
    assert [e.kind for e in layer.entries()] == ["file", "opaque", "whiteout"]


@pytest.mark.parametrize(
    "key",
    [
        "blake3:" + "0" * 64,
        "sha256:" + "0" * 64,
        "sha256:" + "f" * 64,
        "0123456789abcdef",
        "ab",
        "",
        "no such layer",
    ],
)
def test_missing_layer_is_not_found(seeded: tuple[ls.Store, bytes], key: str) -> None:
    store, _ = seeded
    with pytest.raises(ls.NotFoundError) as exc_info:
        store.layer(key)
    assert isinstance(exc_info.value, LookupError)
    with pytest.raises(LookupError):
        store.export_tar(key, io.BytesIO())
    with pytest.raises(ls.NotFoundError):
        store.delete(key)
    assert len(store.layers()) == 1


def test_missing_source_file_is_file_not_found(store: ls.Store, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        store.import_tar(tmp_path / "nope.tar")
    with pytest.raises(TypeError):
        store.import_tar(12345)  # type: ignore[arg-type]
    assert store.layers() == []


def test_failing_source_object_leaves_store_unchanged(seeded: tuple[ls.Store, bytes]) -> None:
    store, _ = seeded

    class Boom(Exception):
        pass

    class Source:
        def __init__(self) -> None:
            self.pos = 0

        def read(self, n: int = -1) -> bytes:
            if self.pos > (2 << 20):
                raise Boom("network went away")
            out = BASE[self.pos : self.pos + n]
            self.pos += len(out)
            return out

    before = snapshot(store)
    with pytest.raises((Boom, OSError)) as exc_info:
        store.import_tar(Source())
    assert "network went away" in str(exc_info.value)
    assert_unchanged(store, before)


def test_hardlink_to_a_path_outside_the_layer_is_accepted(store: ls.Store) -> None:
    """A hardlink may name a path of a lower layer (resolved when stacking, not here)."""
    data = tf.py_tar(
        tarfile.PAX_FORMAT, members=[tf.Member("usr/bin/x", tarfile.LNKTYPE, linkname="usr/lib/y")]
    )
    layer = store.import_tar(data)
    (e,) = layer.entries()
    assert (e.kind, e.linkname) == ("hardlink", "/usr/lib/y")
    assert export_bytes(store, layer) == data


def test_export_errors_are_os_errors(store: ls.Store, tmp_path: Path) -> None:
    layer = store.import_tar(tf.simple_tar({"f": b"x"}))
    with pytest.raises(FileNotFoundError):
        store.export_tar(layer, tmp_path / "no-such-dir" / "x.tar")
    (tmp_path / "a-dir").mkdir()
    with pytest.raises(OSError):
        store.export_tar(layer, tmp_path / "a-dir")
    with pytest.raises(OSError):
        store.import_tar(tmp_path / "a-dir")
    assert sorted(os.listdir(tmp_path)) == ["a-dir", "store"]
    assert os.listdir(tmp_path / "a-dir") == []
