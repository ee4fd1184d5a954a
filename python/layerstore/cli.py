"""The ``layerstore`` command line: a thin shell over :class:`layerstore.Store`.

Every command prints human-readable text by default, or exactly one JSON document on stdout with
``--json``. Errors are one line on stderr (``layerstore: error: ...``) and exit code 1; usage
errors exit 2 (argparse's convention); Ctrl-C exits 130. A progress bar (tqdm, when installed)
is drawn on stderr during imports and exports, only when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import base64
import importlib
import io
import json
import os
import stat
import sys
import tarfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, NoReturn, TextIO, cast

import layerstore as ls
from layerstore._analysis import evaluate_rules, read_rules

PROG = "layerstore"

#: Exit codes besides 0 (success) and 2 (usage error, from argparse).
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process killed by Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader went away (``layerstore export L - | head``)


class CliError(Exception):
    """An error the CLI itself detects; printed as one line, exit code 1."""


def default_store_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$LAYERSTORE_HOME``, else ``$XDG_DATA_HOME/layerstore``, else ``~/.local/share/layerstore``.

    An empty or relative ``XDG_DATA_HOME`` is ignored, as the XDG base-directory spec says.
    """
    env = os.environ if environ is None else environ
    home = env.get("LAYERSTORE_HOME")
    if home:
        return Path(home)
    xdg = env.get("XDG_DATA_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "layerstore"
    return Path.home() / ".local" / "share" / "layerstore"


# ---------------------------------------------------------------------------------------------
# Formatting helpers


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, as du -h and ls -lh use)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def short_digest(digest: str, n: int = 12) -> str:
    """'blake3:0123456789abcdef…' -> '0123456789ab' (a prefix `layer()` accepts)."""
    return digest.split(":", 1)[-1][:n]


def format_time(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(unix))


def _text(name: str | os.PathLike[str] | None) -> str:
    """A member name, user name or link target as text (surrogate escapes for non-UTF-8)."""
    return "" if name is None else os.fsdecode(name)


_KIND_TYPE_BITS = {
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}


def mode_string(entry: ls.Entry) -> str:
    """The ``-rwxr-xr-x`` column of ``tar -tv`` (hardlinks show as ``h``, as GNU tar does)."""
    text = stat.filemode(_KIND_TYPE_BITS.get(entry.kind, stat.S_IFREG) | entry.mode)
    return ("h" + text[1:]) if entry.kind == "hardlink" else text


def listing_line(entry: ls.Entry, size_width: int) -> str:
    """One line of ``tar -tv``-style output for an entry."""
    owner = f"{_text(entry.uname) or entry.uid}/{_text(entry.gname) or entry.gid}"
    size = f"{entry.devmajor},{entry.devminor}" if entry.kind in ("char", "block") else entry.size
    path = _text(entry.path)
    if entry.kind == "dir" and not path.endswith("/"):
        path += "/"
    if entry.kind == "symlink":
        path += f" -> {_text(entry.linkname)}"
    elif entry.kind == "hardlink":
        path += f" link to {_text(entry.linkname)}"
    elif entry.kind in ("whiteout", "opaque"):
        path += f" ({entry.kind})"
    when = format_time(entry.mtime_ns / 1e9)
    return f"{mode_string(entry)} {owner:<17} {size:>{size_width}} {when} {path}"


def layer_json(layer: ls.Layer) -> dict[str, Any]:
    return {
        "id": layer.id,
        "diff_id": layer.diff_id,
        "tree_id": layer.tree_id,
        "size": layer.size,
        "entry_count": layer.entry_count,
        "compressed_digest": layer.compressed_digest,
        "compression": layer.compression,
        "created": layer.created,
    }


def entry_json(entry: ls.Entry) -> dict[str, Any]:
    return {
        "path": _text(entry.path),
        "kind": entry.kind,
        "typeflag": entry.typeflag,
        "mode": entry.mode,
        "uid": entry.uid,
        "gid": entry.gid,
        "uname": _text(entry.uname),
        "gname": _text(entry.gname),
        "size": entry.size,
        "mtime_ns": entry.mtime_ns,
        "linkname": None if entry.linkname is None else _text(entry.linkname),
        "devmajor": entry.devmajor,
        "devminor": entry.devminor,
        # xattr values are arbitrary bytes: base64, like getfattr's "0s" encoding.
        "xattrs": {_text(k): base64.b64encode(v).decode("ascii") for k, v in entry.xattrs.items()},
        "digest": entry.digest,
        "chunk_count": entry.chunk_count,
        "sparse": entry.sparse,
    }


def print_json(doc: object, out: TextIO | None = None) -> None:
    # ensure_ascii keeps non-UTF-8 names (surrogate escapes) representable.
    stream = sys.stdout if out is None else out
    json.dump(doc, stream, indent=2, ensure_ascii=True)
    stream.write("\n")


def print_table(rows: Sequence[Sequence[str]], right: frozenset[int] = frozenset()) -> None:
    """Columns padded to the widest cell; column indices in `right` are right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        print("  ".join(cells).rstrip())


# ---------------------------------------------------------------------------------------------
# Progress


@contextmanager
def progress_bar(
    description: str, total: int | None, enabled: bool
) -> Iterator[Callable[[int], None] | None]:
    """Yield a ``progress(bytes_done)`` callback drawing a tqdm bar on stderr, or None.

    tqdm is optional: without it (or without a terminal) there is no bar.
    """
    if not enabled or sys.stderr is None or not sys.stderr.isatty():
        yield None
        return
    try:
        tqdm_module = importlib.import_module("tqdm")
    except ImportError:
        yield None
        return
    bar = tqdm_module.tqdm(
        total=total,
        desc=description,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
    )
    last = 0

    def update(done: int) -> None:
        nonlocal last
        if done > last:
            bar.update(done - last)
            last = done

    try:
        yield update
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------------
# Commands


def open_store(args: argparse.Namespace, *, create: bool = False) -> ls.Store:
    path: Path = args.store
    if not create and not (path / "meta.db").exists():
        raise CliError(
            f"no store at {path} (use --store DIR or $LAYERSTORE_HOME; '{PROG} import' creates one)"
        )
    return ls.Store(path)


def cmd_import(args: argparse.Namespace) -> int:
    if args.src.count("-") > 1:
        raise CliError("standard input ('-') can be imported only once")
    store = open_store(args, create=True)
    results: list[dict[str, Any]] = []
    for src in args.src:
        if src == "-":
            if sys.stdin is None:
                raise CliError("no standard input to read a tar from")
            if sys.stdin.isatty():
                raise CliError("refusing to read a tar from a terminal (pipe one into '-')")
            with progress_bar("stdin", None, args.progress) as progress:
                layer = store.import_tar(sys.stdin.buffer, progress=progress)
        elif os.path.isdir(src) and os.path.isfile(os.path.join(src, "oci-layout")):
            with progress_bar(os.path.basename(src) or src, None, args.progress) as progress:
                images = store.import_oci(src, platform=args.platform, progress=progress)
            results.append(_report_images(src, images, args.json))
            continue
        elif os.path.isdir(src):
            with progress_bar(os.path.basename(src) or src, None, args.progress) as progress:
                layer = store.import_dir(
                    src, exclude_xattrs=list(args.exclude_xattr), progress=progress
                )
        elif is_docker_archive(src):
            with progress_bar(os.path.basename(src), None, args.progress) as progress:
                images = store.import_docker_archive(src, progress=progress)
            results.append(_report_images(src, images, args.json))
            continue
        else:
            total = _plain_size(src)
            with progress_bar(os.path.basename(src), total, args.progress) as progress:
                layer = store.import_tar(src, progress=progress)
        if args.json:
            results.append({"source": src, **layer_json(layer)})
        else:
            print(f"imported {src}")
            print(f"  id       {layer.id}")
            print(f"  diff_id  {layer.diff_id}")
            print(f"  entries  {layer.entry_count:,}")
            print(f"  size     {human_bytes(layer.size)} ({layer.size:,} bytes)")
            sys.stdout.flush()
    if args.json:
        print_json(results)
    return 0


def image_json(image: ls.Stack) -> dict[str, Any]:
    return {
        "digest": image.digest,
        "config_digest": image.config_digest,
        "chain_id": image.chain_id,
        "layers": [layer.diff_id for layer in image.layers],
    }


def _report_images(src: str, images: Mapping[str, ls.Stack], as_json: bool) -> dict[str, Any]:
    """Print what an image import brought in (text mode); the JSON document of it."""
    if not as_json:
        print(f"imported {src}")
        for name, image in images.items():
            print(f"  image    {name}")
            print(f"  digest   {image.digest}")
            print(f"  layers   {len(image)}")
        sys.stdout.flush()
    return {"source": src, "images": {name: image_json(im) for name, im in images.items()}}


_DOCKER_ARCHIVE_FILES = frozenset({"manifest.json", "repositories", "index.json", "oci-layout"})


def _looks_like_docker_member(name: str) -> bool:
    first = name.removeprefix("./").split("/", 1)[0]
    stem = first.removesuffix(".json").removesuffix(".tar")
    return (
        first in _DOCKER_ARCHIVE_FILES
        or first == "blobs"
        or (len(stem) == 64 and all(c in "0123456789abcdef" for c in stem))
    )


def is_docker_archive(src: str) -> bool:
    """Whether `src` is a ``docker save`` archive (plain, gzip, bzip2 or xz): a tar whose members
    are docker's (``manifest.json``, ``blobs/…``, ``<hex>/layer.tar``, ``<hex>.json``…) and
    that has a top-level ``manifest.json``. A layer's first member decides quickly that it is not.
    """
    try:
        with tarfile.open(src, "r:*") as tar:
            found = False
            for member in tar:
                if not _looks_like_docker_member(member.name):
                    return False
                found = found or member.name.removeprefix("./") == "manifest.json"
            return found
    except (OSError, tarfile.TarError, EOFError):
        return False  # not a tar tarfile can read (e.g. zstd): the layer import decides


def _plain_size(src: str) -> int | None:
    """Size of an uncompressed tar file (the progress total), None when compressed or unknown.

    Progress counts uncompressed bytes, so a compressed file's size is no total for it.
    """
    try:
        with open(src, "rb") as f:
            head = f.read(4)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return None  # the import itself reports the error
    if head[:2] == b"\x1f\x8b" or head == b"\x28\xb5\x2f\xfd":
        return None
    return size


def cmd_ls(args: argparse.Namespace) -> int:
    layers = open_store(args).layers()
    if args.json:
        print_json([layer_json(layer) for layer in layers])
        return 0
    rows = [["ID", "DIFF ID", "ENTRIES", "SIZE", "FROM", "CREATED"]]
    for layer in layers:
        rows.append(
            [
                layer.id if args.no_trunc else short_digest(layer.id),
                layer.diff_id if args.no_trunc else short_digest(layer.diff_id),
                f"{layer.entry_count:,}",
                human_bytes(layer.size),
                layer.compression or "tar",
                format_time(layer.created),
            ]
        )
    print_table(rows, right=frozenset({2, 3}))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    layer = open_store(args).layer(args.layer)
    entries = layer.entries()
    if args.json:
        print_json({**layer_json(layer), "entries": [entry_json(e) for e in entries]})
        return 0
    print(f"id                 {layer.id}")
    print(f"diff_id            {layer.diff_id}")
    print(f"tree_id            {layer.tree_id}")
    print(f"size               {human_bytes(layer.size)} ({layer.size:,} bytes)")
    print(f"entries            {layer.entry_count:,}")
    if layer.compressed_digest:
        print(f"imported from      {layer.compression} blob {layer.compressed_digest}")
    print(f"created            {format_time(layer.created)}")
    print()
    width = max((len(str(e.size)) for e in entries), default=1)
    for entry in entries:
        print(listing_line(entry, width))
    return 0


class _StdoutSink:
    """Binary stdout that remembers a broken pipe.

    The core wraps a writer's exception in its own I/O error; this flag tells a reader that went
    away (``| head``), which is no error, from a real write failure.
    """

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.broken = False

    def write(self, data: bytes) -> int:
        try:
            return self.out.write(data)
        except BrokenPipeError:
            self.broken = True
            raise

    def flush(self) -> None:
        try:
            self.out.flush()
        except BrokenPipeError:
            self.broken = True
            raise


def cmd_export_image(args: argparse.Namespace) -> int:
    store = open_store(args)
    image = store.get(args.layer)
    tag = args.tag or args.layer
    if args.dest == "-":
        raise CliError(f"--format {args.format} writes a file or directory, not standard output")
    with progress_bar(args.layer, None, args.progress) as progress:
        if args.format == "oci":
            digest = store.export_oci(
                image, args.dest, tag=tag, compression=args.compression, progress=progress
            )
        else:
            if args.compression is not None:
                raise CliError("docker archives hold uncompressed layers (drop --compression)")
            digest = store.export_docker_archive(
                image,
                args.dest,
                tag=tag,
                format="classic" if args.classic else "oci",
                progress=progress,
            )
    doc = {
        "image": args.layer,
        "tag": tag,
        "dest": args.dest,
        "format": args.format,
        "digest": digest,
        "config_digest": store.get(args.layer).config_digest if args.format == "oci" else None,
    }
    if args.json:
        print_json(doc)
    else:
        print(f"exported image {args.layer} to {args.dest} as {tag} ({digest})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.format != "tar":
        return cmd_export_image(args)
    if args.tag is not None or args.classic:
        raise CliError("--tag and --classic apply to --format oci|docker")
    store = open_store(args)
    layer = store.layer(args.layer)
    to_stdout = args.dest == "-"
    if to_stdout and args.json:
        raise CliError("--json cannot be combined with DEST '-' (stdout carries the tar)")
    if to_stdout and (sys.stdout is None or sys.stdout.isatty()):
        raise CliError("refusing to write a tar to a terminal (redirect stdout or give a path)")
    with progress_bar(short_digest(layer.id), layer.size, args.progress) as progress:
        if to_stdout:
            sys.stdout.flush()
            sink = _StdoutSink(sys.stdout.buffer)
            try:
                digest = store.export_tar(
                    layer,
                    cast("IO[bytes]", sink),
                    compression=args.compression,
                    progress=progress,
                )
                sink.flush()
            except OSError:
                if sink.broken:
                    raise BrokenPipeError from None
                raise
        else:
            digest = store.export_tar(
                layer, args.dest, compression=args.compression, progress=progress
            )
    if args.json:
        print_json(
            {
                "layer": layer.id,
                "diff_id": layer.diff_id,
                "dest": args.dest,
                "compression": args.compression,
                "digest": digest,
            }
        )
    elif not to_stdout:
        print(f"exported {layer.id} to {args.dest} ({digest})")
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    store = open_store(args)
    image = store.stack([store.layer(key) for key in args.layers])
    store.tag(image, args.name)
    if args.json:
        print_json({"tag": args.name, "chain_id": image.chain_id, "layers": len(image)})
    else:
        print(f"{args.name}  {image.chain_id}  ({len(image)} layers)")
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    images = open_store(args).images()
    if args.json:
        print_json(
            {
                name: {"chain_id": image.chain_id, "layers": [layer.id for layer in image.layers]}
                for name, image in images.items()
            }
        )
        return 0
    rows = [["TAG", "CHAIN ID", "LAYERS"]]
    for name, image in sorted(images.items()):
        chain = image.chain_id if args.no_trunc else short_digest(image.chain_id)
        rows.append([name, chain, str(len(image))])
    print_table(rows, right=frozenset({2}))
    return 0


def cmd_untag(args: argparse.Namespace) -> int:
    open_store(args).untag(args.name)
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    image = open_store(args).get(args.image)
    with image.open(args.path) as f:
        out = sys.stdout.buffer
        while block := f.read(1 << 20):
            out.write(block)
        out.flush()
    return 0


def cmd_tree(args: argparse.Namespace) -> int:
    image = open_store(args).get(args.image)
    if args.json:
        print_json(
            [
                {"path": p, "kind": st.kind, "mode": st.mode, "size": st.size, "layer": st.layer}
                for p, st in _tree(image, args.path)
            ]
        )
        return 0
    for p, st in _tree(image, args.path):
        target = f" -> {st.linkname}" if st.linkname is not None else ""
        layer = "-" if st.layer is None else str(st.layer)
        print(f"{stat.filemode(st.st_mode)} {st.size:>10} L{layer:<3} {p}{target}")
    return 0


def _tree(image: ls.Stack, top: str) -> Iterator[tuple[str, ls.Stat]]:
    """Every path under `top` with its stat (symlinks not followed): each directory, then its
    files and its symlinks to directories (which walk lists but does not enter)."""
    found = image.stat(top, follow_symlinks=False)
    if found.kind != "dir":
        yield found.path, found
        return
    for dirpath, dirnames, filenames in image.walk(top):
        names = [*filenames, *dirnames]
        paths = [dirpath, *(os.path.join(dirpath, n) for n in names)]
        stats = image.stat_many(paths, follow_symlinks=False)
        for i, (p, st) in enumerate(zip(paths, stats, strict=True)):
            # Subdirectories appear when walk reaches them; symlinks among dirnames do not.
            if st is not None and (i == 0 or i <= len(filenames) or st.kind == "symlink"):
                yield p, st


def cmd_materialize(args: argparse.Namespace) -> int:
    store = open_store(args)
    image = store.get(args.image)
    with progress_bar(args.image, None, args.progress) as progress:
        report = store.materialize(
            image, args.dest, max_threads=args.max_threads, progress=progress
        )
    if args.json:
        print_json({"image": args.image, "dest": args.dest, **report})
    else:
        print(
            f"materialized {args.image} into {args.dest}: {report['entries']:,} entries, "
            f"{human_bytes(report['bytes'])}"
            + (f", {report['skipped']} skipped" if report["skipped"] else "")
        )
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    store = open_store(args)
    layer = store.layer(args.layer)
    with progress_bar(short_digest(layer.id), None, args.progress) as progress:
        report = store.apply(layer, args.dest, progress=progress)
    if args.json:
        print_json({"layer": layer.id, "dest": args.dest, **report})
    else:
        print(
            f"applied {short_digest(layer.id)} onto {args.dest}: {report['entries']:,} entries "
            f"written, {report['removed']:,} removed, {human_bytes(report['bytes'])}"
            + (f", {report['skipped']} skipped" if report["skipped"] else "")
        )
    return 0


def _side(store: ls.Store, arg: str) -> ls.Stack | Path:
    """A diff side: an existing directory, else an image tag."""
    return Path(arg) if os.path.isdir(arg) else store.get(arg)


def _print_layer(args: argparse.Namespace, verb: str, layer: ls.Layer, **extra: object) -> None:
    if args.json:
        print_json(
            {
                "id": layer.id,
                "diff_id": layer.diff_id,
                "size": layer.size,
                "entries": layer.entry_count,
                **extra,
            }
        )
    else:
        tail = "".join(f"  {k}={v}" for k, v in extra.items())
        print(f"{verb} {layer.id}  {layer.diff_id}  ({layer.entry_count} entries){tail}")


def cmd_diff(args: argparse.Namespace) -> int:
    store = open_store(args)
    a, b = _side(store, args.a), _side(store, args.b)
    if args.compare_only:
        changes = store.changes(a, b, compare_content=args.compare_content)
        if args.json:
            print_json([{"change": kind, "path": path} for kind, path in changes])
        else:
            marks = {"entry": "M", "link": "L", "whiteout": "D", "opaque": "O"}
            for kind, path in changes:
                print(f"{marks[kind]} {path}")
        return 0
    with progress_bar("diff", None, args.progress) as progress:
        layer = store.diff(a, b, compare_content=args.compare_content, progress=progress)
    _print_layer(args, "diff", layer)
    return 0


def cmd_squash(args: argparse.Namespace) -> int:
    store = open_store(args)
    image = store.get(args.image)
    stop = len(image) if args.stop is None else args.stop
    with progress_bar("squash", None, args.progress) as progress:
        layer = store.squash(image, args.start, stop, dest=args.output, progress=progress)
    if args.tag:
        layers = [*image.layers[: args.start], layer, *image.layers[stop:]]
        store.tag(store.stack(layers), args.tag)
    _print_layer(args, "squashed", layer, **({"tag": args.tag} if args.tag else {}))
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    store = open_store(args)
    image = store.get(args.image)
    with progress_bar("commit", None, args.progress) as progress:
        layer = store.diff(image, Path(args.dir), progress=progress)
    store.tag(image.push(layer), args.tag)
    _print_layer(args, "committed", layer, tag=args.tag)
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    report = open_store(args).gc()
    if args.json:
        print_json(report)
        return 0
    print(
        f"removed {report['chunks_removed']:,} chunk(s) and {report['packs_removed']:,} pack(s), "
        f"rewrote {report['packs_rewritten']:,} pack(s), "
        f"reclaimed {human_bytes(report['bytes_reclaimed'])}"
    )
    if report["deferred"]:
        print("imports in progress hold leases: unreferenced chunks were kept; run gc again later")
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    report = open_store(args).fsck(repair=args.repair)
    ok = bool(report["ok"])
    if args.json:
        print_json(report)
        return 0 if ok else EXIT_ERROR
    for problem in report["problems"]:
        print(f"problem: {problem}")
    repaired = report["repaired"]
    if repaired is not None:
        broken = repaired["layers_broken"]
        print(
            f"repair: took {repaired['chunks_retired']:,} damaged chunk(s) out of use and marked "
            f"{len(broken):,} layer(s) broken; importing their content again heals them"
        )
        for layer in broken:
            print(f"broken: {layer}")
    garbage = report["garbage"]
    if garbage:
        print(f"{len(garbage)} leftover file(s) of interrupted imports ('{PROG} gc' removes them)")
    verdict = "ok" if ok else f"{len(report['problems'])} problem(s)"
    print(
        f"checked {report['chunks_checked']:,} chunk(s) and "
        f"{report['layers_checked']:,} layer(s): {verdict}"
    )
    return 0 if ok else EXIT_ERROR


def cmd_du(args: argparse.Namespace) -> int:
    s = open_store(args).stats()
    if args.json:
        print_json(s)
        return 0
    content = s["content_bytes"]
    stored = s["stored_bytes"] + s["metadata_bytes"]
    dedup = s["logical_bytes"] / content if content else 1.0
    packing = content / s["stored_bytes"] if s["stored_bytes"] else 1.0
    rows = [
        ["layers", f"{s['layers']:,}", ""],
        ["chunks", f"{s['chunks']:,}", f"in {s['packs']:,} pack(s)"],
        ["logical", human_bytes(s["logical_bytes"]), "the layers' tars, added up"],
        ["content", human_bytes(content), "unique chunk bytes, uncompressed"],
        ["stored", human_bytes(s["stored_bytes"]), "chunk blocks as stored in packs"],
        ["metadata", human_bytes(s["metadata_bytes"]), "entry lists and tar headers"],
        ["on disk", human_bytes(s["disk_bytes"]), "every file of the store"],
        [
            "dedup ratio",
            f"{s['dedup_ratio']:.2f}x",
            f"logical / (stored + metadata = {human_bytes(stored)}): "
            f"dedup {dedup:.2f}x, compression {packing:.2f}x",
        ],
    ]
    print_table(rows, right=frozenset({1}))
    return 0


# ---------------------------------------------------------------------------------------------
# Analysis


def _analysis_image(store: ls.Store, arg: str) -> ls.Stack:
    """IMAGE for ``analyze``/``compare``: an OCI layout directory (imported first), else a tag."""
    if os.path.isdir(arg) and os.path.exists(os.path.join(arg, "oci-layout")):
        images = store.import_oci(arg)
        if not images:
            raise CliError(f"{arg}: the OCI layout holds no image")
        return next(iter(images.values()))
    return store.get(arg)


def _ci_rules(args: argparse.Namespace) -> dict[str, str] | None:
    """The CI rules asked for (a file, then flags over it), or None when no rule was asked for."""
    flags = {
        "lowestEfficiency": args.lowest_efficiency,
        "highestWastedBytes": args.highest_wasted_bytes,
        "highestUserWastedPercent": args.highest_user_wasted_percent,
    }
    if args.ci is None and all(v is None for v in flags.values()):
        return None
    rules: dict[str, str] = {}
    if args.ci is not None:
        path = args.ci or ".dive-ci"
        if args.ci or os.path.exists(path):
            rules.update(read_rules(path))
    rules.update({k: v for k, v in flags.items() if v is not None})
    return rules


def _print_analysis(a: ls.Analysis) -> None:
    image = a["image"]
    rows = [
        ["#", "size", "added", "modified", "deleted", "meta-only", "wasted", "causes", "command"]
    ]
    for layer in a["layer"]:
        rows.append(
            [
                str(layer["index"]),
                human_bytes(layer["tarBytes"]),
                f"{layer['filesAdded']:,} ({human_bytes(layer['bytesAdded'])})",
                f"{layer['filesModified']:,} ({human_bytes(layer['bytesModified'])})",
                f"{layer['filesDeleted']:,} ({human_bytes(layer['bytesDeleted'])})",
                f"{layer['metadataOnly']:,}",
                human_bytes(layer["wastedBytes"]),
                human_bytes(layer["causedWasteBytes"]),
                (layer["command"] or "")[:60],
            ]
        )
    print_table(rows, right=frozenset({1, 5, 6, 7}))
    print()
    print(
        f"files shipped: {human_bytes(image['shippedBytes'])}, seen: "
        f"{human_bytes(image['liveBytes'])} in {image['liveFiles']:,} file(s)"
    )
    print(f"wasted: {human_bytes(image['wastedBytes'])}, efficiency {image['efficiency']:.4%}")
    for kind, total in a["waste"]["totals"].items():
        print(f"  {kind:<15} {total['count']:>8,}  {human_bytes(total['bytes'])}")
    print(
        f"dive: efficiency {image['efficiencyScore']:.4%}, wasted "
        f"{human_bytes(image['inefficientBytes'])}, user wasted {image['userWastedPercent']:.4%}"
    )
    items = a["waste"]["items"][:10]
    if items:
        print("largest waste:")
        for item in items:
            print(
                f"  {human_bytes(item['bytes']):>10}  {item['kind']:<15} {item['path']}: "
                f"{item['reason']}"
            )


def cmd_analyze(args: argparse.Namespace) -> int:
    store = open_store(args)
    image = _analysis_image(store, args.image)
    analysis = store.analyze(image, files=args.html is not None)
    rules = _ci_rules(args)
    if args.html is not None:
        from layerstore._report import write_html

        write_html(analysis, args.html, title=args.image)
    if args.json:
        print_json(analysis)
    elif rules is None or args.html is not None:
        _print_analysis(analysis)
    if rules is None:
        return 0
    results = evaluate_rules(analysis, rules)
    failed = [r for r in results if r.status == "fail"]
    for r in failed:
        sys.stderr.write(f"FAIL: {r.rule}: {r.message}\n")
    if not args.json:
        passed = sum(r.status == "pass" for r in results)
        skipped = sum(r.status == "skip" for r in results)
        print(
            f"CI: {'FAIL' if failed else 'PASS'} [passed: {passed}] [failed: {len(failed)}] "
            f"[skipped: {skipped}]"
        )
    return EXIT_ERROR if failed else 0


def cmd_compare(args: argparse.Namespace) -> int:
    store = open_store(args)
    a, b = _analysis_image(store, args.a), _analysis_image(store, args.b)
    c = store.compare(a, b)
    if args.json:
        print_json(c)
        return 0
    u = c["update"]
    print(f"shared layers: {len(c['sharedLayers'])} ({human_bytes(c['sharedLayerBytes'])})")
    print(
        f"shared chunks: {c['sharedChunks']:,} of {c['bChunks']:,} "
        f"({human_bytes(c['sharedChunkBytes'])} of {human_bytes(c['bChunkBytes'])})"
    )
    print("update cost:")
    print(f"  as layers: {u['layers']:,} ({human_bytes(u['layerBytes'])})")
    print(f"  as files:  {u['files']:,} ({human_bytes(u['fileBytes'])})")
    print(f"  as chunks: {u['chunks']:,} ({human_bytes(u['chunkBytes'])})")
    return 0


# ---------------------------------------------------------------------------------------------
# Parser and entry point


def _bool(text: str) -> bool:
    """``true``/``false`` (as skopeo spells ``--tls-verify=false``)."""
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _creds(args: argparse.Namespace) -> tuple[str, str] | None:
    """``--creds USER:PASSWORD`` as the (user, password) pair the API takes."""
    if args.creds is None:
        return None
    user, sep, password = args.creds.partition(":")
    if not sep or not user:
        raise CliError("--creds takes USER:PASSWORD")
    return user, password


def cmd_pull(args: argparse.Namespace) -> int:
    store = open_store(args, create=True)
    with progress_bar(args.ref, None, args.progress) as progress:
        image = store.pull(
            args.ref,
            platform=args.platform,
            auth=_creds(args),
            tls_verify=args.tls_verify,
            progress=progress,
        )
    name = next((n for n, im in store.images().items() if im.digest == image.digest), args.ref)
    if args.json:
        print_json({"reference": args.ref, "name": name, **image_json(image)})
    else:
        print(f"pulled {name}")
        print(f"  digest   {image.digest}")
        print(f"  layers   {len(image)}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    store = open_store(args)
    image = store.get(args.image)
    compression = None if args.compression == "keep" else args.compression
    with progress_bar(args.image, None, args.progress) as progress:
        digest = store.push(
            image,
            args.ref,
            compression=compression,
            auth=_creds(args),
            tls_verify=args.tls_verify,
            progress=progress,
        )
    if args.json:
        print_json({"image": args.image, "reference": args.ref, "digest": digest})
    else:
        print(f"pushed {args.image} to {args.ref} ({digest})")
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    if args.password_stdin:
        if sys.stdin is None:
            raise CliError("no standard input to read the password from")
        password = sys.stdin.readline().rstrip("\r\n")
    elif args.password is not None:
        password = args.password
    else:
        import getpass

        password = getpass.getpass(f"Password for {args.username}@{args.host}: ")
    path = ls.registry_login(args.host, args.username, password, tls_verify=args.tls_verify)
    if args.json:
        print_json({"registry": args.host, "username": args.username, "auth_file": str(path)})
    else:
        print(f"logged in to {args.host} (credentials in {path})")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    removed = ls.registry_logout(args.host)
    if args.json:
        print_json({"registry": args.host, "removed": removed})
    elif removed:
        print(f"logged out of {args.host}")
    else:
        print(f"no credentials for {args.host}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A content-addressed store of container-image layers.",
        epilog=(
            "The store defaults to $LAYERSTORE_HOME, else $XDG_DATA_HOME/layerstore, "
            "else ~/.local/share/layerstore."
        ),
    )
    parser.add_argument(
        "--store",
        metavar="DIR",
        type=Path,
        default=None,
        help="the store directory (created by 'import' if missing)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document on stdout instead of text"
    )
    parser.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="never draw a progress bar (one is drawn on a terminal)",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {ls.__version__} (store format {ls.FORMAT_VERSION})",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "import",
        help="import tars or directories as layers",
        description=(
            "Import each SRC: an OCI image layout (a directory with an oci-layout file) or a "
            "'docker save' archive as tagged images; else as a layer: a tar file (plain, gzip or "
            "zstd, recognised by its magic bytes), a directory (as a canonical tar of the tree), "
            "or '-' for a tar on standard input."
        ),
    )
    p.add_argument(
        "src", nargs="+", metavar="SRC", help="OCI layout, docker archive, tar, directory, or '-'"
    )
    p.add_argument(
        "--exclude-xattr",
        action="append",
        default=[],
        metavar="NAME",
        help="leave this xattr out of directory imports (repeatable, e.g. security.selinux)",
    )
    p.add_argument(
        "--platform",
        metavar="OS/ARCH",
        default=None,
        help="the image to take from a multi-platform OCI index (default: this machine's)",
    )
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("ls", help="list layers", description="List the layers in the store.")
    p.add_argument("--no-trunc", action="store_true", help="print full digests")
    p.set_defaults(func=cmd_ls)

    layer_help = "layer id, diff_id, blob digest, or a unique hex prefix of the id or diff_id"
    p = sub.add_parser(
        "show",
        help="show a layer and its entries",
        description="Show a layer's identity and list its entries like 'tar -tv'.",
    )
    p.add_argument("layer", metavar="LAYER", help=layer_help)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser(
        "export",
        help="write a layer as a tar, or an image as an OCI layout or docker archive",
        description=(
            "Write a layer as a tar (--format tar, the default): uncompressed, it is byte for "
            "byte the tar that was imported (its sha256 is the diff_id). With --format oci or "
            "docker, SOURCE is an image tag, written into the OCI layout DEST (created or added "
            "to) or as the docker archive DEST; an imported image keeps its digests."
        ),
    )
    p.add_argument("layer", metavar="SOURCE", help=layer_help + "; or an image tag")
    p.add_argument("dest", metavar="DEST", help="output file or directory, or '-' for stdout")
    p.add_argument("--format", choices=["tar", "oci", "docker"], default="tar")
    p.add_argument(
        "--compression",
        choices=["gzip", "zstd", "none"],
        default=None,
        help="compress the output (oci: default keeps an imported image's blobs, else gzip)",
    )
    p.add_argument("--tag", default=None, help="oci/docker: the name to write (default SOURCE)")
    p.add_argument(
        "--classic",
        action="store_true",
        help="docker: the classic layout (a directory per layer), not the OCI-embedding one",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "gc",
        help="remove what nothing references",
        description="Remove unreferenced chunks and leftovers of interrupted imports; "
        "compact packs that are mostly garbage. Safe while other processes import.",
    )
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser(
        "fsck",
        help="verify the store",
        description="Re-hash every chunk and check every reference. Exit status 1 on problems.",
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="take damaged chunks out of use and mark the layers using them broken "
        "(importing their content again heals them)",
    )
    p.set_defaults(func=cmd_fsck)

    p = sub.add_parser(
        "du",
        help="show space used and the dedup ratio",
        description="Show the store's logical and stored sizes and its dedup ratio.",
    )
    p.set_defaults(func=cmd_du)

    p = sub.add_parser(
        "tag",
        help="tag a stack of layers as an image",
        description="Stack LAYERs (bottom first) and point tag NAME at the image.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("layers", metavar="LAYER", nargs="+")
    p.set_defaults(func=cmd_tag)

    p = sub.add_parser("images", help="list tagged images", description="List tagged images.")
    p.add_argument("--no-trunc", action="store_true", help="print whole digests")
    p.set_defaults(func=cmd_images)

    p = sub.add_parser("untag", help="remove a tag", description="Remove tag NAME.")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_untag)

    p = sub.add_parser(
        "cat",
        help="print a file of an image",
        description="Write the content of PATH in image IMAGE (a tag) to stdout.",
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("path", metavar="PATH")
    p.set_defaults(func=cmd_cat)

    p = sub.add_parser(
        "tree",
        help="list an image's files",
        description="List every path under PATH (default /) in image IMAGE (a tag), with the "
        "layer that provides it.",
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("path", metavar="PATH", nargs="?", default="/")
    p.set_defaults(func=cmd_tree)

    p = sub.add_parser(
        "materialize",
        help="write an image's files to a new directory",
        description="Write the union view of image IMAGE (a tag) to DEST, which must not exist: "
        "every owner (as root), mode, time, xattr, device (as root) and hardlink. DEST appears "
        "only once complete.",
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("dest", metavar="DEST")
    p.add_argument(
        "--max-threads", type=int, default=None, metavar="N", help="writer threads (default: cores)"
    )
    p.set_defaults(func=cmd_materialize)

    p = sub.add_parser(
        "apply",
        help="apply a layer onto a directory",
        description="Apply the changeset LAYER onto the existing directory DEST: its whiteouts "
        "and opaque markers remove what they hide, then its entries are written.",
    )
    p.add_argument("layer", metavar="LAYER", help=layer_help)
    p.add_argument("dest", metavar="DEST")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser(
        "diff",
        help="the changeset between two images or directories",
        description="Store the changeset taking A to B as a layer (or, with --compare-only, "
        "list it: M changed or added, L hard link, D deleted, O opaque directory). A and B are "
        "image tags or directories (an existing directory wins); image to directory compares "
        "metadata first and hashes only with --compare-content.",
    )
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--compare-only", action="store_true", help="list changes, store nothing")
    p.add_argument("--compare-content", action="store_true", help="hash same-looking files")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser(
        "squash",
        help="squash a range of an image's layers into one",
        description="Squash layers START..STOP (default: all) of image IMAGE into one layer with "
        "the same view; optionally tag the resulting image and write the layer's tar.",
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--stop", type=int, default=None)
    p.add_argument("--tag", metavar="NAME", help="tag the image with the squashed range")
    p.add_argument("-o", "--output", metavar="FILE", type=Path, help="also write the tar here")
    p.set_defaults(func=cmd_squash)

    p = sub.add_parser(
        "commit",
        help="commit a directory's changes over an image as a new image",
        description="Store the changes from image IMAGE to directory DIR (a container's "
        "root filesystem, say) as a layer, and tag IMAGE plus that layer as NAME.",
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--tag", metavar="NAME", required=True)
    p.set_defaults(func=cmd_commit)

    def registry_options(p: argparse.ArgumentParser, creds: bool = True) -> None:
        p.add_argument(
            "--tls-verify",
            type=_bool,
            default=True,
            metavar="BOOL",
            help="verify TLS certificates; false also allows plain HTTP (default true)",
        )
        if creds:
            p.add_argument(
                "--creds",
                metavar="USER:PASSWORD",
                default=None,
                help="credentials (default: the auth files podman and docker write)",
            )

    p = sub.add_parser(
        "pull",
        help="pull an image from a registry",
        description="Pull image REF (host[:port]/repo[:tag][@digest]; a bare repo:tag is on "
        "Docker Hub) into the store, tagged with its full name. Layers the store holds are not "
        "downloaded; every blob is digest-checked.",
    )
    p.add_argument("ref", metavar="REF")
    p.add_argument("--platform", metavar="OS/ARCH", default=None, help="default: this machine's")
    registry_options(p)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser(
        "push",
        help="push an image to a registry",
        description="Push image IMAGE (a tag) to REF. Blobs the registry has are not sent; an "
        "imported or pulled image keeps its digests.",
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("ref", metavar="REF")
    p.add_argument(
        "--compression",
        choices=["gzip", "zstd", "none", "keep"],
        default="gzip",
        help="layer compression (keep: an imported image's own blobs; default gzip)",
    )
    registry_options(p)
    p.set_defaults(func=cmd_push)

    p = sub.add_parser(
        "analyze",
        help="where an image's bytes come from, and which are wasted",
        description="Analyse image IMAGE (a tag, or an OCI layout directory, which is imported "
        "into the store first) from the store's "
        "indices: per layer what it adds, modifies and deletes; waste of five kinds, each with "
        "its reason; dive's efficiency score beside ours. With CI rules (--ci, or a rule flag), "
        "exit 1 and print one line per broken rule.",
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument(
        "--ci",
        metavar="RULES",
        nargs="?",
        const="",
        default=None,
        help="check dive's CI rules, read from RULES (a .dive-ci file; default ./.dive-ci when "
        "it exists, else dive's defaults)",
    )
    p.add_argument("--lowest-efficiency", "--lowestEfficiency", default=None, metavar="RATIO")
    p.add_argument("--highest-wasted-bytes", "--highestWastedBytes", default=None, metavar="BYTES")
    p.add_argument(
        "--highest-user-wasted-percent",
        "--highestUserWastedPercent",
        default=None,
        metavar="RATIO",
    )
    p.add_argument("--html", metavar="FILE", default=None, help="write a self-contained report")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="as --json")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser(
        "compare",
        help="what two images share, and what an update costs",
        description="What images A and B share (by layer and by chunk), and what pulling B "
        "costs with A present: as whole layers, whole files and chunks.",
    )
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="as --json")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "login",
        help="record credentials for a registry",
        description="Check USER's password against registry HOST (host[:port]) and record it in "
        "$REGISTRY_AUTH_FILE, else $XDG_RUNTIME_DIR/containers/auth.json, else "
        "~/.docker/config.json.",
    )
    p.add_argument("host", metavar="HOST")
    p.add_argument("-u", "--username", required=True)
    p.add_argument("-p", "--password", default=None, help="prefer --password-stdin")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    registry_options(p, creds=False)
    p.set_defaults(func=cmd_login)

    p = sub.add_parser(
        "logout",
        help="forget the credentials of a registry",
        description="Remove HOST's credentials from every auth file.",
    )
    p.add_argument("host", metavar="HOST")
    p.set_defaults(func=cmd_logout)
    return parser


def _error(message: str) -> None:
    # One line, whatever the message holds.
    text = " ".join(message.split())
    sys.stderr.write(f"{PROG}: error: {text}\n")
    sys.stderr.flush()


def _os_error_message(e: OSError) -> str:
    # OSErrors raised in Python carry errno/strerror/filename; the core's carry a full message.
    if e.strerror and e.filename is not None:
        return f"{os.fsdecode(e.filename)}: {e.strerror}"
    return str(e) or type(e).__name__


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: IO[str] | None = None,
    line: str | None = None,
) -> None:
    text = " ".join(str(message).split())
    sys.stderr.write(f"{PROG}: warning: {text}\n")


def _silence_stdout() -> None:
    # After EPIPE, Python would complain again when flushing stdout at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.store is None:
        args.store = default_store_dir()
    if isinstance(sys.stdout, io.TextIOWrapper):
        # Member names need not be UTF-8: print them back as the bytes they were.
        sys.stdout.reconfigure(errors="surrogateescape")
    warnings.showwarning = _show_warning
    try:
        status: int = args.func(args)
        sys.stdout.flush()
        return status
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except CliError as e:
        _error(str(e))
        return EXIT_ERROR
    except (ls.LayerstoreError, ValueError) as e:
        _error(str(e))
        return EXIT_ERROR
    except OSError as e:
        _error(_os_error_message(e))
        return EXIT_ERROR


def run() -> NoReturn:
    sys.exit(main())


if __name__ == "__main__":
    run()
