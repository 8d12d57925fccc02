"""What ``install()`` replaced in a runtime's modules, and putting it back (both adapters)."""

from __future__ import annotations

from typing import Any


def restore(installed: list[tuple[Any, str, Any]]) -> list[str]:
    """Undo the ``(module, attribute, original)`` patches in ``installed``, newest first; empties
    it and returns the restored names in the order they were patched."""
    restored = []
    while installed:
        module, attr, original = installed.pop()
        setattr(module, attr, original)
        restored.append(f"{module.__name__}.{attr}")
    return restored[::-1]
