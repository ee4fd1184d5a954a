"""Property tests of the union index against a small reference model of the OCI layer rules.

Hypothesis draws stacks of 1-5 layers over a namespace of a few names three levels deep: files,
directories, symlinks, character devices (0:0 among them: plain data, never a whiteout), fifos,
hardlinks (to a file of the same layer or of the view below), whiteouts, opaque markers (at the
root too) and every replacement of one kind by another. Each layer is written with ``tarfile`` in
the order the operations were drawn (markers before, between or after the entries they affect).

The reference model (``apply_layer``) is DESIGN section 3 written as plainly as possible: remove the
whiteout targets and their subtrees, clear the lower children of opaque directories, then add the
layer's entries (last one wins among duplicates), a directory over a directory keeping the lower
children, anything else replacing, and a parent that nothing provides appearing as an implicit
directory (0755, root, mtime 0, no layer).

The generator keeps to inputs whose meaning the spec fixes: a marker only where its directory
exists below, no entry beneath a non-directory of its own layer, a lower non-directory beneath
which a layer adds entries is replaced by an explicit directory entry, and a hardlink's header
carries its target's metadata.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import posixpath
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import layerstore as ls
import pytest
import tarfixtures as tf
from hypothesis import HealthCheck, Phase, currently_in_test_context, given, settings
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st

NAMES = ("a", "b", "c")
KINDS = (
    "file",
    "file",
    "dir",
    "dir",
    "dir",
    "symlink",
    "char",
    "fifo",
    "hardlink",
    "whiteout",
    "whiteout",
    "opaque",
    "opaque",
)
DUPABLE = {"file", "symlink", "char", "fifo"}
LINK_TARGETS = ("a", "/a/b", "../c", "b/../a", "/missing", ".", "..", "/")
MTIME = 1_600_000_000


@dataclass(frozen=True)
class Node:
    """One path of the view, as the model sees it."""

    kind: str  # "file" | "dir" | "symlink" | "char" | "fifo"
    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    data: bytes = b""
    linkname: str = ""
    dev: tuple[int, int] = (0, 0)
    xattrs: tuple[tuple[str, bytes], ...] = ()
    layer: int | None = None


IMPLICIT = Node("dir", 0o755)


def event(what: str) -> None:
    """Count a feature in Hypothesis's statistics (``--hypothesis-show-statistics``)."""
    if currently_in_test_context():
        hypothesis_event(what)


View = dict[str, Node]  # "a/b" -> node (the root is not listed)


# --------------------------------------------------------------------------------------------
# Generation: raw operations, made into a well-formed layer against the view below
# --------------------------------------------------------------------------------------------

Op = tuple[str, str, int]  # (kind, path, attribute seed)

paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)
ops = st.tuples(st.sampled_from(KINDS), paths, st.integers(0, 10_000))
layer_ops = st.lists(ops, min_size=1, max_size=8)


def ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def under(path: str, directory: str) -> bool:
    """Is ``path`` strictly below ``directory`` ("" is the root)?"""
    return path != "" if directory == "" else path.startswith(directory + "/")


def node_for(kind: str, seed: int) -> Node:
    r = random.Random(seed)
    owner = {"uid": r.choice([0, 0, 1, 1000]), "gid": r.choice([0, 0, 5, 100])}
    mtime = MTIME + r.randrange(1000)
    xattrs: tuple[tuple[str, bytes], ...] = ()
    if r.random() < 0.25:
        xattrs = (("user.k", b"v%d" % r.randrange(3)),)
        if r.random() < 0.5:
            xattrs += (("user.other", b"o"),)
    if kind == "file":
        if seed % 40 == 0:
            data = r.randbytes(70_000)
        else:
            data = r.choice([b"", b"x", b"hello\n", r.randbytes(r.randrange(1, 300))])
        mode = r.choice([0o644, 0o755, 0o600, 0o4755])
        return Node("file", mode, data=data, mtime=mtime, xattrs=xattrs, **owner)
    if kind == "dir":
        mode = r.choice([0o755, 0o700, 0o1777, 0o750])
        return Node("dir", mode, mtime=mtime, xattrs=xattrs, **owner)
    if kind == "symlink":
        return Node("symlink", 0o777, linkname=r.choice(LINK_TARGETS), mtime=mtime, **owner)
    if kind == "char":
        return Node("char", 0o666, dev=r.choice([(0, 0), (1, 3)]), mtime=mtime, **owner)
    assert kind == "fifo"
    return Node("fifo", 0o600, mtime=mtime, **owner)


def member(path: str, node: Node, hardlink_to: str | None = None) -> tf.Member:
    kw: dict[str, Any] = {
        "mode": node.mode,
        "uid": node.uid,
        "gid": node.gid,
        "mtime": node.mtime,
        "pax": {f"SCHILY.xattr.{k}": v.decode() for k, v in node.xattrs},
    }
    if hardlink_to is not None:
        return tf.Member(path, tarfile.LNKTYPE, linkname=hardlink_to, **kw)
    if node.kind == "file":
        return tf.Member(path, tarfile.REGTYPE, node.data, **kw)
    if node.kind == "dir":
        return tf.Member(path + "/", tarfile.DIRTYPE, **kw)
    if node.kind == "symlink":
        return tf.Member(path, tarfile.SYMTYPE, linkname=node.linkname, **kw)
    if node.kind == "char":
        major, minor = node.dev
        return tf.Member(path, tarfile.CHRTYPE, devmajor=major, devminor=minor, **kw)
    return tf.Member(path, tarfile.FIFOTYPE, **kw)


def marker_member(kind: str, path: str) -> tf.Member:
    if kind == "opaque":
        return tf.file_(f"{path}/.wh..wh..opq" if path else ".wh..wh..opq", b"")
    parent, _, name = path.rpartition("/")
    return tf.file_(f"{parent}/.wh.{name}" if parent else f".wh.{name}", b"")


@dataclass
class LayerSpec:
    """A well-formed layer: its tar members (in tar order) and what the model needs."""

    members: list[tf.Member] = field(default_factory=list)
    whiteouts: list[str] = field(default_factory=list)
    opaques: list[str] = field(default_factory=list)
    # path -> the nodes declared there, in tar order (a hardlink as its target's node)
    declared: dict[str, list[tuple[str, Node]]] = field(default_factory=dict)

    def tar(self) -> bytes:
        return tf.py_tar(tarfile.PAX_FORMAT, members=self.members)


def hide(view: View, whiteouts: list[str], opaques: list[str]) -> View:
    """The view below with this layer's markers applied."""
    return {
        p: n
        for p, n in view.items()
        if not any(p == w or under(p, w) for w in whiteouts)
        and not any(under(p, d) for d in opaques)
    }


def make_layer(raw: list[Op], lower: View) -> LayerSpec:
    spec = LayerSpec()
    # Markers, judged against the view below: their directory must exist there (or be the root)
    # and not be removed by another marker of the layer.
    markers = []
    for kind, path, seed in raw:
        if kind == "whiteout":
            markers.append(("whiteout", path))
        elif kind == "opaque":
            markers.append(("opaque", "" if seed % 10 == 0 else path))

    def removed(d: str) -> bool:
        return any(
            (k == "whiteout" and (d == p or under(d, p))) or (k == "opaque" and under(d, p))
            for k, p in markers
        )

    def valid(kind: str, path: str) -> bool:
        d = posixpath.dirname(path) if kind == "whiteout" else path
        return d == "" or (d in lower and lower[d].kind == "dir" and not removed(d))

    kept = {m for m in markers if valid(*m)}
    spec.whiteouts = sorted(p for k, p in kept if k == "whiteout")
    spec.opaques = sorted(p for k, p in kept if k == "opaque")
    below = hide(lower, spec.whiteouts, spec.opaques)

    declared = spec.declared
    pinned: set[str] = set()  # hardlink targets: nothing else may be declared there
    lower_targets: set[str] = set()  # lower hardlink targets: no non-directory above them
    emitted: set[tuple[str, str]] = set()
    appended: list[tf.Member] = []  # explicit parent directories, written after their children

    def declared_kind(p: str) -> str | None:
        return declared[p][-1][1].kind if p in declared else None

    for kind, path, seed in raw:
        if kind in ("whiteout", "opaque"):
            m = ("opaque", "" if seed % 10 == 0 else path) if kind == "opaque" else (kind, path)
            if m in kept and m not in emitted:
                emitted.add(m)
                spec.members.append(marker_member(*m))
            continue
        if path in pinned or any(declared_kind(a) not in (None, "dir") for a in ancestors(path)):
            continue
        if kind != "dir" and (
            any(under(p, path) for p in declared) or any(under(t, path) for t in lower_targets)
        ):
            continue
        if path in declared and not (
            kind in DUPABLE and all(k in DUPABLE for k, _ in declared[path])
        ):
            continue
        if any(a in lower_targets for a in ancestors(path)):
            continue
        target = None
        if kind == "hardlink":
            same = [p for p, ds in declared.items() if [k for k, _ in ds] == ["file"]]
            down = [
                p
                for p, n in below.items()
                if n.kind == "file"
                and p not in declared
                and p != path
                and p not in ancestors(path)
                and not under(p, path)
                and all(declared_kind(a) in (None, "dir") for a in ancestors(p))
            ]
            candidates = sorted(set(same) | set(down))
            if not candidates:
                continue
            target = candidates[seed % len(candidates)]
            if target in declared:
                node = declared[target][0][1]
                event("hardlink to the same layer")
            else:
                node = below[target]
                lower_targets.add(target)
                event("hardlink to a lower layer")
            node = dataclasses.replace(node, layer=None)
            pinned.add(target)
        else:
            node = node_for(kind, seed)
        # A lower non-directory beneath which this layer adds entries is replaced by a directory.
        for a in ancestors(path):
            if a not in declared and a in below and below[a].kind != "dir":
                parent = node_for("dir", seed + 1)
                declared[a] = [("dir", parent)]
                appended.append(member(a, parent))
                event("lower non-directory replaced by a parent directory")
        declared.setdefault(path, []).append((kind, node))
        spec.members.append(member(path, node, hardlink_to=target))
    spec.members += appended
    return spec


# --------------------------------------------------------------------------------------------
# The reference model
# --------------------------------------------------------------------------------------------


def apply_layer(view: View, spec: LayerSpec, index: int) -> View:
    """DESIGN section 3, for one layer on top of ``view``."""
    v = hide(view, spec.whiteouts, spec.opaques)
    final = {p: ds[-1][1] for p, ds in spec.declared.items()}  # the last one wins
    for path in sorted(final, key=lambda p: p.count("/")):
        node = dataclasses.replace(final[path], layer=index)
        for a in ancestors(path):
            if a not in v:
                v[a] = IMPLICIT
            assert v[a].kind == "dir", "the generator keeps entries below directories"
        if node.kind == "dir" and path in v and v[path].kind == "dir":
            v[path] = node  # directories merge: the upper attributes, the lower children stay
        else:
            v = {p: n for p, n in v.items() if p != path and not under(p, path)}
            v[path] = node
    return v


def model_stack(raw_layers: list[list[Op]]) -> tuple[list[LayerSpec], View]:
    view: View = {}
    specs = []
    for i, raw in enumerate(raw_layers):
        spec = make_layer(raw, view)
        specs.append(spec)
        for p, ds in spec.declared.items():
            if len(ds) > 1:
                event("duplicate path in one layer")
            if any(p == w or under(p, w) for w in spec.whiteouts):
                event("entry beside its own whiteout")
            if p in view and view[p].kind != ds[-1][1].kind:
                event(f"{view[p].kind} replaced by {ds[-1][1].kind}")
            if p in view and view[p].kind == "dir" == ds[-1][1].kind:
                event("directory merge")
        for w in spec.whiteouts:
            event("whiteout hiding something" if w in view else "whiteout hiding nothing")
        for d in spec.opaques:
            event("opaque at the root" if d == "" else "opaque directory")
        view = apply_layer(view, spec, i)
    for n in view.values():
        if n.kind == "char" and n.dev == (0, 0):
            event("0:0 character device")
    if any(n.layer is None for n in view.values()):
        event("implicit directory")
    return specs, view


# --------------------------------------------------------------------------------------------
# Comparing the stack's view with the model's
# --------------------------------------------------------------------------------------------

Described = tuple[Any, ...]


def short(data: bytes) -> str:
    """Content in a form that keeps failure messages readable."""
    return repr(data) if len(data) <= 16 else f"sha256:{hashlib.sha256(data).hexdigest()[:16]}"


def describe(
    kind: str,
    mode: int,
    uid: int,
    gid: int,
    mtime_ns: int,
    xattrs: dict[str, bytes],
    layer: int | None,
    implicit: bool,
    extra: Any,
) -> Described:
    return (kind, mode, uid, gid, mtime_ns, sorted(xattrs.items()), layer, implicit, extra)


def model_view(view: View) -> dict[str, Described]:
    out = {}
    for path, n in view.items():
        extra: Any = None
        if n.kind == "file":
            extra = (len(n.data), short(n.data))
        elif n.kind == "symlink":
            extra = n.linkname
        elif n.kind == "char":
            extra = n.dev
        out["/" + path] = describe(
            n.kind,
            n.mode,
            n.uid,
            n.gid,
            n.mtime * 10**9,
            dict(n.xattrs),
            n.layer,
            n.layer is None,
            extra,
        )
    return out


def stack_view(stack: ls.Stack) -> dict[str, Described]:
    """The whole view of a stack through walk, listdir, stat(follow_symlinks=False), read_bytes."""
    out = {}
    for dirpath, dirnames, filenames in stack.walk():
        names = list(dirnames) + list(filenames)
        assert list(dirnames) == sorted(dirnames) and list(filenames) == sorted(filenames)
        assert sorted(names) == stack.listdir(dirpath), dirpath
        for name in names:
            path = posixpath.join(dirpath, name)
            info = stack.stat(path, follow_symlinks=False)
            assert info.path == path
            extra: Any = None
            if info.kind == "file":
                extra = (info.size, short(stack.read_bytes(path)))
            elif info.kind == "symlink":
                extra = info.linkname
            elif info.kind == "char":
                extra = (info.devmajor, info.devminor)
            out[path] = describe(
                info.kind,
                info.mode,
                info.uid,
                info.gid,
                info.mtime_ns,
                dict(info.xattrs),
                info.layer,
                info.implicit,
                extra,
            )
    return out


def assert_same_view(got: dict[str, Described], want: dict[str, Described]) -> None:
    problems = [f"missing {p}: {want[p]}" for p in sorted(set(want) - set(got))]
    problems += [f"extra {p}: {got[p]}" for p in sorted(set(got) - set(want))]
    problems += [
        f"differs {p}:\n    got  {got[p]}\n    want {want[p]}"
        for p in sorted(set(got) & set(want))
        if got[p] != want[p]
    ]
    assert not problems, "\n".join(problems)


def assert_lookups_agree(stack: ls.Stack, want: dict[str, Described]) -> None:
    """stat_many and exists over the namespace: None/False exactly where the model has nothing.

    Paths below a symlink of the view are left out: a lookup follows intermediate symlinks."""
    namespace = ["/" + "/".join(p) for n in (1, 2, 3) for p in itertools.product(NAMES, repeat=n)]
    namespace = [
        p
        for p in namespace
        if not any(want.get("/" + a, ("dir",))[0] == "symlink" for a in ancestors(p[1:]))
    ]
    got = stack.stat_many(namespace, follow_symlinks=False)
    for path, info in zip(namespace, got, strict=True):
        assert (info is not None) == (path in want), path
        assert stack.exists(path, follow_symlinks=False) == (path in want), path
        if info is not None:
            kind, mode, *_, layer, _implicit, _extra = want[path]
            assert (info.kind, info.mode, info.layer) == (kind, mode, layer), path


def assert_provenance(stack: ls.Stack, specs: list[LayerSpec]) -> None:
    """provenance(p): every layer with an entry at p, or a whiteout/opaque marker covering it."""
    for parts in (p for n in (1, 2, 3) for p in itertools.product(NAMES, repeat=n)):
        path = "/".join(parts)
        want: list[set[tuple[int, str]]] = []
        for i, spec in enumerate(specs):
            if path in spec.declared:
                want.append({(i, "entry")})
                continue
            marks = set()
            if any(path == w or under(path, w) for w in spec.whiteouts):
                marks.add((i, "whiteout"))
            if any(under(path, d) for d in spec.opaques):
                marks.add((i, "opaque"))
            if marks:  # covered by both: either name will do
                want.append(marks)
        got = sorted(stack.provenance("/" + path))
        assert len(got) == len(want) and all(g in w for g, w in zip(got, want, strict=True)), (
            path,
            got,
            want,
        )


# --------------------------------------------------------------------------------------------
# The properties
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ls.Store]:
    """One store for every example: importing a tar already there gives the same layer."""
    yield ls.Store(tmp_path_factory.mktemp("union-props") / "store")


def import_all(store: ls.Store, specs: list[LayerSpec]) -> list[ls.Layer]:
    return [store.import_tar(spec.tar()) for spec in specs]


PROPS = settings(
    max_examples=300,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@PROPS
@given(raw_layers=st.lists(layer_ops, min_size=1, max_size=5))
def test_union_view_matches_the_model(shared_store: ls.Store, raw_layers: list[list[Op]]) -> None:
    specs, view = model_stack(raw_layers)
    event(f"{len(specs)} layers")
    stack = shared_store.stack(import_all(shared_store, specs))
    want = model_view(view)
    assert_same_view(stack_view(stack), want)
    assert_lookups_agree(stack, want)
    assert_provenance(stack, specs)


@settings(PROPS, max_examples=100)
@given(raw_layers=st.lists(layer_ops, min_size=2, max_size=5))
def test_push_equals_stacking_all_layers(
    shared_store: ls.Store, raw_layers: list[list[Op]]
) -> None:
    specs, view = model_stack(raw_layers)
    layers = import_all(shared_store, specs)
    below = shared_store.stack(layers[:-1])
    below_view = stack_view(below)
    pushed = below.push(layers[-1])
    whole = shared_store.stack(layers)
    chained = shared_store.stack(layers[:1])
    for layer in layers[1:]:
        chained = chained.push(layer)
    assert pushed.chain_id == whole.chain_id == chained.chain_id
    want = model_view(view)
    assert_same_view(stack_view(pushed), want)
    assert_same_view(stack_view(whole), want)
    assert_same_view(stack_view(chained), want)
    assert stack_view(below) == below_view, "push changed the stack it was called on"


def test_model_sanity(tmp_path: Path) -> None:
    """The model itself on a hand-written case (so a model bug is not blamed on the store)."""
    raw: list[list[Op]] = [
        [("dir", "a", 1), ("file", "a/b", 2), ("file", "a/c", 3), ("file", "b", 4)],
        [("whiteout", "a/b", 0), ("opaque", "a", 1), ("file", "a/d", 5), ("dir", "b", 6)],
        [("file", "a", 7), ("hardlink", "c", 0)],
    ]
    specs, view = model_stack(raw)
    assert sorted(view) == ["a", "b", "c"]
    assert view["a"].kind == "file" and view["a"].layer == 2
    assert view["b"].kind == "dir" and view["b"].layer == 1
    assert view["c"].kind == "file" and view["c"].data == node_for("file", 7).data
    mid = apply_layer(apply_layer({}, specs[0], 0), specs[1], 1)
    assert sorted(mid) == ["a", "a/d", "b"]
    store = ls.Store(tmp_path / "store")
    stack = store.stack(import_all(store, specs))
    assert_same_view(stack_view(stack), model_view(view))
