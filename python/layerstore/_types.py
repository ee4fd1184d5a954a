"""The shapes of the reports `Store.stats()`, `gc()`, `fsck()` and `Layer.blobs()` return."""

from __future__ import annotations

from typing import TypedDict


class StoreStats(TypedDict):
    """What `Store.stats()` returns: sizes in bytes."""

    layers: int
    chunks: int
    packs: int
    logical_bytes: int
    """Uncompressed tar bytes of every layer."""
    content_bytes: int
    """Bytes of every distinct chunk."""
    stored_bytes: int
    """Bytes of the pack blocks that hold live chunks (after compression)."""
    metadata_bytes: int
    """Encoded entry lists and tar recipes."""
    disk_bytes: int
    """Every file of the store, as the file system counts them."""
    dedup_ratio: float
    """logical_bytes / (stored_bytes + metadata_bytes)."""


class GcReport(TypedDict):
    """What `Store.gc()` did."""

    chunks_removed: int
    packs_removed: int
    packs_rewritten: int
    bytes_reclaimed: int
    deferred: bool
    """Some unreferenced chunks were kept: imports in flight may use them (a later gc frees)."""
    mounts_reaped: int
    """Mounts whose owner process died (or that were unmounted from outside) cleaned up."""
    snapshots_removed: int
    """Layer snapshots of overlay mounts removed (their layers were deleted)."""
    packs_not_rewritten: int
    """Packs worth compacting left as they were: the disk had no room for the new pack."""


class MountInfo(TypedDict):
    """A live mount of the store, as `Store.mounts()` lists it."""

    id: str
    target: str
    backend: str
    """``overlay`` (kernel overlayfs over layer snapshots) or ``fuse``."""
    writable: bool
    owned: bool
    """True: lives while the process that made it runs; False: until ``umount``."""
    created: int
    layers: list[str]
    """Layer ids, bottom first."""


class BlobInfo(TypedDict):
    """A compressed blob known for a layer, as `Layer.blobs()` lists it."""

    digest: str
    """``sha256:<hex>`` of the compressed bytes."""
    compression: str
    size: int | None
    """Bytes, where recorded (None for a blob the layer was only imported from)."""
    origin: str
    """``imported`` (the layer was imported from it), ``kept`` (an image import kept its bytes),
    or how the store rebuilds it for an image that uses it (``stream``, ``pgzip``)."""


class DamagedChunk(TypedDict):
    """A chunk `fsck` found damaged, and the files that need it."""

    chunk: str
    pack: str
    reason: str
    used_by: list[tuple[str, str]]
    """(layer id, absolute path) of each file whose content uses the chunk."""


class RepairReport(TypedDict):
    """What `fsck(repair=True)` changed."""

    chunks_retired: int
    layers_broken: list[str]


class FsckReport(TypedDict):
    """What `Store.fsck()` found (and, with `repair=True`, did)."""

    ok: bool
    problems: list[str]
    garbage: list[str]
    """Files left by interrupted imports (`gc` removes them); not problems."""
    chunks_checked: int
    layers_checked: int
    damaged: list[DamagedChunk]
    broken: list[str]
    """Layers marked broken by a repair (every read of them fails until re-imported)."""
    repaired: RepairReport | None


__all__ = ["DamagedChunk", "FsckReport", "GcReport", "MountInfo", "RepairReport", "StoreStats"]
