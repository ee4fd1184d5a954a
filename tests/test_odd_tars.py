"""Exact on odd tars (issue 14, section 3): what extraction and the kernel do, said the same way by
the view, materialize and squash; anything sanitised is said, never silent."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import tarfile
from pathlib import Path

import layerstore as ls
import pytest
import tarfixtures as tf
import zstandard


def test_a_later_file_replaces_a_directory_of_the_same_layer(
    store: ls.Store, tmp_path: Path
) -> None:
    data = tf.py_tar(
        tarfile.PAX_FORMAT,
        members=[
            tf.dir_("y/"),
            tf.file_("y/c.txt", b"child\n"),
            tf.file_("y", b"now a file\n"),
            tf.file_("z", b"z\n"),
        ],
    )
    layer = store.import_tar(data)
    assert store.export_tar(layer, tmp_path / "x.tar") == tf.sha256(data)  # still byte-exact
    image = store.stack([layer])
    assert image.stat("/y").kind == "file"
    assert image.read_bytes("/y") == b"now a file\n"
    assert not image.exists("/y/c.txt")
    assert sorted(image.listdir("/")) == ["y", "z"]
    # The same as across two layers.
    lower = store.import_tar(tf.py_tar(tarfile.PAX_FORMAT, members=[tf.dir_("y/")]))
    lower2 = store.import_tar(
        tf.py_tar(tarfile.PAX_FORMAT, members=[tf.dir_("y/"), tf.file_("y/c.txt", b"child\n")])
    )
    upper = store.import_tar(tf.py_tar(tarfile.PAX_FORMAT, members=[tf.file_("y", b"f\n")]))
    assert not store.stack([lower, lower2, upper]).exists("/y/c.txt")
    out = tmp_path / "out"
    store.materialize(image, out)
    assert (out / "y").read_bytes() == b"now a file\n"
    squashed = store.stack([store.squash(image)])
    assert squashed.read_bytes("/y") == b"now a file\n" and not squashed.exists("/y/c.txt")


def test_a_gnu_volume_label_is_not_part_of_the_view(store: ls.Store, tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    (root / "f").write_bytes(b"labelled\n")
    data = subprocess.run(
        ["tar", "--format=gnu", "-V", "my label", "-C", str(root), "-cf", "-", "f"],
        capture_output=True,
        check=True,
    ).stdout
    layer = store.import_tar(data)
    assert [e.kind for e in layer.entries()] == ["other", "file"]
    image = store.stack([layer])
    assert image.listdir("/") == ["f"]
    store.materialize(image, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["f"]
    assert store.stack([store.squash(image)]).listdir("/") == ["f"]


def skippable_frame(payload: bytes, magic: int = 0x184D2A5A) -> bytes:
    return struct.pack("<II", magic, len(payload)) + payload


def test_a_zstd_layer_opening_with_a_skippable_frame_imports(store: ls.Store) -> None:
    data = tf.simple_tar({"a": b"content\n"})
    blob = skippable_frame(b"metadata a reader skips") + zstandard.ZstdCompressor().compress(data)
    layer = store.import_tar(blob)
    assert layer.diff_id == tf.sha256(data)
    assert layer.compression == "zstd"
    assert layer.compressed_digest == tf.sha256(blob)


def test_a_thousand_components_deep_path_imports_under_the_default_limits(
    store: ls.Store,
) -> None:
    deep = "/".join(["d"] * 1000) + "/f"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo(deep)
        info.size = 2
        t.addfile(info, io.BytesIO(b"x\n"))
    layer = store.import_tar(buf.getvalue())
    assert store.stack([layer]).read_bytes("/" + deep) == b"x\n"


@pytest.mark.root
def test_overlay_xattrs_are_data_never_written_as_overlay_instructions(
    store: ls.Store, tmp_path: Path
) -> None:
    members = [
        tf.dir_("d/", pax={"SCHILY.xattr.trusted.overlay.opaque": "y"}),
        tf.file_("d/f", b"f\n", pax={"SCHILY.xattr.user.kept": "1"}),
    ]
    layer = store.import_tar(tf.py_tar(tarfile.PAX_FORMAT, members=members))
    image = store.stack([layer])
    assert image.stat("/d").xattrs == {"trusted.overlay.opaque": b"y"}  # the view keeps it
    out = tmp_path / "out"
    with pytest.warns(ls.LayerstoreWarning, match=r"/d: xattr \"trusted.overlay.opaque\""):
        store.materialize(image, out)
    assert "trusted.overlay.opaque" not in os.listxattr(out / "d")
    assert os.getxattr(out / "d" / "f", "user.kept") == b"1"
    applied = tmp_path / "applied"
    applied.mkdir()
    with pytest.warns(ls.LayerstoreWarning, match="trusted.overlay.opaque"):
        store.apply(layer, applied)
    assert "trusted.overlay.opaque" not in os.listxattr(applied / "d")


def test_an_entry_beneath_a_symlink_of_the_same_layer_is_refused(store: ls.Store) -> None:
    """`escape -> /x`, then `escape/p`: extraction would write through the link; refused, naming
    both, and nothing is stored."""
    data = tf.py_tar(
        tarfile.PAX_FORMAT,
        members=[
            tf.Member("escape", tarfile.SYMTYPE, linkname="/x", mode=0o777),
            tf.file_("escape/p", b"through\n"),
        ],
    )
    before = store.stats()["layers"]
    with pytest.raises(ls.InvalidLayerError, match=r"escape/p.*beneath.*escape.*symlink"):
        store.import_tar(data)
    assert store.stats()["layers"] == before
    # A symlink the same layer then replaced by a directory is a directory: fine.
    ok = tf.py_tar(
        tarfile.PAX_FORMAT,
        members=[
            tf.Member("d", tarfile.SYMTYPE, linkname="/x", mode=0o777),
            tf.dir_("d/"),
            tf.file_("d/p", b"inside\n"),
        ],
    )
    assert store.stack([store.import_tar(ok)]).read_bytes("/d/p") == b"inside\n"
    # Beneath a symlink of a lower layer is the union's business (the spec's rules), not refused.
    lower = store.import_tar(
        tf.py_tar(tarfile.PAX_FORMAT, members=[tf.Member("l", tarfile.SYMTYPE, linkname="/x")])
    )
    upper = store.import_tar(tf.py_tar(tarfile.PAX_FORMAT, members=[tf.file_("l/p", b"u\n")]))
    assert store.stack([lower, upper]).read_bytes("/l/p") == b"u\n"


def test_invalid_hard_links_are_refused_at_import_or_named_at_stack(store: ls.Store) -> None:
    """A link to a directory the layer made, or to itself, is refused by import (nothing stored);
    one to a path no layer below has is refused by stack(), naming the layer and the entry."""
    before = store.stats()["layers"]
    to_dir = tf.py_tar(
        tarfile.PAX_FORMAT,
        members=[tf.dir_("d/"), tf.Member("l", tarfile.LNKTYPE, linkname="d")],
    )
    with pytest.raises(ls.InvalidLayerError, match=r'hardlink "l" points at the directory "d"'):
        store.import_tar(to_dir)
    to_self = tf.py_tar(tarfile.PAX_FORMAT, members=[tf.Member("s", tarfile.LNKTYPE, linkname="s")])
    with pytest.raises(ls.InvalidLayerError, match="points at itself"):
        store.import_tar(to_self)
    assert store.stats()["layers"] == before
    dangling = store.import_tar(
        tf.py_tar(tarfile.PAX_FORMAT, members=[tf.Member("x", tarfile.LNKTYPE, linkname="gone")])
    )
    with pytest.raises(ls.InvalidLayerError, match=rf'layer {dangling.id}: hardlink "x"'):
        store.stack([dangling])
