"""Tissue-referenced intensity scaling: the same head in a wider field of view is scaled the same."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from parameterized import parameterized

from scripts.intensity import (
    ScaleIntensityToTissue,
    ScaleIntensityToTissued,
    ZeroBackground,
    ZeroBackgroundd,
    foreground_threshold,
    tissue_reference,
)


def _head(shape: tuple[int, int, int], seed: int = 0, noise: float = 0.02) -> np.ndarray:
    """A disc of tissue (0.3) with a few bright voxels (1.0) in noisy air, ``(H, W, D)``."""
    rng = np.random.default_rng(seed)
    h, w, d = shape
    y, x = np.mgrid[:h, :w]
    disc = ((y - h / 2) ** 2 + (x - w / 2) ** 2) < (0.4 * min(h, w)) ** 2
    image = np.abs(rng.normal(0, noise, shape)).astype(np.float32)
    image[disc] += 0.3 + rng.normal(0, 0.02, (int(disc.sum()), d)).astype(np.float32)
    image[h // 2, w // 3 : w // 2, :] = 1.0  # a vessel
    return image


def _pad_with_air(image: np.ndarray, factor: int, seed: int, noise: float = 0.02) -> tuple[np.ndarray, tuple]:
    h, w, d = image.shape
    rng = np.random.default_rng(seed + 100)
    out = np.abs(rng.normal(0, noise, (factor * h, factor * w, d))).astype(np.float32)
    corner = ((factor - 1) * h // 2, (factor - 1) * w // 2)
    region = (slice(corner[0], corner[0] + h), slice(corner[1], corner[1] + w), slice(None))
    out[region] = image
    return out, region


@parameterized.expand([[(40, 40, 8), 2], [(33, 47, 5), 2], [(24, 30, 6), 3]])
def test_reference_ignores_air_around_the_head(shape, factor):
    image = _head(shape)
    padded, region = _pad_with_air(image, factor, seed=1)
    ref, ref_padded = tissue_reference(image), tissue_reference(padded)
    assert abs(ref_padded - ref) / ref < 0.02
    scaled = ScaleIntensityToTissue()(image[None])[0]
    scaled_padded = ScaleIntensityToTissue()(padded[None])[0][region]
    assert np.abs(scaled_padded - scaled).max() < 0.02


def test_whole_image_percentiles_depend_on_the_field_of_view():
    """What the transform is for: MONAI's whole-image percentile scaling moves when air is added."""
    from monai.transforms import ScaleIntensityRangePercentiles

    image = _head((40, 40, 8))
    padded, region = _pad_with_air(image, 3, seed=1)
    scale = ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True)
    a, b = scale(image[None])[0], scale(padded[None])[0][region]
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 0.05


@parameterized.expand([[99.5, True], [90.0, True], [99.0, False]])
def test_scaling_maps_the_reference_to_one(upper, clip):
    image = _head((32, 32, 6), seed=3) * 57.0
    out = ScaleIntensityToTissue(upper, clip)(torch.as_tensor(image[None]))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (1, 32, 32, 6)
    ref = tissue_reference(image, upper)
    assert torch.allclose(out[0], torch.as_tensor(image / ref).clamp(0, 1) if clip else torch.as_tensor(image / ref))


def test_channels_are_scaled_each_by_its_own_reference():
    image = _head((20, 20, 4))
    out = ScaleIntensityToTissue(clip=False)(np.stack([image, 10 * image]))
    assert np.allclose(out[0], out[1], atol=1e-6)


def test_dictionary_version_keeps_the_metadata():
    image = MetaTensor(torch.as_tensor(_head((16, 16, 4))[None]), meta={"filename_or_obj": "a.nii.gz"})
    out = ScaleIntensityToTissued("image")({"image": image, "label": 1})
    assert isinstance(out["image"], MetaTensor) and out["image"].meta["filename_or_obj"] == "a.nii.gz"
    assert float(out["image"].max()) == 1.0 and out["label"] == 1


@parameterized.expand([[np.zeros((1, 4, 4, 4), np.float32)], [np.full((1, 4, 4, 4), 5.0, np.float32)]])
def test_empty_and_constant_images(image):
    out = ScaleIntensityToTissue()(image)
    assert np.isfinite(out).all() and out.shape == image.shape


@pytest.mark.parametrize("upper", [0.0, -1.0, 101.0])
def test_bad_percentile(upper):
    with pytest.raises(ValueError, match="percentile"):
        ScaleIntensityToTissue(upper)


@parameterized.expand([[(40, 40, 8), 0.02], [(33, 47, 5), 0.015], [(24, 30, 6), 0.01]])
def test_zero_background_clears_air_and_keeps_tissue(shape, noise):
    image = _head(shape, noise=noise)
    out = ZeroBackground()(image[None])[0]
    h, w, _ = shape
    assert out[:2, :2].max() == 0.0 and out[-2:, -2:].max() == 0.0  # the corners are air
    tissue = image > foreground_threshold(image)
    assert np.array_equal(out[tissue], image[tissue])  # tissue and the vessel keep their values
    assert out[h // 2, w // 3 : w // 2].min() == 1.0


def _graded_head(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A disc of tissue graded from 0.6 (centre) to 0.2 (rim), a bright vessel (1.0), air noise sigma 0.01."""
    rng = np.random.default_rng(seed)
    h, w, d = shape
    y, x = np.mgrid[:h, :w]
    r2 = ((y - h / 2) ** 2 + (x - w / 2) ** 2) / (0.4 * min(h, w)) ** 2
    image = np.abs(rng.normal(0, 0.01, shape)).astype(np.float32)
    image[r2 < 1] += (0.6 - 0.4 * r2[r2 < 1])[:, None] + rng.normal(0, 0.02, (int((r2 < 1).sum()), d)).astype(np.float32)
    image[h // 2, w // 3 : w // 2, :] = 1.0
    return image


@parameterized.expand([[(40, 40, 8), 2], [(33, 47, 5), 2], [(24, 30, 6), 3]])
def test_zero_background_makes_the_mip_independent_of_the_field_of_view(shape, factor):
    """The MIP of noisy air grows with the ray length; with the air at 0 the padded case is the case.

    The Otsu threshold moves a little with the amount of air, so tissue voxels right at it may fall either side.
    """
    image = _graded_head(shape)
    padded, region = _pad_with_air(image, factor, seed=1, noise=0.01)
    mip = lambda x: x.max(axis=0)  # noqa: E731  rays along the first axis, through the air above and below
    assert np.abs(mip(padded[:, region[1]]) - mip(np.pad(image, ((1, 1), (0, 0), (0, 0))))).max() > 0.0
    out, out_padded = ZeroBackground()(image[None])[0], ZeroBackground()(padded[None])[0]
    outside = out_padded.copy()
    outside[region] = 0.0
    assert outside.max() == 0.0  # nothing left in the added air: CropForegroundd(x > 0) crops it away
    changed = out_padded[region] != out
    assert changed.mean() < 0.01
    near = np.abs(image - foreground_threshold(image)) < 0.01
    assert near[changed].all()
    assert np.array_equal(mip(out_padded[region]) > 0.5, mip(out) > 0.5)


def test_zero_background_dictionary_version_and_channels():
    image = _head((20, 20, 4))
    data = {"image": MetaTensor(torch.as_tensor(np.stack([image, 10 * image]))), "label": 1}
    out = ZeroBackgroundd("image")(data)
    assert isinstance(out["image"], MetaTensor) and out["image"].shape == (2, 20, 20, 4)
    assert torch.allclose(out["image"][1], 10 * out["image"][0]) and out["label"] == 1


@parameterized.expand([[np.zeros((1, 4, 4, 4), np.float32)], [np.full((1, 4, 4, 4), 5.0, np.float32)]])
def test_zero_background_of_constant_images(image):
    out = ZeroBackground()(image)
    assert np.isfinite(out).all() and out.shape == image.shape
