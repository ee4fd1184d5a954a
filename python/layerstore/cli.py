"""The ``layerstore`` command line: a thin shell over :class:`layerstore.Store`.

Every command prints human-readable text by default, or exactly one JSON document on stdout with
``--json``. Errors are one line on stderr (``layerstore: error: ...``) and exit code 1; usage
errors, bad numbers included, exit 2 (argparse's convention); Ctrl-C exits 130. The global
options (``--store``, ``--json``, ``--no-progress``) go before or after the command. A progress
bar (tqdm) is drawn on stderr during long work, only when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import stat
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn, cast

import layerstore as ls
from layerstore._analysis import evaluate_rules, read_rules
from layerstore._cliimages import (
    cmd_config,
    cmd_history,
    cmd_images,
    cmd_inspect,
    cmd_prune,
    cmd_rm,
    cmd_rmi,
    cmd_tag,
    cmd_untag,
    command_line,
    has_tag,
    key_value,
)
from layerstore._cliimport import cmd_import
from layerstore._climount import add_mount_parsers
from layerstore._cliout import (
    format_time,
    human_bytes,
    image_json,
    layer_json,
    plural,
    print_json,
    print_table,
    progress_bar,
    short_digest,
    warn,
)
from layerstore._cliregistry import add_registry_options, creds
from layerstore._clirun import add_run_parsers
from layerstore._clistore import (
    PROG,
    CliError,
    default_store_dir,
    error_message,
    open_store,
    resolve_image,
    resolve_layer,
    store_from,
)

__all__ = ["CliError", "build_parser", "default_store_dir", "main", "run"]


#: Exit codes besides 0 (success) and 2 (usage error, from argparse).
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process killed by Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader went away (``layerstore export L - | head``)


# ---------------------------------------------------------------------------------------------
# Argument types: a bad number is a usage error (exit 2) that names the option, never a traceback


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: '{text}'") from None
    if value < minimum:
        rule = "must not be negative" if minimum == 0 else f"must be at least {minimum}"
        raise argparse.ArgumentTypeError(f"{rule}, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (indices such as ``--start``)."""
    return _integer(text, 0)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (counts such as ``--max-threads``)."""
    return _integer(text, 1)


# ---------------------------------------------------------------------------------------------
# Formatting of layers and entries


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


def entry_json(entry: ls.Entry) -> dict[str, Any]:
    """The JSON shape of an entry (``show --json``)."""
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


# ---------------------------------------------------------------------------------------------
# Layers: ls, show, export


def cmd_ls(args: argparse.Namespace) -> int:
    """``layerstore ls``: the layers, as a table or JSON."""
    layers = store_from(args).layers()
    if args.json:
        print_json([layer_json(layer) for layer in layers])
        return 0
    # BLOBS: the compressions of every compressed blob known for the layer (imported from,
    # exported, pulled or pushed; each digest also finds the layer), '-' when only the
    # uncompressed tar is known.
    rows = [["ID", "DIFF ID", "ENTRIES", "SIZE", "BLOBS", "CREATED"]]
    for layer in layers:
        compressions = sorted({blob["compression"] for blob in layer.blobs()})
        rows.append(
            [
                layer.id if args.no_trunc else short_digest(layer.id),
                layer.diff_id if args.no_trunc else short_digest(layer.diff_id),
                f"{layer.entry_count:,}",
                human_bytes(layer.size),
                ",".join(compressions) or "-",
                format_time(layer.created),
            ]
        )
    print_table(rows, right=frozenset({2, 3}))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """``layerstore show LAYER``: a layer's identity and its entries, like ``tar -tv``."""
    store = store_from(args)
    # Looked up again by id, so that every name of a layer shows the same thing.
    layer = store.layer(resolve_layer(store, args.layer).id)
    entries = layer.entries()
    if args.json:
        print_json({**layer_json(layer), "entries": [entry_json(e) for e in entries]})
        return 0
    print(f"id                 {layer.id}")
    print(f"diff_id            {layer.diff_id}")
    print(f"tree_id            {layer.tree_id}")
    print(f"size               {human_bytes(layer.size)} ({layer.size:,} bytes)")
    print(f"entries            {layer.entry_count:,}")
    for blob in layer.blobs():
        size = "" if blob["size"] is None else f", {human_bytes(blob['size'])}"
        print(f"compressed blob    {blob['compression']} {blob['digest']} ({blob['origin']}{size})")
    if layer.created_by:
        print(f"created_by         {layer.created_by}")
    print(f"created            {format_time(layer.created)}")
    print()
    width = max((len(str(e.size)) for e in entries), default=1)
    for entry in entries:
        print(listing_line(entry, width))
    return 0


#: Output compressions named by a file extension (``export L out.tar.gz``).
_EXTENSIONS = {
    ".gz": "gzip",
    ".tgz": "gzip",
    ".zst": "zstd",
    ".tzst": "zstd",
    ".xz": "xz",
    ".txz": "xz",
    ".bz2": "bzip2",
    ".tbz2": "bzip2",
}


def export_compression(dest: str, asked: str | None) -> str | None:
    """The compression to write `dest` with: `asked` ('gzip' | 'zstd' | 'none'), else what the
    extension says. A mismatch between the two, or an extension we cannot write, is refused."""
    implied = _EXTENSIONS.get(os.path.splitext(dest)[1].lower()) if dest != "-" else None
    if implied in ("xz", "bzip2"):
        raise CliError(f"{dest}: cannot write {implied} (use .tar, .tar.gz or .tar.zst)")
    if asked is None:
        return implied
    if implied is not None and asked != implied:
        raise CliError(f"--compression {asked} does not match the extension of {dest} ({implied})")
    return None if asked == "none" else asked


def cmd_export_image(args: argparse.Namespace) -> int:
    """``layerstore export --format oci|docker IMAGE DEST``."""
    store = store_from(args)
    image = resolve_image(store, args.layer)
    tag = args.tag or args.layer
    if args.dest == "-":
        raise CliError(f"--format {args.format} writes a file or directory, not standard output")
    total = sum(layer.size for layer in image.layers)
    with progress_bar(args.layer, total, args.progress, parts=True) as progress:
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
        "config_digest": store.get(tag).config_digest
        if args.format == "oci" and has_tag(store, tag)
        else None,
    }
    if args.json:
        print_json(doc)
    else:
        print(f"exported image {args.layer} to {args.dest} as {tag} ({digest})")
    return 0


def _split_transport_dest(args: argparse.Namespace) -> None:
    """``oci:DIR[:REF]`` and ``docker-archive:FILE[:REF]`` as DEST set --format and --tag."""
    for scheme, fmt in (("oci:", "oci"), ("docker-archive:", "docker")):
        if args.dest.startswith(scheme) and not os.path.lexists(args.dest):
            if args.format not in ("tar", fmt):
                raise CliError(f"{args.dest} contradicts --format {args.format}")
            rest = args.dest[len(scheme) :]
            path, _, ref = rest.partition(":")
            args.format, args.dest = fmt, path
            if ref:
                if args.tag not in (None, ref):
                    raise CliError(f"{scheme}{rest} contradicts --tag {args.tag}")
                args.tag = ref
            return


def cmd_export(args: argparse.Namespace) -> int:
    """``layerstore export SOURCE DEST``: a layer as a tar (compression from the
    extension), or an image."""
    _split_transport_dest(args)
    if args.format != "tar":
        return cmd_export_image(args)
    if args.tag is not None or args.classic:
        raise CliError("--tag and --classic apply to --format oci|docker")
    if args.dest == "":
        raise CliError("DEST is empty: give a file name, or '-' for standard output")
    compression = export_compression(args.dest, args.compression)
    store = store_from(args)
    layer = resolve_layer(store, args.layer)
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
                    layer, cast("IO[bytes]", sink), compression=compression, progress=progress
                )
                sink.flush()
            except OSError:
                if sink.broken:
                    raise BrokenPipeError from None
                raise
        else:
            digest = store.export_tar(layer, args.dest, compression=compression, progress=progress)
    if args.json:
        print_json(
            {
                "layer": layer.id,
                "diff_id": layer.diff_id,
                "dest": args.dest,
                "compression": compression,
                "digest": digest,
            }
        )
    elif not to_stdout:
        how = f" ({compression})" if compression else ""
        print(f"exported {layer.id} to {args.dest}{how} ({digest})")
    return 0


# ---------------------------------------------------------------------------------------------
# Reading and writing images: cat, tree, materialize, apply


def cmd_cat(args: argparse.Namespace) -> int:
    """``layerstore cat IMAGE PATH``: a file's content on stdout."""
    image = resolve_image(store_from(args), args.image)
    with image.open(args.path) as f:
        out = sys.stdout.buffer
        while block := f.read(1 << 20):
            out.write(block)
        out.flush()
    return 0


def cmd_tree(args: argparse.Namespace) -> int:
    """``layerstore tree IMAGE [PATH]``: every path under PATH with the layer providing it."""
    image = resolve_image(store_from(args), args.image)
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


def cmd_materialize(args: argparse.Namespace) -> int:
    """``layerstore materialize IMAGE DEST``: the union view written to a new directory."""
    store = store_from(args)
    image = resolve_image(store, args.image)
    with progress_bar(args.image, image.content_bytes, args.progress) as progress:
        report = store.materialize(
            image, args.dest, max_threads=args.max_threads, progress=progress
        )
    if args.json:
        print_json({"image": args.image, "dest": args.dest, **report})
    else:
        print(
            f"materialized {args.image} into {args.dest}: "
            f"{plural(report['entries'], 'entry', 'entries')}, {human_bytes(report['bytes'])}"
            + (f", {report['skipped']:,} skipped" if report["skipped"] else "")
        )
    return 0


def _content_bytes(layer: ls.Layer) -> int:
    """Bytes of file content a layer's changeset holds (what ``apply`` writes)."""
    return sum(e.size for e in layer.entries() if e.kind == "file")


def cmd_apply(args: argparse.Namespace) -> int:
    """``layerstore apply LAYER DEST``: a changeset applied onto an existing directory."""
    store = store_from(args)
    layer = resolve_layer(store, args.layer)
    with progress_bar(
        short_digest(layer.id), lambda: _content_bytes(layer), args.progress
    ) as progress:
        report = store.apply(layer, args.dest, progress=progress)
    if args.json:
        print_json({"layer": layer.id, "dest": args.dest, **report})
    else:
        print(
            f"applied {short_digest(layer.id)} onto {args.dest}: "
            f"{plural(report['entries'], 'entry', 'entries')} written, "
            f"{report['replaced']:,} replaced, {report['removed']:,} removed, "
            f"{human_bytes(report['bytes'])}"
            + (f", {report['skipped']:,} skipped" if report["skipped"] else "")
        )
    return 0


# ---------------------------------------------------------------------------------------------
# Making layers: diff, squash, commit


def _side(store: ls.Store, arg: str) -> ls.Stack | Path:
    """A diff side: an existing directory, else an image (tag, digest, layer)."""
    return Path(arg) if os.path.isdir(arg) else resolve_image(store, arg)


def _print_layer(args: argparse.Namespace, verb: str, layer: ls.Layer, **extra: object) -> None:
    tagged = extra.get("tag") is not None
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
        return
    tail = "".join(f"  {k}={v}" for k, v in extra.items() if v is not None)
    print(
        f"{verb} {layer.id}  {layer.diff_id}  "
        f"({plural(layer.entry_count, 'entry', 'entries')}){tail}"
    )
    if not tagged:
        short = short_digest(layer.id)
        print(
            f"the layer is in the store untagged: '{PROG} tag NAME {short}' keeps it as an "
            f"image, '{PROG} rm {short}' removes it"
        )


#: What each kind of change is, docker-style: A added, C changed, D deleted.
def _status(a: ls.Stack | Path, kind: str, path: str) -> str:
    if kind == "whiteout":
        return "D"
    if kind == "opaque":
        return "C"
    if isinstance(a, Path):
        existed = os.path.lexists(a / path.lstrip("/"))
    else:
        existed = a.exists(path, follow_symlinks=False)
    return "C" if existed else "A"


def cmd_diff(args: argparse.Namespace) -> int:
    """``layerstore diff A B``: the changeset stored as a layer, or listed (A/C/D)."""
    store = store_from(args)
    a, b = _side(store, args.a), _side(store, args.b)
    if args.compare_only:
        changes = store.changes(a, b, compare_content=args.compare_content)
        listed = [(_status(a, kind, path), kind, path) for kind, path in changes]
        if args.json:
            print_json([{"status": s, "change": kind, "path": p} for s, kind, p in listed])
        else:
            for status, _, path in listed:
                print(f"{status} {path}")
        return 0
    with progress_bar("diff", None, args.progress) as progress:
        layer = store.diff(a, b, compare_content=args.compare_content, progress=progress)
    _print_layer(args, "diff", layer)
    return 0


def cmd_squash(args: argparse.Namespace) -> int:
    """``layerstore squash IMAGE``: layers START..STOP (STOP excluded) as one layer."""
    store = store_from(args)
    image = resolve_image(store, args.image)
    depth = len(image)
    stop = depth if args.stop is None else args.stop
    if stop > depth:
        raise CliError(f"--stop {stop} is beyond {args.image}, which has {plural(depth, 'layer')}")
    if args.start >= stop:
        raise CliError(f"--start {args.start} --stop {stop} is an empty range (stop is excluded)")
    with progress_bar("squash", None, args.progress) as progress:
        layer = store.squash(image, args.start, stop, dest=args.output, progress=progress)
    if args.tag:
        layers = [*image.layers[: args.start], layer, *image.layers[stop:]]
        store.tag(store.stack(layers), args.tag)
    _print_layer(args, "squashed", layer, tag=args.tag)
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    """``layerstore commit IMAGE DIR --tag NAME``: DIR's changes as a new image."""
    store = store_from(args)
    image = resolve_image(store, args.image)
    with progress_bar("commit", None, args.progress) as progress:
        layer = store.diff(image, Path(args.dir), progress=progress)
    store.tag(image.push(layer), args.tag)
    _print_layer(args, "committed", layer, tag=args.tag)
    return 0


# ---------------------------------------------------------------------------------------------
# The store: gc, fsck, du


def cmd_gc(args: argparse.Namespace) -> int:
    """``layerstore gc``: remove unreferenced chunks and leftovers."""
    report = store_from(args).gc()
    if args.json:
        print_json(report)
        return 0
    print(
        f"removed {plural(report['chunks_removed'], 'chunk')} and "
        f"{plural(report['packs_removed'], 'pack')}, "
        f"rewrote {plural(report['packs_rewritten'], 'pack')}, "
        f"reclaimed {human_bytes(report['bytes_reclaimed'])}"
    )
    if report["mounts_reaped"] or report["snapshots_removed"]:
        print(
            f"cleaned up {plural(report['mounts_reaped'], 'stale mount')}, removed "
            f"{plural(report['snapshots_removed'], 'layer snapshot')}"
        )
    if report["packs_not_rewritten"]:
        print(
            f"left {plural(report['packs_not_rewritten'], 'pack')} uncompacted: the disk has no "
            "room for the rewritten pack; free space and run gc again"
        )
    if report["deferred"]:
        print("imports in progress hold leases: unreferenced chunks were kept; run gc again later")
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    """``layerstore fsck``: verify the store; exit status 1 on problems."""
    report = store_from(args).fsck(repair=args.repair)
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
            f"repair: took {plural(repaired['chunks_retired'], 'damaged chunk')} out of use and "
            f"marked {plural(len(broken), 'layer')} broken; importing their content again heals "
            "them"
        )
        for layer in broken:
            print(f"broken: {layer}")
    garbage = report["garbage"]
    if garbage:
        print(
            f"{plural(len(garbage), 'leftover file')} of interrupted imports "
            f"('{PROG} gc' removes them)"
        )
    verdict = "ok" if ok else plural(len(report["problems"]), "problem")
    print(
        f"checked {plural(report['chunks_checked'], 'chunk')} and "
        f"{plural(report['layers_checked'], 'layer')}: {verdict}"
    )
    return 0 if ok else EXIT_ERROR


def cmd_du(args: argparse.Namespace) -> int:
    """``layerstore du``: logical and stored sizes, dedup ratio."""
    s = store_from(args).stats()
    if args.json:
        print_json(s)
        return 0
    content = s["content_bytes"]
    stored = s["stored_bytes"] + s["metadata_bytes"]
    dedup = s["logical_bytes"] / content if content else 1.0
    packing = content / s["stored_bytes"] if s["stored_bytes"] else 1.0
    rows = [
        ["layers", f"{s['layers']:,}", ""],
        ["chunks", f"{s['chunks']:,}", f"in {plural(s['packs'], 'pack')}"],
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
    return resolve_image(store, arg)


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
    store = store_from(args)
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
    store = store_from(args)
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

_LAYER_HELP = (
    "a layer: its id, diff_id or compressed blob digest, or a unique prefix of at least 6 hex "
    "digits of its id or diff_id"
)
_IMAGE_HELP = (
    "an image: a tag, a tagged image's manifest digest or chain id (or a unique prefix of 6+ hex "
    "digits), or a layer as a one-layer image"
)


def cmd_pull(args: argparse.Namespace) -> int:
    """``layerstore pull REF``: an image from a registry into the store, tagged REF."""
    store = open_store(args.store, create=True)
    with progress_bar(args.ref, None, args.progress) as progress:
        image = store.pull(
            args.ref,
            platform=args.platform,
            auth=creds(args),
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
    """``layerstore push IMAGE REF``: an image of the store to a registry."""
    store = store_from(args)
    image = resolve_image(store, args.image)
    compression = None if args.compression == "keep" else args.compression
    with progress_bar(args.image, None, args.progress) as progress:
        digest = store.push(
            image,
            args.ref,
            compression=compression,
            auth=creds(args),
            tls_verify=args.tls_verify,
            progress=progress,
        )
    if args.json:
        print_json({"image": args.image, "reference": args.ref, "digest": digest})
    else:
        print(f"pushed {args.image} to {args.ref} ({digest})")
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    """``layerstore login HOST``: check and record credentials for a registry."""
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
    """``layerstore logout HOST``: forget a registry's credentials."""
    removed = ls.registry_logout(args.host)
    if args.json:
        print_json({"registry": args.host, "removed": removed})
    elif removed:
        print(f"logged out of {args.host}")
    else:
        print(f"no credentials for {args.host}")
    return 0


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, like every other error (exit 2)."""

    def error(self, message: str) -> NoReturn:
        """Print ``PROG CMD: error: MESSAGE (see 'PROG CMD --help')`` and exit with status 2."""
        text = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {text} (see '{self.prog} --help')\n")


def _global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """--store, --json, --no-progress: on the main parser and, so that they may follow the
    command too, on every subparser (there without defaults, so as not to undo the main one's)."""
    default: Any = None if top else argparse.SUPPRESS
    parser.add_argument(
        "--store",
        metavar="DIR",
        type=Path,
        default=default,
        help="the store directory (default: $LAYERSTORE_HOME, else $XDG_DATA_HOME/layerstore, "
        "else ~/.local/share/layerstore; created by 'import' if missing or empty)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="print one JSON document on stdout instead of text",
    )
    parser.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=True if top else argparse.SUPPRESS,
        help="never draw a progress bar (one is drawn when stderr is a terminal)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``layerstore`` command."""
    parser = _Parser(
        prog=PROG,
        description="A content-addressed store of container-image layers.",
        epilog=(
            "The store defaults to $LAYERSTORE_HOME, else $XDG_DATA_HOME/layerstore, "
            "else ~/.local/share/layerstore. Global options may also follow the command."
        ),
    )
    _global_options(parser, top=True)
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {ls.__version__} (store format {ls.FORMAT_VERSION})",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, func: Callable[[argparse.Namespace], int], **kw: Any) -> Any:
        p = sub.add_parser(name, **kw)
        _global_options(p, top=False)
        p.set_defaults(func=func)
        return p

    p = command(
        "import",
        cmd_import,
        help="import tars, directories, OCI layouts and docker archives",
        description=(
            "Import each SRC: an OCI image layout (a directory with an oci-layout file, or "
            "oci:DIR) or a 'docker save' archive (or docker-archive:FILE) as tagged images; else "
            "as a layer: a tar file (plain, gzip, zstd, xz or bzip2, recognised by its magic "
            "bytes), a directory (as a canonical tar of the tree), or '-' for a tar on standard "
            "input. A failure names the SRC and what was imported before it; a first import "
            "that fails leaves no store behind."
        ),
    )
    p.add_argument(
        "src",
        nargs="+",
        metavar="SRC",
        help="tar file, directory, '-', OCI layout (DIR or oci:DIR), docker archive "
        "(FILE or docker-archive:FILE)",
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

    p = command("ls", cmd_ls, help="list layers", description="List the layers in the store.")
    p.add_argument("--no-trunc", action="store_true", help="print full digests")

    p = command(
        "show",
        cmd_show,
        help="show a layer and its entries",
        description="Show a layer's identity and list its entries like 'tar -tv'.",
    )
    p.add_argument("layer", metavar="LAYER", help=_LAYER_HELP)

    p = command(
        "export",
        cmd_export,
        help="write a layer as a tar, or an image as an OCI layout or docker archive",
        description=(
            "Write a layer as a tar (--format tar, the default): uncompressed, it is byte for "
            "byte the tar that was imported (its sha256 is the diff_id); DEST ending in .gz/.tgz "
            "or .zst/.tzst is compressed accordingly. With --format oci or docker (or DEST "
            "oci:DIR[:REF] or docker-archive:FILE[:REF]), SOURCE is an image, written into the "
            "OCI layout DEST (created or added to) or as the docker archive DEST; an imported "
            "image keeps its digests."
        ),
    )
    p.add_argument("layer", metavar="SOURCE", help=_LAYER_HELP + "; or, for oci/docker, an image")
    p.add_argument(
        "dest",
        metavar="DEST",
        help="output file or directory, '-' for stdout, oci:DIR[:REF], docker-archive:FILE[:REF]",
    )
    p.add_argument(
        "--format", choices=["tar", "oci", "docker"], default="tar", help="what to write"
    )
    p.add_argument(
        "--compression",
        choices=["gzip", "zstd", "none"],
        default=None,
        help="tar: compress the output (default: from DEST's extension); oci: default keeps an "
        "imported image's blobs, else gzip",
    )
    p.add_argument(
        "--tag", default=None, metavar="NAME", help="oci/docker: the name to write (default SOURCE)"
    )
    p.add_argument(
        "--classic",
        action="store_true",
        help="docker: the classic layout (a directory per layer), not the OCI-embedding one",
    )

    command(
        "gc",
        cmd_gc,
        help="remove what nothing references",
        description="Remove unreferenced chunks and leftovers of interrupted imports; "
        "compact packs that are mostly garbage. Safe while other processes import. "
        "Layers stay until removed ('rm', 'rmi', 'prune').",
    )

    p = command(
        "fsck",
        cmd_fsck,
        help="verify the store",
        description="Re-hash every chunk and check every reference. Exit status 1 on problems.",
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="take damaged chunks out of use and mark the layers using them broken "
        "(importing their content again heals them)",
    )

    command(
        "du",
        cmd_du,
        help="show space used and the dedup ratio",
        description="Show the store's logical and stored sizes and its dedup ratio.",
    )

    p = command(
        "tag",
        cmd_tag,
        help="tag an image, or a stack of layers as an image",
        description="Point tag NAME at an image: one SOURCE (an image or a layer), or several "
        "LAYERs stacked bottom first.",
    )
    p.add_argument("name", metavar="NAME", help="the tag, e.g. app:1 or example.com/app:1")
    p.add_argument(
        "layers",
        metavar="SOURCE",
        nargs="+",
        help="one image or layer, or layers bottom first (" + _LAYER_HELP + ")",
    )

    p = command(
        "images",
        cmd_images,
        help="list tagged images",
        description="List tagged images: manifest digest (when imported or exported as OCI), "
        "chain id, layer count, uncompressed size, and when the newest layer was stored.",
    )
    p.add_argument("--no-trunc", action="store_true", help="print whole digests")

    p = command("untag", cmd_untag, help="remove a tag", description="Remove tag NAME.")
    p.add_argument("name", metavar="NAME", help="the tag to remove (its layers stay)")

    p = command(
        "inspect",
        cmd_inspect,
        help="an image's identity and layers as JSON",
        description="Print IMAGE's tags, manifest and config digests, chain id, size, and its "
        "layers (bottom first) with sizes, times and created_by, as one JSON document.",
    )
    p.add_argument("image", metavar="IMAGE", help=_IMAGE_HELP)

    p = command(
        "history",
        cmd_history,
        help="an image's layers, newest first",
        description="List IMAGE's layers top first, as 'docker history' does: layer, when "
        "stored, the build step that created it, size.",
    )
    p.add_argument("image", metavar="IMAGE", help=_IMAGE_HELP)
    p.add_argument("--no-trunc", action="store_true", help="print whole ids and build steps")

    p = command(
        "config",
        cmd_config,
        help="a new image with a changed config",
        description="Write a new image NEW with IMAGE's layers and its config changed: --env "
        "and --label merge into the config's, the others replace theirs. The config's created "
        "time is now (or $SOURCE_DATE_EPOCH). IMAGE's layers are read once (an export to "
        "$TMPDIR); nothing but the new config and manifest is stored.",
    )
    p.add_argument("image", metavar="IMAGE", help=_IMAGE_HELP)
    p.add_argument("--tag", metavar="NEW", required=True, help="the new image's tag")
    p.add_argument(
        "--env", type=key_value, action="append", default=[], metavar="K=V", help="set a variable"
    )
    p.add_argument(
        "--label", type=key_value, action="append", default=[], metavar="K=V", help="set a label"
    )
    p.add_argument(
        "--entrypoint",
        type=command_line,
        metavar="CMD",
        help='the entrypoint: a JSON array (\'["/bin/sh", "-c"]\') or one word',
    )
    p.add_argument(
        "--cmd", type=command_line, metavar="CMD", help="the command: a JSON array or one word"
    )
    p.add_argument("--workdir", metavar="DIR", help="the working directory")
    p.add_argument("--user", metavar="USER", help="the user (name or uid[:gid])")

    p = command(
        "rm",
        cmd_rm,
        help="remove layers",
        description="Remove LAYERs from the store. A layer an image uses is refused unless "
        "--force, which untags those images first. 'gc' then frees the space.",
    )
    p.add_argument("layers", metavar="LAYER", nargs="+", help=_LAYER_HELP)
    p.add_argument("-f", "--force", action="store_true", help="untag the images using them")

    p = command(
        "rmi",
        cmd_rmi,
        help="remove images",
        description="Untag each IMAGE and remove the layers that no remaining tag uses. An "
        "image digest with several tags is refused unless --force. 'gc' then frees the space.",
    )
    p.add_argument("images", metavar="IMAGE", nargs="+", help="a tag, or a tagged image's digest")
    p.add_argument("-f", "--force", action="store_true", help="remove every tag of a digest")

    p = command(
        "prune",
        cmd_prune,
        help="remove every layer no tag reaches, then gc",
        description="Remove every layer that no tagged image uses, then collect garbage.",
    )
    p.add_argument("-n", "--dry-run", action="store_true", help="only list what would go")

    p = command(
        "cat",
        cmd_cat,
        help="print a file of an image",
        description="Write the content of PATH in IMAGE to stdout.",
    )
    p.add_argument("image", metavar="IMAGE", help=_IMAGE_HELP)
    p.add_argument(
        "path", metavar="PATH", help="an absolute path in the image, e.g. /etc/os-release"
    )

    p = command(
        "tree",
        cmd_tree,
        help="list an image's files",
        description="List every path under PATH (default /) in IMAGE, with the layer (index, "
        "bottom 0) that provides it.",
    )
    p.add_argument("image", metavar="IMAGE", help=_IMAGE_HELP)
    p.add_argument("path", metavar="PATH", nargs="?", default="/", help="where to start")

    p = command(
        "materialize",
        cmd_materialize,
        help="write an image's files to a new directory",
        description="Write the union view of IMAGE to DEST, which must not exist: "
        "every owner (as root), mode, time, xattr, device (as root) and hardlink. DEST appears "
        "only once complete.",
    )
    p.add_argument("image", metavar="IMAGE", help=_IMAGE_HELP)
    p.add_argument("dest", metavar="DEST", help="the directory to create")
    p.add_argument(
        "--max-threads",
        type=positive_int,
        default=None,
        metavar="N",
        help="writer threads, at least 1 (default: one per core)",
    )

    p = command(
        "apply",
        cmd_apply,
        help="apply a layer onto a directory",
        description="Apply the changeset LAYER onto the existing directory DEST: its whiteouts "
        "and opaque markers remove what they hide, then its entries are written (replacing "
        "what is in their way).",
    )
    p.add_argument("layer", metavar="LAYER", help=_LAYER_HELP)
    p.add_argument("dest", metavar="DEST", help="an existing directory")

    p = command(
        "diff",
        cmd_diff,
        help="the changeset between two images or directories",
        description="Store the changeset taking A to B as a layer (or, with --compare-only, "
        "list it as 'docker diff' does: A added, C changed, D deleted). A and B are images or "
        "directories (an existing directory wins); image to directory compares metadata "
        "first and hashes only with --compare-content.",
    )
    p.add_argument("a", metavar="A", help="the old side: " + _IMAGE_HELP + "; or a directory")
    p.add_argument("b", metavar="B", help="the new side, likewise")
    p.add_argument("--compare-only", action="store_true", help="list changes, store nothing")
    p.add_argument("--compare-content", action="store_true", help="hash same-looking files")

    p = command(
        "squash",
        cmd_squash,
        help="squash a range of an image's layers into one",
        description="Squash layers START up to STOP of IMAGE into one layer with the same view. "
        "Layers are numbered from 0 at the bottom; STOP is excluded, as in a Python slice "
        "(--start 1 --stop 3 squashes layers 1 and 2); by default all of them. Optionally tag "
        "the resulting image and write the layer's tar.",
    )
    p.add_argument("image", metavar="IMAGE", help=_IMAGE_HELP)
    p.add_argument(
        "--start",
        type=non_negative_int,
        default=0,
        metavar="START",
        help="the first layer to squash, 0-based (default 0, the bottom)",
    )
    p.add_argument(
        "--stop",
        type=non_negative_int,
        default=None,
        metavar="STOP",
        help="the layer after the last one to squash (excluded; default: the top's + 1)",
    )
    p.add_argument("--tag", metavar="NAME", help="tag the image with the squashed range")
    p.add_argument("-o", "--output", metavar="FILE", type=Path, help="also write the tar here")

    p = command(
        "commit",
        cmd_commit,
        help="commit a directory's changes over an image as a new image",
        description="Store the changes from IMAGE to directory DIR (a container's "
        "root filesystem, say) as a layer, and tag IMAGE plus that layer as NAME.",
    )
    p.add_argument("image", metavar="IMAGE", help=_IMAGE_HELP)
    p.add_argument("dir", metavar="DIR", help="the changed root filesystem")
    p.add_argument("--tag", metavar="NAME", required=True, help="the new image's tag")

    add_mount_parsers(command)
    add_run_parsers(command)

    p = command(
        "pull",
        cmd_pull,
        help="pull an image from a registry",
        description="Pull image REF (host[:port]/repo[:tag][@digest]; a bare repo:tag is on "
        "Docker Hub) into the store, tagged with its full name. Layers the store holds are not "
        "downloaded; every blob is digest-checked.",
    )
    p.add_argument("ref", metavar="REF", help="the image: host[:port]/repo[:tag][@digest]")
    p.add_argument("--platform", metavar="OS/ARCH", default=None, help="default: this machine's")
    add_registry_options(p)

    p = command(
        "push",
        cmd_push,
        help="push an image to a registry",
        description="Push image IMAGE to REF. Blobs the registry has are not sent; an "
        "imported or pulled image keeps its digests.",
    )
    p.add_argument("image", metavar="IMAGE", help=_IMAGE_HELP)
    p.add_argument("ref", metavar="REF", help="where to: host[:port]/repo[:tag]")
    p.add_argument(
        "--compression",
        choices=["gzip", "zstd", "zstd:chunked", "none", "keep"],
        default="gzip",
        help="layer compression (zstd:chunked: other stores pull only the chunks they lack; "
        "keep: an imported image's own blobs; default gzip)",
    )
    add_registry_options(p)

    p = command(
        "analyze",
        cmd_analyze,
        help="where an image's bytes come from, and which are wasted",
        description="Analyse image IMAGE (a tag, or an OCI layout directory, which is imported "
        "into the store first) from the store's "
        "indices: per layer what it adds, modifies and deletes; waste of five kinds, each with "
        "its reason; dive's efficiency score beside ours. With CI rules (--ci, or a rule flag), "
        "exit 1 and print one line per broken rule.",
    )
    p.add_argument(
        "image", metavar="IMAGE", help=_IMAGE_HELP + ", or an OCI layout directory (imported)"
    )
    p.add_argument(
        "--ci",
        metavar="RULES",
        nargs="?",
        const="",
        default=None,
        help="check dive's CI rules, read from RULES (a .dive-ci file; default ./.dive-ci when "
        "it exists, else dive's defaults)",
    )
    p.add_argument(
        "--lowest-efficiency",
        "--lowestEfficiency",
        default=None,
        metavar="RATIO",
        help="fail when dive's efficiency score is below RATIO (0-1; dive's default 0.9)",
    )
    p.add_argument(
        "--highest-wasted-bytes",
        "--highestWastedBytes",
        default=None,
        metavar="BYTES",
        help="fail when dive's wasted bytes exceed BYTES (20MB, 1.5GiB, 4096; default disabled)",
    )
    p.add_argument(
        "--highest-user-wasted-percent",
        "--highestUserWastedPercent",
        default=None,
        metavar="RATIO",
        help="fail when wasted bytes / the bytes of every layer but the first exceed RATIO "
        "(dive's default 0.1)",
    )
    p.add_argument("--html", metavar="FILE", default=None, help="write a self-contained report")

    p = command(
        "compare",
        cmd_compare,
        help="what two images share, and what an update costs",
        description="What images A and B share (by layer and by chunk), and what pulling B "
        "costs with A present: as whole layers, whole files and chunks.",
    )
    p.add_argument("a", metavar="A", help=_IMAGE_HELP)
    p.add_argument("b", metavar="B", help=_IMAGE_HELP)

    p = command(
        "login",
        cmd_login,
        help="record credentials for a registry",
        description="Check USER's password against registry HOST (host[:port]) and record it in "
        "$REGISTRY_AUTH_FILE, else $XDG_RUNTIME_DIR/containers/auth.json, else "
        "~/.docker/config.json.",
    )
    p.add_argument("host", metavar="HOST", help="the registry, host[:port]")
    p.add_argument("-u", "--username", required=True, help="the user name")
    p.add_argument("-p", "--password", default=None, help="prefer --password-stdin")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add_registry_options(p, creds=False)

    p = command(
        "logout",
        cmd_logout,
        help="forget the credentials of a registry",
        description="Remove HOST's credentials from every auth file.",
    )
    p.add_argument("host", metavar="HOST", help="the registry, host[:port]")
    return parser


def _error(message: str) -> None:
    # One line, whatever the message holds.
    text = " ".join(message.split())
    sys.stderr.write(f"{PROG}: error: {text}\n")
    sys.stderr.flush()


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: IO[str] | None = None,
    line: str | None = None,
) -> None:
    warn(str(message))


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
    except (CliError, ls.LayerstoreError, ValueError, OSError) as e:
        _error(error_message(e))
        return EXIT_ERROR


def run() -> NoReturn:
    """The console-script entry point: exit with :func:`main`'s status."""
    sys.exit(main())


if __name__ == "__main__":
    run()
