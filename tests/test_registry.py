"""Registry pull and push against a real ``docker-registry`` (distribution 2.8) on loopback, with
skopeo as the peer both ways and a byte-counting, fault-injecting proxy in front of the server."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import layerstore as ls
import pytest
from registryutil import (
    HTPASSWD,
    REGISTRY,
    Proxy,
    Registry,
    TokenServer,
    count_requests,
    free_port,
    make_tls,
)
from storeutil import snapshot

SKOPEO = shutil.which("skopeo")
UMOCI = shutil.which("umoci")
pytestmark = pytest.mark.skipif(REGISTRY is None, reason="docker-registry is needed")


def sh(*args: str | Path) -> str:
    proc = subprocess.run(
        [str(a) for a in args], capture_output=True, check=False, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{args}: {proc.stderr}"
    return proc.stdout


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_tar(files: dict[str, bytes], deleted: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        dirs = sorted({str(Path(p).parent) for p in files} - {"."})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            t.addfile(info)
        for path, data in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            t.addfile(info, io.BytesIO(data))
        for path in deleted:
            p = Path(path)
            info = tarfile.TarInfo(str(p.parent / f".wh.{p.name}"))
            info.mtime = 1_700_000_000
            t.addfile(info, io.BytesIO(b""))
    return buf.getvalue()


def view(image: ls.Stack) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in image.walk("/"):
        for name in dirnames + filenames:
            p = dirpath.rstrip("/") + "/" + name
            st = image.stat(p, follow_symlinks=False)
            data = image.read_bytes(p) if st.kind == "file" else st.linkname
            out[p] = (st.kind, st.mode, st.uid, st.gid, data)
    return out


def tree_view(root: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = "/" + str(p.relative_to(root))
            kind = "symlink" if p.is_symlink() else "dir" if p.is_dir() else "file"
            data = (
                p.read_bytes() if kind == "file" else os.readlink(p) if kind == "symlink" else None
            )
            out[rel] = (kind, st.st_mode & 0o7777, st.st_uid, st.st_gid, data)
    return out


# --------------------------------------------------------------------------------------------
# Fixtures: one plain registry and its proxy per session, an htpasswd one when asked


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    r = Registry(tmp_path_factory.mktemp("registry"))
    yield r
    r.stop()


@pytest.fixture(scope="session")
def session_proxy(registry: Registry) -> Iterator[Proxy]:
    p = Proxy(registry.host)
    yield p
    p.stop()


@pytest.fixture
def proxy(session_proxy: Proxy) -> Proxy:
    session_proxy.reset()
    return session_proxy


@pytest.fixture(autouse=True)
def no_auth_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the developer's own credentials."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)


@pytest.fixture
def image(store: ls.Store) -> ls.Stack:
    base = store.import_tar(
        make_tar({"etc/os-release": b"ID=test\n", "bin/tool": b"\x7fELF" + bytes(range(256)) * 64})
    )
    top = store.import_tar(
        make_tar({"etc/hostname": b"box\n", "srv/data.txt": b"x" * 100_000}, ("etc/os-release",))
    )
    return store.stack([base, top])


NO_TLS: dict[str, Any] = {"tls_verify": False}

# --------------------------------------------------------------------------------------------
# Round trips


def test_push_then_pull_round_trips_digest_exact(
    store: ls.Store, image: ls.Stack, proxy: Proxy, tmp_path: Path
) -> None:
    ref = f"{proxy.host}/round/trip:v1"
    digest = store.push(image, ref, **NO_TLS)
    assert digest.startswith("sha256:")
    assert image.digest == digest, "the pushed manifest is recorded on the image"

    other = ls.Store(tmp_path / "other")
    pulled = other.pull(ref, **NO_TLS)
    assert pulled.digest == digest
    assert [layer.diff_id for layer in pulled.layers] == [layer.diff_id for layer in image.layers]
    assert view(pulled) == view(image)
    assert other.get(ref).chain_id == pulled.chain_id, "tagged under the reference"
    # Re-export is digest-exact: the manifest bytes are the registry's.
    assert other.export_oci(pulled, tmp_path / "layout") == digest
    raw = urllib.request.urlopen(
        urllib.request.Request(
            f"http://{proxy.host}/v2/round/trip/manifests/v1",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        )
    ).read()
    assert sha256(raw) == digest
    index = json.loads((tmp_path / "layout/index.json").read_bytes())
    assert index["manifests"][0]["digest"] == digest
    # A pull by digest gives the same image.
    by_digest = other.pull(f"{proxy.host}/round/trip@{digest}", **NO_TLS)
    assert by_digest.chain_id == pulled.chain_id


def test_re_pull_fetches_no_blob_and_re_push_uploads_no_blob_byte(
    store: ls.Store, image: ls.Stack, proxy: Proxy, tmp_path: Path
) -> None:
    ref = f"{proxy.host}/again/app:v1"
    first = store.push(image, ref, **NO_TLS)
    assert proxy.blob_bytes_up() > 1000, "the first push uploads the layers"
    proxy.reset()
    assert store.push(image, f"{proxy.host}/again/app:v2", **NO_TLS) == first
    assert proxy.blob_bytes_up() == 0, proxy.counts
    assert count_requests(proxy, lambda m, p, s: m == "POST") == 0

    other = ls.Store(tmp_path / "other")
    other.pull(ref, **NO_TLS)
    assert proxy.blob_bytes_down() > 0
    proxy.reset()
    again = other.pull(f"{proxy.host}/again/app:v2", **NO_TLS)
    assert again.digest == first
    blob_gets = count_requests(proxy, lambda m, p, s: m == "GET" and "/blobs/" in p)
    assert blob_gets == 1, proxy.requests  # the config only
    # The pulled image re-pushes digest-exact, with no blob byte (the registry has them all).
    proxy.reset()
    assert other.push(again, f"{proxy.host}/again/app:v3", **NO_TLS) == first
    assert proxy.blob_bytes_up() == 0, proxy.counts
    # To another repository of the registry, its layer blobs are mounted from the one it came
    # from, not uploaded (the config, new to that repository, is).
    proxy.reset()
    assert other.push(again, f"{proxy.host}/mounted/app:v1", **NO_TLS) == first
    mounted = count_requests(proxy, lambda m, p, s: m == "POST" and "mount=" in p and s == 201)
    assert mounted == len(again.layers), proxy.requests
    assert proxy.blob_bytes_up() < 2000, proxy.counts


def test_a_large_layer_goes_up_in_chunks_and_comes_back_exact(
    store: ls.Store, proxy: Proxy, tmp_path: Path
) -> None:
    big = os.urandom(9 << 20)  # incompressible, over the 8 MiB chunk
    image = store.stack([store.import_tar(make_tar({"big.bin": big}))])
    ref = f"{proxy.host}/big/app:v1"
    digest = store.push(image, ref, **NO_TLS)
    patches = count_requests(proxy, lambda m, p, s: m == "PATCH" and s == 202)
    assert patches >= 1, proxy.requests
    pulled = ls.Store(tmp_path / "other").pull(ref, **NO_TLS)
    assert pulled.digest == digest
    assert pulled.read_bytes("/big.bin") == big


# --------------------------------------------------------------------------------------------
# Interop with skopeo


@pytest.fixture(scope="module")
def umoci_layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if UMOCI is None or SKOPEO is None:
        pytest.skip("umoci and skopeo are needed")
    base = tmp_path_factory.mktemp("umoci")
    layout, bundle = base / "layout", base / "bundle"
    sh(UMOCI, "init", "--layout", layout)
    sh(UMOCI, "new", "--image", f"{layout}:t")
    sh(UMOCI, "unpack", "--image", f"{layout}:t", bundle)
    rootfs = bundle / "rootfs"
    sh("cp", "-a", "/etc/apt", rootfs / "etc")
    sh(UMOCI, "repack", "--refresh-bundle", "--image", f"{layout}:t", bundle)
    (rootfs / "etc/hostname").write_text("from-umoci\n")
    shutil.rmtree(rootfs / "etc/apt/apt.conf.d", ignore_errors=True)
    sh(UMOCI, "repack", "--image", f"{layout}:t", bundle)
    return layout, rootfs


@pytest.mark.parametrize("fmt", ["oci", "v2s2"])
def test_skopeo_pushes_and_the_store_pulls_the_same_image(
    store: ls.Store, registry: Registry, umoci_layout: tuple[Path, Path], fmt: str
) -> None:
    # v2s2: skopeo converts to a Docker schema 2 manifest (Docker media types throughout).
    layout, rootfs = umoci_layout
    ref = f"{registry.host}/skopeo/{fmt}:t"
    skopeo = SKOPEO or "skopeo"
    sh(skopeo, "copy", "--quiet", "--dest-tls-verify=false", "--format", fmt,
       f"oci:{layout}:t", f"docker://{ref}")  # fmt: skip
    inspect = json.loads(sh(skopeo, "inspect", "--tls-verify=false", f"docker://{ref}"))
    raw = json.loads(sh(skopeo, "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"))
    pulled = store.pull(ref, **NO_TLS)
    assert pulled.digest == inspect["Digest"]
    expected_config = {
        "oci": "application/vnd.oci.image.config.v1+json",
        "v2s2": "application/vnd.docker.container.image.v1+json",
    }[fmt]
    assert raw["config"]["mediaType"] == expected_config
    config = json.loads(sh(skopeo, "inspect", "--config", "--tls-verify=false", f"docker://{ref}"))
    assert [layer.diff_id for layer in pulled.layers] == config["rootfs"]["diff_ids"]
    assert view(pulled) == tree_view(rootfs)
    assert store.fsck()["ok"]
    # Pushed again, the pulled image keeps its manifest (skopeo's gzip blobs were kept).
    assert store.push(pulled, f"{registry.host}/skopeo/{fmt}:again", **NO_TLS) == pulled.digest


def test_the_store_pushes_and_skopeo_copies_it_back_digest_exact(
    store: ls.Store, image: ls.Stack, registry: Registry, tmp_path: Path
) -> None:
    if SKOPEO is None:
        pytest.skip("skopeo is needed")
    ref = f"{registry.host}/ours/app:v1"
    digest = store.push(image, ref, **NO_TLS)
    raw = sh(SKOPEO, "inspect", "--raw", "--tls-verify=false", f"docker://{ref}")
    assert sha256(raw.encode()) == digest
    out = tmp_path / "copy"
    sh(SKOPEO, "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}", f"oci:{out}:v1")
    index = json.loads((out / "index.json").read_bytes())
    assert index["manifests"][0]["digest"] == digest
    manifest = json.loads(raw)
    for layer in manifest["layers"]:
        blob = (out / "blobs/sha256" / layer["digest"].split(":")[1]).read_bytes()
        assert sha256(blob) == layer["digest"]
    again = ls.Store(tmp_path / "again").import_oci(out)["v1"]
    assert view(again) == view(image)


# --------------------------------------------------------------------------------------------
# Platforms, unknown images, bad references


def put_index(host: str, repo: str, tag: str, entries: list[dict[str, Any]]) -> None:
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": entries,
        }
    ).encode()
    req = urllib.request.Request(
        f"http://{host}/v2/{repo}/manifests/{tag}",
        data=body,
        method="PUT",
        headers={"Content-Type": "application/vnd.oci.image.index.v1+json"},
    )
    urllib.request.urlopen(req).close()


def test_an_index_selects_the_platform_and_a_missing_one_names_those_offered(
    store: ls.Store, image: ls.Stack, registry: Registry, tmp_path: Path
) -> None:
    digest = store.push(image, f"{registry.host}/multi/app:single", **NO_TLS)
    raw = store_manifest(registry, "multi/app", "single")
    entry = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": digest,
        "size": len(raw),
        "platform": {"os": "linux", "architecture": "s390x"},
    }
    put_index(registry.host, "multi/app", "idx", [entry])
    other = ls.Store(tmp_path / "other")
    with pytest.raises(ls.NotFoundError, match="linux/s390x"):
        other.pull(f"{registry.host}/multi/app:idx", **NO_TLS)
    assert other.images() == {}
    pulled = other.pull(f"{registry.host}/multi/app:idx", platform="linux/s390x", **NO_TLS)
    assert pulled.digest == digest


def store_manifest(registry: Registry, repo: str, tag: str) -> bytes:
    req = urllib.request.Request(
        f"http://{registry.host}/v2/{repo}/manifests/{tag}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    data: bytes = urllib.request.urlopen(req).read()
    return data


def test_unknown_images_and_bad_references_are_typed_errors(
    store: ls.Store, registry: Registry
) -> None:
    with pytest.raises(ls.NotFoundError, match="nope/app"):
        store.pull(f"{registry.host}/nope/app:v1", **NO_TLS)
    with pytest.raises(ValueError, match="invalid image reference"):
        store.pull("Bad/Name:v1", **NO_TLS)
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(OSError, match=re.escape(closed)):
        store.pull(f"{closed}/x/y:z", tls_verify=False)
    assert store.images() == {}


# --------------------------------------------------------------------------------------------
# Auth


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    if HTPASSWD is None:
        pytest.skip("htpasswd (apache2-utils) is needed")
    r = Registry(tmp_path_factory.mktemp("auth-registry"), users={"alice": "s3cret-pw"})
    yield r
    r.stop()


def test_basic_auth_from_the_argument_and_from_the_auth_file(
    store: ls.Store,
    image: ls.Stack,
    auth_registry: Registry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ref = f"{auth_registry.host}/private/app:v1"
    with pytest.raises(PermissionError, match=f"{auth_registry.host}.*private/app"):
        store.push(image, ref, **NO_TLS)
    with pytest.raises(PermissionError) as wrong:
        store.push(image, ref, auth=("alice", "wrong-password"), **NO_TLS)
    assert "wrong-password" not in str(wrong.value)
    digest = store.push(image, ref, auth=("alice", "s3cret-pw"), **NO_TLS)

    other = ls.Store(tmp_path / "other")
    with pytest.raises(PermissionError):
        other.pull(ref, **NO_TLS)
    auth_file = tmp_path / "auth.json"
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file))
    with pytest.raises(PermissionError):
        ls.registry_login(auth_registry.host, "alice", "nope", tls_verify=False)
    assert not auth_file.exists()
    written = ls.registry_login(auth_registry.host, "alice", "s3cret-pw", tls_verify=False)
    assert Path(written) == auth_file
    assert auth_file.stat().st_mode & 0o077 == 0, "the auth file is private"
    assert other.pull(ref, **NO_TLS).digest == digest
    assert ls.registry_logout(auth_registry.host) is True
    with pytest.raises(PermissionError):
        other.pull(ref, **NO_TLS)


def test_bearer_tokens_come_from_the_realm_and_the_password_goes_only_there(
    store: ls.Store, image: ls.Stack, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tokens = TokenServer()
    registry = Registry(tmp_path_factory.mktemp("token-registry"), token_realm=tokens.realm)
    proxy = Proxy(registry.host)
    try:
        ref = f"{proxy.host}/tok/app:v1"
        digest = store.push(image, ref, auth=("bob", "bob-pw"), **NO_TLS)
        assert ls.Store(tmp_path / "other").pull(ref, **NO_TLS).digest == digest
    finally:
        proxy.stop()
        registry.stop()
        tokens.stop()
    scopes = [
        urllib.parse.parse_qs(urllib.parse.urlsplit(p).query)["scope"] for p, _ in tokens.seen
    ]
    assert ["repository:tok/app:pull,push"] in scopes and ["repository:tok/app:pull"] in scopes
    auths = [a for _, a in tokens.seen]
    assert auths[0] is not None and auths[0].startswith("Basic "), "the push logs in to the realm"
    assert auths[-1] is None, "the anonymous pull asks for a token without credentials"
    # The registry saw tokens (and first, unauthenticated probes), never the password.
    assert set(proxy.auth_schemes) <= {"Bearer", "none"}, proxy.auth_schemes
    assert proxy.auth_schemes["Bearer"] > 0


def test_redirects_are_followed_without_the_credentials(
    store: ls.Store, image: ls.Stack, auth_registry: Registry, tmp_path: Path
) -> None:
    creds = ("alice", "s3cret-pw")
    basic = "Basic " + base64.b64encode(b"alice:s3cret-pw").decode()
    # The blob store: another origin, with access of its own to the blobs.
    blob_store = Proxy(auth_registry.host, add_auth=basic)
    front = Proxy(auth_registry.host, redirect_blobs_to=blob_store.host)
    try:
        ref = f"{front.host}/redirected/app:v1"
        digest = store.push(image, ref, auth=creds, **NO_TLS)
        pulled = ls.Store(tmp_path / "other").pull(ref, auth=creds, **NO_TLS)
        assert pulled.digest == digest
        assert view(pulled) == view(image)
        assert count_requests(front, lambda m, p, s: s == 307) >= 2  # the config and layers
        assert blob_store.blob_bytes_down() > 0
        assert set(blob_store.auth_schemes) == {"none"}, blob_store.auth_schemes
        assert front.auth_schemes["Basic"] > 0
    finally:
        front.stop()
        blob_store.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed")
def test_tls_is_verified_against_the_system_roots_or_a_ca_file(
    store: ls.Store, image: ls.Stack, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    ca, cert, key = make_tls(tmp_path / "tls")
    registry = Registry(tmp_path_factory.mktemp("tls-registry"), tls=(cert, key))
    try:
        ref = f"{registry.host}/tls/app:v1"
        with pytest.raises(OSError, match=re.escape(registry.host)):
            store.push(image, ref)  # the test CA is not among the system's roots
        digest = store.push(image, ref, ca_file=ca)
        other = ls.Store(tmp_path / "other")
        assert other.pull(ref, ca_file=ca).digest == digest
        # Unverified, the registry is still spoken to over TLS (it speaks no plain HTTP).
        assert other.pull(ref, tls_verify=False).digest == digest
    finally:
        registry.stop()


# --------------------------------------------------------------------------------------------
# Faults: corrupt blobs, retries, resumed bodies


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_a_corrupted_blob_is_rejected_and_leaves_the_store_unchanged(
    store: ls.Store, image: ls.Stack, proxy: Proxy, tmp_path: Path, compression: str
) -> None:
    # Uncompressed, a flipped byte in file data is still a valid tar: only the digest check sees it.
    ref = f"{proxy.host}/corrupt/app:{compression}"
    store.push(image, ref, compression=compression, **NO_TLS)
    layers = json.loads(store_manifest_via(proxy, "corrupt/app", compression))["layers"]
    biggest = max(layers, key=lambda layer: layer["size"])["digest"]
    other = ls.Store(tmp_path / "other")
    before = snapshot(other)
    proxy.reset()
    proxy.faults.rules.append(["flip", biggest, 99])
    with pytest.raises(ls.IntegrityError, match=biggest):
        other.pull(ref, **NO_TLS)
    assert other.images() == {}
    assert other.layers() == [], "a layer imported beside the bad one is undone"
    assert other.fsck()["ok"]
    # Chunks of undone layers are garbage until gc (as for import_oci); then none is left, and
    # no kept blob or staging file either (retired packs wait out their grace period).
    other.gc()
    after = snapshot(other)
    assert (after.layers, after.chunks, after.logical_bytes) == ([], before.chunks, 0)
    leftovers = {f for f in after.files - before.files if not f.startswith("packs/retired/")}
    assert not leftovers, leftovers


def test_retries_and_resumes_end_in_the_right_image(
    store: ls.Store, image: ls.Stack, proxy: Proxy, tmp_path: Path
) -> None:
    ref = f"{proxy.host}/flaky/app:v1"
    digest = store.push(image, ref, **NO_TLS)
    layers = json.loads(store_manifest_via(proxy, "flaky/app", "v1"))["layers"]
    total = sum(layer["size"] for layer in layers)
    proxy.reset()
    biggest = max(layers, key=lambda layer: layer["size"])["digest"]
    proxy.faults.rules += [["429", "/blobs/", 1], ["500", "/blobs/", 1], ["truncate", biggest, 1]]
    other = ls.Store(tmp_path / "other")
    pulled = other.pull(ref, **NO_TLS)
    assert pulled.digest == digest
    assert view(pulled) == view(image)
    ranged = count_requests(proxy, lambda m, p, s: m == "GET" and s == 206)
    assert ranged == 1, proxy.requests
    # The truncated body resumed where it stopped: about half the biggest blob twice at most.
    assert proxy.blob_bytes_down() <= total * 1.05 + 4096, (proxy.blob_bytes_down(), total)
    assert other.fsck()["ok"]


def store_manifest_via(proxy: Proxy, repo: str, tag: str) -> bytes:
    req = urllib.request.Request(
        f"http://{proxy.host}/v2/{repo}/manifests/{tag}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    data: bytes = urllib.request.urlopen(req).read()
    return data


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_pull_push_login_logout_with_json(
    store: ls.Store,
    image: ls.Stack,
    auth_registry: Registry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from layerstore.cli import main

    store.tag(image, "app")
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "auth.json"))
    root = ["--store", str(store.path), "--json"]
    ref = f"{auth_registry.host}/cli/app:v1"
    assert main([*root, "push", "app", ref, "--tls-verify=false"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "denied" in err, err
    assert (
        main(
            [
                *root,
                "login",
                auth_registry.host,
                "-u",
                "alice",
                "-p",
                "s3cret-pw",
                "--tls-verify",
                "false",
            ]
        )
        == 0
    )
    login = json.loads(capsys.readouterr().out)
    assert login["auth_file"] == str(tmp_path / "auth.json")
    assert "s3cret-pw" not in json.dumps(login)
    assert main([*root, "push", "app", ref, "--tls-verify=false"]) == 0
    pushed = json.loads(capsys.readouterr().out)
    other = tmp_path / "other"
    assert main(["--store", str(other), "--json", "pull", ref, "--tls-verify=false"]) == 0
    pulled = json.loads(capsys.readouterr().out)
    assert pulled["digest"] == pushed["digest"]
    assert pulled["name"] == ref
    assert main([*root, "logout", auth_registry.host]) == 0
    assert json.loads(capsys.readouterr().out)["removed"] is True
    assert main(["--store", str(other), "pull", ref, "--tls-verify=false"]) == 1
    assert "s3cret" not in capsys.readouterr().err


def test_a_pull_killed_part_way_resumes_in_a_new_process(
    store: ls.Store, proxy: Proxy, tmp_path: Path
) -> None:
    big = os.urandom(24 << 20)  # incompressible: the gzip blob is as big
    image = store.stack([store.import_tar(make_tar({"big.bin": big}))])
    ref = f"{proxy.host}/killed/app:v1"
    store.push(image, ref, **NO_TLS)
    (layer,) = json.loads(store_manifest_via(proxy, "killed/app", "v1"))["layers"]
    target = tmp_path / "target"
    proxy.reset()
    proxy.throttle = 16 << 20
    code = f"import layerstore as ls; ls.Store({str(target)!r}).pull({ref!r}, tls_verify=False)"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 60
        while proxy.counts["blob GET live"] < layer["size"] // 2:
            assert child.poll() is None and time.monotonic() < deadline, "the pull ended early"
            time.sleep(0.01)
    finally:
        child.kill()
        child.wait()
    sent_before = proxy.counts["blob GET live"]
    (partial,) = target.glob(f"tmp/oci-*/{layer['digest'].split(':')[1]}.part")
    kept = partial.stat().st_size
    assert 0 < kept < layer["size"]

    proxy.reset()
    pulled = ls.Store(target).pull(ref, **NO_TLS)
    assert pulled.read_bytes("/big.bin") == big
    missing = layer["size"] - kept
    fetched = proxy.blob_bytes_down()
    config = json.loads(store_manifest_via(proxy, "killed/app", "v1"))["config"]["size"]
    assert count_requests(proxy, lambda m, p, s: m == "GET" and s == 206) == 1
    assert fetched <= 1.05 * missing + config, (fetched, missing, kept, sent_before)
    # What the killed process left is swept by gc once it is gone; the store is sound.
    ls.Store(target).gc()
    assert not list(target.glob("tmp/oci-*")), list(target.glob("tmp/*"))
    assert ls.Store(target).fsck()["ok"]


def test_an_interrupted_pull_stops_and_leaves_nothing(
    store: ls.Store, registry: Registry, tmp_path: Path
) -> None:
    layers = [store.import_tar(make_tar({f"f{i}.bin": os.urandom(9 << 20)})) for i in range(2)]
    ref = f"{registry.host}/interrupted/app:v1"
    store.push(store.stack(layers), ref, **NO_TLS)
    other = ls.Store(tmp_path / "other")
    calls: list[int] = []

    def ctrl_c(done: int) -> None:
        calls.append(done)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        other.pull(ref, progress=ctrl_c, **NO_TLS)
    assert calls, "progress was reported"
    assert other.images() == {}
    assert other.layers() == []
    assert other.fsck()["ok"]
