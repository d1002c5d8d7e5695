"""Frangi vesselness and a threshold: the bundle's baseline without learning.

Frangi, Niessen, Vincken, Viergever, "Multiscale vessel enhancement filtering", MICCAI 1998:
at every scale sigma the eigenvalues of the Hessian tell a line (bright tube: one small, two
large negative eigenvalues) from a plate or a blob; the vesselness is the maximum over scales.

- :func:`frangi_vesselness`: ``skimage.filters.frangi`` on a volume with anisotropic voxels,
  scales in millimetres, normalised to ``[0, 1]`` per volume.
- :class:`FrangiSegmenter`: the threshold that maximises the mean Dice on training cases.
- :class:`FrangiNet`: the thresholded vesselness as a ``torch.nn.Module``, so that the same
  MONAI inferers, evaluators and metric handlers score it as they score the learned models.
- ``python -m scripts.frangi fit --datalist DATASET_JSON --out THRESHOLD_JSON``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from skimage.filters import frangi

from scripts.metrics import voxel_spacing

__all__ = ["frangi_vesselness", "dice_per_threshold", "FrangiSegmenter", "FrangiNet", "fit"]

DEFAULT_SIGMAS_MM = (0.5, 1.0, 1.5, 2.0)
DEFAULT_THRESHOLDS = tuple(np.round(np.arange(0.01, 1.0, 0.01), 2))


def _resample(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Linear resampling onto ``shape`` with the corner voxels' centres kept in place."""
    if tuple(shape) == volume.shape:
        return volume
    factors = [n_out / n_in for n_out, n_in in zip(shape, volume.shape)]
    return ndimage.zoom(volume, factors, order=1, mode="nearest", grid_mode=False)


def frangi_vesselness(
    image: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    sigmas_mm: Sequence[float] = DEFAULT_SIGMAS_MM,
    black_ridges: bool = False,
    iso_spacing: float | None = None,
    percentile: float = 99.9,
) -> np.ndarray:
    """Multiscale Frangi vesselness of a 3D volume, on the volume's own grid, in ``[0, 1]``.

    ``skimage.filters.frangi`` takes one isotropic scale in voxels, so the volume is resampled
    (linearly) to isotropic voxels of ``iso_spacing`` mm, filtered with scales
    ``sigmas_mm / iso_spacing`` voxels, and resampled back. Resampling rather than one sigma per
    axis because the Hessian's eigenvalues compare second derivatives across axes, which is only
    meaningful in physical units. ``frangi`` is called one scale at a time: it sets its
    structureness constant gamma (half the largest Hessian norm) at its first scale and its
    Hessian is not scale-normalised, so one call would mute the larger scales. The maximum over
    scales is divided by its ``percentile``-th percentile and clipped to ``[0, 1]``.

    Args:
        image: ``(H, W, D)`` intensities (e.g. normalised to ``[0, 1]``).
        spacing: voxel size in mm along H, W, D.
        sigmas_mm: Gaussian scales in mm (about the vessel radii to enhance).
        black_ridges: ``False`` for bright vessels (TOF-MRA), ``True`` for dark ones.
        iso_spacing: isotropic voxel size of the filtering grid; ``None``: the finest of ``spacing``.
        percentile: the percentile that maps to 1; high, as vessels fill a few % of a volume.

    Returns:
        float32 array of ``image``'s shape.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"frangi_vesselness expects an (H, W, D) volume, got shape {image.shape}.")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive voxel sizes (mm), got {tuple(spacing)}.")
    if len(sigmas_mm) == 0 or min(sigmas_mm) <= 0:
        raise ValueError(f"sigmas_mm must be positive scales in mm, got {tuple(sigmas_mm)}.")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}.")
    if not np.isfinite(image).all():
        raise ValueError("the image holds NaN or Inf values.")
    iso = float(min(spacing) if iso_spacing is None else iso_spacing)
    if iso <= 0:
        raise ValueError(f"iso_spacing must be positive, got {iso}.")
    iso_shape = [max(1, int(round((n - 1) * s / iso)) + 1) for n, s in zip(image.shape, spacing)]
    iso_image = _resample(image, iso_shape)
    vesselness = np.zeros_like(iso_image)
    for sigma in sigmas_mm:
        per_scale = frangi(iso_image, sigmas=[sigma / iso], black_ridges=black_ridges, mode="nearest")
        np.maximum(vesselness, per_scale, out=vesselness)
    vesselness = _resample(vesselness, image.shape)
    scale = float(np.percentile(vesselness, percentile))
    if scale <= 0:
        scale = float(vesselness.max())
    if scale <= 0:
        return np.zeros(image.shape, np.float32)
    return np.clip(vesselness / scale, 0.0, 1.0).astype(np.float32)


def dice_per_threshold(
    vesselness: Sequence[np.ndarray], labels: Sequence[np.ndarray], thresholds: Sequence[float]
) -> np.ndarray:
    """Dice of ``vesselness > t`` against every label for every threshold t, ``(cases, thresholds)``.

    Vectorised over thresholds: the counts above each threshold come from ``np.searchsorted`` on
    the sorted vesselness of the whole case and of its label's voxels. A case with an empty label
    gets ``nan`` (MONAI's ``ignore_empty``).
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    rows = []
    for v, label in zip(vesselness, labels):
        v, label = np.asarray(v).ravel(), np.asarray(label).ravel() > 0
        if v.shape != label.shape:
            raise ValueError(f"vesselness and label differ in size: {v.size} and {label.size} voxels.")
        n_label = np.count_nonzero(label)
        if n_label == 0:
            rows.append(np.full(thresholds.shape, np.nan))
            continue
        above = v.size - np.searchsorted(np.sort(v), thresholds, side="right")
        hits = n_label - np.searchsorted(np.sort(v[label]), thresholds, side="right")
        rows.append(2.0 * hits / (above + n_label))
    return np.stack(rows)


class FrangiSegmenter:
    """Vessel segmentation as ``frangi_vesselness(image) > threshold``, the threshold fitted.

    Args:
        sigmas_mm: scales of :func:`frangi_vesselness`, in mm.
        threshold: a threshold in ``[0, 1]``; ``None`` until :meth:`fit`.
        thresholds: the grid :meth:`fit` searches.
        black_ridges: ``True`` for dark vessels.

    Examples::

        >>> seg = FrangiSegmenter().fit(images, labels, spacings)  # lists of (H, W, D) arrays
        >>> mask = seg.predict(image, spacing=(0.5, 0.5, 0.8))      # uint8 0/1, image's shape
    """

    def __init__(
        self,
        sigmas_mm: Sequence[float] = DEFAULT_SIGMAS_MM,
        threshold: float | None = None,
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        black_ridges: bool = False,
    ) -> None:
        self.sigmas_mm = tuple(float(s) for s in sigmas_mm)
        self.threshold = threshold
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.black_ridges = black_ridges
        self.train_dice: float | None = None

    def vesselness(self, image: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        return frangi_vesselness(image, spacing, self.sigmas_mm, self.black_ridges)

    def fit(
        self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], spacings: Sequence[Sequence[float]]
    ) -> FrangiSegmenter:
        """Choose the threshold of the grid with the highest mean Dice over the cases."""
        if not len(images) == len(labels) == len(spacings) or len(images) == 0:
            raise ValueError("fit needs as many labels and spacings as images, and at least one case.")
        vesselness = [self.vesselness(image, spacing) for image, spacing in zip(images, spacings)]
        dice = dice_per_threshold(vesselness, labels, self.thresholds)
        if np.isnan(dice).all():
            raise ValueError("every training label is empty: no threshold can be chosen.")
        mean = np.nanmean(dice, axis=0)
        best = int(np.argmax(mean))
        self.threshold, self.train_dice = float(self.thresholds[best]), float(mean[best])
        return self

    def predict(self, image: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        """The uint8 0/1 vessel mask of ``image`` ``(H, W, D)``."""
        if self.threshold is None:
            raise ValueError("no threshold: give one or call fit first.")
        return (self.vesselness(image, spacing) > self.threshold).astype(np.uint8)


class FrangiNet(torch.nn.Module):
    """The thresholded Frangi vesselness as a network, for MONAI inferers and evaluators.

    It has no parameters (nothing to train, nothing to load): in a bundle it replaces
    ``network_def`` in an evaluation or inference config. The voxel spacing of every case comes
    from its ``MetaTensor`` affine (as ``scripts.metrics.HausdorffDistanceMM`` reads it), else
    from ``spacing``.

    Args:
        threshold: vesselness threshold in ``[0, 1]``, e.g. from ``python -m scripts.frangi fit``.
        sigmas_mm: scales of :func:`frangi_vesselness`, in mm.
        spacing: voxel size (mm) for inputs without an affine.
        black_ridges: ``True`` for dark vessels.

    Shapes:
        ``(B, 1, H, W, D) -> (B, 1, H, W, D)``, float 0/1 (a mask, which is also a probability);
        a ``MetaTensor`` input gives a ``MetaTensor`` with the input's metadata.

    Examples::

        >>> net = FrangiNet(threshold=0.3, spacing=(0.5, 0.5, 0.8))
        >>> net(torch.rand(1, 1, 32, 32, 24)).shape
        torch.Size([1, 1, 32, 32, 24])
        >>> net = FrangiNet.from_json("models/frangi.json")  # written by `python -m scripts.frangi fit`
    """

    def __init__(
        self,
        threshold: float,
        sigmas_mm: Sequence[float] = DEFAULT_SIGMAS_MM,
        spacing: Sequence[float] | None = None,
        black_ridges: bool = False,
    ) -> None:
        super().__init__()
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}.")
        self.segmenter = FrangiSegmenter(sigmas_mm, threshold, black_ridges=black_ridges)
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)

    @classmethod
    def from_json(cls, path: str, spacing: Sequence[float] | None = None) -> FrangiNet:
        """A ``FrangiNet`` with the threshold and scales of a JSON file written by :func:`fit`."""
        with open(path) as f:
            fitted = json.load(f)
        return cls(fitted["threshold"], fitted["sigmas_mm"], spacing, fitted.get("black_ridges", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != 1:
            raise ValueError(f"FrangiNet expects (B, 1, H, W, D), got shape {list(x.shape)}.")
        spacings = voxel_spacing(x)
        if spacings is None:
            if self.spacing is None:
                raise ValueError("the input has no affine: give FrangiNet a `spacing`.")
            spacings = [list(self.spacing)] * x.shape[0]
        volumes = x.detach().float().cpu().numpy()
        masks = np.stack([self.segmenter.predict(v[0], s)[None] for v, s in zip(volumes, spacings)])
        out = torch.zeros_like(x)  # keeps a MetaTensor's metadata
        out.copy_(torch.from_numpy(masks))
        return out


def fit(
    datalist: str,
    out: str,
    split: str = "training",
    base_dir: str | None = None,
    sigmas_mm: Sequence[float] = DEFAULT_SIGMAS_MM,
    upper: float = 99.5,
) -> dict:
    """Fit the threshold on a decathlon-style datalist's split; write it with the scales as JSON.

    Images get the bundle's intensity normalisation (:class:`scripts.intensity.ScaleIntensityToTissue`: the
    foreground's ``upper`` percentile to 1, clipped to ``[0, 1]``); labels are binarised (``> 0``); spacings come from the affines.
    ``out``'s folder is created if missing.
    """
    from monai.data import load_decathlon_datalist
    from monai.data.utils import affine_to_spacing
    from monai.transforms import LoadImage

    from scripts.intensity import ScaleIntensityToTissue

    cases = load_decathlon_datalist(datalist, True, split, base_dir)
    load = LoadImage(image_only=True)
    scale = ScaleIntensityToTissue(upper)
    images, labels, spacings = [], [], []
    for case in cases:
        image = load(case["image"])
        spacings.append([float(s) for s in affine_to_spacing(image.affine, r=3)])
        images.append(np.asarray(scale(image[None])[0], dtype=np.float32))
        labels.append(np.asarray(load(case["label"])) > 0)
    segmenter = FrangiSegmenter(sigmas_mm).fit(images, labels, spacings)
    result = {
        "threshold": segmenter.threshold,
        "sigmas_mm": list(segmenter.sigmas_mm),
        "black_ridges": segmenter.black_ridges,
        "train_mean_dice": segmenter.train_dice,
        "num_cases": len(cases),
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    import fire

    fire.Fire({"fit": fit})
