"""``layerstore://TAG/path`` through fsspec (found by its entry point, not imported here) and
pandas, checked against the materialized image read through fsspec's local filesystem; and
``Stack.path()`` as an ``importlib.resources.abc.Traversable``."""

from __future__ import annotations

import importlib.resources
import io
import os
import tarfile
from importlib.resources.abc import Traversable
from pathlib import Path

import fsspec
import layerstore as ls
import pandas as pd
import pytest

CSV = b"name,size\nbase,1\nupper,2\n"


def tar_of(members: list[tarfile.TarInfo], data: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            m.mtime = 1_700_000_000
            payload = data.get(m.name)
            if payload is not None:
                m.size = len(payload)
            tar.addfile(m, io.BytesIO(payload) if payload is not None else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info


@pytest.fixture
def store(tmp_path: Path) -> ls.Store:
    """app:1: two layers, a whiteout, a CSV, a symlink to a file and one to a directory."""
    s = ls.Store(tmp_path / "store")
    base = tar_of(
        [
            member("etc", tarfile.DIRTYPE),
            member("etc/os-release"),
            member("etc/gone"),
            member("data", tarfile.DIRTYPE),
            member("data/sizes.csv"),
            member("usr", tarfile.DIRTYPE),
            member("usr/bin", tarfile.DIRTYPE),
            member("usr/bin/X11", tarfile.SYMTYPE, "."),
        ],
        {"etc/os-release": b"ID=base\n", "etc/gone": b"x", "data/sizes.csv": CSV},
    )
    upper = tar_of(
        [
            member("etc", tarfile.DIRTYPE),
            member("etc/.wh.gone"),
            member("etc/os-release"),
            member("os-release", tarfile.SYMTYPE, "etc/os-release"),
        ],
        {"etc/os-release": b"ID=upper\n", "etc/.wh.gone": b""},
    )
    s.tag(s.stack([s.import_tar(base), s.import_tar(upper)]), "app:1")
    return s


def test_fsspec_open_and_pandas_read_from_an_image(store: ls.Store) -> None:
    with fsspec.open("layerstore://app:1/etc/os-release", "rt", store=store.path) as f:
        assert f.read() == "ID=upper\n"
    frame = pd.read_csv("layerstore://app:1/data/sizes.csv", storage_options={"store": store.path})
    assert frame.to_dict("list") == {"name": ["base", "upper"], "size": [1, 2]}


def test_fsspec_listing_matches_the_materialized_image(store: ls.Store, tmp_path: Path) -> None:
    fs = fsspec.filesystem("layerstore", store=store)
    root = tmp_path / "rootfs"
    store.materialize(store.get("app:1"), root)
    local = fsspec.filesystem("file")

    def relative(paths: list[str], prefix: str) -> set[str]:
        return {p[len(prefix) :].lstrip("/") for p in paths}

    assert fs.ls("", detail=False) == ["app:1"]
    found = relative(fs.find("app:1"), "app:1")
    assert found == relative(local.find(str(root)), str(root))
    assert found == {"etc/os-release", "data/sizes.csv", "os-release", "usr/bin/X11"}
    assert relative(fs.glob("app:1/*/*.csv"), "app:1") == {"data/sizes.csv"}
    walked = {d[len("app:1") :] or "/": sorted(files) for d, _, files in fs.walk("app:1")}
    assert walked["/etc"] == ["os-release"] and walked["/usr/bin"] == ["X11"]
    info = fs.info("layerstore://app:1/etc/os-release")
    assert (info["type"], info["size"], info["islink"]) == ("file", 9, False)
    link = fs.info("app:1/os-release")
    assert (link["type"], link["islink"], link["destination"]) == ("file", True, "etc/os-release")
    assert fs.info("app:1/usr/bin/X11")["type"] == "other"
    assert fs.cat("app:1/os-release") == b"ID=upper\n"
    assert fs.cat_file("app:1/etc/os-release", start=3, end=-1) == b"upper"
    with pytest.raises(FileNotFoundError):
        fs.info("app:1/etc/gone")
    with pytest.raises(FileNotFoundError):
        fs.ls("no-such-image/etc")
    with pytest.raises(ValueError, match="read-only"):
        fs.open("app:1/etc/new", "wb")


def test_stack_path_is_a_traversable(store: ls.Store) -> None:
    etc = store.get("app:1").path("/etc")
    assert isinstance(etc, Traversable)
    release = etc.joinpath("os-release")
    with release.open() as text:
        assert text.read() == "ID=upper\n"
    with release.open("rb") as binary:
        assert binary.read() == b"ID=upper\n"
    with importlib.resources.as_file(release) as on_disk:
        assert os.path.isfile(on_disk) and Path(on_disk).read_bytes() == b"ID=upper\n"
    assert [p.name for p in etc.iterdir()] == ["os-release"]
