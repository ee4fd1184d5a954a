"""The command line's mount commands: mount, umount, mounts (``layerstore.cli`` wires them in).

A CLI mount outlives the command. An overlay mount is left to the kernel (disowned: it lives
until ``umount``); a FUSE mount needs a serving process, so ``mount`` starts one in a session of
its own (``layerstore _serve-mount``), waits until the mount is in place, and returns; the
server ends when the mount is unmounted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from layerstore._cliout import print_json, print_table, short_digest
from layerstore._clistore import CliError, resolve_image, store_from

__all__ = ["add_mount_parsers", "cmd_mount", "cmd_mounts", "cmd_serve_mount", "cmd_umount"]

READY = "ready"


def _mount_text(image: str, target: str, backend: str, rw: bool) -> str:
    mode = "read-write" if rw else "read-only"
    return f"mounted {image} at {target} ({backend}, {mode})"


def cmd_mount(args: argparse.Namespace) -> int:
    """``layerstore mount IMAGE DIR [--rw] [--backend B]``: mount an image; it stays mounted."""
    store = store_from(args)
    image = resolve_image(store, args.image)
    target = str(Path(args.dir).resolve())
    backend = args.backend
    if backend == "auto":
        backend = "overlay" if os.geteuid() == 0 else "fuse"
    if backend == "fuse":
        _spawn_server(args, target)
        info = next((m for m in store.mounts() if m["target"] == target), None)
    else:
        info = store.mount(image, target, writable=args.rw, backend=backend).disown()
    if args.json:
        print_json(info)
    else:
        print(_mount_text(args.image, target, backend, args.rw))
    return 0


def _spawn_server(args: argparse.Namespace, target: str) -> None:
    """Start the FUSE server in its own session and wait until it reports the mount in place."""
    argv = [sys.executable, "-m", "layerstore", "--store", str(args.store), "_serve-mount"]
    argv += [args.image, target] + (["--rw"] if args.rw else [])
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline().strip()
    if line != READY:
        proc.wait()
        message = proc.stderr.read().strip().splitlines()
        raise CliError(message[-1] if message else f"the mount server exited ({proc.returncode})")
    proc.stdout.close()
    proc.stderr.close()


def cmd_serve_mount(args: argparse.Namespace) -> int:
    """``layerstore _serve-mount IMAGE DIR [--rw]``: serve a FUSE mount until it is unmounted."""
    store = store_from(args)
    image = resolve_image(store, args.image)
    mount = store.mount(image, args.dir, writable=args.rw, backend="fuse")
    print(READY, flush=True)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    mount.wait()
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    """``layerstore umount DIR [--commit TAG]``: unmount, optionally committing the changes."""
    store = store_from(args)
    target = str(Path(args.dir).resolve())
    info = next((m for m in store.mounts() if m["target"] == target), None)
    if info is None:
        raise CliError(f"{target}: no mount of this store is there (see 'layerstore mounts')")
    layer = store.unmount(target, commit=args.commit is not None, created_by=args.created_by)
    if layer is not None:
        store.tag(store.stack([*info["layers"], layer]), args.commit)
    if args.json:
        print_json({"target": target, "committed": layer.id if layer else None, "tag": args.commit})
    elif layer is not None:
        print(f"committed {short_digest(layer.id)} as {args.commit}; unmounted {target}")
    else:
        print(f"unmounted {target}")
    return 0


def cmd_mounts(args: argparse.Namespace) -> int:
    """``layerstore mounts``: the live mounts of the store."""
    mounts = store_from(args).mounts()
    if args.json:
        print_json(mounts)
        return 0
    if not mounts:
        print("no mounts")
        return 0
    rows = [["TARGET", "BACKEND", "MODE", "LAYERS", "SINCE", "OWNER"]]
    for m in mounts:
        since = datetime.fromtimestamp(m["created"], UTC).strftime("%Y-%m-%d %H:%M:%S")
        rows.append(
            [
                m["target"],
                m["backend"],
                "rw" if m["writable"] else "ro",
                str(len(m["layers"])),
                since,
                "process" if m["owned"] else "until umount",
            ]
        )
    print_table(rows, right=frozenset({3}))
    return 0


def add_mount_parsers(add: Callable[..., Any]) -> None:
    """Add mount, umount, mounts and the hidden _serve-mount (``add`` is cli.build_parser's
    helper that makes a subcommand's parser)."""
    p = add(
        "mount",
        cmd_mount,
        help="mount an image (kernel overlayfs or FUSE)",
        description=(
            "Mount IMAGE at the empty directory DIR. The overlay backend (root) stacks layer "
            "snapshots the store writes once and shares; the fuse backend serves the image "
            "straight from the store (nothing extracted). With --rw, writes go to an upper "
            "directory in the store; 'umount --commit TAG' stores them as a layer."
        ),
    )
    p.add_argument("image", metavar="IMAGE", help="a tag, an image or layer digest or prefix")
    p.add_argument("dir", metavar="DIR", help="an existing empty directory")
    p.add_argument("--rw", action="store_true", help="writable (changes kept until umount)")
    p.add_argument(
        "--backend",
        choices=["auto", "overlay", "fuse"],
        default="auto",
        help="overlay (root) or fuse; auto: overlay as root, else fuse",
    )
    p = add(
        "umount",
        cmd_umount,
        help="unmount a mount of the store",
        description="Unmount DIR; with --commit TAG, first store its changes as a layer and "
        "tag the image plus that layer TAG.",
    )
    p.add_argument("dir", metavar="DIR", help="where the image is mounted")
    p.add_argument("--commit", metavar="TAG", default=None, help="commit the changes as TAG")
    p.add_argument("--created-by", default=None, help="the history text of the committed layer")
    add("mounts", cmd_mounts, help="list the store's mounts", description="List live mounts.")
    p = add(
        "_serve-mount",
        cmd_serve_mount,
        description="(internal) Serve a FUSE mount until it is unmounted; 'mount' starts it.",
    )
    p.add_argument("image", metavar="IMAGE", help="the image to serve")
    p.add_argument("dir", metavar="DIR", help="where to mount it")
    p.add_argument("--rw", action="store_true", help="a writable overlay over the FUSE view")
