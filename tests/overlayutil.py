"""Union-view test helpers: random layer recipes, their two encodings, a reference model, and the
kernel's overlayfs as the oracle.

A :class:`Recipe` is one layer as a set of operations over a small namespace (names ``a``-``d``,
at most three levels deep). It is written two ways:

- :func:`recipe_tar`: an OCI layer tar (whiteout ``.wh.NAME`` as an empty regular file, opaque
  marker ``DIR/.wh..wh..opq``), written by Python's ``tarfile``;
- :func:`write_lower`: an overlayfs lower directory (whiteout = 0:0 character device, opaque =
  ``trusted.overlay.opaque=y`` on the directory), every entry with the same content, mode,
  owner, mtime and ``user.*`` xattrs.

:class:`StackGen` draws stacks of recipes and keeps a reference union model (DESIGN section 3)
of the view after each layer: it needs one to choose operations that mean something (whiteouts of
paths that exist below, directory<->file replacements, ...), it names the layer that provides a
path, and it counts which features occurred. The generator never produces the cases where the
kernel differs from the OCI spec (DESIGN section 3, "Oracles"): a path and its whiteout in one
layer, an opaque marker at a layer's root, markers under directories no layer has, hardlinks to
lower layers, entries beneath a lower symlink, 0:0 devices and overlay xattrs inside a tar.

:func:`kernel_tree` / :func:`stack_tree` / :func:`model_tree` describe a view in the same terms,
and :func:`resolve_in_root` asks the kernel (``openat2`` with ``RESOLVE_IN_ROOT``) how a path
resolves inside the mount, symlinks and all, with the image-root rules: absolute targets are
relative to the root and ``..`` stops there.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import io
import os
import posixpath
import random
import stat
import struct
import subprocess
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

NAMES = ("a", "b", "c", "d")
MAX_DEPTH = 3
IDS = (0, 0, 0, 1, 33, 1000, 65534, 123456, 4_000_000)  # the last needs PAX or GNU
FILE_MODES = (0o644, 0o644, 0o644, 0o600, 0o640, 0o755, 0o444, 0o4755, 0o2755, 0o6711, 0o1644)
DIR_MODES = (0o755, 0o755, 0o700, 0o750, 0o711, 0o555, 0o1777, 0o2775)
DEV_MODES = (0o600, 0o620, 0o640, 0o666)
XATTR_KEYS = ("user.k1", "user.k2", "user.k3")
IMPLICIT_MODE = 0o755

KIND_BITS = {
    "file": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}
TAR_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}
FORMAT_NAMES = {tarfile.PAX_FORMAT: "pax", tarfile.GNU_FORMAT: "gnu", tarfile.USTAR_FORMAT: "ustar"}

# The features the differential test must see often enough (the list).
REQUIRED_FEATURES = (
    "whiteout_file",
    "whiteout_dir",
    "opaque_dir",
    "dir_to_nondir",
    "nondir_to_dir",
    "hardlink",
    "symlink",
    "delete_then_recreate",
    "dir_merge",
)


# ------------------------------------------------------------------------------------------------
# Paths
# ------------------------------------------------------------------------------------------------


def parent(p: str) -> str:
    return posixpath.dirname(p)


def ancestors(p: str) -> list[str]:
    """Strict ancestors of ``p``, shallowest first, without the root."""
    parts = p.strip("/").split("/")
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts))]


def is_under(p: str, top: str) -> bool:
    """``p`` is strictly below ``top``."""
    return (top == "/" and p != "/") or p.startswith(top + "/")


def depth(p: str) -> int:
    return len(p.strip("/").split("/"))


# ------------------------------------------------------------------------------------------------
# Recipes
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Node:
    """One entry of a layer. ``hardlink``: ``target`` is the absolute path of a regular file of
    the same layer, and the header's own mode/owner/mtime are deliberately random (the view
    reports the target's)."""

    kind: str  # file dir symlink hardlink char block fifo
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    data: bytes = b""
    target: str = ""
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] = dataclasses.field(default_factory=dict)


IMPLICIT = Node("dir", IMPLICIT_MODE, 0, 0, 0)


@dataclasses.dataclass
class Seen:
    """A path of the model's view: the node that provides it (hardlinks resolved to their target's
    node, kind ``file``) and the layer it comes from (None: implicit directory)."""

    node: Node
    layer: int | None


View = dict[str, Seen]


@dataclasses.dataclass
class Recipe:
    index: int
    entries: list[tuple[str, Node]] = dataclasses.field(default_factory=list)  # tar order, dups
    nodes: dict[str, Node] = dataclasses.field(default_factory=dict)  # last one wins
    implicit: set[str] = dataclasses.field(default_factory=set)  # parents of entries, undeclared
    marker_dirs: set[str] = dataclasses.field(default_factory=set)  # parents of markers only
    whiteouts: dict[str, None] = dataclasses.field(default_factory=dict)  # ordered set
    opaque: dict[str, None] = dataclasses.field(default_factory=dict)
    link_targets: set[str] = dataclasses.field(default_factory=set)
    aufs: bool = False
    shuffled: bool = False
    dot_prefix: bool = False
    fmt: int = tarfile.PAX_FORMAT
    # the tar's member order: ("entry", i) | ("whiteout", path) | ("opaque", dir) | ("aufs", name)
    order: list[tuple[str, Any]] = dataclasses.field(default_factory=list)

    def describe(self) -> str:
        fmt = FORMAT_NAMES[self.fmt]
        lines = [f"layer {self.index} ({fmt}{', ./ names' if self.dot_prefix else ''}):"]
        for what, arg in self.order:
            if what == "entry":
                p, n = self.entries[arg]
                lines.append(f"  {p:<8} {describe_node(n)}")
            elif what == "whiteout":
                lines.append(f"  {arg:<8} WHITEOUT ({whiteout_name(arg)})")
            elif what == "opaque":
                lines.append(f"  {arg:<8} OPAQUE ({arg}/.wh..wh..opq)")
            else:
                lines.append(f"  /{arg:<7} AUFS metadata")
        if self.implicit:
            lines.append(f"  undeclared parents: {sorted(self.implicit)}")
        if self.marker_dirs - self.implicit - set(self.nodes):
            lines.append(f"  marker-only dirs: {sorted(self.marker_dirs)}")
        return "\n".join(lines)


def describe_node(n: Node) -> str:
    meta = f"{n.mode:04o} {n.uid}:{n.gid} mtime={n.mtime_ns}"
    xa = f" xattrs={n.xattrs}" if n.xattrs else ""
    if n.kind == "file":
        return f"file {meta} {len(n.data)}B {hash_short(n.data)}{xa}"
    if n.kind == "dir":
        return f"dir {meta}{xa}"
    if n.kind == "symlink":
        return f"symlink -> {n.target!r} {meta}"
    if n.kind == "hardlink":
        return f"hardlink -> {n.target} (header {meta})"
    return f"{n.kind} {n.dev[0]}:{n.dev[1]} {meta}"


def hash_short(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:10]


def whiteout_name(p: str) -> str:
    return posixpath.join(parent(p), ".wh." + posixpath.basename(p))


# ------------------------------------------------------------------------------------------------
# The reference model
# ------------------------------------------------------------------------------------------------


def apply_layer(below: View, r: Recipe) -> View:
    """The view after stacking recipe ``r`` on the view ``below`` (DESIGN section 3), restricted
    to the inputs the generator produces."""

    def hidden(p: str) -> bool:
        if p in r.whiteouts or any(a in r.whiteouts for a in ancestors(p)):
            return True
        if any(d == "/" or is_under(p, d) for d in r.opaque):
            return True
        for a in ancestors(p):  # a non-directory of this layer cuts off everything below it
            if a in r.nodes and r.nodes[a].kind != "dir":
                return True
        n = r.nodes.get(p)
        return n is not None and not (n.kind == "dir" and below[p].node.kind == "dir")

    view: View = {p: s for p, s in below.items() if not hidden(p)}
    for p, n in r.nodes.items():
        if n.kind == "hardlink":
            while n.kind == "hardlink":  # a link to a link: the same file
                n = r.nodes[n.target]
            view[p] = Seen(n, r.index)
        else:
            view[p] = Seen(n, r.index)
    for q in r.implicit:
        if q not in r.nodes and q not in view:
            view[q] = Seen(IMPLICIT, None)
    return view


def visible_below(below: View, r: Recipe, p: str) -> Seen | None:
    """What layer ``r`` sees of ``p`` below it (None when absent or cut off by ``r``'s opaque
    markers)."""
    if any(is_under(p, d) for d in r.opaque):
        return None
    return below.get(p)


# ------------------------------------------------------------------------------------------------
# The generator
# ------------------------------------------------------------------------------------------------


class _LayerBuilder:
    def __init__(self, rng: random.Random, below: View, index: int, removed: set[str]) -> None:
        self.rng = rng
        self.below = below
        self.removed = removed
        self.r = Recipe(index)

    # -- predicates -----------------------------------------------------------------------------

    def things(self) -> set[str]:
        r = self.r
        return (
            set(r.nodes)
            | r.implicit
            | r.marker_dirs
            | set(r.whiteouts)
            | {d + "/.wh..wh..opq" for d in r.opaque}
        )

    def blocked(self, p: str) -> bool:
        return p in self.r.whiteouts or any(a in self.r.whiteouts for a in ancestors(p))

    def opaque_above(self, p: str) -> bool:
        return any(is_under(p, d) for d in self.r.opaque)

    def can_put(self, p: str, kind: str) -> bool:
        r = self.r
        if self.blocked(p) or p in r.link_targets:
            return False
        if any(a in r.nodes and r.nodes[a].kind != "dir" for a in ancestors(p)):
            return False
        if kind != "dir":
            if p in r.implicit or p in r.opaque or p in r.marker_dirs:
                return False
            if any(is_under(t, p) for t in self.things()):
                return False
        return True

    # -- building blocks ------------------------------------------------------------------------

    def mtime(self) -> int:
        s = self.rng.randrange(1, 2_000_000_000)
        return s * 10**9 + (self.rng.randrange(1, 10**9) if self.rng.random() < 0.3 else 0)

    def owner(self) -> tuple[int, int]:
        return self.rng.choice(IDS), self.rng.choice(IDS)

    def xattrs(self, p: float) -> dict[str, bytes]:
        if self.rng.random() >= p:
            return {}
        keys = self.rng.sample(XATTR_KEYS, self.rng.randint(1, 2))
        return {k: b"v%d" % self.rng.randrange(100) for k in keys}

    def new_dir(self) -> Node:
        uid, gid = self.owner()
        mode = self.rng.choice(DIR_MODES)
        return Node("dir", mode, uid, gid, self.mtime(), xattrs=self.xattrs(0.25))

    def new_file(self) -> Node:
        rng = self.rng
        x = rng.random()
        size = (
            0
            if x < 0.1
            else rng.randrange(200_000, 400_000)
            if x < 0.13
            else rng.randrange(1, 3000)
        )
        uid, gid = self.owner()
        return Node(
            "file", rng.choice(FILE_MODES), uid, gid, self.mtime(), rng.randbytes(size),
            xattrs=self.xattrs(0.2),
        )  # fmt: skip

    def new_symlink(self, p: str) -> Node:
        rng = self.rng
        x = rng.random()
        pool = sorted(self.below) or ["/a"]
        if x < 0.05:
            target = posixpath.basename(p)  # a loop onto itself
        elif x < 0.15:
            target = rng.choice(pool)  # absolute: relative to the image root
        elif x < 0.22:
            target = "../" * (depth(p) + rng.randint(0, 2)) + rng.choice(pool).lstrip("/")
        else:
            dest = rng.choice(pool) if rng.random() < 0.7 else random_path(rng)
            target = posixpath.relpath(dest, parent(p))
        uid, gid = self.owner()
        return Node("symlink", 0o777, uid, gid, self.mtime(), target=target)

    def new_special(self) -> Node:
        rng = self.rng
        kind = rng.choice(("char", "block", "fifo"))
        dev = {"char": (1, rng.choice((3, 5, 7))), "block": (7, rng.randrange(1, 8))}
        uid, gid = self.owner()
        return Node(kind, rng.choice(DEV_MODES), uid, gid, self.mtime(), dev=dev.get(kind, (0, 0)))

    def new_nondir(self, p: str) -> Node:
        x = self.rng.random()
        if x < 0.6:
            return self.new_file()
        if x < 0.9:
            return self.new_symlink(p)
        return self.new_special()

    def ensure_parents(self, p: str) -> None:
        r = self.r
        for q in ancestors(p):
            if q in r.nodes or q in r.implicit:
                continue
            s = self.below.get(q)
            if s is not None and s.node.kind == "dir":
                omit = self.rng.random() < 0.5
            elif s is not None:
                omit = False  # entries beneath a lower non-directory: declare the directory
            else:
                omit = self.rng.random() < 0.3
            if omit:
                r.implicit.add(q)
                r.marker_dirs.discard(q)
            else:
                self.emit(q, self.new_dir())

    def emit(self, p: str, n: Node) -> None:
        r = self.r
        r.entries.append((p, n))
        r.nodes[p] = n
        r.implicit.discard(p)
        r.marker_dirs.discard(p)

    def put(self, p: str, n: Node) -> bool:
        if not self.can_put(p, n.kind):
            return False
        self.ensure_parents(p)
        self.emit(p, n)
        return True

    def marker_parents(self, p: str) -> bool:
        """Make sure the directories holding a marker for ``p`` exist in this layer: declared
        directories, or directories visible below (never a directory no layer has)."""
        r = self.r
        for q in ancestors(p):
            if q in r.nodes:
                if r.nodes[q].kind != "dir":
                    return False
            elif q not in r.implicit:
                s = visible_below(self.below, r, q)
                if s is None or s.node.kind != "dir":
                    return False
        for q in ancestors(p):
            if q not in r.nodes and q not in r.implicit:
                r.marker_dirs.add(q)
        return True

    # -- operations -----------------------------------------------------------------------------

    def pick_path(self, existing: float = 0.3) -> str:
        rng = self.rng
        if self.below and rng.random() < existing:
            return rng.choice(sorted(self.below))
        dirs = [q for q, s in self.below.items() if s.node.kind == "dir" and depth(q) < MAX_DEPTH]
        if dirs and rng.random() < 0.6:
            return rng.choice(sorted(dirs)) + "/" + rng.choice(NAMES)
        return random_path(rng)

    def op_file(self) -> None:
        p = self.pick_path(0.35)
        self.put(p, self.new_file())

    def op_dir(self) -> None:
        p = self.pick_path(0.4)
        if self.put(p, self.new_dir()) and depth(p) < MAX_DEPTH and self.rng.random() < 0.6:
            self.put(p + "/" + self.rng.choice(NAMES), self.new_nondir(p))

    def op_symlink(self) -> None:
        p = self.pick_path(0.3)
        self.put(p, self.new_symlink(p))

    def op_special(self) -> None:
        self.put(self.pick_path(0.2), self.new_special())

    def op_hardlink(self) -> None:
        r = self.r
        files = [q for q, n in r.nodes.items() if n.kind in ("file", "hardlink")]
        if not files:
            self.op_file()
            files = [q for q, n in r.nodes.items() if n.kind == "file"]
            if not files:
                return
        target = self.rng.choice(sorted(files))
        p = self.pick_path(0.3)
        if p == target or any(a == target for a in ancestors(p)):
            return
        uid, gid = self.owner()
        link = Node("hardlink", self.rng.choice(FILE_MODES), uid, gid, self.mtime(), target=target)
        if self.put(p, link):
            r.link_targets.add(target)

    def op_whiteout(self) -> None:
        r = self.r
        cands = [
            p
            for p in sorted(self.below)
            if p not in r.nodes
            and p not in r.implicit
            and p not in r.marker_dirs
            and p not in r.opaque
            and not self.blocked(p)
            and not self.opaque_above(p)
            and not any(t == p or is_under(t, p) for t in self.things())
        ]
        if not cands:
            return
        dirs = [p for p in cands if self.below[p].node.kind == "dir"]
        pool = dirs if dirs and self.rng.random() < 0.45 else cands
        p = self.rng.choice(pool)
        if self.marker_parents(p):
            r.whiteouts[p] = None

    def op_opaque(self) -> None:
        r = self.r
        rng = self.rng
        dirs = [q for q, s in self.below.items() if s.node.kind == "dir"]
        with_children = [q for q in dirs if any(is_under(c, q) for c in self.below)]
        own = [q for q, n in r.nodes.items() if n.kind == "dir"]
        pool = with_children if with_children and rng.random() < 0.8 else dirs + own
        if not pool:
            return
        d = rng.choice(sorted(pool))
        if d in r.opaque or self.blocked(d) or self.opaque_above(d):
            return
        if any(is_under(w, d) for w in r.whiteouts) or any(is_under(o, d) for o in r.opaque):
            return
        if d in r.nodes:
            if r.nodes[d].kind != "dir":
                return
        elif d in r.implicit or d in r.marker_dirs:
            pass
        elif (s := self.below.get(d)) is not None and s.node.kind == "dir" and rng.random() < 0.3:
            if not self.marker_parents(d):  # the marker alone, in a directory from below
                return
            r.marker_dirs.add(d)
        elif not self.put(d, self.new_dir()):
            return
        r.opaque[d] = None
        # same-layer children survive the layer's own opaque marker
        for _ in range(rng.choice((0, 1, 1, 2))):
            if depth(d) < MAX_DEPTH:
                c = d + "/" + rng.choice(NAMES)
                if rng.random() < 0.3:
                    self.put(c, self.new_dir())
                else:
                    self.put(c, self.new_nondir(c))

    def op_dir_to_nondir(self) -> None:
        dirs = [q for q, s in self.below.items() if s.node.kind == "dir"]
        if dirs:
            p = self.rng.choice(sorted(dirs))
            self.put(p, self.new_nondir(p))

    def op_nondir_to_dir(self) -> None:
        nondirs = [q for q, s in self.below.items() if s.node.kind != "dir"]
        if nondirs:
            p = self.rng.choice(sorted(nondirs))
            if self.put(p, self.new_dir()) and depth(p) < MAX_DEPTH and self.rng.random() < 0.7:
                c = p + "/" + self.rng.choice(NAMES)
                self.put(c, self.new_nondir(c))

    def op_recreate(self) -> None:
        gone = sorted(q for q in self.removed if q not in self.below)
        if gone:
            p = self.rng.choice(gone)
            if self.rng.random() < 0.5:
                self.put(p, self.new_nondir(p))
            else:
                self.op_dir_at(p)

    def op_dir_at(self, p: str) -> None:
        if self.put(p, self.new_dir()) and depth(p) < MAX_DEPTH:
            c = p + "/" + self.rng.choice(NAMES)
            self.put(c, self.new_nondir(c))

    def op_duplicate(self) -> None:
        r = self.r
        if not r.nodes:
            return
        p = self.rng.choice(sorted(r.nodes))
        kind = r.nodes[p].kind
        n = self.new_dir() if kind == "dir" or self.rng.random() < 0.3 else self.new_nondir(p)
        if kind == "dir" and n.kind != "dir":
            return
        self.put(p, n)

    BASE_OPS = (("op_file", 4), ("op_dir", 3), ("op_symlink", 1), ("op_hardlink", 0.7),
                ("op_special", 0.3))  # fmt: skip
    OPS = (
        ("op_file", 2.5), ("op_dir", 1.5), ("op_symlink", 1.2), ("op_hardlink", 1.0),
        ("op_special", 0.3), ("op_whiteout", 3.0), ("op_opaque", 1.3), ("op_dir_to_nondir", 1.3),
        ("op_nondir_to_dir", 1.3), ("op_recreate", 1.5), ("op_duplicate", 0.4),
    )  # fmt: skip

    def build(self) -> Recipe:
        rng = self.rng
        r = self.r
        base = r.index == 0
        ops = self.BASE_OPS if base else self.OPS
        names = [o for o, _ in ops]
        weights = [w for _, w in ops]
        n = rng.randint(12, 22) if base else rng.randint(3, 10)
        for _ in range(n):
            getattr(self, rng.choices(names, weights)[0])()
        self.finish()
        return r

    def finish(self) -> None:
        rng = self.rng
        r = self.r
        r.aufs = rng.random() < 0.06
        r.dot_prefix = rng.random() < 0.25
        needs_pax = r.aufs or any(n.xattrs or n.mtime_ns % 10**9 for _, n in r.entries)
        big_ids = any(max(n.uid, n.gid) > 0o7777777 for _, n in r.entries)  # base-256 in GNU
        if needs_pax:
            r.fmt = tarfile.PAX_FORMAT
        elif big_ids:
            r.fmt = rng.choice((tarfile.PAX_FORMAT, tarfile.GNU_FORMAT))
        else:
            r.fmt = rng.choice((tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT))
        order: list[tuple[str, Any]] = [("entry", i) for i in range(len(r.entries))]
        paths = [p for p, _ in r.entries]
        has_links = any(n.kind == "hardlink" for _, n in r.entries)
        if len(set(paths)) == len(paths) and not has_links and rng.random() < 0.25:
            r.shuffled = True
            rng.shuffle(order)  # children before parents: the tar order must not matter
        # markers anywhere in the tar, before or after the entries they concern
        for w in r.whiteouts:
            order.insert(rng.randrange(len(order) + 1), ("whiteout", w))
        for d in r.opaque:
            order.insert(rng.randrange(len(order) + 1), ("opaque", d))
        if r.aufs:
            for name in (".wh..wh.plnk", ".wh..wh.plnk/1234.5678", ".wh..wh.aufs"):
                order.insert(rng.randrange(len(order) + 1), ("aufs", name))
            order.sort(key=lambda o: o == ("aufs", ".wh..wh.plnk/1234.5678"))
        r.order = order


def random_path(rng: random.Random) -> str:
    d = rng.choice((1, 1, 2, 2, 2, 3, 3))
    return "/" + "/".join(rng.choice(NAMES) for _ in range(d))


class StackGen:
    """Draws stacks; ``features`` counts what the drawn layers did (measured on the model, i.e.
    on the effect, not on the intent of an operation)."""

    def __init__(self) -> None:
        self.features: Counter[str] = Counter()

    def stack(self, rng: random.Random) -> tuple[list[Recipe], list[View]]:
        n = rng.randint(2, 6)
        view: View = {}
        removed: set[str] = set()
        ever_dir: set[str] = set()
        link_targets: set[str] = set()
        recipes: list[Recipe] = []
        views: list[View] = []
        for k in range(n):
            r = _LayerBuilder(rng, view, k, removed).build()
            new = apply_layer(view, r)
            self.count(view, r, new, removed, ever_dir, link_targets)
            recipes.append(r)
            views.append(new)
            view = new
        return recipes, views

    def count(
        self,
        below: View,
        r: Recipe,
        new: View,
        removed: set[str],
        ever_dir: set[str],
        link_targets: set[str],
    ) -> None:
        f = self.features
        for p in r.whiteouts:
            f["whiteout_dir" if below[p].node.kind == "dir" else "whiteout_file"] += 1
        for d in r.opaque:
            if any(is_under(q, d) for q in below):
                f["opaque_dir"] += 1
                if any(is_under(q, d) and q in below for q in r.nodes):
                    f["opaque_with_recreated_child"] += 1
            if d not in r.nodes:
                f["opaque_marker_only"] += 1
        for p, n in r.nodes.items():
            s = visible_below(below, r, p)
            if n.kind == "hardlink":
                f["hardlink"] += 1
                f["hardlink_to_hardlink"] += r.nodes[n.target].kind == "hardlink"
            elif n.kind == "symlink":
                f["symlink"] += 1
            elif n.kind in ("char", "block", "fifo"):
                f["device_or_fifo"] += 1
            if s is not None:
                if s.node.kind == "dir" and n.kind != "dir":
                    f["dir_to_nondir"] += 1
                elif s.node.kind != "dir" and n.kind == "dir":
                    f["nondir_to_dir"] += 1
                    if p in ever_dir:
                        f["dir_over_nondir_over_dir"] += 1
                elif n.kind == "dir":
                    f["dir_merge"] += 1
            elif p in removed and p not in below:
                f["delete_then_recreate"] += 1
            if s is not None and p in link_targets:
                f["hardlink_target_replaced_later"] += 1
        for p in r.whiteouts:
            if p in link_targets:
                f["hardlink_target_replaced_later"] += 1
        for q in r.implicit - set(r.nodes):
            s = visible_below(below, r, q)
            if s is not None and s.node.kind == "dir":
                f["undeclared_parent_from_below"] += 1
            else:
                f["implicit_dir"] += 1
                if q in removed:
                    f["delete_then_recreate"] += 1
        paths = [p for p, _ in r.entries]
        f["duplicate_entry"] += len(paths) - len(set(paths))
        f["aufs_metadata"] += r.aufs
        f["xattrs"] += sum(1 for n in r.nodes.values() if n.xattrs)
        f["tar_order_shuffled"] += r.shuffled
        # bookkeeping for the next layers
        for p in below:
            whited = p in r.whiteouts or any(a in r.whiteouts for a in ancestors(p))
            if whited or any(is_under(p, d) for d in r.opaque):
                removed.add(p)
        ever_dir.update(p for p, s in new.items() if s.node.kind == "dir")
        link_targets.update(r.link_targets)


# ------------------------------------------------------------------------------------------------
# Encodings
# ------------------------------------------------------------------------------------------------


def _tar_name(r: Recipe, p: str) -> str:
    return ("./" if r.dot_prefix else "") + p.lstrip("/")


def _member(name: str, n: Node, linkname: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = TAR_TYPES[n.kind]
    ti.mode = n.mode
    ti.uid, ti.gid = n.uid, n.gid
    ti.mtime = n.mtime_ns // 10**9
    if n.mtime_ns % 10**9:
        ti.pax_headers["mtime"] = f"{n.mtime_ns // 10**9}.{n.mtime_ns % 10**9:09d}"
    ti.size = len(n.data) if n.kind == "file" else 0
    ti.linkname = linkname or n.target
    ti.devmajor, ti.devminor = n.dev
    for k, v in n.xattrs.items():
        ti.pax_headers["SCHILY.xattr." + k] = v.decode()
    return ti


def recipe_tar(r: Recipe) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=r.fmt) as t:
        for what, arg in r.order:
            if what == "entry":
                p, n = r.entries[arg]
                link = _tar_name(r, n.target) if n.kind == "hardlink" else ""
                ti = _member(_tar_name(r, p), n, link)
                t.addfile(ti, io.BytesIO(n.data) if ti.size else None)
            elif what in ("whiteout", "opaque"):
                name = whiteout_name(arg) if what == "whiteout" else arg + "/.wh..wh..opq"
                ti = tarfile.TarInfo(_tar_name(r, name))
                ti.mode = 0o644
                t.addfile(ti)
            else:
                ti = tarfile.TarInfo(_tar_name(r, arg))
                if arg == ".wh..wh.plnk":
                    ti.type, ti.mode = tarfile.DIRTYPE, 0o700
                    t.addfile(ti)
                else:
                    ti.size = 3
                    t.addfile(ti, io.BytesIO(b"aux"))
    return buf.getvalue()


def _set_meta(path: str, n: Node) -> None:
    """Owner first (chown clears setuid/setgid), then mode, xattrs, and the mtime last."""
    if n.kind == "symlink":
        os.chown(path, n.uid, n.gid, follow_symlinks=False)
    else:
        os.chown(path, n.uid, n.gid)
        os.chmod(path, n.mode)
        for k, v in n.xattrs.items():
            os.setxattr(path, k, v)
    os.utime(path, ns=(n.mtime_ns, n.mtime_ns), follow_symlinks=False)


def write_lower(r: Recipe, view: View, root: Path) -> None:
    """Lay recipe ``r`` out as an overlayfs lower directory. ``view`` is the model's view after
    ``r``: undeclared directories (parents of entries or of markers) take the attributes the view
    gives them (the lower directory they merge with, or an implicit directory)."""
    root.mkdir()
    dirs: dict[str, Node] = {}
    for p, n in r.nodes.items():
        if n.kind == "dir":
            dirs[p] = n
    needed = set(r.implicit) | r.marker_dirs | set(r.opaque)
    for p in [*r.nodes, *r.whiteouts, *r.opaque]:
        needed.update(ancestors(p))
    for q in needed:
        if q not in dirs:
            assert q not in r.nodes, f"generator bug: {q} is not a directory in layer {r.index}"
            s = view.get(q)
            assert s is not None and s.node.kind == "dir", f"generator bug: {q} in {r.index}"
            dirs[q] = s.node
    base = str(root)
    for q in sorted(dirs, key=depth):
        os.mkdir(base + q)
    for p, n in r.nodes.items():
        full = base + p
        if n.kind == "file":
            with open(full, "wb") as f:
                f.write(n.data)
            _set_meta(full, n)
        elif n.kind == "symlink":
            os.symlink(n.target, full)
            _set_meta(full, n)
        elif n.kind in ("char", "block", "fifo"):
            bits = {"char": stat.S_IFCHR, "block": stat.S_IFBLK, "fifo": stat.S_IFIFO}[n.kind]
            os.mknod(full, bits | 0o600, os.makedev(*n.dev))
            _set_meta(full, n)
    last = {p: i for i, (p, _) in enumerate(r.entries)}
    for p in sorted(last, key=last.__getitem__):  # a link's target exists before the link
        n = r.nodes[p]
        if n.kind == "hardlink":
            os.link(base + n.target, base + p)
    for p in r.whiteouts:
        os.mknod(base + p, stat.S_IFCHR | 0o600, os.makedev(0, 0))
    for d in r.opaque:
        os.setxattr(base + d, "trusted.overlay.opaque", b"y")
    for q in sorted(dirs, key=depth, reverse=True):
        _set_meta(base + q, dirs[q])


# ------------------------------------------------------------------------------------------------
# Kernel overlay
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def overlay_mount(lowers_bottom_first: list[Path], merged: Path) -> Iterator[Path]:
    """A read-only overlay of the given lower directories (the kernel wants the top one first).
    Directory mtimes are stable without an upper directory (no copy-up ever happens)."""
    merged.mkdir(exist_ok=True)
    opts = "lowerdir=" + ":".join(str(p) for p in reversed(lowers_bottom_first))
    res = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        raise OSError(f"mount -t overlay failed: {res.stderr.strip()}")
    try:
        yield merged
    finally:
        res = subprocess.run(["umount", str(merged)], capture_output=True, check=False)
        if res.returncode != 0:
            subprocess.run(["umount", "-l", str(merged)], capture_output=True, check=False)


def overlay_unsupported_reason() -> str | None:
    """None when this process can mount an overlay with whiteouts and opaque directories."""
    if os.geteuid() != 0:
        return "needs uid 0 to mount overlayfs"
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        try:
            (t / "l0/d").mkdir(parents=True)
            (t / "l0/d/x").write_bytes(b"x")
            (t / "l0/gone").write_bytes(b"g")
            (t / "l1/d").mkdir(parents=True)
            os.setxattr(t / "l1/d", "trusted.overlay.opaque", b"y")
            os.mknod(t / "l1/gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))
            with overlay_mount([t / "l0", t / "l1"], t / "m") as m:
                names = sorted(os.listdir(m)), os.listdir(m / "d")
        except OSError as e:
            return f"overlayfs unavailable: {e}"
        if names != (["d"], []):
            return f"overlayfs does not honour whiteouts/opaque directories: {names}"
    return None


_libc = ctypes.CDLL(None, use_errno=True)
_SYS_OPENAT2 = 437  # the same number on every architecture (added after the table unification)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10


def resolve_in_root(root_fd: int, root: str, p: str, follow: bool) -> tuple[str, os.stat_result]:
    """How the kernel resolves image path ``p`` with ``root_fd`` as the root (absolute symlinks
    relative to it, ``..`` stopping at it): the resolved image path and its lstat. Raises OSError
    with the kernel's errno."""
    flags = os.O_PATH | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    how = struct.pack("QQQ", flags, 0, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    buf = ctypes.create_string_buffer(how, len(how))
    # A scoped lookup fails with EAGAIN when a rename anywhere on the system raced with it
    # (openat2(2)); the answer is to ask again.
    for _ in range(100):
        fd = _libc.syscall(_SYS_OPENAT2, root_fd, os.fsencode(p.lstrip("/") or "."), buf, len(how))
        if fd >= 0 or ctypes.get_errno() != errno.EAGAIN:
            break
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), p)
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
        st = os.fstat(fd)
    finally:
        os.close(fd)
    assert real == root or real.startswith(root + "/"), (real, root)
    return real[len(root) :] or "/", st


# ------------------------------------------------------------------------------------------------
# Describing views in common terms
# ------------------------------------------------------------------------------------------------

Info = dict[str, Any]


def kind_of(mode: int) -> str:
    for kind, bits in KIND_BITS.items():
        if stat.S_IFMT(mode) == bits:
            return kind
    return "other"


def info_from_stat(st: os.stat_result) -> Info:
    kind = kind_of(st.st_mode)
    return {
        "kind": kind,
        "mode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "mtime_ns": st.st_mtime_ns,
        "size": st.st_size if kind == "file" else None,
        "dev": (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("char", "block") else None,
    }


def kernel_tree(merged: Path) -> dict[str, Info]:
    """Every path under the mount (not following symlinks): lstat fields, ``user.*`` xattrs, file
    content and symlink target."""
    out: dict[str, Info] = {}
    base = str(merged)

    def visit(rel: str) -> None:
        for name in sorted(os.listdir(base + rel or "/")):
            p = f"{rel}/{name}"
            full = base + p
            st = os.lstat(full)
            info = info_from_stat(st)
            info["linkname"] = os.readlink(full) if info["kind"] == "symlink" else None
            if info["kind"] in ("file", "dir"):
                info["xattrs"] = {
                    k: os.getxattr(full, k) for k in os.listxattr(full) if k.startswith("user.")
                }
            else:
                info["xattrs"] = {}
            if info["kind"] == "file":
                with open(full, "rb") as f:
                    info["data"] = f.read()
            out[p] = info
            if info["kind"] == "dir":
                visit(p)

    visit("")
    return out


def info_from_lib(st: Any) -> Info:
    return {
        "kind": st.kind,
        "mode": st.mode,
        "uid": st.uid,
        "gid": st.gid,
        "mtime_ns": st.mtime_ns,
        "size": st.size if st.kind == "file" else None,
        "dev": (st.devmajor, st.devminor) if st.kind in ("char", "block") else None,
    }


def stack_tree(stack: Any) -> dict[str, Info]:
    """The stack's view in the same terms as :func:`kernel_tree`, by ``walk`` and lstat."""
    out: dict[str, Info] = {}
    for dirpath, dirnames, filenames in stack.walk("/"):
        for name in [*dirnames, *filenames]:
            p = posixpath.join(dirpath, name)
            st = stack.stat(p, follow_symlinks=False)
            info = info_from_lib(st)
            info["linkname"] = st.linkname
            info["xattrs"] = dict(st.xattrs)
            if st.kind == "file":
                info["data"] = stack.read_bytes(p)
            out[p] = info
    return out


def model_tree(view: View) -> dict[str, Info]:
    out: dict[str, Info] = {}
    for p, s in view.items():
        n = s.node
        out[p] = {
            "kind": n.kind,
            "mode": n.mode if n.kind != "symlink" else 0o777,
            "uid": n.uid,
            "gid": n.gid,
            "mtime_ns": n.mtime_ns,
            "size": len(n.data) if n.kind == "file" else None,
            "dev": n.dev if n.kind in ("char", "block") else None,
            "linkname": n.target if n.kind == "symlink" else None,
            "xattrs": dict(n.xattrs) if n.kind in ("file", "dir") else {},
        }
        if n.kind == "file":
            out[p]["data"] = n.data
    return out


def show(v: Any) -> str:
    if isinstance(v, bytes):
        return f"<{len(v)} bytes {hash_short(v)}>"
    if isinstance(v, int) and v > 7 and v < 0o10000:
        return oct(v)
    return repr(v)


def diff_trees(
    expected: dict[str, Info], got: dict[str, Info], what: tuple[str, str] = ("kernel", "stack")
) -> list[str]:
    """Human-readable differences, one line each."""
    a, b = what
    lines = []
    for p in sorted(expected.keys() - got.keys()):
        lines.append(f"{p}: only in {a} ({expected[p]['kind']})")
    for p in sorted(got.keys() - expected.keys()):
        lines.append(f"{p}: only in {b} ({got[p]['kind']})")
    for p in sorted(expected.keys() & got.keys()):
        e, g = expected[p], got[p]
        for k in sorted(e.keys() | g.keys()):
            if e.get(k) != g.get(k):
                lines.append(f"{p}: {k}: {a}={show(e.get(k))} {b}={show(g.get(k))}")
    return lines


def errno_name(e: int) -> str:
    return errno.errorcode.get(e, str(e))
