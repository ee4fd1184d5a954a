"""Images with a changed config: :func:`with_config` and ``layerstore config``.

The store records an image's manifest and config as they were imported or exported; it has no
call that writes a new config. So a changed config is written as an OCI image layout in a
scratch directory (the image exported with uncompressed layers, its config and manifest then
rewritten) and imported back under the new tag. Nothing new is stored but the config and
manifest (every layer is already in the store), yet every layer is read once and written to the
scratch directory: the cost of an export, in the temporary directory (``$TMPDIR``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import layerstore as ls

__all__ = ["with_config"]

_REF_NAME = "org.opencontainers.image.ref.name"


def _put_blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).write_bytes(data)
    return digest, len(data)


def _created(source_date_epoch: int | None) -> str:
    """Now (or `source_date_epoch`, else ``$SOURCE_DATE_EPOCH``) as RFC 3339, UTC."""
    if source_date_epoch is None and os.environ.get("SOURCE_DATE_EPOCH", "").isdigit():
        source_date_epoch = int(os.environ["SOURCE_DATE_EPOCH"])
    when = time.time() if source_date_epoch is None else source_date_epoch
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def with_config(
    store: ls.Store,
    image: ls.Stack,
    *,
    tag: str,
    env: Mapping[str, str] | None = None,
    entrypoint: Sequence[str] | None = None,
    cmd: Sequence[str] | None = None,
    workdir: str | None = None,
    user: str | None = None,
    labels: Mapping[str, str] | None = None,
    source_date_epoch: int | None = None,
) -> ls.Stack:
    """A new image, tagged `tag`: `image`'s layers with its config changed as asked.

    `env` and `labels` are merged into the config's (a key given replaces the old value);
    `entrypoint`, `cmd`, `workdir` and `user` replace theirs. The config's ``created`` is now
    (or `source_date_epoch`, else ``$SOURCE_DATE_EPOCH``), and its history gains an empty-layer
    step saying what changed. Returns the image as :meth:`Store.get` would.
    """
    if not tag:
        raise ValueError("tag must name the new image")
    with tempfile.TemporaryDirectory(prefix="layerstore-config-") as scratch:
        layout = Path(scratch) / "layout"
        manifest_digest = store.export_oci(image, layout, tag=tag, compression="none")
        blobs = layout / "blobs" / "sha256"
        manifest = json.loads((blobs / manifest_digest.split(":", 1)[1]).read_bytes())
        config_digest = manifest["config"]["digest"]
        config: dict[str, Any] = json.loads((blobs / config_digest.split(":", 1)[1]).read_bytes())
        settings: dict[str, Any] = dict(config.get("config") or {})
        changed = []
        if env:
            kept = [e for e in settings.get("Env") or [] if e.split("=", 1)[0] not in env]
            settings["Env"] = kept + [f"{k}={v}" for k, v in env.items()]
            changed.append("ENV " + " ".join(f"{k}={v}" for k, v in env.items()))
        for key, value, word in (
            ("Entrypoint", entrypoint, "ENTRYPOINT"),
            ("Cmd", cmd, "CMD"),
        ):
            if value is not None:
                settings[key] = list(value)
                changed.append(f"{word} {json.dumps(list(value))}")
        for key, text, word in (("WorkingDir", workdir, "WORKDIR"), ("User", user, "USER")):
            if text is not None:
                settings[key] = text
                changed.append(f"{word} {text}")
        if labels:
            settings["Labels"] = {**(settings.get("Labels") or {}), **labels}
            changed.append("LABEL " + " ".join(f"{k}={v}" for k, v in labels.items()))
        created = _created(source_date_epoch)
        config["config"] = settings
        config["created"] = created
        step = {"created": created, "created_by": "layerstore config: " + "; ".join(changed)}
        config["history"] = [*(config.get("history") or []), {**step, "empty_layer": True}]
        digest, size = _put_blob(layout, json.dumps(config, separators=(",", ":")).encode())
        manifest["config"] = {**manifest["config"], "digest": digest, "size": size}
        manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()
        new_manifest, manifest_size = _put_blob(layout, manifest_bytes)
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": manifest.get(
                        "mediaType", "application/vnd.oci.image.manifest.v1+json"
                    ),
                    "digest": new_manifest,
                    "size": manifest_size,
                    "annotations": {_REF_NAME: tag},
                }
            ],
        }
        (layout / "index.json").write_text(json.dumps(index))
        return store.import_oci(layout)[tag]
