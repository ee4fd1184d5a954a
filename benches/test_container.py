"""Copy-on-write: change one byte of a 256 MiB file of an image.

Ours: open a container over the image, write one byte at an offset of the lower file, close it
(chunk-level copy-on-write: only the chunks around the byte are re-cut and hashed). The peer is
the kernel's overlayfs, which copies the whole file up to the upper directory on the first write
(a fresh upper directory per round). Both sides are checked to read the new byte back. Reported:
the time ratio and the bytes each side had to process (target: ours hashes at most about two
maximum chunks).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from benches.measure import MIB, report, time_rounds, timed_pedantic

pytestmark = pytest.mark.benchmark(group="container")

SIZE = 256 * MIB
OFFSET = 123_456_789
ROUNDS = 5


@pytest.fixture(scope="module")
def lower(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("cow") / "lower"
    root.mkdir()
    rng = random.Random(11)
    with open(root / "blob", "wb") as f:
        for _ in range(SIZE // (16 * MIB)):
            f.write(rng.randbytes(16 * MIB))
    yield root
    shutil.rmtree(root.parent, ignore_errors=True)


def overlay_write(lower: Path, work: Path) -> int:
    """Mount lower + an empty upper, write one byte through the mount, unmount; returns the
    size of the upper copy."""
    shutil.rmtree(work, ignore_errors=True)
    upper, wd, merged = work / "upper", work / "work", work / "merged"
    for d in (upper, wd, merged):
        d.mkdir(parents=True)
    opts = f"lowerdir={lower},upperdir={upper},workdir={wd}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)], check=True)
    try:
        with open(merged / "blob", "r+b") as f:
            f.seek(OFFSET)
            f.write(b"\x01")
    finally:
        subprocess.run(["umount", str(merged)], check=True)
    return os.path.getsize(upper / "blob")


def test_one_byte_copy_on_write_vs_overlayfs(
    benchmark: Any, ls: ModuleType, lower: Path, scratch: Path
) -> None:
    if os.geteuid() != 0:
        pytest.fail("the overlayfs peer needs root")
    store = ls.Store(scratch / "store")
    image = store.stack([store.import_dir(lower)])
    hashed: list[int] = []
    views: list[Any] = []

    def ours() -> None:
        with image.container() as c:
            with c.open("/blob", "r+b") as f:
                f.seek(OFFSET)
                f.write(b"\x01")
            hashed.append(c.hashed_bytes)
            views.append(c.view())

    ours_s, _ = timed_pedantic(benchmark, ours, rounds=ROUNDS)
    with views[-1].open("/blob") as f:  # checked outside the timed region: it reads a chunk
        f.seek(OFFSET)
        assert f.read(1) == b"\x01"
    copied = []
    peer_s = time_rounds(
        lambda: copied.append(overlay_write(lower, scratch / "ovl")), rounds=ROUNDS
    )
    assert copied[-1] == SIZE  # the kernel copied the whole file up
    max_chunk = store.settings["chunk_max"]
    assert max(hashed) <= 2 * max_chunk + 1
    o, p = sorted(ours_s)[ROUNDS // 2], sorted(peer_s)[ROUNDS // 2]
    benchmark.extra_info.update({"ours": ours_s, "overlayfs": peer_s, "hashed": max(hashed)})
    report(
        f"1-byte write to a 256 MiB lower file: ours {o * 1000:.1f} ms (hashed {max(hashed)} B),"
        f" overlayfs copy-up {p * 1000:.1f} ms (copied {copied[-1]} B), ratio {p / o:.1f}x"
    )
