"""Checkpoint files: atomic writes, safe loads, and a clear error when weights do not fit the network.

:func:`save_atomic` writes to a temporary file in the same folder and renames it over the old
one, so a killed process leaves the previous file whole. :func:`load_checkpoint` reads with
``torch.load(..., weights_only=True)`` (no pickled code) and names the file in every error;
:func:`check_state_dict` compares a state dict with a network and, when they differ, names the
file, the config's network (:func:`describe_network`) and what the file holds. The handlers
that use them are in :mod:`scripts.checkpoints`.
"""

from __future__ import annotations

import glob
import logging
import os
import pickle
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "save_atomic",
    "remove_stale_temporaries",
    "load_checkpoint",
    "describe_network",
    "check_state_dict",
    "unwrap",
]

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the network; the message names the file."""


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint file that does not exist; the message names it."""

# what describe_network reports, each from the first (sub)module that has it
ARCHITECTURE_FIELDS = ("in_channels", "out_channels", "num_directions", "channels", "strides")


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The module inside a (Distributed)DataParallel wrapper, so state-dict keys have no ``module.``."""
    wrappers = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    return network.module if isinstance(network, wrappers) else network


def _temporary_pattern(path: str) -> tuple[str, str, str]:
    """``(folder, prefix, suffix)`` of the temporary files :func:`save_atomic` writes for ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    return folder, f".{os.path.basename(path)}.", ".tmp"


def remove_stale_temporaries(path: str) -> None:
    """Delete temporary files of ``path`` that a killed :func:`save_atomic` left behind."""
    folder, prefix, suffix = _temporary_pattern(path)
    for stale in glob.glob(os.path.join(glob.escape(folder), glob.escape(prefix) + "*" + suffix)):
        os.remove(stale)
        logger.info("removed %s, left by an interrupted save", stale)


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` through a temporary file in the same folder and ``os.replace``.

    The rename is atomic on POSIX and Windows: at any moment ``path`` is the old file or the
    new one, whole. The data are flushed to disk before the rename, so a crash of the machine
    does not leave an empty file either. The new file gets the permissions of a file created
    normally (``tempfile`` would make it readable by its owner only).
    """
    folder, prefix, suffix = _temporary_pattern(path)
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def load_checkpoint(path: str, map_location: Any = None) -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file and the problem.

    Raises:
        CheckpointNotFoundError (a FileNotFoundError): ``path`` does not exist.
        CheckpointError (a ValueError): the file is truncated or not a PyTorch file, or holds Python objects that
            ``weights_only=True`` refuses to unpickle.
    """
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0]
        raise CheckpointError(
            f"{path} cannot be loaded with torch.load(weights_only=True): it holds Python objects besides "
            f"tensors and plain containers ({reason}). Load only files you trust, and save a state_dict."
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch file (truncated or corrupt?): {e}") from e


def describe_network(network: torch.nn.Module) -> str:
    """The class of a network and its architecture arguments, e.g. ``UNet25D(in_channels=1,
    out_channels=1, num_directions=16, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2))``.

    Each field of :data:`ARCHITECTURE_FIELDS` comes from the first module (the network itself,
    then its submodules in order) that has it; a wrapper such as ``Sequential`` reports its parts'.
    """
    args = ", ".join(f"{name}={value}" for name, value in _architecture(network).items())
    return f"{type(unwrap(network)).__name__}({args})"


def _architecture(network: torch.nn.Module) -> dict[str, Any]:
    """The fields of :data:`ARCHITECTURE_FIELDS` that ``network`` or its submodules have, in that order."""
    fields: dict[str, Any] = {}
    for module in unwrap(network).modules():
        for name in ARCHITECTURE_FIELDS:
            if name not in fields and hasattr(module, name):
                value = getattr(module, name)
                fields[name] = tuple(value) if isinstance(value, (list, tuple)) else value
    return {name: fields[name] for name in ARCHITECTURE_FIELDS if name in fields}


def _summary(state_dict: Mapping) -> str:
    """``N tensors (V values) under a, b, c``: the size and the top-level modules of a state dict."""
    values = sum(int(v.numel()) for v in state_dict.values() if isinstance(v, torch.Tensor))
    tops = sorted({key.split(".", 1)[0] for key in state_dict})
    return f"{len(state_dict)} tensors ({values} values) under {', '.join(tops) or 'nothing'}"


def _shape(value: Any) -> tuple:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def _examples(items: list[str], separator: str = ", ", count: int = 3) -> str:
    return separator.join(items[:count]) + (f"{separator}..." if len(items) > count else "")


def check_state_dict(state_dict: Any, network: torch.nn.Module, path: str) -> None:
    """Check that ``state_dict`` (read from ``path``) has exactly the keys and shapes of ``network``.

    Raises:
        CheckpointError (a ValueError): it does not; the message names ``path``, the network (:func:`describe_network`),
            what the file holds, the missing, unexpected and differently shaped tensors, and the
            number of output channels (K) of both when the network's last layer shows it.
    """
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{path} holds a {type(state_dict).__name__}, not a state dict of network weights.")
    expected = unwrap(network).state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    reshaped = [k for k in expected if k in state_dict and _shape(state_dict[k]) != _shape(expected[k])]
    if not (missing or unexpected or reshaped):
        return
    lines = [
        f"{path} does not fit the network of this config.",
        f"  network:    {describe_network(network)}: {_summary(expected)}",
        f"  checkpoint: {_summary(state_dict)}",
    ]
    if missing or unexpected:
        lines.append(
            f"  another architecture: {len(missing)} tensors of the network are not in the checkpoint"
            f" ({_examples(missing)}), {len(unexpected)} of the checkpoint are not in the network"
            f" ({_examples(unexpected)})"
        )
    if reshaped:
        details = [f"{k} {_shape(state_dict[k])} in the checkpoint, {_shape(expected[k])} in the network"
                   for k in reshaped]
        lines.append(f"  {len(reshaped)} tensors differ in shape: {_examples(details, '; ')}")
    last = next(reversed(expected), None)
    out_channels = _architecture(network).get("out_channels")
    if last in reshaped and _shape(expected[last])[:1] == (out_channels,) and _shape(state_dict[last]):
        lines.append(
            f"  out_channels (K): {_shape(state_dict[last])[0]} in the checkpoint, {out_channels} in the network"
            f" (the size of the last layer, {last})"
        )
    lines.append("  Run with the network_def overrides (or baseline config) that the checkpoint was trained with.")
    raise CheckpointError("\n".join(lines))
