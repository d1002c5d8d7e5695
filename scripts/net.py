"""The random 2.5D U-Net (Angermann & Haltmeier, MLMIR 2019): ``y = T(R(F(U(M(x)))))``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import UNet
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from scripts.layers import Filtration, FineTuning, instance_to_group_norm
from scripts.operators import Backprojection, Projection, exporting

__all__ = ["UNet25D"]


def _keep_convolutions():
    """Contexts of ``torch.utils.checkpoint`` (``context_fn``) that keep the outputs of ``U``'s convolutions and
    recompute the rest (normalisations, activations, sums, concatenations) in the backward: the convolutions are
    most of the forward's time, the rest most of its feature maps."""
    return create_selective_checkpoint_contexts(_save_convolutions)


def _save_convolutions(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op == torch.ops.aten.convolution.default:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


class UNet25D(nn.Module):
    """3D segmentation from 2D convolutions: segment projections, backproject, fine-tune.

    ``M`` projects the volume along ``p`` directions about its z axis (MIP by default),
    one MONAI 2D ``UNet`` (``U``) shared by all directions segments the projections, a
    learnable filter ``F`` along the detector and the linear backprojection ``R`` bring
    the logits back to 3D, and ``T`` (average pooling, per-channel scale and shift,
    sigmoid) finishes. ``R`` averages over the directions it is given, so the number of
    directions at inference (``num_directions``, settable after training) may differ from
    training's: more is better, fewer is faster.

    Random 2.5D training (:meth:`two_paths`, or ``forward(x, num_subset=q)``): path 1
    segments a fresh random subset of ``q`` directions and trains ``U`` and ``F``
    (``sigmoid(R_S(F(U(M_S x))))``); path 2 uses all ``p`` directions with ``U`` under
    ``torch.no_grad()`` and trains ``F`` and ``T``. Memory grows with ``q``, not ``p``.

    Args:
        in_channels: C, image channels.
        out_channels: K, output classes (independent sigmoids, multi-label).
        num_directions: p, directions ``theta_k = k pi / p`` about the z axis.
        reduction: projection along rays, ``"max"`` (MIP), ``"sum"`` or ``"min"``; or several,
            e.g. ``("max", "sum")``, stacked as ``U``'s input channels (``C`` per reduction): the
            ray sum tells how much of a ray is vessel, which a MIP cannot (docs/ceiling.md).
        channels: feature channels of the 2D U-Net's levels (MONAI ``UNet``).
        strides: strides between the levels; ``len(strides) == len(channels) - 1``.
        num_res_units: residual units per level of the 2D U-Net.
        act: activation of the 2D U-Net.
        norm: normalisation of the 2D U-Net (instance norms without running statistics run as the same
            function in torch's faster group-norm kernel, :func:`scripts.layers.instance_to_group_norm`).
        dropout: dropout of the 2D U-Net.
        filter_size: odd length of ``F`` along the detector.
        filter_per_direction: one filter per direction instead of one shared filter
            (then inference must use the training's ``num_directions``).
        filter_init: ``"identity"`` or ``"ramp"``.
        filter_constrain_dc: hold ``F``'s zero-frequency gain at its initial design's (1 for the identity, 0 for
            the ramp; :class:`scripts.layers.Filtration`), so that it cannot amplify offsets along a projection.
        pool_size: odd window of ``T``'s average pooling.
        direction_batch: projections per call of ``U`` where no gradient is recorded (inference,
            and path 2's directions outside the subset): bounds the memory of the 2D feature
            maps, the largest tensors of a whole-volume pass; 0 puts all through at once. The
            result does not depend on it (instance norm is per image; with ``norm="BATCH"``
            in training mode it would).
        margin: bins of edge replication added on every side of each projection (detector
            and z) before ``U`` and cropped after it, so that no bin that reaches a voxel sits
            at the U-Net's image border, where zero-padded convolutions give it unreliable
            logits (without it, voxels at the volume's faces and corners come out as vessel).
        intensity_term: ``T`` also adds a learned multiple of the image's intensity before its
            sigmoid (:class:`scripts.layers.FineTuning`; beyond the paper, off by default).
        contrast_size: with ``intensity_term``, ``T`` also adds a learned multiple of the image's
            local contrast (intensity minus its mean over a ``contrast_size``³ window); 0: none.
        recompute: where a gradient is recorded (path 1), run ``U`` on ``recompute`` projections at a time
            under ``torch.utils.checkpoint``, keeping the outputs of its convolutions and recomputing the rest
            (normalisations, activations, skip concatenations) in the backward, one call at a time: a training
            step then holds the convolution outputs of the ``q`` projections and the other feature maps of
            ``recompute`` of them, instead of all of them, for a partial second forward of ``U`` (the same
            values and gradients; the time it costs weighs more the smaller the crop). 0: no recomputation.
        train_logits: in training mode, return logits (the outputs of both paths before their sigmoids)
            for a loss that applies the sigmoid itself (``TwoPathDiceLoss(sigmoid=True)``, as MONAI's
            ``DiceCELoss(sigmoid=True)``); eval mode gives probabilities either way.

    Shapes:
        ``(B, C, H, W, D) -> (B, K, H, W, D)`` probabilities (logits with ``train_logits`` in training mode), for any ``H, W``
        and ``D`` (a plane one voxel wide is edge-padded to two and cropped back; the two training paths need
        ``H, W >= 2``); the projections ``(N_s, D)`` get ``margin`` bins on every side, are padded
        to a multiple of the U-Net's total stride and cropped back. With ``num_subset = q > 0``: ``(B, 2, K, H, W, D)``,
        index 0 the main path ``y`` and 1 the auxiliary path ``y_aux`` (as MONAI's
        ``DynUNet`` stacks deep-supervision outputs).

    Examples::

        >>> net = UNet25D(in_channels=1, out_channels=1, num_directions=8, channels=(8, 16, 32), strides=(2, 2))
        >>> net(torch.rand(1, 1, 33, 40, 21)).shape
        torch.Size([1, 1, 33, 40, 21])
        >>> net(torch.rand(1, 1, 33, 40, 21), num_subset=3).shape
        torch.Size([1, 2, 1, 33, 40, 21])
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        num_directions: int = 16,
        reduction: str | Sequence[str] = "max",
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        strides: Sequence[int] = (2, 2, 2, 2),
        num_res_units: int = 2,
        act: str | tuple = "PRELU",
        norm: str | tuple = "INSTANCE",
        dropout: float = 0.0,
        filter_size: int = 9,
        filter_per_direction: bool = False,
        filter_init: str = "identity",
        filter_constrain_dc: bool = True,
        pool_size: int = 3,
        margin: int = 8,
        direction_batch: int = 4,
        intensity_term: bool = False,
        contrast_size: int = 0,
        train_logits: bool = False,
        recompute: int = 0,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be at least 1, got {in_channels}, {out_channels}.")
        if num_directions < 1:
            raise ValueError(f"num_directions (p) must be at least 1, got {num_directions}.")
        if margin < 0:
            raise ValueError(f"margin must be at least 0, got {margin}.")
        if recompute < 0:
            raise ValueError(f"recompute must be at least 0 (0: off), got {recompute}.")
        if direction_batch < 0:
            raise ValueError(f"direction_batch must be at least 0 (0: no limit), got {direction_batch}.")
        if len(strides) != len(channels) - 1:
            raise ValueError("the length of `strides` should equal to `len(channels) - 1`.")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_directions = num_directions
        divisor = 1
        for s in strides:
            divisor *= s
        self.divisor = divisor
        self.margin = margin
        self.direction_batch = direction_batch
        self.train_logits = train_logits
        self.recompute = recompute
        reductions = [reduction] if isinstance(reduction, str) else list(reduction)
        if not reductions:
            raise ValueError("reduction must name at least one of 'max', 'sum', 'min'.")
        self.projections = nn.ModuleList([Projection(r) for r in reductions])
        # MONAI's 2D U-Net; its instance norms (the default) run as torch's faster group norm, the same function
        self.unet = instance_to_group_norm(
            UNet(
                spatial_dims=2,
                in_channels=in_channels * len(reductions),
                out_channels=out_channels,
                channels=channels,
                strides=strides,
                num_res_units=num_res_units,
                act=act,
                norm=norm,
                dropout=dropout,
            )
        )
        self.filtration = Filtration(
            out_channels, filter_size, num_directions if filter_per_direction else 1, filter_init, filter_constrain_dc
        )
        self.backprojection = Backprojection()
        if contrast_size > 0 and not intensity_term:
            raise ValueError("contrast_size > 0 (the local-contrast term) needs intensity_term=True.")
        self.fine_tuning = FineTuning(out_channels, pool_size, in_channels if intensity_term else 0, contrast_size)

    def forward(self, x: torch.Tensor, num_subset: int = 0) -> torch.Tensor:
        """Probabilities over all directions; with ``num_subset > 0`` both training paths (logits in training
        mode with ``train_logits``)."""
        logits = self.train_logits and self.training
        if num_subset > 0:
            z_aux, z = self.two_path_logits(x, num_subset)  # which checks x
            # one stack of the logits and one sigmoid: no copy of two probability volumes
            stacked = torch.stack([z, z_aux], 1)
            return stacked if logits else torch.sigmoid(stacked)
        self._check_input(x, 1)
        h, w = x.shape[2], x.shape[3]
        if h < 2 or w < 2:  # a line or a single voxel: its edge copy beside it, the same rays and values
            padded = nn.functional.pad(x, [0, 0, 0, max(2 - w, 0), 0, max(2 - h, 0)], mode="replicate")
            return self._all_directions(padded, logits)[:, :, :h, :w]
        return self._all_directions(x, logits)

    def _all_directions(self, x: torch.Tensor, logits: bool) -> torch.Tensor:
        """``T(R(F(U(M x))))`` over all ``p`` directions, ``(B, C, H, W, D) -> (B, K, H, W, D)``, ``H, W >= 2``."""
        p = self.num_directions
        h, w = x.shape[2], x.shape[3]
        q = self.filtration(self.segment(self.project(x, p)), p)
        r = self.backprojection(q, h, w, p)
        if logits:
            return self.fine_tuning.logits(r, x)
        # without a gradient, T overwrites R's output (a fresh tensor) instead of allocating a volume
        inplace = not torch.is_grad_enabled()
        if not torch.jit.is_scripting():
            if exporting():
                inplace = False
        return self.fine_tuning(r, inplace, x)

    def two_paths(self, x: torch.Tensor, num_subset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y_aux, y)`` of random 2.5D training, probabilities, each ``(B, K, H, W, D)``.

        Args:
            x: the volume, ``(B, C, H, W, D)``.
            num_subset: q, the size of path 1's random subset of directions, ``1 <= q <= p``
                (a fresh subset each call, from torch's global random generator).
        """
        z_aux, z = self.two_path_logits(x, num_subset)
        return torch.sigmoid(z_aux), torch.sigmoid(z)

    def two_path_logits(self, x: torch.Tensor, num_subset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits ``(z_aux, z)`` of :meth:`two_paths`, whose sigmoids are ``(y_aux, y)``; each ``(B, K, H, W, D)``."""
        p = self.num_directions
        if num_subset < 1 or num_subset > p:
            raise ValueError(f"num_subset (q) must be between 1 and num_directions (p = {p}), got {num_subset}.")
        self._check_input(x)
        h, w = x.shape[2], x.shape[3]
        order = torch.randperm(p)
        subset = order[:num_subset].sort().values
        rest = order[num_subset:].sort().values
        projections = self.project(x, p)
        dirs: list[int] = subset.tolist()
        logits = self.segment(projections[:, subset.to(x.device)])
        z_aux = self.backprojection(self.filtration(logits, p, dirs), h, w, p, dirs)
        # path 2: U frozen; the subset's logits are reused, the other directions run without a graph
        all_logits = torch.empty(
            (logits.shape[0], p) + logits.shape[2:], dtype=logits.dtype, device=logits.device
        )
        all_logits[:, subset.to(x.device)] = logits.detach()
        if num_subset < p:
            with torch.no_grad():
                all_logits[:, rest.to(x.device)] = self.segment(projections[:, rest.to(x.device)])
        z = self.fine_tuning.logits(self.backprojection(self.filtration(all_logits, p), h, w, p), x)
        return z_aux, z

    def project(self, x: torch.Tensor, num_directions: int) -> torch.Tensor:
        """``M`` with every reduction: ``(B, C, H, W, D) -> (B, p, C * len(reduction), N_s, D)``."""
        if len(self.projections) == 1:
            return self.projections[0](x, num_directions)
        return torch.cat([m(x, num_directions) for m in self.projections], dim=2)

    def segment(self, projections: torch.Tensor) -> torch.Tensor:
        """``U`` on every projection: ``(B, p', C, N_s, D) -> (B, p', K, N_s, D)`` logits."""
        b, p, c, n_s, d = projections.shape
        images = projections.reshape(b * p, c, n_s, d)
        m = self.margin
        pad_s = (-(n_s + 2 * m)) % self.divisor
        pad_d = (-(d + 2 * m)) % self.divisor
        if m > 0 or pad_s > 0 or pad_d > 0:
            images = nn.functional.pad(images, [m, m + pad_d, m, m + pad_s], mode="replicate")
        n, chunk = b * p, self.direction_batch
        if not torch.jit.is_scripting():
            if self.recompute > 0 and torch.is_grad_enabled() and not exporting():
                step = self.recompute
                parts = [
                    checkpoint(self.unet, images[i : i + step], use_reentrant=False, context_fn=_keep_convolutions)
                    for i in range(0, n, step)
                ]
                logits = (parts[0] if len(parts) == 1 else torch.cat(parts))[:, :, m : m + n_s, m : m + d]
                return logits.reshape(b, p, self.out_channels, n_s, d)
        if chunk <= 0 or n <= chunk or torch.is_grad_enabled():
            logits = self.unet(images)[:, :, m : m + n_s, m : m + d]
        else:
            logits = torch.empty((n, self.out_channels, n_s, d), dtype=images.dtype, device=images.device)
            for i in range(0, n, chunk):
                logits[i : i + chunk] = self.unet(images[i : i + chunk])[:, :, m : m + n_s, m : m + d]
        return logits.reshape(b, p, self.out_channels, n_s, d)

    def _check_input(self, x: torch.Tensor, min_plane: int = 2) -> None:
        if x.dim() != 5:
            raise ValueError(f"the input must have shape (B, C, H, W, D), got shape {list(x.shape)}.")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"the network expects {self.in_channels} input channel(s), the input has {x.shape[1]}.")
        if x.shape[2] < min_plane or x.shape[3] < min_plane or x.shape[4] < 1:
            raise ValueError(
                f"the volume must be at least {min_plane} x {min_plane} x 1 voxels (H x W x D), got {list(x.shape[2:])}."
            )
        if not torch.jit.is_scripting():
            if exporting():
                return  # a check of the values has no place in an exported graph (and stops torch.export)
        # the extremes are NaN if any value is, and infinite if any value is: no volume-sized temporaries
        low, high = torch.aminmax(x)
        if not bool(torch.isfinite(low) & torch.isfinite(high)):
            raise ValueError("the input holds NaN or Inf values.")
