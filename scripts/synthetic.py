"""Seeded synthetic TOF-MRA volumes with vessel masks, and a decathlon-style dataset of them.

A case is an axial slab (30-80 mm) of a whole head in a 180-240 mm field of view, with
everything drawn at random (domain randomisation, as vesselFM, arXiv 2411.17386, but with
a head and the physics of time-of-flight MRA rather than random shapes):

- the head (:mod:`scripts.anatomy`): scalp fat, skull with marrow, CSF, a folded grey
  matter cortex over white matter, ventricles, skull base, orbits' fat, contrasts drawn;
- arteries (:mod:`scripts.phantom`, labelled): trees from the carotids, the basilar and a
  few more roots entering through the slab's floor, radii 2-4 mm down to 0.3 mm, with
  stenoses and occasional saccular aneurysms, bright by inflow that saturates along the
  flow and towards the slab's top;
- veins and dural sinuses (not labelled), dim and variable (venous saturation);
- the acquisition (:mod:`scripts.acquisition`): spacing 0.3-1.0 mm in-plane and 0.5-3 mm
  slices within a voxel cap, vessel-to-tissue contrast 1.5-5, a strong multi-scale bias,
  ghosts along the phase-encode axis, zero-filled borders, Rician noise (SNR 5-40), and
  an oblique, permuted, flipped affine with the origin anywhere.

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
from dataclasses import dataclass, replace
from functools import partial

import fire
import nibabel as nib
import numpy as np
from tqdm import tqdm

from scripts.acquisition import Grid, add_ghosts, bias_field, plan_grid, rician_noise, store, zero_borders
from scripts.anatomy import draw_head, render_head, venous_tree
from scripts.arteries import MAX_ROOTS, grow_arteries, inflow_signal
from scripts.phantom import VesselTree, random_rotation, render_segments

__all__ = ["SyntheticCase", "synthesize_case", "generate_case", "dataset_split", "write_dataset", "main"]

logger = logging.getLogger(__name__)

MIN_SIZE = 16
FOV_RANGE = (180.0, 240.0)
SLAB_RANGE = (30.0, 80.0)
IN_PLANE_SPACING_RANGE = (0.3, 1.0)
SLICE_SPACING_RANGE = (0.5, 3.0)
SNR_RANGE = (5.0, 40.0)
CONTRAST_RANGE = (1.5, 5.0)
MAX_VOXELS = 16_000_000
SeedLike = int | Sequence[int]


@dataclass(frozen=True)
class SyntheticCase:
    """One synthetic case; arrays are ``(H, W, D)`` in stored voxel order (after permutation and flips).

    Attributes:
        image: the TOF-MRA magnitude image, float32 (arterial inflow signal about 1).
        label: the artery mask (aneurysms included), uint8 in {0, 1}.
        affine: the voxel-to-world (RAS, mm) matrix, ``(4, 4)`` float64.
        distractors: bright structures that are not labelled (fat, marrow, veins, sinuses)
            filling at least half a voxel, never on the label, bool.
        veins: the veins and sinuses among them, bool.
        spacing: the voxel size along each stored array axis, in mm.
        snr: grey matter's signal over the noise's standard deviation.
        contrast: the arterial inflow signal over grey matter's.
        tree: the arteries' segments, in mm on the acquisition grid's frame.
        venous: the veins' segments, in mm on the acquisition grid's frame.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    distractors: np.ndarray
    veins: np.ndarray
    spacing: tuple[float, float, float]
    snr: float
    contrast: float
    tree: VesselTree
    venous: VesselTree


def _check_int(value: object, name: str, minimum: int, maximum: int | None = None) -> int:
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum
            or (maximum is not None and value > maximum)):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"of at least {minimum}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}.")
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


def synthesize_case(
    shape: int | Sequence[int] | None = None,
    spacing: float | Sequence[float] | None = None,
    seed: SeedLike = 0,
    snr: float | None = None,
    num_roots: int | None = None,
    contrast: float | None = None,
    fov: float | None = None,
    min_radius: float = 0.4,
    tortuosity: float = 0.08,
    max_rotation: float = 20.0,
    max_voxels: int = MAX_VOXELS,
) -> SyntheticCase:
    """Generate one synthetic TOF-MRA case with everything that went into it.

    Args:
        shape: ``(H, W, D)`` in stored order or one size for all axes (each at least 16);
            the head is scaled into it. None: from the field of view, the slab and the
            spacing, within ``max_voxels``.
        spacing: voxel size in mm, in stored order; drawn when None (0.3-1.0 in-plane, the
            same for both in-plane axes, and 0.5-3 for the slices).
        seed: an integer or a sequence of integers (e.g. ``(seed, case_index)``).
        snr: grey matter's signal over the noise's standard deviation; drawn from 5-40.
        num_roots: the number of arterial trees (1-8); drawn from 4-8 when None.
        contrast: arterial inflow signal over grey matter's; drawn from 1.5-5 when None.
        fov: the in-plane field of view in mm when ``shape`` is None; drawn from 180-240
            when None; below the head's size it is a partial field of view (life size).
        min_radius: the thinnest arteries' radius in voxels (the cube root of a voxel's
            volume), at least 0.3 mm.
        tortuosity: how much vessels wander (0: straight branches).
        max_rotation: the largest oblique rotation about each axis in the affine, degrees.
        max_voxels: the most voxels a case with a drawn shape may have.

    Returns:
        The case; see :class:`SyntheticCase`.
    """
    seeds = [int(s) for s in np.atleast_1d(seed)]
    if any(s < 0 for s in seeds):
        raise ValueError(f"seed must be non-negative, got {seed!r}.")
    for name, value in (("snr", snr), ("fov", fov)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}.")
    if contrast is not None and not contrast > 1:
        raise ValueError(f"contrast must be above 1 (vessels brighter than tissue), got {contrast!r}.")
    if not 0 < min_radius < 2:
        raise ValueError(f"min_radius must be in (0, 2) voxels, got {min_radius!r}.")
    if tortuosity < 0 or max_rotation < 0:
        raise ValueError(f"tortuosity and max_rotation must be non-negative, got {tortuosity} and {max_rotation}.")
    if num_roots is not None:
        _check_int(num_roots, "num_roots", 1, MAX_ROOTS)
    max_voxels = _check_int(max_voxels, "max_voxels", MIN_SIZE**3)
    # One stream per component, so that fixing e.g. the shape leaves the others as they were.
    geo, vessels, veins, tissue, artefacts, noise = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seeds).spawn(6))

    permutation = geo.permutation(3) if geo.random() < 0.3 else np.arange(3)
    flips, rotation = geo.random(3) < 0.5, random_rotation(geo, max_rotation)
    origin = geo.uniform(-150, 150, size=3)
    in_plane, slices = geo.uniform(*IN_PLANE_SPACING_RANGE), geo.uniform(*SLICE_SPACING_RANGE)
    fov_y = geo.uniform(*FOV_RANGE)
    drawn_fov = (geo.uniform(max(FOV_RANGE[0], 0.8 * fov_y), fov_y), fov_y)
    slab = geo.uniform(*SLAB_RANGE)
    snr = float(geo.uniform(*SNR_RANGE) if snr is None else snr)
    contrast = float(geo.uniform(*CONTRAST_RANGE) if contrast is None else contrast)
    offset, drop = geo.uniform(-1, 1, size=2), geo.uniform(5, 25)

    inverse = np.argsort(permutation)
    if spacing is not None:
        acq_spacing = tuple(np.array(_as_spacing(spacing))[inverse])
    else:
        acq_spacing = (in_plane, in_plane, slices)
    if shape is not None:
        acq_shape = tuple(int(n) for n in np.array(_as_shape(shape))[inverse])
        grid = Grid(acq_shape, tuple(float(v) for v in acq_spacing), drawn_fov)
    else:
        asked = drawn_fov if fov is None else (float(fov), float(fov))
        grid = plan_grid(asked, slab, acq_spacing, spacing is not None, max_voxels, FOV_RANGE[0], SLAB_RANGE[0])
    extent = grid.extent
    # A grid smaller than the drawn field of view gets a smaller head (never a larger one).
    scale = float(min(1.0, *(extent[:2] / np.array(drawn_fov)))) if shape is not None else 1.0
    whole = fov is None or shape is not None
    max_size = np.array(drawn_fov) - 10 if whole else (240.0, 240.0)
    head = draw_head(tissue, np.zeros(3), scale, max_size)
    room = extent[:2] / 2 - head.semi_axes[:2]
    shift = offset * np.where(room > 0, 0.8 * room, 0.1 * extent[:2])
    # The slab's floor lies 5-25 mm under the circle of Willis, itself 5-15 mm over the skull base.
    willis = head.base + geo.uniform(5, 15) * scale
    centre = np.array([*(extent[:2] / 2 + shift), drop * scale - willis])
    head = replace(head, centre=centre)
    unit = min(grid.spacing[:2])
    radius_scale = max(scale, min(1.0, unit / 1.5))

    tree = grow_arteries(vessels, head, grid, num_roots, min_radius, tortuosity, radius_scale)
    gm = 1.0 / contrast
    tree = inflow_signal(vessels, tree, extent[2], radius_scale, gm)
    venous = venous_tree(veins, head, radius_scale, veins.uniform(0.15, 0.75))
    coords = [(np.arange(n, dtype=np.float32) * np.float32(sp)).reshape([-1 if b == a else 1 for b in range(3)])
              for a, (n, sp) in enumerate(zip(grid.shape, grid.spacing))]
    voxel = float(np.prod(grid.spacing) ** (1 / 3))
    image, fat = render_head(tissue, head, coords, voxel, gm)
    vein_occ, vein_signal, _ = render_segments(venous, grid.shape, grid.spacing)
    image *= 1 - vein_occ
    image += vein_signal
    del vein_signal
    occupancy, signal, label = render_segments(tree, grid.shape, grid.spacing)
    image *= 1 - occupancy
    image += signal
    del occupancy
    image *= bias_field(artefacts, grid)
    add_ghosts(artefacts, image, signal)
    del signal
    image = rician_noise(noise, image, gm / snr)
    vein_mask = (vein_occ >= 0.5) & ~label
    distractors = ((fat >= 0.5) | vein_mask) & ~label
    del fat, vein_occ
    label = label.astype(np.uint8)
    zero_borders(artefacts, [image, label, distractors, vein_mask])
    (image, label, distractors, vein_mask), affine = store(
        [image, label, distractors, vein_mask], grid.spacing, rotation, permutation, flips, origin)
    spacing = tuple(float(grid.spacing[p]) for p in permutation)
    return SyntheticCase(image, label, affine, distractors, vein_mask, spacing, snr, contrast, tree, venous)


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


def dataset_split(num_cases: int, seed: int, val_fraction: float = 0.2, test_fraction: float = 0.1) -> dict[str, list[int]]:
    """The case indices of each split of ``write_dataset(num_cases=..., seed=...)``, without writing anything.

    Case ``i`` of the dataset is ``synthesize_case(seed=(seed, i))``, so a split's cases can be made in memory.
    """
    return _split(num_cases, seed, val_fraction, test_fraction)


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
