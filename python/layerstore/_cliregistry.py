"""The command line's registry options, shared by ``pull``, ``push``, ``login`` and ``build``.

``--tls-verify BOOL`` (as skopeo spells it; false also allows plain HTTP) and ``--creds
USER:PASSWORD`` (default: the auth files podman and docker write), turned into the keyword
arguments `Store.pull` and `Store.push` take.
"""

from __future__ import annotations

import argparse
from typing import Any

from layerstore._clistore import CliError

__all__ = ["add_registry_options", "creds", "pull_options", "tls_bool"]


def tls_bool(text: str) -> bool:
    """``true``/``false`` (as skopeo spells ``--tls-verify=false``)."""
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def add_registry_options(p: argparse.ArgumentParser, creds: bool = True) -> None:
    """Add ``--tls-verify`` and, with `creds`, ``--creds`` to a subcommand's parser."""
    p.add_argument(
        "--tls-verify",
        type=tls_bool,
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


def creds(args: argparse.Namespace) -> tuple[str, str] | None:
    """``--creds USER:PASSWORD`` as the (user, password) pair the API takes."""
    if args.creds is None:
        return None
    user, sep, password = args.creds.partition(":")
    if not sep or not user:
        raise CliError("--creds takes USER:PASSWORD")
    return user, password


def pull_options(args: argparse.Namespace) -> dict[str, Any]:
    """The registry options as `Store.pull` keyword arguments."""
    return {"auth": creds(args), "tls_verify": args.tls_verify}
