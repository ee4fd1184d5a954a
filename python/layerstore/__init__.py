"""layerstore: store, stack, diff and squash container-image layers, without a daemon.

The heavy work runs in a Rust core (``layerstore._core``) with the GIL released; this package
re-exports its classes and the exception hierarchy.
"""

from __future__ import annotations

from layerstore._analysis import Analysis, Comparison
from layerstore._build import BuildError, build
from layerstore._config import with_config
from layerstore._container import Container
from layerstore._core import (
    FORMAT_VERSION,
    Entry,
    Layer,
    Limits,
    Mount,
    Stack,
    Stat,
    Store,
    __version__,
    registry_login,
    registry_logout,
)
from layerstore._dockerfile import DockerfileError
from layerstore._errors import (
    AmbiguousError,
    ConflictError,
    IntegrityError,
    InvalidLayerError,
    LayerstoreError,
    LayerstoreWarning,
    NotFoundError,
    StackDepthError,
)
from layerstore._run import RunError, run
from layerstore._stackio import StackPath
from layerstore._types import (
    BlobInfo,
    DamagedChunk,
    FsckReport,
    GcReport,
    MountInfo,
    RepairReport,
    StoreStats,
)

__all__ = [
    "FORMAT_VERSION",
    "AmbiguousError",
    "Analysis",
    "BlobInfo",
    "BuildError",
    "Comparison",
    "ConflictError",
    "Container",
    "DamagedChunk",
    "DockerfileError",
    "Entry",
    "FsckReport",
    "GcReport",
    "IntegrityError",
    "InvalidLayerError",
    "Layer",
    "LayerstoreError",
    "LayerstoreWarning",
    "Limits",
    "Mount",
    "MountInfo",
    "NotFoundError",
    "RepairReport",
    "RunError",
    "Stack",
    "StackDepthError",
    "StackPath",
    "Stat",
    "Store",
    "StoreStats",
    "__version__",
    "build",
    "registry_login",
    "registry_logout",
    "run",
    "with_config",
]
