"""Tissue-referenced intensity scaling: the same head in a wider field of view is scaled the same."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from parameterized import parameterized

from scripts.intensity import ScaleIntensityToTissue, ScaleIntensityToTissued, tissue_reference


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
