"""OCI image layouts and docker archives, checked against umoci and skopeo.

The reference images are built by umoci from real files of this machine (``/etc/apt``,
``/etc/ssl``, ``/usr/share/zoneinfo``), in two layers (the second changes, adds and deletes
files), and copied by skopeo into a docker archive and another layout. What we export must be
accepted by ``umoci unpack`` (whose rootfs must equal our union view), ``skopeo inspect`` and
``skopeo copy``, and what those tools write must import back with the same diff_ids.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import layerstore as ls
import pytest
import tarfixtures as tf
from storeutil import export_bytes

UMOCI = shutil.which("umoci")
SKOPEO = shutil.which("skopeo")
pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(UMOCI is None or SKOPEO is None, reason="umoci and skopeo are needed"),
]

SOURCES = ["/etc/apt", "/etc/ssl", "/usr/share/zoneinfo"]
REF = "org.opencontainers.image.ref.name"


def sh(*args: str | Path) -> str:
    proc = subprocess.run(
        [str(a) for a in args], capture_output=True, check=False, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{args}: {proc.stderr}"
    return proc.stdout


def sha256_file(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def blob(layout: Path, digest: str) -> Path:
    alg, hexd = digest.split(":")
    return layout / "blobs" / alg / hexd


def read_json(path: Path) -> Any:
    return json.loads(path.read_bytes())


def layout_image(layout: Path, name: str | None = None) -> dict[str, Any]:
    """The index entry, manifest and config of the image `name` (or the only one) in a layout."""
    index = read_json(layout / "index.json")
    entries = [
        m for m in index["manifests"] if name is None or m.get("annotations", {}).get(REF) == name
    ]
    assert len(entries) == 1, index
    entry = entries[0]
    manifest = read_json(blob(layout, entry["digest"]))
    config = read_json(blob(layout, manifest["config"]["digest"]))
    return {"entry": entry, "manifest": manifest, "config": config}


# --------------------------------------------------------------------------------------------
# Views: a directory tree and a stack, as comparable dicts


def tree_view(root: Path) -> dict[str, tuple[object, ...]]:
    view: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = "/" + str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                view[rel] = ("symlink", os.readlink(p), st.st_uid, st.st_gid)
            elif stat.S_ISDIR(st.st_mode):
                view[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            else:
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                view[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, digest)
    return view


def stack_view(image: ls.Stack) -> dict[str, tuple[object, ...]]:
    view: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in image.walk("/"):
        for name in dirnames + filenames:
            path = dirpath.rstrip("/") + "/" + name
            st = image.stat(path, follow_symlinks=False)
            if st.kind == "symlink":
                view[path] = ("symlink", st.linkname, st.uid, st.gid)
            elif st.kind == "dir":
                view[path] = ("dir", st.mode, st.uid, st.gid)
            else:
                digest = hashlib.sha256(image.read_bytes(path)).hexdigest()
                view[path] = ("file", st.mode, st.uid, st.gid, digest)
    return view


def diff_ids(image: ls.Stack) -> list[str]:
    return [layer.diff_id for layer in image.layers]


def umoci_unpack(layout: Path, ref: str, bundle: Path) -> Path:
    sh(UMOCI or "umoci", "unpack", "--image", f"{layout}:{ref}", bundle)
    return bundle / "rootfs"


# --------------------------------------------------------------------------------------------
# Reference images


@pytest.fixture(scope="module")
def umoci_image(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A two-layer image built by umoci, its final rootfs, and skopeo's copies of it."""
    base = tmp_path_factory.mktemp("umoci")
    layout, bundle = base / "layout", base / "bundle"
    umoci = UMOCI or "umoci"
    sh(umoci, "init", "--layout", layout)
    sh(umoci, "new", "--image", f"{layout}:t")
    sh(umoci, "unpack", "--image", f"{layout}:t", bundle)
    rootfs = bundle / "rootfs"
    for src in SOURCES:
        dest = rootfs / src.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        sh("cp", "-a", src, dest)
    sh(umoci, "repack", "--refresh-bundle", "--image", f"{layout}:t", bundle)
    # Second layer: a changed file, a new one, a deleted file and a deleted directory.
    (rootfs / "etc/apt/sources.list.d").mkdir(parents=True, exist_ok=True)
    (rootfs / "etc/apt/sources.list.d/extra.list").write_text("deb http://example.invalid x y\n")
    (rootfs / "etc/hostname").write_text("layerstore-test\n")
    shutil.rmtree(rootfs / "usr/share/zoneinfo/Europe")
    (rootfs / "usr/share/zoneinfo/UTC").unlink()
    sh(umoci, "repack", "--image", f"{layout}:t", bundle)
    archive = base / "docker.tar"
    skopeo = SKOPEO or "skopeo"
    sh(skopeo, "copy", "--quiet", f"oci:{layout}:t", f"docker-archive:{archive}:app:t")
    copy = base / "copy"
    sh(skopeo, "copy", "--quiet", f"oci:{layout}:t", f"oci:{copy}:t2")
    return {"layout": layout, "rootfs": rootfs, "archive": archive, "copy": copy}


@pytest.fixture(scope="module")
def rootfs_view(umoci_image: dict[str, Path]) -> dict[str, tuple[object, ...]]:
    return tree_view(umoci_image["rootfs"])


@pytest.fixture
def made(store: ls.Store, tmp_path: Path) -> ls.Stack:
    """An image made in the store: two directory layers, the second with a whiteout."""
    one = tmp_path / "one"
    (one / "etc").mkdir(parents=True)
    (one / "etc/os-release").write_text("ID=layerstore\n")
    (one / "bin").mkdir()
    (one / "bin/tool").write_bytes(os.urandom(300_000))
    (one / "bin/tool").chmod(0o755)
    (one / "gone.txt").write_text("bye\n")
    os.symlink("tool", one / "bin/alias")
    l1 = store.import_dir(one)
    two = tmp_path / "two"
    (two / "etc").mkdir(parents=True)
    (two / "etc/motd").write_text("hello\n")
    (two / ".wh.gone.txt").write_text("")
    l2 = store.import_dir(two)
    return store.stack([l1, l2])


# --------------------------------------------------------------------------------------------
# Import of what umoci and skopeo write


def test_umoci_image_imports_with_its_diff_ids_and_view(
    store: ls.Store, umoci_image: dict[str, Path], rootfs_view: dict[str, tuple[object, ...]]
) -> None:
    layout = umoci_image["layout"]
    images = store.import_oci(layout)
    assert list(images) == ["t"]
    image = images["t"]
    ref = layout_image(layout, "t")
    assert diff_ids(image) == ref["config"]["rootfs"]["diff_ids"]
    assert len(image) == 2
    assert image.digest == ref["entry"]["digest"]
    assert image.config_digest == ref["manifest"]["config"]["digest"]
    assert stack_view(image) == rootfs_view
    # Recorded as a tagged image, with its digests.
    assert list(store.images()) == ["t"]
    assert store.get("t").digest == image.digest
    # umoci's gzip is not what our gzip writes: the blobs are kept as they came.
    for layer in ref["manifest"]["layers"]:
        kept = Path(store.path) / "blobs" / "sha256" / layer["digest"].split(":")[1]
        assert sha256_file(kept) == layer["digest"]


def test_skopeo_copies_import_alike(
    store: ls.Store, umoci_image: dict[str, Path], rootfs_view: dict[str, tuple[object, ...]]
) -> None:
    ref = layout_image(umoci_image["layout"], "t")
    from_archive = store.import_docker_archive(umoci_image["archive"])
    # skopeo writes the normalised name into RepoTags; it is imported as written.
    assert list(from_archive) == ["docker.io/library/app:t"]
    image = from_archive["docker.io/library/app:t"]
    assert diff_ids(image) == ref["config"]["rootfs"]["diff_ids"]
    assert image.config_digest == ref["manifest"]["config"]["digest"]
    assert stack_view(image) == rootfs_view
    copied = store.import_oci(umoci_image["copy"])["t2"]
    assert diff_ids(copied) == diff_ids(image)
    assert copied.digest == layout_image(umoci_image["copy"], "t2")["entry"]["digest"]
    assert copied.chain_id == image.chain_id


@pytest.mark.parametrize(
    "variant",
    [["--format", "v2s2"], ["--dest-compress-format", "zstd"]],
    ids=["docker-v2s2-manifest", "zstd-layers"],
)
def test_skopeo_variants_round_trip(
    store: ls.Store,
    umoci_image: dict[str, Path],
    rootfs_view: dict[str, tuple[object, ...]],
    tmp_path: Path,
    variant: list[str],
) -> None:
    """Docker schema 2 media types, and zstd layers, as skopeo writes them into a layout:
    imported with the right content, exported back digest for digest."""
    src = tmp_path / "src"
    sh(
        SKOPEO or "skopeo",
        "copy",
        "--quiet",
        *variant,
        f"oci:{umoci_image['layout']}:t",
        f"oci:{src}:t",
    )
    ref = layout_image(src, "t")
    types = {layer["mediaType"] for layer in ref["manifest"]["layers"]}
    if variant[0] == "--format":
        assert ref["entry"]["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
        assert types == {"application/vnd.docker.image.rootfs.diff.tar.gzip"}
    else:
        assert types == {"application/vnd.oci.image.layer.v1.tar+zstd"}
    image = store.import_oci(src)["t"]
    assert image.digest == ref["entry"]["digest"]
    assert diff_ids(image) == ref["config"]["rootfs"]["diff_ids"]
    assert stack_view(image) == rootfs_view
    out = tmp_path / "out"
    assert store.export_oci(image, out) == ref["entry"]["digest"]
    back = layout_image(out, "t")
    assert back["entry"]["mediaType"] == ref["entry"]["mediaType"]
    for layer in ref["manifest"]["layers"]:
        assert blob(out, layer["digest"]).read_bytes() == blob(src, layer["digest"]).read_bytes()
    if variant[0] != "--format":
        # skopeo 1.9 reads no docker-typed entry from a layout (not even the one it wrote).
        assert (
            json.loads(sh(SKOPEO or "skopeo", "inspect", f"oci:{out}:t"))["Digest"] == image.digest
        )


def test_full_reference_names_and_platforms(
    store: ls.Store, made: ls.Stack, tmp_path: Path
) -> None:
    """A nested multi-platform index named `example.com/app:v1`, with an attestation and an
    artifact beside the images: each platform picks its image; the others are skipped."""
    layout = tmp_path / "multi"
    amd = made
    arm = store.stack(made.layers[:1])
    store.export_oci(amd, layout, tag="amd")
    store.export_oci(arm, layout, tag="arm")
    index = read_json(layout / "index.json")
    by_tag = {m["annotations"][REF]: m for m in index["manifests"]}

    def platform_entry(entry: dict[str, Any], arch: str) -> dict[str, Any]:
        out = {k: entry[k] for k in ("mediaType", "digest", "size")}
        out["platform"] = {"os": "linux", "architecture": arch}
        return out

    attestation = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": "sha256:" + "0" * 64,  # absent: skipped before it is read
        "size": 10,
        "annotations": {"vnd.docker.reference.type": "attestation-manifest"},
        "platform": {"os": "unknown", "architecture": "unknown"},
    }
    nested = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            platform_entry(by_tag["amd"], "amd64"),
            platform_entry(by_tag["arm"], "arm64"),
            attestation,
        ],
    }
    nested_bytes = json.dumps(nested).encode()
    nested_digest = "sha256:" + hashlib.sha256(nested_bytes).hexdigest()
    blob(layout, nested_digest).write_bytes(nested_bytes)
    artifact = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.example.sbom",
        "digest": "sha256:" + "1" * 64,
        "size": 10,
    }
    top = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": nested_digest,
                "size": len(nested_bytes),
                "annotations": {REF: "example.com/app:v1"},
            },
            artifact,
        ],
    }
    (layout / "index.json").write_text(json.dumps(top))
    fresh = ls.Store(tmp_path / "fresh")
    got = fresh.import_oci(layout, platform="linux/arm64")
    assert list(got) == ["example.com/app:v1"]
    assert diff_ids(got["example.com/app:v1"]) == diff_ids(arm)
    assert got["example.com/app:v1"].digest == by_tag["arm"]["digest"]
    other = ls.Store(tmp_path / "other")
    got = other.import_oci(layout, platform="linux/amd64")
    assert diff_ids(got["example.com/app:v1"]) == diff_ids(amd)
    with pytest.raises(ls.NotFoundError, match="linux/s390x"):
        ls.Store(tmp_path / "none").import_oci(layout, platform="linux/s390x")
    with pytest.raises(ValueError, match="platform"):
        ls.Store(tmp_path / "bad").import_oci(layout, platform="linux")


# --------------------------------------------------------------------------------------------
# Export, checked by umoci and skopeo


def test_round_trip_keeps_every_digest(
    store: ls.Store, umoci_image: dict[str, Path], tmp_path: Path
) -> None:
    layout = umoci_image["layout"]
    image = store.import_oci(layout)["t"]
    out = tmp_path / "out"
    digest = store.export_oci(image, out)
    ref, back = layout_image(layout, "t"), layout_image(out, "t")
    assert digest == ref["entry"]["digest"] == back["entry"]["digest"]
    assert back["manifest"] == ref["manifest"]
    for d in [ref["entry"]["digest"], ref["manifest"]["config"]["digest"]] + [
        layer["digest"] for layer in ref["manifest"]["layers"]
    ]:
        assert blob(out, d).read_bytes() == blob(layout, d).read_bytes()
    again = ls.Store(tmp_path / "again").import_oci(out)["t"]
    assert (again.digest, again.config_digest) == (image.digest, image.config_digest)
    assert diff_ids(again) == diff_ids(image)


def test_exported_layout_is_accepted_by_umoci_and_skopeo(
    store: ls.Store, made: ls.Stack, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    digest = store.export_oci(made, out, tag="v1")
    assert made.digest == digest
    info = layout_image(out, "v1")
    assert info["config"]["rootfs"] == {"type": "layers", "diff_ids": diff_ids(made)}
    assert len(info["config"]["history"]) == 2
    assert all(
        layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        for layer in info["manifest"]["layers"]
    )
    inspected = json.loads(sh(SKOPEO or "skopeo", "inspect", f"oci:{out}:v1"))
    assert inspected["Digest"] == digest
    assert inspected["Layers"] == [layer["digest"] for layer in info["manifest"]["layers"]]
    rootfs = umoci_unpack(out, "v1", tmp_path / "bundle")
    assert tree_view(rootfs) == stack_view(made)
    assert not (rootfs / "gone.txt").exists()
    # skopeo copies it into a docker archive and a layout; both import with the same diff_ids.
    archive = tmp_path / "d.tar"
    sh(SKOPEO or "skopeo", "copy", "--quiet", f"oci:{out}:v1", f"docker-archive:{archive}:app:v1")
    sh(SKOPEO or "skopeo", "copy", "--quiet", f"oci:{out}:v1", f"oci:{tmp_path / 'c'}:c")
    other = ls.Store(tmp_path / "other")
    from_archive = other.import_docker_archive(archive)["docker.io/library/app:v1"]
    assert diff_ids(from_archive) == diff_ids(made)
    assert diff_ids(other.import_oci(tmp_path / "c")["c"]) == diff_ids(made)


def test_export_is_deterministic_and_adds_to_a_layout(
    store: ls.Store, made: ls.Stack, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    first = store.export_oci(made, a, tag="v1")
    second = store.export_oci(made, b, tag="v1")
    assert first == second
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes()
    base = store.stack(made.layers[:1])
    base_digest = store.export_oci(base, a, tag="base")
    index = read_json(a / "index.json")
    assert {m["annotations"][REF]: m["digest"] for m in index["manifests"]} == {
        "v1": first,
        "base": base_digest,
    }
    assert not [p for p in a.iterdir() if p.name.startswith(".")]
    for tag in ("v1", "base"):
        sh(SKOPEO or "skopeo", "inspect", f"oci:{a}:{tag}")
    # Re-tagging replaces the entry of that name.
    store.export_oci(base, a, tag="v1")
    index = read_json(a / "index.json")
    assert {m["annotations"][REF]: m["digest"] for m in index["manifests"]} == {
        "v1": base_digest,
        "base": base_digest,
    }


@pytest.mark.parametrize("compression", ["zstd", "none", "gzip"])
def test_compressions_round_trip(
    store: ls.Store, made: ls.Stack, tmp_path: Path, compression: str
) -> None:
    out = tmp_path / "out"
    digest = store.export_oci(made, out, tag="v1", compression=compression)
    info = layout_image(out, "v1")
    suffix = {"zstd": "+zstd", "none": "", "gzip": "+gzip"}[compression]
    for layer, diff_id in zip(info["manifest"]["layers"], diff_ids(made), strict=True):
        assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar" + suffix
        assert sha256_file(blob(out, layer["digest"])) == layer["digest"]
        if compression == "none":
            assert layer["digest"] == diff_id
    fresh = ls.Store(tmp_path / "fresh")
    image = fresh.import_oci(out)["v1"]
    assert (image.digest, diff_ids(image)) == (digest, diff_ids(made))
    # Our own gzip and zstd are reproducible: nothing needs keeping beside the chunks.
    kept = Path(fresh.path) / "blobs" / "sha256"
    assert not kept.exists() or not list(kept.iterdir())
    again = tmp_path / "again"
    assert fresh.export_oci(image, again) == digest


@pytest.mark.parametrize("kind", ["oci", "docker-oci", "docker-classic"])
def test_image_imports_report_what_import_tar_reports(
    store: ls.Store, tmp_path: Path, kind: str
) -> None:
    """A layer with an absolute member name warns through every import path, naming the layer
    blob (before, import_oci and import_docker_archive said nothing)."""
    members = [tf.file_("/abs", b"absolute\n"), tf.file_("rel", b"relative\n")]
    data = tf.py_tar(tarfile.GNU_FORMAT, members=members)
    with pytest.warns(ls.LayerstoreWarning, match="leading '/' removed") as direct:
        layer = store.import_tar(data)
    image = store.stack([layer])
    dest = tmp_path / "image"
    fresh = ls.Store(tmp_path / "fresh")
    with pytest.warns(ls.LayerstoreWarning) as said:
        if kind == "oci":
            store.export_oci(image, dest, tag="example.com/app:v1")
            images = fresh.import_oci(dest)
        else:
            store.export_docker_archive(
                image, dest, tag="example.com/app:v1", format=kind.split("-")[1]
            )
            images = fresh.import_docker_archive(dest)
    assert len(said) == len(direct) == 1
    assert re.fullmatch(rf"layer \S+: {re.escape(str(direct[0].message))}", str(said[0].message))
    assert images["example.com/app:v1"].read_bytes("/abs") == b"absolute\n"


# --------------------------------------------------------------------------------------------
# Docker archives


@pytest.mark.parametrize("fmt", ["oci", "classic"])
def test_docker_archive_round_trip(
    store: ls.Store, made: ls.Stack, tmp_path: Path, fmt: str
) -> None:
    archive = tmp_path / "image.tar"
    store.export_docker_archive(made, archive, tag="example.com/app:v1", format=fmt)
    names = sh("tar", "-tf", archive).split()
    assert "manifest.json" in names and "repositories" in names
    assert ("oci-layout" in names) == (fmt == "oci")
    inspected = json.loads(sh(SKOPEO or "skopeo", "inspect", f"docker-archive:{archive}"))
    assert inspected["Layers"] == diff_ids(made)
    fresh = ls.Store(tmp_path / "fresh")
    images = fresh.import_docker_archive(archive)
    assert list(images) == ["example.com/app:v1"]
    image = images["example.com/app:v1"]
    assert diff_ids(image) == diff_ids(made)
    assert stack_view(image) == stack_view(made)
    # skopeo reads it too, and what it writes from it imports alike.
    sh(
        SKOPEO or "skopeo",
        "copy",
        "--quiet",
        f"docker-archive:{archive}",
        f"oci:{tmp_path / 'o'}:o",
    )
    assert diff_ids(fresh.import_oci(tmp_path / "o")["o"]) == diff_ids(made)


@pytest.mark.parametrize("fmt", ["classic", "oci"])
def test_docker_archive_export_streams_and_a_corrupt_layer_leaves_nothing(
    store: ls.Store, made: ls.Stack, tmp_path: Path, fmt: str
) -> None:
    """Layers stream from the store into the archive (nothing is staged under the store's tmp/);
    a chunk that fails its check mid-way is an IntegrityError and leaves no archive behind."""
    twice = store.stack([*made.layers, made.layers[0]])  # a layer twice: one member
    archive = tmp_path / "image.tar"
    staged: list[list[Path]] = []
    tmp = Path(store.path) / "tmp"

    def progress(done: int) -> None:
        staged.append(list(tmp.iterdir()))

    store.export_docker_archive(twice, archive, tag="app:v1", format=fmt, progress=progress)
    assert staged and not any(staged), staged[:3]
    names = sh("tar", "-tf", archive).split()
    assert len(names) == len(set(names))
    back = ls.Store(tmp_path / "back").import_docker_archive(archive)["app:v1"]
    assert diff_ids(back) == diff_ids(twice)
    packs = Path(store.path) / "packs"
    big = max(packs.iterdir(), key=lambda p: p.stat().st_size)
    raw = bytearray(big.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    big.write_bytes(bytes(raw))
    out = tmp_path / "out" / "again.tar"
    out.parent.mkdir()
    with pytest.raises(ls.IntegrityError):
        store.export_docker_archive(made, out, tag="app:v1", format=fmt)
    assert list(out.parent.iterdir()) == []
    assert not list((Path(store.path) / "tmp").iterdir())


def test_docker_archive_round_trip_keeps_config(
    store: ls.Store, umoci_image: dict[str, Path], tmp_path: Path
) -> None:
    image = store.import_docker_archive(umoci_image["archive"])["docker.io/library/app:t"]
    out = tmp_path / "again.tar"
    store.export_docker_archive(image, out, tag="app:t")
    back = ls.Store(tmp_path / "back").import_docker_archive(out)["app:t"]
    assert back.config_digest == image.config_digest
    assert diff_ids(back) == diff_ids(image)


def test_gzipped_docker_archive_imports(store: ls.Store, made: ls.Stack, tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    store.export_docker_archive(made, archive, tag="app:v1", format="classic")
    sh("gzip", "-k", archive)
    images = ls.Store(tmp_path / "fresh").import_docker_archive(tmp_path / "image.tar.gz")
    assert diff_ids(images["app:v1"]) == diff_ids(made)


# --------------------------------------------------------------------------------------------
# Bad input: a typed error naming the blob, and the store unchanged


def _state(store: ls.Store) -> tuple[list[str], list[str], list[str]]:
    kept = Path(store.path) / "blobs" / "sha256"
    return (
        sorted(layer.id for layer in store.layers()),
        sorted(store.images()),
        sorted(p.name for p in kept.iterdir()) if kept.exists() else [],
    )


def _rewrite_manifest(layout: Path, change: Any) -> None:
    """Apply `change` to the only manifest and point index.json at the new bytes."""
    index = read_json(layout / "index.json")
    entry = index["manifests"][0]
    manifest = read_json(blob(layout, entry["digest"]))
    change(manifest)
    data = json.dumps(manifest).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blob(layout, digest).write_bytes(data)
    entry.update(digest=digest, size=len(data))
    (layout / "index.json").write_text(json.dumps(index))


def _top_layer(layout: Path) -> Path:
    return blob(layout, layout_image(layout)["manifest"]["layers"][-1]["digest"])


def _unknown_type(m: dict[str, Any]) -> None:
    m["layers"][-1]["mediaType"] = "application/vnd.example.layer"


def _wrong_size(m: dict[str, Any]) -> None:
    m["layers"][-1]["size"] += 1


def _name_not_a_tag(layout: Path) -> None:
    index = read_json(layout / "index.json")
    index["manifests"][0]["annotations"][REF] = "my app"
    (layout / "index.json").write_text(json.dumps(index))


BREAKAGES: dict[str, tuple[Callable[[Path], object], type[Exception], str]] = {
    "missing-blob": (lambda layout: _top_layer(layout).unlink(), ls.IntegrityError, "missing"),
    "digest-mismatch": (
        lambda layout: _top_layer(layout).write_bytes(
            _top_layer(layout).read_bytes().replace(b"hello\n", b"jello\n")
        ),
        ls.IntegrityError,
        "digest mismatch",
    ),
    "size-mismatch": (
        lambda layout: _rewrite_manifest(layout, _wrong_size),
        ls.IntegrityError,
        "size mismatch",
    ),
    "malformed-json": (
        lambda layout: (layout / "index.json").write_text('{"manifests": ['),
        ls.InvalidLayerError,
        "malformed JSON",
    ),
    "unknown-media-type": (
        lambda layout: _rewrite_manifest(layout, _unknown_type),
        ls.InvalidLayerError,
        "unknown layer media type",
    ),
    "name-not-a-tag": (_name_not_a_tag, ls.InvalidLayerError, 'image name "my app"'),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_bad_layouts_change_nothing(
    store: ls.Store, made: ls.Stack, tmp_path: Path, breakage: str
) -> None:
    layout = tmp_path / "layout"
    store.export_oci(made, layout, tag="v1", compression="none")
    top = layout_image(layout)["manifest"]["layers"][-1]["digest"]
    breaker, error, message = BREAKAGES[breakage]
    breaker(layout)
    fresh = ls.Store(tmp_path / "fresh")
    store.export_tar(made.layers[0], tmp_path / "l0.tar")
    fresh.import_tar(tmp_path / "l0.tar")  # a layer the image shares: it must stay
    before = _state(fresh)
    with pytest.raises(error, match=message) as info:
        fresh.import_oci(layout)
    if breakage not in ("malformed-json", "name-not-a-tag"):
        assert top in str(info.value)
    assert _state(fresh) == before
    assert fresh.fsck()["ok"]


def test_failure_after_a_layer_rolls_it_back(
    store: ls.Store, made: ls.Stack, tmp_path: Path
) -> None:
    """The bottom layer imports, the top one is corrupt: the bottom one is removed again."""
    layout = tmp_path / "layout"
    store.export_oci(made, layout, tag="v1")
    top = _top_layer(layout)
    data = bytearray(top.read_bytes())
    data[len(data) // 2] ^= 0xFF
    top.write_bytes(bytes(data))
    fresh = ls.Store(tmp_path / "fresh")
    with pytest.raises(ls.LayerstoreError) as info:
        fresh.import_oci(layout)
    assert top.name in str(info.value)
    assert _state(fresh) == ([], [], [])
    assert not list((Path(fresh.path) / "tmp").iterdir())


def test_failure_to_record_the_images_rolls_the_layers_back(
    store: ls.Store, made: ls.Stack, tmp_path: Path
) -> None:
    """Every layer imports, then recording the images fails (the store's blob directory cannot
    be made): no layer, image or tag stays."""
    layout = tmp_path / "layout"
    store.export_oci(made, layout, tag="v1")
    fresh = ls.Store(tmp_path / "fresh")
    (Path(fresh.path) / "blobs").write_text("in the way\n")
    with pytest.raises(OSError):
        fresh.import_oci(layout)
    assert sorted(layer.id for layer in fresh.layers()) == []
    assert fresh.images() == {}
    (Path(fresh.path) / "blobs").unlink()
    assert fresh.fsck()["ok"]
    assert list(fresh.import_oci(layout)) == ["v1"]
    assert fresh.get("v1").chain_id == made.chain_id


def _on_layer_start(nth: int, then: Callable[[], None]) -> Callable[[int], None]:
    """A progress callback running `then` when the `nth` layer import of a call starts (each
    reports 0 on its first block, once every layer before it has committed)."""
    starts = itertools.count(1)

    def progress(done: int) -> None:
        if done == 0 and next(starts) == nth:
            then()

    return progress


def test_failed_import_keeps_a_layer_another_import_is_using(
    store: ls.Store, made: ls.Stack, tmp_path: Path
) -> None:
    """Two imports of images sharing the bottom layer L, through two handles on one store: A
    creates L, B finds it, A fails on its corrupt next blob and undoes what it created while B
    is still importing; B then commits. L must survive A's undo."""
    shared = made.layers[0]
    only_b = tmp_path / "only-b"
    only_b.mkdir()
    (only_b / "b.txt").write_text("only in B\n")
    layout_a, layout_b = tmp_path / "a", tmp_path / "b"
    store.export_oci(made, layout_a, tag="a:v1", compression="none")
    image_b = store.stack([shared, store.import_dir(only_b)])
    store.export_oci(image_b, layout_b, tag="b:v1", compression="none")
    top = _top_layer(layout_a)
    data = bytearray(top.read_bytes())
    data[len(data) // 2] ^= 0xFF
    top.write_bytes(bytes(data))

    root = tmp_path / "shared-store"
    a, b = ls.Store(root), ls.Store(root)
    a_made_l, b_has_l, a_failed = threading.Event(), threading.Event(), threading.Event()
    result: dict[str, Any] = {}

    def pause(done: threading.Event, wait_for: threading.Event) -> None:
        done.set()
        assert wait_for.wait(60)

    def import_b() -> None:
        assert a_made_l.wait(60)
        try:
            progress = _on_layer_start(2, lambda: pause(b_has_l, a_failed))
            result["images"] = b.import_oci(layout_b, progress=progress)
        except Exception as e:  # reported by the main thread
            result["error"] = e

    thread = threading.Thread(target=import_b)
    thread.start()
    try:
        with pytest.raises(ls.LayerstoreError) as info:
            a.import_oci(layout_a, progress=_on_layer_start(2, lambda: pause(a_made_l, b_has_l)))
        assert top.name in str(info.value)
    finally:
        a_failed.set()
        thread.join(120)
    assert "error" not in result, result.get("error")
    assert shared.id in {layer.id for layer in a.layers()}
    image = a.get("b:v1")
    assert [layer.diff_id for layer in image.layers] == [layer.diff_id for layer in image_b.layers]
    for layer in image.layers:
        blob_bytes = export_bytes(a, layer)
        assert "sha256:" + hashlib.sha256(blob_bytes).hexdigest() == layer.diff_id
    assert a.fsck()["ok"]


def _rewritten_docker_archive(
    store: ls.Store, made: ls.Stack, tmp_path: Path, change: Callable[[Path, Any], None]
) -> Path:
    """A classic docker archive of `made` whose `manifest.json` (and members) `change` edits in
    the extracted tree `work`."""
    archive = tmp_path / "image.tar"
    store.export_docker_archive(made, archive, tag="app:v1", format="classic")
    work = tmp_path / "x"
    work.mkdir()
    sh("tar", "-xf", archive, "-C", work)
    manifest = read_json(work / "manifest.json")
    change(work, manifest)
    (work / "manifest.json").write_text(json.dumps(manifest))
    broken = tmp_path / "broken.tar"
    sh("tar", "-cf", broken, "-C", work, ".")
    return broken


def test_bad_docker_archive_changes_nothing(
    store: ls.Store, made: ls.Stack, tmp_path: Path
) -> None:
    def wrong_diff_id(work: Path, manifest: Any) -> None:
        config = work / manifest[0]["Config"]
        doc = read_json(config)
        doc["rootfs"]["diff_ids"][-1] = "sha256:" + "a" * 64
        config.write_text(json.dumps(doc))
        new_name = hashlib.sha256(config.read_bytes()).hexdigest() + ".json"
        config.rename(work / new_name)
        manifest[0]["Config"] = new_name

    broken = _rewritten_docker_archive(store, made, tmp_path, wrong_diff_id)
    fresh = ls.Store(tmp_path / "fresh")
    with pytest.raises(ls.IntegrityError, match="diff_id"):
        fresh.import_docker_archive(broken)
    assert _state(fresh) == ([], [], [])


def test_docker_archive_with_a_name_that_cannot_be_a_tag_changes_nothing(
    store: ls.Store, made: ls.Stack, tmp_path: Path
) -> None:
    def bad_name(work: Path, manifest: Any) -> None:
        manifest[0]["RepoTags"] = ["app:v1", "my app:v1"]

    broken = _rewritten_docker_archive(store, made, tmp_path, bad_name)
    fresh = ls.Store(tmp_path / "fresh")
    with pytest.raises(ls.InvalidLayerError, match=r'manifest\.json: image name "my app:v1"'):
        fresh.import_docker_archive(broken)
    assert _state(fresh) == ([], [], [])


# --------------------------------------------------------------------------------------------
# Command line


def cli(store: Path, *args: str | Path) -> Any:
    out = sh(sys.executable, "-m", "layerstore", "--store", store, "--json", *args)
    return json.loads(out)


def test_cli_imports_images_and_exports_every_format(
    umoci_image: dict[str, Path], tmp_path: Path
) -> None:
    store = tmp_path / "store"
    ref = layout_image(umoci_image["layout"], "t")
    got = cli(store, "import", umoci_image["layout"], umoci_image["archive"])
    assert [sorted(r["images"]) for r in got] == [["t"], ["docker.io/library/app:t"]]
    assert got[0]["images"]["t"]["digest"] == ref["entry"]["digest"]
    assert (
        got[1]["images"]["docker.io/library/app:t"]["layers"] == ref["config"]["rootfs"]["diff_ids"]
    )
    out = tmp_path / "out"
    doc = cli(store, "export", "--format", "oci", "t", out, "--tag", "v2")
    assert doc["digest"] == ref["entry"]["digest"]
    assert json.loads(sh(SKOPEO or "skopeo", "inspect", f"oci:{out}:v2"))["Digest"] == doc["digest"]
    for classic in ([], ["--classic"]):
        archive = tmp_path / f"d{len(classic)}.tar"
        cli(store, "export", "--format", "docker", "t", archive, "--tag", "app:v2", *classic)
        inspected = json.loads(sh(SKOPEO or "skopeo", "inspect", f"docker-archive:{archive}"))
        assert inspected["Layers"] == ref["config"]["rootfs"]["diff_ids"]
    layer = ref["config"]["rootfs"]["diff_ids"][0]
    doc = cli(store, "export", "--format", "tar", layer, tmp_path / "l.tar")
    assert doc["digest"] == layer == sha256_file(tmp_path / "l.tar")
    # A plain layer tar is still a layer, not an archive.
    assert [r["diff_id"] for r in cli(store, "import", tmp_path / "l.tar")] == [layer]
    bad = subprocess.run(
        [sys.executable, "-m", "layerstore", "--store", str(store), "import", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1


def test_synthesised_history_names_build_steps(
    store: ls.Store, made: ls.Stack, tmp_path: Path
) -> None:
    with made.container() as c:
        c.write_bytes("/etc/extra", b"x\n")
        layer = c.commit(created_by="RUN echo x > /etc/extra")
    image = made.push(layer)
    store.export_oci(image, tmp_path / "o", tag="h")
    history = layout_image(tmp_path / "o", "h")["config"]["history"]
    created = datetime.fromtimestamp(layer.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert history[-1] == {"created": created, "created_by": layer.created_by}
    config = layout_image(tmp_path / "o", "h")["config"]
    assert config["created"] == max(
        datetime.fromtimestamp(x.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") for x in image.layers
    )
    assert history[0]["created_by"] == f"layerstore: layer {made.layers[0].id}"


def test_gc_and_fsck_know_kept_blobs(store: ls.Store, umoci_image: dict[str, Path]) -> None:
    image = store.import_oci(umoci_image["layout"])["t"]
    kept = Path(store.path) / "blobs" / "sha256"
    files = sorted(kept.iterdir())
    assert len(files) == len(image)
    assert store.fsck()["ok"]
    data = files[0].read_bytes()
    files[0].unlink()
    problems = store.fsck()["problems"]
    assert len(problems) == 1 and files[0].name in problems[0]
    files[0].write_bytes(data)
    store.gc()
    assert sorted(kept.iterdir()) == files  # still used
    store.untag("t")
    for layer in reversed(image.layers):
        store.delete(layer)
    old = 1_000_000_000
    for f in files:
        os.utime(f, (old, old))  # older than the grace period
    store.gc()
    assert not list(kept.iterdir())
    assert store.fsck()["ok"]


def test_write_image_records_a_config_over_stored_layers(
    store: ls.Store, made: ls.Stack, tmp_path: Path
) -> None:
    """A config written over layers already stored: recorded, tagged, exported as written."""
    diff_ids = [layer.diff_id for layer in made.layers]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["A=1"], "Cmd": ["/bin/tool"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "one"}, {"created_by": "two"}],
    }
    data = json.dumps(config).encode()
    image = store.write_image(made, data, tag="written")
    assert image.config_digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert store.get("written").config_digest == image.config_digest
    assert store.oci_blob(image.config_digest)[1] == data
    digest = store.export_oci(store.get("written"), tmp_path / "o", tag="w")
    assert digest == image.digest
    exported = layout_image(tmp_path / "o", "w")
    assert exported["config"] == config
    assert [d["digest"] for d in exported["manifest"]["layers"]] == diff_ids
    wrong = {**config, "rootfs": {"type": "layers", "diff_ids": diff_ids[:1]}}
    with pytest.raises(ValueError, match="diff_ids"):
        store.write_image(made, json.dumps(wrong).encode(), tag="bad")
    with pytest.raises(ls.NotFoundError):
        store.get("bad")


def test_a_bare_stack_takes_a_config_only_while_its_layers_have_one(
    store: ls.Store, made: ls.Stack
) -> None:
    """Untagged, a stack of layers has the config recorded for them while there is one; once a
    config-only image (a build of ENV/CMD lines) shares the layers, a bare stack is neither."""
    diff_ids = [layer.diff_id for layer in made.layers]

    def config(cmd: str) -> bytes:
        doc = {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": [cmd]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
        return json.dumps(doc).encode()

    first = store.write_image(made, config("/first"), tag="first")
    assert store.stack(made.layers).config_digest == first.config_digest
    again = store.write_image(made, config("/first"), tag="again")
    assert again.config_digest == first.config_digest
    assert store.stack(made.layers).config_digest == first.config_digest
    second = store.write_image(made, config("/second"), tag="second")
    bare = store.stack(made.layers)
    assert bare.config_digest is None and bare.digest is None
    # Tags still name their own images.
    assert store.get("first").config_digest == first.config_digest
    assert store.get("second").config_digest == second.config_digest
