"""The loss of random 2.5D training: ``Dice(y_aux, y_true) + lambda * Dice(y, y_true)``."""

from __future__ import annotations

import torch
from monai.losses import DiceLoss
from torch import nn

__all__ = ["TwoPathDiceLoss"]


class TwoPathDiceLoss(nn.Module):
    """Dice loss on both outputs of random 2.5D training, on probabilities.

    Takes the stacked output of ``UNet25D(x, num_subset=q)``, shape ``(B, 2, K, H, W, D)``
    with the main path ``y`` at index 0 and the auxiliary path ``y_aux`` at 1, and returns
    ``Dice(y_aux, target) + main_weight * Dice(y, target)``. A plain ``(B, K, H, W, D)``
    prediction (e.g. at validation) gets the plain Dice loss.

    Args:
        main_weight: lambda, the weight of the main path's Dice loss.
        include_background: whether channel 0 counts (``False`` when channel 0 is a
            background class, as for ``K > 1`` with a background channel).
        to_onehot_y: whether the target is a class-index map ``(B, 1, ...)`` to one-hot
            encode into ``K`` channels.
        kwargs: further arguments of MONAI's ``DiceLoss`` (``smooth_nr``, ``batch``, ...).

    Shapes:
        prediction ``(B, 2, K, H, W, D)`` or ``(B, K, H, W, D)``; target ``(B, K, H, W, D)``
        (or ``(B, 1, H, W, D)`` with ``to_onehot_y``). Returns a scalar.
    """

    def __init__(
        self, main_weight: float = 1.0, include_background: bool = True, to_onehot_y: bool = False, **kwargs
    ) -> None:
        super().__init__()
        if main_weight < 0:
            raise ValueError(f"main_weight (lambda) must not be negative, got {main_weight}.")
        self.main_weight = main_weight
        self.dice = DiceLoss(
            include_background=include_background, to_onehot_y=to_onehot_y, sigmoid=False, **kwargs
        )

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if prediction.dim() == target.dim():
            return self.dice(prediction, target)
        aux_loss, main_loss = self.path_losses(prediction, target)
        return aux_loss + self.main_weight * main_loss

    def path_losses(self, prediction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Dice(y_aux, target), Dice(y, target))`` of a two-path prediction, unweighted (for logging).

        Args:
            prediction: ``(B, 2, K, H, W, D)``, the main path at index 0, the auxiliary at 1.
            target: ``(B, K, H, W, D)``.
        """
        if prediction.dim() != target.dim() + 1 or prediction.shape[1] != 2:
            raise ValueError(
                "expected the two-path prediction (B, 2, K, ...) or a plain one (B, K, ...) for a target of shape "
                f"{list(target.shape)}, got {list(prediction.shape)}."
            )
        # one unbind, not two indexings: its backward writes both gradients into one new tensor
        # where each index's backward would allocate a zero tensor of the whole prediction
        main, aux = prediction.unbind(1)
        return self.dice(aux, target), self.dice(main, target)
