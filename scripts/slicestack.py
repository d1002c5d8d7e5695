"""Slice-stack 2.5D baseline: a 2D U-Net on every axial slice with its neighbours as channels.

The "2.5D" of the Kaggle UW-Madison GI Tract Image Segmentation competition (2022): slice ``z``
and its neighbours ``z + offsets`` (default ``z - 2, z, z + 2``) are stacked as the channels of
one 2D image, a 2D U-Net segments it, and the segmentations of all slices are stacked back into
a volume. Unlike the random 2.5D U-Net (``scripts.net.UNet25D``) it sees only a thin slab around
each slice, so its context along z is ``max(offsets) - min(offsets) + 1`` slices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import UNet
from torch import nn

__all__ = ["stack_neighbours", "SliceStackUNet"]


def stack_neighbours(x: torch.Tensor, offsets: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The 2D inputs of slices ``start .. stop - 1``: each slice with its neighbours as channels.

    Neighbours beyond the volume's z borders are the border slices (edge replication), so every
    slice gets ``len(offsets)`` neighbours.

    Args:
        x: the volume, ``(B, C, H, W, D)`` with D the axial (z) axis.
        offsets: integer tensor ``(n,)`` of slice offsets, e.g. ``tensor([-2, 0, 2])``.
        start: first slice, ``0 <= start < stop``.
        stop: one past the last slice, ``stop <= D``.

    Returns:
        ``(B * m, n * C, H, W)`` with ``m = stop - start``, batch index ``b * m + (z - start)``
        and channel index ``j * C + c`` for offset ``offsets[j]`` and image channel ``c``.
    """
    b, c, h, w, d = x.shape
    n = offsets.shape[0]
    m = stop - start
    z = torch.arange(start, stop, device=x.device)
    index = (z[:, None] + offsets.to(x.device)[None, :]).clamp(0, d - 1)  # (m, n)
    slab = x.index_select(4, index.reshape(-1)).reshape(b, c, h, w, m, n)
    return slab.permute(0, 4, 5, 1, 2, 3).reshape(b * m, n * c, h, w)


class SliceStackUNet(nn.Module):
    """Kaggle-style 2.5D segmentation: a MONAI 2D ``UNet`` on every axial slice plus neighbours.

    For every slice ``z`` of the volume (the ``H x W`` plane; D is z) the slices ``z + offsets``
    are stacked as ``C * len(offsets)`` channels (see :func:`stack_neighbours`), the 2D U-Net
    gives ``K`` logits for slice ``z``, and the sigmoid turns them into probabilities. The
    output is that of ``UNet25D``'s evaluation forward, so the same inferers, metrics and
    postprocessing apply unchanged. With ``train_logits`` the logits themselves come out in
    training mode, for a loss on logits (``DiceCELoss(sigmoid=True)``, as ``configs/slicestack.json``
    trains it; :class:`scripts.layers.EvalSigmoid` says why); eval mode gives probabilities either way.

    Slices go through the U-Net ``slice_batch`` at a time (the neighbour stack is built per
    chunk too), which bounds the memory of a whole-volume pass; the result does not depend on
    ``slice_batch`` in eval mode, nor in training with a per-image norm (instance norm).

    Args:
        in_channels: C, image channels.
        out_channels: K, output classes (independent sigmoids, multi-label).
        offsets: slice offsets stacked as channels, e.g. ``(-2, 0, 2)``; at least one.
        channels: feature channels of the 2D U-Net's levels (MONAI ``UNet``).
        strides: strides between the levels; ``len(strides) == len(channels) - 1``.
        num_res_units: residual units per level of the 2D U-Net.
        act: activation of the 2D U-Net.
        norm: normalisation of the 2D U-Net.
        dropout: dropout of the 2D U-Net.
        slice_batch: slices per U-Net call, at least 1.
        train_logits: in training mode, return the logits instead of probabilities.

    Shapes:
        ``(B, C, H, W, D) -> (B, K, H, W, D)`` probabilities in ``[0, 1]`` (logits in training mode with
        ``train_logits``), for any
        ``H, W, D >= 1``; each slice is padded (edge replication) to a multiple of the U-Net's
        total stride in H and W (and to at least two bottom-level pixels) and cropped back.

    Examples::

        >>> net = SliceStackUNet(in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2))
        >>> net(torch.rand(1, 1, 33, 40, 21)).shape
        torch.Size([1, 2, 33, 40, 21])
        >>> net.unet.in_channels  # C * len(offsets)
        3
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        offsets: Sequence[int] = (-2, 0, 2),
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        strides: Sequence[int] = (2, 2, 2, 2),
        num_res_units: int = 2,
        act: str | tuple = "PRELU",
        norm: str | tuple = "INSTANCE",
        dropout: float = 0.0,
        slice_batch: int = 32,
        train_logits: bool = False,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be at least 1, got {in_channels}, {out_channels}.")
        if len(offsets) == 0:
            raise ValueError("`offsets` must hold at least one slice offset, e.g. (-2, 0, 2).")
        if any(int(o) != o for o in offsets):
            raise ValueError(f"`offsets` must be integers, got {tuple(offsets)}.")
        if len(channels) < 2:
            raise ValueError(f"`channels` must have at least two levels, got {tuple(channels)}.")
        if len(strides) != len(channels) - 1:
            raise ValueError("the length of `strides` should equal to `len(channels) - 1`.")
        if any(s < 1 for s in strides):
            raise ValueError(f"`strides` must be positive, got {tuple(strides)}.")
        if slice_batch < 1:
            raise ValueError(f"slice_batch must be at least 1, got {slice_batch}.")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.slice_batch = slice_batch
        self.train_logits = train_logits
        divisor = 1
        for s in strides:
            divisor *= s
        self.divisor = divisor
        # a buffer, so that it follows .to(device); not persistent, so checkpoints hold only weights
        self.register_buffer("offsets", torch.tensor([int(o) for o in offsets], dtype=torch.long), persistent=False)
        self.unet = UNet(
            spatial_dims=2,
            in_channels=in_channels * len(offsets),
            out_channels=out_channels,
            channels=channels,
            strides=strides,
            num_res_units=num_res_units,
            act=act,
            norm=norm,
            dropout=dropout,
        )

    def forward(self, x: torch.Tensor, num_subset: int = 0) -> torch.Tensor:
        """Probabilities ``(B, K, H, W, D)`` of a volume ``(B, C, H, W, D)`` (logits in training with ``train_logits``).

        ``num_subset`` is accepted and ignored: the random 2.5D trainer's
        ``scripts.training.TwoPathPrepareBatch`` passes ``num_subset=q`` to the network, and
        accepting it lets this baseline run under that trainer too. The intended override
        (``docs/baselines.md``) uses MONAI's default ``prepare_batch`` and ``DiceCELoss``.
        """
        self._check_input(x)
        b, d = x.shape[0], x.shape[4]
        h, w = x.shape[2], x.shape[3]
        pad_h = (-h) % self.divisor
        pad_w = (-w) % self.divisor
        if h + pad_h == self.divisor and w + pad_w == self.divisor:
            # instance norm needs more than one element per channel at the U-Net's bottom level
            pad_w += self.divisor
        chunks: list[torch.Tensor] = []
        for start in range(0, d, self.slice_batch):
            stop = min(start + self.slice_batch, d)
            images = stack_neighbours(x, self.offsets, start, stop)
            if pad_h > 0 or pad_w > 0:
                images = nn.functional.pad(images, [0, pad_w, 0, pad_h], mode="replicate")
            logits = self.unet(images)[:, :, :h, :w]
            out = logits if self.train_logits and self.training else torch.sigmoid(logits)
            chunks.append(out.reshape(b, stop - start, self.out_channels, h, w).permute(0, 2, 3, 4, 1))
        return torch.cat(chunks, 4)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 5:
            raise ValueError(f"the input must have shape (B, C, H, W, D), got shape {list(x.shape)}.")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"the network expects {self.in_channels} input channel(s), the input has {x.shape[1]}.")
        if x.shape[0] < 1 or x.shape[2] < 1 or x.shape[3] < 1 or x.shape[4] < 1:
            raise ValueError(f"the input must not be empty, got shape {list(x.shape)}.")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("the input holds NaN or Inf values.")
