"""Multi-GPU (DistributedDataParallel) glue for ``configs/multi_gpu_train.json`` and ``multi_gpu_evaluate.json``.

The configs start one process per GPU with ``torchrun``, initialise the process group
(``nccl`` on GPUs, ``gloo`` on CPU), wrap the network in ``DistributedDataParallel`` and give
each process its share of the data with MONAI's ``DistributedSampler``. What a config line
cannot say clearly lives here:

- :func:`rank0_first`: work that must be done once before the other processes read its result
  (the datalist generates the synthetic dataset on first use: two processes must not write it
  at the same time);
- :class:`ReplicaSaver`: every process's final weights to ``<replica_dir>/rank<r>.pt``, to
  check that the replicas agree (``--replica_dir DIR``; off by default);
- :func:`shutdown`: the configs' ``finalize``: the processes meet, then the process group goes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

from scripts.checkpoint_io import unwrap

__all__ = ["rank", "rank0_first", "shutdown", "ReplicaSaver"]

T = TypeVar("T")


def rank() -> int:
    """This process's rank in the default process group; 0 without one."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def rank0_first(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``func(*args, **kwargs)`` on rank 0 first, then on the other ranks; its result on every rank.

    The other ranks wait at a barrier until rank 0 has finished (or failed: they then run
    ``func`` themselves and meet the same error instead of waiting for ever). Without a
    process group it is a plain call.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return func(*args, **kwargs)
    if dist.get_rank() > 0:
        dist.barrier()
        return func(*args, **kwargs)
    try:
        return func(*args, **kwargs)
    finally:
        dist.barrier()


def shutdown() -> None:
    """Waits for every process at a barrier, then destroys the default process group (if any).

    Without the barrier a process that finishes first can exit while gloo's worker thread
    still holds the last collective (e.g. the metrics' ``all_gather``): the thread then frees
    its Python-owned tensors during interpreter shutdown and the process aborts ("terminate
    called without an active exception", seen about once in ten CPU runs of
    ``tests/test_multi_gpu.py``). While this process waits at the barrier, that thread
    finishes.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class ReplicaSaver:
    """Saves this process's network weights to ``<save_dir>/rank<r>.pt`` when training completes.

    DistributedDataParallel keeps the replicas equal by averaging the gradients of every step
    across processes; these files show whether it did (every tensor equal on all ranks). The
    state dict is the plain network's (a DDP wrapper is unwrapped), so a file also loads
    wherever ``models/model.pt`` does.

    Args:
        save_dir: the folder of the files (created if missing).
        network: the (DDP-wrapped) network.
        enabled: attach nothing when False (``multi_gpu_train.json``: ``@replica_dir`` is set).
    """

    def __init__(self, save_dir: str | None, network: torch.nn.Module, enabled: bool = True) -> None:
        if enabled and not save_dir:
            raise ValueError("ReplicaSaver needs a save_dir (e.g. --replica_dir /tmp/replicas).")
        self.save_dir = save_dir
        self.network = network
        self.enabled = enabled

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        network = unwrap(self.network)
        os.makedirs(self.save_dir, exist_ok=True)
        path = os.path.join(self.save_dir, f"rank{rank()}.pt")
        torch.save(network.state_dict(), path)
        engine.logger.info(f"saved the weights of rank {rank()} to {path}")
