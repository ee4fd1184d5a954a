"""``layerstore import``: tars (plain, gzip, zstd, xz, bzip2), directories, OCI layouts, docker
archives and standard input, each SRC in turn.

A failure names its SRC and what was imported before it; a first import that fails removes the
store it created; an image import that re-points an existing tag says so.
"""

from __future__ import annotations

import argparse
import bz2
import lzma
import os
import sys
import tarfile
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any, cast

import layerstore as ls
from layerstore._cliout import human_bytes, image_json, layer_json, print_json, progress_bar, warn
from layerstore._clistore import (
    CliError,
    error_message,
    new_store_path,
    open_store,
    remove_new_store,
)

__all__ = ["cmd_import", "is_docker_archive"]


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


_UNSUPPORTED_SCHEMES = ("docker://",)


def _transport(src: str) -> tuple[str, str]:
    """('oci' | 'docker-archive' | '', path) for a skopeo-style source name; a path that exists
    as given is a path even if it looks like a transport."""
    if os.path.lexists(src) or src == "-":
        return "", src
    for scheme in _UNSUPPORTED_SCHEMES:
        if src.startswith(scheme):
            raise CliError(f"{src}: registry transports are not supported yet")
    for name in ("oci", "docker-archive"):
        if src.startswith(name + ":"):
            return name, src[len(name) + 1 :]
    return "", src


def _layout_ref(rest: str) -> tuple[str, str | None]:
    """``DIR`` or ``DIR:REF`` of an ``oci:`` source: the first split whose DIR is a directory."""
    if os.path.isdir(rest):
        return rest, None
    for i, c in enumerate(rest):
        if c == ":" and os.path.isdir(rest[:i]):
            return rest[:i], rest[i + 1 :]
    return rest, None


def _check_sources(sources: Sequence[str]) -> None:
    """Refuse what cannot be imported before the store is touched (a missing file, two '-')."""
    if list(sources).count("-") > 1:
        raise CliError("standard input ('-') can be imported only once")
    for src in sources:
        kind, path = _transport(src)
        if kind == "oci":
            path = _layout_ref(path)[0]
        if path != "-" and not os.path.lexists(path):
            raise FileNotFoundError(2, os.strerror(2), path)
        if kind == "oci" and not os.path.isfile(os.path.join(path, "oci-layout")):
            raise CliError(f"{src}: not an OCI image layout (no oci-layout file)")


def _python_decoded(head: bytes) -> str | None:
    """'xz' or 'bzip2' when Python decodes the input for the core (which reads gzip and zstd)."""
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"BZh") and head[3:4] in b"123456789" and len(head) > 3:
        return "bzip2"
    return None


def _magic(src: str) -> tuple[bytes, int]:
    with open(src, "rb") as f:
        return f.read(6), os.fstat(f.fileno()).st_size


class _CountingReader:
    """A binary file whose reads advance a progress bar by the bytes read from the file itself:
    for a compressed input, progress against the file size (the uncompressed size is unknown)."""

    def __init__(self, f: IO[bytes], progress: Callable[[int], None]) -> None:
        self.f = f
        self.progress = progress
        self.done = 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.done += len(data)
        self.progress(self.done)
        return data


def _import_tar_file(store: ls.Store, src: str, show: bool) -> ls.Layer:
    """A tar file, plain or compressed: gzip and zstd decoded by the core, xz and bzip2 by
    Python's lzma and bz2 (the layer then records no compressed blob digest).

    The progress bar's total is the file's size: for a compressed file, the bar counts the
    file's bytes as they are read (the uncompressed size is not known in advance).
    """
    head, size = _magic(src)
    name = _python_decoded(head)
    label = os.path.basename(src)
    if name is None and not (head[:2] == b"\x1f\x8b" or head[:4] == b"\x28\xb5\x2f\xfd"):
        with progress_bar(label, size, show) as bar:
            return store.import_tar(src, progress=bar)
    with progress_bar(label, size, show) as bar:
        if name is None and bar is None:
            return store.import_tar(src)  # the core reads the path itself: fastest
        with open(src, "rb") as f:
            raw = f if bar is None else cast("IO[bytes]", _CountingReader(f, bar))
            if name is None:
                return store.import_tar(raw, progress=lambda _: None)
            with lzma.open(raw) if name == "xz" else bz2.open(raw) as decoded:
                return store.import_tar(decoded, progress=lambda _: None)


def _import_one(
    store: ls.Store, src: str, args: argparse.Namespace
) -> tuple[ls.Layer | None, Mapping[str, ls.Stack]]:
    kind, path = _transport(src)
    ref = None
    if kind == "oci":
        path, ref = _layout_ref(path)
    label = os.path.basename(path.rstrip("/")) or path
    if path == "-":
        if sys.stdin is None:
            raise CliError("no standard input to read a tar from")
        if sys.stdin.isatty():
            raise CliError("refusing to read a tar from a terminal (pipe one into '-')")
        with progress_bar("stdin", None, args.progress) as bar:
            return store.import_tar(sys.stdin.buffer, progress=bar), {}
    if kind == "oci" or (
        not kind and os.path.isdir(path) and os.path.isfile(os.path.join(path, "oci-layout"))
    ):
        before = store.images()
        with progress_bar(label, None, args.progress) as bar:
            images = store.import_oci(path, platform=args.platform, progress=bar)
        return None, images if ref is None else _keep_ref(store, before, images, ref)
    if kind == "docker-archive" or (
        not kind and not os.path.isdir(path) and is_docker_archive(path)
    ):
        with progress_bar(label, None, args.progress) as bar:
            return None, store.import_docker_archive(path, progress=bar)
    if os.path.isdir(path):
        with progress_bar(label, None, args.progress) as bar:
            layer = store.import_dir(path, exclude_xattrs=list(args.exclude_xattr), progress=bar)
        return layer, {}
    return _import_tar_file(store, path, args.progress), {}


def _keep_ref(
    store: ls.Store, before: Mapping[str, ls.Stack], images: Mapping[str, ls.Stack], ref: str
) -> dict[str, ls.Stack]:
    """Of a layout's images, keep `ref` tagged: every other tag the import set goes back to what
    it was (or away). Their layers stay in the store untagged ('prune' removes them)."""
    for name in images:
        if name == ref:
            continue
        if name in before:
            store.tag(before[name], name)
        else:
            store.untag(name)
    if ref not in images:
        if ref in before:
            store.tag(before[ref], ref)
        raise CliError(f"no image '{ref}' in the layout (it has: {', '.join(sorted(images))})")
    return {ref: images[ref]}


def _moved_tags(before: Mapping[str, ls.Stack], images: Mapping[str, ls.Stack]) -> dict[str, str]:
    """Tags an image import re-pointed: name -> what it named before (digest or chain id)."""
    moved = {}
    for name, image in images.items():
        old = before.get(name)
        if old is not None and (old.chain_id, old.digest) != (image.chain_id, image.digest):
            moved[name] = old.digest or old.chain_id
    return moved


def cmd_import(args: argparse.Namespace) -> int:
    """Import each SRC (see the module docstring); one JSON list with --json."""
    _check_sources(args.src)
    path = args.store
    created = new_store_path(path)
    store = open_store(path, create=True)
    results: list[dict[str, Any]] = []
    done: list[str] = []
    try:
        for src in args.src:
            try:
                before = store.images()
                layer, images = _import_one(store, src, args)
            except (ls.LayerstoreError, OSError, ValueError, CliError) as e:
                said = error_message(e)
                if src not in said:
                    said = f"{src}: {said}"
                if done:
                    said += f" (imported before it: {', '.join(done)})"
                elif len(args.src) > 1:
                    said += " (nothing imported)"
                raise CliError(said) from e
            done.append(src)
            if layer is not None:
                results.append({"source": src, **layer_json(layer)})
                if not args.json:
                    _print_imported_layer(src, layer)
                continue
            moved = _moved_tags(before, images)
            for name, old in moved.items():
                new = images[name].digest or images[name].chain_id
                warn(f"tag {name} now names {new} (it named {old})")
            results.append(
                {
                    "source": src,
                    "images": {name: image_json(im) for name, im in images.items()},
                    "moved_tags": moved,
                }
            )
            if not args.json:
                _print_imported_images(src, images)
    except BaseException:
        if not done and created is not None:
            # A failed first import leaves no store behind (it would only hold leftovers).
            del store
            remove_new_store(created)
        raise
    if args.json:
        print_json(results)
    return 0


def _print_imported_layer(src: str, layer: ls.Layer) -> None:
    print(f"imported {src}")
    print(f"  id       {layer.id}")
    print(f"  diff_id  {layer.diff_id}")
    print(f"  entries  {layer.entry_count:,}")
    print(f"  size     {human_bytes(layer.size)} ({layer.size:,} bytes)")
    sys.stdout.flush()


def _print_imported_images(src: str, images: Mapping[str, ls.Stack]) -> None:
    print(f"imported {src}")
    for name, image in images.items():
        print(f"  image    {name}")
        print(f"  digest   {image.digest}")
        print(f"  layers   {len(image)}")
    sys.stdout.flush()
