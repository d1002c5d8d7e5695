"""Intensity normalisation referenced to tissue, not to the field of view.

Percentiles over the whole image (MONAI's ``ScaleIntensityRangePercentiles``) depend on how
much air and padding the field of view holds: the same head is scaled one way in a tight crop
and another in a wide field of view, and a network trained on one sees the other out of
distribution. :class:`ScaleIntensityToTissue` takes its reference from the foreground only
(voxels above an Otsu threshold, which separates air from tissue): the ``upper`` percentile of
the foreground maps to 1, zero stays zero. Adding air or zero padding around a volume leaves
the foreground, and so the scaling, as it was (``tests/test_intensity.py``).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_numpy
from skimage.filters import threshold_otsu

__all__ = [
    "foreground_threshold",
    "tissue_reference",
    "ScaleIntensityToTissue",
    "ScaleIntensityToTissued",
    "ZeroBackground",
    "ZeroBackgroundd",
]


def foreground_threshold(image: np.ndarray) -> float:
    """The Otsu threshold of the image's histogram (256 bins), which separates air and padding from tissue.

    Args:
        image: the image, any shape; finite values.

    Returns:
        The threshold; the image's minimum for a constant image.
    """
    values = np.asarray(image, dtype=np.float32).ravel()
    low, high = float(values.min()), float(values.max())
    return float(threshold_otsu(values, nbins=256)) if high > low else low


def tissue_reference(image: np.ndarray, upper: float = 99.5) -> float:
    """The intensity that :class:`ScaleIntensityToTissue` maps to 1: the ``upper`` percentile of the foreground.

    Args:
        image: the image, any shape; finite values.
        upper: the percentile of the foreground voxels, in ``(0, 100]``.

    Returns:
        The reference intensity, positive; 1.0 for an image with no positive value.
    """
    values = np.asarray(image, dtype=np.float32).ravel()
    if values.size == 0 or float(values.max()) <= 0:
        return 1.0
    threshold = foreground_threshold(values)
    foreground = values[values > threshold]
    if foreground.size == 0:
        foreground = values[values >= threshold]
    reference = float(np.percentile(foreground, upper))
    return reference if reference > 0 else float(values.max())


class ScaleIntensityToTissue(Transform):
    """Scale an image ``(C, H, W, D)`` by its foreground's ``upper`` percentile: ``x / ref``, clipped to ``[0, 1]``.

    The foreground is every voxel above the Otsu threshold of the image's histogram (air and
    padding fall below it), so its percentiles describe the head and not the field of view.
    Each channel is scaled by its own reference.

    Args:
        upper: the foreground percentile that maps to 1, in ``(0, 100]``.
        clip: clip the result to ``[0, 1]``.

    Examples::

        >>> t = ScaleIntensityToTissue(upper=99.0)
        >>> t(torch.rand(1, 8, 8, 8)).shape
        torch.Size([1, 8, 8, 8])
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, upper: float = 99.5, clip: bool = True) -> None:
        if not 0 < upper <= 100:
            raise ValueError(f"upper must be a percentile in (0, 100], got {upper!r}.")
        self.upper = upper
        self.clip = clip

    def __call__(self, img: Any) -> Any:
        x = convert_to_numpy(img, dtype=np.float32)
        out = np.empty_like(x)
        for c in range(x.shape[0]):
            np.divide(x[c], tissue_reference(x[c], self.upper), out=out[c])
        if self.clip:
            np.clip(out, 0.0, 1.0, out=out)
        return convert_to_dst_type(out, img, dtype=torch.float32 if isinstance(img, torch.Tensor) else np.float32)[0]


class ScaleIntensityToTissued(MapTransform):
    """Dictionary version of :class:`ScaleIntensityToTissue`.

    Args:
        keys: the image keys.
        upper: see :class:`ScaleIntensityToTissue`.
        clip: see :class:`ScaleIntensityToTissue`.
        allow_missing_keys: don't raise if a key is missing.
    """

    backend = ScaleIntensityToTissue.backend

    def __init__(self, keys: KeysCollection, upper: float = 99.5, clip: bool = True,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.scaler = ScaleIntensityToTissue(upper, clip)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.scaler(d[key])
        return d


class ZeroBackground(Transform):
    """Set every voxel of an image ``(C, H, W, D)`` at or below its foreground threshold to 0, channel by channel.

    Air is noise, and the maximum of noise along a ray grows with the ray's length: a MIP of
    the same head inside a wider field of view of noisy air is brighter outside the head, and
    the 2D U-Net's normalisation sees a different detector. With the air at exactly 0, the
    projections through air are 0 whatever their length, and ``CropForegroundd`` (``x > 0``)
    crops the volume to the head, so a padded field of view gives the network the same input
    (``tests/test_invariance.py``). Tissue keeps its values; the threshold is
    :func:`foreground_threshold` (Otsu), which moves little with the amount of air.

    Examples::

        >>> img = torch.cat([torch.full((1, 4, 8, 8), 0.05), torch.full((1, 4, 8, 8), 0.8)], dim=1)
        >>> float(ZeroBackground()(img)[0, :4].max()), float(ZeroBackground()(img)[0, 4:].min())
        (0.0, 0.800000011920929)
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __call__(self, img: Any) -> Any:
        x = convert_to_numpy(img, dtype=np.float32)
        out = x.copy()
        for c in range(x.shape[0]):
            out[c][x[c] <= foreground_threshold(x[c])] = 0.0
        return convert_to_dst_type(out, img, dtype=torch.float32 if isinstance(img, torch.Tensor) else np.float32)[0]


class ZeroBackgroundd(MapTransform):
    """Dictionary version of :class:`ZeroBackground`.

    Args:
        keys: the image keys.
        allow_missing_keys: don't raise if a key is missing.
    """

    backend = ZeroBackground.backend

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.zero = ZeroBackground()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.zero(d[key])
        return d
