"""The command line as a new user meets it (issue 18): bad numbers, error messages that name what
was given once, compressions, surprises around the store, removal commands, image arguments and
output conventions. Run as a user would: ``python -m layerstore`` in a subprocess."""

from __future__ import annotations

import argparse
import bz2
import fcntl
import gzip
import io
import json
import lzma
import os
import pty
import struct
import subprocess
import sys
import tarfile
import termios
import types
from pathlib import Path
from typing import ClassVar

import layerstore as ls
import pytest
import tqdm
import zstandard
from layerstore.cli import build_parser

CLI = (sys.executable, "-m", "layerstore")


def run(*args: str, expect: int | None = 0) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("LAYERSTORE_HOME", "XDG_DATA_HOME")}
    proc = subprocess.run(
        [*CLI, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=env,
        timeout=300,
        check=False,
    )
    if expect is not None:
        assert proc.returncode == expect, (args, proc.returncode, proc.stderr.decode())
    return proc


def error_line(proc: subprocess.CompletedProcess[bytes]) -> str:
    """The one stderr line of a failed command (no traceback, no second line)."""
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert " error: " in lines[0] and "Traceback" not in lines[0], lines
    return lines[0]


def tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def two_layers(tmp_path: Path, store: Path) -> tuple[str, str]:
    """A base layer and an upper one that replaces /etc/hostname; tagged img = both."""
    base, upper = tmp_path / "base.tar", tmp_path / "upper.tar"
    base_files = {"etc/hostname": b"base\n", "etc/gone": b"x", "etc/passwd": b"root\n"}
    base.write_bytes(tar_bytes({**base_files, "etc/group": b"root\n"}))
    upper.write_bytes(tar_bytes({"etc/hostname": b"upper\n", "etc/.wh.gone": b""}))
    doc = json.loads(run("--store", str(store), "--json", "import", str(base), str(upper)).stdout)
    ids = (doc[0]["id"], doc[1]["id"])
    run("--store", str(store), "tag", "img", *ids)
    return ids


# ---------------------------------------------------------------------------------------------
# Defects


def test_bad_numbers_are_one_line_usage_errors(store: Path) -> None:
    for args, option in (
        (("squash", "img", "--start", "-1"), "--start"),
        (("squash", "img", "--stop", "-1"), "--stop"),
        (("squash", "img", "--start", "one"), "--start"),
        (("materialize", "img", "out", "--max-threads", "-1"), "--max-threads"),
        (("materialize", "img", "out", "--max-threads", "0"), "--max-threads"),
    ):
        line = error_line(run("--store", str(store), *args, expect=2))
        assert f"argument {option}:" in line, line


def test_api_numbers_raise_value_error_naming_the_argument(tmp_path: Path) -> None:
    store = ls.Store(tmp_path / "s")
    layer = store.import_tar(tar_bytes({"a": b"a"}))
    image = store.stack([layer])
    calls = {
        "max_threads": lambda: store.materialize(image, tmp_path / "m", max_threads=-1),
        "start": lambda: store.squash(image, -1),
        "stop": lambda: image.squash(0, -1),
        "max_bytes": lambda: ls.Limits(max_bytes=-1),
        "max_depth": lambda: ls.Store(tmp_path / "t", max_depth=0),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=rf"^{name} must"):
            call()
    with pytest.raises(ValueError, match=r"^max_threads must be at least 1"):
        store.import_dir(tmp_path, max_threads=0)
    with image.container() as c:
        with pytest.raises(ValueError, match=r"^mode must be at most 0o7777"):
            c.chmod("/a", 0o10000)
        with pytest.raises(ValueError, match=r"^uid must not be negative"):
            c.chown("/a", -1, 0)
        with pytest.raises(ValueError, match=r"^size must not be negative"):
            c.truncate("/a", -1)
    assert not (tmp_path / "m").exists()


def test_write_errors_name_the_destination_once(
    store: Path, two_layers: tuple[str, str], tmp_path: Path
) -> None:
    layer = two_layers[0]
    missing = tmp_path / "nonexist" / "x.tar"
    for dest, says in (
        (str(missing), f"{missing}: No such file or directory"),
        (str(tmp_path), f"{tmp_path}: Is a directory"),
        ("", "DEST is empty"),
    ):
        line = error_line(run("--store", str(store), "export", layer, dest, expect=1))
        assert says in line, line
        assert "layerstore-tmp" not in line and "os error" not in line and "Errno" not in line
        assert line.count("No such file") <= 1
    taken = tmp_path / "taken"
    taken.mkdir()
    line = error_line(run("--store", str(store), "materialize", "img", str(taken), expect=1))
    assert line.endswith(f"{taken}: File exists"), line
    # The Python API says it once too.
    with pytest.raises(FileNotFoundError) as e:
        ls.Store(store).export_tar(layer, missing)
    assert str(e.value) == f"[Errno 2] writing {missing}: No such file or directory"
    with pytest.raises(ValueError, match="destination '' names no file"):
        ls.Store(store).export_tar(layer, "")


def test_failed_multi_import_names_the_file_and_what_came_before(
    store: Path, tmp_path: Path
) -> None:
    good, bad = tmp_path / "good.tar", tmp_path / "bad.tar"
    good.write_bytes(tar_bytes({"a": b"a"}))
    bad.write_bytes(b"not a tar at all" * 64)
    proc = run("--store", str(store), "import", str(good), str(bad), str(good), expect=1)
    line = error_line(proc)
    assert line.startswith(f"layerstore: error: {bad}: invalid layer"), line
    assert line.endswith(f"(imported before it: {good})"), line
    assert proc.stdout.decode().startswith(f"imported {good}\n")


def test_xz_and_bzip2_layers_import_and_the_api_names_them(store: Path, tmp_path: Path) -> None:
    raw = tar_bytes({"etc/os-release": b"ID=test\n"})
    paths = {"xz": tmp_path / "l.tar.xz", "bzip2": tmp_path / "l.tar.bz2"}
    paths["xz"].write_bytes(lzma.compress(raw))
    paths["bzip2"].write_bytes(bz2.compress(raw))
    doc = json.loads(
        run("--store", str(store), "--json", "import", *map(str, paths.values())).stdout
    )
    assert len({d["id"] for d in doc}) == 1
    plain = ls.Store(store).import_tar(raw)
    assert doc[0]["diff_id"] == plain.diff_id
    for name, path in paths.items():
        with pytest.raises(ls.InvalidLayerError, match=f"{name}-compressed input is not supported"):
            ls.Store(store).import_tar(path)


def test_short_prefix_asks_for_more_digits(store: Path, two_layers: tuple[str, str]) -> None:
    short = two_layers[0].split(":")[1][:4]
    for args in (("show", short), ("cat", short, "/etc/hostname"), ("rm", short)):
        line = error_line(run("--store", str(store), *args, expect=1))
        assert f"'{short}' is too short" in line and "at least 6 hex digits" in line, line


def test_apply_reports_replaced_files_as_replaced(
    store: Path, two_layers: tuple[str, str], tmp_path: Path
) -> None:
    base, upper = two_layers
    dest = tmp_path / "rootfs"
    run("--store", str(store), "materialize", base, str(dest))
    doc = json.loads(run("--store", str(store), "--json", "apply", upper, str(dest)).stdout)
    # /etc/hostname replaced, /etc/gone removed by its whiteout.
    assert (doc["replaced"], doc["removed"]) == (1, 1)
    assert (dest / "etc" / "hostname").read_bytes() == b"upper\n"
    text = run("--store", str(store), "apply", upper, str(dest)).stdout.decode()
    assert "1 replaced, 0 removed" in text


# ---------------------------------------------------------------------------------------------
# Surprises


def test_failed_first_import_creates_no_store(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"\x00garbage" * 100)
    store = tmp_path / "new" / "store"
    error_line(run("--store", str(store), "import", str(bad), expect=1))
    assert not (tmp_path / "new").exists()
    error_line(run("--store", str(store), "import", str(tmp_path / "missing.tar"), expect=1))
    assert not (tmp_path / "new").exists()
    # An empty directory given as the store is left empty.
    empty = tmp_path / "empty"
    empty.mkdir()
    error_line(run("--store", str(empty), "import", str(bad), expect=1))
    assert list(empty.iterdir()) == []


def test_store_refuses_a_non_empty_directory_that_is_not_a_store(tmp_path: Path) -> None:
    tar = tmp_path / "a.tar"
    tar.write_bytes(tar_bytes({"a": b"a"}))
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine\n")
    line = error_line(run("--store", str(home), "import", str(tar), expect=1))
    assert f"{home} is not empty and is not a layerstore store" in line
    assert sorted(os.listdir(home)) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    run("--store", str(empty), "import", str(tar))
    assert (empty / "meta.db").exists()


def test_export_compression_follows_the_extension(
    store: Path, two_layers: tuple[str, str], tmp_path: Path
) -> None:
    layer = two_layers[0]
    raw = tmp_path / "raw.tar"
    run("--store", str(store), "export", layer, str(raw))
    for name, magic in (
        ("l.tar.gz", b"\x1f\x8b"),
        ("l.tgz", b"\x1f\x8b"),
        ("l.tar.zst", b"(\xb5/\xfd"),
    ):
        run("--store", str(store), "export", layer, str(tmp_path / name))
        assert (tmp_path / name).read_bytes()[:4].startswith(magic), name
    assert gzip.decompress((tmp_path / "l.tar.gz").read_bytes()) == raw.read_bytes()
    unzstd = zstandard.ZstdDecompressor().decompressobj()
    assert unzstd.decompress((tmp_path / "l.tar.zst").read_bytes()) == raw.read_bytes()
    for args, says in (
        (("--compression", "zstd", str(tmp_path / "x.tar.gz")), "does not match"),
        (("--compression", "none", str(tmp_path / "x.tgz")), "does not match"),
        ((str(tmp_path / "x.tar.xz"),), "cannot write xz"),
    ):
        line = error_line(run("--store", str(store), "export", layer, *args, expect=1))
        assert says in line, line
    assert not list(tmp_path.glob("x.*"))


def test_layout_import_says_when_it_moves_a_tag(
    store: Path, two_layers: tuple[str, str], tmp_path: Path
) -> None:
    layout = tmp_path / "layout"
    run("--store", str(store), "export", "img", f"oci:{layout}:v1")
    run("--store", str(store), "tag", "v1", two_layers[0])
    proc = run("--store", str(store), "--json", "import", str(layout))
    doc = json.loads(proc.stdout)
    old = ls.Store(store).stack([ls.Store(store).layer(two_layers[0])]).chain_id
    assert doc[0]["moved_tags"] == {"v1": old}
    assert proc.stderr.decode().startswith("layerstore: warning: tag v1 now names sha256:")
    # Importing it again moves nothing, and says nothing.
    again = run("--store", str(store), "--json", "import", f"oci:{layout}")
    assert json.loads(again.stdout)[0]["moved_tags"] == {} and again.stderr == b""


def test_show_and_ls_agree_whatever_name_finds_the_layer(store: Path, tmp_path: Path) -> None:
    raw = tar_bytes({"a": b"a" * 1000})
    plain, gz = tmp_path / "a.tar", tmp_path / "a.tar.gz"
    plain.write_bytes(raw)
    gz.write_bytes(gzip.compress(raw, mtime=0))
    doc = json.loads(run("--store", str(store), "--json", "import", str(gz), str(plain)).stdout)
    gz_digest = doc[0]["compressed_digest"]
    by_id = run("--store", str(store), "show", doc[0]["id"]).stdout
    by_blob = run("--store", str(store), "show", gz_digest).stdout
    assert by_id == by_blob
    assert f"compressed blob    gzip {gz_digest}" in by_id.decode()
    header, row = run("--store", str(store), "ls").stdout.decode().splitlines()
    assert header.split()[-2:] == ["BLOBS", "CREATED"] and row.split()[5] == "gzip"
    directory = tmp_path / "tree"
    directory.mkdir()
    run("--store", str(store), "import", str(directory))
    rows = run("--store", str(store), "ls").stdout.decode().splitlines()[1:]
    assert sorted(r.split()[5] for r in rows) == ["-", "gzip"]


def test_ls_and_show_list_every_compressed_blob_of_a_layer(store: Path, tmp_path: Path) -> None:
    raw = tar_bytes({"a": b"a" * 5000})
    gz, gz9 = tmp_path / "a.tar.gz", tmp_path / "a9.tar.gz"
    gz.write_bytes(gzip.compress(raw, compresslevel=1, mtime=0))
    gz9.write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))
    doc = json.loads(run("--store", str(store), "--json", "import", str(gz), str(gz9)).stdout)
    assert doc[0]["id"] == doc[1]["id"]
    imported = {doc[0]["compressed_digest"], doc[1]["compressed_digest"]}
    assert len(imported) == 2
    # An OCI image using a zstd blob of the layer records a third blob, one the store rebuilds
    # from the layer on demand.
    run("--store", str(store), "tag", "img", doc[0]["id"])
    layout = f"oci:{tmp_path / 'layout'}:v1"
    run("--store", str(store), "export", "img", layout, "--compression", "zstd")
    run("--store", str(store), "import", layout)
    listed = json.loads(run("--store", str(store), "--json", "ls").stdout)
    assert len(listed) == 1
    blobs = {b["digest"]: b for b in listed[0]["blobs"]}
    assert all(
        blobs[d]["origin"] == "imported" and blobs[d]["compression"] == "gzip" for d in imported
    )
    exported = [b for d, b in blobs.items() if d not in imported]
    assert len(exported) == 1 and exported[0]["compression"] == "zstd"
    assert exported[0]["origin"] != "imported" and exported[0]["size"] > 0
    header, row = run("--store", str(store), "ls").stdout.decode().splitlines()
    assert header.split()[5] == "BLOBS" and row.split()[5] == "gzip,zstd"
    shown = run("--store", str(store), "show", doc[0]["id"]).stdout.decode()
    for digest, blob in blobs.items():
        assert f"compressed blob    {blob['compression']} {digest} ({blob['origin']}" in shown


# ---------------------------------------------------------------------------------------------
# Missing commands and conventions


def test_rm_rmi_prune_free_space(store: Path, two_layers: tuple[str, str], tmp_path: Path) -> None:
    base, upper = two_layers
    s = ["--store", str(store)]
    line = error_line(run(*s, "rm", upper, expect=1))
    assert "used by 1 image (img)" in line and "--force" in line
    lone = tmp_path / "lone.tar"
    lone.write_bytes(tar_bytes({"lone": os.urandom(300_000)}))
    lone_id = json.loads(run(*s, "--json", "import", str(lone)).stdout)[0]["id"]
    run(*s, "tag", "keep", base)
    # prune removes what no tag reaches (the lone layer) and collects its chunks.
    pruned = json.loads(run(*s, "prune", "--json").stdout)
    assert pruned["removed"] == [lone_id] and pruned["gc"]["bytes_reclaimed"] > 0
    # rmi untags and removes the layers no other tag uses (upper; base stays for keep).
    doc = json.loads(run(*s, "--json", "rmi", "img").stdout)
    assert doc == {"untagged": ["img"], "removed": [upper]}
    # rm --force untags the images using the layer first.
    doc = json.loads(run(*s, "--json", "rm", "--force", base).stdout)
    assert doc == {"removed": [base], "untagged": ["keep"]}
    assert json.loads(run(*s, "--json", "ls").stdout) == []
    assert json.loads(run(*s, "--json", "images").stdout) == {}


def test_global_options_after_the_command(store: Path, two_layers: tuple[str, str]) -> None:
    after = json.loads(run("ls", "--json", "--store", str(store)).stdout)
    before = json.loads(run("--store", str(store), "--json", "ls").stdout)
    assert after == before and len(after) == 2
    assert run("ls", "--store", str(store), "--no-progress").stdout.startswith(b"ID ")


def test_every_image_argument_takes_tags_digests_and_layers(
    store: Path, two_layers: tuple[str, str], tmp_path: Path
) -> None:
    s = ["--store", str(store)]
    chain = json.loads(run(*s, "--json", "images").stdout)["img"]["chain_id"]
    for image, want in (
        ("img", b"upper\n"),
        (chain, b"upper\n"),
        (chain.split(":")[1][:10], b"upper\n"),
        (two_layers[0].split(":")[1][:8], b"base\n"),
    ):
        assert run(*s, "cat", image, "/etc/hostname").stdout == want, image
        tree = json.loads(run(*s, "--json", "tree", image).stdout)
        assert "/etc/hostname" in {t["path"] for t in tree}
    run(*s, "materialize", two_layers[0], str(tmp_path / "m"))
    assert (tmp_path / "m" / "etc" / "gone").read_bytes() == b"x"
    line = error_line(run(*s, "cat", "nothing-here", "/x", expect=1))
    assert "no image or layer 'nothing-here'" in line


def test_diff_prints_docker_statuses_and_says_what_it_left(
    store: Path, two_layers: tuple[str, str], tmp_path: Path
) -> None:
    s = ["--store", str(store)]
    root = tmp_path / "root"
    run(*s, "materialize", "img", str(root))
    (root / "etc" / "hostname").write_text("changed\n")
    (root / "etc" / "new").write_text("new\n")
    listed = run(*s, "diff", "--compare-only", "img", str(root)).stdout.decode().splitlines()
    assert {"C /etc/hostname", "A /etc/new"} <= set(listed)
    (root / "etc" / "hostname").unlink()
    doc = json.loads(run(*s, "--json", "diff", "--compare-only", "img", str(root)).stdout)
    assert {"status": "D", "change": "whiteout", "path": "/etc/hostname"} in doc
    out = run(*s, "diff", "img", str(root)).stdout.decode().splitlines()
    assert out[0].startswith("diff blake3:")
    assert out[1].startswith("the layer is in the store untagged:") and "rm " in out[1]
    squashed = run(*s, "squash", "img").stdout.decode().splitlines()
    assert squashed[1].startswith("the layer is in the store untagged:")


def test_plurals_units_and_image_listings(store: Path, two_layers: tuple[str, str]) -> None:
    s = ["--store", str(store)]
    assert run(*s, "tag", "one", two_layers[0]).stdout.decode().endswith("(1 layer)\n")
    assert run(*s, "tag", "two", *two_layers).stdout.decode().endswith("(2 layers)\n")
    assert "1 problem" not in run(*s, "fsck").stdout.decode()
    assert ": ok" in run(*s, "fsck").stdout.decode() and "(s)" not in run(*s, "gc").stdout.decode()
    images = json.loads(run(*s, "--json", "images").stdout)
    assert set(images["two"]) == {
        "chain_id",
        "digest",
        "config_digest",
        "layers",
        "size",
        "created",
    }
    assert images["two"]["size"] == sum(
        ls.Store(store).layer(layer).size for layer in images["two"]["layers"]
    )
    header = run(*s, "images").stdout.decode().splitlines()[0].split()
    assert header == ["TAG", "DIGEST", "CHAIN", "ID", "LAYERS", "SIZE", "CREATED"]
    inspect = json.loads(run(*s, "inspect", "two").stdout)
    assert inspect["tags"] == ["img", "two"] and len(inspect["layers"]) == 2
    assert set(inspect["layers"][0]) >= {"id", "diff_id", "size", "created", "created_by"}
    history = json.loads(run(*s, "--json", "history", "two").stdout)
    assert [h["id"] for h in history] == list(reversed(two_layers))
    text = run(*s, "du").stdout.decode() + run(*s, "ls").stdout.decode()
    assert " KiB" in text and " kB" not in text and " KB" not in text


def test_every_argument_has_help() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        for action in command._actions:
            assert action.help, f"{name} {action.dest} has no help"
        assert command.format_help().startswith(f"usage: layerstore {name}")
    squash = sub.choices["squash"].format_help()
    assert "0-based" in squash and "excluded" in squash


def test_progress_bar_counts_compressed_bytes_against_the_file_size(
    store: Path, tmp_path: Path
) -> None:
    """On a terminal, a gzip import draws a bar with a percentage, in binary units."""
    raw = tar_bytes({"big": os.urandom(8 << 20)})
    src = tmp_path / "big.tar.gz"
    src.write_bytes(gzip.compress(raw, compresslevel=1))
    text = drawn_on_a_terminal("--store", str(store), "import", str(src))
    assert "big.tar.gz:" in text and "%|" in text, text
    total = tqdm.tqdm.format_sizeof(src.stat().st_size, divisor=1024)
    assert f"/{total}iB [" in text, text  # the total is the compressed file's size
    assert " MB" not in text and "kB" not in text


def drawn_on_a_terminal(*args: str) -> str:
    """What the CLI run with `args` draws on a terminal as its stderr (it must succeed)."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(
        [*CLI, *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=terminal
    )
    os.close(terminal)
    drawn = b""
    while True:
        try:
            block = os.read(controller, 4096)
        except OSError:  # EIO: the process closed its end
            break
        if not block:
            break
        drawn += block
    os.close(controller)
    assert proc.wait(timeout=300) == 0
    return drawn.decode(errors="replace")


def test_materialize_and_apply_bars_count_against_the_content_they_write(
    store: Path, tmp_path: Path
) -> None:
    """The bars of materialize and apply show a percentage of the file content to write, each
    hardlinked file once (the total read from the index beforehand)."""
    big, small = os.urandom(24 << 20), os.urandom(3 << 20)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in (("big", big), ("small", small)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("again")
        link.type, link.linkname = tarfile.LNKTYPE, "big"
        t.addfile(link)
    src = tmp_path / "layer.tar"
    src.write_bytes(buf.getvalue())
    layer = json.loads(run("--store", str(store), "--json", "import", str(src)).stdout)[0]["id"]
    run("--store", str(store), "tag", "img", layer)
    total = tqdm.tqdm.format_sizeof(len(big) + len(small), divisor=1024)
    text = drawn_on_a_terminal("--store", str(store), "materialize", "img", str(tmp_path / "m"))
    assert "img:" in text and "%|" in text and f"/{total}iB [" in text, text
    (tmp_path / "a").mkdir()
    text = drawn_on_a_terminal("--store", str(store), "apply", layer, str(tmp_path / "a"))
    assert "%|" in text and f"/{total}iB [" in text, text


def test_layout_import_can_pick_one_ref(
    store: Path, two_layers: tuple[str, str], tmp_path: Path
) -> None:
    s = ["--store", str(store)]
    layout = tmp_path / "layout"
    run(*s, "export", "img", f"oci:{layout}:v1")
    run(*s, "export", two_layers[0], f"oci:{layout}:base")
    other = tmp_path / "other"
    doc = json.loads(run("--store", str(other), "--json", "import", f"oci:{layout}:v1").stdout)
    assert list(doc[0]["images"]) == ["v1"]
    assert list(json.loads(run("--store", str(other), "--json", "images").stdout)) == ["v1"]
    line = error_line(run("--store", str(other), "import", f"oci:{layout}:nope", expect=1))
    assert "no image 'nope' in the layout (it has: base, v1)" in line
    assert list(json.loads(run("--store", str(other), "--json", "images").stdout)) == ["v1"]


def test_inspect_and_history_of_an_imported_image_show_its_config(
    store: Path, two_layers: tuple[str, str], tmp_path: Path
) -> None:
    s = ["--store", str(store)]
    layout, other = tmp_path / "layout", tmp_path / "other"
    run(*s, "export", "img", f"oci:{layout}:v1")
    run("--store", str(other), "import", str(layout))
    doc = json.loads(run("--store", str(other), "inspect", "v1").stdout)
    diff_ids = [ls.Store(store).layer(i).diff_id for i in two_layers]
    assert doc["config"]["rootfs"]["diff_ids"] == diff_ids
    assert [m["digest"] for m in doc["manifest"]["layers"]] == [
        layer["compressed_digest"] or layer["diff_id"] for layer in doc["layers"]
    ]
    steps = json.loads(run("--store", str(other), "--json", "history", "v1").stdout)
    assert [h["id"] for h in steps] == list(reversed(two_layers))
    # Newest first; each dated when its layer was stored (as the exported config says).
    assert [h["created"] for h in steps] == [
        e["created"] for e in reversed(doc["config"]["history"])
    ]
    assert set(steps[0]) == {"id", "size", "created", "created_by", "comment", "empty_layer"}
    header = run("--store", str(other), "history", "v1").stdout.decode().splitlines()[0]
    assert header.split() == ["LAYER", "CREATED", "CREATED", "BY", "SIZE", "COMMENT"]


def test_config_writes_a_new_image_with_the_config_changed(
    store: Path, two_layers: tuple[str, str], tmp_path: Path
) -> None:
    s = ["--store", str(store)]
    env = {k: v for k, v in os.environ.items() if k not in ("LAYERSTORE_HOME", "XDG_DATA_HOME")}
    args = [
        *s,
        "--json",
        "config",
        "img",
        "--env",
        "PATH=/bin",
        "--label",
        "team=core",
        "--entrypoint",
        '["/bin/sh", "-c"]',
        "--cmd",
        "true",
        "--workdir",
        "/srv",
        "--tag",
        "img:cfg",
    ]
    proc = subprocess.run(
        [*CLI, *args], capture_output=True, env={**env, "SOURCE_DATE_EPOCH": "1700000000"}
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    inspected = json.loads(run(*s, "inspect", "img:cfg").stdout)
    assert (
        inspected["digest"] == doc["digest"]
        and inspected["chain_id"] == json.loads(run(*s, "inspect", "img").stdout)["chain_id"]
    )
    config = inspected["config"]
    assert config["created"] == "2023-11-14T22:13:20Z"
    assert config["config"]["Env"] == ["PATH=/bin"]
    assert config["config"]["Labels"] == {"team": "core"}
    assert (config["config"]["Entrypoint"], config["config"]["Cmd"]) == (
        ["/bin/sh", "-c"],
        ["true"],
    )
    assert config["config"]["WorkingDir"] == "/srv"
    steps = json.loads(run(*s, "--json", "history", "img:cfg").stdout)
    assert steps[0]["empty_layer"] and steps[0]["created_by"].startswith("layerstore config: ENV")
    assert [h["id"] for h in steps[1:]] == list(reversed(two_layers))
    # The Python API: env merges into what is there.
    again = ls.with_config(
        ls.Store(store), ls.Store(store).get("img:cfg"), tag="img:2", env={"A": "1"}
    )
    raw = ls.Store(store).oci_blob(again.config_digest or "")[1]
    assert json.loads(raw)["config"]["Env"] == ["PATH=/bin", "A=1"]
    line = error_line(run(*s, "config", "img", "--env", "NOEQUALS", "--tag", "x", expect=2))
    assert "expected KEY=VALUE" in line


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Bar:
    """What progress_bar asks of tqdm, recording the count."""

    made: ClassVar[list[_Bar]] = []

    def __init__(self, total: int | None = None, **_: object) -> None:
        self.total, self.n = total, 0
        _Bar.made.append(self)

    def update(self, n: int) -> None:
        self.n += n

    def close(self) -> None:
        pass


@pytest.mark.parametrize(("parts", "counted"), [(True, 100 + 200 + 150), (False, 200)])
def test_progress_counts_work_done_in_parts_only_when_told(
    monkeypatch: pytest.MonkeyPatch, parts: bool, counted: int
) -> None:
    """An image export reports each layer from zero (parts: added up); threads of one job may
    report out of order (no parts: a lower count is ignored, never subtracted or added)."""
    from layerstore._cliout import progress_bar

    monkeypatch.setattr(sys, "stderr", _Terminal())
    monkeypatch.setitem(sys.modules, "tqdm", types.SimpleNamespace(tqdm=_Bar))
    _Bar.made.clear()
    with progress_bar("x", lambda: 450, True, parts=parts) as update:
        assert update is not None
        for done in (40, 100, 60, 200, 150, 150):
            update(done)
    assert [(bar.total, bar.n) for bar in _Bar.made] == [(450, counted)]
