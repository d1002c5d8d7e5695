"""The learnable layers around the backprojection: filtration ``F`` and fine-tuning ``T``; the baselines'
output head :class:`EvalSigmoid`; and :func:`instance_to_group_norm`, the faster kernel of ``U``'s instance norm."""

from __future__ import annotations

import math

import torch
from torch import nn

from scripts.operators import exporting

__all__ = ["Filtration", "FineTuning", "EvalSigmoid", "FILTER_INITS", "box_mean", "instance_to_group_norm"]

FILTER_INITS = ("identity", "ramp")
# the zero-frequency gain of each initial design, which ``Filtration(constrain_dc=True)`` keeps
DC_GAINS = {"identity": 1.0, "ramp": 0.0}
# elements (about 1 MiB of float32) in one slab of rows along H that T writes at a time at inference: a few slabs of
# extra memory instead of a second volume
SLAB_ELEMENTS = 1 << 18


def box_mean(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Mean over the cubic window of ``kernel_size`` about each voxel, of the voxels inside the volume.

    The same values as ``nn.AvgPool3d(kernel_size, stride=1, padding=kernel_size // 2,
    count_include_pad=False)``, computed as three 1D box sums (shifted additions along H, W
    and D, each divided by its count of voxels inside): on the CPU about 5 times faster than
    torch's pooling forward and backward together (which was a third of a training step at
    128^3), and valid for volumes thinner than the window. Plain differentiable ops, so
    TorchScript and ONNX exports keep it.

    Args:
        x: ``(B, K, H, W, D)``.
        kernel_size: odd window size.

    Returns:
        ``(B, K, H, W, D)``, a new tensor (``x`` is left as it is).
    """
    if kernel_size == 1:
        return x.clone()
    r = kernel_size // 2
    for axis in (2, 3, 4):
        n = x.shape[axis]
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (4 - axis)] = r
        pad[2 * (4 - axis) + 1] = r
        padded = nn.functional.pad(x, pad)
        # the sum in one new buffer (the same order of additions as a + b + c ...): two volumes alive, not three
        total = padded.narrow(axis, 0, n) + padded.narrow(axis, 1, n)
        for j in range(2, kernel_size):
            total.add_(padded.narrow(axis, j, n))
        x = total.div_(_window_counts(x, axis, r))
    return x


def instance_to_group_norm(module: nn.Module) -> nn.Module:
    """``module`` with every instance norm that keeps no running statistics replaced by ``nn.GroupNorm`` with one
    group per channel, in place; returns ``module``.

    The two normalise each channel of each sample over its spatial positions with the same ``eps``, and their
    affine weights (if any) have the same names and shapes, so the function and the state dict stay the same
    (the values agree to float rounding, tested); on the CPU torch's group-norm kernel is several times faster than
    the instance norm's (which runs as a batch norm over a ``(1, B * C, ...)`` view), forward and backward: about a
    tenth of a training step of the 2D U-Net at 128^3. An instance norm with running statistics (eval mode uses
    them) is left as it is.
    """
    for name, child in module.named_children():
        instance = isinstance(child, (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d))
        if instance and not child.track_running_stats:
            like = {"device": child.weight.device, "dtype": child.weight.dtype} if child.affine else {}
            group = nn.GroupNorm(child.num_features, child.num_features, eps=child.eps, affine=child.affine, **like)
            if child.affine:
                with torch.no_grad():
                    group.weight.copy_(child.weight)
                    group.bias.copy_(child.bias)
            setattr(module, name, group)
        else:
            instance_to_group_norm(child)
    return module


def _window_counts(x: torch.Tensor, axis: int, r: int) -> torch.Tensor:
    """Voxels inside the window at each index of ``axis``, ``min(i, r) + min(n - 1 - i, r) + 1``,
    shaped to broadcast against ``x``."""
    n = x.shape[axis]
    index = torch.arange(n, device=x.device).to(x.dtype)
    count = torch.clamp(index, max=float(r)) + torch.clamp(index.flip(0), max=float(r)) + 1.0
    shape = [1, 1, 1, 1, 1]
    shape[axis] = n
    return count.view(shape)


def _initial_taps(kernel_size: int, init: str) -> torch.Tensor:
    """The filter's taps at initialisation, shape ``(kernel_size,)``.

    ``"identity"``: a centred unit impulse. ``"ramp"``: the spatial ramp (Ram-Lak) filter of
    filtered backprojection (Kak & Slaney, "Principles of Computerized Tomographic
    Imaging", eq. 3.61), scaled to a unit centre tap: ``h(0) = 1``, ``h(n) = -4 / (pi n)^2``
    for odd ``n``, 0 for even ``n``.
    """
    if init not in FILTER_INITS:
        raise ValueError(f"unknown filter initialisation {init!r}; valid ones are {list(FILTER_INITS)}.")
    half = kernel_size // 2
    taps = torch.zeros(kernel_size)
    taps[half] = 1.0
    if init == "ramp":
        for n in range(1, half + 1, 2):
            taps[half - n] = taps[half + n] = -4.0 / (math.pi * n) ** 2
    return taps


class Filtration(nn.Module):
    """``F``: a learnable 1D filter along the detector axis ``s`` of each projection.

    A depthwise convolution with kernel ``(kernel_size, 1)`` (zero padding, shape kept;
    computed as a sum of shifted copies, the cheap way for a 1D kernel), one filter per
    channel, shared by all directions or one per direction; the learnable analogue of the
    ramp filter of filtered backprojection.

    Args:
        channels: K, the channels of the projections.
        kernel_size: odd filter length along ``s``.
        num_directions: 1 to share the filter across directions, or ``p`` for one filter
            per direction (then the projections must come from those ``p`` directions).
        init: ``"identity"`` (default) or ``"ramp"``.
        constrain_dc: hold the taps' sum, the filter's gain at zero frequency, at that of the initial design: 1 for
            the identity, 0 for the ramp (as the ramp of the continuous FFT; its truncation alone would keep a small
            positive gain). The learnable taps ``w`` act as ``w + (gain - sum(w)) / kernel_size``, their projection
            onto the filters of that gain. An offset along a projection (a constant logit over the background) is
            smeared by ``R`` through the whole volume: a filter free to amplify it builds halos, and learns to.

    Shapes:
        ``(B, p', K, N_s, D) -> (B, p', K, N_s, D)``.
    """

    def __init__(self, channels: int, kernel_size: int = 9, num_directions: int = 1, init: str = "identity",
                 constrain_dc: bool = True) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be at least 1, got {channels}.")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}.")
        if num_directions < 1:
            raise ValueError(f"num_directions must be at least 1, got {num_directions}.")
        self.channels = channels
        self.kernel_size = kernel_size
        self.num_directions = num_directions
        self.constrained = constrain_dc
        taps = _initial_taps(kernel_size, init)  # which checks init
        self.dc_gain = DC_GAINS[init]
        self.weight = nn.Parameter(taps.repeat(num_directions, channels, 1).reshape(num_directions, channels, 1, kernel_size, 1))

    def forward(self, q: torch.Tensor, num_directions: int, directions: list[int] | None = None) -> torch.Tensor:
        """Filter ``q``, whose direction axis holds ``directions`` of ``num_directions``."""
        if q.dim() != 5 or q.shape[2] != self.channels:
            raise ValueError(f"expected projections of shape (B, p, {self.channels}, N_s, D), got {list(q.shape)}.")
        b, p, k, n_s, d = q.shape
        if self.num_directions == 1:
            taps = self.weight[0, :, 0, :, 0].unsqueeze(0)  # (1, K, kernel_size)
        else:
            if num_directions != self.num_directions:
                raise ValueError(
                    f"the filters are per direction for {self.num_directions} directions, "
                    f"they cannot filter projections of {num_directions} directions."
                )
            dirs = list(range(num_directions)) if directions is None else directions
            taps = self.weight[torch.tensor(dirs, device=q.device), :, 0, :, 0]  # (p', K, kernel_size)
        if self.constrained:
            taps = taps + (self.dc_gain - taps.sum(-1, keepdim=True)) / self.kernel_size
        # the convolution as a sum of shifted copies: one pass per tap, no im2col buffer of
        # kernel_size copies of q (which is what a depthwise conv2d with a (k, 1) kernel costs on CPU)
        half = self.kernel_size // 2
        padded = nn.functional.pad(q, [0, 0, half, half])
        out = padded[:, :, :, 0:n_s] * taps[:, :, 0].reshape(1, taps.shape[0], k, 1, 1)
        for i in range(1, self.kernel_size):
            out.addcmul_(padded[:, :, :, i : i + n_s], taps[:, :, i].reshape(1, taps.shape[0], k, 1, 1))
        return out


class FineTuning(nn.Module):
    """``T``: 3D average pooling, a learnable per-channel scale and shift, and the sigmoid.

    The pooling (stride 1, shape kept, border windows average only voxels inside) smooths
    the streaks a few directions leave; scale and shift set the threshold of each class.
    With ``image_channels > 0`` (an option beyond the paper, off by default) a learned
    multiple of the image's intensity is added before the sigmoid, per class and image
    channel, initialised to 0: a voxel through which the rays of several vessels pass looks
    like vessel to the backprojection, but it is dark in the image. With ``contrast_size > 0``
    as well, a learned multiple of the image's local contrast (each channel minus its mean
    over a ``contrast_size``³ window, :func:`box_mean`) is added the same way: a vessel is
    brighter than its surroundings, whatever the bias field makes of the background.

    Args:
        channels: K.
        kernel_size: odd size of the cubic pooling window.
        image_channels: C of the image for the intensity term; 0 for none.
        contrast_size: odd window of the local-contrast term (needs ``image_channels > 0``); 0 for none.

    Shapes:
        ``(B, K, H, W, D) -> (B, K, H, W, D)``, values in ``[0, 1]``; ``image`` ``(B, C, H, W, D)``.
    """

    def __init__(
        self, channels: int, kernel_size: int = 3, image_channels: int = 0, contrast_size: int = 0
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}.")
        if image_channels < 0:
            raise ValueError(f"image_channels must be at least 0, got {image_channels}.")
        if contrast_size < 0 or (contrast_size > 0 and contrast_size % 2 == 0):
            raise ValueError(f"contrast_size must be 0 or a positive odd number, got {contrast_size}.")
        if contrast_size > 0 and image_channels == 0:
            raise ValueError(
                "the local-contrast term (contrast_size > 0) needs the intensity term (image_channels > 0)."
            )
        self.kernel_size = kernel_size
        self.contrast_size = contrast_size
        self.scale = nn.Parameter(torch.ones(channels))
        self.shift = nn.Parameter(torch.zeros(channels))
        if image_channels > 0:
            self.intensity = nn.Parameter(torch.zeros(channels, image_channels))
        else:
            self.register_parameter("intensity", None)
        if contrast_size > 0:
            self.contrast = nn.Parameter(torch.zeros(channels, image_channels))
        else:
            self.register_parameter("contrast", None)

    def forward(self, x: torch.Tensor, inplace: bool = False, image: torch.Tensor | None = None) -> torch.Tensor:
        """``T(x)``; with ``inplace=True`` and no gradient recorded, written over ``x`` (no new volume).

        ``image`` is the network's input, read by the intensity term (ignored without one).
        """
        shape = (1, -1, 1, 1, 1)
        if torch.is_grad_enabled():
            return torch.sigmoid(self.logits(x, image))
        # inference: one volume-sized buffer instead of three, or none at all
        pooled = self._pool_inplace(x) if inplace else self._pool(x)
        pooled = pooled.mul_(self.scale.view(shape)).add_(self.shift.view(shape))
        return self._add_intensity(pooled, image, True).sigmoid_()

    def logits(self, x: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        """``T(x)`` before its sigmoid, a new tensor ``(B, K, H, W, D)`` (for a loss that applies the sigmoid itself).

        ``image`` is the network's input, read by the intensity term (ignored without one). Where a gradient is
        recorded, the scale, shift and image terms are one autograd node (:class:`_FineTuningLogits`): it keeps
        the pooled volume for the scale's gradient and nothing else (torch's ops would also keep the image's
        local mean, and make a new volume for each term). TorchScript and exports take the same sum as torch ops.
        """
        shape = (1, -1, 1, 1, 1)
        pooled = x if self.kernel_size == 1 else self._pool(x)  # a window of one voxel: no copy to keep
        if not torch.jit.is_scripting():
            if not exporting() and torch.is_grad_enabled():
                return _FineTuningLogits.apply(
                    pooled, image, self.scale, self.shift, self.intensity, self.contrast, self
                )
        z = pooled * self.scale.view(shape) + self.shift.view(shape)
        return self._add_intensity(z, image, False)

    def _check_image(self, z: torch.Tensor, image: torch.Tensor | None) -> None:
        weight = self.intensity
        if weight is None:
            return
        if image is None:
            raise ValueError("this fine-tuning layer has an intensity term: pass the image.")
        if image.shape[1] != weight.shape[1] or image.shape[2:] != z.shape[2:]:
            spatial = ", ".join(str(n) for n in z.shape[2:])
            raise ValueError(f"the image must have shape (B, {weight.shape[1]}, {spatial}), got {list(image.shape)}.")

    def _add_intensity(self, z: torch.Tensor, image: torch.Tensor | None, inplace: bool) -> torch.Tensor:
        weight = self.intensity
        if weight is None:
            return z
        self._check_image(z, image)
        assert image is not None  # for TorchScript; _check_image raised otherwise
        contrast = self.contrast
        for c in range(weight.shape[1]):
            channel = image[:, c : c + 1]
            tap = weight[:, c].view(1, -1, 1, 1, 1)
            if contrast is not None:
                # w x + v (x - mean(x)) = (w + v) x - v mean(x)
                tap = tap + contrast[:, c].view(1, -1, 1, 1, 1)
            z = z.addcmul_(channel, tap) if inplace else torch.addcmul(z, channel, tap)
            if contrast is not None:
                minus = -contrast[:, c].view(1, -1, 1, 1, 1)
                if inplace:
                    self._add_local_mean_inplace(z, channel, minus)
                else:
                    z = torch.addcmul(z, box_mean(channel, self.contrast_size), minus)
        return z

    def _add_local_mean_inplace(self, z: torch.Tensor, channel: torch.Tensor, tap: torch.Tensor,
                                slab_elements: int = SLAB_ELEMENTS) -> None:
        """``z += tap * box_mean(channel)``, one slab of rows along H at a time: a few slabs of
        extra memory instead of the local mean's volume (``channel`` ``(B, 1, H, W, D)`` is only read)."""
        h = channel.shape[2]
        rows = self._slab_rows(channel, slab_elements)
        h0 = 0
        while h0 < h:  # not range(): under torch.export the sizes are symbolic, and range() would fix them
            h1 = min(h0 + rows, h)
            z[:, :, h0:h1].addcmul_(self._local_mean_slab(channel, h0, h1), tap)
            h0 = h1

    def _slab_rows(self, channel: torch.Tensor, slab_elements: int) -> int:
        """Rows along H of a slab of about ``slab_elements`` (at least the local-contrast window)."""
        per_row = channel.shape[0] * channel.shape[1] * channel.shape[3] * channel.shape[4]
        return max(self.contrast_size, slab_elements // max(per_row, 1))

    def _local_mean_slab(self, channel: torch.Tensor, h0: int, h1: int) -> torch.Tensor:
        """Rows ``h0:h1`` of ``box_mean(channel, contrast_size)``, from those rows and ``contrast_size // 2`` on
        either side."""
        k = self.contrast_size
        r = k // 2
        lo = max(h0 - r, 0)
        block = box_mean(channel[:, :, lo : min(h1 + r, channel.shape[2])], k)
        return block[:, :, h0 - lo : h1 - lo]

    def _pool_inplace(self, x: torch.Tensor, slab_elements: int = SLAB_ELEMENTS) -> torch.Tensor:
        """:meth:`_pool` written over ``x``, one slab of rows along H at a time (same values).

        Each slab is pooled together with the ``k // 2`` rows on either side of it, the rows
        above from a copy of their values before they were overwritten; so the extra memory is
        a few slabs of about ``slab_elements``, not a second volume.
        """
        k = self.kernel_size
        if k == 1:
            return x
        r = k // 2
        h = x.shape[2]
        if h <= k:
            return x.copy_(self._pool(x))
        per_row = x.shape[0] * x.shape[1] * x.shape[3] * x.shape[4]
        rows = max(k, slab_elements // max(per_row, 1))
        saved = x[:, :, 0:0].clone()  # the original values of the rows just above the slab
        h0 = 0
        while h0 < h:
            h1 = min(h0 + rows, h)
            if h - h1 < k:  # a last slab thinner than the window joins this one
                h1 = h
            block = torch.cat([saved, x[:, :, h0 : min(h1 + r, h)]], 2)
            pooled = self._pool(block)[:, :, saved.shape[2] : saved.shape[2] + h1 - h0]
            saved = x[:, :, max(h1 - r, 0) : h1].clone()
            x[:, :, h0:h1] = pooled
            h0 = h1
        return x

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled volume, a new tensor (``x`` itself is not changed)."""
        return box_mean(x, self.kernel_size)


def _channel_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum(a[:, k] * b[:, c])`` over batch and space, ``(K, C)`` (float32 or wider), for ``a`` ``(B, K, ...)``
    and ``b`` ``(B, C, ...)`` of the same spatial shape: one batched matrix product, no product volume."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    a3 = a.reshape(a.shape[0], a.shape[1], -1).to(dtype)
    b3 = b.reshape(b.shape[0], b.shape[1], -1).to(dtype)
    return torch.bmm(a3, b3.transpose(1, 2)).sum(0)


class _FineTuningLogits(torch.autograd.Function):
    """``pooled * scale + shift + sum_c (w_c + v_c) x_c - v_c box_mean(x_c)`` per class (``FineTuning.logits``).

    Forward writes the sum into one new volume (the local mean added slab by slab); backward recomputes the local
    mean slab by slab for the contrast weights' gradient, so the node keeps the pooled volume (for the scale's
    gradient) and the image (the network's input), nothing else. Gradients: ``pooled``: ``g * scale``; ``scale``:
    ``sum(g pooled)``; ``shift``: ``sum(g)``; ``w``: ``sum(g x)``; ``v``: ``sum(g (x - box_mean(x)))``.
    """

    @staticmethod
    def forward(ctx, pooled, image, scale, shift, intensity, contrast, layer):
        shape = (1, -1, 1, 1, 1)
        # the image terms as inference adds them, in place (``intensity`` and ``contrast`` are the layer's own)
        z = layer._add_intensity(torch.addcmul(shift.view(shape), pooled, scale.view(shape)), image, True)
        ctx.save_for_backward(pooled, image, scale, intensity, contrast)
        ctx.layer = layer
        return z

    @staticmethod
    def backward(ctx, grad):
        pooled, image, scale, intensity, contrast = ctx.saved_tensors
        layer = ctx.layer
        grad_pooled = grad * scale.view(1, -1, 1, 1, 1) if ctx.needs_input_grad[0] else None
        # a dense copy of the diagonal (a view's stride K + 1 is not the parameter's layout: DDP warns)
        grad_scale = _channel_products(grad, pooled).diagonal().to(scale.dtype, copy=True,
                                                                   memory_format=torch.contiguous_format)
        grad_shift = grad.sum((0, 2, 3, 4)).to(scale.dtype)
        grad_intensity = grad_contrast = None
        if intensity is not None:
            products = _channel_products(grad, image)
            grad_intensity = products.to(intensity.dtype)
            if contrast is not None:
                local = torch.zeros_like(products)
                for c in range(image.shape[1]):
                    channel = image[:, c : c + 1]
                    step = layer._slab_rows(channel, SLAB_ELEMENTS)
                    for h0 in range(0, channel.shape[2], step):
                        h1 = min(h0 + step, channel.shape[2])
                        mean = layer._local_mean_slab(channel, h0, h1)
                        local[:, c : c + 1] += _channel_products(grad[:, :, h0:h1], mean)
                grad_contrast = (products - local).to(contrast.dtype)
        return grad_pooled, None, grad_scale, grad_shift, grad_intensity, grad_contrast, None


class EvalSigmoid(nn.Module):
    """The sigmoid of a network's logits in eval mode, the logits themselves in training mode.

    The output head of the bundle's baselines (``configs/unet3d.json``): validation, inference and
    the exported model (eval mode) give probabilities as the 2.5D U-Net does, so the same
    postprocessing, metrics and threshold apply; training gives the loss the logits, as MONAI's
    ``DiceCELoss(sigmoid=True)`` expects. A loss on probabilities cannot do that: where the sigmoid
    saturates (a probability of exactly 1 in float32 above a logit of about 17, or beyond the clamp a
    cross-entropy of probabilities needs) no gradient passes, and a confidently wrong voxel stays wrong. The same convention as the deep-supervision heads of MONAI's ``DynUNet``, whose
    output differs between training and eval mode.

    Shapes:
        any shape to the same shape.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.training else torch.sigmoid(x)
