"""The loss of random 2.5D training: ``Dice(y_aux, y_true) + lambda * Dice(y, y_true)``.

Optionally each path's Dice loss gets a binary cross-entropy term (``bce_weight``), as MONAI's
``DiceCELoss`` adds cross-entropy to Dice: Dice alone weighs a voxel by the size of its
structure's overlap, cross-entropy weighs every voxel alike. On probabilities by default; with
``sigmoid=True`` the same loss of logits (the sigmoid applied inside, as MONAI's ``DiceLoss(sigmoid=True)``),
computed by :func:`sigmoid_dice_bce`, which writes the gradient of every path into one tensor in its
forward, chunk by chunk, with no other volume-sized temporaries.
"""

from __future__ import annotations

import torch
from monai.losses import DiceLoss
from monai.networks.utils import one_hot
from torch import nn

# probabilities are clamped into [EPS, 1 - EPS] for the cross-entropy: a saturated sigmoid (exactly 0 or 1 in
# float32) would otherwise give gradients of about 1 / 1e-12 (torch's own clamp of the denominator)
EPS = 1e-6

# elements of each (sample, path, channel) row that sigmoid_dice_bce handles at once: temporaries of
# 2^17 float32 values per row, whatever the volume's size
CHUNK = 1 << 17

# the arguments of MONAI's DiceLoss that sigmoid_dice_bce computes itself; any other selects MONAI's DiceLoss
FUSED_DICE_ARGS = ("smooth_nr", "smooth_dr", "batch")

__all__ = ["TwoPathDiceLoss", "clamped_bce", "sigmoid_dice_bce"]


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


def _row_sums(z: torch.Tensor, t: torch.Tensor, chunk: int) -> tuple[torch.Tensor, ...]:
    """Sums along the last axis, one chunk of it at a time: ``sum(p t)``, ``sum(p)``, ``sum(t)`` and the summed
    cross-entropy ``-(t log c + (1 - t) log(1 - c))``, with ``p = sigmoid(z)`` and ``c`` its clamp into
    ``[EPS, 1 - EPS]`` (as :func:`clamped_bce`); float32 (or float64).

    Args:
        z: logits ``(B, P, K, M)``.
        t: targets ``(B, 1, K, M)``.

    Returns:
        four tensors, ``(B, P, K)`` but ``sum(t)``: ``(B, 1, K)``.
    """
    dtype = torch.promote_types(z.dtype, torch.float32)
    rows = z.shape[:3]
    intersection = torch.zeros(rows, dtype=dtype, device=z.device)
    predicted = torch.zeros(rows, dtype=dtype, device=z.device)
    cross_entropy = torch.zeros(rows, dtype=dtype, device=z.device)
    truth = torch.zeros(t.shape[:3], dtype=dtype, device=z.device)
    for start in range(0, z.shape[-1], chunk):
        zc = z[..., start : start + chunk].to(dtype)
        tc = t[..., start : start + chunk].to(dtype)
        p = torch.sigmoid(zc)
        intersection += (p * tc).sum(-1)
        predicted += p.sum(-1)
        truth += tc.sum(-1)
        c = p.clamp(EPS, 1 - EPS)
        cross_entropy -= torch.log1p(-c).lerp_(c.log_(), tc).sum(-1)
    return intersection, predicted, truth, cross_entropy


class _SigmoidDiceBCE(torch.autograd.Function):
    """Per-path ``Dice(sigmoid(z), t) + bce_weight * BCE(sigmoid(z), t)`` of logits ``(B, P, K, ...)``; see
    :func:`sigmoid_dice_bce`.

    Where the logits need a gradient, the forward also computes it, for a unit weight of every path's loss, and
    keeps only that: not the logits, which can then be freed as soon as nothing else holds them (a training step
    does not keep the network's output). The backward hands it on, scaled by the paths' weights where they are
    not all 1.
    """

    @staticmethod
    def forward(ctx, logits, target, first, bce_weight, smooth_nr, smooth_dr, batch, chunk, with_grad):
        b, k = logits.shape[0], logits.shape[2] - first
        z = logits[:, :, first:].flatten(3)  # (B, P, K', M): a view of a contiguous prediction
        t = target[:, first:].flatten(2).unsqueeze(1)  # (B, 1, K', M)
        intersection, predicted, truth, cross_entropy = _row_sums(z, t, chunk)
        if batch:  # one Dice per path and channel over the whole batch, as MONAI's DiceLoss(batch=True)
            intersection, predicted, truth = (s.sum(0, keepdim=True) for s in (intersection, predicted, truth))
        denominator = predicted + truth + smooth_dr
        numerator = 2.0 * intersection + smooth_nr
        terms = denominator.shape[0] * k  # Dice terms averaged per path
        elements = b * k * z.shape[-1]
        losses = (1.0 - numerator / denominator).sum((0, 2)) / terms + bce_weight * cross_entropy.sum((0, 2)) / elements
        if with_grad:  # (needs_input_grad says True under torch.no_grad() too)
            # d Dice / d p = alpha t + beta for each (sample, path, channel)
            alpha = -2.0 / (denominator * terms)
            beta = numerator / (denominator * denominator * terms)
            # saved as a tensor (not a ctx attribute): autograd frees it once the backward has used it
            ctx.save_for_backward(_logit_gradient(logits, z, t, alpha, beta, bce_weight / elements, first, chunk))
        return losses.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_losses):
        (grad,) = ctx.saved_tensors
        weights = grad_losses.to(grad.dtype)
        if not bool((weights == 1).all()):
            grad = grad * weights.view((1, -1) + (1,) * (grad.dim() - 2))
        return grad, None, None, None, None, None, None, None, None


def _logit_gradient(logits, z, t, alpha, beta, gamma, first, chunk) -> torch.Tensor:
    """The gradient of :class:`_SigmoidDiceBCE`'s losses (each of weight 1) with respect to ``logits``, a new
    tensor of its shape, written chunk by chunk; ``z``, ``t``: the logits and targets of the channels that count,
    ``(B, P, K', M)`` and ``(B, 1, K', M)``; ``alpha``, ``beta``: ``(B or 1, P, K')``."""
    alpha, beta = alpha.unsqueeze(-1), beta.unsqueeze(-1)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    grad[:, :, :first] = 0.0  # channels the loss leaves out
    out = grad[:, :, first:].view(grad.shape[0], grad.shape[1], grad.shape[2] - first, -1)
    for start in range(0, z.shape[-1], chunk):
        zc = z[..., start : start + chunk].to(alpha.dtype)
        tc = t[..., start : start + chunk].to(alpha.dtype)
        p = torch.sigmoid(zc)
        # (alpha t + beta) p (1 - p) for the Dice; gamma (p - t) for the cross-entropy, 0 where the clamp is
        # active (d/dp of the cross-entropy is (p - t) / (p (1 - p)) inside the clamp); computed in the gradient
        # itself where it has the sums' dtype (no chunk to copy in), else in a chunk of that dtype
        o = out[..., start : start + chunk]
        g = torch.addcmul(beta, alpha, tc, out=o) if o.dtype == alpha.dtype else torch.addcmul(beta, alpha, tc)
        g.mul_(p).mul_(1.0 - p)
        inside = (p >= EPS) & (p <= 1 - EPS)
        g.add_(p.sub_(tc).mul_(inside), alpha=gamma)
        if g is not o:
            o.copy_(g)
    return grad


def sigmoid_dice_bce(
    logits: torch.Tensor,
    target: torch.Tensor,
    bce_weight: float = 0.0,
    first_channel: int = 0,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch: bool = False,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """The loss of each of ``P`` predictions of logits against one target: ``Dice + bce_weight * BCE``.

    The Dice loss of ``sigmoid(logits)`` as MONAI's ``DiceLoss(sigmoid=True)`` computes it (the mean over samples
    and channels of ``1 - (2 sum(p t) + smooth_nr) / (sum(p) + sum(t) + smooth_dr)``; with ``batch`` the sums run
    over the batch too), plus ``bce_weight`` times the mean binary cross-entropy of ``sigmoid(logits)`` clamped
    into ``[EPS, 1 - EPS]`` (:func:`clamped_bce`), both on channels ``first_channel`` onwards: the loss of
    :class:`TwoPathDiceLoss` on the probabilities, value and gradient. The forward runs over the volume
    ``chunk`` elements at a time and, where a gradient is recorded, writes the logits' gradient straight into one
    new tensor (the backward hands it on): no volume-sized temporaries, where the same loss from torch's ops holds
    several (the sigmoid, its product with the target, the gradients of each path and their sum).

    Args:
        logits: ``(B, P, K, ...)``, e.g. the two paths ``(B, 2, K, H, W, D)`` of random 2.5D training.
        target: ``(B, K, ...)`` in ``[0, 1]``, the same for every path; no gradient flows into it.
        bce_weight: weight of the cross-entropy term.
        first_channel: the first channel that counts (1 leaves out a background channel 0).
        smooth_nr, smooth_dr, batch: as MONAI's ``DiceLoss``.
        chunk: elements of each row handled at once.

    Returns:
        ``(P,)``, the loss of each prediction.
    """
    if logits.dim() < 3 or target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"expected logits (B, P, K, ...) and a target (B, K, ...) of the same B, K and spatial shape, got "
            f"{list(logits.shape)} and {list(target.shape)}."
        )
    if not 0 <= first_channel < logits.shape[2]:
        raise ValueError(f"first_channel must be in [0, {logits.shape[2]}), got {first_channel}.")
    with_grad = torch.is_grad_enabled() and logits.requires_grad
    return _SigmoidDiceBCE.apply(
        logits, target.detach(), first_channel, float(bce_weight), float(smooth_nr), float(smooth_dr), bool(batch),
        int(chunk), with_grad,
    )


class TwoPathDiceLoss(nn.Module):
    """Dice loss on both outputs of random 2.5D training.

    Takes the stacked output of ``UNet25D(x, num_subset=q)``, shape ``(B, 2, K, H, W, D)``
    with the main path ``y`` at index 0 and the auxiliary path ``y_aux`` at 1, and returns
    ``Dice(y_aux, target) + main_weight * Dice(y, target)`` (with ``bce_weight``, each Dice term
    plus ``bce_weight`` times the binary cross-entropy). A plain ``(B, K, H, W, D)`` prediction
    (e.g. at validation) gets the loss of one path. Probabilities by default; logits with ``sigmoid``
    (from ``UNet25D(train_logits=True)`` in training mode).

    Args:
        main_weight: lambda, the weight of the main path's Dice loss.
        include_background: whether channel 0 counts (``False`` when channel 0 is a
            background class, as for ``K > 1`` with a background channel).
        to_onehot_y: whether the target is a class-index map ``(B, 1, ...)`` to one-hot
            encode into ``K`` channels.
        bce_weight: weight of a binary cross-entropy term added to each path's Dice loss (on the
            same channels, probabilities clamped into ``[1e-6, 1 - 1e-6]``); 0: Dice only.
        sigmoid: the prediction is logits, and the loss is that of their sigmoid: the same value and
            gradient as this loss of ``torch.sigmoid(prediction)``, where the network's sigmoid moves into the
            loss. With no further ``DiceLoss`` arguments than ``smooth_nr``, ``smooth_dr`` and ``batch``,
            computed by :func:`sigmoid_dice_bce`, which needs a fraction of the memory (the stored sigmoid,
            the gradients of each path and of each term are never whole volumes).
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
        sigmoid: bool = False,
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
        self.sigmoid = sigmoid
        self.fused = sigmoid and set(kwargs) <= set(FUSED_DICE_ARGS)
        # the sigmoid is applied here (path_loss) for the cross-entropy's sake too, not by MONAI's DiceLoss
        self.dice = DiceLoss(include_background=include_background, to_onehot_y=to_onehot_y, sigmoid=False, **kwargs)

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
        if self._fuses(target):
            main, aux = self._fused(prediction, target).unbind(0)
            return aux, main
        # one unbind, not two indexings: its backward writes both gradients into one new tensor
        # where each index's backward would allocate a zero tensor of the whole prediction
        main, aux = prediction.unbind(1)
        return self.path_loss(aux, target), self.path_loss(main, target)

    def path_loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of one output: ``Dice + bce_weight * BCE``, prediction ``(B, K, ...)`` probabilities (logits
        with ``sigmoid``)."""
        if self._fuses(target):
            return self._fused(prediction.unsqueeze(1), target)[0]
        if self.sigmoid:
            prediction = torch.sigmoid(prediction)
        loss = self.dice(prediction, target)
        if self.bce_weight == 0:
            return loss
        target = self._dense(target, prediction.shape[1])
        if not self.include_background and prediction.shape[1] > 1:
            prediction, target = prediction[:, 1:], target[:, 1:]
        return loss + self.bce_weight * clamped_bce(prediction, target)

    def _fuses(self, target: torch.Tensor) -> bool:
        return self.fused and not target.requires_grad

    def _dense(self, target: torch.Tensor, channels: int) -> torch.Tensor:
        return one_hot(target, num_classes=channels) if self.to_onehot_y else target

    def _fused(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """:func:`sigmoid_dice_bce` of ``(B, P, K, ...)`` logits with this loss's settings: ``(P,)``."""
        channels = logits.shape[2]
        target = self._dense(target, channels)
        if target.shape != logits.shape[:1] + logits.shape[2:]:
            raise ValueError(
                f"the target has shape {list(target.shape)}, the prediction of each path "
                f"{list(logits.shape[:1] + logits.shape[2:])}."
            )
        first = 1 if not self.include_background and channels > 1 else 0
        return sigmoid_dice_bce(
            logits, target, self.bce_weight, first, self.dice.smooth_nr, self.dice.smooth_dr, self.dice.batch
        )
