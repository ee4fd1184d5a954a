"""Diff and squash on the Debian rootfs, beside their peers in the same run.

- (a) ``test_dir_to_stack_diff``: ``store.diff(image_v1, rootfs_v2_dir)`` (a stored layer, its
  diff_id inside the timed region) vs ``rsync -an --delete`` (a listing only) and a naive Python
  diff (``os.walk`` + ``lstat`` against the v1 tar's member list, a listing only); the
  compare-only ``store.changes`` vs rsync too. Targets: diff <= 2x rsync's time, compare-only no
  slower than rsync; and ``umoci repack`` of the same change (target: at least 10x).
- (b) ``test_stack_to_stack_diff``: ``store.changes(v1, v2)`` (the changeset itself) and
  ``store.diff(v1, v2)`` (stored, diff_id included) vs ``umoci repack`` of the same change
  (a layout with the v1 layer, unpacked, its rootfs made the v2 tree; targets 100x and 30x) and
  the naive Python diff of the two trees.
- (c) ``test_squash_10_layers``: ``store.squash`` of a 10-layer stack (rootfs-v1 + 9 changesets
  of the 127-layer fixture) into a tar file with its diff_id vs a naive ``tarfile`` squash that
  writes the same union and hashes it (target 5x) and umoci's flatten, ``umoci raw unpack`` of
  the image then ``umoci insert`` of the tree into a new image (target 20x); and
  ``store.squash_changes`` (the index squash alone, <= 50 ms).

Every result is checked (the squashed/diffed view equals the expected tree) before it is timed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tarfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from benches import fixtures as fx
from benches.measure import MB, report, time_rounds, timed_pedantic
from benches.peers import umoci, umoci_flatten, umoci_layout

pytestmark = pytest.mark.benchmark(group="diff-squash")

ROUNDS = 3
SQUASH_CHANGESETS = 9


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def verdict(name: str, ours: float, peer: float, peer_name: str, target: str, ok: bool) -> None:
    report(
        f"{name}: ours {ours * 1000:.0f} ms, {peer_name} {peer * 1000:.0f} ms,"
        f" ratio {peer / ours:.2f}x ({'meets' if ok else 'MISSES'} target {target})"
    )


@pytest.fixture(scope="module")
def images(
    ls: ModuleType,
    rootfs_v1_tar: Path,
    rootfs_v2_tar: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Any, Any, Any]]:
    path = tmp_path_factory.mktemp("diff") / "store"
    store = ls.Store(path)
    v1 = store.stack([store.import_tar(rootfs_v1_tar)])
    v2 = store.stack([store.import_tar(rootfs_v2_tar)])
    yield store, v1, v2
    del store, v1, v2
    shutil.rmtree(path, ignore_errors=True)


def rsync_listing(new: Path, old: Path) -> None:
    subprocess.run(
        ["rsync", "-an", "--delete", f"{new}/", f"{old}/"],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def tar_index(tar_path: Path) -> dict[str, tuple[int, int, int, int, int]]:
    with tarfile.open(tar_path) as tf:
        return {
            "/" + m.name.rstrip("/").removeprefix("./"): (m.mode, m.uid, m.gid, m.mtime, m.size)
            for m in tf
        }


def naive_dir_diff(old: dict[str, tuple[int, int, int, int, int]], root: Path) -> list[str]:
    """What a few lines of Python do: walk, lstat, compare with the old listing."""
    changed = []
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            p = "/" + os.path.relpath(full, root)
            seen.add(p)
            size = st.st_size if stat.S_ISREG(st.st_mode) else 0
            now = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, int(st.st_mtime), size)
            if old.get(p) != now:
                changed.append(p)
    changed += [p for p in old if p not in seen and p != "/"]
    return changed


@pytest.fixture(scope="module")
def umoci_bundle(
    rootfs_v1_tar: Path, rootfs_v2: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, Path]]:
    """A layout with the v1 layer, unpacked by umoci, its rootfs then made the v2 tree: what
    `umoci repack` diffs."""
    if shutil.which("umoci") is None or os.geteuid() != 0:
        pytest.fail("the umoci peer needs umoci (Debian package) and root")
    base = tmp_path_factory.mktemp("umoci")
    layout, bundle = base / "layout", base / "bundle"
    umoci_layout([rootfs_v1_tar], layout, "v1")
    umoci("unpack", "--image", f"{layout}:v1", bundle)
    subprocess.run(
        ["rsync", "-aHAX", "--delete", f"{rootfs_v2}/", f"{bundle}/rootfs/"],
        check=True,
    )
    yield layout, bundle
    shutil.rmtree(base, ignore_errors=True)


def test_dir_to_stack_diff(
    benchmark: Any,
    images: tuple[Any, Any, Any],
    rootfs_v1: Path,
    rootfs_v2: Path,
    umoci_bundle: tuple[Path, Path],
) -> None:
    if shutil.which("rsync") is None:
        pytest.fail("rsync is missing (Debian package rsync)")
    store, v1, _v2 = images
    # Correct first: v1 + diff shows the v2 tree, and compare-only lists what the diff stores.
    layer = store.diff(v1, rootfs_v2)
    assert store.changes(v1.push(layer), rootfs_v2) == []
    assert len(store.changes(v1, rootfs_v2)) == len(layer.entries())

    ours, _ = timed_pedantic(benchmark, lambda: store.diff(v1, rootfs_v2), rounds=ROUNDS)
    compare = time_rounds(lambda: store.changes(v1, rootfs_v2), rounds=ROUNDS, warmup_rounds=1)
    rsync = time_rounds(lambda: rsync_listing(rootfs_v2, rootfs_v1), rounds=ROUNDS, warmup_rounds=1)
    old = tar_index(fx.Fixtures(fx.fixtures_root()).rootfs_v1_tar)
    naive = time_rounds(lambda: naive_dir_diff(old, rootfs_v2), rounds=ROUNDS, warmup_rounds=1)
    layout, bundle = umoci_bundle
    tags = iter(range(ROUNDS))
    umoci_s = time_rounds(
        lambda: umoci("repack", "--image", f"{layout}:v2-{next(tags)}", bundle), rounds=ROUNDS
    )
    o, c, r, n, u = median(ours), median(compare), median(rsync), median(naive), median(umoci_s)
    benchmark.extra_info.update(
        {"ours": ours, "compare_only": compare, "rsync": rsync, "umoci": umoci_s}
    )
    verdict("dir->stack diff vs umoci repack", o, u, "umoci", ">= 10x", u / o >= 10)
    report(f"dir->stack diff: {len(layer.entries())} changes, layer {layer.size / MB:.1f} MB")
    verdict(
        "dir->stack diff (stored layer + diff_id)", o, r, "rsync -an", "<= 2x rsync", o <= 2 * r
    )
    verdict("dir->stack diff vs naive Python", o, n, "naive", "reported", True)
    verdict("dir->stack compare-only", c, r, "rsync -an", "<= rsync", c <= r)


def test_stack_to_stack_diff(
    benchmark: Any,
    images: tuple[Any, Any, Any],
    rootfs_v1_tar: Path,
    rootfs_v2: Path,
    umoci_bundle: tuple[Path, Path],
) -> None:
    store, v1, v2 = images
    layer = store.diff(v1, v2)
    assert store.changes(v1.push(layer), v2) == []
    ours, _ = timed_pedantic(benchmark, lambda: store.changes(v1, v2), rounds=ROUNDS)
    stored = time_rounds(lambda: store.diff(v1, v2), rounds=ROUNDS)
    old = tar_index(rootfs_v1_tar)
    naive = time_rounds(lambda: naive_dir_diff(old, rootfs_v2), rounds=ROUNDS, warmup_rounds=1)
    layout, bundle = umoci_bundle
    tags = iter(range(ROUNDS))
    umoci_s = time_rounds(
        lambda: umoci("repack", "--image", f"{layout}:s2s-{next(tags)}", bundle), rounds=ROUNDS
    )
    o, s, n, u = median(ours), median(stored), median(naive), median(umoci_s)
    benchmark.extra_info.update(
        {"changes": ours, "stored": stored, "naive": naive, "umoci": umoci_s}
    )
    verdict("stack<->stack changeset", o, n, "naive dir diff", "reported", True)
    verdict("stack<->stack changeset vs umoci repack", o, u, "umoci", ">= 100x", u / o >= 100)
    verdict("stack<->stack stored + diff_id vs umoci repack", s, u, "umoci", ">= 30x", u / s >= 30)


def naive_squash(tars: list[Path], out: Path) -> str:
    """A tarfile squash: layers top-down, whiteouts and opaque markers applied, first writer wins;
    returns the sha256 of the written tar."""
    seen: set[str] = set()
    hidden: list[str] = []  # paths (and their subtrees) hidden by upper layers
    opaque: list[str] = []  # directories whose lower children are hidden
    with (
        open(out, "wb") as raw,
        tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as w,
    ):
        for tar in reversed(tars):
            with tarfile.open(tar) as t:
                members = t.getmembers()
                here_hidden, here_opaque = [], []
                for m in members:
                    name = m.name.rstrip("/").removeprefix("./")
                    base = os.path.basename(name)
                    if base == ".wh..wh..opq":
                        here_opaque.append(os.path.dirname(name))
                    elif base.startswith(".wh."):
                        here_hidden.append(os.path.join(os.path.dirname(name), base[4:]))
                for m in members:
                    name = m.name.rstrip("/").removeprefix("./")
                    if os.path.basename(name).startswith(".wh.") or name in seen:
                        continue
                    if any(name == h or name.startswith(h + "/") for h in hidden):
                        continue
                    if any(name.startswith(d + "/") for d in opaque):
                        continue
                    seen.add(name)
                    w.addfile(m, t.extractfile(m) if m.isfile() else None)
                hidden += here_hidden
                opaque += here_opaque
    h = hashlib.sha256()
    with open(out, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def test_squash_10_layers(
    benchmark: Any, ls: ModuleType, rootfs_v1_tar: Path, scratch: Path
) -> None:
    changes = fx.fixtures_root() / "stack127-v1" / "changes"
    if not changes.is_dir():
        pytest.fail(f"{changes} is missing: run the stack benchmarks once to build it")
    tars = [rootfs_v1_tar, *sorted(changes.glob("*.tar"))[:SQUASH_CHANGESETS]]
    store = ls.Store(scratch / "store")
    with warnings.catch_warnings():  # the changesets name their root "/": sanitised, reported
        warnings.simplefilter("ignore", ls.LayerstoreWarning)
        image = store.stack([store.import_tar(t) for t in tars])
    total = sum(t.stat().st_size for t in tars)
    out = scratch / "flat.tar"
    flat = store.squash(image, dest=out)
    assert store.changes(store.stack([flat]), image) == []
    assert hashlib.sha256(out.read_bytes()).hexdigest() == flat.diff_id.removeprefix("sha256:")

    ours, _ = timed_pedantic(
        benchmark,
        lambda: store.squash(image, dest=out),
        setup=lambda: out.unlink(missing_ok=True),
        rounds=ROUNDS,
    )
    index_only = time_rounds(lambda: store.squash_changes(image), rounds=ROUNDS, warmup_rounds=1)
    peer_out = scratch / "naive.tar"
    naive = time_rounds(lambda: naive_squash(tars, peer_out), rounds=ROUNDS)
    if shutil.which("umoci") is None or os.geteuid() != 0:
        pytest.fail("the umoci peer needs umoci (Debian package) and root")
    layout, rootfs = scratch / "layout", scratch / "rootfs"
    umoci_layout(tars, layout, "ten")
    tags = iter(range(ROUNDS))
    umoci_s = time_rounds(
        lambda: umoci_flatten(layout, "ten", f"flat-{next(tags)}", rootfs),
        setup=lambda: shutil.rmtree(rootfs, ignore_errors=True),
        rounds=ROUNDS,
    )
    o, i, n, u = median(ours), median(index_only), median(naive), median(umoci_s)
    benchmark.extra_info.update(
        {"ours": ours, "index_only": index_only, "naive": naive, "umoci": umoci_s}
    )
    report(f"squash: {len(tars)} layers, {total / MB:.0f} MB of tar -> {flat.size / MB:.0f} MB")
    verdict("squash 10 layers to a tar file + diff_id", o, n, "naive tarfile", ">= 5x", n / o >= 5)
    verdict("squash vs umoci unpack + insert", o, u, "umoci", ">= 20x", u / o >= 20)
    report(f"squash of the index alone: {i * 1000:.1f} ms (target <= 50 ms)")
