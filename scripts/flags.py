"""Options as they reach a bundle config: booleans (JSON ``true`` or the command line's ``'true'``) and paths."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["as_flag", "as_path"]

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


def as_path(value: Any, option: str) -> str:
    """``value`` as a path string, or a ``ValueError`` naming ``option`` when the command line made it something else.

    ``--dataset_dir -x.nii.gz`` reaches a config as ``True`` (the command line reads ``-x.nii.gz``
    as an option of its own); ``--dataset_dir=-x.nii.gz`` or ``./-x.nii.gz`` keep the name.
    """
    if isinstance(value, (str, os.PathLike)) and os.fspath(value):
        return os.fspath(value)
    raise ValueError(
        f"{option} must be a path, got {value!r}. A path that starts with '-' is read as an option by the command "
        f"line: write {option}=-name or {option} ./-name."
    )
