"""Integer settings read from the environment (``EPLB_TRITON_*``): one parser, one error format."""

from __future__ import annotations

import os

__all__ = ["int_setting"]


def int_setting(name: str, default: int, *, minimum: int, what: str = "an int") -> int:
    """``int(os.environ[name])``, or ``default`` when it is unset or empty; a value that is not an
    integer, or is below ``minimum``, raises ``ValueError`` naming the variable (``what`` says
    what it holds, e.g. ``"an integer number of bytes"``)."""
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name} must be {what}, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be {what} >= {minimum}, got {value!r}")
    return number
