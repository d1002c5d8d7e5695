"""Whole-volume inference does not depend on the field of view: the same head padded with air gets the same mask.

The shipped weights through the inference command (``configs/inference.json``, one pass over the whole volume), on
a synthetic case and on the same voxels inside a field of view twice as wide in-plane, padded with air: noise
resampled from the case's own air, or zeros (as scanners and converters pad).
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest

from bundle_utils import BUNDLE_CMD, run
from scripts.synthetic import synthesize_case

SPACING = 0.6
SHAPE = (80, 72, 24)


def _write(path: str, array: np.ndarray, origin: np.ndarray) -> None:
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    affine[:3, 3] = origin
    nib.save(nib.Nifti1Image(array, affine), path)


def _padded(image: np.ndarray, fill: str, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int]]:
    """``image`` in the middle of a volume twice its in-plane size; returns it and the corner's offset."""
    h, w, d = image.shape
    if fill == "zeros":
        out = np.zeros((2 * h, 2 * w, d), np.float32)
    else:  # the case's air: its corner columns, resampled
        air = np.concatenate([image[:6, :6].ravel(), image[-6:, -6:].ravel(), image[:6, -6:].ravel()])
        out = rng.choice(air, size=(2 * h, 2 * w, d)).astype(np.float32)
    oh, ow = h // 2, w // 2
    out[oh : oh + h, ow : ow + w] = image
    return out, (oh, ow)


@pytest.fixture(scope="module")
def masks(tmp_path_factory):
    """Masks of the case and of its padded copies, from one run of the inference command over the folder."""
    tmp = tmp_path_factory.mktemp("invariance")
    data, out = tmp / "images", tmp / "out"
    os.makedirs(data)
    case = synthesize_case(SHAPE, SPACING, seed=(7, 3))
    image = case.image.astype(np.float32)
    origin = np.array([-20.0, 13.0, 5.0])
    _write(str(data / "case.nii.gz"), image, origin)
    offsets = {}
    for fill in ("air", "zeros"):
        padded, (oh, ow) = _padded(image, fill, np.random.default_rng(0))
        _write(str(data / f"padded_{fill}.nii.gz"), padded, origin - SPACING * np.array([oh, ow, 0]))
        offsets[fill] = (oh, ow)
    run(BUNDLE_CMD + ["run", "inference", "--config_file", "configs/inference.json", "--dataset_dir", str(data),
                      "--output_dir", str(out)], timeout=600)
    read = lambda name: np.asarray(nib.load(str(out / f"{name}_seg.nii.gz")).dataobj) > 0  # noqa: E731
    return read("case"), {fill: (read(f"padded_{fill}"), offsets[fill]) for fill in offsets}, case.label > 0


@pytest.mark.parametrize("fill", ["air", "zeros"])
def test_padded_field_of_view_gives_the_same_mask(masks, fill):
    mask, padded, _ = masks
    big, (oh, ow) = padded[fill]
    h, w, _ = mask.shape
    common = big[oh : oh + h, ow : ow + w]
    assert mask.sum() > 0, "the shipped model finds no vessel in the case"
    dice = 2 * (mask & common).sum() / (mask.sum() + common.sum())
    assert dice >= 0.98, dice
    outside = big.copy()
    outside[oh : oh + h, ow : ow + w] = False
    assert outside.sum() <= 0.01 * mask.sum()  # no vessel made up in the added air


def test_the_case_is_segmented(masks):
    mask, _, label = masks
    dice = 2 * (mask & label).sum() / (mask.sum() + label.sum())
    assert dice > 0.3, dice
