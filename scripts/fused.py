"""Fused CPU kernels of ``M`` and ``R`` (``scripts/csrc/operators.cpp``), built at first use.

The pure-PyTorch operators of :mod:`scripts.operators` gather every interpolated sample into a
buffer before reducing it; the fused kernels interpolate and reduce in one pass and read the
volume about once per direction (docs/benchmarks.md, B3). They compute the same samples with
the same formula (``torch.lerp``'s) and the same order of summation over directions, so they
agree with the pure path to float rounding (tested); exported models (TorchScript, ONNX) always
use the pure path, so they need no project code.

The kernels are compiled once per machine and per source version by ``torch.utils.cpp_extension``
(a C++ compiler and ``ninja`` are needed; about a minute, announced by a log line) into torch's
extension cache (``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), one folder
per torch and Python version and hash of the C++ sources. The sources are copied into that folder
and compiled from there: ninja's build file records the source's path, so compiling from the
bundle's own ``csrc/`` would rebuild whenever the bundle runs from another folder (a copy, MONAI
Label's, a download). Where the build fails, a warning says why and the pure path is used.
``UNET25D_FUSED=0`` turns them off.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import threading
from collections.abc import Iterator
from types import ModuleType

import torch

__all__ = ["ops", "available", "disabled", "build_directory", "source_hash", "ENV_VAR"]

logger = logging.getLogger(__name__)

ENV_VAR = "UNET25D_FUSED"
NAME = "unet25d_mra_ops"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "operators.cpp")
CFLAGS = ("-O3", "-fopenmp")
LDFLAGS = ("-fopenmp",)
_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}
_off = threading.local()


def source_hash() -> str:
    """The first 12 hex digits of the SHA-256 of the C++ sources and the compiler flags."""
    digest = hashlib.sha256()
    with open(SOURCE, "rb") as f:
        digest.update(f.read())
    digest.update(" ".join(CFLAGS + LDFLAGS).encode())  # tuples: torch's load appends to the lists it is given
    return digest.hexdigest()[:12]


def build_directory() -> str:
    """Where the kernels are built: torch's extension root, one folder per torch and Python version and source hash.

    (Two environments with different torch versions must not share one build: a module compiled
    against one torch does not load into another. Two copies of the bundle with the same sources
    share one build wherever they are.)
    """
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    version = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}".replace("+", "_")
    return os.path.join(root, f"{NAME}-{version}-src{source_hash()}")


def _built(build: str, source: str) -> bool:
    """Whether ``build`` holds a library at least as new as its copy of the source (ninja will not recompile)."""
    library = os.path.join(build, f"{NAME}.so")
    return os.path.isfile(library) and os.path.getmtime(library) >= os.path.getmtime(source)


def _build() -> ModuleType | None:
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        logger.info("%s=0: the fused operators are off, M and R use the pure-PyTorch path.", ENV_VAR)
        return None
    try:
        from torch.utils.cpp_extension import load

        build = build_directory()
        os.makedirs(build, exist_ok=True)
        source = os.path.join(build, os.path.basename(SOURCE))
        if not os.path.isfile(source):
            # a same-named copy is the same file: the folder's name is the source's hash
            partial = f"{source}.{os.getpid()}.tmp"
            shutil.copyfile(SOURCE, partial)
            os.replace(partial, source)
        if _built(build, source):
            logger.info("loading the fused M/R kernels from %s", build)
        else:
            logger.info("compiling the fused M/R kernels in %s (once per machine and source version, about a minute)",
                        build)
        return load(name=NAME, sources=[source], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS), build_directory=build,
                    verbose=False)
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
