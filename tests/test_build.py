"""Builds from Dockerfiles (``layerstore.build``) against ``buildah bud --isolation chroot
--layers`` over the same Debian base: equal trees (content, modes, owners, symlinks, xattrs;
mtimes of copied files; RUN's timestamps excepted), equal config fields, equal numbers of layers
and history entries. Then the build cache, determinism under ``SOURCE_DATE_EPOCH``, and each
error case (nothing tagged, nothing mounted afterwards)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import layerstore as ls
import pytest
import runutil
import tarfixtures as tf
from layerstore._buildstate import CACHE_FILE

pytestmark = pytest.mark.root

BUILDAH = shutil.which("buildah")
MTIME = 1_700_000_000

# Every instruction the builder knows, over two stages.
DOCKERFILE = """\
# syntax=docker/dockerfile:1
ARG BASE=debian
FROM $BASE AS builder
RUN mkdir -p /out && echo built > /out/artifact && chmod 600 /out/artifact

FROM $BASE
ARG GREETING=hello
ENV APP=/app \\
    MODE="two words"
LABEL org.example.name="demo" version=1
WORKDIR $APP
COPY a.txt ./
COPY --chown=nobody:nogroup --chmod=640 b.txt /app/owned/
COPY d /app/d/
COPY --from=builder /out/artifact /app/artifact
ADD archive.tar /app/unpacked/
COPY *.txt /app/glob/
RUN echo "$GREETING $MODE" > greeting && ln -s greeting link && mkdir -p /var/x \\
    && chown daemon /var/x
SHELL ["/bin/bash", "-c"]
RUN [[ -n "$BASH_VERSION" ]] && echo bash > shell.txt
EXPOSE 8080 53/udp
VOLUME ["/data"]
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --retries=3 CMD test -e /app/greeting
USER nobody
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["echo hi"]
"""

# Paths whose mtimes come from the context (a directory copied gets the time of the copy).
COPIED = ("/app/a.txt", "/app/d/sub", "/app/d/plain", "/app/d/link", "/app/glob/a.txt")
COMPARED = ("Env", "Cmd", "Entrypoint", "WorkingDir", "User", "Labels", "ExposedPorts", "Volumes")


def make_context(root: Path, dockerfile: str = DOCKERFILE) -> Path:
    """A context with files, a directory (an executable, a symlink), a tar, ignored files."""
    (root / "d" / "sub").mkdir(parents=True)
    files = {
        "a.txt": b"alpha\n",
        "b.txt": b"bravo\n",
        "ignored.tmp": b"no\n",
        "d/sub/run.sh": b"#!/bin/sh\necho run\n",
        "d/skip.txt": b"no\n",
        "d/plain": b"plain\n",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    os.chmod(root / "d/sub/run.sh", 0o755)
    os.symlink("sub/run.sh", root / "d" / "link")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data, mode in (("x/", b"", 0o750), ("x/y", b"why\n", 0o604)):
            info = tarfile.TarInfo(name.rstrip("/"))
            info.type = tarfile.DIRTYPE if name.endswith("/") else tarfile.REGTYPE
            info.mode, info.size, info.mtime, info.uid = mode, len(data), MTIME, 7
            t.addfile(info, io.BytesIO(data))
    (root / "archive.tar").write_bytes(buf.getvalue())
    (root / ".dockerignore").write_text("*.tmp\nd/skip.txt\n")
    (root / "Dockerfile").write_text(dockerfile)
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in dirnames + filenames:
            os.utime(Path(dirpath) / name, (MTIME, MTIME), follow_symlinks=False)
    return root


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ls.Store, ls.Stack]]:
    store, image = runutil.debian_store(tmp_path_factory.mktemp("build") / "store")
    yield store, image
    assert store.mounts() == []


def config_of(store: ls.Store, image: ls.Stack) -> dict[str, Any]:
    assert image.config_digest is not None
    config: dict[str, Any] = json.loads(store.oci_blob(image.config_digest)[1])
    return config


class Buildah:
    """buildah with a private storage root (overlay driver)."""

    def __init__(self, root: Path) -> None:
        assert BUILDAH is not None
        self.base = [BUILDAH, "--root", str(root / "root"), "--runroot", str(root / "run")]
        self.base += ["--storage-driver", "overlay"]

    def __call__(self, *args: str) -> str:
        done = subprocess.run([*self.base, *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()


@pytest.fixture(scope="module")
def buildah(
    deb: tuple[ls.Store, ls.Stack], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Buildah, str]]:
    if BUILDAH is None:
        if os.environ.get("CI"):
            pytest.fail("buildah is not installed")
        pytest.skip("buildah is not installed")
    work = tmp_path_factory.mktemp("buildah")
    store, image = deb
    store.export_oci(image, work / "oci", tag="debian")
    b = Buildah(work)
    base_id = b("pull", "-q", f"oci:{work / 'oci'}:debian").splitlines()[-1]
    yield b, base_id
    b("rmi", "--all", "--force")


def test_a_build_equals_buildahs_tree_config_layers_and_history(
    deb: tuple[ls.Store, ls.Stack], buildah: tuple[Buildah, str], tmp_path: Path
) -> None:
    store, _ = deb
    b, base_id = buildah
    ctx = make_context(tmp_path / "ctx")
    ours = ls.build(store, ctx, tag="ours")
    # docker format: buildah ignores SHELL in OCI format (it warns so).
    bud = ["bud", "-q", "--isolation", "chroot", "--layers", "--format", "docker"]
    b(*bud, "--build-arg", f"BASE={base_id}", "-t", "theirs", str(ctx))
    b("push", "-q", "theirs", f"oci:{tmp_path / 'theirs'}:theirs")
    theirs = store.import_oci(tmp_path / "theirs")["theirs"]

    mine, other = config_of(store, ours), config_of(store, theirs)
    other["config"]["Labels"].pop("io.buildah.version")
    assert {k: mine["config"].get(k) for k in COMPARED} == {
        k: other["config"].get(k) for k in COMPARED
    }
    assert len(ours.layers) == len(theirs.layers)
    assert len(mine["history"]) == len(other["history"])
    assert [h.get("empty_layer", False) for h in mine["history"]] == [
        h.get("empty_layer", False) for h in other["history"]
    ]
    # buildah leaves its /etc/hosts mount point in RUN layers (an empty file); we do not.
    mine_tree, other_tree = (runutil.tree(i, mtimes=COPIED) for i in (ours, theirs))
    assert other_tree.pop("/etc/hosts")[0] == "file"
    assert "/etc/hosts" not in mine_tree
    differing = {
        path: (mine_tree.get(path), other_tree.get(path))
        for path in mine_tree.keys() | other_tree.keys()
        if mine_tree.get(path) != other_tree.get(path)
    }
    assert differing == {}


def test_a_rebuild_hits_the_cache_and_a_changed_source_rebuilds_from_its_step(
    deb: tuple[ls.Store, ls.Stack], tmp_path: Path
) -> None:
    store, _ = deb
    dockerfile = "FROM debian\nRUN echo one > /one\nCOPY a.txt /a\nRUN cat /a > /copy\nCMD x\n"
    ctx = make_context(tmp_path / "ctx", dockerfile)
    lines: list[str] = []
    first = ls.build(store, ctx, tag="cache", progress=lines.append)
    assert not any("using cache blake3" in line for line in lines)
    lines.clear()
    again = ls.build(store, ctx, tag="cache", progress=lines.append)
    assert sum("using cache blake3" in line for line in lines) == 3
    assert again.digest == first.digest
    (ctx / "a.txt").write_bytes(b"changed\n")
    lines.clear()
    changed = ls.build(store, ctx, tag="cache", progress=lines.append)
    hits = [i for i, line in enumerate(lines) if "using cache blake3" in line]
    assert len(hits) == 1 and lines[hits[0] - 1].startswith("STEP 2/5: RUN")
    assert changed.read_bytes("/copy") == b"changed\n"
    assert changed.layers[:2] == first.layers[:2] and changed.layers[2:] != first.layers[2:]


def test_a_cache_entry_whose_layer_is_gone_is_a_miss(
    deb: tuple[ls.Store, ls.Stack], tmp_path: Path
) -> None:
    store, _ = deb
    ctx = make_context(tmp_path / "ctx", "FROM debian\nCOPY b.txt /b\n")
    ls.build(store, ctx, tag="gone")
    cache = Path(store.path) / CACHE_FILE
    entries = json.loads(cache.read_text())
    cache.write_text(json.dumps({k: "blake3:" + "0" * 64 for k in entries}))
    lines: list[str] = []
    image = ls.build(store, ctx, tag="gone", progress=lines.append)
    assert not any("using cache blake3" in line for line in lines)
    assert image.read_bytes("/b") == b"bravo\n"


def test_two_builds_with_source_date_epoch_give_the_same_digests(
    deb: tuple[ls.Store, ls.Stack], tmp_path: Path
) -> None:
    store, _ = deb
    dockerfile = "FROM debian\nRUN echo x > /x && mkdir /d\nCOPY d /d/\nENV A=1\n"
    ctx = make_context(tmp_path / "ctx", dockerfile)
    cache = Path(store.path) / CACHE_FILE
    digests = []
    for _ in range(2):
        cache.unlink(missing_ok=True)
        image = ls.build(store, ctx, tag="repro", source_date_epoch=MTIME)
        digests.append((image.digest, [layer.diff_id for layer in image.layers]))
    assert digests[0] == digests[1]
    config = config_of(store, image)
    assert config["created"] == "2023-11-14T22:13:20Z"
    assert {h["created"] for h in config["history"][1:]} == {"2023-11-14T22:13:20Z"}


def test_dockerignore_leaves_files_out_of_copy(
    deb: tuple[ls.Store, ls.Stack], tmp_path: Path
) -> None:
    store, _ = deb
    ctx = make_context(tmp_path / "ctx", "FROM debian\nCOPY . /ctx/\n")
    image = ls.build(store, ctx)
    assert image.exists("/ctx/a.txt") and image.exists("/ctx/d/plain")
    assert not image.exists("/ctx/ignored.tmp") and not image.exists("/ctx/d/skip.txt")


def test_from_scratch_gives_only_the_copied_files(
    deb: tuple[ls.Store, ls.Stack], tmp_path: Path
) -> None:
    store, _ = deb
    ctx = make_context(tmp_path / "ctx", 'FROM scratch\nCOPY a.txt /a\nCMD ["/a"]\n')
    image = ls.build(store, ctx, tag="scratch-based")
    assert len(image.layers) == 1
    assert image.listdir("/") == ["a"]
    assert config_of(store, image)["config"] == {"Cmd": ["/a"]}
    assert len(config_of(store, image)["history"]) == 2


def test_config_only_instructions_write_the_config_and_empty_history(
    deb: tuple[ls.Store, ls.Stack], tmp_path: Path
) -> None:
    store, base = deb
    dockerfile = (
        'FROM debian\nMAINTAINER someone\nCMD ["old"]\nENTRYPOINT /bin/true\n'
        "STOPSIGNAL SIGKILL\nHEALTHCHECK --interval=1m30s --start-period=5s --retries=2 "
        'CMD ["true"]\nEXPOSE 80 81/udp\n'
    )
    image = ls.build(store, make_context(tmp_path / "ctx", dockerfile))
    config = config_of(store, image)
    assert image.layers == base.layers
    assert config["author"] == "someone"
    settings = config["config"]
    assert "Cmd" not in settings  # a new ENTRYPOINT resets CMD
    assert settings["Entrypoint"] == ["/bin/sh", "-c", "/bin/true"]
    assert settings["StopSignal"] == "SIGKILL"
    assert settings["Healthcheck"] == {
        "Test": ["CMD", "true"],
        "Interval": 90 * 10**9,
        "StartPeriod": 5 * 10**9,
        "Retries": 2,
    }
    assert settings["ExposedPorts"] == {"80/tcp": {}, "81/udp": {}}
    assert [h.get("empty_layer") for h in config["history"]] == [None] + [True] * 6


def test_target_stops_at_the_named_stage(deb: tuple[ls.Store, ls.Stack], tmp_path: Path) -> None:
    store, _ = deb
    ctx = make_context(tmp_path / "ctx")
    image = ls.build(store, ctx, target="builder", tag="builder-only")
    assert image.read_bytes("/out/artifact") == b"built\n"
    assert not image.exists("/app")


@pytest.mark.parametrize(
    ("dockerfile", "error", "message"),
    [
        ("FROM debian\nFROB x\n", ls.DockerfileError, "line 2: unknown instruction FROB"),
        ("FROM debian\nCOPY missing.txt /\n", ls.BuildError, "line 2: missing.txt: no such file"),
        ("FROM debian\nRUN exit 3\n", ls.BuildError, "line 2: 'RUN exit 3' exited with status 3"),
        ("FROM nosuchimage\n", ls.BuildError, "line 1: FROM nosuchimage: not in the store"),
        ("FROM debian\nADD http://example.com/x /\n", ls.BuildError, "ADD of a URL"),
    ],
)
def test_errors_name_their_line_and_tag_nothing(
    deb: tuple[ls.Store, ls.Stack],
    tmp_path: Path,
    dockerfile: str,
    error: type[Exception],
    message: str,
) -> None:
    store, _ = deb
    ctx = make_context(tmp_path / "ctx", dockerfile)
    with pytest.raises(error, match=message) as info:
        ls.build(store, ctx, tag="broken")
    if "status" in message:
        assert isinstance(info.value, ls.BuildError)
        assert (info.value.status, info.value.line) == (3, 2)
    assert "broken" not in store.images()
    assert store.mounts() == []


def test_ctrl_c_mid_step_tags_nothing_and_leaves_no_mount(
    deb: tuple[ls.Store, ls.Stack], tmp_path: Path
) -> None:
    store, _ = deb
    ctx = make_context(tmp_path / "ctx", "FROM debian\nRUN echo started && sleep 60\n")
    lines: list[str] = []
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            ls.build(store, ctx, tag="interrupted", progress=lines.append)
    finally:
        timer.cancel()
    assert "interrupted" not in store.images()
    assert store.mounts() == []


def test_the_cli_builds_and_tags(deb: tuple[ls.Store, ls.Stack], tmp_path: Path) -> None:
    store, _ = deb
    ctx = make_context(tmp_path / "ctx", "FROM debian\nARG V=0\nRUN echo $V > /v\n")
    (tmp_path / "Other").write_text("FROM debian\nARG V=0\nRUN echo other$V > /v\n")
    pythonpath = os.pathsep.join(str(Path(__file__).parents[1] / d) for d in ("python", "tests"))
    cli = ["python", "-m", "layerstore", "--store", store.path, "build", "-q"]
    env = {**os.environ, "PYTHONPATH": pythonpath}
    cmd = [*cli, "-f", str(tmp_path / "Other"), "--build-arg", "V=7", "-t", "cli", str(ctx)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == store.get("cli").digest
    assert store.get("cli").read_bytes("/v") == b"other7\n"


def test_store_build_and_stack_run_are_the_module_functions(
    deb: tuple[ls.Store, ls.Stack], tmp_path: Path
) -> None:
    """``Store.build`` and ``Stack.run`` delegate to ``layerstore.build`` and ``layerstore.run``."""
    store, base = deb
    ctx = make_context(tmp_path / "ctx", "FROM debian\nRUN echo built > /built-by-method\n")
    store.build(ctx, tag="by-method")
    assert store.get("by-method").read_bytes("/built-by-method") == b"built\n"
    # The base's layers, untagged: config-only builds above recorded other configs for them,
    # so the bare stack has none of those (no ENTRYPOINT of theirs runs) and runs argv as is.
    fresh = store.stack(base.layers)
    assert fresh.config_digest is None
    assert fresh.run(["sh", "-c", "exit 7"]) == 7
    status, layer = fresh.run(["sh", "-c", "echo ran > /ran"], commit=True)
    assert status == 0 and fresh.push(layer).read_bytes("/ran") == b"ran\n"


def test_from_a_registry_reference_pulls_the_image(tmp_path: Path) -> None:
    """FROM an image the store lacks pulls it (docker-registry on loopback), as buildah does."""
    import registryutil

    if registryutil.REGISTRY is None:
        pytest.fail("docker-registry is not installed (Debian package docker-registry)")
    registry = registryutil.Registry(tmp_path / "registry")
    try:
        source = ls.Store(tmp_path / "source")
        base = source.stack(
            [source.import_tar(tf.simple_tar({"base.txt": b"from the registry\n"}))]
        )
        source.push(base, f"{registry.host}/tiny:v1", tls_verify=False)
        store = ls.Store(tmp_path / "store")
        ctx = tmp_path / "ctx"
        ctx.mkdir()
        (ctx / "a.txt").write_bytes(b"copied\n")
        (ctx / "Dockerfile").write_text(f"FROM {registry.host}/tiny:v1\nCOPY a.txt /a\n")
        image = ls.build(store, ctx, tag="pulled", pull_options={"tls_verify": False})
        assert image.read_bytes("/base.txt") == b"from the registry\n"
        assert image.read_bytes("/a") == b"copied\n"
        assert [x.diff_id for x in image.layers[:1]] == [base.layers[0].diff_id]
        (ctx / "Dockerfile").write_text(f"FROM {registry.host}/missing:v1\nCOPY a.txt /a\n")
        with pytest.raises(ls.BuildError, match=r"line 1: FROM .*pulling it failed") as err:
            ls.build(store, ctx, tag="never", pull_options={"tls_verify": False})
        assert err.value.line == 1
        with pytest.raises(ls.NotFoundError):
            store.get("never")
        assert store.mounts() == []
        # The command line passes its registry options to the pull: the plain-HTTP registry
        # needs --tls-verify false, and without it the pull (so the build) fails.
        (ctx / "Dockerfile").write_text(f"FROM {registry.host}/tiny:v1\nCOPY a.txt /b\n")
        cli = [sys.executable, "-m", "layerstore", "--store", str(tmp_path / "cli")]
        refused = subprocess.run([*cli, "build", "-q", "-t", "c", str(ctx)], capture_output=True)
        assert refused.returncode == 1 and b"pulling it failed" in refused.stderr
        done = subprocess.run(
            [*cli, "build", "-q", "--tls-verify", "false", "-t", "c", str(ctx)],
            capture_output=True,
            check=True,
        )
        built = ls.Store(tmp_path / "cli").get("c")
        assert built.digest is not None and done.stdout.decode().strip() == built.digest
        assert built.read_bytes("/base.txt") == b"from the registry\n"
    finally:
        registry.stop()
