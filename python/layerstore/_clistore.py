"""How the command line finds its store and the images and layers its arguments name.

- The store: ``--store DIR``, else ``$LAYERSTORE_HOME``, else the XDG data directory. Only
  commands that import create one, and never inside a non-empty directory that is not a store
  (as ``git init`` would not take over a directory that is something else).
- An image argument is a tag, a tagged image's digest, chain id or config digest (or a unique hex
  prefix of one), else a layer (as a one-layer image).
- A layer argument is a layer id, diff_id, compressed blob digest or a unique hex prefix of the
  id or diff_id; a prefix shorter than :data:`MIN_PREFIX` hex digits is refused with a request
  for more, not reported as "not found".
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import layerstore as ls

__all__ = [
    "MIN_PREFIX",
    "CliError",
    "NewStore",
    "check_prefix",
    "default_store_dir",
    "error_message",
    "new_store_path",
    "open_store",
    "remove_new_store",
    "resolve_image",
    "resolve_layer",
    "store_from",
]

PROG = "layerstore"

#: The fewest hex digits a prefix must have (the core's rule; README says so too).
MIN_PREFIX = 6

_HEX = frozenset("0123456789abcdef")


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


def is_store(path: Path) -> bool:
    """Whether `path` holds a store (its metadata database)."""
    return (path / "meta.db").is_file()


@dataclass(frozen=True)
class NewStore:
    """What creating a store at `path` creates, for :func:`remove_new_store` to take away again
    when the first import fails."""

    #: The store directory.
    path: Path
    #: The outermost directory created for it: `path` itself or one of its ancestors.
    top: Path
    #: `path` was an empty directory already: only what is put into it goes.
    existed: bool


def new_store_path(path: Path) -> NewStore | None:
    """What a store at `path` would create (None when `path` holds a store or anything else)."""
    if path.is_dir() and not is_store(path) and not any(path.iterdir()):
        return NewStore(path, path, existed=True)
    if path.exists() or path.is_symlink():
        return None
    top = path.absolute()
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    return NewStore(path.absolute(), top, existed=False)


def remove_new_store(created: NewStore | None) -> None:
    """Remove what a failed first import created (see :func:`new_store_path`). Directories
    created above the store go only while empty: whatever else appeared in them stays."""
    if created is None:
        return
    if created.existed:
        for child in created.path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        return
    shutil.rmtree(created.path, ignore_errors=True)
    parent = created.path.parent
    while created.top in (parent, *parent.parents):
        try:
            parent.rmdir()
        except OSError:
            break
        parent = parent.parent


def open_store(path: Path, *, create: bool = False) -> ls.Store:
    """The store at `path`; with `create`, a new one if `path` is missing or an empty directory.

    A non-empty directory that is not a store is refused, not filled.
    """
    if is_store(path):
        return ls.Store(path)
    if not create:
        raise CliError(
            f"no store at {path} (use --store DIR or $LAYERSTORE_HOME; '{PROG} import' creates one)"
        )
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise CliError(f"store {path} is not a directory")
        if any(path.iterdir()):
            raise CliError(
                f"{path} is not empty and is not a layerstore store "
                "(refusing to fill it; give a new or empty directory)"
            )
    return ls.Store(path)


def _hex_part(key: str) -> tuple[str, str] | None:
    """('sha256', 'abc…') for 'sha256:abc…', ('', 'abc…') for bare hex; None if not hex."""
    algo, _, digits = key.rpartition(":")
    if algo not in ("", "sha256", "blake3") or not digits:
        return None
    digits = digits.lower()
    return (algo, digits) if set(digits) <= _HEX else None


def check_prefix(key: str) -> None:
    """Refuse a hex prefix too short to name one thing, asking for more digits."""
    part = _hex_part(key)
    if part is not None and len(part[1]) < MIN_PREFIX:
        raise CliError(
            f"'{key}' is too short to name a layer or image: "
            f"give at least {MIN_PREFIX} hex digits of its id"
        )


def resolve_layer(store: ls.Store, key: str) -> ls.Layer:
    """The layer `key` names (id, diff_id, blob digest, or a unique prefix of 6+ hex digits)."""
    check_prefix(key)
    return store.layer(key)


def _digest_matches(digest: str | None, part: tuple[str, str]) -> bool:
    if digest is None:
        return False
    algo, _, hexdigits = digest.partition(":")
    return (part[0] in ("", algo)) and hexdigits.startswith(part[1])


def resolve_image(store: ls.Store, key: str) -> ls.Stack:
    """The image `key` names: a tag; a tagged image's digest, chain id or config digest, or a
    unique prefix of one; else a layer, as a one-layer image."""
    try:
        return store.get(key)
    except (ls.NotFoundError, ValueError):
        pass
    part = _hex_part(key)
    if part is not None:
        check_prefix(key)
        found: dict[str, ls.Stack] = {}
        for image in store.images().values():
            digests = (image.digest, image.chain_id, image.config_digest)
            if any(_digest_matches(d, part) for d in digests):
                found[image.chain_id + (image.digest or "")] = image
        if len(found) > 1:
            raise CliError(f"'{key}' names {len(found)} images: give more hex digits")
        if found:
            return next(iter(found.values()))
    try:
        layer = store.layer(key)
    except ls.NotFoundError:
        raise CliError(
            f"no image or layer '{key}' (give a tag, an image or layer digest, "
            f"or a unique prefix of at least {MIN_PREFIX} hex digits)"
        ) from None
    return store.stack([layer])


def image_tags(store: ls.Store, image: ls.Stack) -> list[str]:
    """The tags that name `image` (same layers and, when known, same manifest digest)."""
    return sorted(
        name
        for name, other in store.images().items()
        if other.chain_id == image.chain_id and other.digest == image.digest
    )


def store_from(args: argparse.Namespace) -> ls.Store:
    """The existing store ``--store`` (or its default) names; commands other than import."""
    path: Path = args.store
    return open_store(path)


def _os_error_message(e: OSError) -> str:
    """'PATH: No such file or directory': what failed and why, once.

    Python's OSErrors carry errno, strerror and filename; the core's carry errno and a message
    that already names the path (``[Errno N]`` is noise to a user).
    """
    if e.strerror:
        if e.filename is not None:
            return f"{os.fsdecode(e.filename)}: {e.strerror}"
        return str(e.strerror)
    return str(e) or type(e).__name__


def error_message(e: BaseException) -> str:
    """The one-line text of an error the CLI reports."""
    if isinstance(e, OSError):
        return _os_error_message(e)
    return str(e) or type(e).__name__
