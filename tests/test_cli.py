"""The ``layerstore`` command line, run as a user would: ``python -m layerstore`` in a subprocess,
on real tars written by GNU tar."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import layerstore as ls
import pytest
import zstandard

TAR = shutil.which("tar")
CLI = (sys.executable, "-m", "layerstore")
pytestmark = pytest.mark.skipif(TAR is None, reason="GNU tar is not installed")


def run(
    store: Path | None,
    *args: str,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    expect: int | None = 0,
) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI; check its exit status unless `expect` is None."""
    base = {k: v for k, v in os.environ.items() if k not in ("LAYERSTORE_HOME", "XDG_DATA_HOME")}
    cmd = list(CLI)
    if store is not None:
        cmd += ["--store", str(store)]
    proc = subprocess.run(
        [*cmd, *args],
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        env={**base, **(env or {})},
        timeout=300,
        check=False,
    )
    if expect is not None:
        assert proc.returncode == expect, (
            f"{args}: exit {proc.returncode}, stderr: {proc.stderr.decode(errors='replace')}"
        )
    return proc


def run_json(store: Path, *args: str) -> object:
    return json.loads(run(store, "--json", *args).stdout)


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def gnu_tar(*args: str | Path) -> None:
    assert TAR is not None
    subprocess.run([TAR, *map(str, args)], check=True, capture_output=True)


def tar_names(tar: Path) -> list[str]:
    assert TAR is not None
    out = subprocess.run([TAR, "-tf", str(tar)], check=True, capture_output=True).stdout
    return out.decode().splitlines()


def one_error_line(proc: subprocess.CompletedProcess[bytes]) -> str:
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("layerstore: error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small tree with every common kind of entry."""
    root = tmp_path_factory.mktemp("tree") / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("layerstore\n")
    (root / "empty").write_bytes(b"")
    # Several chunks (FastCDC max is 256 KiB), from a fixed seed.
    big = hashlib.shake_256(b"layerstore cli").digest(700_000)
    (root / "big.bin").write_bytes(big)
    (root / "big-copy.bin").write_bytes(big)
    deep = root / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    (deep / ("long-name-" + "x" * 90)).write_text("long\n")
    os.symlink("etc/hostname", root / "link")
    os.link(root / "etc" / "hostname", root / "hardlink")
    os.mkfifo(root / "fifo")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o4755)
    # Without user xattrs on this filesystem the rest still tests.
    with contextlib.suppress(OSError):
        os.setxattr(root / "etc" / "hostname", "user.layerstore", b"\x00\xffvalue")
    return root


@pytest.fixture(scope="module")
def tars(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tree archived by GNU tar in each format, plus gzip and zstd compressions."""
    out = tmp_path_factory.mktemp("tars")
    made: dict[str, Path] = {}
    for fmt in ("gnu", "posix", "ustar"):
        path = out / f"{fmt}.tar"
        extra = ["--xattrs"] if fmt == "posix" else []
        if fmt == "ustar":
            # ustar cannot hold the 130-byte path; archive the rest.
            gnu_tar(f"--format={fmt}", "--sort=name", "-C", tree, "-cf", path, "etc", "big.bin")
        else:
            gnu_tar(f"--format={fmt}", *extra, "--sort=name", "-C", tree, "-cf", path, ".")
        made[fmt] = path
    raw = made["posix"].read_bytes()
    made["gzip"] = out / "posix.tar.gz"
    made["gzip"].write_bytes(gzip.compress(raw, mtime=0))
    made["zstd"] = out / "posix.tar.zst"
    made["zstd"].write_bytes(zstandard.ZstdCompressor(level=3).compress(raw))
    return made


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


# ---------------------------------------------------------------------------------------------
# import, ls, show


def test_import_prints_identity(store: Path, tars: dict[str, Path]) -> None:
    proc = run(store, "import", str(tars["gnu"]))
    text = proc.stdout.decode()
    assert f"diff_id  {sha256(tars['gnu'])}" in text
    assert "id       blake3:" in text
    assert f"entries  {len(tar_names(tars['gnu']))}" in text
    assert f"({tars['gnu'].stat().st_size:,} bytes)" in text
    assert proc.stderr == b""


def test_import_json_is_one_document(store: Path, tars: dict[str, Path]) -> None:
    doc = run_json(store, "import", str(tars["gnu"]), str(tars["posix"]))
    assert isinstance(doc, list)
    assert [d["source"] for d in doc] == [str(tars["gnu"]), str(tars["posix"])]
    for d, name in zip(doc, ("gnu", "posix"), strict=True):
        assert d["diff_id"] == sha256(tars[name])
        assert d["size"] == tars[name].stat().st_size
        assert d["id"].startswith("blake3:") and d["tree_id"].startswith("blake3:")
        assert d["compression"] is None


def test_ls_lists_layers(store: Path, tars: dict[str, Path]) -> None:
    run(store, "import", str(tars["gnu"]), str(tars["ustar"]))
    doc = run_json(store, "ls")
    assert isinstance(doc, list)
    assert sorted(d["diff_id"] for d in doc) == sorted(sha256(tars[n]) for n in ("gnu", "ustar"))
    text = run(store, "ls").stdout.decode().splitlines()
    assert text[0].split()[:3] == ["ID", "DIFF", "ID"]
    assert len(text) == 3
    short = {d["id"].split(":")[1][:12] for d in doc}
    assert {line.split()[0] for line in text[1:]} == short
    full = run(store, "ls", "--no-trunc").stdout.decode()
    assert all(d["id"] in full and d["diff_id"] in full for d in doc)


def test_show_lists_entries_like_tar(store: Path, tars: dict[str, Path], tree: Path) -> None:
    doc = run_json(store, "import", str(tars["posix"]))
    assert isinstance(doc, list)
    layer_id = doc[0]["id"]
    # A unique hex prefix of the id is enough.
    text = run(store, "show", layer_id.split(":")[1][:10]).stdout.decode()
    assert f"diff_id            {sha256(tars['posix'])}" in text
    listing = text.split("\n\n", 1)[1].splitlines()
    assert len(listing) == len(tar_names(tars["posix"]))
    # mode, owner, size, date, time, then the name (and " -> target" or " link to target")
    by_name = {line.split(None, 5)[5].split(" ")[0]: line for line in listing}
    assert by_name["/link"].endswith("/link -> etc/hostname")
    assert by_name["/link"].startswith("lrwxrwxrwx")
    assert "/hardlink link to /etc/hostname" in text or "/etc/hostname link to /hardlink" in text
    assert by_name["/run.sh"].startswith("-rwsr-xr-x")
    assert by_name["/fifo"].startswith("p")
    assert by_name["/etc/"].startswith("drwx")
    assert f" {700_000} " in by_name["/big.bin"]

    shown = run_json(store, "show", layer_id)
    assert isinstance(shown, dict)
    assert shown["id"] == layer_id
    entries = {e["path"]: e for e in shown["entries"]}
    assert len(shown["entries"]) == shown["entry_count"]
    assert entries["/big.bin"]["kind"] == "file"
    assert entries["/big.bin"]["digest"] == entries["/big-copy.bin"]["digest"]
    assert entries["/big.bin"]["chunk_count"] >= 2
    assert entries["/link"]["linkname"] == "etc/hostname"
    assert entries["/fifo"]["kind"] == "fifo"
    assert entries["/run.sh"]["mode"] == 0o4755
    long_paths = [p for p in entries if len(p) > 200]
    assert len(long_paths) == 1
    try:
        value = os.getxattr(tree / "etc" / "hostname", "user.layerstore")
    except OSError:
        value = None
    if value is not None:
        assert entries["/etc/hostname"]["xattrs"] == {"user.layerstore": "AP92YWx1ZQ=="}


def test_non_utf8_names_round_trip(store: Path, tmp_path: Path) -> None:
    root = tmp_path / "latin1"
    root.mkdir()
    name = os.fsdecode(b"caf\xe9")
    (root / name).write_bytes(b"x")
    tar = tmp_path / "latin1.tar"
    gnu_tar("-C", root, "-cf", tar, name)
    run(store, "import", str(tar))
    assert b" /caf\xe9\n" in run(store, "show", sha256(tar)).stdout
    shown = json.loads(run(store, "--json", "show", sha256(tar)).stdout)
    assert [os.fsencode(e["path"]) for e in shown["entries"]] == [b"/caf\xe9"]


# ---------------------------------------------------------------------------------------------
# export


@pytest.mark.parametrize("fmt", ["gnu", "posix", "ustar"])
def test_export_is_byte_identical(store: Path, tars: dict[str, Path], fmt: str) -> None:
    run(store, "import", str(tars[fmt]))
    out = store.parent / "out.tar"
    proc = run(store, "export", sha256(tars[fmt]), str(out))
    assert out.read_bytes() == tars[fmt].read_bytes()
    assert sha256(tars[fmt]) in proc.stdout.decode()
    piped = run(store, "export", sha256(tars[fmt]), "-")
    assert piped.stdout == tars[fmt].read_bytes()
    assert piped.stderr == b""


def test_export_compressed(store: Path, tars: dict[str, Path]) -> None:
    run(store, "import", str(tars["posix"]))
    raw = tars["posix"].read_bytes()
    key = sha256(tars["posix"])
    gz = store.parent / "out.tar.gz"
    doc = run_json(store, "export", key, str(gz), "--compression", "gzip")
    assert isinstance(doc, dict)
    assert gzip.decompress(gz.read_bytes()) == raw
    assert doc["digest"] == sha256(gz)
    assert doc["diff_id"] == key
    zst = run(store, "export", key, "-", "--compression", "zstd").stdout
    assert zstandard.ZstdDecompressor().decompressobj().decompress(zst) == raw


def test_compressed_imports_dedup(store: Path, tars: dict[str, Path]) -> None:
    first = run_json(store, "import", str(tars["posix"]))
    chunks = run_json(store, "du")
    again = run_json(store, "import", str(tars["gzip"]), str(tars["zstd"]))
    assert isinstance(first, list) and isinstance(again, list)
    assert {d["id"] for d in again} == {first[0]["id"]}
    assert [d["compression"] for d in again] == ["gzip", "zstd"]
    assert again[0]["compressed_digest"] == sha256(tars["gzip"])
    assert run_json(store, "du") == chunks
    listed = run_json(store, "ls")
    assert isinstance(listed, list) and len(listed) == 1
    # The compressed blob's digest finds the layer too.
    shown = run_json(store, "show", sha256(tars["zstd"]))
    assert isinstance(shown, dict) and shown["id"] == first[0]["id"]


def test_import_directory_and_stdin(store: Path, tars: dict[str, Path], tree: Path) -> None:
    doc = run_json(store, "import", str(tree))
    assert isinstance(doc, list)
    dir_layer = doc[0]
    out = store.parent / "dir.tar"
    run(store, "export", dir_layer["id"], str(out))
    assert sha256(out) == dir_layer["diff_id"]
    names = set(tar_names(out))
    assert {"etc/", "etc/hostname", "big.bin", "link", "hardlink", "fifo"} <= names
    # Same tree, same canonical tar, same layer.
    again = run_json(store, "import", str(tree))
    assert isinstance(again, list) and again[0]["id"] == dir_layer["id"]

    piped = run(store, "--json", "import", "-", input=tars["gnu"].read_bytes())
    from_stdin = json.loads(piped.stdout)
    assert from_stdin[0]["diff_id"] == sha256(tars["gnu"])
    assert from_stdin[0]["source"] == "-"


# ---------------------------------------------------------------------------------------------
# du, gc, fsck


def test_du_reports_dedup(store: Path, tars: dict[str, Path]) -> None:
    run(store, "import", str(tars["gnu"]), str(tars["posix"]))
    stats = run_json(store, "du")
    assert isinstance(stats, dict)
    assert stats["layers"] == 2
    assert stats["logical_bytes"] == sum(tars[n].stat().st_size for n in ("gnu", "posix"))
    # Both tars hold the same file contents, and big.bin twice: stored once.
    assert stats["content_bytes"] < stats["logical_bytes"] / 2
    assert stats["dedup_ratio"] > 2
    text = run(store, "du").stdout.decode()
    assert "dedup ratio" in text and "logical" in text and "stored" in text
    assert "KiB" in text or "MiB" in text


def test_gc_and_fsck(store: Path, tars: dict[str, Path]) -> None:
    run(store, "import", str(tars["gnu"]))
    gc = run_json(store, "gc")
    assert isinstance(gc, dict) and gc["chunks_removed"] == 0 and gc["deferred"] is False
    assert "reclaimed" in run(store, "gc").stdout.decode()
    fsck = run_json(store, "fsck")
    assert isinstance(fsck, dict) and fsck["ok"] is True and fsck["problems"] == []
    assert fsck["layers_checked"] == 1 and fsck["chunks_checked"] > 0
    assert run(store, "fsck").stdout.decode().strip().endswith(": ok")
    # A stray file in packs/ (an interrupted import's) is garbage, not a problem; gc removes it.
    stray = store / "packs" / "stray.pack"
    stray.write_bytes(b"LSPACK01 torn")
    assert "leftover" in run(store, "fsck").stdout.decode()
    assert run_json(store, "gc") != gc
    assert not stray.exists()


def test_fsck_reports_corruption(store: Path, tars: dict[str, Path]) -> None:
    run(store, "import", str(tars["gnu"]))
    pack = next((store / "packs").iterdir())
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pack.write_bytes(bytes(data))
    proc = run(store, "fsck", expect=1)
    assert "problem: chunk blake3:" in proc.stdout.decode()
    doc = json.loads(run(store, "--json", "fsck", expect=1).stdout)
    assert doc["ok"] is False and doc["problems"]
    # Export of a corrupt layer fails cleanly too.
    proc = run(store, "export", sha256(tars["gnu"]), str(store.parent / "x.tar"), expect=1)
    assert "corrupt" in one_error_line(proc) or "match" in one_error_line(proc)


# ---------------------------------------------------------------------------------------------
# errors


def test_missing_file_is_a_one_line_error(store: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such.tar"
    proc = run(store, "import", str(missing), expect=1)
    line = one_error_line(proc)
    assert str(missing) in line and "No such file" in line
    assert proc.stdout == b""


@pytest.mark.parametrize("kind", ["garbage", "truncated", "bad-gzip"])
def test_bad_tar_is_a_one_line_error(
    store: Path, tars: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    bad = tmp_path / "bad.tar"
    raw = tars["gnu"].read_bytes()
    if kind == "garbage":
        bad.write_bytes(hashlib.shake_256(b"garbage").digest(4096))
    elif kind == "truncated":
        bad.write_bytes(raw[:1536])
    else:
        gz = gzip.compress(raw)
        bad.write_bytes(gz[: len(gz) // 2] + b"\x00" * 64 + gz[len(gz) // 2 + 64 :])
    run(store, "import", str(tars["ustar"]))
    line = one_error_line(run(store, "import", str(bad), expect=1))
    assert "invalid layer" in line and str(bad) in line
    listed = run_json(store, "ls")
    assert isinstance(listed, list) and [d["diff_id"] for d in listed] == [sha256(tars["ustar"])]
    gc = run_json(store, "gc")
    assert isinstance(gc, dict) and gc["bytes_reclaimed"] == 0


def test_unknown_layer_and_missing_store(store: Path, tars: dict[str, Path]) -> None:
    line = one_error_line(run(store, "ls", expect=1))
    assert "no store at" in line
    assert not store.exists(), "read-only commands must not create a store"
    run(store, "import", str(tars["gnu"]))
    line = one_error_line(run(store, "show", "sha256:" + "0" * 64, expect=1))
    assert "not found" in line
    one_error_line(run(store, "export", "0123456789", str(store.parent / "x.tar"), expect=1))


def test_usage_errors_exit_2(store: Path) -> None:
    # One line, like every other error, pointing at the help.
    for args in (("frobnicate",), ("export",), ("export", "abc", "x", "--compression", "lz4")):
        lines = run(store, *args, expect=2).stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith("layerstore"), lines
        assert ": error: " in lines[0] and "--help" in lines[0], lines
    assert b"import" in run(store, "--help").stdout
    assert run(store, "--version").stdout.startswith(b"layerstore ")


def test_refuses_json_with_tar_on_stdout(store: Path, tars: dict[str, Path]) -> None:
    run(store, "import", str(tars["gnu"]))
    proc = run(store, "--json", "export", sha256(tars["gnu"]), "-", expect=1)
    assert proc.stdout == b""
    one_error_line(proc)


def test_sanitising_warns_in_one_line(store: Path, tree: Path, tmp_path: Path) -> None:
    absolute = tmp_path / "absolute.tar"
    gnu_tar("-P", "-cf", absolute, str(tree / "etc" / "hostname"))
    proc = run(store, "import", str(absolute))
    warnings = [line for line in proc.stderr.decode().splitlines() if line]
    assert warnings and all(w.startswith("layerstore: warning: ") for w in warnings)
    assert "leading '/'" in warnings[0]


# ---------------------------------------------------------------------------------------------
# store location, signals, pipes


def test_default_store_location(tmp_path: Path, tars: dict[str, Path]) -> None:
    home = tmp_path / "home"
    home.mkdir()
    src = str(tars["ustar"])
    run(None, "import", src, env={"HOME": str(home)})
    assert (home / ".local" / "share" / "layerstore" / "meta.db").exists()
    xdg = tmp_path / "xdg"
    run(None, "import", src, env={"HOME": str(home), "XDG_DATA_HOME": str(xdg)})
    assert (xdg / "layerstore" / "meta.db").exists()
    explicit = tmp_path / "explicit"
    env = {"HOME": str(home), "XDG_DATA_HOME": str(xdg), "LAYERSTORE_HOME": str(explicit)}
    run(None, "import", src, env=env)
    assert (explicit / "meta.db").exists()
    listed = json.loads(run(None, "--json", "ls", env=env).stdout)
    assert [d["diff_id"] for d in listed] == [sha256(tars["ustar"])]
    # --store wins over the environment.
    run(tmp_path / "flag", "import", src, env=env)
    assert (tmp_path / "flag" / "meta.db").exists()


def test_ctrl_c_exits_130_with_one_line(store: Path, tars: dict[str, Path]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LAYERSTORE_HOME"}
    proc = subprocess.Popen(
        [*CLI, "--store", str(store), "import", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdin is not None
    # Half a tar, then nothing: the import waits for more input until interrupted.
    raw = tars["gnu"].read_bytes()
    proc.stdin.write(raw[: len(raw) // 2])
    proc.stdin.flush()
    deadline = time.monotonic() + 60
    while not (store / "meta.db").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    proc.stdin.close()
    assert proc.returncode == 130, err
    assert err.decode().splitlines() == ["layerstore: error: interrupted"]
    assert out == b""
    # The interrupted import was the store's first: it leaves no store behind.
    assert not store.exists()


def test_export_into_closed_pipe_is_quiet(store: Path, tars: dict[str, Path]) -> None:
    run(store, "import", str(tars["gnu"]))
    reader, writer = os.pipe()
    os.close(reader)
    try:
        proc = subprocess.run(
            [*CLI, "--store", str(store), "export", sha256(tars["gnu"]), "-"],
            stdout=writer,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
    finally:
        os.close(writer)
    assert proc.returncode == 141
    assert proc.stderr == b""


def test_tag_images_cat_tree_untag(store: Path, tmp_path: Path) -> None:
    """Images from the command line: tag a stack, list it, read a file, list the tree, untag."""
    base = tmp_path / "base"
    (base / "etc").mkdir(parents=True)
    (base / "etc" / "hostname").write_bytes(b"box\n")
    (base / "etc" / "gone").write_bytes(b"x")
    os.symlink("etc", base / "link")
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "hostname").write_bytes(b"upper\n")
    (upper / "etc" / ".wh.gone").write_bytes(b"")
    ids = []
    for layer_dir in (base, upper):
        tar = tmp_path / f"{layer_dir.name}.tar"
        gnu_tar("--sort=name", "-C", layer_dir, "-cf", tar, ".")
        imported = run_json(store, "import", str(tar))
        assert isinstance(imported, list)
        ids.append(imported[0]["id"])
    run(store, "tag", "app:1", *ids)
    images = run_json(store, "images")
    assert isinstance(images, dict) and list(images) == ["app:1"]
    assert len(images["app:1"]["layers"]) == 2
    assert run(store, "cat", "app:1", "/etc/hostname").stdout == b"upper\n"
    listing = run_json(store, "tree", "app:1")
    assert isinstance(listing, list)
    paths = {t["path"]: t for t in listing}
    assert set(paths) == {"/", "/etc", "/etc/hostname", "/link"}
    assert paths["/etc/hostname"]["layer"] == 1
    assert paths["/link"]["kind"] == "symlink"
    missing = run(store, "cat", "app:1", "/etc/gone", expect=1)
    assert "No such file" in one_error_line(missing)
    bad = run(store, "tag", "has space", ids[0], expect=1)
    assert "invalid tag" in one_error_line(bad)
    run(store, "untag", "app:1")
    assert run_json(store, "images") == {}


def test_diff_squash_commit(store: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/a").write_bytes(b"a")
    (root / "etc/b").write_bytes(b"b")
    doc = run_json(store, "import", str(root))
    layer_id = doc[0]["id"] if isinstance(doc, list) else doc["id"]  # type: ignore[index]
    run(store, "tag", "base", layer_id)
    (root / "etc/a").unlink()
    (root / "etc/c").write_bytes(b"c")
    listed = run(store, "diff", "--compare-only", "base", str(root)).stdout.decode()
    assert listed.splitlines()[-2:] == ["D /etc/a", "A /etc/c"]
    committed = run_json(store, "commit", "base", str(root), "--tag", "next")
    assert committed["tag"] == "next"  # type: ignore[index]
    flat = tmp_path / "flat.tar"
    squashed = run_json(store, "squash", "next", "--tag", "flat", "-o", str(flat))
    assert flat.stat().st_size == squashed["size"]  # type: ignore[index]
    s = ls.Store(store)
    assert s.get("flat").listdir("/etc") == ["b", "c"] and len(s.get("flat")) == 1
    assert run(store, "diff", "--compare-only", "next", "flat").stdout == b""
