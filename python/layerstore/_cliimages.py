"""The command line's image and removal commands: tag, images, untag, inspect, history, rm, rmi,
prune (``layerstore.cli`` wires them into the parser).

Images are what tags name. An imported (or exported) image has the manifest and config it came
with, which ``inspect`` prints and ``history`` reads; an image made in the store has none yet,
so its "created" is when its newest layer was stored and its history is the layers' recorded
build steps.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import layerstore as ls
from layerstore._cliout import (
    format_time,
    human_bytes,
    plural,
    print_json,
    print_table,
    short_digest,
)
from layerstore._clistore import (
    PROG,
    CliError,
    image_tags,
    resolve_image,
    resolve_layer,
    store_from,
)

__all__ = [
    "cmd_config",
    "cmd_history",
    "cmd_images",
    "cmd_inspect",
    "cmd_prune",
    "cmd_rm",
    "cmd_rmi",
    "cmd_tag",
    "cmd_untag",
    "has_tag",
    "history",
    "image_size",
]


def has_tag(store: ls.Store, name: str) -> bool:
    """Whether tag `name` exists."""
    try:
        store.get(name)
    except (ls.NotFoundError, ValueError):
        return False
    return True


def cmd_tag(args: argparse.Namespace) -> int:
    """``layerstore tag NAME SOURCE...``: point a tag at an image or a stack of layers."""
    store = store_from(args)
    if len(args.layers) == 1:
        # One argument: an image (a tag, digest) or a layer, as every other command takes it.
        image = resolve_image(store, args.layers[0])
    else:
        image = store.stack([resolve_layer(store, key) for key in args.layers])
    store.tag(image, args.name)
    if args.json:
        print_json({"tag": args.name, "chain_id": image.chain_id, "layers": len(image)})
    else:
        print(f"{args.name}  {image.chain_id}  ({plural(len(image), 'layer')})")
    return 0


def image_size(image: ls.Stack) -> int:
    """The image's layers' tar sizes, added up (uncompressed)."""
    return sum(layer.size for layer in image.layers)


def _image_created(image: ls.Stack) -> int:
    """When the image's newest layer was stored (the store keeps no image config time)."""
    return max((layer.created for layer in image.layers), default=0)


def cmd_images(args: argparse.Namespace) -> int:
    """``layerstore images``: tagged images with digest, size and time."""
    images = store_from(args).images()
    if args.json:
        print_json(
            {
                name: {
                    "chain_id": image.chain_id,
                    "digest": image.digest,
                    "config_digest": image.config_digest,
                    "layers": [layer.id for layer in image.layers],
                    "size": image_size(image),
                    "created": _image_created(image),
                }
                for name, image in images.items()
            }
        )
        return 0
    rows = [["TAG", "DIGEST", "CHAIN ID", "LAYERS", "SIZE", "CREATED"]]
    for name, image in sorted(images.items()):
        digest = image.digest or "-"
        if not args.no_trunc and image.digest:
            digest = short_digest(image.digest)
        chain = image.chain_id if args.no_trunc else short_digest(image.chain_id)
        rows.append(
            [
                name,
                digest,
                chain,
                str(len(image)),
                human_bytes(image_size(image)),
                format_time(_image_created(image)),
            ]
        )
    print_table(rows, right=frozenset({3, 4}))
    return 0


def cmd_untag(args: argparse.Namespace) -> int:
    """``layerstore untag NAME``: remove a tag (its layers stay)."""
    store_from(args).untag(args.name)
    return 0


def _history_json(layer: ls.Layer) -> dict[str, Any]:
    return {
        "id": layer.id,
        "diff_id": layer.diff_id,
        "size": layer.size,
        "created": layer.created,
        "created_by": layer.created_by,
        "compressed_digest": layer.compressed_digest,
    }


def _recorded(store: ls.Store, digest: str | None) -> Any:
    """A manifest or config the store recorded for an image, parsed; None when there is none."""
    if digest is None:
        return None
    try:
        return json.loads(store.oci_blob(digest)[1])
    except (ls.LayerstoreError, ValueError):
        return None


def cmd_inspect(args: argparse.Namespace) -> int:
    """``layerstore inspect IMAGE``: identity, layers, manifest and config as JSON."""
    store = store_from(args)
    image = resolve_image(store, args.image)
    doc = {
        "name": args.image,
        "tags": image_tags(store, image),
        "digest": image.digest,
        "config_digest": image.config_digest,
        "chain_id": image.chain_id,
        "size": image_size(image),
        "created": _image_created(image),
        "layers": [_history_json(layer) for layer in image.layers],
        # As imported (or last exported); None for an image only ever made in the store.
        "manifest": _recorded(store, image.digest),
        "config": _recorded(store, image.config_digest),
    }
    # docker inspect prints JSON either way.
    print_json(doc)
    return 0


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def history(store: ls.Store, image: ls.Stack) -> list[dict[str, Any]]:
    """The image's build steps, bottom first, as docker history lists them: from the config's
    ``history`` when it has one entry per layer (plus empty-layer steps), else one step per
    layer from what the store recorded (its ``created_by``, when it was stored)."""
    config = _recorded(store, image.config_digest)
    steps = config.get("history") if isinstance(config, dict) else None
    layers = list(image.layers)
    if isinstance(steps, list) and sum(not h.get("empty_layer") for h in steps) == len(layers):
        out = []
        remaining = iter(layers)
        for step in steps:
            layer = None if step.get("empty_layer") else next(remaining)
            out.append(
                {
                    "id": layer.id if layer else None,
                    "size": layer.size if layer else 0,
                    "created": step.get("created"),
                    "created_by": step.get("created_by") or (layer and layer.created_by),
                    "comment": step.get("comment"),
                    "empty_layer": layer is None,
                }
            )
        return out
    return [
        {
            "id": layer.id,
            "size": layer.size,
            "created": _iso(layer.created),
            "created_by": layer.created_by,
            "comment": None,
            "empty_layer": False,
        }
        for layer in layers
    ]


def _when(created: str | None) -> str:
    if not created:
        return "-"
    try:
        return format_time(datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return created[:16]


def cmd_history(args: argparse.Namespace) -> int:
    """``layerstore history IMAGE``: build steps, newest first, as docker prints them."""
    store = store_from(args)
    image = resolve_image(store, args.image)
    top_first = list(reversed(history(store, image)))
    if args.json:
        print_json(top_first)
        return 0
    rows = [["LAYER", "CREATED", "CREATED BY", "SIZE", "COMMENT"]]
    for step in top_first:
        created_by = step["created_by"] or ""
        if not args.no_trunc and len(created_by) > 45:
            created_by = created_by[:44] + "…"
        layer_id = step["id"] or "-"
        if step["id"] and not args.no_trunc:
            layer_id = short_digest(step["id"])
        size = human_bytes(step["size"])
        rows.append([layer_id, _when(step["created"]), created_by, size, step["comment"] or ""])
    print_table(rows, right=frozenset({3}))
    return 0


def key_value(text: str) -> tuple[str, str]:
    """argparse type: ``K=V`` (for --env and --label)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got '{text}'")
    return key, value


def command_line(text: str) -> list[str]:
    """argparse type: a JSON array of strings (``'["/bin/sh", "-c"]'``), else one word."""
    if not text.startswith("["):
        return [text]
    try:
        words = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a JSON array of strings: {text}") from None
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise argparse.ArgumentTypeError(f"not a JSON array of strings: {text}")
    return words


def cmd_config(args: argparse.Namespace) -> int:
    """``layerstore config IMAGE --env K=V … --tag NEW``: a new image with a changed config."""
    store = store_from(args)
    image = resolve_image(store, args.image)
    new = ls.with_config(
        store,
        image,
        tag=args.tag,
        env=dict(args.env) or None,
        entrypoint=args.entrypoint,
        cmd=args.cmd,
        workdir=args.workdir,
        user=args.user,
        labels=dict(args.label) or None,
    )
    doc = {"tag": args.tag, "digest": new.digest, "config_digest": new.config_digest}
    if args.json:
        print_json(doc)
    else:
        print(f"configured {args.tag} ({new.digest})")
    return 0


# ---------------------------------------------------------------------------------------------
# Removing: rm, rmi, prune


def _users(images: Mapping[str, ls.Stack], layer_id: str) -> list[str]:
    return sorted(n for n, im in images.items() if any(x.id == layer_id for x in im.layers))


def _gc_hint(args: argparse.Namespace, removed: int) -> None:
    if not args.json and removed:
        print(f"'{PROG} gc' frees the space they held")


def cmd_rm(args: argparse.Namespace) -> int:
    """``layerstore rm LAYER...``: remove layers (refused while used, unless --force)."""
    store = store_from(args)
    layers = {layer.id: layer for layer in (resolve_layer(store, k) for k in args.layers)}
    images = store.images()
    untagged: list[str] = []
    for layer_id in layers:
        users = _users(images, layer_id)
        if users and not args.force:
            raise CliError(
                f"layer {short_digest(layer_id)} is used by "
                f"{plural(len(users), 'image')} ({', '.join(users)}): "
                f"remove them first ('{PROG} rmi') or use --force to untag them"
            )
        for name in users:
            if name not in untagged:
                store.untag(name)
                untagged.append(name)
    for layer_id in layers:
        store.delete(layer_id)
    if args.json:
        print_json({"removed": list(layers), "untagged": untagged})
        return 0
    for name in untagged:
        print(f"untagged {name}")
    for layer_id in layers:
        print(f"removed {layer_id}")
    _gc_hint(args, len(layers))
    return 0


def cmd_rmi(args: argparse.Namespace) -> int:
    """``layerstore rmi IMAGE...``: untag images and remove the layers only they used."""
    store = store_from(args)
    untagged: list[str] = []
    candidates: list[str] = []
    for key in args.images:
        if has_tag(store, key):
            names = [key]
        else:
            names = image_tags(store, resolve_image(store, key))
            if not names:
                raise CliError(
                    f"'{key}' is a layer, not a tagged image ('{PROG} rm' removes layers)"
                )
            if len(names) > 1 and not args.force:
                raise CliError(
                    f"'{key}' is tagged {plural(len(names), 'time')} ({', '.join(names)}): "
                    "name a tag, or use --force to remove every tag"
                )
        for name in names:
            if name in untagged:
                continue
            candidates.extend(layer.id for layer in store.get(name).layers)
            store.untag(name)
            untagged.append(name)
    # The layers that no remaining tag uses go with the image.
    remaining = store.images()
    removed: list[str] = []
    for layer_id in dict.fromkeys(candidates):
        if not _users(remaining, layer_id):
            store.delete(layer_id)
            removed.append(layer_id)
    if args.json:
        print_json({"untagged": untagged, "removed": removed})
        return 0
    for name in untagged:
        print(f"untagged {name}")
    for layer_id in removed:
        print(f"removed {layer_id}")
    _gc_hint(args, len(removed))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """``layerstore prune``: remove every layer no tag reaches, then gc."""
    store = store_from(args)
    reached = {layer.id for image in store.images().values() for layer in image.layers}
    unreached = [layer.id for layer in store.layers() if layer.id not in reached]
    if not args.dry_run:
        for layer_id in unreached:
            store.delete(layer_id)
    report = store.gc() if not args.dry_run else None
    if args.json:
        print_json({"removed": unreached, "dry_run": args.dry_run, "gc": report})
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for layer_id in unreached:
        print(f"{verb} {layer_id}")
    summary = f"{verb} {plural(len(unreached), 'untagged layer')}"
    if report is not None:
        summary += f", reclaimed {human_bytes(report['bytes_reclaimed'])}"
    print(summary)
    return 0
