"""The union view against the kernel: random stacks, mounted with overlayfs, must read the same.

Each stack (2-6 layers, drawn by :class:`overlayutil.StackGen`) is written twice: as OCI tars
imported into the store, and as overlayfs lower directories (whiteouts as 0:0 character devices,
opaque directories with ``trusted.overlay.opaque=y``). The merged mount is the oracle for the
stack's view: the set of paths and, per path, kind, mode (incl. setuid/setgid/sticky), uid,
gid, mtime, size, content, symlink target, device numbers and ``user.*`` xattrs. Directory mtimes
are compared too: the mount has no upper directory, so nothing is ever copied up and the kernel
reports the topmost lower directory's mtime unchanged (checked: the generator's reference model
and the kernel agree on every stack before the store is asked anything).

Symlink resolution is compared with the kernel's ``openat2(RESOLVE_IN_ROOT)`` on the mount,
which applies the image-root rules (absolute targets relative to the root, ``..`` stopping at
it), so the generator may use absolute and root-escaping targets as well as relative ones.

The cases where the kernel differs from the OCI spec are not generated here (see
``test_union_spec.py``). Environment knobs: ``LAYERSTORE_UNION_STACKS`` (how many stacks, default
300), ``LAYERSTORE_UNION_SEED``, ``LAYERSTORE_UNION_ONLY`` (run only the stack with that number,
to debug a failure; the minimum feature counts are then not asserted).
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import posixpath
import random
import shutil
import subprocess
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import layerstore as ls
import overlayutil as ou
import pytest

pytestmark = pytest.mark.root

STACKS = int(os.environ.get("LAYERSTORE_UNION_STACKS", "300"))
SEED = os.environ.get("LAYERSTORE_UNION_SEED", "union-overlay-1")
ONLY = os.environ.get("LAYERSTORE_UNION_ONLY")
MIN_FEATURE = 30  # each feature in ou.REQUIRED_FEATURES, over the whole run
REPORTED = 3  # failing stacks reported in full
LINES = 40  # problem lines per failing stack

NAMESPACE = sorted(
    {
        "/" + "/".join(parts)
        for n in range(1, ou.MAX_DEPTH + 1)
        for parts in itertools.product(ou.NAMES, repeat=n)
    }
)


@pytest.fixture(scope="module")
def overlayfs() -> None:
    reason = ou.overlay_unsupported_reason()
    if reason and os.environ.get("CI"):
        # CI runs as root on a kernel with overlayfs: the oracle missing there is a failure.
        pytest.fail(f"the overlayfs oracle is unavailable in CI: {reason}")
    if reason:
        pytest.skip(reason)


def chain_id(diff_ids: list[str]) -> str:
    chain = diff_ids[0]
    for d in diff_ids[1:]:
        chain = "sha256:" + hashlib.sha256(f"{chain} {d}".encode()).hexdigest()
    return chain


def b3sums(root: Path, paths: list[str]) -> dict[str, str]:
    """BLAKE3 of the merged files, by the b3sum CLI (one run per stack)."""
    if not paths:
        return {}
    files = [str(root) + p for p in paths]
    res = subprocess.run(["b3sum", "--no-names", *files], capture_output=True, check=True)
    sums = res.stdout.decode().split()
    assert len(sums) == len(paths)
    return {p: "blake3:" + s for p, s in zip(paths, sums, strict=True)}


class Checker:
    """Compares one stack with its mount; every check group records problems instead of
    raising, so one broken call does not hide the others."""

    def __init__(self, stack: Any, merged: Path, ktree: dict[str, ou.Info], view: ou.View):
        self.stack = stack
        self.merged = merged
        self.root = os.path.realpath(merged)
        self.ktree = ktree
        self.view = view
        self.problems: list[str] = []
        # the kernel's answer for every lookup: (path, follow) -> ("ok", real, info) | ("err", n)
        self.kernel: dict[tuple[str, bool], tuple[Any, ...]] = {}
        self.queries = sorted(set(NAMESPACE) | set(ktree))
        for p, info in ktree.items():
            if info["kind"] == "symlink":
                self.queries += [f"{p}/{n}" for n in ou.NAMES]
        fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for q in self.queries:
                for follow in (True, False):
                    try:
                        real, st = ou.resolve_in_root(fd, self.root, q, follow)
                    except OSError as e:
                        self.kernel[q, follow] = ("err", e.errno)
                    else:
                        self.kernel[q, follow] = ("ok", real, ou.info_from_stat(st))
        finally:
            os.close(fd)

    def group(self, name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            tb = traceback.format_exc().strip().splitlines()
            self.problems.append(f"[{name}] raised: " + " | ".join(tb[-3:]))

    def bad(self, name: str, msg: str) -> None:
        self.problems.append(f"[{name}] {msg}")

    def followed_kind(self, p: str) -> str | None:
        k = self.kernel[p, True]
        return k[2]["kind"] if k[0] == "ok" else None

    def children(self, d: str) -> list[str]:
        return sorted(posixpath.basename(p) for p in self.ktree if ou.parent(p) == d)

    # -- the groups ------------------------------------------------------------------------------

    def view_matches(self) -> None:
        got = ou.stack_tree(self.stack)
        for line in ou.diff_trees(self.ktree, got):
            self.bad("view", line)

    def stat_fields(self) -> None:
        files = [p for p, i in self.ktree.items() if i["kind"] == "file"]
        digests = b3sums(self.merged, files)
        for p, info in self.ktree.items():
            st = self.stack.stat(p, follow_symlinks=False)
            want_layer = self.view[p].layer
            checks = {
                "path": (st.path, p),
                "st_mode": (st.st_mode, ou.KIND_BITS[info["kind"]] | info["mode"]),
                "layer": (st.layer, want_layer),
                "implicit": (st.implicit, want_layer is None),
                "digest": (st.digest, digests.get(p)),
                "linkname": (st.linkname, info["linkname"]),
            }
            if info["kind"] in ("char", "block"):
                checks["rdev"] = (st.rdev, os.makedev(*info["dev"]))
            if info["kind"] == "symlink":
                checks["readlink"] = (self.stack.readlink(p), info["linkname"])
            for field, (got, want) in checks.items():
                if got != want:
                    self.bad("stat", f"{p}: {field}: expected {want!r}, stack {got!r}")

    def lookups(self) -> None:
        """stat/exists/read_bytes on every namespace path, both ways, against openat2."""
        for (q, follow), k in self.kernel.items():
            how = "stat" if follow else "lstat"
            try:
                st = self.stack.stat(q, follow_symlinks=follow)
            except OSError as e:
                got: tuple[Any, ...] = ("err", e)
            else:
                got = ("ok", st)
            exists = self.stack.exists(q, follow_symlinks=follow)
            if exists != (k[0] == "ok"):
                self.bad(how, f"{q}: exists() is {exists}, kernel: {self.kdesc(k)}")
            if k[0] == "err":
                if got[0] == "ok":
                    self.bad(how, f"{q}: kernel {ou.errno_name(k[1])}, stack found {got[1].kind}")
                    continue
                e = got[1]
                ok = {
                    errno.ENOENT: isinstance(e, FileNotFoundError),
                    errno.ENOTDIR: isinstance(e, FileNotFoundError | NotADirectoryError),
                    errno.ELOOP: e.errno == errno.ELOOP,
                }.get(k[1], False)
                if not ok:
                    self.bad(how, f"{q}: kernel {ou.errno_name(k[1])}, stack raised {e!r}")
                continue
            _, real, kinfo = k
            if got[0] != "ok":
                self.bad(how, f"{q}: kernel resolves to {real}, stack raised {got[1]!r}")
                continue
            st = got[1]
            if real == "/":  # the root's own attributes are not part of any layer
                if st.kind != "dir":
                    self.bad(how, f"{q}: resolves to the root, stack says {st.kind}")
                continue
            linfo = ou.info_from_lib(st)
            for field in kinfo:
                if kinfo[field] != linfo[field]:
                    self.bad(
                        how,
                        f"{q} (-> {real}): {field}: kernel={ou.show(kinfo[field])} "
                        f"stack={ou.show(linfo[field])}",
                    )
            if follow and kinfo["kind"] == "file":
                data = self.stack.read_bytes(q)
                if data != self.ktree[real]["data"]:
                    self.bad("read_bytes", f"{q} (-> {real}): content differs")

    def kdesc(self, k: tuple[Any, ...]) -> str:
        return f"resolves to {k[1]}" if k[0] == "ok" else ou.errno_name(k[1])

    def walk(self) -> None:
        expected: list[tuple[str, list[str], list[str]]] = []

        def visit(d: str) -> None:
            names = self.children(d)
            paths = [posixpath.join(d, n) for n in names]
            dirs = [n for n, p in zip(names, paths, strict=True) if self.followed_kind(p) == "dir"]
            files = [n for n in names if n not in dirs]
            expected.append((d, dirs, files))
            for n in dirs:
                p = posixpath.join(d, n)
                if self.ktree[p]["kind"] == "dir":  # symlinks to directories: not descended
                    visit(p)

        visit("/")
        got = [(d, list(dn), list(fn)) for d, dn, fn in self.stack.walk("/")]
        if got == expected:
            return
        want, have = {e[0]: e for e in expected}, {g[0]: g for g in got}
        for d in sorted(want.keys() - have.keys()):
            self.bad("walk", f"{d}: not visited (kernel {want[d]})")
        for d in sorted(have.keys() - want.keys()):
            self.bad("walk", f"{d}: visited, but not a directory to descend into ({have[d]})")
        for d in sorted(want.keys() & have.keys()):
            if want[d] != have[d]:
                self.bad("walk", f"{d}: kernel {want[d][1:]}, stack {have[d][1:]} (dirs, files)")
        order = [g[0] for g in got if g[0] in want]
        if order != [e[0] for e in expected if e[0] in have]:
            self.bad("walk", f"order: stack {[g[0] for g in got]}, os.walk {list(want)}")

    def listdir(self) -> None:
        dirs = ["/"] + [p for p, i in self.ktree.items() if i["kind"] == "dir"]
        for d in dirs:
            got = self.stack.listdir(d)
            if got != self.children(d):
                self.bad("listdir", f"{d}: kernel {self.children(d)}, stack {got}")
        for p, i in self.ktree.items():  # listdir follows a symlink to a directory
            k = self.kernel[p, True]
            if i["kind"] == "symlink" and k[0] == "ok" and k[2]["kind"] == "dir":
                got = self.stack.listdir(p)
                if got != self.children(k[1]):
                    self.bad("listdir", f"{p} (-> {k[1]}): kernel {self.children(k[1])}, {got}")

    def stat_many(self) -> None:
        qs = [
            q
            for q in self.queries
            if self.kernel[q, True][0] == "ok" or self.kernel[q, True][1] == errno.ENOENT
        ]
        got = self.stack.stat_many(qs)
        if len(got) != len(qs):
            self.bad("stat_many", f"{len(qs)} paths, {len(got)} results")
            return
        for q, st in zip(qs, got, strict=True):
            if self.kernel[q, True][0] != "ok":
                if st is not None:
                    self.bad("stat_many", f"{q}: missing, stack gave {st.kind}")
            elif st is None:
                self.bad("stat_many", f"{q}: exists, stack gave None")
            elif ou.info_from_lib(st) != ou.info_from_lib(self.stack.stat(q)):
                self.bad("stat_many", f"{q}: differs from stat()")

    def open_files(self) -> None:
        for p, i in self.ktree.items():
            if i["kind"] != "file":
                continue
            data = i["data"]
            with self.stack.open(p) as f:
                if not f.seekable():
                    self.bad("open", f"{p}: not seekable")
                    continue
                mid = len(data) // 2
                f.seek(mid)
                tail = f.read()
                f.seek(0)
                head = f.read(7)
                if tail != data[mid:] or head != data[:7] or f.tell() != len(head):
                    self.bad("open", f"{p}: seek/read disagree with the content")


def check_stack(
    store: ls.Store, work: Path, recipes: list[ou.Recipe], views: list[ou.View]
) -> list[str]:
    """Problems found with one stack (empty: the stack reads like the mount)."""
    work.mkdir()
    try:
        layers = [store.import_tar(ou.recipe_tar(r)) for r in recipes]
        lowers = []
        for r, v in zip(recipes, views, strict=True):
            ou.write_lower(r, v, work / f"L{r.index}")
            lowers.append(work / f"L{r.index}")
        with ou.overlay_mount(lowers, work / "merged") as merged:
            ktree = ou.kernel_tree(merged)
            model = ou.diff_trees(ou.model_tree(views[-1]), ktree, ("model", "kernel"))
            if model:  # the test is wrong, not the store: say so
                return ["GENERATOR BUG (model and kernel disagree; store not checked):", *model]
            stack = store.stack(layers)
            c = Checker(stack, merged, ktree, views[-1])
            c.group("view", c.view_matches)
            c.group("stat", c.stat_fields)
            c.group("lookups", c.lookups)
            c.group("walk", c.walk)
            c.group("listdir", c.listdir)
            c.group("stat_many", c.stat_many)
            c.group("open", c.open_files)

            def pushed() -> None:
                s = store.stack(layers[:1])
                for layer in layers[1:]:
                    s = s.push(layer)
                want = chain_id([layer.diff_id for layer in layers])
                if (stack.chain_id, s.chain_id) != (want, want):
                    c.bad("push", f"chain_id: {want} expected, {stack.chain_id} / {s.chain_id}")
                if len(s) != len(layers) or len(stack) != len(layers):
                    c.bad("push", f"len: {len(stack)} and {len(s)}, {len(layers)} layers")
                if [x.id for x in s.layers] != [x.id for x in layers]:
                    c.bad("push", "layers differ")
                for line in ou.diff_trees(ktree, ou.stack_tree(s), ("kernel", "pushed")):
                    c.bad("push", line)

            c.group("push", pushed)
            return c.problems
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_union_matches_overlayfs(store: ls.Store, tmp_path: Path, overlayfs: None) -> None:
    gen = ou.StackGen()
    failing: list[int] = []
    reports: list[str] = []
    indices = [int(ONLY)] if ONLY else list(range(STACKS))
    gen_bugs = 0
    kinds: Counter[str] = Counter()  # problem groups over all failing stacks
    for i in indices:
        recipes, views = gen.stack(random.Random(f"{SEED}/{i}"))
        try:
            problems = check_stack(store, tmp_path / f"stack{i}", recipes, views)
        except Exception:
            problems = ["raised: " + traceback.format_exc()]
        if problems:
            failing.append(i)
            gen_bugs += problems[0].startswith("GENERATOR BUG")
            kinds.update({p.split("]")[0].lstrip("[") for p in problems if p.startswith("[")})
            if len(reports) < REPORTED:
                recipe_text = "\n".join(r.describe() for r in recipes)
                shown = problems[:LINES]
                if len(problems) > LINES:
                    shown.append(f"... {len(problems) - LINES} more")
                reports.append(
                    f"=== stack {i} (LAYERSTORE_UNION_ONLY={i}), {len(recipes)} layers\n"
                    f"{recipe_text}\n--- problems:\n" + "\n".join(shown)
                )
    counts = ", ".join(f"{k}={v}" for k, v in sorted(gen.features.items()))
    print(f"\nunion vs overlayfs: {len(indices)} stacks, features: {counts}")
    assert not failing, (
        f"{len(failing)} of {len(indices)} stacks differ from overlayfs ({gen_bugs} are "
        f"generator bugs); stacks {failing[:30]}; stacks per check: {dict(kinds)}\n\n"
        + "\n\n".join(reports)
    )
    if not ONLY:
        low = {k: gen.features[k] for k in ou.REQUIRED_FEATURES if gen.features[k] < MIN_FEATURE}
        assert not low, f"features seen too rarely (minimum {MIN_FEATURE}): {low}; all: {counts}"
