"""Seeded synthetic TOF-MRA volumes with vessel masks, and a decathlon-style dataset of them.

A case is a slab of a head: tissue with texture inside an elliptic outline, air outside;
branching, tapering, curving vessel trees (:mod:`scripts.phantom`) rendered with
partial volume at the bright inflow signal of time-of-flight MRA; bright but not tubular
fat-like distractors (a patch of the subcutaneous fat shell, lobulated blobs) that are
not labelled; a smooth multiplicative bias field; and Rician noise (the magnitude of
complex Gaussian noise). Voxels are anisotropic and the affine holds a small rotation,
axis flips and an origin away from zero.

Every case is a deterministic function of ``(seed, case index)`` alone, so a dataset of
more cases only appends cases. Command line (from the bundle root)::

    python -m scripts.synthetic --output_dir data/synthetic --num_cases 20 --seed 0
    python -m scripts.synthetic figure --out docs/images/synthetic_cases.png
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial

import fire
import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from scripts.phantom import (
    VesselTree,
    grow_vessel_tree,
    random_rotation,
    render_distractors,
    render_segments,
    smoothstep,
)

__all__ = ["SyntheticCase", "synthesize_case", "generate_case", "write_dataset", "main"]

logger = logging.getLogger(__name__)

MIN_SIZE = 16
SIZE_RANGE = (48, 96)
IN_PLANE_SPACING_RANGE = (0.4, 0.8)
THROUGH_PLANE_SPACING_RANGE = (0.5, 1.2)
SNR_RANGE = (10.0, 35.0)
SeedLike = int | Sequence[int]


@dataclass(frozen=True)
class SyntheticCase:
    """One synthetic case; arrays are ``(H, W, D)`` in stored voxel order (after flips).

    Attributes:
        image: the TOF-MRA magnitude image, float32 (vessel signal about 1).
        label: the vessel mask, uint8 in {0, 1}.
        affine: the voxel-to-world (RAS, mm) matrix, ``(4, 4)`` float64.
        distractors: where the fat-like distractors fill at least half a voxel, bool.
        spacing: the voxel size along each array axis, in mm.
        snr: vessel signal over the noise's standard deviation.
        tree: the vessel segments, in mm on the unflipped grid's frame.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    distractors: np.ndarray
    spacing: tuple[float, float, float]
    snr: float
    tree: VesselTree


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer of at least {minimum}, got {value!r}.")
    return int(value)


def _as_shape(size: int | Sequence[int]) -> tuple[int, int, int]:
    sizes = (size,) * 3 if np.isscalar(size) else tuple(size)
    if len(sizes) != 3 or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in sizes):
        raise ValueError(f"size must be an integer or 3 integers (H, W, D), got {size!r}.")
    if min(sizes) < MIN_SIZE:
        raise ValueError(f"every size must be at least {MIN_SIZE} voxels, got {size!r}.")
    return tuple(int(s) for s in sizes)


def _as_spacing(spacing: float | Sequence[float]) -> tuple[float, float, float]:
    values = (spacing,) * 3 if np.isscalar(spacing) else tuple(spacing)
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be a positive number or 3 positive numbers (mm), got {spacing!r}.")
    return tuple(float(v) for v in values)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to unit standard deviation, float32."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    return field / max(float(field.std()), 1e-6)


def synthesize_case(
    shape: int | Sequence[int] | None = None,
    spacing: float | Sequence[float] | None = None,
    seed: SeedLike = 0,
    snr: float | None = None,
    num_roots: int | None = None,
    num_distractors: int | None = None,
    min_radius: float = 0.4,
    tortuosity: float = 0.08,
    max_rotation: float = 10.0,
) -> SyntheticCase:
    """Generate one synthetic TOF-MRA case with everything that went into it.

    Args:
        shape: ``(H, W, D)`` or one size for all axes (each at least 16); drawn from
            48-96 per axis when None.
        spacing: voxel size in mm; drawn when None (0.4-0.8 in-plane, the same for H and
            W, and 0.5-1.2 through-plane along D).
        seed: an integer or a sequence of integers (e.g. ``(seed, case_index)``).
        snr: vessel signal over noise standard deviation; drawn from 10-35 when None.
        num_roots: the number of vessel trees; drawn from 2-4 when None.
        num_distractors: the number of fat-like blobs besides the fat shell; drawn from
            1-3 when None.
        min_radius: the radius of the thinnest vessels, in in-plane voxels.
        tortuosity: how much vessels wander (0: straight branches).
        max_rotation: the largest rotation about each world axis in the affine, degrees.

    Returns:
        The case; see :class:`SyntheticCase`.
    """
    seeds = [int(s) for s in np.atleast_1d(seed)]
    if any(s < 0 for s in seeds):
        raise ValueError(f"seed must be non-negative, got {seed!r}.")
    if snr is not None and not snr > 0:
        raise ValueError(f"snr must be positive, got {snr!r}.")
    if not 0 < min_radius < 2:
        raise ValueError(f"min_radius must be in (0, 2) voxels, got {min_radius!r}.")
    if tortuosity < 0 or max_rotation < 0:
        raise ValueError(f"tortuosity and max_rotation must be non-negative, got {tortuosity} and {max_rotation}.")
    if num_roots is not None:
        _check_int(num_roots, "num_roots", 1)
    if num_distractors is not None:
        _check_int(num_distractors, "num_distractors", 0)
    # One stream per component, so that fixing e.g. the shape leaves the others as they were.
    geo, vessels, fat, tissue, noise = (np.random.default_rng(s) for s in np.random.SeedSequence(seeds).spawn(5))

    drawn_shape = tuple(int(s) for s in geo.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1, size=3))
    drawn_spacing = (geo.uniform(*IN_PLANE_SPACING_RANGE),) * 2 + (geo.uniform(*THROUGH_PLANE_SPACING_RANGE),)
    shape = _as_shape(drawn_shape if shape is None else shape)
    spacing = _as_spacing(drawn_spacing if spacing is None else spacing)
    snr = float(geo.uniform(*SNR_RANGE) if snr is None else snr)
    rotation, flips, shift = random_rotation(geo, max_rotation), geo.random(3) < 0.5, geo.uniform(-30, 30, size=3)

    sp = np.array(spacing)
    extent = (np.array(shape) - 1) * sp
    unit = float(min(sp[0], sp[1]))
    # Head outline (in-plane ellipse), coordinates relative to the grid's centre.
    semi_axes = np.array([*(extent[:2] / 2 * geo.uniform(0.85, 1.0, size=2)), extent[2] / 2])
    coords = [(np.arange(n) * sp[a] - extent[a] / 2).reshape([-1 if b == a else 1 for b in range(3)])
              for a, n in enumerate(shape)]

    def head_radius(point: np.ndarray) -> tuple[float, np.ndarray]:
        rel = (point - extent / 2)[:2] / semi_axes[:2]
        return float(np.linalg.norm(rel)), rel

    def inside(point: np.ndarray) -> bool:
        return head_radius(point)[0] < 0.9 and -2 * unit < point[2] < extent[2] + 2 * unit

    def steer(point: np.ndarray) -> np.ndarray:
        # Vessels near the head's outline bend back inwards (as along the brain's surface).
        rho, rel = head_radius(point)
        pull = 2.0 * max(0.0, rho - 0.6) / max(rho, 1e-6)
        return np.array([-pull * rel[0], -pull * rel[1], 0.0])

    roots = []
    for _ in range(num_roots if num_roots is not None else int(vessels.integers(2, 5))):
        angle, rad = vessels.uniform(0, 2 * np.pi), 0.5 * np.sqrt(vessels.uniform())
        start = extent / 2 + np.array([rad * semi_axes[0] * np.cos(angle), rad * semi_axes[1] * np.sin(angle), 0])
        start[2] = 0.0
        roots.append((start, np.array([*vessels.normal(scale=0.4, size=2), 1.0])))
    root_radius = vessels.uniform(1.5, 2.8) * unit * min(1.0, min(shape) / 48) ** 0.5
    tree = grow_vessel_tree(vessels, roots, root_radius, min_radius * unit, unit, inside, steer, tortuosity)
    vessel_occ, vessel_signal, label = render_segments(tree, shape, spacing)

    count = num_distractors if num_distractors is not None else int(fat.integers(1, 4))
    vessel_points = tree.starts - extent / 2
    fat_occ, fat_signal = render_distractors(fat, coords, semi_axes, unit, count, vessel_points, tree.start_radii)

    rho = np.sqrt((coords[0] / semi_axes[0]) ** 2 + (coords[1] / semi_axes[1]) ** 2)
    head = smoothstep((1.0 - rho) * semi_axes[:2].mean() / unit + 0.5)
    texture = 0.12 * _smooth_noise(tissue, shape, 2.5 * unit / sp) + 0.05 * _smooth_noise(tissue, shape, 0.8)
    background = head * tissue.uniform(0.12, 0.22) * (1.0 + texture) + 0.01
    image = background * (1 - fat_occ) + fat_signal
    image = image * (1 - vessel_occ) + vessel_signal
    coarse = tissue.normal(scale=0.1, size=(3, 3, 3))
    image *= np.exp(ndimage.zoom(coarse, np.array(shape) / 3.0, order=3, mode="nearest", grid_mode=True))
    sigma = 1.0 / snr
    real = image + sigma * noise.standard_normal(shape, dtype=np.float32)
    image = np.sqrt(real**2 + (sigma * noise.standard_normal(shape, dtype=np.float32)) ** 2).astype(np.float32)

    linear = rotation @ np.diag(sp)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ ((np.array(shape) - 1) / 2) + shift
    distractors = fat_occ >= 0.5
    label = label.astype(np.uint8)
    for axis in np.flatnonzero(flips):
        # Store the voxels in another order while the world stays the same.
        affine[:3, 3] += affine[:3, axis] * (shape[axis] - 1)
        affine[:3, axis] *= -1
        image, label, distractors = (np.flip(a, axis) for a in (image, label, distractors))
    image, label, distractors = (np.ascontiguousarray(a) for a in (image, label, distractors))
    return SyntheticCase(image, label, affine, distractors, spacing, snr, tree)


def generate_case(
    shape: int | Sequence[int] | None = None,
    spacing: float | Sequence[float] | None = None,
    seed: SeedLike = 0,
    **kwargs,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate one synthetic TOF-MRA case.

    Args:
        shape: ``(H, W, D)``, one size for all axes, or None to draw it.
        spacing: voxel size in mm, or None to draw it.
        seed: an integer or a sequence of integers.
        kwargs: more options of :func:`synthesize_case`.

    Returns:
        ``(image, label, affine)``: the image ``(H, W, D)`` float32, the vessel mask
        ``(H, W, D)`` uint8 in {0, 1}, and the ``(4, 4)`` voxel-to-world matrix they share.

    Examples::

        image, label, affine = generate_case((48, 40, 33), seed=3)
    """
    case = synthesize_case(shape, spacing, seed, **kwargs)
    return case.image, case.label, case.affine


def _split(num_cases: int, seed: int, val_fraction: float, test_fraction: float) -> dict[str, list[int]]:
    """Disjoint, complete, seeded split of the case indices into training/validation/test."""
    num_val, num_test = round(num_cases * val_fraction), round(num_cases * test_fraction)
    # A fraction asked for is never rounded away while at least one training case is left.
    if val_fraction > 0 and num_val == 0 and num_cases - num_test >= 2:
        num_val = 1
    if test_fraction > 0 and num_test == 0 and num_cases - num_val >= 2:
        num_test = 1
    if num_cases - num_val - num_test < 1:
        raise ValueError(
            f"{num_cases} case(s) with val_fraction={val_fraction} and test_fraction={test_fraction} "
            "leave no training case; generate more cases or lower the fractions."
        )
    order = np.random.default_rng([seed, num_cases]).permutation(num_cases)
    val, test = sorted(order[:num_val]), sorted(order[num_val : num_val + num_test])
    train = sorted(order[num_val + num_test :])
    return {"training": [int(i) for i in train], "validation": [int(i) for i in val], "test": [int(i) for i in test]}


def _write_case(index: int, output_dir: str, seed: int, name: str, case_kwargs: dict) -> dict:
    """Generate case ``index`` and write its image and label; returns its datalist entry."""
    case = synthesize_case(seed=(seed, index), **case_kwargs)
    entry = {"image": f"imagesTr/{name}.nii.gz", "label": f"labelsTr/{name}.nii.gz"}
    for key, array in (("image", case.image), ("label", case.label)):
        img = nib.Nifti1Image(array, case.affine)
        img.set_sform(case.affine, code=1)
        img.set_qform(case.affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
        nib.save(img, os.path.join(output_dir, entry[key]))
    return entry


def write_dataset(
    output_dir: str,
    num_cases: int = 20,
    seed: int = 0,
    size: int | Sequence[int] | None = None,
    spacing: float | Sequence[float] | None = None,
    snr: float | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.1,
    num_workers: int = 1,
) -> str:
    """Write synthetic cases as NIfTI files plus a decathlon-style ``dataset.json``.

    Case ``i`` is ``synthesize_case(seed=(seed, i), ...)``, written to
    ``imagesTr/case_XXX.nii.gz`` (float32) and ``labelsTr/case_XXX.nii.gz`` (uint8).

    Args:
        output_dir: the folder to write (created if missing).
        num_cases: how many cases (at least 1).
        seed: the dataset's seed (non-negative).
        size: ``(H, W, D)`` or one size for every case; drawn per case when None.
        spacing: voxel size in mm for every case; drawn per case when None.
        snr: noise level for every case; drawn per case when None.
        val_fraction: the fraction of cases listed under ``validation``.
        test_fraction: the fraction of cases listed under ``test``.
        num_workers: processes generating cases in parallel.

    Returns:
        The path of ``dataset.json``.
    """
    num_cases, seed = _check_int(num_cases, "num_cases", 1), _check_int(seed, "seed", 0)
    num_workers = _check_int(num_workers, "num_workers", 1)
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            "val_fraction and test_fraction must be in [0, 1) with a sum below 1, "
            f"got {val_fraction} and {test_fraction}."
        )
    if snr is not None and not snr > 0:
        raise ValueError(f"snr must be positive, got {snr!r}.")
    shape, spacing = (None if size is None else _as_shape(size)), (None if spacing is None else _as_spacing(spacing))
    case_kwargs = {"shape": shape, "spacing": spacing, "snr": snr}
    split = _split(num_cases, seed, val_fraction, test_fraction)
    output_dir = os.path.abspath(output_dir)
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(output_dir, sub), exist_ok=True)
    digits = max(3, len(str(num_cases - 1)))
    names = [f"case_{i:0{digits}d}" for i in range(num_cases)]
    logger.info("writing %d synthetic case(s) with seed %d to %s", num_cases, seed, output_dir)
    jobs = [partial(_write_case, i, output_dir, seed, names[i], case_kwargs) for i in range(num_cases)]
    if num_workers == 1:
        entries = [job() for job in tqdm(jobs, desc="synthetic cases", unit="case")]
    else:
        with ProcessPoolExecutor(max_workers=num_workers) as pool:
            futures = [pool.submit(job) for job in jobs]
            entries = [f.result() for f in tqdm(futures, desc="synthetic cases", unit="case")]

    dataset = {
        "name": "SyntheticTOFMRA",
        "description": "Synthetic time-of-flight MR angiography with vessel masks (scripts.synthetic).",
        "reference": "generated by `python -m scripts.synthetic`",
        "licence": "CC0",
        "tensorImageSize": "3D",
        "modality": {"0": "MRA"},
        "channel_names": {"0": "TOF-MRA"},
        "labels": {"0": "background", "1": "vessel"},
        "file_ending": ".nii.gz",
        "seed": int(seed),
        "numTraining": len(split["training"]),
        "numValidation": len(split["validation"]),
        "numTest": len(split["test"]),
        **{key: [entries[i] for i in indices] for key, indices in split.items()},
    }
    path = os.path.join(output_dir, "dataset.json")
    with open(path, "w") as f:
        json.dump(dataset, f, indent=2)
    logger.info("wrote %s (%d training, %d validation, %d test)", path, *(len(v) for v in split.values()))
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``write_dataset`` by default, ``figure`` for the docs' MIP figure.

    Args:
        argv: the arguments (``sys.argv[1:]`` when None).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "figure":
            # Imported here: matplotlib is only needed for the figure.
            from scripts.preview import save_synthetic_figure

            fire.Fire(save_synthetic_figure, command=argv[1:], name="scripts.synthetic figure")
        else:
            fire.Fire(write_dataset, command=argv, name="scripts.synthetic")
    except ValueError as error:
        raise SystemExit(f"scripts.synthetic: error: {error}") from None


if __name__ == "__main__":
    main()
