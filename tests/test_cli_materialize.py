"""``layerstore materialize IMAGE DEST`` and ``layerstore apply LAYER DEST``, run as a user would
(``python -m layerstore`` in a subprocess), on tars written by GNU tar; GNU tar's extraction of the
same tars is the oracle."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TAR = shutil.which("tar")
CLI = (sys.executable, "-m", "layerstore")
pytestmark = pytest.mark.skipif(TAR is None, reason="GNU tar is not installed")


def run(store: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("LAYERSTORE_HOME", "XDG_DATA_HOME")}
    proc = subprocess.run(
        [*CLI, "--store", str(store), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == expect, f"{args}: exit {proc.returncode}, {proc.stderr.decode()}"
    return proc


def listing(root: Path) -> dict[str, tuple[int, int, int, bytes | str | None]]:
    out: dict[str, tuple[int, int, int, bytes | str | None]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            data: bytes | str | None = None
            if os.path.islink(p):
                data = os.readlink(p)
            elif os.path.isfile(p):
                data = Path(p).read_bytes()
            key = os.path.relpath(p, root)
            out[key] = (st.st_mode, st.st_mtime_ns if not os.path.isdir(p) else 0, st.st_uid, data)
    return out


@pytest.fixture
def layers(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A base tree and an upper layer (with a whiteout) as GNU tars, and the store."""
    assert TAR is not None
    base = tmp_path / "base"
    (base / "etc").mkdir(parents=True)
    (base / "etc/hostname").write_text("base\n")
    (base / "etc/gone").write_text("whited out\n")
    os.symlink("etc/hostname", base / "link")
    os.link(base / "etc/hostname", base / "hard")
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc/.wh.gone").write_bytes(b"")
    (upper / "etc/new").write_text("upper\n")
    for tree in (base, upper):
        subprocess.run(
            [TAR, "--format=posix", "--sort=name", "-C", tree, "-cf", f"{tree}.tar", "."],
            check=True,
        )
    return tmp_path / "base.tar", tmp_path / "upper.tar", tmp_path / "store"


def test_materialize_and_apply(layers: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base_tar, _, store = layers
    ids = [json.loads(run(store, "--json", "import", str(t)).stdout)[0]["id"] for t in layers[:2]]
    run(store, "tag", "img:1", ids[0])
    run(store, "tag", "img:2", *ids)

    out = run(store, "materialize", "img:1", str(tmp_path / "m1")).stdout.decode()
    assert out.startswith("materialized img:1 into ")
    extracted = tmp_path / "gnutar"
    extracted.mkdir()
    subprocess.run([str(TAR), "--numeric-owner", "-C", extracted, "-xf", base_tar], check=True)
    assert listing(tmp_path / "m1") == listing(extracted)
    assert os.lstat(tmp_path / "m1/hard").st_ino == os.lstat(tmp_path / "m1/etc/hostname").st_ino

    doc = json.loads(run(store, "--json", "apply", ids[1][:20], str(tmp_path / "m1")).stdout)
    assert doc["removed"] == 1 and doc["layer"] == ids[1]
    run(store, "materialize", "img:2", str(tmp_path / "m2"))
    assert listing(tmp_path / "m1") == listing(tmp_path / "m2")
    assert sorted(os.listdir(tmp_path / "m2/etc")) == ["hostname", "new"]


def test_errors_are_one_line(layers: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base_tar, _, store = layers
    layer = json.loads(run(store, "--json", "import", str(base_tar)).stdout)[0]["id"]
    run(store, "tag", "img", layer)
    (tmp_path / "taken").mkdir()
    for args in (
        ("materialize", "img", str(tmp_path / "taken")),
        ("materialize", "no-such-tag", str(tmp_path / "new")),
        ("apply", layer, str(tmp_path / "missing")),
    ):
        proc = run(store, *args, expect=1)
        lines = proc.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith("layerstore: error: "), lines
    assert (
        "exists"
        in run(store, "materialize", "img", str(tmp_path / "taken"), expect=1).stderr.decode()
    )
    assert not (tmp_path / "new").exists()
