"""Reading a 127-layer stack: lookups against a kernel overlay mount of the same layers, the cost of
depth, reopening a tagged image in a fresh process, pushing a layer, memory per visible entry.

The stack is the Debian rootfs (``rootfs-v1.tar``) plus 126 small changesets generated from a seeded
RNG (new package trees, rewritten files, whiteouts of files and of whole directories, opaque
directories, symlinks; about 25k entries in all). Both sides see the same 127 layers: the store
imports the tars, and each tar is also extracted into a lower directory of an overlay mount (OCI
whiteouts made 0:0 character devices, opaque markers ``trusted.overlay.opaque=y``), whose view is
checked to equal the stack's before anything is timed.

- (a) ``test_stat_vs_lstat_overlay``: ``stack.stat(p, follow_symlinks=False).size`` for every
  visible path vs ``os.lstat`` of the same paths on the mount; target >= 6x.
- (b) ``test_stat_many_vs_c_fstatat``: ``stack.stat_many(paths)`` vs a C loop of
  ``fstatat(AT_SYMLINK_NOFOLLOW)`` on the mount (benches/fstatat_bench.c, built with gcc); >= 4x.
- (c) ``test_lookup_cost_vs_depth``: the same lookups on the 127-layer and on a 2-layer stack;
  cost per lookup grows <= 1.5x.
- (d) ``test_reopen_tagged_in_fresh_process``: ``Store()`` + ``get(tag)`` + the first ``stat``
  in a new process; <= 0.1 s.
- (e) ``test_push_on_cached_parent``: ``parent.push(layer)`` of a 60-entry layer on a built
  126-layer stack; <= 1 ms.
- (f) ``test_memory_per_visible_entry``: RSS growth of a child process that opens the tagged
  stack and looks every path up, per visible entry (reported).

Each timed round of the lookup benchmarks uses a fresh ``Stack`` (made in the untimed setup) and
reads every result's ``.size``. Timings are never asserted; correctness is.

Building the lower directories and mounting need root; the built fixture is cached under
``$LAYERSTORE_FIXTURES/stack127-v1`` (about 0.5 GB with the extracted rootfs).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import random
import shutil
import stat
import statistics
import subprocess
import sys
import tarfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from benches import fixtures as fx
from benches.measure import MIB, report, time_rounds, timed_pedantic

pytestmark = pytest.mark.benchmark(group="stack")

CHANGESETS = 126
SEED = 20_240_603
PUSH_LAYERS = 24  # distinct 60-entry layers for the push benchmark (one per round)
PUSH_ENTRIES = 60
ROUNDS = 5
C_ROUNDS = 10
TAG = "bench/stack127:latest"
CACHE_NAME = "stack127-v1"  # bump the suffix when the generator changes
MTIME = 1_700_000_000

# --------------------------------------------------------------------------------------------
# The 126 changesets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DirMeta:
    mode: int
    uid: int
    gid: int
    mtime: int


def _norm(name: str) -> str:
    return posixpath.normpath("/" + name).lstrip("/")


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


class Changesets:
    """Generates the changesets against a running model of the view's files and directories."""

    def __init__(self, base_tar: Path) -> None:
        self.dirs: dict[str, DirMeta] = {}
        self.files: dict[str, None] = {}  # live regular files (an ordered set)
        linked: set[str] = set()
        with tarfile.open(base_tar) as t:
            for m in t:
                name = _norm(m.name)
                if not name:
                    continue
                if m.isdir():
                    self.dirs[name] = DirMeta(m.mode, m.uid, m.gid, int(m.mtime))
                elif m.isreg():
                    self.files[name] = None
                elif m.islnk():
                    linked.update((name, _norm(m.linkname)))
        for name in linked:  # leave hardlink groups alone: the overlay peer has no link groups
            self.files.pop(name, None)
        self.apps: list[str] = []

    def make(self, index: int, entries: int = 150) -> tuple[bytes, int]:
        """Changeset ``index`` (1-based) as tar bytes, and its entry count.

        Nothing the kernel reads differently from the OCI spec: no path is both an entry and a
        whiteout of one layer, markers only where their directory exists below, no root opaque.
        """
        rng = random.Random(SEED * 1000 + index)
        members: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}

        def add(ti: tarfile.TarInfo, data: bytes | None = None) -> None:
            for a in _ancestors(ti.name):  # parents declared, with the metadata they have below
                if a not in members:
                    meta = self.dirs.setdefault(a, DirMeta(0o755, 0, 0, MTIME))
                    members[a] = (_dir(a, meta), None)
            members[ti.name] = (ti, data)

        def hide(prefix: str) -> None:
            for f in [f for f in self.files if f.startswith(prefix + "/")]:
                del self.files[f]

        # Directory-level changes first, so the files chosen below are outside them.
        recreated = None
        if index % 9 == 0 and self.apps:  # an earlier package directory, recreated opaque
            recreated = rng.choice(self.apps)
            hide(recreated)
        if index % 13 == 0 and len(self.apps) > 1:  # an earlier package directory, deleted
            gone = self.apps.pop(rng.randrange(len(self.apps) - 1))
            if gone != recreated:
                hide(gone)
                parent, _, base = gone.rpartition("/")
                add(_file(f"{parent}/.wh.{base}", b""))
        # rewritten files and whiteouts of files, chosen from the view below
        touched = rng.sample(sorted(self.files), 25 + 8)
        for name in touched[:25]:
            data = rng.randbytes(rng.randrange(16, 4096))
            add(_file(name, data), data)
        for name in touched[25:]:
            parent, _, base = name.rpartition("/")
            add(_file(f"{parent}/.wh.{base}" if parent else f".wh.{base}", b""))
            del self.files[name]
        if recreated is not None:
            add(_dir(recreated, self.dirs[recreated]))
            add(_file(f"{recreated}/.wh..wh..opq", b""))
            for k in range(10):
                data = rng.randbytes(rng.randrange(16, 2048))
                add(_file(f"{recreated}/again{index}-{k}", data), data)
                self.files[f"{recreated}/again{index}-{k}"] = None
        # a new package tree fills the rest
        app = f"opt/app{index:03d}" if index % 2 else f"usr/lib/app{index:03d}"
        self.apps.append(app)
        subdirs = [app] + [f"{app}/{d}" for d in ("bin", "lib", "share", "share/doc", "etc")]
        for d in subdirs:
            self.dirs[d] = DirMeta(0o755, 0, 0, MTIME)
            add(_dir(d, self.dirs[d]))
        k = 0
        while len(members) < entries:
            d = rng.choice(subdirs)
            if k % 12 == 11:
                ti = tarfile.TarInfo(f"{d}/link{k}")
                ti.type, ti.mode, ti.mtime = tarfile.SYMTYPE, 0o777, MTIME
                ti.linkname = rng.choice(["../lib", "/etc/hostname", f"file{k - 1}", "missing"])
                add(ti)
            else:
                data = rng.randbytes(rng.randrange(0, 4096))
                add(_file(f"{d}/file{k}", data, rng.choice([0o644, 0o755])), data)
                self.files[f"{d}/file{k}"] = None
            k += 1
        return _tar(members.values()), len(members)


def _file(name: str, data: bytes, mode: int = 0o644) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = len(data), mode, MTIME
    return ti


def _dir(name: str, meta: DirMeta) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.DIRTYPE
    ti.mode, ti.uid, ti.gid, ti.mtime = meta.mode, meta.uid, meta.gid, meta.mtime
    return ti


def _tar(members: Any) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for ti, data in members:
            t.addfile(ti, io.BytesIO(data) if data else None)
    return buf.getvalue()


def push_layer(index: int) -> bytes:
    """A 60-entry layer of new files in a new directory (for the push benchmark)."""
    rng = random.Random(SEED + 7 * index)
    root = f"srv/pushed{index:03d}"
    members = []
    for name in (
        "srv",
        root,
        *(f"{root}/d{j}" for j in range(4)),
    ):
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, MTIME
        members.append((ti, None))
    while len(members) < PUSH_ENTRIES:
        j = len(members)
        data = rng.randbytes(rng.randrange(1, 1024))
        ti = tarfile.TarInfo(f"{root}/d{j % 4}/f{j}")
        ti.size, ti.mode, ti.mtime = len(data), 0o644, MTIME
        members.append((ti, data))
    return _tar(members)


# --------------------------------------------------------------------------------------------
# The cached fixture: changeset tars, overlay lower directories
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stack127:
    root: Path

    @property
    def tars(self) -> list[Path]:
        return [self.root / "changes" / f"{i:03d}.tar" for i in range(1, CHANGESETS + 1)]

    @property
    def push_tars(self) -> list[Path]:
        return [self.root / "push" / f"{i:03d}.tar" for i in range(PUSH_LAYERS)]

    @property
    def lower(self) -> Path:
        return self.root / "lower"


def _extract_changeset(tar: Path, dest: Path) -> None:
    """Extract a changeset as overlayfs expects a lower layer: whiteouts as 0:0 character
    devices, opaque markers as ``trusted.overlay.opaque=y`` on their directory."""
    dest.mkdir()
    with tarfile.open(tar) as t:
        members = t.getmembers()
        plain = [m for m in members if not posixpath.basename(m.name).startswith(".wh.")]
        markers = [m for m in members if posixpath.basename(m.name).startswith(".wh.")]
        t.extractall(dest, members=plain, numeric_owner=True, filter="fully_trusted")
    for m in markers:
        parent, _, base = _norm(m.name).rpartition("/")
        where = dest / parent
        where.mkdir(parents=True, exist_ok=True)
        if base == ".wh..wh..opq":
            os.setxattr(where, "trusted.overlay.opaque", b"y")
        else:
            os.mknod(where / base.removeprefix(".wh."), stat.S_IFCHR | 0o600, os.makedev(0, 0))


def build_stack127(artefacts: fx.Fixtures) -> Stack127:
    base_tar = fx.build_rootfs_v1_tar(artefacts)
    final = artefacts.root / CACHE_NAME
    if (final / "complete").is_file():
        return Stack127(final)
    with fx._locked(artefacts.root):
        if (final / "complete").is_file():
            return Stack127(final)
        if os.geteuid() != 0:
            raise fx.FixtureUnavailable("building the overlay lower directories needs root")
        fx._require_tool("tar", CACHE_NAME)
        if final.exists():
            shutil.rmtree(final)
        partial = fx._partial(final)
        print(f"[fixtures] building {final} (126 changesets, 127 lower directories)")
        (partial / "changes").mkdir(parents=True)
        (partial / "push").mkdir()
        (partial / "lower").mkdir()
        gen = Changesets(base_tar)
        for i in range(1, CHANGESETS + 1):
            data, _ = gen.make(i)
            (partial / "changes" / f"{i:03d}.tar").write_bytes(data)
        for i in range(PUSH_LAYERS):
            (partial / "push" / f"{i:03d}.tar").write_bytes(push_layer(i))
        (partial / "lower" / "0").mkdir()
        subprocess.run(
            ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", str(base_tar)],
            cwd=partial / "lower" / "0",
            check=True,
        )
        for i in range(1, CHANGESETS + 1):
            _extract_changeset(partial / "changes" / f"{i:03d}.tar", partial / "lower" / str(i))
        (partial / "complete").write_text("ok\n")
        partial.rename(final)
    return Stack127(final)


# --------------------------------------------------------------------------------------------
# Session state: the store, the overlay mount, the path lists
# --------------------------------------------------------------------------------------------


@dataclass
class Bench:
    store: Any
    store_path: Path
    layers: list[Any]
    push_layers: list[Any]
    paths: list[str]  # every visible path of the 127-layer stack, shuffled
    entries: int  # entries of the 127 layers (markers included)
    fixture: Stack127


@pytest.fixture(scope="module")
def stack127(artefacts: fx.Fixtures) -> Stack127:
    try:
        return build_stack127(artefacts)
    except fx.FixtureUnavailable as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def bench(
    ls: ModuleType,
    stack127: Stack127,
    rootfs_v1_tar: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Bench]:
    path = tmp_path_factory.mktemp("stack127") / "store"
    store = ls.Store(path)
    layers = [store.import_tar(rootfs_v1_tar)]
    layers += [store.import_tar(tar) for tar in stack127.tars]
    push_layers = [store.import_tar(tar) for tar in stack127.push_tars]
    stack = store.stack(layers)
    store.tag(stack, TAG)
    paths = visible_paths(stack)
    random.Random(SEED).shuffle(paths)
    entries = sum(layer.entry_count for layer in layers)
    yield Bench(store, path, layers, push_layers, paths, entries, stack127)
    del store, layers, push_layers, stack
    shutil.rmtree(path, ignore_errors=True)


def visible_paths(stack: Any) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in stack.walk():
        out += [posixpath.join(dirpath, name) for name in [*dirnames, *filenames]]
    return out


@pytest.fixture(scope="module")
def overlay(bench: Bench, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting overlayfs needs root")
    mnt = tmp_path_factory.mktemp("overlay") / "merged"
    mnt.mkdir()
    # Relative lower directories (resolved against the cwd), topmost first: the option string
    # stays far below the kernel's one-page limit.
    lowers = ":".join(str(i) for i in reversed(range(CHANGESETS + 1)))
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lowers}", str(mnt)],
        cwd=bench.fixture.lower,
        check=True,
    )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.fixture(scope="module")
def same_view(bench: Bench, overlay: Path) -> Path:
    """Check, once, that the overlay mount shows the stack's view (paths, kinds, file sizes)."""
    stack = bench.store.get(TAG)
    kernel: dict[str, tuple[str, int]] = {}
    kinds = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink"}
    kinds |= {stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo"}
    for dirpath, dirnames, filenames in os.walk(overlay):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            kind = kinds[stat.S_IFMT(st.st_mode)]
            kernel["/" + os.path.relpath(full, overlay)] = (
                kind,
                st.st_size if kind == "file" else 0,
            )
    ours = {}
    found = stack.stat_many(bench.paths, follow_symlinks=False)
    for path, st in zip(bench.paths, found, strict=True):
        ours[path] = (st.kind, st.size if st.kind == "file" else 0)
    missing = sorted(set(kernel) - set(ours))[:10]
    extra = sorted(set(ours) - set(kernel))[:10]
    differ = sorted(p for p in set(ours) & set(kernel) if ours[p] != kernel[p])[:10]
    assert not (missing or extra or differ), (missing, extra, differ)
    return overlay


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lookups:
    """Lookup rates of ours and a peer over the same paths, from their median round times."""

    name: str
    peer: str
    lookups: int
    ours_s: list[float]
    peer_s: list[float]
    target: float

    @property
    def ours_rate(self) -> float:
        return self.lookups / statistics.median(self.ours_s)

    @property
    def peer_rate(self) -> float:
        return self.lookups / statistics.median(self.peer_s)

    @property
    def ratio(self) -> float:
        return statistics.median(self.peer_s) / statistics.median(self.ours_s)

    def publish(self, benchmark: Any, **extra: Any) -> None:
        benchmark.extra_info.update(
            {
                "lookups": self.lookups,
                "peer": self.peer,
                "ours_seconds": self.ours_s,
                "peer_seconds": self.peer_s,
                "ours_lookups_per_s": round(self.ours_rate),
                "peer_lookups_per_s": round(self.peer_rate),
                "ratio": round(self.ratio, 2),
                "target_ratio": self.target,
                **extra,
            }
        )
        verdict = "meets" if self.ratio >= self.target else "MISSES"
        report(
            f"{self.name}: ours {self.ours_rate / 1e3:.0f}k lookups/s, {self.peer}"
            f" {self.peer_rate / 1e3:.0f}k/s, ratio {self.ratio:.2f}x ({verdict} target"
            f" >= {self.target:g}x; {self.lookups} paths, median of {len(self.ours_s)})"
        )


def fresh_stack(bench: Bench, layers: list[Any] | None = None) -> Any:
    return bench.store.stack(bench.layers if layers is None else layers)


# --------------------------------------------------------------------------------------------
# (a) stat from Python vs os.lstat through the overlay mount
# --------------------------------------------------------------------------------------------


def timed_on_fresh_stacks(benchmark: Any, bench: Bench, ours: Any) -> tuple[list[float], Any]:
    """Time `ours(stack)` over ROUNDS rounds (one warm-up), each on a fresh Stack object."""
    return timed_pedantic(
        benchmark,
        ours,
        setup=lambda: ((fresh_stack(bench),), {}),
        rounds=ROUNDS,
        warmup_rounds=1,
    )


def test_stat_vs_lstat_overlay(benchmark: Any, bench: Bench, same_view: Path) -> None:
    paths = bench.paths
    mounted = [str(same_view) + p for p in paths]

    def ours(stack: Any) -> int:
        total = 0
        for p in paths:
            total += stack.stat(p, follow_symlinks=False).size
        return total

    def peer() -> int:
        total = 0
        for p in mounted:
            total += os.lstat(p).st_size
        return total

    ours_s, total = timed_on_fresh_stacks(benchmark, bench, ours)
    peer_s = time_rounds(peer, rounds=len(ours_s), warmup_rounds=1)
    assert total > 0
    Lookups(
        f"stack.stat, {len(bench.layers)}-layer stack ({bench.entries} entries)",
        "os.lstat via overlayfs",
        len(paths),
        ours_s,
        peer_s,
        target=6,
    ).publish(benchmark, layers=len(bench.layers), entries=bench.entries)


# --------------------------------------------------------------------------------------------
# (b) stat_many vs C fstatat through the overlay mount
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fstatat_bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    out = tmp_path_factory.mktemp("cbench") / "fstatat_bench"
    source = Path(__file__).with_name("fstatat_bench.c")
    subprocess.run([gcc, "-O2", "-Wall", "-o", str(out), str(source)], check=True)
    return out


def test_stat_many_vs_c_fstatat(
    benchmark: Any, bench: Bench, same_view: Path, fstatat_bench: Path, scratch: Path
) -> None:
    paths = bench.paths

    def ours(stack: Any) -> int:
        return sum(st.size for st in stack.stat_many(paths, follow_symlinks=False))

    ours_s, total = timed_on_fresh_stacks(benchmark, bench, ours)
    listing = scratch / "paths.bin"
    listing.write_bytes(b"".join(os.fsencode(p.lstrip("/")) + b"\0" for p in paths))
    done = subprocess.run(
        [str(fstatat_bench), str(same_view), str(listing), str(C_ROUNDS)],
        check=True,
        capture_output=True,
        text=True,
    )
    rows = [line.split() for line in done.stdout.splitlines()]
    assert all(int(r[1]) == len(paths) and int(r[3]) == 0 for r in rows), rows
    # the same paths, the same sizes: files' sizes agree, and the rest is small change
    peer_s = [float(r[0]) for r in rows]
    assert total > 0
    Lookups(
        f"stack.stat_many, {len(bench.layers)}-layer stack",
        "C fstatat via overlayfs",
        len(paths),
        ours_s,
        peer_s,
        target=4,
    ).publish(benchmark, c_rounds=C_ROUNDS)


def test_rust_lookup_alone(benchmark: Any, bench: Bench, scratch: Path) -> None:
    """The union index's own lookup rate, without Python: the `lookup_bench` example of the core
    crate (what `stat(p, follow_symlinks=False)` does per path) on the tagged 127-layer stack.
    Target: at least 10M lookups/s.

    The process is pinned to one core, as microbenchmarks are: each core has its own L2 cache,
    and a migration in mid-run leaves the index behind in the other one (unpinned, the rate here
    swings between about 4M and 15M/s from run to run)."""
    cargo = shutil.which("cargo")
    if cargo is None:
        pytest.skip("cargo is not installed")
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [
            cargo,
            "build",
            "--quiet",
            "--release",
            "--locked",
            "-p",
            "layerstore-core",
            "--example",
            "lookup_bench",
        ],
        cwd=root,
        check=True,
    )
    exe = root / "target" / "release" / "examples" / "lookup_bench"
    listing = scratch / "paths.txt"
    listing.write_text("\n".join(bench.paths) + "\n", errors="surrogateescape")
    rounds = 200
    core = min(os.sched_getaffinity(0))

    def run() -> dict[str, float]:
        done = subprocess.run(
            [str(exe), str(bench.store_path), TAG, str(listing), str(rounds)],
            check=True,
            capture_output=True,
            text=True,
            preexec_fn=lambda: os.sched_setaffinity(0, {core}),
        )
        result: dict[str, float] = json.loads(done.stdout)
        return result

    result = benchmark.pedantic(run, rounds=3, iterations=1)
    assert result["lookups"] == rounds * len(bench.paths)
    rate = result["lookups_per_s"]
    benchmark.extra_info.update(lookups_per_s=rate, target=10_000_000)
    report(
        f"Rust lookup alone ({len(bench.layers)}-layer stack): {rate / 1e6:.1f}M lookups/s "
        f"(target >= 10M/s: {'met' if rate >= 10_000_000 else 'missed'})"
    )


# --------------------------------------------------------------------------------------------
# (c) cost per lookup: 2 layers vs 127 layers
# --------------------------------------------------------------------------------------------


def test_lookup_cost_vs_depth(benchmark: Any, bench: Bench) -> None:
    shallow_layers = bench.layers[:2]
    shallow = bench.store.stack(shallow_layers)
    deep = fresh_stack(bench)
    # paths visible in both stacks, so both sides do the same lookups
    found = shallow.stat_many(bench.paths, follow_symlinks=False)
    both = [p for p, st in zip(bench.paths, found, strict=True) if st is not None]
    assert all(deep.stat_many(both, follow_symlinks=False))
    del shallow, deep

    def lookups(stack: Any) -> int:
        return sum(st.size for st in stack.stat_many(both, follow_symlinks=False))

    def per_call(stack: Any) -> int:
        return sum(stack.stat(p, follow_symlinks=False).size for p in both)

    def clocked(target: Any, stack: Any) -> float:
        start = time.perf_counter()
        target(stack)
        return time.perf_counter() - start

    # The other three measurements run in each round's setup, so all four interleave and share
    # whatever load the machine has at the time.
    shallow_s: list[float] = []
    shallow_call: list[float] = []
    deep_call: list[float] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        shallow_s.append(clocked(lookups, bench.store.stack(shallow_layers)))
        shallow_call.append(clocked(per_call, bench.store.stack(shallow_layers)))
        deep_call.append(clocked(per_call, fresh_stack(bench)))
        return (fresh_stack(bench),), {}

    deep_s, _ = timed_pedantic(benchmark, lookups, setup=setup, rounds=15, warmup_rounds=1)
    n = len(deep_s)
    shallow_s, shallow_call, deep_call = shallow_s[-n:], shallow_call[-n:], deep_call[-n:]
    growth = statistics.median(deep_s) / statistics.median(shallow_s)
    growth_call = statistics.median(deep_call) / statistics.median(shallow_call)
    per = 1e9 / len(both)
    benchmark.extra_info.update(
        {
            "lookups": len(both),
            "deep_layers": len(bench.layers),
            "deep_seconds": deep_s,
            "shallow_seconds": shallow_s,
            "growth": round(growth, 3),
            "growth_stat_per_call": round(growth_call, 3),
            "target_growth": 1.5,
        }
    )
    verdict = "meets" if growth <= 1.5 else "MISSES"
    report(
        f"lookup cost 127 vs 2 layers (stat_many, {len(both)} paths): "
        f"{statistics.median(deep_s) * per:.0f} ns vs {statistics.median(shallow_s) * per:.0f} ns"
        f" per lookup, growth {growth:.2f}x ({verdict} target <= 1.5x); per-call stat"
        f" {statistics.median(deep_call) * per:.0f} vs {statistics.median(shallow_call) * per:.0f}"
        f" ns, growth {growth_call:.2f}x"
    )


# --------------------------------------------------------------------------------------------
# (d) a fresh process opens the tagged stack and answers its first stat
# --------------------------------------------------------------------------------------------

REOPEN_CHILD = textwrap.dedent(
    """
    import json, sys, time
    t0 = time.perf_counter()
    import layerstore as ls
    t1 = time.perf_counter()
    store = ls.Store(sys.argv[1])
    stack = store.get(sys.argv[2])
    size = stack.stat(sys.argv[3]).size
    t2 = time.perf_counter()
    print(json.dumps({"import": t1 - t0, "open_stat": t2 - t1, "size": size,
                      "layers": len(stack)}))
    """
)


def test_reopen_tagged_in_fresh_process(benchmark: Any, bench: Bench) -> None:
    stack = bench.store.get(TAG)
    # a file the top layer provides, and its size as this process sees it
    probe = next(
        p
        for p in bench.paths
        if stack.stat(p, follow_symlinks=False).layer == len(bench.layers) - 1
        and stack.stat(p, follow_symlinks=False).kind == "file"
    )
    want = stack.stat(probe).size
    del stack
    children: list[dict[str, Any]] = []

    def child() -> None:
        done = subprocess.run(
            [sys.executable, "-c", REOPEN_CHILD, str(bench.store_path), TAG, probe],
            check=True,
            capture_output=True,
            text=True,
        )
        children.append(json.loads(done.stdout.strip().splitlines()[-1]))

    wall, _ = timed_pedantic(benchmark, child, rounds=ROUNDS, warmup_rounds=1)
    children = children[-len(wall) :]
    assert all(c["size"] == want and c["layers"] == len(bench.layers) for c in children)
    open_stat = statistics.median(c["open_stat"] for c in children)
    imported = statistics.median(c["import"] for c in children)
    benchmark.extra_info.update(
        {
            "open_get_first_stat_seconds": [c["open_stat"] for c in children],
            "import_seconds": [c["import"] for c in children],
            "process_wall_seconds": wall,
            "target_seconds": 0.1,
        }
    )
    verdict = "meets" if open_stat <= 0.1 else "MISSES"
    report(
        f"fresh process: Store() + get(tag) + first stat of the {len(bench.layers)}-layer stack"
        f" {open_stat * 1e3:.1f} ms ({verdict} target <= 100 ms); import layerstore"
        f" {imported * 1e3:.0f} ms, whole process {statistics.median(wall) * 1e3:.0f} ms"
    )


# --------------------------------------------------------------------------------------------
# (e) pushing a 60-entry layer on a cached parent
# --------------------------------------------------------------------------------------------


def test_push_on_cached_parent(benchmark: Any, bench: Bench) -> None:
    parent = bench.store.stack(bench.layers[:-1])
    assert parent.stat("/etc/hostname").size > 0  # built and warm
    layers = iter(bench.push_layers)
    rounds = min(10, len(bench.push_layers) // 2 - 1)
    assert all(layer.entry_count == PUSH_ENTRIES for layer in bench.push_layers)
    pushed_s, pushed = timed_pedantic(
        benchmark,
        parent.push,
        setup=lambda: ((next(layers),), {}),
        rounds=rounds,
        warmup_rounds=1,
    )
    assert len(pushed) == len(bench.layers)
    # push and answer a lookup in the new layer, on layers not pushed yet
    holder: list[Any] = []

    def push_and_stat() -> None:
        layer = next(layers)
        holder.append(parent.push(layer).stat(f"/srv/pushed{bench.push_layers.index(layer):03d}"))

    with_stat = time_rounds(push_and_stat, rounds=rounds)
    assert all(st.kind == "dir" for st in holder)
    median = statistics.median(pushed_s)
    benchmark.extra_info.update(
        {
            "push_seconds": pushed_s,
            "push_and_stat_seconds": with_stat,
            "parent_layers": len(bench.layers) - 1,
            "entries": PUSH_ENTRIES,
            "target_seconds": 0.001,
        }
    )
    verdict = "meets" if median <= 0.001 else "MISSES"
    report(
        f"push a {PUSH_ENTRIES}-entry layer on a cached {len(bench.layers) - 1}-layer stack:"
        f" {median * 1e3:.3f} ms ({verdict} target <= 1 ms); with a first stat"
        f" {statistics.median(with_stat) * 1e3:.3f} ms"
    )


# --------------------------------------------------------------------------------------------
# (f) memory per visible entry
# --------------------------------------------------------------------------------------------

MEMORY_CHILD = textwrap.dedent(
    """
    import gc, json, sys
    import layerstore as ls

    def rss():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    with open(sys.argv[3], "rb") as f:
        paths = [p.decode("utf-8", "surrogateescape") for p in f.read().split(b"\\0") if p]
    store = ls.Store(sys.argv[1])
    gc.collect()
    before, nodes_before = rss(), ls.Stack.index_nodes()
    stack = store.get(sys.argv[2])
    found = sum(stack.exists(p, follow_symlinks=False) for p in paths)
    gc.collect()
    after = rss()
    print(json.dumps({"before": before, "after": after, "found": found,
                      "nodes": ls.Stack.index_nodes() - nodes_before}))
    """
)


def test_memory_per_visible_entry(benchmark: Any, bench: Bench, scratch: Path) -> None:
    listing = scratch / "paths.bin"
    listing.write_bytes(b"".join(os.fsencode(p) + b"\0" for p in bench.paths))
    results: list[dict[str, Any]] = []

    def child() -> None:
        done = subprocess.run(
            [sys.executable, "-c", MEMORY_CHILD, str(bench.store_path), TAG, str(listing)],
            check=True,
            capture_output=True,
            text=True,
        )
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))

    timed_pedantic(benchmark, child, rounds=1)
    res = results[-1]
    assert res["found"] == len(bench.paths)
    grown = res["after"] - res["before"]
    per_entry = grown / len(bench.paths)
    benchmark.extra_info.update(
        {
            "visible_entries": len(bench.paths),
            "layer_entries": bench.entries,
            "rss_growth_bytes": grown,
            "bytes_per_visible_entry": round(per_entry),
            "index_dir_nodes": res["nodes"],
        }
    )
    report(
        f"memory of the {len(bench.layers)}-layer index in a fresh process:"
        f" {grown / MIB:.1f} MiB RSS for {len(bench.paths)} visible entries"
        f" ({bench.entries} in the layers), {per_entry:.0f} bytes per visible entry"
        f" ({grown / bench.entries:.0f} per layer entry),"
        f" {res['nodes']} directory nodes"
    )
