"""Exception and warning classes (the Rust core maps its errors onto these in one place)."""

from __future__ import annotations


class LayerstoreError(Exception):
    """Base class of every layerstore error."""


class InvalidLayerError(LayerstoreError, ValueError):
    """The input is not a valid layer: bad tar, bad whiteout, escaping path, limit exceeded."""


class IntegrityError(LayerstoreError):
    """A digest or size did not match, or a stored object is corrupt."""


class NotFoundError(LayerstoreError, LookupError):
    """A layer, tag or object does not exist."""


class AmbiguousError(NotFoundError):
    """A short id or prefix matches more than one object; the message lists the candidates."""


class StackDepthError(LayerstoreError):
    """A stack would exceed the store's depth limit."""


class ConflictError(LayerstoreError):
    """A lock, reference or concurrent change prevented the operation."""


class LayerstoreWarning(UserWarning):
    """Something was sanitised rather than rejected (for example a leading '/' removed)."""


__all__ = [
    "AmbiguousError",
    "ConflictError",
    "IntegrityError",
    "InvalidLayerError",
    "LayerstoreError",
    "LayerstoreWarning",
    "NotFoundError",
    "StackDepthError",
]
