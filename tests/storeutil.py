"""Helpers shared by the store tests: snapshots of a store's state, exports to bytes, oracles."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import resource
import sqlite3
import subprocess
import sys
from pathlib import Path

import layerstore as ls

# "(entry 3, byte offset 1536)": the position every InvalidLayerError about input must name.
POSITION = re.compile(r"entry \d+|byte offset \d+|offset \d+")


def b3sum(data: bytes) -> str:
    """BLAKE3 of ``data`` by the b3sum CLI (an implementation independent of the store's)."""
    res = subprocess.run(["b3sum", "--no-names"], input=data, capture_output=True, check=True)
    return "blake3:" + res.stdout.decode().split()[0]


def export_bytes(store: ls.Store, layer: ls.Layer | str, compression: str | None = None) -> bytes:
    buf = io.BytesIO()
    store.export_tar(layer, buf, compression=compression)
    return buf.getvalue()


def pack_files(store: ls.Store) -> set[str]:
    """The live pack files (gc moves replaced ones into packs/retired/ for a grace period)."""
    return {p.name for p in (Path(store.path) / "packs").iterdir() if p.is_file()}


def store_files(store: ls.Store) -> set[str]:
    """Every file under the store except the database (whose size legitimately changes)."""
    root = Path(store.path)
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith("meta.db")
    }


def db_packs(store: ls.Store) -> set[str]:
    """Pack names the metadata database knows (read-only peek, for crash checks)."""
    db = Path(store.path) / "meta.db"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
    try:
        return {row[0] for row in conn.execute("SELECT name FROM packs")}
    finally:
        conn.close()


@dataclasses.dataclass
class Snapshot:
    layers: list[str]
    chunks: int
    content_bytes: int
    stored_bytes: int
    logical_bytes: int
    files: set[str]


def snapshot(store: ls.Store) -> Snapshot:
    s = store.stats()
    return Snapshot(
        layers=sorted(layer.id for layer in store.layers()),
        chunks=s["chunks"],
        content_bytes=s["content_bytes"],
        stored_bytes=s["stored_bytes"],
        logical_bytes=s["logical_bytes"],
        files=store_files(store),
    )


def assert_unchanged(store: ls.Store, before: Snapshot) -> None:
    """The store is as it was: same layers and chunks, fsck clean, and after gc no file that
    was not there before (a failed import must leave nothing behind)."""
    after = snapshot(store)
    assert after.layers == before.layers
    assert after.chunks == before.chunks
    assert after.content_bytes == before.content_bytes
    assert after.logical_bytes == before.logical_bytes
    report = store.fsck()
    assert report["ok"], report["problems"]
    store.gc()
    leftovers = store_files(store) - before.files
    assert not leftovers, f"files left behind: {sorted(leftovers)}"
    assert sorted(layer.id for layer in store.layers()) == before.layers


def no_core_dumps() -> None:
    """preexec_fn for children that are expected to abort()."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def python_child(code: str, *args: str) -> subprocess.Popen[str]:
    """A Python child to watch line by line (stdout piped as text) and kill; no core dump."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        preexec_fn=no_core_dumps,
    )


def run_python(
    code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env.pop("LAYERSTORE_CRASH_AT", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=no_core_dumps,
        check=False,
    )


def start_time(pid: int) -> int:
    """A process's start time as /proc shows it (field 22 of its stat line)."""
    stat_line = Path(f"/proc/{pid}/stat").read_text()
    return int(stat_line.rsplit(")", 1)[1].split()[19])
