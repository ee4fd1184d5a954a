"""Cross-check of the directory diff with a real peer: umoci.

umoci builds an image from a tree (v1) and then repacks the changed tree (v2) as a second
layer: its changeset. Ours is ``store.diff(image_v1, v2_dir)``. Each, stacked on umoci's own v1
layer, must give the same view (umoci's tar and ours are different bytes: order, headers,
markers — the views must not differ). The tree mixes a copy of real system files with
generated edits: changed, deleted, replaced-kind, new files, a deleted directory, a recreated
directory, metadata-only changes, symlinks and a hard link.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import layerstore as ls
import pytest

UMOCI = shutil.which("umoci")


def umoci(*args: str) -> None:
    assert UMOCI is not None
    subprocess.run([UMOCI, *args], check=True, capture_output=True)


def layer_blobs(layout: Path, tag: str) -> list[Path]:
    index = json.loads((layout / "index.json").read_text())
    (desc,) = [
        m
        for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
    ]
    algo, hexd = desc["digest"].split(":")
    manifest = json.loads((layout / "blobs" / algo / hexd).read_text())
    return [layout / "blobs" / Path(*lay["digest"].split(":")) for lay in manifest["layers"]]


def view(image: ls.Stack) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in image.walk():
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = image.stat(p, follow_symlinks=False)
            extra = image.read_bytes(p) if st.kind == "file" else st.linkname
            out[p] = (st.kind, st.mode, st.uid, st.gid, st.mtime_ns, extra)
    return out


def assert_same_view(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Equal but for mtimes, which need only fall in the same second: umoci writes whole
    seconds (the directory time it read, truncated), ours keep nanoseconds."""
    no_time = {p: (*v[:4], v[5]) for p, v in got.items()}
    assert no_time == {p: (*v[:4], v[5]) for p, v in want.items()}
    for p, v in got.items():
        assert abs(v[4] - want[p][4]) < 10**9, (p, v[4], want[p][4])


def make_v1(root: Path) -> None:
    shutil.copytree("/usr/share/doc/tar", root / "usr/share/doc/tar", symlinks=True)
    shutil.copytree("/etc/apt", root / "etc/apt", symlinks=True)
    (root / "var/lib/app").mkdir(parents=True)
    for i in range(20):
        (root / f"var/lib/app/f{i}").write_bytes(os.urandom(1000 * i))
    (root / "opt/old").mkdir(parents=True)
    (root / "opt/old/x").write_bytes(b"x")
    (root / "opt/keep").mkdir()
    (root / "opt/keep/a").write_bytes(b"a")
    (root / "opt/keep/b").write_bytes(b"b")
    os.symlink("../var/lib/app/f1", root / "opt/link")
    os.link(root / "var/lib/app/f2", root / "opt/hard")


def make_v2(root: Path) -> None:
    (root / "var/lib/app/f3").write_bytes(b"changed")
    (root / "var/lib/app/f4").unlink()
    (root / "var/lib/app/f5").unlink()
    (root / "var/lib/app/f5").mkdir()  # a file replaced by a directory
    (root / "var/lib/app/f5/inner").write_bytes(b"in")
    os.chmod(root / "var/lib/app/f6", 0o600)  # metadata only
    os.chown(root / "var/lib/app/f7", 1000, 1000)
    shutil.rmtree(root / "opt/old")
    shutil.rmtree(root / "opt/keep")
    (root / "opt/keep").mkdir()  # deleted and recreated
    (root / "opt/keep/c").write_bytes(b"c")
    os.unlink(root / "opt/link")
    os.symlink("/etc/apt", root / "opt/link")
    (root / "new.txt").write_bytes(b"new")
    with open(root / "opt/hard", "ab") as f:  # both paths of the link change
        f.write(b"+")


@pytest.mark.root
def test_our_diff_and_umoci_repack_give_the_same_view(store: ls.Store, tmp_path: Path) -> None:
    if UMOCI is None:
        pytest.fail("umoci is missing (Debian package umoci, installed by .ci/run)")
    layout, bundle = tmp_path / "layout", tmp_path / "bundle"
    umoci("init", "--layout", str(layout))
    umoci("new", "--image", f"{layout}:v1")
    umoci("unpack", "--image", f"{layout}:v1", str(bundle))
    rootfs = bundle / "rootfs"
    make_v1(rootfs)
    umoci("repack", "--image", f"{layout}:v1", str(bundle))
    shutil.rmtree(bundle)
    umoci("unpack", "--image", f"{layout}:v1", str(bundle))
    (v1_blob,) = layer_blobs(layout, "v1")
    base = store.stack([store.import_tar(v1_blob)])

    make_v2(rootfs)
    ours = store.diff(base, rootfs)
    umoci("repack", "--image", f"{layout}:v2", str(bundle))
    blobs = layer_blobs(layout, "v2")
    assert blobs[0] == v1_blob and len(blobs) == 2
    theirs = store.import_tar(blobs[1])

    want = view(base.push(theirs))
    got = view(base.push(ours))
    assert_same_view(got, want)
    kinds = {(e.path, e.kind) for e in ours.entries()}
    assert ("/opt/.wh.old", "whiteout") in kinds
    assert ("/opt/keep/.wh..wh..opq", "opaque") in kinds
    assert store.changes(base.push(ours), rootfs) == []
