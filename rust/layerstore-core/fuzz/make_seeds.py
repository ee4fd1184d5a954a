"""Write the seed corpora of the fuzz targets into corpus/<target>/ (small, committed).

Run from anywhere: ``python3 rust/layerstore-core/fuzz/make_seeds.py``. Tars come from the test
fixtures (``tests/tarfixtures.py``: Python's tarfile in three formats, and the ways other
producers differ) and from GNU tar (including a sparse file); compressed streams from gzip and
the zstd command; OCI documents are templates in the format ``fuzz_targets/oci_parse.rs``
describes. Deterministic: running it again rewrites the same bytes.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO / "tests"))
# tarfixtures imports zstandard for helpers we do not call; the zstd command stands in for it.
sys.modules.setdefault("zstandard", types.ModuleType("zstandard"))
import tarfixtures as tf  # noqa: E402

CORPUS = HERE / "corpus"


def put(target: str, name: str, data: bytes) -> None:
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def small_members(fmt: int) -> list[tf.Member]:
    """The fixture members of a format, minus the large files (seeds stay a few KB)."""
    return [m for m in tf.py_members(fmt) if len(m.data) <= 1024]


def zstd(data: bytes, *args: str) -> bytes:
    return subprocess.run(
        ["zstd", "-q", "-c", *args], input=data, capture_output=True, check=True
    ).stdout


def gnu_sparse_tar(fmt: str, sparse_format: str | None) -> bytes:
    """GNU tar of a tiny tree holding a sparse file (1 MiB, two 4 KiB data extents)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "t"
        root.mkdir()
        (root / "a.txt").write_bytes(b"hello\n")
        (root / "dir").mkdir()
        with open(root / "dir" / "sparse.bin", "wb") as f:
            f.truncate(1 << 20)
            f.seek(8192)
            f.write(b"x" * 512)
            f.seek(900_000)
            f.write(b"y" * 100)
        (root / "link").symlink_to("a.txt")
        for p in [*root.rglob("*"), root]:
            os.utime(p, ns=(tf.EPOCH_NS, tf.EPOCH_NS), follow_symlinks=False)
        args = ["tar", f"--format={fmt}", "--numeric-owner", "--sort=name", "--sparse"]
        if sparse_format:
            args.append(f"--sparse-version={sparse_format}")
        args += ["--owner=0", "--group=0", "--mtime=@1600000000"]
        args += ["-C", str(root), "-cf", "-", "."]
        out = subprocess.run(args, capture_output=True, check=True).stdout
        return tf.without_record_padding(out)


def tars() -> dict[str, bytes]:
    pax = tf.py_tar(tarfile.PAX_FORMAT, members=small_members(tarfile.PAX_FORMAT))
    gnu = tf.py_tar(tarfile.GNU_FORMAT, members=small_members(tarfile.GNU_FORMAT))
    ustar = tf.py_tar(tarfile.USTAR_FORMAT, members=small_members(tarfile.USTAR_FORMAT))
    tiny = tf.simple_tar({"etc/hostname": b"layerstore\n", "bin/sh": b"#!\n"})
    return {
        "pax.tar": tf.without_record_padding(pax),
        "gnu.tar": tf.without_record_padding(gnu),
        "ustar.tar": tf.without_record_padding(ustar),
        "tiny-record-padded.tar": tiny,
        "tiny-base256.tar": tf.without_record_padding(tf.with_base256_fields(tiny)),
        "tiny-nonzero-padding.tar": tf.without_record_padding(tf.with_nonzero_padding(tiny)),
        "tiny-checksum-leading-spaces.tar": tf.without_record_padding(
            tf.with_checksum_style(tiny, "leading-spaces")
        ),
        "tiny-lone-zero-block.tar": tf.with_lone_zero_block(tf.without_record_padding(tiny)),
        "gnutar-oldgnu-sparse.tar": gnu_sparse_tar("gnu", None),
        "gnutar-pax-sparse-1.0.tar": gnu_sparse_tar("posix", "1.0"),
        "gnutar-pax-sparse-0.1.tar": gnu_sparse_tar("posix", "0.1"),
    }


def oci_docs() -> dict[str, bytes]:
    """NUL-separated documents: index.json first, then blobs named by placeholder."""
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar",
             "digest": "@DL@", "size": "@SL@"}
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": ["@DL@"]},
        "history": [{"created_by": "fuzz seed"}],
    }

    def manifest(config_ref: str, media_type: str) -> dict[str, object]:
        return {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": f"@D{config_ref}@", "size": f"@S{config_ref}@"},
            "layers": [layer],
        }

    def index(entries: list[dict[str, object]], media_type: str) -> dict[str, object]:
        return {"schemaVersion": 2, "mediaType": media_type, "manifests": entries}

    def desc(n: int, media_type: str, **kw: object) -> dict[str, object]:
        return {"mediaType": media_type, "digest": f"@D{n}@", "size": f"@S{n}@", **kw}

    oci_index = "application/vnd.oci.image.index.v1+json"
    oci_manifest = "application/vnd.oci.image.manifest.v1+json"
    docker_list = "application/vnd.docker.distribution.manifest.list.v2+json"
    docker_manifest = "application/vnd.docker.distribution.manifest.v2+json"

    def text(doc: object) -> str:
        # Placeholders for numbers are written without quotes, as the target expects.
        s = json.dumps(doc, sort_keys=True)
        for token in ["@SL@", *(f"@S{n}@" for n in range(1, 10))]:
            s = s.replace(f'"{token}"', token)
        return s

    def docs(*parts: object) -> bytes:
        return b"\0".join(text(p).encode() for p in parts)

    named = {"annotations": {"org.opencontainers.image.ref.name": "v1"}}
    arm = {"platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}}
    amd = {"platform": {"os": "linux", "architecture": "amd64"}}
    docker_config = dict(config)
    return {
        "single.docs": docs(
            index([desc(1, oci_manifest, **named)], oci_index),
            manifest("2", oci_manifest),
            config,
        ),
        "nested-platforms.docs": docs(
            index([desc(1, oci_index, **named)], oci_index),
            index([desc(2, oci_manifest, **amd), desc(3, oci_manifest, **arm),
                   {"mediaType": oci_manifest, "digest": "@D2@", "size": "@S2@",
                    "annotations": {"vnd.docker.reference.type": "attestation-manifest"}}],
                  oci_index),
            manifest("4", oci_manifest),
            manifest("4", oci_manifest),
            config,
        ),
        "docker-list.docs": docs(
            index([desc(1, docker_list)], oci_index),
            index([desc(2, docker_manifest, **amd)], docker_list),
            manifest("3", docker_manifest) | {"config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "digest": "@D3@", "size": "@S3@"}},
            docker_config,
        ),
        "artifact.docs": docs(
            index([desc(1, oci_manifest, artifactType="application/x-sig"),
                   desc(1, "application/x-other"), desc(1, oci_manifest)], oci_index),
            manifest("2", oci_manifest) | {"config": {
                "mediaType": "application/vnd.cncf.notary.config", "digest": "@D2@",
                "size": "@S2@"}},
            {"schemaVersion": 2},
        ),
    }


def main() -> None:
    for name, data in tars().items():
        put("tar_split", name, data)
    tiny = tf.simple_tar({"etc/hostname": b"layerstore\n", "bin/sh": b"#!\n"})
    pax = tars()["pax.tar"]
    put("decompress", "plain.tar", tiny)
    put("decompress", "single.tar.gz", tf.gzip_single(pax))
    put("decompress", "multi.tar.gz", tf.gzip_multi(tiny))
    put("decompress", "single.tar.zst", zstd(pax, "--check"))
    put("decompress", "multi.tar.zst", zstd(tiny[:1024]) + zstd(tiny[1024:]))
    # A skippable frame (magic 0x184D2A50, 4-byte length) before the zstd frame.
    skippable = bytes.fromhex("502a4d18") + (8).to_bytes(4, "little") + b"metadata"
    put("decompress", "skippable.tar.zst", skippable + zstd(tiny))
    put("decompress", "gzip-header-only", gzip.compress(b"", mtime=0)[:10])
    for name, data in oci_docs().items():
        put("oci_parse", name, data)
    for i, name in enumerate([
        b"./etc/passwd", b"/usr//bin/./sh", b"a/b/../c", b"", b"/", b"..", b".wh..wh..opq",
        b"usr/share/" + b"d" * 60 + b"/f.txt", b"caf\xe9/\xff", b"a/\0b", b"./.././x",
    ]):
        put("path_normalise", f"name-{i:02d}", name)
    for i, digest in enumerate([
        "sha256:" + "a" * 64, "sha512:" + "0123456789abcdef" * 8, "blake3:" + "f" * 64,
        "F" * 64, "sha256:" + "A" * 64, "md5:d41d8cd98f00b204e9800998ecf8427e", "sha256:",
    ]):
        put("digest_parse", f"digest-{i:02d}", digest.encode())


if __name__ == "__main__":
    main()
