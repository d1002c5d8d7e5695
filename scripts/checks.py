"""Checks of a loaded image's voxels that its header cannot show, as MONAI transforms.

:func:`scripts.files.check_image` looks at headers only (readable, a 3D volume, an invertible
affine). What is left needs the voxels: NaN or Inf values, a constant image (all zero, e.g. a
failed conversion: there is nothing to segment, and the percentile scaling would divide by
zero), and a volume that preprocessing (resampling to ``pixdim``, cropping to the foreground)
has left smaller than the network takes. Each raises a ``ValueError`` naming the file and the
problem, instead of a NaN mask or an error from deep inside the network.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_tensor

__all__ = ["CheckImage", "CheckImaged"]


class CheckImage(Transform):
    """Raise a ``ValueError`` if a channel-first image ``(C, H, W, D)`` cannot be segmented.

    Args:
        check_values: reject NaN or Inf voxels and a constant image.
        min_size: the smallest spatial size ``(H, W, D)`` the network takes (``None``: no
            limit); the 2.5D U-Net takes ``[2, 2, 1]``.

    The image passes through unchanged.

    Examples::

        >>> CheckImage(min_size=[2, 2, 1])(torch.rand(1, 4, 4, 3)).shape
        torch.Size([1, 4, 4, 3])
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, check_values: bool = True, min_size: Sequence[int] | None = None) -> None:
        self.check_values = check_values
        self.min_size = None if min_size is None else [int(s) for s in min_size]

    def __call__(self, img: Any, name: str | None = None) -> Any:
        """``img`` unchanged; ``name`` (the file) only goes into error messages."""
        where = str(name) if name else "the image"
        x = convert_to_tensor(img, track_meta=False)
        if self.check_values:
            self._check_values(x, where)
        if self.min_size is not None:
            self._check_size(x, where)
        return img

    @staticmethod
    def _check_values(x: torch.Tensor, where: str) -> None:
        if x.numel() == 0:
            raise ValueError(f"{where} holds no voxels: its shape is {list(x.shape)}.")
        if x.is_floating_point():
            nan, inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
            if nan or inf:
                raise ValueError(
                    f"{where} holds {nan} NaN and {inf} Inf voxel(s) of {x.numel()}: the network needs finite values; "
                    "fix or mask them in the file (e.g. set them to the background value)."
                )
        low, high = x.min(), x.max()
        if bool(low == high):
            raise ValueError(
                f"{where} is constant (every voxel is {low.item():g}): there is nothing to segment; "
                "is the file empty or a failed conversion?"
            )

    def _check_size(self, x: torch.Tensor, where: str) -> None:
        spatial = list(x.shape[1:])
        if len(spatial) != len(self.min_size) or any(s < m for s, m in zip(spatial, self.min_size)):
            raise ValueError(
                f"{where} is {' x '.join(map(str, spatial))} voxels after preprocessing (resampling to pixdim and "
                f"cropping to its foreground), smaller than the {' x '.join(map(str, self.min_size))} the network "
                "needs: check the image's voxel spacing and pixdim, or whether it holds more than a few bright voxels."
            )


class CheckImaged(MapTransform):
    """Dictionary version of :class:`CheckImage`; errors name the file the image came from.

    Args:
        keys: the image keys.
        check_values: see :class:`CheckImage`.
        min_size: see :class:`CheckImage`.
        allow_missing_keys: don't raise if a key is missing.
    """

    backend = CheckImage.backend

    def __init__(
        self,
        keys: KeysCollection,
        check_values: bool = True,
        min_size: Sequence[int] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.checker = CheckImage(check_values, min_size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            meta = getattr(d[key], "meta", None) or d.get(f"{key}_meta_dict") or {}
            self.checker(d[key], name=meta.get("filename_or_obj"))
        return d
