"""The loss of random 2.5D training: ``Dice(y_aux, y_true) + lambda * Dice(y, y_true)``.

Optionally each path's Dice loss gets a binary cross-entropy term (``bce_weight``), as MONAI's
``DiceCELoss`` adds cross-entropy to Dice: Dice alone weighs a voxel by the size of its
structure's overlap, cross-entropy weighs every voxel alike.
"""

from __future__ import annotations

import torch
from monai.losses import DiceLoss
from monai.networks.utils import one_hot
from torch import nn

# probabilities are clamped into [EPS, 1 - EPS] for the cross-entropy: a saturated sigmoid (exactly 0 or 1 in
# float32) would otherwise give gradients of about 1 / 1e-12 (torch's own clamp of the denominator)
EPS = 1e-6

__all__ = ["TwoPathDiceLoss"]


class TwoPathDiceLoss(nn.Module):
    """Dice loss on both outputs of random 2.5D training, on probabilities.

    Takes the stacked output of ``UNet25D(x, num_subset=q)``, shape ``(B, 2, K, H, W, D)``
    with the main path ``y`` at index 0 and the auxiliary path ``y_aux`` at 1, and returns
    ``Dice(y_aux, target) + main_weight * Dice(y, target)`` (with ``bce_weight``, each Dice term
    plus ``bce_weight`` times the binary cross-entropy). A plain ``(B, K, H, W, D)`` prediction
    (e.g. at validation) gets the loss of one path.

    Args:
        main_weight: lambda, the weight of the main path's Dice loss.
        include_background: whether channel 0 counts (``False`` when channel 0 is a
            background class, as for ``K > 1`` with a background channel).
        to_onehot_y: whether the target is a class-index map ``(B, 1, ...)`` to one-hot
            encode into ``K`` channels.
        bce_weight: weight of a binary cross-entropy term added to each path's Dice loss (on the
            same channels, probabilities clamped into ``[1e-6, 1 - 1e-6]``); 0: Dice only.
        kwargs: further arguments of MONAI's ``DiceLoss`` (``smooth_nr``, ``batch``, ...).

    Shapes:
        prediction ``(B, 2, K, H, W, D)`` or ``(B, K, H, W, D)``; target ``(B, K, H, W, D)``
        (or ``(B, 1, H, W, D)`` with ``to_onehot_y``). Returns a scalar.
    """

    def __init__(
        self,
        main_weight: float = 1.0,
        include_background: bool = True,
        to_onehot_y: bool = False,
        bce_weight: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__()
        if main_weight < 0:
            raise ValueError(f"main_weight (lambda) must not be negative, got {main_weight}.")
        if bce_weight < 0:
            raise ValueError(f"bce_weight must not be negative, got {bce_weight}.")
        self.main_weight = main_weight
        self.bce_weight = bce_weight
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.dice = DiceLoss(
            include_background=include_background, to_onehot_y=to_onehot_y, sigmoid=False, **kwargs
        )

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if prediction.dim() == target.dim():
            return self.path_loss(prediction, target)
        aux_loss, main_loss = self.path_losses(prediction, target)
        return aux_loss + self.main_weight * main_loss

    def path_losses(self, prediction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss(y_aux, target), loss(y, target))`` of a two-path prediction, unweighted by lambda (for logging).

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
        return self.path_loss(aux, target), self.path_loss(main, target)

    def path_loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of one output: ``Dice + bce_weight * BCE``, prediction ``(B, K, ...)`` probabilities."""
        loss = self.dice(prediction, target)
        if self.bce_weight == 0:
            return loss
        if self.to_onehot_y:
            target = one_hot(target, num_classes=prediction.shape[1])
        if not self.include_background and prediction.shape[1] > 1:
            prediction, target = prediction[:, 1:], target[:, 1:]
        bce = nn.functional.binary_cross_entropy(prediction.clamp(EPS, 1 - EPS), target.to(prediction.dtype))
        return loss + self.bce_weight * bce
