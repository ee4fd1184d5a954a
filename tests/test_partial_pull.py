"""zstd:chunked layers: what ``push(compression="zstd:chunked")`` writes (read back by an
independent reader written here from the format's description, by ``zstd -d`` and by skopeo), and
partial pulls against a real ``docker-registry`` on loopback behind a byte-counting proxy."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import shutil
import struct
import subprocess
import tarfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import layerstore as ls
import pytest
import zstandard
from registryutil import REGISTRY, Proxy, Registry

SKOPEO = shutil.which("skopeo")
ZSTD = shutil.which("zstd")
pytestmark = pytest.mark.skipif(REGISTRY is None, reason="docker-registry is needed")
NO_TLS: dict[str, Any] = {"tls_verify": False}
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ANN = "io.github.containers.zstd-chunked."
SKIPPABLE = 0x184D2A50
FOOTER_MAGIC = int.from_bytes(b"GNUlInUx", "little")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def make_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for d in sorted({str(Path(p).parent) for p in files} - {"."}):
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            t.addfile(info)
        link = tarfile.TarInfo("etc/link")
        link.type, link.linkname, link.mtime = tarfile.SYMTYPE, "hostname", 1_700_000_000
        t.addfile(link)
        for path, data in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def v1_files() -> dict[str, bytes]:
    return {
        "etc/hostname": b"box\n",
        "usr/lib/big.so": rand(900_000, 1),
        "usr/lib/other.so": rand(400_000, 2),
        "usr/share/doc/text": b"the same line again\n" * 20_000,
        "usr/bin/empty": b"",
    }


def v2_files(seed: int = 3) -> dict[str, bytes]:
    """v1 with a few kilobytes changed inside the big file and a small file added."""
    files = v1_files()
    big = bytearray(files["usr/lib/big.so"])
    at = random.Random(seed).randrange(100_000, 800_000)
    big[at : at + 4096] = rand(4096, seed + 100)
    files["usr/lib/big.so"] = bytes(big)
    files["etc/added"] = b"new\n"
    return files


def view(image: ls.Stack) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in image.walk("/"):
        for name in dirnames + filenames:
            p = dirpath.rstrip("/") + "/" + name
            st = image.stat(p, follow_symlinks=False)
            data = image.read_bytes(p) if st.kind == "file" else st.linkname
            out[p] = (st.kind, st.mode, st.uid, st.gid, data)
    return out


def get_manifest(host: str, repo: str, tag: str) -> dict[str, Any]:
    req = urllib.request.Request(
        f"http://{host}/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST}
    )
    with urllib.request.urlopen(req) as r:
        doc: dict[str, Any] = json.loads(r.read())
        return doc


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    r = Registry(tmp_path_factory.mktemp("registry"))
    yield r
    r.stop()


@pytest.fixture(scope="module")
def module_proxy(registry: Registry) -> Iterator[Proxy]:
    p = Proxy(registry.host)
    yield p
    p.stop()


@pytest.fixture
def proxy(module_proxy: Proxy) -> Proxy:
    module_proxy.reset()
    return module_proxy


@pytest.fixture(autouse=True)
def no_auth_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)


@pytest.fixture(scope="module")
def pushed(
    module_proxy: Proxy, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Any]]:
    """v1 and v2 pushed as zstd:chunked (`c`) and gzip (`g`); their manifests by name."""
    store = ls.Store(tmp_path_factory.mktemp("pusher") / "store")
    out = {}
    for tag, files in (("v1", v1_files()), ("v2", v2_files())):
        image = store.stack([store.import_tar(make_tar(files))])
        for repo, compression in (("part/c", "zstd:chunked"), ("part/g", "gzip")):
            store.push(
                image, f"{module_proxy.host}/{repo}:{tag}", compression=compression, **NO_TLS
            )
            out[f"{repo}:{tag}"] = get_manifest(module_proxy.host, repo, tag)
    return out


# --------------------------------------------------------------------------------------------
# An independent reader of the format (containers/storage's layout: footer, TOC, tar-split)


def read_chunked(blob: bytes) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, int]]:
    """The TOC, the tar-split lines and the footer's positions of a zstd:chunked blob."""
    magic, size = struct.unpack("<II", blob[-72:-64])
    assert (magic, size) == (SKIPPABLE, 64)
    fields = struct.unpack("<8Q", blob[-64:])
    assert fields[3] == 1 and fields[7] == FOOTER_MAGIC
    names = ("toc", "toc_len", "toc_size", "_", "ts", "ts_len", "ts_size", "magic")
    pos = dict(zip(names, fields, strict=True))
    for key in ("toc", "ts"):
        # Each metadata frame sits in a skippable frame whose header precedes its position.
        head = blob[pos[key] - 8 : pos[key]]
        assert struct.unpack("<II", head) == (SKIPPABLE, pos[f"{key}_len"])
    d = zstandard.ZstdDecompressor()
    toc = json.loads(
        d.decompress(blob[pos["toc"] : pos["toc"] + pos["toc_len"]], max_output_size=1 << 28)
    )
    ts_raw = d.decompress(blob[pos["ts"] : pos["ts"] + pos["ts_len"]], max_output_size=1 << 28)
    assert len(ts_raw) == pos["ts_size"]
    lines = [json.loads(line) for line in ts_raw.splitlines()]
    return toc, lines, pos


def one_frame(data: bytes) -> bytes:
    """Decompress `data`, which must be exactly one zstd frame."""
    params = zstandard.get_frame_parameters(data)
    out = zstandard.ZstdDecompressor().decompressobj()
    content = out.decompress(data)
    assert out.eof and not out.unused_data, "exactly one frame"
    assert params.content_size in (content.__len__(), zstandard.CONTENTSIZE_UNKNOWN)
    return content


def file_contents(blob: bytes, toc: dict[str, Any]) -> dict[str, bytes]:
    """Each regular file's content, from its frames (checked against every TOC digest)."""
    files: dict[str, bytearray] = {}
    for e in toc["entries"]:
        if e["type"] not in ("reg", "chunk") or not e.get("chunkSize"):
            continue
        name = e["name"]
        end = e["endOffset"]
        if e["type"] == "reg":
            files[name] = bytearray()
            # The file entry's frame is its first chunk's: it ends where the next chunk starts.
            later = [c for c in toc["entries"] if c["type"] == "chunk" and c["name"] == name]
            if later:
                end = later[0]["offset"]
        chunk = one_frame(blob[e["offset"] : end])
        assert len(chunk) == e["chunkSize"]
        assert sha256(chunk) == e["chunkDigest"]
        assert e.get("chunkOffset", 0) == len(files[name])
        files[name] += chunk
    for e in toc["entries"]:
        if e["type"] == "reg" and e.get("size"):
            assert sha256(bytes(files[e["name"]])) == e["digest"]
    return {k: bytes(v) for k, v in files.items()}


# --------------------------------------------------------------------------------------------
# The writer


def test_a_pushed_zstd_chunked_layer_decompresses_to_the_exact_tar_and_its_toc_checks_out(
    registry: Registry, pushed: dict[str, dict[str, Any]]
) -> None:
    tar = make_tar(v1_files())
    layer = pushed["part/c:v1"]["layers"][0]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd"
    blob = registry.blob_file(layer["digest"]).read_bytes()
    assert sha256(blob) == layer["digest"] and len(blob) == layer["size"]
    if ZSTD:
        plain = subprocess.run([ZSTD, "-dc"], input=blob, capture_output=True, check=True).stdout
        assert plain == tar, "zstd -d gives the layer's tar byte for byte"

    toc, lines, pos = read_chunked(blob)
    ann = layer["annotations"]
    assert ann[ANN + "manifest-position"] == f"{pos['toc']}:{pos['toc_len']}:{pos['toc_size']}:1"
    assert ann[ANN + "tarsplit-position"] == f"{pos['ts']}:{pos['ts_len']}:{pos['ts_size']}"
    assert ann[ANN + "manifest-checksum"] == sha256(blob[pos["toc"] : pos["toc"] + pos["toc_len"]])
    ts_digest = sha256(blob[pos["ts"] : pos["ts"] + pos["ts_len"]])
    assert ann[ANN + "tarsplit-checksum"] == ts_digest == toc["tarSplitDigest"]
    assert toc["version"] == 1

    contents = file_contents(blob, toc)
    assert contents == {k: v for k, v in v1_files().items() if v}
    # Several chunks for the big file: frames are cut at content-defined boundaries.
    chunks = [e for e in toc["entries"] if e["type"] == "chunk" and e["name"] == "usr/lib/big.so"]
    assert len(chunks) >= 3
    assert all(e["layerstore.chunkBlake3"].startswith("blake3:") for e in chunks)
    kinds = {e["name"]: e["type"] for e in toc["entries"] if e["type"] != "chunk"}
    assert kinds["etc"] == "dir" and kinds["etc/link"] == "symlink"
    assert kinds["usr/bin/empty"] == "reg"

    # The tar-split and the TOC's contents rebuild the tar.
    rebuilt = bytearray()
    for line in lines:
        if line["type"] == 2:
            rebuilt += base64.b64decode(line["payload"])
        elif line.get("size"):
            rebuilt += contents[line["name"]]
    assert bytes(rebuilt) == tar


def test_the_blob_is_deterministic_and_a_re_push_uploads_nothing(
    proxy: Proxy, pushed: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    other = ls.Store(tmp_path / "other")
    image = other.stack([other.import_tar(make_tar(v1_files()))])
    other.push(image, f"{proxy.host}/part/again:v1", compression="zstd:chunked", **NO_TLS)
    again = get_manifest(proxy.host, "part/again", "v1")
    assert again["layers"] == pushed["part/c:v1"]["layers"], "same layer, same blob"
    proxy.reset()
    other.push(image, f"{proxy.host}/part/again:v1", compression="zstd:chunked", **NO_TLS)
    assert proxy.blob_bytes_up() == 0


@pytest.mark.skipif(SKOPEO is None, reason="skopeo is needed")
def test_skopeo_copies_the_layer_unchanged_to_a_registry_and_an_oci_layout(
    registry: Registry, pushed: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    assert SKOPEO is not None
    # Straight to the registry: skopeo uploads with chunked transfer encoding, which the test
    # proxy does not forward.
    host = registry.host
    src = f"docker://{host}/part/c:v1"
    flags = ["--src-tls-verify=false", "--dest-tls-verify=false"]
    subprocess.run(
        [SKOPEO, "copy", *flags, src, f"docker://{host}/part/copied:v1"],
        check=True,
        capture_output=True,
        timeout=180,
    )
    layer = pushed["part/c:v1"]["layers"][0]
    assert get_manifest(host, "part/copied", "v1")["layers"] == [layer]
    subprocess.run(
        [SKOPEO, "copy", "--src-tls-verify=false", src, f"oci:{tmp_path / 'layout'}:v1"],
        check=True,
        capture_output=True,
        timeout=180,
    )
    index = json.loads((tmp_path / "layout/index.json").read_bytes())
    digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((tmp_path / "layout/blobs/sha256" / digest).read_bytes())
    assert manifest["layers"] == [layer]
    hexd = layer["digest"].split(":")[1]
    assert sha256((tmp_path / "layout/blobs/sha256" / hexd).read_bytes()) == layer["digest"]


# --------------------------------------------------------------------------------------------
# Partial pulls


def pull_v1(proxy: Proxy, tmp_path: Path) -> ls.Store:
    store = ls.Store(tmp_path / "puller")
    store.pull(f"{proxy.host}/part/c:v1", **NO_TLS)
    proxy.reset()
    return store


def test_v2_after_v1_fetches_only_the_changed_chunks_and_gives_the_full_pulls_view(
    proxy: Proxy, pushed: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    store = pull_v1(proxy, tmp_path)
    v2 = store.pull(f"{proxy.host}/part/c:v2", **NO_TLS)
    partial_bytes = proxy.blob_bytes_down()
    blob_size = pushed["part/c:v2"]["layers"][0]["size"]
    gzip_size = pushed["part/g:v2"]["layers"][0]["size"]
    # 4 KiB changed in one file: one or two 64 KiB chunks and the metadata, not 1.6 MB.
    assert 0 < partial_bytes < 0.3 * blob_size, (partial_bytes, blob_size)
    assert partial_bytes < 0.3 * gzip_size
    digest = pushed["part/c:v2"]["layers"][0]["digest"]
    ranged = [r for r in proxy.requests if r[0] == "GET" and r[1].endswith(digest)]
    assert len(ranged) >= 2 and all(status == 206 for _, _, status in ranged)

    full = ls.Store(tmp_path / "full")
    reference = full.pull(f"{proxy.host}/part/g:v2", **NO_TLS)
    assert [layer.diff_id for layer in v2.layers] == [layer.diff_id for layer in reference.layers]
    assert view(v2) == view(reference)
    # The pulled image re-pushes digest-exact without a byte uploaded (the blob is rebuilt).
    proxy.reset()
    digest = store.push(v2, f"{proxy.host}/part/c:v2-again", compression=None, **NO_TLS)
    assert digest == v2.digest
    assert proxy.blob_bytes_up() == 0


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_random_edits_pull_partially_to_the_exact_layer(
    proxy: Proxy, pushed: dict[str, dict[str, Any]], tmp_path: Path, seed: int
) -> None:
    pusher = ls.Store(tmp_path / "pusher")
    files = v2_files(seed)
    rng = random.Random(seed)
    files[f"opt/new{seed}"] = rand(rng.randrange(1, 300_000), seed)
    tar = make_tar(files)
    image = pusher.stack([pusher.import_tar(tar)])
    pusher.push(image, f"{proxy.host}/part/r:{seed}", compression="zstd:chunked", **NO_TLS)
    store = pull_v1(proxy, tmp_path)
    pulled = store.pull(f"{proxy.host}/part/r:{seed}", **NO_TLS)
    assert pulled.layers[0].diff_id == sha256(tar)
    assert view(pulled) == view(image)
    assert proxy.blob_bytes_down() < len(tar) * 0.6


def test_a_registry_without_range_support_gets_a_plain_pull(
    proxy: Proxy, pushed: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    store = pull_v1(proxy, tmp_path)
    proxy.strip_range = True
    v2 = store.pull(f"{proxy.host}/part/c:v2", **NO_TLS)
    blob = pushed["part/c:v2"]["layers"][0]
    assert v2.layers[0].diff_id == sha256(make_tar(v2_files()))
    ok = [r for r in proxy.requests if r[0] == "GET" and r[1].endswith(blob["digest"])]
    assert ok and ok[-1][2] == 200
    assert proxy.blob_bytes_down() >= blob["size"]


def test_a_corrupt_frame_is_an_integrity_error_and_nothing_is_stored(
    proxy: Proxy, pushed: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    store = pull_v1(proxy, tmp_path)
    annotations = pushed["part/c:v2"]["layers"][0]["annotations"]
    toc_at = int(annotations[ANN + "manifest-position"].split(":")[0])
    flipped = []

    def flip(range_header: str | None, status: int, data: bytes) -> bytes:
        # Only the frames' ranges, not the metadata's (which would fail its own checksum).
        if status != 206 or range_header is None or str(toc_at) in range_header:
            return data
        flipped.append(range_header)
        i = len(data) // 2
        return data[:i] + bytes([data[i] ^ 0x55]) + data[i + 1 :]

    before = {layer.id for layer in store.layers()}
    proxy.mangle = flip
    with pytest.raises(ls.IntegrityError):
        store.pull(f"{proxy.host}/part/c:v2", **NO_TLS)
    assert flipped, "a frame range was fetched and damaged"
    assert {layer.id for layer in store.layers()} == before
    assert list(store.images()) == [f"{proxy.host}/part/c:v1"]
    assert store.fsck()["ok"]


def lying_blob(blob: bytes, rename: str) -> tuple[bytes, dict[str, str]]:
    """`blob` with its TOC renaming file `rename` (so it no longer matches the tar-split), and
    the annotations of the result: a TOC whose checksum the manifest vouches for, which lies."""
    toc, _, pos = read_chunked(blob)
    for e in toc["entries"]:
        if e["name"] == rename:
            e["name"] = rename + ".lie"
    toc_z = zstandard.ZstdCompressor().compress(json.dumps(toc).encode())
    frames = blob[: pos["toc"] - 8]
    ts_z = blob[pos["ts"] : pos["ts"] + pos["ts_len"]]
    toc_json_len = len(zstandard.ZstdDecompressor().decompress(toc_z))
    out = bytearray(frames)
    out += struct.pack("<II", SKIPPABLE, len(toc_z))
    toc_at = len(out)
    out += toc_z
    out += struct.pack("<II", SKIPPABLE, len(ts_z))
    ts_at = len(out)
    out += ts_z
    fields = (toc_at, len(toc_z), toc_json_len, 1, ts_at, len(ts_z), pos["ts_size"], FOOTER_MAGIC)
    out += struct.pack("<II", SKIPPABLE, 64) + struct.pack("<8Q", *fields)
    ann = {
        ANN + "manifest-checksum": sha256(toc_z),
        ANN + "manifest-position": f"{toc_at}:{len(toc_z)}:{toc_json_len}:1",
        ANN + "tarsplit-position": f"{ts_at}:{len(ts_z)}:{pos['ts_size']}",
    }
    return bytes(out), ann


def put_blob(host: str, repo: str, data: bytes) -> str:
    digest = sha256(data)
    post = urllib.request.Request(f"http://{host}/v2/{repo}/blobs/uploads/", method="POST")
    with urllib.request.urlopen(post) as r:
        location = r.headers["Location"]
    sep = "&" if "?" in location else "?"
    url = location if location.startswith("http") else f"http://{host}{location}"
    put = urllib.request.Request(f"{url}{sep}digest={digest}", data=data, method="PUT")
    put.add_header("Content-Type", "application/octet-stream")
    urllib.request.urlopen(put).close()
    return digest


def test_a_toc_that_lies_about_the_tar_split_is_refused_and_nothing_is_stored(
    registry: Registry, proxy: Proxy, pushed: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    manifest = pushed["part/c:v2"]
    layer = manifest["layers"][0]
    blob, ann = lying_blob(registry.blob_file(layer["digest"]).read_bytes(), "usr/lib/other.so")
    config = registry.blob_file(manifest["config"]["digest"]).read_bytes()
    put_blob(proxy.host, "part/lie", config)
    digest = put_blob(proxy.host, "part/lie", blob)
    lie = dict(manifest, layers=[dict(layer, digest=digest, size=len(blob), annotations=ann)])
    req = urllib.request.Request(
        f"http://{proxy.host}/v2/part/lie/manifests/v2",
        data=json.dumps(lie).encode(),
        method="PUT",
        headers={"Content-Type": OCI_MANIFEST},
    )
    urllib.request.urlopen(req).close()

    store = pull_v1(proxy, tmp_path)
    before = {layer.id for layer in store.layers()}
    with pytest.raises(ls.InvalidLayerError, match="disagree"):
        store.pull(f"{proxy.host}/part/lie:v2", **NO_TLS)
    assert {layer.id for layer in store.layers()} == before
    assert list(store.images()) == [f"{proxy.host}/part/c:v1"]
