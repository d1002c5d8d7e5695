"""What training reports besides MONAI's own handlers: each path's loss and MIP images.

``configs/train.json`` logs to TensorBoard (``log_dir``, default ``<output_dir>/tensorboard``)
through one ``SummaryWriter`` shared by its handlers (made at the first write,
:class:`LazySummaryWriter`), on rank 0 only (``is_not_rank0``):

- the trainer: ``train_loss`` and, split by :class:`PathLosses`, ``train_loss_aux``
  (``Dice(y_aux, y_true)``) and ``train_loss_main`` (``Dice(y, y_true)``, before the weight
  lambda) per iteration (:func:`output_scalars`), the learning rate of every parameter group per
  iteration (:func:`learning_rates`: ``learning_rate`` for the 2D U-Net and F,
  ``learning_rate_fine_tuning`` for T) and the training metrics per epoch (MONAI's ``TensorBoardStatsHandler``);
- the validation evaluator: ``val_mean_dice`` per epoch and, with :class:`MIPImageHandler`,
  the axial maximum-intensity projections of the first validation case's image, label and
  prediction (``val_mip/image``, ``val_mip/label``, ``val_mip/pred``).

On the console, each phase has one progress bar (:class:`ProgressBar`: training with the step's
losses beside it, validation, evaluation, inference), and log lines are written above the bars
(:func:`log_above_progress_bars`) instead of through them.

docs/tracking.md says how to view them, and how MLflow (``--tracking mlflow``) and multi-GPU
training fit in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar as IgniteProgressBar
from monai.engines.utils import IterationEvents
from monai.handlers import TensorBoardHandler
from monai.transforms import Orientation
from monai.utils import CommonKeys

__all__ = [
    "LazySummaryWriter",
    "PathLosses",
    "output_scalars",
    "learning_rates",
    "axial_mip",
    "MIPImageHandler",
    "ProgressBar",
    "TqdmStreamHandler",
    "log_above_progress_bars",
]


class LazySummaryWriter:
    """TensorBoard's ``SummaryWriter`` created at its first use, not when the config is resolved.

    ``torch.utils.tensorboard.SummaryWriter`` makes ``log_dir`` and an event file as soon as it
    is built; behind this proxy, reading a config (e.g. to inspect the trainer) writes nothing,
    and a run's event file appears with its first scalar. Every attribute is the real writer's.

    Args:
        log_dir: the folder of the event files.
        kwargs: further arguments of ``SummaryWriter`` (``flush_secs``, ``comment``, ...).
    """

    def __init__(self, log_dir: str, **kwargs: Any) -> None:
        self.log_dir = log_dir
        self.kwargs = kwargs
        self.writer = None

    def __getattr__(self, name: str) -> Any:
        if name in ("log_dir", "kwargs", "writer"):  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=self.log_dir, **self.kwargs)
        return getattr(self.writer, name)

    def close(self) -> None:
        """Close the writer if it was ever created."""
        if self.writer is not None:
            self.writer.close()


class PathLosses:
    """Adds each path's loss to the trainer's output, for logging: ``loss_aux`` and ``loss_main``.

    At MONAI's ``IterationEvents.LOSS_COMPLETED`` (after the loss, before its backward pass) the
    two-path prediction ``(B, 2, K, H, W, D)`` and the label in ``engine.state.output`` go through
    ``loss_function.path_losses`` (e.g. ``TwoPathDiceLoss``) without a graph; the two values are
    stored next to ``loss`` (``loss = loss_aux + lambda * loss_main``), so any stats handler can
    read them with an ``output_transform`` (:func:`output_scalars`). A plain prediction (a
    baseline network) or a loss without ``path_losses`` adds nothing.

    Args:
        loss_function: the trainer's loss.
        aux_key: the output key of the auxiliary path's loss (path 1, ``q`` directions).
        main_key: the output key of the main path's loss (path 2, all ``p`` directions).
    """

    def __init__(self, loss_function: Callable, aux_key: str = "loss_aux", main_key: str = "loss_main") -> None:
        self.loss_function = loss_function
        self.aux_key = aux_key
        self.main_key = main_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        prediction, label = output[CommonKeys.PRED], output[CommonKeys.LABEL]
        path_losses = getattr(self.loss_function, "path_losses", None)
        if path_losses is None or prediction.dim() != label.dim() + 1:
            return
        with torch.no_grad():
            aux, main = path_losses(prediction.detach(), label)
        output[self.aux_key], output[self.main_key] = aux.detach(), main.detach()


def output_scalars(tags: Mapping[str, str]) -> Callable[[Any], dict[str, float]]:
    """An ``output_transform`` for MONAI's stats handlers: ``{tag: value of output[key]}``.

    Reads the first item of a decollated output (a list of dicts, where MONAI copies a scalar
    such as ``loss`` into every item) or a plain dict; keys that the output lacks are left out.

    Args:
        tags: ``{tag: output key}``, e.g. ``{"train_loss": "loss", "train_loss_aux": "loss_aux"}``.
    """

    def transform(output: Any) -> dict[str, float]:
        item = output[0] if isinstance(output, (list, tuple)) else output
        return {tag: float(item[key]) for tag, key in tags.items() if key in item}

    return transform


def learning_rates(optimizer: torch.optim.Optimizer,
                   tags: Sequence[str] = ("learning_rate", "learning_rate_fine_tuning")) -> dict[str, float]:
    """``{tag: learning rate}`` of every parameter group of ``optimizer``, for a stats handler.

    Args:
        optimizer: e.g. Adam over :func:`scripts.training.parameter_groups` (the network, then ``T``).
        tags: the groups' tags in order; a group past them is ``learning_rate_group<i>``.
    """
    return {(tags[i] if i < len(tags) else f"learning_rate_group{i}"): float(group["lr"])
            for i, group in enumerate(optimizer.param_groups)}


def axial_mip(volume: torch.Tensor, axcodes: str | None = "RAS") -> torch.Tensor:
    """The axial maximum-intensity projection of each channel, scaled to ``[0, 1]`` for display.

    Args:
        volume: ``(C, H, W, D)``; a ``MetaTensor`` is reoriented to ``axcodes`` first (so that
            volumes on different grids come out alike), a plain tensor is taken as it is.
        axcodes: the orientation to project in (``"RAS"``: H = x, W = y, D = z); ``None`` keeps
            the array's own axes.

    Returns:
        ``(C, W, H)``: the maximum along D (z), shown as a radiologist's axial view would be with
        anterior (large y) at the top, each channel scaled by its own minimum and maximum (a
        constant channel gives zeros).

    Raises:
        ValueError: ``volume`` is not ``(C, H, W, D)``.
    """
    if volume.dim() != 4:
        raise ValueError(f"axial_mip expects a (C, H, W, D) volume, got shape {list(volume.shape)}.")
    if axcodes is not None and hasattr(volume, "affine"):
        volume = Orientation(axcodes=axcodes, labels=None)(volume)
    mip = torch.as_tensor(volume).detach().float().amax(dim=-1).transpose(-2, -1).flip(-2)
    low = mip.amin(dim=(-2, -1), keepdim=True)
    span = mip.amax(dim=(-2, -1), keepdim=True) - low
    return torch.where(span > 0, (mip - low) / span.clamp_min(1e-12), torch.zeros_like(mip)).cpu()


class MIPImageHandler(TensorBoardHandler):
    """Axial MIPs of one case's image, label and prediction in TensorBoard, once per epoch.

    Attached to an evaluator, at the first iteration of each of its runs it takes the first item
    of the (decollated) output, applies ``transform`` (e.g. an ``Invertd`` that brings the image
    back to the grid of the label and the inverted prediction), and writes :func:`axial_mip` of
    each key as ``<tag>/<key>`` (one picture per channel) at step ``engine.state.epoch``, which
    for MONAI's ``ValidationHandler`` is the trainer's epoch.

    Args:
        summary_writer: a TensorBoard ``SummaryWriter``; a new one in ``log_dir`` when None.
        log_dir: where a new writer writes.
        keys: the output keys to project.
        transform: a callable applied to a shallow copy of the item's dict before projecting.
        axcodes: orientation of the projection (:func:`axial_mip`).
        tag: the prefix of the image tags.
    """

    def __init__(
        self,
        summary_writer: Any = None,
        log_dir: str = "./runs",
        keys: Sequence[str] = (CommonKeys.IMAGE, CommonKeys.LABEL, CommonKeys.PRED),
        transform: Callable[[dict], dict] | None = None,
        axcodes: str | None = "RAS",
        tag: str = "val_mip",
    ) -> None:
        super().__init__(summary_writer=summary_writer, log_dir=log_dir)
        self.keys = tuple(keys)
        self.transform = transform
        self.axcodes = axcodes
        self.tag = tag

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if (engine.state.iteration - 1) % max(engine.state.epoch_length or 1, 1) != 0:
            return
        output = engine.state.output
        item = dict(output[0] if isinstance(output, (list, tuple)) else output)
        missing = [key for key in self.keys if key not in item]
        if missing:
            raise KeyError(f"MIPImageHandler: the engine's output has no {missing} (it has {sorted(item)}).")
        if self.transform is not None:
            item = self.transform(item)
        for key in self.keys:
            volume = item[key][0] if item[key].dim() == 5 else item[key]
            mips = axial_mip(volume, self.axcodes)
            self._writer.add_images(f"{self.tag}/{key}", mips[:, None], engine.state.epoch, dataformats="NCHW")
        self._writer.flush()


class ProgressBar(IgniteProgressBar):
    """ignite's ``ProgressBar`` that shows ``output_transform(engine.state.output)`` beside the bar.

    MONAI's workflows attach a handler with ``handler.attach(engine)`` only, so the values to show are
    given here, at construction, as a config can. One bar per epoch of the engine (``persist`` keeps
    each epoch's finished bar on the console).

    Args:
        output_transform: maps the engine's output to a dict of scalars (e.g. :func:`output_scalars`), or None.
        kwargs: ignite's ``ProgressBar`` arguments (``persist``, ``desc``, ``bar_format``, ...).
    """

    def __init__(self, output_transform: Callable[[Any], Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.output_transform = output_transform

    def attach(self, engine: Engine, metric_names: Any = None, output_transform: Callable | None = None,
               **kwargs: Any) -> None:
        """ignite's ``attach``; ``output_transform`` defaults to the one given at construction."""
        super().attach(engine, metric_names, output_transform or self.output_transform, **kwargs)


class TqdmStreamHandler(logging.StreamHandler):
    """A ``StreamHandler`` that writes through ``tqdm.write``: each record lands above the progress bars, which are
    drawn again below it, instead of in the middle of a bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # as logging.StreamHandler does: report and go on
            self.handleError(record)


def log_above_progress_bars(logger: logging.Logger | None = None) -> None:
    """Replace the console handlers (plain ``StreamHandler``) of ``logger`` (the root logger by default) by
    :class:`TqdmStreamHandler` with the same stream, level, formatter and filters; other handlers (files) stay."""
    logger = logger or logging.getLogger()
    for i, handler in enumerate(list(logger.handlers)):
        if type(handler) is not logging.StreamHandler:
            continue
        replacement = TqdmStreamHandler(handler.stream)
        replacement.setLevel(handler.level)
        replacement.setFormatter(handler.formatter)
        for log_filter in handler.filters:
            replacement.addFilter(log_filter)
        logger.handlers[i] = replacement
