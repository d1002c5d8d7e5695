"""Boolean options as they reach a bundle config: JSON ``true`` or the command line's ``'true'``."""

from __future__ import annotations

__all__ = ["as_flag"]

_FLAGS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def as_flag(value: bool | str | int, name: str) -> bool:
    """``value`` as a bool; ``name`` (the option) goes into the error for anything else.

    ``python -m monai.bundle run ... --overwrite false`` passes the *string* ``'false'``, which
    Python would take as true; this reads ``true/false``, ``1/0`` and ``yes/no`` (any case).

    Raises:
        ValueError: for any other value.
    """
    if isinstance(value, bool):
        return value
    key = str(value).strip().lower()
    if key not in _FLAGS:
        raise ValueError(f"{name} must be true or false, got {value!r}.")
    return _FLAGS[key]
