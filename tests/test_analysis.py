"""Image analysis on hand-built images whose waste is known exactly.

Every image here is made of real tars (``tarfile``) imported into a store with small chunks, so
near-duplicates share whole chunks. dive's score is checked against an independent
implementation of dive's formula over the tars themselves (:func:`dive_figures`).
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import layerstore as ls
import pytest

CLI = (sys.executable, "-m", "layerstore")


@dataclass
class M:
    """One tar member: a file (``data``), a directory, a hardlink or symlink (``link``)."""

    name: str
    data: bytes = b""
    kind: str = "file"
    mode: int = 0o644
    uid: int = 0
    link: str = ""
    xattrs: dict[str, str] = field(default_factory=dict)


def tar(members: Iterable[M]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.mode, info.uid, info.mtime = m.mode, m.uid, 1_600_000_000
            info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in m.xattrs.items()}
            if m.kind == "dir":
                info.type = tarfile.DIRTYPE
                t.addfile(info)
            elif m.kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, m.link
                t.addfile(info)
            elif m.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, m.link
                t.addfile(info)
            else:
                info.size = len(m.data)
                t.addfile(info, io.BytesIO(m.data))
    return buf.getvalue()


def wh(path: str) -> M:
    """A whiteout of ``path``."""
    d, _, name = path.rpartition("/")
    return M(f"{d}/.wh.{name}" if d else f".wh.{name}")


def blob(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def store(tmp_path: Path) -> ls.Store:
    # Small chunks: a few KiB of shared content is several whole chunks.
    return ls.Store(tmp_path / "store", chunk_min=64, chunk_avg=256, chunk_max=1024)


def image(store: ls.Store, layers: Sequence[Sequence[M]], tag: str = "img:1") -> ls.Stack:
    stack = store.stack([store.import_tar(tar(layer)) for layer in layers])
    store.tag(stack, tag)
    return stack


def waste(a: ls.Analysis, kind: str) -> int:
    return a["waste"]["totals"][kind]["bytes"]  # type: ignore[index]


def only_waste(a: ls.Analysis, **expected: int) -> None:
    """The waste totals are exactly ``expected`` (bytes by kind), every other kind 0."""
    kinds = ("metadata_only", "shadowed", "deleted", "duplicate", "near_duplicate")
    got = {k: waste(a, k) for k in kinds}
    assert got == {k: expected.get(k, 0) for k in kinds}
    assert a["image"]["wastedBytes"] == sum(expected.values())


# ---------------------------------------------------------------------------------------------
# An independent dive: its formula over the tars, as dive reads them.


def dive_figures(layers: Sequence[bytes]) -> tuple[float, int, int]:
    """(efficiency score, wasted bytes, user size) as dive computes them from layer tars."""
    trees: list[dict[str, tarfile.TarInfo]] = []
    for raw in layers:
        with tarfile.open(fileobj=io.BytesIO(raw)) as t:
            tree = {m.name.strip("/"): m for m in t.getmembers()}
        # dive never adds an opaque marker to its tree.
        trees.append(
            {p: m for p, m in tree.items() if not p.rpartition("/")[2].startswith(".wh..wh..")}
        )

    def lower_view(k: int) -> dict[str, tuple[bool, int]]:
        view: dict[str, tuple[bool, int]] = {}
        for tree in trees[:k]:
            for p, m in sorted(tree.items()):
                d, _, name = p.rpartition("/")
                if name.startswith(".wh."):
                    gone = f"{d}/{name[4:]}" if d else name[4:]
                    for q in [q for q in view if q == gone or q.startswith(gone + "/")]:
                        del view[q]
                else:
                    view[p] = (m.isdir(), m.size)
        return view

    paths: dict[str, list[int]] = {}
    sizes = []
    for k, tree in enumerate(trees):
        sizes.append(sum(m.size for m in tree.values()))
        parents = {p.rsplit("/", i)[0] for p in tree for i in range(1, p.count("/") + 1)}
        for p, m in tree.items():
            if p in parents:
                continue
            d, _, name = p.rpartition("/")
            if name.startswith(".wh."):
                hidden = f"{d}/{name[4:]}" if d else name[4:]
                view = lower_view(k)
                size = 0
                if view.get(hidden, (False, 0))[0]:
                    size = sum(
                        s for q, (_, s) in view.items() if q == hidden or q.startswith(hidden + "/")
                    )
                paths.setdefault(hidden, []).append(size)
            else:
                paths.setdefault(p, []).append(m.size)
    smallest = sum(min(v) for v in paths.values())
    total = sum(sum(v) for v in paths.values())
    wasted = sum(sum(v) for v in paths.values() if len(v) > 1)
    return (smallest / total if total else 1.0), wasted, sum(sizes[1:])


def check_dive(store: ls.Store, layers: Sequence[Sequence[M]]) -> ls.Analysis:
    a = store.analyze(image(store, layers, tag="dive:check"))
    score, wasted, user = dive_figures([tar(layer) for layer in layers])
    assert a["image"]["efficiencyScore"] == pytest.approx(score, abs=1e-12)
    assert a["image"]["inefficientBytes"] == wasted
    assert a["image"]["userSizeBytes"] == user
    return a


# ---------------------------------------------------------------------------------------------
# Waste of each kind, exactly


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"mode": 0o755}, "mode 644→755"),
        ({"uid": 1000}, "owner 0:0→1000:0"),
        ({"xattrs": {"security.capability": "cap"}}, "capabilities"),
    ],
)
def test_a_metadata_only_layer_wastes_one_whole_copy_and_says_what_changed(
    store: ls.Store, change: dict[str, object], words: str
) -> None:
    data = blob(1, 5000)
    layers = [[M("usr", kind="dir"), M("usr/tool", data)], [M("usr/tool", data, **change)]]  # type: ignore[arg-type]
    a = check_dive(store, layers)
    only_waste(a, metadata_only=5000)
    (item,) = a["waste"]["items"]
    assert (item["path"], item["layers"], item["bytes"]) == ("/usr/tool", [0, 1], 5000)
    assert words in item["reason"]
    assert a["layer"][1]["metadataOnly"] == 1
    assert a["layer"][1]["filesModified"] == 0
    assert a["layer"][0]["wastedBytes"] == 5000
    assert (a["layer"][0]["causedWasteBytes"], a["layer"][1]["causedWasteBytes"]) == (0, 5000)
    assert a["image"]["efficiency"] == pytest.approx(0.5)


def test_a_container_chmod_commit_is_metadata_only_with_its_created_by(store: ls.Store) -> None:
    base = image(store, [[M("bin/app", blob(2, 3000))]])
    with base.container() as c:
        c.chmod("/bin/app", 0o700)
        top = c.commit(created_by="RUN chmod 700 /bin/app")
    a = store.analyze(base.push(top))
    only_waste(a, metadata_only=3000)
    assert a["layer"][1]["command"] == "RUN chmod 700 /bin/app"
    assert a["layer"][1]["createdBy"] == "RUN chmod 700 /bin/app"
    assert a["layer"][0]["createdBy"] is None


def test_a_containers_uncommitted_view_is_refused(store: ls.Store) -> None:
    base = image(store, [[M("f", blob(35, 100))]])
    with base.container() as c:
        c.write_bytes("/g", b"new")
        with pytest.raises(ValueError, match="container's view"):
            store.analyze(c.view())
        with pytest.raises(ValueError, match="container's view"):
            store.compare(base, c.view())


def test_a_file_deleted_then_recreated_wastes_only_the_deleted_copy(store: ls.Store) -> None:
    data = blob(3, 3000)
    a = check_dive(store, [[M("etc/a", data)], [wh("etc/a")], [M("etc/a", data)]])
    only_waste(a, deleted=3000)
    (item,) = a["waste"]["items"]
    assert (item["layers"], item["otherPath"]) == ([0, 1], "/etc/.wh.a")
    assert (a["layer"][1]["filesDeleted"], a["layer"][1]["bytesDeleted"]) == (1, 3000)
    assert a["layer"][1]["whiteouts"] == 1
    assert a["layer"][2]["filesAdded"] == 1
    assert a["image"]["liveBytes"] == 3000


def test_a_hardlink_is_not_a_second_copy(store: ls.Store) -> None:
    a = check_dive(
        store,
        [
            [
                M("a", blob(4, 4000)),
                M("b", kind="hardlink", link="a"),
                M("c", kind="symlink", link="a"),
            ]
        ],
    )
    only_waste(a)
    assert a["image"]["liveFiles"] == 1
    assert a["image"]["shippedBytes"] == 4000


def test_a_whiteout_of_a_directory_deletes_everything_below_it(store: ls.Store) -> None:
    layers = [
        [
            M("d", kind="dir"),
            M("d/x", blob(5, 1000)),
            M("d/y", blob(6, 2000)),
            M("d/sub", kind="dir"),
            M("d/sub/z", blob(7, 500)),
            M("keep", blob(8, 100)),
        ],
        [wh("d")],
    ]
    a = check_dive(store, layers)
    only_waste(a, deleted=3500)
    assert a["waste"]["totals"]["deleted"]["count"] == 3
    assert (a["layer"][1]["filesDeleted"], a["layer"][1]["bytesDeleted"]) == (3, 3500)
    # dive sizes the whiteout as the whole directory it removes, and /d was no leaf below.
    assert a["image"]["efficiencyScore"] == 1.0


def test_dive_sizes_a_directory_whiteout_as_the_directory_it_removes(store: ls.Store) -> None:
    # /d is seen twice by dive: as the whiteout of a 1000-byte directory, then as a 10-byte file.
    a = check_dive(
        store, [[M("d", kind="dir"), M("d/x", blob(31, 1000))], [wh("d")], [M("d", b"0123456789")]]
    )
    assert a["image"]["inefficientBytes"] == 1010
    assert a["image"]["efficiencyScore"] == pytest.approx(1010 / 2010)
    only_waste(a, deleted=1000)
    assert a["layer"][2]["filesAdded"] == 1


def test_an_opaque_directory_deletes_the_lower_children_only(store: ls.Store) -> None:
    layers = [
        [M("d", kind="dir"), M("d/x", blob(9, 700)), M("d/y", blob(10, 300))],
        [M("d", kind="dir"), M("d/.wh..wh..opq"), M("d/new", blob(11, 50))],
    ]
    a = check_dive(store, layers)
    only_waste(a, deleted=1000)
    assert a["layer"][1]["opaques"] == 1
    assert a["layer"][1]["filesAdded"] == 1


def test_content_replaced_later_is_shadowed(store: ls.Store) -> None:
    a = check_dive(store, [[M("f", blob(12, 2500))], [M("f", blob(13, 2600))]])
    only_waste(a, shadowed=2500)
    assert (a["layer"][1]["filesModified"], a["layer"][1]["bytesModified"]) == (1, 2600)


def test_identical_content_at_other_paths_and_layers_counts_once_per_extra_copy(
    store: ls.Store,
) -> None:
    data = blob(14, 2000)
    a = check_dive(store, [[M("a", data), M("b", data)], [M("c", data), M("d", blob(15, 10))]])
    only_waste(a, duplicate=4000)
    items = sorted((i["path"], i["otherPath"], i["layers"]) for i in a["waste"]["items"])
    assert items == [("/b", "/a", [0, 0]), ("/c", "/a", [1, 0])]


def test_the_same_file_shipped_again_unchanged_is_a_duplicate(store: ls.Store) -> None:
    data = blob(16, 1200)
    a = check_dive(store, [[M("f", data)], [M("f", data)]])
    only_waste(a, duplicate=1200)


def test_near_duplicates_are_the_chunks_the_store_keeps_once(store: ls.Store) -> None:
    first = blob(17, 40_000)
    second = first[:30_000] + blob(18, 10_000)
    l0 = store.import_tar(tar([M("v1", first)]))
    before = store.stats()["content_bytes"]
    l1 = store.import_tar(tar([M("v2", second)]))
    new = store.stats()["content_bytes"] - before
    shared = len(second) - new
    assert 20_000 < shared <= 30_000  # the chunking really shared most of the prefix
    a = store.analyze(store.stack([l0, l1]))
    only_waste(a, near_duplicate=shared)
    (item,) = a["waste"]["items"]
    assert (item["path"], item["otherPath"], item["layers"]) == ("/v2", "/v1", [1, 0])


def test_each_kind_at_once_and_nothing_counted_twice(store: ls.Store) -> None:
    same, big = blob(19, 3000), blob(20, 9000)
    layers = [
        [M("a", same), M("gone", blob(21, 800)), M("old", blob(22, 600)), M("big", big)],
        [
            M("a", same, mode=0o600),
            wh("gone"),
            M("old", blob(23, 50)),
            M("dup", same),
            M("big2", big[:6000] + blob(24, 3000)),
        ],
    ]
    a = check_dive(store, layers)
    kinds = a["waste"]["totals"]
    assert kinds["metadata_only"]["bytes"] == 3000
    assert kinds["deleted"]["bytes"] == 800
    assert kinds["shadowed"]["bytes"] == 600
    assert kinds["duplicate"]["bytes"] == 3000  # "dup" equals the live "a" of layer 1
    assert 0 < kinds["near_duplicate"]["bytes"] <= 6000
    assert a["image"]["wastedBytes"] == sum(k["bytes"] for k in kinds.values())
    assert a["image"]["wastedBytes"] <= a["image"]["shippedBytes"]
    assert sum(layer["wastedBytes"] for layer in a["layer"]) == a["image"]["wastedBytes"]
    assert sum(layer["causedWasteBytes"] for layer in a["layer"]) == a["image"]["wastedBytes"]
    # Layer 1 causes all of it: the chmod, the deletion, the rewrite, the copies it ships.
    assert a["layer"][1]["causedWasteBytes"] == a["image"]["wastedBytes"]


def random_layers(seed: int) -> list[list[M]]:
    """A few layers over a small namespace (directories d, d/e fixed; files at the leaves):
    new files, rewrites, chmod-only copies, identical content at other paths, whiteouts of
    files and directories the lower layers show."""
    rng = random.Random(seed)
    pool = [blob(1000 + i, rng.randrange(300, 3000)) for i in range(4)]
    names = ["a", "b", "d/x", "d/y", "d/e/z", "d/e/w"]
    shown: dict[str, bytes] = {}
    layers: list[list[M]] = []
    for _ in range(rng.randrange(2, 6)):
        layer: list[M] = [M("d", kind="dir"), M("d/e", kind="dir")] if not layers else []
        for name in rng.sample(names, rng.randrange(1, 5)):
            action = rng.random()
            if action < 0.2 and name in shown:
                layer.append(wh(name))
                del shown[name]
            elif action < 0.35 and name in shown:
                layer.append(M(name, shown[name], mode=0o700))
            else:
                shown[name] = rng.choice(pool)
                layer.append(M(name, shown[name]))
        if layers and rng.random() < 0.15 and any(n.startswith("d/e/") for n in shown):
            layer = [m for m in layer if not m.name.startswith("d/")] + [wh("d/e")]
            for n in [n for n in shown if n.startswith("d/e/")]:
                del shown[n]
        layers.append(layer)
    return layers


@pytest.mark.parametrize("seed", range(25))
def test_random_images_match_dive_and_account_for_every_byte(store: ls.Store, seed: int) -> None:
    layers = random_layers(seed)
    a = check_dive(store, layers)
    img = store.get("dive:check")
    live = sum(
        img.stat(os.path.join(top, f)).size
        for top, _, files in img.walk("/")
        for f in files
        if img.stat(os.path.join(top, f)).kind == "file"
    )
    shipped = 0
    for layer in layers:
        last = {m.name: m for m in layer}
        shipped += sum(len(m.data) for m in last.values() if m.kind == "file")
    assert a["image"]["liveBytes"] == live
    assert a["image"]["shippedBytes"] == shipped
    totals = a["waste"]["totals"]
    assert a["image"]["wastedBytes"] == sum(t["bytes"] for t in totals.values()) <= shipped
    dead = sum(
        i["bytes"]
        for i in a["waste"]["items"]
        if i["kind"] in ("metadata_only", "shadowed", "deleted")
        or (i["kind"] == "duplicate" and i["otherPath"] is None)
    )
    assert dead == shipped - live
    for key in ("wastedBytes", "causedWasteBytes"):
        assert sum(layer[key] for layer in a["layer"]) == a["image"]["wastedBytes"]  # type: ignore[literal-required]


def test_the_typed_shapes_are_the_reports_shapes(store: ls.Store) -> None:
    from layerstore import _analysis as t

    data = blob(36, 500)
    img = image(store, [[M("a", data), M("b", data)], [wh("a"), M("c", blob(37, 9))]])
    a = store.analyze(img, files=True)
    assert set(a) == set(t.Analysis.__annotations__)
    assert set(a["image"]) == set(t.ImageAnalysis.__annotations__)
    for layer in a["layer"]:
        assert set(layer) == set(t.LayerAnalysis.__annotations__)
    assert set(a["waste"]) == set(t.WasteReport.__annotations__)
    assert set(a["waste"]["totals"]) == set(t.WasteKind.__args__)  # type: ignore[attr-defined]
    for item in a["waste"]["items"]:
        assert set(item) == set(t.WasteItem.__annotations__)
    for row in a["files"]:
        assert set(row) == set(t.FileRow.__annotations__)
        for touch in row["history"]:
            assert set(touch) == set(t.Touch.__annotations__)
    assert "files" not in store.analyze(img)
    c = store.compare(img, img)
    assert set(c) == set(t.Comparison.__annotations__)
    assert set(c["update"]) == set(t.UpdateCost.__annotations__)


# ---------------------------------------------------------------------------------------------
# Across images


def test_compare_counts_shared_layers_files_and_chunks(store: ls.Store) -> None:
    base = [M("lib/a", blob(25, 5000)), M("lib/b", blob(26, 3000))]
    old = image(store, [base, [M("app", blob(27, 8000))]], tag="app:1")
    l0 = store.import_tar(tar(base))
    l1 = store.import_tar(
        tar([M("app", blob(27, 8000)[:6000] + blob(28, 2000)), M("x", blob(26, 3000))])
    )
    new = store.stack([l0, l1])
    c = store.compare(old, new)
    assert c["sharedLayers"] == [0]
    assert c["sharedLayerBytes"] == l0.size
    u = c["update"]
    assert (u["layers"], u["layerBytes"]) == (1, l1.size)
    # "x" has lib/b's content: only "app" is a new file.
    assert (u["files"], u["fileBytes"]) == (1, 8000)
    assert 0 < u["chunkBytes"] < 8000
    assert c["bChunkBytes"] == c["sharedChunkBytes"] + u["chunkBytes"]


# ---------------------------------------------------------------------------------------------
# The command line: --json, CI rules


def cli(store: ls.Store, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LAYERSTORE_HOME"}
    return subprocess.run(
        [*CLI, "--store", str(store.path), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        check=False,
    )


@pytest.fixture
def wasteful(store: ls.Store) -> ls.Store:
    """A chmod-only layer over a 5000-byte file: dive sees /tool twice (10000 bytes, smallest
    5000) and /base once (1000), so its efficiency is 6000/11000 and all 10000 user bytes are
    wasted."""
    data = blob(29, 5000)
    image(store, [[M("base", blob(30, 1000))], [M("tool", data)], [M("tool", data, mode=0o755)]])
    return store


def test_json_is_a_superset_of_dives_fields(wasteful: ls.Store) -> None:
    res = cli(wasteful, "analyze", "img:1", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc == wasteful.analyze(wasteful.get("img:1"))
    for layer in doc["layer"]:
        assert {"index", "id", "digestId", "sizeBytes", "command"} <= layer.keys()
    assert {"sizeBytes", "inefficientBytes", "efficiencyScore", "fileReference"} <= doc[
        "image"
    ].keys()
    (ref,) = doc["image"]["fileReference"]
    assert ref == {"count": 2, "sizeBytes": 10000, "file": "/tool"}
    assert doc["image"]["sizeBytes"] == 11000
    assert doc["image"]["userWastedPercent"] == 1.0


def test_ci_rules_from_a_file_fail_with_one_line_per_broken_rule(
    wasteful: ls.Store, tmp_path: Path
) -> None:
    rules = tmp_path / ".dive-ci"
    rules.write_text(
        "rules:\n  lowestEfficiency: 0.95\n  highestWastedBytes: 9KB  # 9000\n"
        "  highestUserWastedPercent: disabled\n"
    )
    res = cli(wasteful, "analyze", "img:1", "--ci", str(rules))
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("FAIL: highestWastedBytes")
    assert lines[1].startswith("FAIL: lowestEfficiency")
    # The same file found in the working directory by a bare --ci.
    assert cli(wasteful, "analyze", "img:1", "--ci", cwd=tmp_path).returncode == 1


@pytest.mark.parametrize(
    ("flags", "status", "broken"),
    [
        (["--lowestEfficiency", "0.545", "--highestUserWastedPercent", "1"], 0, 0),
        (["--lowestEfficiency", "0.546", "--highestUserWastedPercent", "1"], 1, 1),
        (
            [
                "--lowest-efficiency",
                "0",
                "--highestWastedBytes",
                "10000",
                "--highest-user-wasted-percent",
                "1",
            ],
            0,
            0,
        ),
        (["--lowest-efficiency", "0", "--highestWastedBytes", "9999"], 1, 2),
        (["--lowest-efficiency", "disabled", "--highestUserWastedPercent", "0.99"], 1, 1),
    ],
)
def test_ci_rule_flags_and_exit_codes(
    wasteful: ls.Store, flags: list[str], status: int, broken: int
) -> None:
    # dive's figures here: efficiency 6000/11000 = 0.5454…, wasted 10000, user wasted 100%.
    res = cli(wasteful, "analyze", "img:1", *flags)
    assert res.returncode == status, res.stderr
    assert len([x for x in res.stderr.splitlines() if x.startswith("FAIL: ")]) == broken


def test_the_text_report_names_every_kind_and_the_largest_waste(wasteful: ls.Store) -> None:
    res = cli(wasteful, "analyze", "img:1")
    assert res.returncode == 0, res.stderr
    for kind in ("metadata_only", "shadowed", "deleted", "duplicate", "near_duplicate"):
        assert kind in res.stdout
    assert "/tool" in res.stdout


def test_an_oci_layout_is_analysed_with_its_compressed_layer_sizes(
    store: ls.Store, tmp_path: Path
) -> None:
    img = image(store, [[M("a", blob(32, 4000))], [M("a", blob(32, 4000), mode=0o700)]])
    layout = tmp_path / "layout"
    store.export_oci(img, layout, tag="v1", compression="gzip")
    fresh = ls.Store(tmp_path / "fresh")
    res = cli(fresh, "analyze", str(layout), "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    blobs = {p.name: p.stat().st_size for p in (layout / "blobs" / "sha256").iterdir()}
    manifest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    layers = json.loads((layout / "blobs" / "sha256" / manifest.split(":")[1]).read_text())[
        "layers"
    ]
    assert [layer["compressedBytes"] for layer in doc["layer"]] == [
        blobs[d["digest"].split(":")[1]] for d in layers
    ]
    assert doc["image"]["compressedBytes"] == sum(blobs[d["digest"].split(":")[1]] for d in layers)
    assert doc["waste"]["totals"]["metadata_only"]["bytes"] == 4000


def test_compare_on_the_command_line(store: ls.Store) -> None:
    base = [M("lib/a", blob(33, 5000))]
    image(store, [base], tag="app:1")
    image(store, [base, [M("app", blob(34, 3000))]], tag="app:2")
    res = cli(store, "compare", "app:1", "app:2", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc == store.compare(store.get("app:1"), store.get("app:2"))
    assert (doc["sharedLayers"], doc["update"]["layers"], doc["update"]["fileBytes"]) == (
        [0],
        1,
        3000,
    )
    text = cli(store, "compare", "app:1", "app:2")
    assert "as chunks" in text.stdout


# ---------------------------------------------------------------------------------------------
# The HTML report, in headless Chromium

CHROMIUM = shutil.which("chromium")


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGBA/RGB pixels) of an 8-bit PNG, decoded here (no imaging
    library needed)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, head = 8, b"", b""
    while pos < len(data):
        n = struct.unpack(">I", data[pos : pos + 4])[0]
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        if kind == b"IHDR":
            head = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    width, height, depth, colour = struct.unpack(">IIBB", head[:10])
    assert depth == 8 and colour in (2, 6)
    bpp = 4 if colour == 6 else 3
    raw, stride, rows = zlib.decompress(idat), width * bpp, []
    prev = bytearray(stride)
    for y in range(height):
        f, line = (
            raw[y * (stride + 1)],
            bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]),
        )
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, bpp, rows


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_the_html_report_renders_the_jsons_numbers_without_errors(
    store: ls.Store, tmp_path: Path
) -> None:
    same = blob(40, 3000)
    image(
        store,
        [
            [M("etc", kind="dir"), M("etc/a", same), M("usr/bin/tool", blob(41, 20_000))],
            [M("etc/a", same, mode=0o600), wh("usr/bin/tool"), M("opt/app", blob(42, 9000))],
        ],
    )
    page = tmp_path / "report.html"
    res = cli(store, "analyze", "img:1", "--json", "--html", str(page))
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    text = page.read_text()
    # Nothing is fetched at view time: no external script, style, image or request.
    assert not re.search(r"""(src|href)=["']?https?:|url\(|@import|fetch\(|XMLHttpRequest""", text)
    chrome = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run(
        [*chrome, "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert console == [], console
    assert 'data-rendered="yes"' in dom.stdout, "the page's script did not run to its end"
    shown = dict(re.findall(r'data-key="([^"]+)"[^>]*>([^<]*)<', dom.stdout))
    assert shown["image.wastedBytes"] == f"{doc['image']['wastedBytes']:,}"
    assert shown["image.inefficientBytes"] == f"{doc['image']['inefficientBytes']:,}"
    assert shown["image.efficiencyScore"] == f"{doc['image']['efficiencyScore']:.6f}"
    assert shown["image.efficiency"] == f"{doc['image']['efficiency']:.6f}"
    for kind, total in doc["waste"]["totals"].items():
        assert shown[f"waste.totals.{kind}.bytes"] == f"{total['bytes']:,}"
    for layer in doc["layer"]:
        assert shown[f"layer.{layer['index']}.wastedBytes"] == f"{layer['wastedBytes']:,}"
        assert shown[f"layer.{layer['index']}.causedWasteBytes"] == f"{layer['causedWasteBytes']:,}"
    # Every file of the view is in the tree the page draws from, with its history.
    assert [f["path"] for f in doc["files"]] == ["/etc/a", "/opt/app"]
    assert doc["files"][0]["history"] == [
        {"layer": 0, "touch": "entry"},
        {"layer": 1, "touch": "entry"},
    ]

    shot = tmp_path / "shot.png"
    subprocess.run(
        [*chrome, f"--screenshot={shot}", "--window-size=1000,1400", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    width, bpp, rows = png_pixels(shot.read_bytes())
    pixels = [row[i : i + 3] for row in rows[::4] for i in range(0, width * bpp, bpp * 4)]
    colours = set(pixels)
    not_white = sum(p != b"\xff\xff\xff" for p in pixels) / len(pixels)
    assert len(colours) > 20, "the screenshot is (nearly) one colour"
    assert not_white > 0.05, f"only {not_white:.1%} of the screenshot is not white"
