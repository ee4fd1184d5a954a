"""The command line's ``run`` and ``build`` (``layerstore.cli`` wires them in).

``layerstore run`` exits with the command's status (128 + n when a signal n ended it), so it
can stand in a script where the command would; its own failures exit 1 (125 when the container
could not be set up), as the rest of the CLI's do.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from layerstore._build import build
from layerstore._cliimages import key_value
from layerstore._cliout import print_json, short_digest
from layerstore._cliregistry import add_registry_options, pull_options
from layerstore._clistore import open_store, resolve_image, store_from
from layerstore._run import run

__all__ = ["add_run_parsers", "cmd_build", "cmd_run"]


def cmd_run(args: argparse.Namespace) -> int:
    """``layerstore run [--rm] [--commit TAG] [-e K=V] [-w DIR] [-u USER] IMAGE [-- CMD…]``."""
    store = store_from(args)
    image = resolve_image(store, args.image)
    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    env, cwd, user, network = dict(args.env), args.workdir, args.user, args.network
    if args.commit is None:
        return run(store, image, argv or None, env=env, cwd=cwd, user=user, network=network)
    status, layer = run(
        store, image, argv or None, env=env, cwd=cwd, user=user, network=network, commit=True
    )
    store.tag(image.push(layer), args.commit)
    if args.json:
        print_json({"status": status, "committed": layer.id, "tag": args.commit})
    else:
        print(f"committed {short_digest(layer.id)} as {args.commit}", file=sys.stderr)
    return status


def cmd_build(args: argparse.Namespace) -> int:
    """``layerstore build [-f FILE] [-t TAG] [--build-arg K=V] [--target STAGE] CONTEXT``.

    Like ``import`` and ``pull``, a build makes the store when there is none yet."""
    store = open_store(args.store, create=True)
    say: Callable[[str], object] = (
        (lambda line: print(line, file=sys.stderr)) if not args.quiet else (lambda _line: None)
    )
    image = build(
        store,
        args.context,
        args.file.resolve() if args.file is not None else "Dockerfile",
        tag=args.tag,
        build_args=dict(args.build_arg),
        target=args.target,
        progress=say,
        pull_options=pull_options(args),
    )
    if args.json:
        print_json({"digest": image.digest, "chain_id": image.chain_id, "tag": args.tag})
    else:
        print(image.digest)
    return 0


def add_run_parsers(add: Callable[..., Any]) -> None:
    """Add ``run`` and ``build`` (``add`` is cli.build_parser's helper that makes a
    subcommand's parser)."""
    p = add(
        "run",
        cmd_run,
        help="run a command in a container of an image",
        description=(
            "Run CMD (default: the image's Entrypoint and Cmd) in a writable mount of IMAGE, in "
            "new mount, PID, UTS, IPC and network namespaces (root only). Exits with the "
            "command's status. The changes are dropped unless --commit TAG stores them as a "
            "layer. A build and test runner, not a hardened runtime: no user namespace, "
            "seccomp, cgroups, or dropped capabilities."
        ),
    )
    p.add_argument("--rm", action="store_true", help="accepted; nothing is kept anyway")
    p.add_argument("--commit", metavar="TAG", help="store the changes; tag IMAGE + layer TAG")
    p.add_argument(
        "-e",
        "--env",
        type=key_value,
        action="append",
        default=[],
        metavar="K=V",
        help="set an environment variable (repeatable)",
    )
    p.add_argument("-w", "--workdir", metavar="DIR", help="working directory in the container")
    p.add_argument("-u", "--user", metavar="USER", help="user[:group] (names from the image)")
    p.add_argument(
        "--network",
        choices=["private", "host"],
        default="private",
        help="private (only loopback, the default) or host",
    )
    p.add_argument("image", metavar="IMAGE", help="a tag, an image digest or prefix")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD", help="-- CMD [ARG…]")
    p = add(
        "build",
        cmd_build,
        help="build an image from a Dockerfile",
        description="Build the Dockerfile in CONTEXT (or -f FILE), one layer per RUN, COPY and "
        "ADD, reusing the store's build cache; print the image digest.",
    )
    p.add_argument("-f", "--file", type=Path, default=None, help="the Dockerfile")
    p.add_argument("-t", "--tag", default=None, metavar="TAG", help="tag the image")
    p.add_argument(
        "--build-arg",
        type=key_value,
        action="append",
        default=[],
        metavar="K=V",
        help="set an ARG (repeatable)",
    )
    p.add_argument("--target", default=None, metavar="STAGE", help="stop at this stage")
    p.add_argument("-q", "--quiet", action="store_true", help="no step lines on stderr")
    add_registry_options(p)  # for FROM images the store lacks, pulled from their registry
    p.add_argument("context", metavar="CONTEXT", help="the build context directory")
