"""The builder's bookkeeping: its cache file, and the OCI config of the image it builds.

**Cache.** ``<store>/build-cache.json`` maps a step's key (a sha256 over the parent chain id,
the instruction after substitution, the environment and arguments it sees and, for ``COPY`` and
``ADD``, the digest of its sources) to the layer the step made, and the key of a finished image
(its chain id and config settings) to the manifest digest written for it. It is rewritten
atomically (a temporary file renamed over it); an entry whose layer or image is gone is a miss.

**Config.** The store writes configs only when it exports, so :func:`write_image` exports the
stack as an OCI layout in a scratch directory, replaces its config (settings, history with
``empty_layer`` flags, ``created``) and imports it back: nothing new is stored but two small
blobs, yet every layer is read once (see :func:`write_image`'s timing in ``progress``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerstore._errors import NotFoundError

if TYPE_CHECKING:
    from layerstore._core import Stack, Store

__all__ = ["BuildCache", "rfc3339", "step_key", "write_image"]

CACHE_FILE = "build-cache.json"


def step_key(*parts: object) -> str:
    """A cache key: sha256 of the parts as canonical JSON."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def rfc3339(when: float) -> str:
    """``when`` (seconds since the epoch) as RFC 3339 in UTC, with nanoseconds if it has any."""
    whole = int(when)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    frac = round((when - whole) * 1e9)
    return f"{text}.{frac:09d}Z" if frac else f"{text}Z"


class BuildCache:
    """The build cache of one store (see the module docs)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.path = Path(store.path) / CACHE_FILE
        try:
            self.entries: dict[str, str] = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            self.entries = {}
        self.hits = 0
        self.misses = 0

    def layer(self, key: str) -> str | None:
        """The id of the layer cached under ``key``, if the store still has it."""
        layer_id = self.entries.get(key)
        if layer_id is not None:
            try:
                self.store.layer(layer_id)
            except NotFoundError:
                layer_id = None
        if layer_id is None:
            self.misses += 1
        else:
            self.hits += 1
        return layer_id

    def image(self, key: str) -> Stack | None:
        """The image written under ``key``, if the store still holds one with that manifest."""
        digest = self.entries.get(key)
        if digest is None:
            return None
        return next((s for s in self.store.images().values() if s.digest == digest), None)

    def put(self, key: str, value: str) -> None:
        """Record ``key`` → ``value`` and rewrite the file atomically."""
        self.entries[key] = value
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".build-cache-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.entries, f, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def _recorded_config(store: Store, image: Stack) -> dict[str, Any]:
    """The config recorded for `image` (imported or built), else an empty one."""
    if image.config_digest is None:
        return {}
    _media_type, data = store.oci_blob(image.config_digest)
    config: dict[str, Any] = json.loads(data)
    return config


def _generated_history(image: Stack, count: int) -> list[dict[str, Any]]:
    """What the store writes for layers without a recorded history: each layer's build step (or
    its id) dated when the layer was stored."""
    return [
        {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(layer.created)),
            "created_by": layer.created_by or f"layerstore: layer {layer.id}",
        }
        for layer in image.layers[:count]
    ]


_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le"}


def write_image(
    store: Store,
    image: Stack,
    *,
    settings: Mapping[str, Any],
    history: list[dict[str, Any]],
    base_history: list[dict[str, Any]] | None,
    base_layers: int,
    created: str,
    author: str | None,
    tag: str,
) -> Stack:
    """``image`` with a config of ``settings`` and the history ``base_history`` (None: the
    recorded or generated entries of the base layers) + ``history``, recorded under ``tag``
    (``Store.write_image``: no layer is read or copied)."""
    config = _recorded_config(store, image)
    if base_history is None:
        recorded = [h for h in config.get("history") or [] if not h.get("empty_layer")]
        base_history = (recorded or _generated_history(image, base_layers))[:base_layers]
    new_config: dict[str, Any] = {"created": created}
    if author:
        new_config["author"] = author
    new_config |= {
        "architecture": config.get("architecture", _ARCH.get(os.uname().machine, "amd64")),
        "os": config.get("os", "linux"),
        "config": dict(settings),
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in image.layers]},
        "history": [*base_history, *history],
    }
    data = json.dumps(new_config, separators=(",", ":")).encode()
    return store.write_image(image, data, tag=tag)
