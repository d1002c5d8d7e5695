"""Windows for the 2.5D U-Net: whole axial planes by default, never padding the volume.

The 2.5D U-Net sees a volume through projections along rays in the axial (H x W) plane, so its
natural window is the whole volume, one pass (``sw_roi_size`` ``[-1, -1, -1]`` in the configs).
Where memory needs windows, they should span the whole plane and chunk along z (no ray runs along
z, so a chunk's projections are those of the volume, exact up to the 2D U-Net's receptive field
along z at the chunk's ends, which the overlap covers: ``[-1, -1, 128]``). Windows in the plane
cut the rays: the MIP of a column is not the MIP of the volume, so they are an option, not the
default.

MONAI's ``SlidingWindowInferer`` pads a volume smaller than the window up to the window's
size. For a 3D U-Net that is harmless; for the 2.5D U-Net the padded rows become part of
every projection (replicated edge rows stack into stripes, constant ones into flat bands the
U-Net never saw in training). :class:`FittedSlidingWindowInferer` shrinks the window to the
volume along such axes instead, so a volume smaller than the window is one window of its own
size: the same result as a call of the network on the whole volume.

With its defaults (constant blending, one window per call, the volume and the network on one
device) it also aggregates with less memory than MONAI's loop: windows that span an axis or
share the same starts along it form a grid, so the count of windows over each voxel is the
product of one count per axis, and the division needs three short vectors instead of a count
map of the volume's size; a volume that is one window returns the network's output itself.
The values are MONAI's (tested).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.data.utils import dense_patch_slices
from monai.inferers import SlidingWindowInferer
from monai.utils import BlendMode, convert_to_dst_type, ensure_tuple_rep, fall_back_tuple

__all__ = ["FittedSlidingWindowInferer", "window_starts"]


class FittedSlidingWindowInferer(SlidingWindowInferer):
    """``SlidingWindowInferer`` whose window never exceeds the volume (a window larger than it is not padded).

    Args:
        args: as ``SlidingWindowInferer`` (``roi_size``, ``sw_batch_size``, ``overlap``, ...); a non-positive
            ``roi_size`` entry spans the volume along that axis, as there.
        fit_to_image: shrink the window along each axis where the volume is smaller (default); False gives
            ``SlidingWindowInferer`` itself, which pads (for networks that need a fixed input size, e.g. a 3D
            U-Net whose size must divide by its total stride).
        kwargs: as ``SlidingWindowInferer``.

    Shapes:
        ``inputs`` ``(B, C, *spatial)``; the output as the network's, over the whole volume.
    """

    def __init__(self, *args: Any, fit_to_image: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fit_to_image = fit_to_image

    def fitted_roi(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        """The window for a volume of ``spatial`` size: ``roi_size`` with non-positive entries and, with
        ``fit_to_image``, entries larger than the volume replaced by the volume's size."""
        roi = fall_back_tuple(self.roi_size, spatial)
        if not self.fit_to_image:
            return tuple(roi)
        return tuple(min(r, s) for r, s in zip(roi, spatial))

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        roi = self.fitted_roi(tuple(inputs.shape[2:]))
        if self._grid_path(inputs, kwargs):
            return self._grid(inputs, network, roi, *args, **kwargs)
        configured = self.roi_size
        self.roi_size = roi
        try:
            return super().__call__(inputs, network, *args, **kwargs)
        finally:
            self.roi_size = configured

    def _grid_path(self, inputs: Any, kwargs: dict) -> bool:
        """Whether :meth:`_grid` gives MONAI's result: fitted windows, constant blending, one window per call,
        no weight map, coordinates, buffering, progress bar or other device, and a tensor in."""
        return (self.fit_to_image and isinstance(inputs, torch.Tensor) and self.mode == BlendMode.CONSTANT
                and self.sw_batch_size == 1 and self.roi_weight_map is None and not self.with_coord
                and not self.buffer_steps and self.sw_device is None and self.device is None
                and self.cpu_thresh is None and not self.progress and not kwargs)

    def _grid(self, inputs: torch.Tensor, network: Any, roi: Sequence[int], *args: Any) -> torch.Tensor:
        """The windows' mean over each voxel, accumulated in one output volume and divided by the per-axis counts."""
        spatial = tuple(inputs.shape[2:])
        overlap = ensure_tuple_rep(self.overlap, len(spatial))
        starts = [window_starts(n, r, o) for n, r, o in zip(spatial, roi, overlap)]
        meta = MetaTensor([]).copy_meta_from(inputs, copy_attr=False) if isinstance(inputs, MetaTensor) else None
        plain = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        output: torch.Tensor | None = None
        for corner in itertools.product(*starts):
            window = (slice(None), slice(None)) + tuple(slice(c, c + r) for c, r in zip(corner, roi))
            out = network(plain[window].contiguous(), *args)  # the fused kernels read a dense window
            if tuple(out.shape[2:]) != tuple(roi):
                raise ValueError(f"the network turned a window of {list(roi)} voxels into {list(out.shape[2:])}: "
                                 "these windows need an output of the window's spatial size.")
            if output is None:
                if all(len(s) == 1 for s in starts):  # the volume is one window
                    output = out
                    break
                output = torch.zeros(out.shape[:2] + spatial, dtype=out.dtype, device=out.device)
            output[window] += out
        assert output is not None
        for axis, (n, r, axis_starts) in enumerate(zip(spatial, roi, starts)):
            if len(axis_starts) > 1:
                counts = torch.zeros(n, dtype=output.dtype, device=output.device)
                for c in axis_starts:
                    counts[c : c + r] += 1
                shape = [1] * output.dim()
                shape[axis + 2] = n
                output.div_(counts.view(shape))
        if meta is not None:
            return convert_to_dst_type(output, meta)[0]
        return output


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start indices of the windows along one axis, as MONAI places them (``dense_patch_slices`` with the scan
    interval ``int(roi * (1 - overlap))``, at least 1, so the last window is flush with the end); ``[0]`` where
    the window spans the axis."""
    if roi >= size:
        return [0]
    step = max(int(roi * (1 - overlap)), 1)
    return [patch[0].start for patch in dense_patch_slices((size,), (roi,), (step,))]
