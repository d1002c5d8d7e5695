"""Checkpoints of the bundle: atomic writes, checked loads, resume, and a stop on a non-finite loss.

Two files live in ``ckpt_dir`` (``configs/train.json``):

- ``model.pt``: the network's plain state dict with the best validation metric
  (:class:`BestModelSaver`); what ``evaluate.json``, ``inference.json`` and ``ckpt_export`` read.
- ``checkpoint.ckpt``: the full training state at the end of every epoch
  (:class:`TrainingCheckpointSaver`): ``network``, ``optimizer``, ``lr_scheduler``, ``trainer``
  (epoch and iteration) and ``best_metric``; ``--resume true`` continues from it
  (:class:`CheckedCheckpointLoader`).

Both are written to a temporary file in the same folder and renamed over the old one
(:func:`save_atomic`), so a killed run leaves the previous file whole. MONAI's
``CheckpointSaver`` is not used for this: it builds ignite's ``DiskSaver`` with ``atomic=False``,
and ignite's ``Checkpoint`` removes a fixed-name file before writing its successor.
Every load goes through :func:`~scripts.checkpoint_io.load_checkpoint` (``torch.load(..., weights_only=True)``) and
:func:`check_state_dict`, whose error names the file, the network of the config and what the
file holds. :class:`StopOnNonFiniteLoss` ends training with :class:`NonFiniteLossError` at the
first NaN/Inf loss, before that step's update and before anything of the epoch is saved.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointLoader

from scripts.checkpoint_io import (
    CheckpointError,
    CheckpointNotFoundError,
    unwrap,
    check_state_dict,
    describe_network,
    load_checkpoint,
    remove_stale_temporaries,
    save_atomic,
)
from scripts.distributed import rank
from scripts.flags import as_flag

__all__ = [
    "save_atomic",
    "remove_stale_temporaries",
    "load_checkpoint",
    "describe_network",
    "check_state_dict",
    "BestMetric",
    "BestModelSaver",
    "TrainingCheckpointSaver",
    "CheckedCheckpointLoader",
    "NonFiniteLossError",
    "StopOnNonFiniteLoss",
]

logger = logging.getLogger(__name__)

class BestMetric:
    """The best key metric of a MONAI workflow (``state.best_metric``, ``state.best_metric_epoch``)
    as a stateful object, so that a checkpoint holds it and a resumed run keeps comparing with it.

    Args:
        engine: e.g. the validation evaluator of ``train.json``.
    """

    def __init__(self, engine) -> None:
        self.engine = engine

    def state_dict(self) -> dict[str, float | int]:
        state = self.engine.state
        return {"best_metric": float(state.best_metric), "best_metric_epoch": int(state.best_metric_epoch)}

    def load_state_dict(self, state_dict: Mapping) -> None:
        self.engine.state.best_metric = state_dict["best_metric"]
        self.engine.state.best_metric_epoch = state_dict["best_metric_epoch"]


class BestModelSaver:
    """An ignite handler of the validation evaluator: the network's state dict to ``path``
    (atomically) whenever the key metric reaches a new best.

    It relies on MONAI's workflow, which compares the key metric with ``state.best_metric`` at
    ``EPOCH_COMPLETED`` before any handler runs; with :class:`BestMetric` in the training
    checkpoint, a resumed run overwrites ``model.pt`` only with a better model.

    A new run (not ``resume``) never silently replaces a ``model.pt`` it finds in its folder
    (an earlier run's, or the shipped weights): before its first save the old file is kept
    beside it as ``model.previous-<date>.pt`` (a hard link, or a copy), and the log says so at
    the start and when it happens.

    Args:
        path: e.g. ``models/model.pt``.
        network: the network whose weights are saved (a DataParallel wrapper is unwrapped).
        resume: the run continues the one that wrote ``path`` (``--resume true``): replace it.
    """

    def __init__(self, path: str, network: torch.nn.Module, resume: bool | str = False) -> None:
        self.path = path
        self.network = network
        self.resume = as_flag(resume, "resume (--resume)")
        self.saved = False

    def attach(self, engine) -> None:
        from ignite.engine import Events

        remove_stale_temporaries(self.path)
        if not self.resume and os.path.isfile(self.path) and rank() == 0:
            logger.warning(f"{self.path} exists and this is a new run (no --resume): it is kept as "
                           f"{self._previous_name()} before this run saves its first model there.")
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _previous_name(self) -> str:
        """A free ``model.previous-<date of the file>[-n].pt`` beside ``path``."""
        import time

        stem, ext = os.path.splitext(self.path)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(self.path)))
        name, n = f"{stem}.previous-{stamp}{ext}", 1
        while os.path.lexists(name):
            name, n = f"{stem}.previous-{stamp}-{n}{ext}", n + 1
        return name

    def _keep_previous(self) -> None:
        """Keep a ``model.pt`` this run did not write under another name (the first save of a new run)."""
        if self.resume or not os.path.isfile(self.path):
            return
        import shutil

        kept = self._previous_name()
        try:
            os.link(self.path, kept)
        except OSError:
            shutil.copy2(self.path, kept)
        logger.warning(f"{self.path} was not written by this run: kept it as {kept}.")

    def __call__(self, engine) -> None:
        if engine.state.best_metric_epoch != engine.state.epoch or rank() > 0:
            return
        if not self.saved:
            self._keep_previous()
        save_atomic(unwrap(self.network).state_dict(), self.path)
        self.saved = True
        engine.logger.info(
            f"saved the best model so far to {self.path} ({engine.state.key_metric_name} "
            f"{engine.state.best_metric:.4f} at epoch {engine.state.epoch})"
        )


class TrainingCheckpointSaver:
    """An ignite handler of the trainer: the whole training state to ``path`` at every epoch end.

    The checkpoint maps each key of ``save_dict`` to its object's ``state_dict()`` and
    ``engine_key`` to the trainer's (epoch, iteration, max_epochs); it is written atomically
    (:func:`save_atomic`). Attach it after the validation and learning-rate handlers, so that it
    sees the epoch's best metric and the scheduler's step; a resume loader (attached earlier)
    has then already restored the state at ``STARTED``.

    Args:
        path: e.g. ``models/checkpoint.ckpt``.
        save_dict: ``{"network": ..., "optimizer": ..., "lr_scheduler": ..., "best_metric": BestMetric(...)}``.
        engine_key: key of the trainer itself (a config cannot name the trainer in its own handlers).
    """

    def __init__(self, path: str, save_dict: Mapping[str, Any], engine_key: str = "trainer") -> None:
        self.path = path
        self.save_dict = dict(save_dict)
        self.engine_key = engine_key

    def attach(self, engine) -> None:
        from ignite.engine import Events

        remove_stale_temporaries(self.path)
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def started(self, engine) -> None:
        """Say so when a new run (not a resumed one) is about to replace an older checkpoint."""
        if engine.state.epoch == 0 and os.path.isfile(self.path):
            engine.logger.warning(
                f"{self.path} exists and is replaced at the end of epoch 1; to continue it instead, pass --resume true."
            )

    def __call__(self, engine) -> None:
        if rank() > 0:
            return
        objects = {**self.save_dict, self.engine_key: engine}
        checkpoint = {key: unwrap(obj).state_dict() if isinstance(obj, torch.nn.Module) else obj.state_dict()
                      for key, obj in objects.items()}
        save_atomic(checkpoint, self.path)
        engine.logger.info(f"saved the training state of epoch {engine.state.epoch} to {self.path}")


class CheckedCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` that checks the file before loading it, and can resume a trainer.

    Before MONAI's loader runs (``torch.load(..., weights_only=True)``, strict), the file is
    read with :func:`load_checkpoint` and every network in ``load_dict`` is checked with
    :func:`check_state_dict`, so a missing file, a file of another architecture or K, or a
    training checkpoint in place of plain weights fails with a message naming both sides.

    Args:
        load_path: e.g. ``models/model.pt`` (weights) or ``models/checkpoint.ckpt`` (resume).
        load_dict: as for ``CheckpointLoader``; a single network may read a plain state dict.
        engine_key: when given, the engine it is attached to is restored too, from this key
            (resume: the trainer's epoch and iteration, which the trainer's own config cannot
            reference).
        enabled: attach nothing when False (e.g. ``"enabled": "@resume"``); ``"true"``/``"false"``
            strings from the command line are read as such.
        kwargs: ``name``, ``map_location``, ``strict``, ``strict_shape`` of ``CheckpointLoader``.
    """

    def __init__(
        self, load_path: str, load_dict: dict, engine_key: str | None = None, enabled: bool | str = True, **kwargs: Any
    ) -> None:
        super().__init__(load_path=load_path, load_dict=dict(load_dict), **kwargs)
        self.engine_key = engine_key
        self.enabled = as_flag(enabled, "enabled (--resume)")

    def attach(self, engine) -> None:
        if not self.enabled:
            return
        if self.engine_key is not None:
            self.load_dict[self.engine_key] = engine
        super().attach(engine)

    def __call__(self, engine) -> None:
        try:
            checkpoint = load_checkpoint(self.load_path, self.map_location)
        except FileNotFoundError as e:
            hint = (
                "nothing to resume from: train without --resume, or set --ckpt_dir to the interrupted run's folder"
                if self.engine_key is not None
                else "train first, or set --ckpt_dir to the folder that holds the weights"
            )
            raise CheckpointNotFoundError(f"{e} ({hint})") from e
        self._check(checkpoint)
        super().__call__(engine)
        if self.engine_key is not None:
            engine.logger.info(
                f"resumed from {self.load_path}: epoch {engine.state.epoch} of {engine.state.max_epochs} done, "
                f"iteration {engine.state.iteration}"
            )

    def _check(self, checkpoint: Any) -> None:
        """Raise a clear ValueError when ``checkpoint`` lacks an entry of ``load_dict`` or a network does not fit."""
        first = next(iter(self.load_dict))
        if len(self.load_dict) == 1 and not (isinstance(checkpoint, Mapping) and first in checkpoint):
            checkpoint = {first: checkpoint}  # a plain state dict, as CheckpointLoader reads it
        absent = [key for key in self.load_dict if key not in checkpoint]
        if absent:
            raise CheckpointError(
                f"{self.load_path} holds {', '.join(map(str, checkpoint)) or 'nothing'} but not {', '.join(absent)}:"
                " resuming needs a training checkpoint (checkpoint.ckpt), evaluation and inference the weights"
                " (model.pt)."
            )
        for key, obj in self.load_dict.items():
            if isinstance(obj, torch.nn.Module):
                check_state_dict(checkpoint[key], obj, self.load_path)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class StopOnNonFiniteLoss:
    """An ignite handler that ends training at the first NaN/Inf loss, with an error saying where.

    It runs at MONAI's ``IterationEvents.LOSS_COMPLETED``, after the loss and before its backward
    pass and optimiser step, and raises :class:`NonFiniteLossError`: the run stops with a non-zero
    exit status, nothing of the epoch is saved, and the checkpoint of the last complete epoch
    (``checkpoint_file``) stays as it was. The message names the epoch, the iteration and that
    checkpoint. (ignite's ``TerminateOnNan`` runs after the optimiser step and ends the run as a
    success, which a script that trains and then evaluates would not notice.)

    Args:
        checkpoint_file: the training checkpoint, named in the message (e.g. ``models/checkpoint.ckpt``).
    """

    def __init__(self, checkpoint_file: str | None = None) -> None:
        self.checkpoint_file = checkpoint_file

    def attach(self, engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def __call__(self, engine) -> None:
        loss = engine.state.output["loss"]
        if bool(torch.isfinite(torch.as_tensor(loss)).all()):
            return
        value = float(torch.as_tensor(loss).detach().float().flatten()[0])
        epoch_length = engine.state.epoch_length or 0
        in_epoch = (engine.state.iteration - 1) % epoch_length + 1 if epoch_length else engine.state.iteration
        message = (
            f"training loss is {value} at epoch {engine.state.epoch}, iteration "
            f"{engine.state.iteration} ({in_epoch} of {epoch_length} in the epoch): training stopped before this "
            f"step's update, nothing of epoch {engine.state.epoch} was saved. {self._last_good()} "
            "Check the data and the learning rate, then train afresh or continue from that checkpoint with"
            " --resume true (which restores its optimiser and learning-rate schedule too)."
        )
        raise NonFiniteLossError(message)

    def _last_good(self) -> str:
        """Which checkpoint is left, read back from the file (it is also the proof that it loads)."""
        if self.checkpoint_file is None or not os.path.isfile(self.checkpoint_file):
            return "No training checkpoint had been written yet."
        try:
            trainer = load_checkpoint(self.checkpoint_file, map_location="cpu").get("trainer", {})
        except ValueError as e:
            return f"The training checkpoint cannot be read: {e}"
        epoch_length = trainer.get("epoch_length") or 1
        epoch = trainer.get("iteration", 0) // epoch_length
        return f"The last good checkpoint is {self.checkpoint_file} (end of epoch {epoch})."
