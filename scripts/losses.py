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

__all__ = ["TwoPathDiceLoss", "clamped_bce"]


class _ClampedBCE(torch.autograd.Function):
    """Mean binary cross-entropy of probabilities clamped into ``[EPS, 1 - EPS]``, forward and backward by hand.

    The same value and gradient as ``binary_cross_entropy(p.clamp(EPS, 1 - EPS), t)`` (zero gradient where
    the clamp is active), in about 60 % of the time on a CPU: torch's kernels for the loss and its backward
    are not vectorised, while ``log``, ``log1p`` and ``lerp`` are. Nothing but the inputs is kept for the backward
    (the clamped copy is made again there), so the loss adds no volume to a training step's graph.
    Computed in float32 (or float64).
    """

    @staticmethod
    def forward(ctx, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(prediction, target)
        dtype = torch.promote_types(prediction.dtype, torch.float32)  # half precision computes in float32
        c = prediction.to(dtype).clamp(EPS, 1 - EPS)
        loss = torch.log1p(-c)  # log(1 - c), then t log c + (1 - t) log(1 - c) as one lerp between the logs
        return -loss.lerp_(c.log_(), target.to(dtype)).mean()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        prediction, target = ctx.saved_tensors
        dtype = torch.promote_types(prediction.dtype, torch.float32)
        p = prediction.to(dtype)
        c = p.clamp(EPS, 1 - EPS)
        clamped = p.ne(c)  # where the clamp is active its gradient is 0, as torch's clamp has it
        denominator = (1 - c).mul_(c)  # 1 - c is exact near 1, c - c * c is not
        grad = c.sub_(target.to(dtype)).div_(denominator)  # d/dc of -(t log c + (1 - t) log(1 - c))
        del denominator
        grad.masked_fill_(clamped, 0.0)
        return grad.mul_(grad_output / grad.numel()).to(prediction.dtype), None


def clamped_bce(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of ``prediction`` (probabilities, clamped into ``[EPS, 1 - EPS]``) against
    ``target`` (in ``[0, 1]``, same shape); a scalar. A target that needs a gradient takes torch's own kernels."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {list(prediction.shape)} and target {list(target.shape)} differ in shape.")
    if target.requires_grad:
        return nn.functional.binary_cross_entropy(prediction.clamp(EPS, 1 - EPS), target.to(prediction.dtype))
    return _ClampedBCE.apply(prediction, target)


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
        return loss + self.bce_weight * clamped_bce(prediction, target)
