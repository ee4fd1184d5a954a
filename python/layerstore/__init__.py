"""layerstore: store, stack, diff and squash container-image layers, without a daemon.

The heavy work runs in a Rust core (``layerstore._core``) with the GIL released; this package
re-exports its classes and the exception hierarchy.
"""

from __future__ import annotations

from layerstore._core import FORMAT_VERSION, Entry, Layer, Limits, Store, __version__
from layerstore._errors import (
    ConflictError,
    IntegrityError,
    InvalidLayerError,
    LayerstoreError,
    LayerstoreWarning,
    NotFoundError,
    StackDepthError,
)

__all__ = [
    "FORMAT_VERSION",
    "ConflictError",
    "Entry",
    "IntegrityError",
    "InvalidLayerError",
    "Layer",
    "LayerstoreError",
    "LayerstoreWarning",
    "Limits",
    "NotFoundError",
    "StackDepthError",
    "Store",
    "__version__",
]
