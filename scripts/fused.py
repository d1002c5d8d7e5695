"""Fused CPU kernels of ``M`` and ``R`` (``scripts/csrc/operators.cpp``), built at first use.

The pure-PyTorch operators of :mod:`scripts.operators` gather every interpolated sample into a
buffer before reducing it; the fused kernels interpolate and reduce in one pass and read the
volume about once per direction (docs/benchmarks.md, B3). They compute the same samples with
the same formula (``torch.lerp``'s) and the same order of summation over directions, so they
agree with the pure path to float rounding (tested); exported models (TorchScript, ONNX) always
use the pure path, so they need no project code.

The kernels are compiled once per machine by ``torch.utils.cpp_extension`` (a C++ compiler and
``ninja`` are needed; about a minute) into torch's extension cache (``TORCH_EXTENSIONS_DIR``,
by default ``~/.cache/torch_extensions``), one folder per torch and Python version. Where that
fails, a warning says why and the pure path is used. ``UNET25D_FUSED=0`` turns them off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from types import ModuleType

import torch

__all__ = ["ops", "available", "disabled", "build_directory", "ENV_VAR"]

logger = logging.getLogger(__name__)

ENV_VAR = "UNET25D_FUSED"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "operators.cpp")
_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}
_off = threading.local()


def build_directory() -> str:
    """Where the kernels are built: torch's extension root, one folder per torch and Python version.

    (Two environments with different torch versions must not share one build: a module compiled
    against one torch does not load into another.)
    """
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    version = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}".replace("+", "_")
    return os.path.join(root, f"unet25d_mra_ops-{version}")


def _build() -> ModuleType | None:
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        logger.info("%s=0: the fused operators are off, M and R use the pure-PyTorch path.", ENV_VAR)
        return None
    try:
        from torch.utils.cpp_extension import load

        build = build_directory()
        os.makedirs(build, exist_ok=True)
        logger.info("loading the fused M/R kernels from %s (compiled once, about a minute the first time)", build)
        return load(name="unet25d_mra_ops", sources=[SOURCE], extra_cflags=["-O3", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], build_directory=build, verbose=False)
    except Exception as error:  # no compiler, no ninja, a read-only cache: the pure path works everywhere
        logger.warning("the fused M/R kernels could not be built (%s: %s); using the pure-PyTorch operators, "
                       "which give the same results more slowly. Set %s=0 to skip the attempt.",
                       type(error).__name__, str(error).strip().splitlines()[-1] if str(error).strip() else "",
                       ENV_VAR)
        return None


def ops() -> ModuleType | None:
    """The compiled kernels (``project``, ``backproject``), or None where they are off or unavailable."""
    if "ops" not in _state:
        with _lock:
            if "ops" not in _state:
                _state["ops"] = _build()
    return _state["ops"]


def available(tensor: torch.Tensor) -> ModuleType | None:
    """The kernels if they can take ``tensor`` (CPU, float32 or float64) and are not :func:`disabled`."""
    if getattr(_off, "depth", 0) > 0:
        return None
    if tensor.device.type != "cpu" or tensor.dtype not in (torch.float32, torch.float64):
        return None
    return ops()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block (this thread), ``M`` and ``R`` use the pure-PyTorch path (comparisons, benchmarks)."""
    _off.depth = getattr(_off, "depth", 0) + 1
    try:
        yield
    finally:
        _off.depth -= 1
