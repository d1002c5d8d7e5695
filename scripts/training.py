"""Random 2.5D training from an ignite/MONAI trainer: the batch preparation and one step.

MONAI's ``SupervisedTrainer`` calls ``network(image, *args, **kwargs)`` with what its
``prepare_batch`` returns; :class:`TwoPathPrepareBatch` adds ``num_subset=q`` so that the
two paths run through the network's own ``forward`` (the one DistributedDataParallel
wraps, which is what keeps gradients synchronised).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.data import pad_list_data_collate
from monai.engines import PrepareBatch, default_prepare_batch

from scripts.layers import FineTuning

__all__ = ["TwoPathPrepareBatch", "crops_collate", "main_path", "parameter_groups", "train_step"]


class TwoPathPrepareBatch(PrepareBatch):
    """``prepare_batch`` of a MONAI trainer for random 2.5D training.

    Args:
        num_subset: q, the number of directions of path 1 (drawn afresh each step).
    """

    def __init__(self, num_subset: int) -> None:
        if num_subset < 1:
            raise ValueError(f"num_subset (q) must be at least 1, got {num_subset}.")
        self.num_subset = num_subset

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        image, label = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        return image, label, (), {"num_subset": self.num_subset}


def crops_collate(batch: list) -> Any:
    """Collate crops of different sizes into one batch, padded with zeros to the largest (``collate_fn``).

    ``batch`` holds one item per volume: a dict, or the list of ``num_samples`` crops that a ``...Samplesd``
    transform made of it. The crops of all volumes, in order, go through MONAI's ``pad_list_data_collate``:
    the batch is ``(sum of crops, C, H_max, W_max, D_max)``. MONAI's function alone pads only a list of dicts,
    so with ``num_samples`` > 1 it stacks crops of different sizes and fails.
    """
    crops = [crop for item in batch for crop in (item if isinstance(item, list) else [item])]
    return pad_list_data_collate(crops)


def parameter_groups(network: torch.nn.Module, learning_rate: float, fine_tuning_factor: float = 1.0) -> list[dict]:
    """The optimiser's parameter groups: the network's parameters at ``learning_rate``, those of its fine-tuning
    layers (:class:`scripts.layers.FineTuning`, ``T`` of a 2.5D U-Net) at ``fine_tuning_factor`` times it.

    ``T`` is a handful of scalars per class (scale, shift, the image terms' weights) on features of very different
    size: the local contrast of an image scaled to [0, 1] is a few hundredths, so its weight must grow to tens before
    it counts. Adam moves each parameter by about the learning rate per step, so at the U-Net's rate those weights
    are still climbing after the benchmark's ~13,000 steps (docs/model.md, *Choices measured*). A network without
    ``T`` (the baselines), or a wrapper of one (``DistributedDataParallel``), works the same: the layers are found by
    type, not by name.

    Args:
        network: any module.
        learning_rate: the rate of every parameter outside ``T``.
        fine_tuning_factor: ``T``'s rate over ``learning_rate`` (positive).

    Returns:
        ``[{"params": [...], "lr": learning_rate}, {"params": [...], "lr": learning_rate * fine_tuning_factor}]``,
        without a group that has no parameters (for ``torch.optim`` optimisers).
    """
    if not fine_tuning_factor > 0:
        raise ValueError(f"fine_tuning_factor must be positive, got {fine_tuning_factor}.")
    fine = {id(p) for m in network.modules() if isinstance(m, FineTuning) for p in m.parameters()}
    params = list(network.parameters())
    groups = [{"params": [p for p in params if id(p) not in fine], "lr": float(learning_rate)},
              {"params": [p for p in params if id(p) in fine], "lr": float(learning_rate) * float(fine_tuning_factor)}]
    return [g for g in groups if g["params"]]


def main_path(prediction: torch.Tensor) -> torch.Tensor:
    """The main path ``y`` of a two-path prediction: ``(B, 2, K, ...) -> (B, K, ...)``.

    For training metrics (e.g. in a ``postprocessing`` ``Lambdad``); a plain prediction
    passes through unchanged. Works on a batch and, for decollated items, on
    ``(2, K, H, W, D)`` when ``batched=False``.
    """
    return prediction[:, 0] if prediction.dim() == 6 else prediction


def train_step(
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    label: torch.Tensor,
    num_subset: int,
) -> float:
    """One random 2.5D step outside a trainer (scripts, benchmarks): both paths, one update.

    Args:
        network: a ``UNet25D`` (or a DDP wrapper of one).
        optimizer: over the network's parameters.
        loss_function: e.g. ``TwoPathDiceLoss``.
        image: ``(B, C, H, W, D)``.
        label: ``(B, K, H, W, D)``.
        num_subset: q.

    Returns:
        the loss value.
    """
    network.train()
    optimizer.zero_grad(set_to_none=True)
    loss = loss_function(network(image, num_subset=num_subset), label)
    loss.backward()
    optimizer.step()
    return float(loss.detach())
