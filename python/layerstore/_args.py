"""Integer arguments checked at the edge of the Python API.

The compiled core takes unsigned integers; without a check, ``-1`` would end in pyo3's
``OverflowError: can't convert negative int to unsigned``, which names neither the argument nor
the rule. Every check here raises a ``ValueError`` (or ``TypeError`` for a non-integer) that
names the argument and says what it accepts.
"""

from __future__ import annotations

import operator

__all__ = ["checked_int"]

#: The largest value of the core's 64-bit unsigned fields (sizes, offsets, ids).
U64_MAX = (1 << 64) - 1


def checked_int(name: str, value: object, *, minimum: int = 0, maximum: int = U64_MAX) -> int:
    """`value` as an int in ``minimum..=maximum``; else a ValueError naming `name`.

    Booleans are refused (``True`` is no mode or size); objects with ``__index__`` are accepted.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, not bool")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}") from None
    if number < minimum:
        rule = "must not be negative" if minimum == 0 else f"must be at least {minimum}"
        raise ValueError(f"{name} {rule}, got {number}")
    if number > maximum:
        limit = f"{maximum:#o}" if maximum in (0o7777,) else f"{maximum}"
        raise ValueError(f"{name} must be at most {limit}, got {number}")
    return number
